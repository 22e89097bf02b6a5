"""generate / edit / inpaint as a Stable Diffusion WebUI (A1111, ComfyUI) or diffusers user meets them: their sampler
names, their prompt syntax, their seeds and masks, and the settings they mistype before a model is loaded."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from taiyi.errors import InvalidInputError
from taiyi.metadata import GenerationParameters, read_parameters
from taiyi.schedulers import scheduler_spec
from taiyi.testing import assert_user_error
from taiyi.testing import run_cli as run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 11


def noise_image(size: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def square_mask() -> np.ndarray:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return mask


def painted_on_a_transparent_layer() -> Image.Image:
    """White strokes on a transparent layer, its transparent pixels holding white (as Photoshop exports them)."""
    rgba = np.full((64, 64, 4), 255, dtype=np.uint8)
    rgba[..., 3] = square_mask()
    return Image.fromarray(rgba)


@pytest.mark.parametrize(
    ("typed", "name"),
    [
        ("DPM++ 2M Karras", "dpm++-karras"),  # A1111's menu before 1.9
        ("DPM++ 2M", "dpm++"),
        ("Euler a", "euler-a"),
        ("DDIM", "ddim"),
        ("UniPC", "unipc"),
        ("PLMS", "pndm"),
        ("  dpm++  2m   sde ", "dpm++-sde"),
        ("EulerAncestralDiscreteScheduler", "euler-a"),  # diffusers' class names
        ("DPMSolverMultistepScheduler", "dpm++"),  # the class's own defaults: DPM-Solver++ 2M
        ("dpmpp_2m", "dpm++"),  # ComfyUI's
        ("uni_pc", "unipc"),
    ],
)
def test_other_tools_sampler_names_name_taiyis_samplers(typed, name):
    assert scheduler_spec(typed).name == name


def test_a_sampler_taiyi_cannot_run_is_refused_with_the_names_it_can():
    with pytest.raises(InvalidInputError, match=r"unknown scheduler 'DPM\+\+ SDE Karras'.*'Euler a'"):
        scheduler_spec("DPM++ SDE Karras")


def test_an_a1111_sampler_name_draws_and_records_as_taiyis_own(pipe_zh):
    typed = pipe_zh.generate("山水", steps=2, seed=SEED, scheduler="Euler a")
    short = pipe_zh.generate("山水", steps=2, seed=SEED, scheduler="euler-a")
    assert typed.images[0].tobytes() == short.images[0].tobytes()
    assert typed.parameters[0].scheduler == "euler-a"
    assert "Sampler: Euler a, Schedule type: Automatic" in typed.parameters[0].to_text()


def test_cfg_scale_and_sampler_options_work_as_in_a1111(capsys, tmp_path, tiny_zh):
    out = tmp_path / "a.png"
    code, _, err = run(
        capsys, "generate", "山水", "-m", tiny_zh, "--steps", 2, "--seed", SEED, "--cfg-scale", 5,
        "--sampler", "DPM++ 2M Karras", "--no-safety-checker", "-o", out,
    )  # fmt: skip
    assert code == 0, err
    params = read_parameters(out)
    assert (params.guidance, params.scheduler) == (5.0, "dpm++-karras")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "山", "--steps", "0"], "steps must be between 1 and 1000, not 0"),
        (["generate", "山", "--seed", "-1"], "seed must be 0 or more, not -1; for a random seed give none"),
        (["generate", "山", "-W", "100"], "width 100 is not a multiple of 8; try 96"),
        (["generate", "山", "-H", "4096"], "height must be between 64 and 2048"),
        (["generate", "山", "-g", "101"], "guidance must be between"),
        (["generate", "山", "--guidance-end", "0"], "guidance end must be above 0"),
        (["generate", "山", "--guidance-rescale", "2"], "guidance rescale must be between 0.0 and 1.0"),
        (["generate", "山", "--scheduler", "Heun"], "unknown scheduler 'Heun'"),
        (["generate", "山", "-k", "65"], "num_images must be between 1 and 64"),
        (["generate", "山", "--steps", "1000"], "Align Your Steps sampler takes at most"),
        (["edit", "IMAGE", "山", "-W", "100"], "width 100 is not a multiple of 8"),
        (["edit", "IMAGE", "山", "--seed", "-1"], "seed must be 0 or more"),
        (["inpaint", "IMAGE", "MASK", "山", "--sampler", "Heun"], "unknown scheduler 'Heun'"),
        (["inpaint", "IMAGE", "MASK", "山", "-g", "-1"], "guidance must be 0 or more"),
    ],
)
def test_settings_are_refused_before_a_model_is_loaded(capsys, monkeypatch, tmp_path, argv, needle):
    """A real checkpoint takes a minute to load: a mistyped setting was only refused after it."""

    def load(*args, **kwargs):
        pytest.fail("the model was loaded before the settings were checked")

    monkeypatch.setattr("taiyi.cli._load", load)
    noise_image().save(tmp_path / "in.png")
    Image.fromarray(square_mask()).save(tmp_path / "mask.png")
    paths = {"IMAGE": str(tmp_path / "in.png"), "MASK": str(tmp_path / "mask.png")}
    code, _, err = run(capsys, *[paths.get(a, a) for a in argv])
    assert_user_error(code, err, needle)


def test_a_negative_seed_says_how_to_get_a_random_one(pipe_zh):
    with pytest.raises(InvalidInputError, match=r"seed must be 0 or more, not -1; for a random seed give none"):
        pipe_zh.generate("山水", steps=1, seed=-1)


def test_a_mask_painted_on_a_transparent_layer_redraws_only_what_was_painted(pipe_zh):
    image = noise_image()
    layered = pipe_zh.inpaint(image, painted_on_a_transparent_layer(), "明月", steps=2, seed=SEED).images[0]
    plain = pipe_zh.inpaint(image, square_mask(), "明月", steps=2, seed=SEED).images[0]
    assert layered.tobytes() == plain.tobytes()
    changed = np.abs(np.asarray(layered, dtype=int) - np.asarray(image, dtype=int)).max(-1) > 0
    assert not changed[:12].any() and changed[16:48, 16:48].mean() > 0.9  # was the whole picture


def test_the_cli_reads_a_transparent_layer_mask_as_it_looks(capsys, tmp_path, tiny_zh):
    noise_image().save(tmp_path / "in.png")
    painted_on_a_transparent_layer().save(tmp_path / "layer.png")
    Image.fromarray(square_mask()).save(tmp_path / "mask.png")
    outs = []
    for mask in ("layer.png", "mask.png"):
        outs.append(tmp_path / f"out-{mask}")
        code, _, err = run(
            capsys, "inpaint", tmp_path / "in.png", tmp_path / mask, "明月", "-m", tiny_zh, "--no-safety-checker",
            "--steps", 2, "--seed", SEED, "-o", outs[-1],
        )  # fmt: skip
        assert code == 0, err
    assert Image.open(outs[0]).tobytes() == Image.open(outs[1]).tobytes()


def test_a_mask_whose_edit_area_is_transparent_says_transparency_is_not_read(pipe_zh):
    """The HTTP API's (OpenAI's) convention: an opaque mask with a transparent hole where to redraw."""
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255 - square_mask()
    with pytest.raises(InvalidInputError, match="transparent pixels count as black"):
        pipe_zh.inpaint(noise_image(), Image.fromarray(rgba), "明月", steps=2, seed=SEED)


def test_an_a1111_hires_fix_picture_is_redrawn_with_its_second_pass(pipe_zh):
    params = GenerationParameters.from_text(
        "山水\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 12, Size: 64x64, Denoising strength: 0.7, "
        "Hires upscale: 2, Hires upscaler: Latent"
    )
    result = pipe_zh.rerender(params)  # was refused before taiyi ran the hires fix
    assert result.images[0].size == (128, 128) and result.parameters[0].hires_scale == 2


def test_settings_taiyi_does_not_run_are_refused_not_ignored(pipe_zh):
    text = "山水\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 12, Size: 64x64, Seed resize from: 512x768"
    with pytest.raises(InvalidInputError, match="A1111's Seed resize from, which taiyi does not run"):
        pipe_zh.rerender(GenerationParameters.from_text(text))
    last_layer = GenerationParameters.from_text("山水\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 12, "
                                                "Size: 64x64, Clip skip: 1")  # fmt: skip
    assert pipe_zh.rerender(last_layer).images[0].size == (64, 64)  # clip skip 1 is the last layer: taiyi's own


def test_a_long_clip_prompt_draws_without_the_tokenizers_length_warning(tiny_en):
    """Chunked on purpose (A1111's convention): transformers' "indexing errors" warning is wrong there."""
    import transformers

    from taiyi.pipeline import load_pipeline

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    pipe = load_pipeline(tiny_en)  # its own tokenizer: transformers says the warning once per tokenizer
    library, saved = logging.getLogger("transformers"), transformers.logging.get_verbosity()
    library.addHandler(handler)
    transformers.logging.set_verbosity_warning()  # as in a Python session; the CLI quiets it
    try:
        pipe.generate(", ".join(["a lake at dawn with mountains"] * 12), steps=1, seed=SEED, scheduler="dpm++")
    finally:
        transformers.logging.set_verbosity(saved)
        library.removeHandler(handler)
    assert not [line for line in said if "Token indices sequence length" in line], said


@pytest.mark.parametrize(("guidance", "warned"), [(1.0, True), (0.0, True), (1.5, False)])
def test_a_negative_prompt_without_guidance_is_said_to_do_nothing(pipe_zh, log_warnings, guidance, warned):
    with log_warnings.at_level(logging.WARNING):
        result = pipe_zh.generate("山水", negative_prompt="模糊", guidance=guidance, steps=1, seed=SEED)
    said = [r.getMessage() for r in log_warnings.records if "negative prompt has no effect" in r.getMessage()]
    assert len(said) == int(warned), said
    if warned:  # it truly does nothing there
        plain = pipe_zh.generate("山水", guidance=guidance, steps=1, seed=SEED)
        assert result.images[0].tobytes() == plain.images[0].tobytes()


@pytest.mark.parametrize(
    ("prompt", "line"),
    [
        ("山水\nNegative prompt: 模糊", "Negative prompt:"),  # read back as the negative prompt: --from drew another
        ("Negative prompt: 模糊", "Negative prompt:"),
        ("山水\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64", "Steps: 20,"),
    ],
)
def test_a_prompt_pasted_with_its_parameters_is_refused(pipe_zh, prompt, line):
    with pytest.raises(InvalidInputError, match=f"the prompt holds a line starting '{line}'"):
        pipe_zh.generate(prompt, steps=1, seed=SEED)


def test_a_multiline_prompt_redraws_from_its_parameters(pipe_zh):
    first = pipe_zh.generate("山水\n清晨 Steps to the lake", steps=2, seed=SEED)
    params = GenerationParameters.from_text(first.parameters[0].to_text())
    assert params.prompt == "山水\n清晨 Steps to the lake" and params.negative_prompt == ""
    assert pipe_zh.rerender(params).images[0].tobytes() == first.images[0].tobytes()
