"""The Python API as a diffusers user drives it: numpy numbers, arrays and paths as inputs, 16-bit pictures,
wrong types answered in one line, and nothing silently ignored or overwritten."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from taiyi.errors import InvalidInputError

PROMPT = "小桥流水人家，油画"
STEPS = 2
SEED = 1234


def assert_one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message.strip() and "\n" not in message, repr(message)
    return message


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def grey16(value: int, size: int = 64) -> Image.Image:
    """A 16-bit greyscale picture (mode I;16) of one value in 0-65535."""
    return Image.fromarray(np.full((size, size), value, dtype=np.uint16))


def noise_image(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def centre_mask(size: int = 64, margin: int = 16) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[margin : size - margin, margin : size - margin] = True
    return mask


# --- TaiyiPipeline ---------------------------------------------------------------------------------


def test_numpy_numbers_draw_as_the_python_numbers_they_hold(pipe_zh):
    plain = pipe_zh.generate(PROMPT, steps=STEPS, seed=SEED, num_images=2, width=64, guidance=5.0)
    numpy = pipe_zh.generate(
        PROMPT,
        steps=np.int64(STEPS),
        seed=np.arange(SEED, SEED + 1)[0],
        num_images=np.int32(2),
        width=np.int64(64),
        guidance=np.float32(5.0),
    )
    assert all(same(a, b) for a, b in zip(plain.images, numpy.images, strict=True))
    assert numpy.parameters == plain.parameters and type(numpy.parameters[0].seed) is int


def test_a_16_bit_picture_is_scaled_to_8_bits_not_clipped_to_white(pipe_zh, tmp_path):
    eight_bit = Image.new("L", (64, 64), round(30000 / 257))
    expected = pipe_zh.edit(eight_bit, PROMPT, steps=STEPS, seed=SEED).images[0]
    assert same(pipe_zh.edit(grey16(30000), PROMPT, steps=STEPS, seed=SEED).images[0], expected)
    grey16(30000).save(tmp_path / "grey16.png")  # read back as I;16 too
    assert same(pipe_zh.edit(tmp_path / "grey16.png", PROMPT, steps=STEPS, seed=SEED).images[0], expected)


def test_uint8_arrays_and_boolean_masks_are_pictures(pipe_zh):
    image = noise_image()
    expected = pipe_zh.edit(image, PROMPT, steps=STEPS, seed=SEED).images[0]
    assert same(pipe_zh.edit(np.asarray(image), PROMPT, steps=STEPS, seed=SEED).images[0], expected)
    mask = centre_mask()
    inpainted = pipe_zh.inpaint(image, Image.fromarray(mask.astype(np.uint8) * 255), PROMPT, steps=STEPS, seed=SEED)
    from_array = pipe_zh.inpaint(np.asarray(image), mask, PROMPT, steps=STEPS, seed=SEED)
    assert same(from_array.images[0], inpainted.images[0])


BAD_CALLS = {
    "image None": lambda p: p.edit(None, PROMPT, steps=STEPS),
    "image tensor": lambda p: p.edit(torch.zeros(3, 64, 64), PROMPT, steps=STEPS),
    "image float array": lambda p: p.edit(np.zeros((64, 64, 3), np.float32), PROMPT, steps=STEPS),
    "mask float array": lambda p: p.inpaint(noise_image(), np.ones((64, 64), np.float32), PROMPT, steps=STEPS),
    "strength text": lambda p: p.edit(noise_image(), PROMPT, strength="0.5", steps=STEPS),
    "strength None": lambda p: p.edit(noise_image(), PROMPT, strength=None, steps=STEPS),
    "feather text": lambda p: p.inpaint(noise_image(), centre_mask(), PROMPT, feather="x", steps=STEPS),
    "normalize text": lambda p: p.generate(PROMPT, normalize="no", steps=STEPS),
    "progress not callable": lambda p: p.generate(PROMPT, progress=3, steps=STEPS),
    "many: progress not callable": lambda p: p.generate_many([PROMPT], progress=3, steps=STEPS),
    "many: one string of prompts": lambda p: p.generate_many("山水", steps=STEPS),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_wrong_types_are_one_line_before_any_drawing(pipe_zh, monkeypatch, case):
    def no_drawing(*args, **kwargs):
        raise AssertionError("drew before refusing the input")

    monkeypatch.setattr(type(pipe_zh), "_run", no_drawing)
    with pytest.raises(InvalidInputError) as exc_info:
        BAD_CALLS[case](pipe_zh)
    assert_one_line(exc_info)


# --- Chinese CLIP ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip():
    from taiyi.clip import load_clip

    return load_clip("taiyi-mini-clip", device="cpu")


def test_clip_from_pretrained_takes_a_short_name(clip):
    from taiyi.clip import ChineseCLIP

    by_name = ChineseCLIP.from_pretrained("taiyi-mini-clip", device="cpu")
    torch.testing.assert_close(by_name.encode_text("山水"), clip.encode_text("山水"), atol=0, rtol=0)


def test_clip_encodes_paths_arrays_and_16_bit_pictures(clip, tmp_path):
    image = noise_image(48)
    image.save(tmp_path / "a.png")
    expected = clip.encode_image([image])
    torch.testing.assert_close(clip.encode_image(tmp_path / "a.png"), expected, atol=0, rtol=0)
    torch.testing.assert_close(clip.encode_image([str(tmp_path / "a.png")]), expected, atol=0, rtol=0)
    torch.testing.assert_close(clip.encode_image(np.asarray(image)), expected, atol=0, rtol=0)
    eight_bit = clip.encode_image(Image.new("L", (48, 48), round(30000 / 257)))
    torch.testing.assert_close(clip.encode_image(grey16(30000, 48)), eight_bit, atol=0, rtol=0)


def test_zero_shot_refuses_one_string_of_labels_and_takes_one_template(clip):
    image = noise_image(48)
    with pytest.raises(InvalidInputError, match="list of class names") as exc_info:
        clip.zero_shot(image, "山水")  # would be the labels 山 and 水
    assert_one_line(exc_info)
    one = clip.zero_shot(image, ["山", "水"], templates="一张{}的图")
    torch.testing.assert_close(one, clip.zero_shot(image, ["山", "水"], templates=["一张{}的图"]))


CLIP_BAD_CALLS = {
    "texts None": lambda c: c.encode_text(None),
    "texts with None": lambda c: c.encode_text(["山", None]),
    "text batch 0": lambda c: c.encode_text(["山", "水"], batch_size=0),
    "image None": lambda c: c.encode_image(None),
    "image tensor": lambda c: c.encode_image(torch.zeros(3, 32, 32)),
    "image batch 0": lambda c: c.encode_image([noise_image(32)], batch_size=0),
    "template field": lambda c: c.zero_shot(noise_image(32), ["山"], templates=["{}的{x}"]),
    "labels with None": lambda c: c.zero_shot(noise_image(32), ["山", None]),
    "retrieve k -1": lambda c: c.retrieve("山水", torch.zeros(2, c.text_dim), k=-1),
    "retrieve gallery list": lambda c: c.retrieve("山水", [[0.0] * c.text_dim]),
}


@pytest.mark.parametrize("case", list(CLIP_BAD_CALLS))
def test_clip_wrong_inputs_are_one_line(clip, case):
    with pytest.raises(InvalidInputError) as exc_info:
        CLIP_BAD_CALLS[case](clip)
    assert_one_line(exc_info)


def test_retrieve_takes_numpy_embeddings(clip):
    gallery = clip.encode_image([noise_image(32, 0), noise_image(32, 1)])
    assert clip.retrieve("山水", gallery.numpy(), k=1) == clip.retrieve("山水", gallery, k=1)


def test_export_taiyi_never_replaces_a_folder_unasked(clip, tmp_path):
    out = tmp_path / "tower"
    out.mkdir()
    (out / "config.json").write_text("mine")
    with pytest.raises(InvalidInputError, match="overwrite") as exc_info:
        clip.export_taiyi(out)
    assert_one_line(exc_info)
    assert (out / "config.json").read_text() == "mine"
    with pytest.raises(InvalidInputError, match="does not exist"):
        clip.export_taiyi(tmp_path / "missing" / "tower")
    clip.export_taiyi(out, overwrite=True)
    assert (out / "vocab.txt").is_file() and (out / "config.json").read_text() != "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["tower"]  # no temporary folder left behind


# --- Disco -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uncond():
    from taiyi.disco import load_uncond

    return load_uncond("taiyi-mini-uncond")


def disco_settings(**overrides):
    from taiyi.disco import DiscoSettings

    return DiscoSettings(**{"steps": 2, "cutn": 2, "seed": 5, **overrides})


def test_a_trailing_time_is_text_not_a_weight():
    from taiyi.disco import WeightedPrompt, parse_prompts

    assert parse_prompts("时间 12:30") == [WeightedPrompt("时间 12:30", 1.0)]
    assert parse_prompts("晚霞:2|16:9 的画面") == [WeightedPrompt("晚霞", 2.0), WeightedPrompt("16:9 的画面", 1.0)]


def test_an_init_image_without_skipped_steps_is_refused_not_ignored(uncond, clip):
    from taiyi.disco import disco_sample

    with pytest.raises(InvalidInputError, match="skip-steps") as exc_info:
        disco_sample(uncond, clip, "夜晚", disco_settings(), init_image=noise_image())
    assert_one_line(exc_info)


def test_disco_init_image_from_a_path_or_array_and_numpy_settings(uncond, clip, tmp_path):
    from taiyi.disco import disco_sample

    init = noise_image()
    init.save(tmp_path / "init.png")
    expected = disco_sample(uncond, clip, "夜晚", disco_settings(skip_steps=1), init_image=init).image
    from_path = disco_sample(uncond, clip, "夜晚", disco_settings(skip_steps=1), init_image=tmp_path / "init.png")
    assert same(from_path.image, expected)
    settings = disco_settings(skip_steps=np.int64(1), seed=np.int64(5), eta=np.float32(0.8))
    from_numpy = disco_sample(uncond, clip, "夜晚", settings, init_image=np.asarray(init), size=np.int64(64))
    assert same(from_numpy.image, expected) and from_numpy.settings["seed"] == 5


DISCO_BAD_CALLS = {
    "prompt None": lambda u, c, s: s(u, c, None, disco_settings()),
    "prompt list with None": lambda u, c, s: s(u, c, ["山水", None], disco_settings()),
    "fractional steps": lambda u, c, s: s(u, c, "山水", disco_settings(steps=2.5)),
    "fractional seed": lambda u, c, s: s(u, c, "山水", disco_settings(seed=1.5)),
    "fractional cutn": lambda u, c, s: s(u, c, "山水", disco_settings(cutn=2.5)),
    "eta None": lambda u, c, s: s(u, c, "山水", disco_settings(eta=None)),
    "settings dict": lambda u, c, s: s(u, c, "山水", {"steps": 2}),
    "size 0": lambda u, c, s: s(u, c, "山水", disco_settings(), size=0),
    "fractional size": lambda u, c, s: s(u, c, "山水", disco_settings(), size=64.5),
    "init image None in a list": lambda u, c, s: s(u, c, "山水", disco_settings(skip_steps=1), init_image=[1]),
}


@pytest.mark.parametrize("case", list(DISCO_BAD_CALLS))
def test_disco_wrong_inputs_are_one_line(uncond, clip, case):
    from taiyi.disco import disco_sample

    with pytest.raises(InvalidInputError) as exc_info:
        DISCO_BAD_CALLS[case](uncond, clip, disco_sample)
    assert_one_line(exc_info)


def test_load_uncond_names_a_wrong_device_in_one_line():
    from taiyi.disco import load_uncond

    with pytest.raises(InvalidInputError, match="unknown device") as exc_info:
        load_uncond("taiyi-mini-uncond", device="gpu")
    assert_one_line(exc_info)


def test_a_long_prompt_is_one_warning_not_three(pipe_zh, log_warnings):
    """Only taiyi's line: not diffusers' token-by-token dump of the dropped end, nor transformers' length notice."""
    import logging

    quieted = [logging.getLogger(n) for n in ("transformers.tokenization_utils_base",
                                              type(pipe_zh.sd).encode_prompt.__module__)]  # fmt: skip
    before = [lg.level for lg in quieted]
    library = logging.getLogger("transformers")
    saved = library.propagate, library.level
    library.propagate = True
    library.setLevel(logging.WARNING)
    try:
        with log_warnings.at_level(logging.WARNING):
            pipe_zh.generate("小桥流水人家" * 100, steps=1, seed=SEED)
    finally:
        library.propagate, _ = saved
        library.setLevel(saved[1])
    said = [(r.name, r.getMessage()[:40]) for r in log_warnings.records if r.levelno >= logging.WARNING]
    assert said == [("taiyi", "prompt is 600 tokens but the text encode")]
    assert [lg.level for lg in quieted] == before  # put back as they were


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, 16])
def test_a_dtype_taiyi_does_not_run_is_one_line_before_loading(tiny_zh, dtype):
    from taiyi import load_pipeline

    with pytest.raises(InvalidInputError) as exc_info:
        load_pipeline(tiny_zh, dtype=dtype)
    assert "float32, float16 or bfloat16" in assert_one_line(exc_info) or "a name or a torch.dtype" in str(
        exc_info.value
    )


def test_float16_on_cpu_loads_without_diffusers_saying_it_cannot_run(tiny_zh, log_warnings):
    import logging

    from taiyi import load_pipeline

    with log_warnings.at_level(logging.WARNING):
        pipe = load_pipeline(tiny_zh, dtype="fp16", device="cpu", safety_checker=False)
        image = pipe.generate(PROMPT, steps=1, seed=SEED).images[0]  # it does run
    assert pipe.dtype == torch.float16 and image.size == (64, 64)
    assert not [r.getMessage() for r in log_warnings.records if "cannot run with `cpu`" in r.getMessage()]


def test_a_thin_picture_raised_to_the_least_side_is_said_to_change_shape(pipe_zh, log_warnings):
    """A 400x20 strip is drawn at 400x64 (sides are at least 64): the picture comes back stretched, so it says so;
    a picture whose shape survives, and a size the user chose, say nothing."""
    import logging

    def warned(image, **size) -> list[str]:
        log_warnings.clear()
        with log_warnings.at_level(logging.WARNING):
            pipe_zh.edit(image, "山水", steps=2, seed=SEED, strength=0.5, **size)
        return [r.getMessage() for r in log_warnings.records if r.levelno >= logging.WARNING]

    strip = Image.new("RGB", (400, 20), (90, 140, 60))
    assert warned(strip) == [
        "the image is 400x20; drawn at 400x64, which changes its shape (sides are 64 to 2048); crop it first to "
        "keep its proportions"
    ]
    assert warned(Image.new("RGB", (400, 100), (90, 140, 60))) == []  # 400x96: within a tenth of its shape
    assert warned(strip, width=64, height=64) == []  # the user's own size


def test_a_transparent_picture_is_read_on_white_everywhere(clip, pipe_zh, tmp_path):
    """As the training data reader (and a page) shows it: the CLIP commands embedded the colours hidden under
    transparent pixels (one PNG, two embeddings 0.16 apart), edit drew from them."""
    from taiyi.data.decode import to_rgb
    from taiyi.io import load_image

    logo = noise_image(48).convert("RGBA")
    logo.paste((200, 30, 30, 0), (8, 8, 40, 40))  # a transparent hole whose pixels hold red
    logo.save(tmp_path / "logo.png")
    shown = to_rgb(Image.open(tmp_path / "logo.png"))
    assert shown.getpixel((20, 20)) == (255, 255, 255)
    assert load_image(tmp_path / "logo.png").tobytes() == shown.tobytes()
    torch.testing.assert_close(clip.encode_image(tmp_path / "logo.png"), clip.encode_image(shown), atol=0, rtol=0)
    torch.testing.assert_close(clip.encode_image(logo), clip.encode_image(shown), atol=0, rtol=0)
    drawn = pipe_zh.edit(logo, "山水", steps=2, seed=SEED, strength=0.5).images[0]
    assert drawn.tobytes() == pipe_zh.edit(shown, "山水", steps=2, seed=SEED, strength=0.5).images[0].tobytes()


def test_a_label_too_long_for_the_text_tower_is_said_once_and_labels_embed_as_one_by_one(clip, log_warnings):
    import logging

    import torch.nn.functional as F

    long_label = "山水" * 80
    labels = ["山", long_label, "水"]
    with log_warnings.at_level(logging.WARNING):
        batched = clip.label_embeddings(labels)
    said = [r.getMessage() for r in log_warnings.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and said[0].startswith("prompt is "), said  # not once per template (12 lines)
    one_by_one = torch.stack(
        [F.normalize(clip.encode_text([t.format(x) for t in clip.templates], warn_long=False).mean(0), dim=-1)
         for x in labels]
    )  # fmt: skip
    torch.testing.assert_close(batched, one_by_one, atol=1e-6, rtol=0)
