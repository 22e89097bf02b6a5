"""AUTOMATIC1111's web API (``/sdapi/v1``): its request bodies drawn as taiyi's library draws them, A1111's answers,
its clients (``webuiapi``, the usual Python one, against a real server), and one-line refusals of what taiyi cannot
honour."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("httpx2", reason="httpx2 (FastAPI's TestClient transport) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from taiyi.metadata import GenerationParameters  # noqa: E402
from taiyi.pipeline import crop_region  # noqa: E402
from taiyi.serve import ServeConfig, create_app  # noqa: E402
from taiyi.serve.a1111 import Progress, a1111_mask  # noqa: E402

PROMPT = "小桥流水人家"


@pytest.fixture(scope="module")
def client(pipe_zh):
    with TestClient(create_app(ServeConfig(max_n=6), pipeline=pipe_zh)) as c:
        yield c


def served(client) -> str:
    return client.app.state.taiyi.model_name  # a local folder by its name


def pictures(response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in response.json()["images"]]


def info_of(response) -> dict:
    return json.loads(response.json()["info"])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def error(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_txt2img_batches_and_iterations_draw_the_librarys_pictures_with_a1111s_seeds(client, pipe_zh):
    response = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": PROMPT, "negative_prompt": "雾", "seed": 11, "steps": 3, "batch_size": 2, "n_iter": 2},
    )
    got = pictures(response)
    info = info_of(response)
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11
    assert info["steps"] == 3 and info["batch_size"] == 2 and info["sd_model_name"] == served(client)
    assert (info["width"], info["height"]) == (pipe_zh.default_size,) * 2  # the model's native size by default
    for k in range(2):  # each A1111 batch is one library call of batch_size images
        want = pipe_zh.generate(PROMPT, negative_prompt="雾", seed=11 + 2 * k, num_images=2, steps=3).images
        for a, b in zip(got[2 * k : 2 * k + 2], want, strict=True):
            assert np.array_equal(pixels(a), pixels(b))
    for image, text in zip(got, info["infotexts"], strict=True):
        assert image.text["parameters"] == text  # each PNG carries its own infotext
    assert response.json()["parameters"]["n_iter"] == 2


def test_txt2img_a1111_settings_are_taiyis_variation_hires_clip_skip_sampler_and_emphasis(client, pipe_zh):
    body = {
        "prompt": "(小桥:1.3)流水人家",
        "seed": 3,
        "subseed": 40,
        "subseed_strength": 0.4,
        "steps": 3,
        "cfg_scale": 5,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_upscaler": "Lanczos",
        "hr_second_pass_steps": 4,
        "denoising_strength": 0.5,
        "batch_size": 2,
        "override_settings": {"CLIP_stop_at_last_layers": 2, "emphasis": "No norm"},
    }
    response = client.post("/sdapi/v1/txt2img", json=body)
    got = pictures(response)
    want = pipe_zh.generate(
        "(小桥:1.3)流水人家", seed=3, variation_seed=40, variation_strength=0.4, steps=3, guidance=5,
        scheduler="dpm++-karras", hires_scale=1.5, hires_upscaler="Lanczos", hires_steps=4, hires_strength=0.5,
        num_images=2, clip_skip=2, emphasis="no-norm",
    )  # fmt: skip
    for a, b in zip(got, want.images, strict=True):
        assert np.array_equal(pixels(a), pixels(b))
    info = info_of(response)
    assert info["all_seeds"] == [3, 3] and info["all_subseeds"] == [40, 41]  # A1111: the variation seed counts up
    assert info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "Karras" and info["clip_skip"] == 2
    params = GenerationParameters.from_text(info["infotexts"][1])
    assert (params.scheduler, params.variation_seed, params.hires_scale, params.clip_skip, params.emphasis) == (
        "dpm++-karras", 41, 1.5, 2, "no-norm",
    )  # fmt: skip
    assert got[0].size == (int(pipe_zh.default_size * 1.5) // 8 * 8,) * 2


def test_txt2img_reads_the_legacy_sampler_index_and_hr_resize(client, pipe_zh):
    size = pipe_zh.default_size
    response = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": PROMPT, "seed": 1, "steps": 2, "sampler_index": "Euler", "enable_hr": True,
              "hr_resize_x": 2 * size, "hr_upscaler": "Nearest", "denoising_strength": 0.5},
    )  # fmt: skip
    info = info_of(response)
    assert info["sampler_name"] == "Euler"
    assert pictures(response)[0].size == (2 * size, 2 * size)
    assert GenerationParameters.from_text(info["infotexts"][0]).hires_scale == 2


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"restore_faces": True}, "restore_faces", "face restoration"),
        ({"tiling": True}, "tiling", "tiling"),
        ({"styles": ["anime"]}, "styles", "prompt styles"),
        ({"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts", "ControlNet"),
        ({"script_name": "x/y/z plot"}, "script_name", "scripts"),
        ({"save_images": True}, "save_images", "keeps no pictures"),
        ({"sampler_name": "Euler a", "scheduler": "Karras"}, "scheduler", "Automatic only"),
        ({"sampler_name": "Euler a", "eta": 0}, "eta", "eta 1"),
        ({"sampler_name": "DDIM", "eta": 1}, "eta", "eta 0"),
        ({"s_churn": 0.5}, "s_churn", "s_churn"),
        ({"sampler_name": "Heun"}, "scheduler", "unknown scheduler"),
        ({"override_settings": {"sd_vae": "kl-f8-anime2.ckpt"}}, "override_settings.sd_vae", "Automatic"),
        ({"override_settings": {"img2img_fix_steps": True}}, "override_settings.img2img_fix_steps", "not one"),
        (
            {"override_settings": {"CLIP_stop_at_last_layers": 13}},
            "override_settings.CLIP_stop_at_last_layers",
            "between 1 and",
        ),
        ({"enable_hr": True, "hr_resize_x": 100}, "hr_resize_x", "hr_scale"),
        ({"enable_hr": True, "hr_prompt": "别的"}, "hr_prompt", "first pass's prompt"),
        ({"enable_hr": True, "hr_scale": 9}, "hr_scale", "between 1 and 4"),
        ({"batch_size": 4, "n_iter": 2}, "n_iter", "at most 6"),
        ({"seed": -2}, "seed", "-1 picks one at random"),
        ({"width": 100}, "width", "multiple of 8"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": "时间(12:30)"}, "prompt", "escape"),
        ({"sampler": "Euler"}, "sampler", "unknown parameter"),
        ({"seed_resize_from_w": 512}, "seed_resize_from_w", "send -1"),
    ],
)
def test_what_taiyi_cannot_honour_is_refused_in_one_line_naming_the_field(client, extra, param, words):
    body = {"prompt": PROMPT, "steps": 2, **extra}
    failure = error(client.post("/sdapi/v1/txt2img", json=body))
    assert failure["param"] == param
    assert "\n" not in failure["message"]
    if words:
        assert words in failure["message"]


def test_another_checkpoint_is_not_served(client):
    body = {
        "prompt": PROMPT,
        "override_settings": {"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors [6ce0161689]"},
    }
    assert error(client.post("/sdapi/v1/txt2img", json=body), 404)["code"] == "model_not_found"
    assert error(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd-xl"}), 404)["param"]


def test_img2img_without_a_mask_is_the_librarys_edit(client, pipe_zh):
    size = pipe_zh.default_size
    source = pipe_zh.generate(PROMPT, seed=2, steps=2).images[0]
    response = client.post(
        "/sdapi/v1/img2img",
        json={"prompt": "湖泊", "init_images": ["data:image/png;base64," + b64(source)], "seed": 5, "steps": 4,
              "denoising_strength": 0.5},
    )  # fmt: skip
    want = pipe_zh.edit(source, "湖泊", strength=0.5, seed=5, steps=4).images[0]
    assert np.array_equal(pixels(pictures(response)[0]), pixels(want))
    assert response.json()["parameters"]["init_images"] is None  # echoed only with include_init_images
    wide = Image.new("RGB", (2 * size, size), "navy")
    wide.paste((250, 250, 0), (0, 0, size // 2, size))  # a yellow band the crop cuts away
    response = client.post(
        "/sdapi/v1/img2img",
        json={"prompt": "湖泊", "init_images": [b64(wide)], "seed": 5, "steps": 2, "width": size, "height": size,
              "resize_mode": 1, "include_init_images": True},
    )  # fmt: skip
    assert pictures(response)[0].size == (size, size)
    assert response.json()["parameters"]["init_images"] == [b64(wide)]
    want = pipe_zh.edit(wide.crop((size // 2, 0, size // 2 + size, size)), "湖泊", strength=0.75, seed=5, steps=2)
    assert np.array_equal(pixels(pictures(response)[0]), pixels(want.images[0]))


@pytest.mark.parametrize("full_res", [False, True])
def test_img2img_with_a_mask_redraws_only_the_masked_area(client, pipe_zh, full_res):
    size = pipe_zh.default_size
    source = pipe_zh.generate(PROMPT, seed=2, steps=2).images[0]
    mask = Image.new("L", source.size, 0)
    mask.paste(255, (size // 4, size // 4, size // 2, size // 2))
    response = client.post(
        "/sdapi/v1/img2img",
        json={"prompt": "湖泊", "init_images": [b64(source)], "mask": b64(mask), "seed": 5, "steps": 4,
              "denoising_strength": 1.0, "inpaint_full_res": full_res, "inpaint_full_res_padding": 4, "mask_blur": 2},
    )  # fmt: skip
    out, before = pixels(pictures(response)[0]), pixels(source)
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], before[keep])  # every pixel outside the mask is the picture's own
    assert np.abs(out[~keep] - before[~keep]).mean() > 5
    text = info_of(response)["infotexts"][0]
    assert "Mask blur: 2" in text and "Masked content: fill" in text
    assert ("Inpaint area: Only masked" in text) == full_res
    assert info_of(response)["is_using_inpainting_conditioning"] is True


def test_a1111_masks_mark_the_redrawn_area_in_white_or_opaque_strokes():
    strokes = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    strokes.paste((255, 0, 0, 255), (0, 0, 4, 8))  # A1111's canvas: painted strokes on a transparent layer
    assert np.asarray(a1111_mask(strokes))[:, :4].min() == 255 and np.asarray(a1111_mask(strokes))[:, 4:].max() == 0
    grey = Image.new("L", (8, 8), 0)
    grey.paste(200, (4, 0, 8, 8))
    assert np.asarray(a1111_mask(grey))[:, 4:].min() == 255
    assert np.asarray(a1111_mask(grey, invert=True))[:, :4].min() == 255


def test_only_masked_crops_the_padded_box_to_the_drawing_shape_within_the_picture():
    mask = Image.new("L", (100, 60), 0)
    mask.paste(255, (40, 20, 50, 30))
    assert crop_region(mask, 5, 64, 64) == (35, 15, 55, 35)  # the 10×10 box + 5 each side, square already
    assert crop_region(mask, 0, 128, 64) == (35, 20, 55, 30)  # widened to 2:1
    assert crop_region(mask, 30, 64, 64) == (10, 0, 80, 60)  # clamped to the picture, which is not tall enough


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"inpainting_fill": 2}, "inpainting_fill"),
        ({"mask_blur_x": 4, "mask_blur_y": 8}, "mask_blur_x"),
        ({"resize_mode": 2, "width": 64}, "resize_mode"),
        ({"init_images": []}, "init_images"),
        ({"denoising_strength": 0.1, "steps": 4}, "denoising_strength"),
        ({"subseed_strength": 0.5}, "subseed_strength"),
        ({"initial_noise_multiplier": 1.2}, "initial_noise_multiplier"),
        ({"init_images": ["bm90IGFuIGltYWdl"]}, "init_images[0]"),
    ],
)
def test_img2img_refusals(client, pipe_zh, extra, param):
    source = b64(Image.new("RGB", (pipe_zh.default_size,) * 2, "grey"))
    body = {"prompt": "湖泊", "init_images": [source], "mask": source, "steps": 2, **extra}
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code in (400, 415), response.text
    assert response.json()["error"]["param"] == param


def test_png_info_reads_the_parameters_and_options_set_clip_skip_for_later_requests(pipe_zh):
    with TestClient(create_app(ServeConfig(), pipeline=pipe_zh)) as c:
        assert c.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "emphasis": "None"}).status_code == 200
        options = c.get("/sdapi/v1/options").json()
        assert options["CLIP_stop_at_last_layers"] == 2 and options["emphasis"] == "None"
        assert options["sd_model_checkpoint"] == served(c)
        image = c.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 4, "steps": 2}).json()["images"][0]
        fields = c.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert fields["parameters"]["Clip skip"] == "2" and fields["parameters"]["Emphasis"] == "None"
    assert fields["parameters"]["Prompt"] == PROMPT and fields["parameters"]["Seed"] == "4"
    size = str(pipe_zh.default_size)
    assert (fields["parameters"]["Size-1"], fields["parameters"]["Size-2"]) == (size, size)
    assert fields["info"].startswith(PROMPT + "\n")
    with TestClient(create_app(ServeConfig(), pipeline=pipe_zh)) as c:
        plain = c.post("/sdapi/v1/png-info", json={"image": b64(Image.new("RGB", (8, 8)))}).json()
        assert plain == {"info": "", "items": {}, "parameters": {}}
        assert error(c.post("/sdapi/v1/png-info", json={"image": "%%%"}))["param"] == "image"


def test_progress_reports_the_running_jobs_steps(pipe_zh):
    seen = []

    class Watching(Progress):
        def step(self, done, total):
            super().step(done, total)
            seen.append(self.snapshot())

    app = create_app(ServeConfig(), pipeline=pipe_zh)
    app.state.taiyi.progress = Watching()
    with TestClient(app) as c:
        pictures(c.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 3, "batch_size": 2}))
        idle = c.get("/sdapi/v1/progress").json()
    assert [s["state"]["sampling_step"] for s in seen] == [1, 2, 3]
    assert [s["progress"] for s in seen][-1] == 1.0 and seen[0]["state"][
        "job_count"
    ] == 1  # A1111 counts batches (its n_iter)
    assert seen[0]["state"]["job"] == "txt2img" and seen[0]["progress"] == pytest.approx(1 / 3, abs=1e-3)
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0  # webuiapi's util_wait_for_ready


def test_the_lists_clients_read_first(client, pipe_zh):
    samplers = {s["name"]: s["aliases"] for s in client.get("/sdapi/v1/samplers").json()}
    assert "dpm++-karras" in samplers["DPM++ 2M"] and "Euler a" in samplers
    assert {s["label"] for s in client.get("/sdapi/v1/schedulers").json()} == {
        "Automatic",
        "Karras",
        "Align Your Steps",
    }
    assert [m["title"] for m in client.get("/sdapi/v1/sd-models").json()] == [served(client)]
    assert {u["name"] for u in client.get("/sdapi/v1/upscalers").json()} == {"Lanczos", "Nearest"}
    assert "Latent (bicubic antialiased)" in {u["name"] for u in client.get("/sdapi/v1/latent-upscale-modes").json()}
    assert client.get("/sdapi/v1/loras").json() == [] and client.get("/sdapi/v1/scripts").json()["txt2img"] == []


def test_basic_auth_carries_the_key_as_a1111_clients_send_it(pipe_zh):
    with TestClient(create_app(ServeConfig(api_key="s3cret-key"), pipeline=pipe_zh)) as c:
        assert error(c.get("/sdapi/v1/sd-models"), 401)["code"] == "missing_api_key"
        assert c.get("/sdapi/v1/sd-models", auth=("anyone", "s3cret-key")).status_code == 200
        assert error(c.get("/sdapi/v1/sd-models", auth=("anyone", "wrong")), 401)["code"] == "invalid_api_key"
        assert c.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200


def test_webuiapi_the_python_client_draws_edits_and_reads_pictures(pipe_zh):
    webuiapi = pytest.importorskip("webuiapi")
    from taiyi.serve.testing import running_server

    app = create_app(ServeConfig(api_key="key-12345"), pipeline=pipe_zh)
    with running_server(app) as server:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="me", password="key-12345", steps=3)
        size = pipe_zh.default_size
        name = app.state.taiyi.model_name
        api.util_set_model(name)  # options' sd_model_checkpoint, as scripts switch models
        result = api.txt2img(prompt=PROMPT, seed=7, width=size, height=size, cfg_scale=6, batch_size=2)
        want = pipe_zh.generate(PROMPT, seed=7, steps=3, guidance=6, scheduler="euler-a", num_images=2)
        for a, b in zip(result.images, want.images, strict=True):  # its defaults: Euler a, eta 1, s_noise 1 ...
            assert np.array_equal(pixels(a), pixels(b))
        assert result.info["all_seeds"] == [7, 8]
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, (0, 0, size // 2, size))
        edited = api.img2img(images=[result.image], mask_image=mask, prompt="湖泊", seed=1, width=size, height=size)
        keep = np.asarray(mask) == 0
        assert np.array_equal(pixels(edited.image)[keep], pixels(result.image)[keep])
        assert api.png_info(edited.image).parameters["Inpaint area"] == "Only masked"
        assert api.util_get_current_model() == name
        assert "Euler a" in api.util_get_sampler_names()
        upscaled = api.extra_single_image(result.image, upscaler_1="Lanczos", upscaling_resize=2)
        assert upscaled.image.size == (2 * size, 2 * size) and "Postprocess upscaler: Lanczos" in upscaled.info
        api.util_wait_for_ready(check_interval=0.1)


@pytest.mark.parametrize(("what", "seeds"), [("skip", [20, 22]), ("interrupt", [20])])
def test_skip_ends_the_running_batch_and_interrupt_the_job_with_the_pictures_finished(pipe_zh, what, seeds):
    class Stopping(Progress):
        def step(self, done, total):
            if self._batch == 1 and done == 2:
                self.request(what)  # as POST /sdapi/v1/skip or /interrupt between two steps of the second batch
            super().step(done, total)

    app = create_app(ServeConfig(), pipeline=pipe_zh)
    app.state.taiyi.progress = Stopping()
    with TestClient(app) as c:
        response = c.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 20, "steps": 3, "n_iter": 3})
        got = pictures(response)
        assert c.post(f"/sdapi/v1/{what}").json() == {}  # no job running: nothing to stop, as in A1111
    assert info_of(response)["all_seeds"] == seeds
    assert np.array_equal(pixels(got[-1]), pixels(pipe_zh.generate(PROMPT, seed=seeds[-1], steps=3).images[0]))


def test_infotext_fills_the_fields_not_sent_and_redraws_the_picture(client):
    first = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": PROMPT, "negative_prompt": "雾", "seed": 8, "steps": 3, "sampler_name": "Euler",
              "subseed": 2, "subseed_strength": 0.3, "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6,
              "override_settings": {"CLIP_stop_at_last_layers": 2}},
    )  # fmt: skip
    text = info_of(first)["infotexts"][0]
    again = client.post("/sdapi/v1/txt2img", json={"infotext": text})
    assert np.array_equal(pixels(pictures(again)[0]), pixels(pictures(first)[0]))
    assert info_of(again)["infotexts"][0] == text
    other = client.post("/sdapi/v1/txt2img", json={"infotext": text, "seed": 9, "steps": 2})
    params = GenerationParameters.from_text(info_of(other)["infotexts"][0])
    assert (params.seed, params.steps, params.scheduler, params.clip_skip) == (9, 2, "euler", 2)
    failure = error(client.post("/sdapi/v1/txt2img", json={"infotext": "山\nSteps: x, Seed: 1, Size: 8x8"}))
    assert failure["param"] == "infotext"


def test_interrogate_reads_the_picture_with_the_served_chinese_clip(pipe_zh, client):
    from taiyi.clip import load_clip
    from taiyi.data import shanshui
    from taiyi.interrogate import interrogate

    clip = load_clip("taiyi-mini-clip", device="cpu")
    picture = shanshui.render(shanshui.sample_scene(np.random.default_rng(2), "heldout"), 64, [2, 0])
    with TestClient(create_app(ServeConfig(clip_model="taiyi-mini-clip"), pipeline=pipe_zh, clip=clip)) as c:
        caption = c.post("/sdapi/v1/interrogate", json={"image": b64(picture)}).json()["caption"]
        assert caption == interrogate(clip, [picture], "shanshui")[0].prompt and caption
        other = c.post("/sdapi/v1/interrogate", json={"image": b64(picture), "model": "deepdanbooru"})
        assert error(other, 404)["code"] == "model_not_found"
    assert error(client.post("/sdapi/v1/interrogate", json={"image": b64(picture)}), 404)["code"] == (
        "clip_not_configured"
    )


def test_null_fields_take_their_defaults_as_a1111s_optional_fields_do(client, pipe_zh):
    body = {"prompt": PROMPT, "steps": 2, "seed": None, "batch_size": None, "cfg_scale": None, "width": None,
            "sampler_name": None, "override_settings": None, "styles": None, "enable_hr": None}  # fmt: skip
    response = client.post("/sdapi/v1/txt2img", json=body)
    info = info_of(response)
    assert len(pictures(response)) == 1 and info["cfg_scale"] == pipe_zh.default_guidance
    assert 0 <= info["seed"] < 2**32  # a random seed, as A1111 draws one for -1


def test_the_openai_endpoint_takes_a1111s_settings_as_taiyis_extra_fields(client, pipe_zh):
    body = {"prompt": PROMPT, "n": 3, "seed": 6, "steps": 3, "variation_seed": 30, "variation_strength": 0.5,
            "hires_scale": 1.5, "hires_strength": 0.6, "hires_upscaler": "Lanczos", "clip_skip": 2}  # fmt: skip
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    want = pipe_zh.generate(PROMPT, seed=6, steps=3, num_images=3, variation_seed=30, variation_strength=0.5,
                            hires_scale=1.5, hires_strength=0.6, hires_upscaler="Lanczos", clip_skip=2)  # fmt: skip
    for item, image in zip(data, want.images, strict=True):
        got = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        assert np.array_equal(pixels(got), pixels(image))
    assert [item["seed"] for item in data] == [6, 6, 6]  # a variation batch keeps its seed (A1111's rule)
    assert "Variation seed: 32" in data[2]["parameters"] and "Clip skip: 2" in data[2]["parameters"]
    for extra, param in [({"variation_seed": 5}, "variation_seed"), ({"variation_strength": 2}, "variation_strength"),
                         ({"hires_strength": 0.5}, "hires_scale"), ({"hires_scale": 20}, "hires_scale"),
                         ({"clip_skip": -2}, "clip_skip")]:  # fmt: skip
        failure = client.post("/v1/images/generations", json={"prompt": PROMPT, **extra})
        assert error(failure)["param"] == param


def test_hires_steps_and_clip_skip_are_held_to_the_server_and_the_model(pipe_zh):
    layers = pipe_zh.sd.text_encoder.config.num_hidden_layers
    with TestClient(create_app(ServeConfig(max_steps=20), pipeline=pipe_zh)) as c:
        body = {
            "prompt": PROMPT,
            "steps": 2,
            "enable_hr": True,
            "hr_second_pass_steps": 400,
            "denoising_strength": 0.5,
        }
        assert error(c.post("/sdapi/v1/txt2img", json=body))["param"] == "hr_second_pass_steps"
        over = {"CLIP_stop_at_last_layers": layers + 1}
        failure = error(c.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "override_settings": over}))
        assert failure["param"] == "override_settings.CLIP_stop_at_last_layers" and str(layers) in failure["message"]
        assert error(c.post("/sdapi/v1/options", json=over))["param"] == "override_settings.CLIP_stop_at_last_layers"


def test_extras_upscale_resizes_as_a1111s_lanczos_and_keeps_the_pictures_parameters(client, pipe_zh):
    drawn = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 3, "steps": 2})
    sent = drawn.json()["images"][0]  # the PNG as drawn, its parameters chunk in it
    picture = pictures(drawn)[0]
    size = pipe_zh.default_size

    def upscale(**fields) -> Image.Image:
        body = client.post("/sdapi/v1/extra-single-image", json={"image": sent, **fields}).json()
        return Image.open(io.BytesIO(base64.b64decode(body["image"])))

    out = upscale(upscaling_resize=2)
    assert out.size == (2 * size, 2 * size)
    assert np.array_equal(pixels(out), pixels(picture.convert("RGB").resize(out.size, Image.LANCZOS)))
    want = picture.text["parameters"] + ", Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert out.text["parameters"] == want
    wide = upscale(resize_mode=1, upscaling_resize_w=3 * size, upscaling_resize_h=size, upscaler_1="Nearest")
    assert wide.size == (3 * size, size)  # scaled to cover, the overflow cut
    for extra, param in [
        ({"gfpgan_visibility": 0.5}, "gfpgan_visibility"),
        ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1"),
        ({"upscaling_resize": 100}, "upscaling_resize"),
        ({"resize_mode": 2}, "resize_mode"),
    ]:
        failure = client.post("/sdapi/v1/extra-single-image", json={"image": sent, **extra})
        assert error(failure)["param"] == param
