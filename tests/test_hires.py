"""A1111's hires fix: draw at the size, upscale (latents or picture), redraw larger by image-to-image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from taiyi.errors import InvalidInputError
from taiyi.metadata import GenerationParameters, read_parameters
from taiyi.testing import assert_user_error
from taiyi.testing import run_cli as run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 9
PROMPT = "小桥流水人家"


def hires(pipe, **kw):
    return pipe.generate(PROMPT, steps=2, seed=SEED, **{"hires_scale": 2, "hires_steps": 4, **kw})


def test_a_picture_upscaled_by_lanczos_is_redrawn_as_taiyi_edit_redraws_it(pipe_zh):
    """The picture upscalers hand the first pass's picture to image-to-image: exactly ``edit`` of it, resized."""
    fixed = hires(pipe_zh, hires_upscaler="lanczos", hires_strength=0.5)
    first = pipe_zh.generate(PROMPT, steps=2, seed=SEED).images[0]
    edited = pipe_zh.edit(first.resize((128, 128), Image.LANCZOS), PROMPT, strength=0.5, steps=4, seed=SEED)
    assert fixed.images[0].size == (128, 128)
    assert fixed.images[0].tobytes() == edited.images[0].tobytes()


def test_the_picture_records_a1111s_hires_keys_at_the_first_pass_size(pipe_zh):
    params = hires(pipe_zh, hires_strength=0.6).parameters[0]
    text = params.to_text()
    assert "Size: 64x64" in text and "Denoising strength: 0.6, Hires upscale: 2, Hires steps: 4, " in text
    assert "Hires upscaler: Latent" in text
    back = GenerationParameters.from_text(text)
    assert (back.hires_scale, back.hires_steps, back.hires_upscaler, back.strength) == (2.0, 4, "Latent", 0.6)


def test_latent_upscaling_draws_another_picture_than_lanczos_and_the_same_twice(pipe_zh):
    latent = np.asarray(hires(pipe_zh).images[0], dtype=int)
    assert (latent == np.asarray(hires(pipe_zh).images[0], dtype=int)).all()
    assert (latent != np.asarray(hires(pipe_zh, hires_upscaler="Lanczos").images[0], dtype=int)).any()
    assert latent.shape == (128, 128, 3)


def test_progress_counts_both_passes_in_one_run(pipe_zh):
    seen = []
    hires(pipe_zh, hires_strength=0.5, progress=lambda done, total: seen.append((done, total)))
    assert seen[:2] == [(1, 2), (2, 2)]  # the first pass: 2 steps
    assert seen[2:] == [(3, 4), (4, 4)]  # then int(4 × 0.5) = 2 steps of the second


def test_image_i_of_a_hires_batch_is_its_seeds_single_picture(pipe_zh):
    batch = hires(pipe_zh, num_images=2, hires_upscaler="Lanczos")
    single = pipe_zh.generate(PROMPT, steps=2, seed=SEED + 1, hires_scale=2, hires_steps=4, hires_upscaler="Lanczos")
    diff = np.abs(np.asarray(batch.images[1], dtype=int) - np.asarray(single.images[0], dtype=int))
    assert diff.max() <= 2  # two batched passes, each rounding as a batch may


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hires_scale": 0.5}, "hires scale must be between 1 and 4"),
        ({"hires_upscaler": "R-ESRGAN 4x+"}, "hires upscaler must be one of Latent"),
        ({"hires_strength": 0.1, "hires_steps": 4}, "leaves no denoising step"),
        ({"hires_scale": 4, "width": 1024}, "width must be between 64 and 2048, not 4096"),
    ],
)
def test_bad_hires_settings_are_refused(pipe_zh, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        hires(pipe_zh, **kwargs)


def test_from_redraws_a_hires_picture_and_refuses_to_change_it(capsys, tmp_path, tiny_zh):
    common = ["-m", tiny_zh, "--no-safety-checker", "--steps", 2, "--seed", SEED]
    code, _, err = run(capsys, "generate", PROMPT, *common, "--hires-scale", 1.5, "-o", tmp_path / "h.png")
    assert code == 0, err
    assert Image.open(tmp_path / "h.png").size == (96, 96)
    assert read_parameters(tmp_path / "h.png").hires_scale == 1.5
    code, _, err = run(capsys, "generate", "--from", tmp_path / "h.png", "-m", tiny_zh, "-o", tmp_path / "again.png")
    assert code == 0, err
    assert Image.open(tmp_path / "again.png").tobytes() == Image.open(tmp_path / "h.png").tobytes()
    code, _, err = run(capsys, "generate", "--from", tmp_path / "h.png", "--hires-strength", 0.3)
    assert_user_error(code, err, "--hires-strength cannot change them")


def test_a1111s_hires_settings_taiyi_does_not_run_are_refused_by_from(pipe_zh):
    text = (
        "山水\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, Denoising strength: 0.5, "
        "Hires upscale: 2, Hires upscaler: Latent, Hires sampler: DPM++ 2M"
    )
    with pytest.raises(InvalidInputError, match="A1111's Hires sampler"):
        pipe_zh.rerender(GenerationParameters.from_text(text))


def test_the_cli_refuses_bad_hires_settings_before_loading_a_model(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "山水", "--hires-scale", 5, "-m", tmp_path / "none")
    assert_user_error(code, err, "hires scale must be between 1 and 4")
    code, _, err = run(capsys, "generate", "山水", "--hires-scale", 2, "--hires-upscaler", "SwinIR", "-m", tmp_path)
    assert_user_error(code, err, "hires upscaler must be one of")
