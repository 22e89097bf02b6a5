"""A1111's variation seeds: a picture's starting noise moved toward another seed's noise by a strength."""

from __future__ import annotations

import json

import pytest
import torch

from taiyi.errors import InvalidInputError
from taiyi.metadata import GenerationParameters, read_parameters
from taiyi.pipeline import slerp
from taiyi.testing import assert_user_error
from taiyi.testing import run_cli as run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED, OTHER = 7, 1234


def draw(pipe, **kw):
    kw = {"steps": 2, "seed": SEED, **kw}
    return pipe.generate("山水，小桥", **kw)


def test_slerp_runs_the_great_circle_from_one_noise_to_the_other():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    assert torch.equal(slerp(0.0, a, b), a) and torch.allclose(slerp(1.0, a, b), b, atol=1e-6)
    half = slerp(0.5, a, b)
    # two independent Gaussians are nearly orthogonal: the midpoint keeps their length, a straight mix would not
    assert half.norm().item() == pytest.approx(((a.norm() + b.norm()) / 2).item(), rel=0.02)
    assert ((a + b) / 2).norm() < 0.8 * half.norm()
    assert torch.allclose(slerp(0.3, a, a * 1.0), a, atol=1e-6)  # parallel: the line, not a division by sin 0


def test_strength_zero_is_the_seeds_own_picture_and_records_nothing(pipe_zh):
    plain = draw(pipe_zh)
    zero = draw(pipe_zh, variation_seed=OTHER, variation_strength=0.0)
    assert zero.images[0].tobytes() == plain.images[0].tobytes()
    assert zero.parameters[0].variation_seed is None and "Variation" not in zero.parameters[0].to_text()


def test_strength_one_starts_from_the_variation_seeds_noise(pipe_zh):
    """With a deterministic sampler the starting noise is the whole picture: strength 1 draws the other seed's."""
    full = draw(pipe_zh, scheduler="dpm++", variation_seed=OTHER, variation_strength=1.0)
    other = draw(pipe_zh, scheduler="dpm++", seed=OTHER)
    assert full.images[0].tobytes() == other.images[0].tobytes()
    mid = draw(pipe_zh, scheduler="dpm++", variation_seed=OTHER, variation_strength=0.4).images[0].tobytes()
    assert mid not in (other.images[0].tobytes(), draw(pipe_zh, scheduler="dpm++").images[0].tobytes())


def test_image_i_of_a_variation_batch_keeps_the_seed_and_uses_variation_seed_plus_i(pipe_zh):
    """A1111's rule: the images of a variation batch are variants of one picture."""
    batch = draw(pipe_zh, num_images=2, variation_seed=OTHER, variation_strength=0.3)
    single = draw(pipe_zh, seed=SEED, variation_seed=OTHER + 1, variation_strength=0.3)
    diff = (torch.tensor(list(batch.images[1].tobytes())) - torch.tensor(list(single.images[0].tobytes()))).abs()
    assert diff.max() <= 1  # a batched UNet call may round differently, as for plain seeds
    assert [(p.seed, p.variation_seed, p.variation_strength) for p in batch.parameters] == [
        (SEED, OTHER, 0.3),
        (SEED, OTHER + 1, 0.3),
    ]


def test_a_strength_without_a_seed_picks_one_and_records_it(pipe_zh):
    params = draw(pipe_zh, variation_strength=0.2).parameters[0]
    assert isinstance(params.variation_seed, int) and params.variation_strength == 0.2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variation_strength": 1.5}, "variation strength must be between 0 and 1"),
        ({"variation_strength": -0.1}, "variation strength must be between 0 and 1"),
        ({"variation_seed": -1, "variation_strength": 0.3}, "seed must be 0 or more"),
    ],
)
def test_bad_variation_settings_are_refused(pipe_zh, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        draw(pipe_zh, **kwargs)


def test_the_parameters_read_and_write_a1111s_keys():
    text = (
        "山水\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Variation seed: 99, Variation seed strength: 0.25, "
        "Size: 512x512, Version: v1.9.4"
    )
    params = GenerationParameters.from_text(text)
    assert (params.variation_seed, params.variation_strength) == (99, 0.25) and not params.extras
    assert "Seed: 5, Variation seed: 99, Variation seed strength: 0.25, Size: 512x512" in params.to_text()


def test_from_redraws_a_variation_picture_and_refuses_to_change_it(capsys, tmp_path, tiny_zh):
    common = ["-m", tiny_zh, "--no-safety-checker", "--steps", 2, "--seed", SEED]
    code, _, err = run(
        capsys, "generate", "山水", *common, "-k", 2, "--variation-seed", OTHER, "--variation-strength", 0.3,
        "-o", tmp_path / "v.png",
    )  # fmt: skip
    assert code == 0, err
    second = tmp_path / "v-1.png"
    assert (read_parameters(second).variation_seed, read_parameters(second).variation_strength) == (OTHER + 1, 0.3)
    code, _, err = run(capsys, "generate", "--from", second, "-m", tiny_zh, "-o", tmp_path / "again.png")
    assert code == 0, err
    from PIL import Image

    assert Image.open(tmp_path / "again.png").tobytes() == Image.open(second).tobytes()
    code, _, err = run(capsys, "generate", "--from", second, "--variation-strength", 0.5)
    assert_user_error(code, err, "--variation-strength cannot change them")


def test_seed_resize_is_refused_by_from(pipe_zh):
    params = GenerationParameters.from_text(
        "山水\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 5, Seed resize from: 512x768, Size: 64x64"
    )
    with pytest.raises(InvalidInputError, match="A1111's Seed resize from, which taiyi does not run"):
        pipe_zh.rerender(params)


def test_the_cli_refuses_a_bad_strength_before_loading_a_model(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "山水", "--variation-strength", 2, "-m", tmp_path / "none")
    assert_user_error(code, err, "variation strength must be between 0 and 1")


def test_a_prompts_file_row_takes_a_variation_seed_and_a_rerun_skips_it(capsys, tmp_path, tiny_zh):
    rows = tmp_path / "p.jsonl"
    rows.write_text(
        json.dumps({"prompt": "山水", "seed": SEED, "variation_seed": OTHER, "variation_strength": 0.5}) + "\n",
        encoding="utf-8",
    )
    common = ["-m", tiny_zh, "--no-safety-checker", "--steps", 2, "-o", tmp_path / "out"]
    code, _, err = run(capsys, "generate", "--prompts-file", rows, *common)
    assert code == 0, err
    (made,) = (tmp_path / "out").glob("*.png")
    assert read_parameters(made).variation_seed == OTHER
    code, printed, err = run(capsys, "generate", "--prompts-file", rows, *common)
    assert code == 0 and "0 written, 1 already there" in printed, (printed, err)
