"""A walk through the A1111 API (``/sdapi/v1``) as its clients use it: odd values bots send, pictures of every size,
A1111's mask and resize conventions, and infotexts that must redraw their pictures or be refused."""

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

from taiyi.serve import ServeConfig, create_app  # noqa: E402
from taiyi.serve.a1111 import Progress, a1111_mask  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "小桥流水人家"
A1111_TEXT = (
    "a cat\nNegative prompt: ugly\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, "
    "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)


@pytest.fixture(scope="module")
def client(pipe_zh):
    with TestClient(create_app(ServeConfig(max_n=6, max_side=128), pipeline=pipe_zh)) as c:
        yield c


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def pictures(response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in response.json()["images"]]


def info_of(response) -> dict:
    assert response.status_code == 200, response.text
    return json.loads(response.json()["info"])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def error(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    failure = response.json()["error"]
    assert "\n" not in failure["message"]
    return failure


def test_an_unused_infinite_or_nan_number_is_echoed_as_null_not_a_server_error(client):
    body = {"prompt": PROMPT, "steps": 2, "s_tmax": "inf", "refiner_switch_at": "inf", "denoising_strength": "nan"}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert len(pictures(response)) == 1
    echoed = response.json()["parameters"]
    assert (echoed["s_tmax"], echoed["refiner_switch_at"], echoed["denoising_strength"]) == (None, None, None)


def test_a_picture_drawn_at_its_own_size_must_fit_the_servers_sides(client, pipe_zh):
    size = pipe_zh.default_size
    big = b64(Image.new("RGB", (200, 136), "navy"))  # the server draws at most 128 pixels a side
    mask = Image.new("L", (200, 136), 0)
    mask.paste(255, (10, 10, 40, 40))
    failure = error(client.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "init_images": [big], "steps": 2}))
    assert failure["param"] == "init_images[0]" and "200x136" in failure["message"] and "width" in failure["message"]
    whole = {"prompt": PROMPT, "init_images": [big], "mask": b64(mask), "steps": 2, "inpaint_full_res": False}
    assert error(client.post("/sdapi/v1/img2img", json=whole))["param"] == "init_images[0]"
    tiny = {"prompt": PROMPT, "init_images": [b64(Image.new("RGB", (8, 8)))], "steps": 2}
    assert error(client.post("/sdapi/v1/img2img", json=tiny))["param"] == "init_images[0]"  # not stretched silently
    resized = client.post("/sdapi/v1/img2img", json={**tiny, "width": size, "height": size})
    assert pictures(resized)[0].size == (size, size)
    # "only masked" draws the crop at width × height: any picture the upload limit takes is fine
    only_masked = client.post("/sdapi/v1/img2img", json={**whole, "inpaint_full_res": True})
    assert pictures(only_masked)[0].size == (200, 136)


def test_whole_picture_inpainting_with_crop_and_resize_cuts_the_picture_and_mask_alike(client, pipe_zh):
    size = pipe_zh.default_size
    wide = Image.new("RGB", (2 * size, size), "navy")
    wide.paste((250, 250, 0), (0, 0, size // 2, size))  # a yellow band the crop cuts away
    mask = Image.new("L", wide.size, 0)
    mask.paste(255, (size // 2 + 8, 8, size // 2 + 24, 24))
    response = client.post(
        "/sdapi/v1/img2img",
        json={"prompt": PROMPT, "init_images": [b64(wide)], "mask": b64(mask), "steps": 4, "seed": 3, "width": size,
              "height": size, "resize_mode": 1, "inpaint_full_res": False, "denoising_strength": 1.0},
    )  # fmt: skip
    out = pixels(pictures(response)[0])
    crop = (size // 2, 0, size // 2 + size, size)
    keep = np.asarray(mask.crop(crop)) == 0
    assert np.array_equal(out[keep], pixels(wide.crop(crop))[keep])  # the centre, not the whole picture squeezed


def test_masks_are_rounded_as_a1111_rounds_them_and_a_soft_mask_is_not_drawn_as_a_hard_one(client, pipe_zh):
    assert a1111_mask(Image.new("L", (4, 4), 128)).getbbox() is None  # A1111 redraws above 128 only
    assert a1111_mask(Image.new("L", (4, 4), 129)).getbbox() == (0, 0, 4, 4)
    size = pipe_zh.default_size
    source = b64(Image.new("RGB", (size, size), "grey"))
    soft = Image.new("L", (size, size), 0)
    soft.paste(100, (0, 0, size // 2, size))
    soft.paste(255, (size // 2, 0, size, size))
    body = {"prompt": PROMPT, "init_images": [source], "mask": b64(soft), "steps": 2, "mask_round": False}
    assert error(client.post("/sdapi/v1/img2img", json=body))["param"] == "mask_round"
    hard = soft.point(lambda v: 255 if v > 128 else 0)
    assert len(pictures(client.post("/sdapi/v1/img2img", json={**body, "mask": b64(hard)}))) == 1
    empty = {**body, "mask": b64(Image.new("L", (size, size), 0)), "mask_round": True}
    failure = error(client.post("/sdapi/v1/img2img", json=empty))
    assert failure["param"] == "mask" and "nothing to redraw" in failure["message"]


def test_all_subseeds_count_up_with_the_image_as_a1111s_do(client):
    body = {"prompt": PROMPT, "steps": 2, "seed": 5, "subseed": 100, "batch_size": 2, "n_iter": 2}
    info = info_of(client.post("/sdapi/v1/txt2img", json=body))
    assert info["all_seeds"] == [5, 6, 7, 8] and info["all_subseeds"] == [100, 101, 102, 103]
    assert info["subseed"] == 100


def test_a1111s_none_upscaler_is_a_lanczos_resize_and_an_unknown_one_is_named(client):
    body = {"prompt": PROMPT, "steps": 2, "seed": 1, "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6}
    lanczos = pictures(client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "Lanczos"}))[0]
    none = pictures(client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "None"}))[0]
    assert np.array_equal(pixels(none), pixels(lanczos))
    failure = error(client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "R-ESRGAN 4x+"}))
    assert failure["param"] == "hr_upscaler" and "Lanczos" in failure["message"]


def test_the_infotext_of_a_library_picture_redraws_it_with_its_cfg_rescale_and_normalization(client, pipe_zh):
    drawn = pipe_zh.generate("小桥, 流水!", seed=3, steps=9, guidance_rescale=0.7, normalize=False)
    text = drawn.parameters[0].to_text()
    assert "CFG rescale: 0.7" in text and "Prompt normalization: off" in text
    response = client.post("/sdapi/v1/txt2img", json={"infotext": text})
    assert np.array_equal(pixels(pictures(response)[0]), pixels(drawn.images[0]))
    assert info_of(response)["infotexts"][0] == text


@pytest.mark.parametrize(
    "extra", [", Face restoration: CodeFormer", ", Hires prompt: 猫", ", ENSD: 31337", ", Seed resize from: 512x768"]
)
def test_an_infotext_asking_for_what_taiyi_does_not_run_is_refused(client, extra):
    failure = error(client.post("/sdapi/v1/txt2img", json={"infotext": A1111_TEXT + extra, "width": 64, "height": 64}))
    assert failure["param"] == "infotext" and extra.split(":")[0][2:] in failure["message"]


def test_a_real_a1111_infotext_fills_the_fields_and_its_hires_resize_is_read(client):
    body = {"infotext": A1111_TEXT + ", ENSD: 0", "steps": 2, "width": 64, "height": 64}  # sent fields win
    info = info_of(client.post("/sdapi/v1/txt2img", json=body))
    assert (info["prompt"], info["negative_prompt"], info["seed"], info["cfg_scale"]) == ("a cat", "ugly", 1, 7)
    assert (info["sampler_name"], info["scheduler"], info["steps"]) == ("DPM++ 2M", "Karras", 2)
    text = "山\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 4, Size: 64x64, Denoising strength: 0.5, " + (
        "Hires resize: 128x128, Hires upscaler: Latent"
    )
    response = client.post("/sdapi/v1/txt2img", json={"infotext": text})
    assert pictures(response)[0].size == (128, 128)  # A1111 writes a target size instead of Hires upscale
    assert "Hires upscale: 2" in info_of(response)["infotexts"][0]


def test_an_inpainting_infotext_redraws_with_its_mask_blur_area_and_content(client, pipe_zh):
    size = pipe_zh.default_size
    source = b64(pipe_zh.generate(PROMPT, seed=2, steps=2).images[0])
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, size // 2, size // 2))
    body = {"prompt": "湖泊", "init_images": [source], "mask": b64(mask), "seed": 5, "steps": 4}
    first = client.post(
        "/sdapi/v1/img2img",
        json={**body, "mask_blur": 1, "inpaint_full_res": False, "inpainting_fill": 1, "denoising_strength": 0.9},
    )
    text = info_of(first)["infotexts"][0]
    assert "Mask blur: 1" in text and "Masked content: original" in text and "Inpaint area: Whole picture" in text
    again = client.post("/sdapi/v1/img2img", json={**body, "infotext": text})
    assert np.array_equal(pixels(pictures(again)[0]), pixels(pictures(first)[0]))


@pytest.mark.parametrize("kind", ["JPEG", "WEBP"])
def test_png_info_reads_the_exif_comment_where_a1111_keeps_a_jpegs_or_webps_parameters(client, kind):
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone's sideways picture: turned upright on reading, its comment kept
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + A1111_TEXT.encode("utf-16-be")  # piexif's UserComment
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buffer, format=kind, exif=exif.tobytes())
    image = f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    fields = client.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert fields["info"] == A1111_TEXT
    assert (fields["parameters"]["Prompt"], fields["parameters"]["Schedule type"]) == ("a cat", "Karras")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buffer, format=kind, exif=b"Exif\x00\x00garbage")  # a broken block
    broken = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buffer.getvalue()).decode("ascii")})
    assert broken.json() == {"info": "", "items": {}, "parameters": {}}


def test_override_settings_not_restored_afterwards_stay_for_later_requests_as_in_a1111(pipe_zh):
    with TestClient(create_app(ServeConfig(), pipeline=pipe_zh)) as c:
        body = {"prompt": PROMPT, "steps": 2, "override_settings": {"CLIP_stop_at_last_layers": 2}}
        assert info_of(c.post("/sdapi/v1/txt2img", json=body))["clip_skip"] == 2
        assert c.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1  # restored afterwards by default
        kept = {**body, "override_settings_restore_afterwards": False}
        assert info_of(c.post("/sdapi/v1/txt2img", json=kept))["clip_skip"] == 2
        assert c.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        assert info_of(c.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2}))["clip_skip"] == 2
        assert c.get("/sdapi/v1/options").json()["emphasis"] == "Original"  # a setting not sent is not touched


def test_base64_wrapped_in_lines_as_the_base64_tool_writes_it_is_read(client, pipe_zh):
    size = pipe_zh.default_size
    plain = b64(Image.new("RGB", (size, size), "grey"))
    wrapped = "\n".join(plain[i : i + 76] for i in range(0, len(plain), 76)) + "\n"  # `base64 img.png` in a script
    body = {"prompt": PROMPT, "init_images": [wrapped], "steps": 2, "seed": 1}
    got = pictures(client.post("/sdapi/v1/img2img", json=body))[0]
    want = pictures(client.post("/sdapi/v1/img2img", json={**body, "init_images": [plain]}))[0]
    assert np.array_equal(pixels(got), pixels(want))
    assert client.post("/sdapi/v1/png-info", json={"image": wrapped}).json()["info"] == ""


def test_progress_is_the_whole_jobs_over_its_batches_as_a1111_reports_it(pipe_zh):
    seen = []

    class Watching(Progress):
        def step(self, done, total):
            super().step(done, total)
            seen.append(self.snapshot())

    app = create_app(ServeConfig(max_batch=1), pipeline=pipe_zh)  # batch_size 2 split in two calls, twice
    app.state.taiyi.progress = Watching()
    with TestClient(app) as c:
        pictures(c.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "batch_size": 2, "n_iter": 2}))
    assert [s["progress"] for s in seen] == [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]  # never back to 0
    assert [s["state"]["job_no"] for s in seen] == [0, 0, 1, 1, 2, 2, 3, 3]
