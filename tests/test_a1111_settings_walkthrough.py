"""A1111 user's walk-through of variation seeds, the hires fix and clip skip: combinations, A1111's own pictures,
prompts files re-run, and options that would change nothing."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from taiyi.batch import run_batch
from taiyi.errors import InvalidInputError
from taiyi.metadata import GenerationParameters, read_parameters
from taiyi.testing import assert_user_error
from taiyi.testing import run_cli as run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "小桥流水人家"
A1111 = "山水\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, "


def test_variation_hires_clip_skip_batch_and_grid_together_redraw_by_from(capsys, tmp_path, tiny_zh):
    common = ["-m", tiny_zh, "--no-safety-checker", "--steps", 2, "--seed", 3]
    code, _, err = run(
        capsys, "generate", PROMPT, *common, "-k", 2, "--grid", "--variation-seed", 10, "--variation-strength", 0.3,
        "--hires-scale", 1.5, "--hires-upscaler", "lanczos", "--hires-steps", 2, "--clip-skip", 2,
        "-o", tmp_path / "v.png",
    )  # fmt: skip
    assert code == 0, err
    assert Image.open(tmp_path / "v-grid.png").size == (192, 96)
    params = read_parameters(tmp_path / "v-1.png")
    assert (params.seed, params.variation_seed, params.variation_strength) == (3, 11, 0.3)  # A1111: one seed
    assert (params.width, params.hires_scale, params.hires_steps, params.hires_upscaler) == (64, 1.5, 2, "Lanczos")
    assert (params.clip_skip, params.strength, params.batch_pos) == (2, 0.7, 1)
    code, _, err = run(capsys, "generate", "--from", tmp_path / "v-1.png", "-o", tmp_path / "again.png")
    assert code == 0, err
    assert Image.open(tmp_path / "again.png").tobytes() == Image.open(tmp_path / "v-1.png").tobytes()


def test_a_prompts_file_row_drawn_with_other_hires_settings_is_not_skipped(tmp_path, pipe_zh):
    """A re-run skips a row only when its picture is that row's: the hires fix's upscaler and steps count, and a
    row without a hires fix is not the picture drawn with one."""
    out = tmp_path / "out"
    row = {"prompt": PROMPT, "seed": 1, "hires_scale": 1.5}
    defaults = {"steps": 2, "hires_strength": 0.7, "hires_steps": 0, "hires_upscaler": "Latent"}
    assert run_batch(pipe_zh, [row], defaults, out) == {"written": 1, "skipped": 0}
    assert run_batch(pipe_zh, [{**row, "hires_upscaler": "latent"}], defaults, out)["skipped"] == 1  # A1111's name
    for changed, why in [
        ({**row, "hires_upscaler": "Lanczos"}, "its hires_upscaler is 'Latent', not 'Lanczos'"),
        ({**row, "hires_steps": 4}, "its hires_steps is 0, not 4"),
        ({"prompt": PROMPT, "seed": 1}, "its hires_scale is 1.5, not None"),
    ]:
        with pytest.raises(InvalidInputError, match=why):
            run_batch(pipe_zh, [changed], defaults, out)
    plain = {"prompt": PROMPT, "seed": 1}
    assert run_batch(pipe_zh, [plain], {"steps": 2}, tmp_path / "plain")["written"] == 1
    with pytest.raises(InvalidInputError, match="its hires_scale is None, not 1.5"):
        run_batch(pipe_zh, [row], defaults, tmp_path / "plain")


def test_a_hires_picture_without_its_denoising_strength_is_refused_in_words(pipe_zh):
    params = GenerationParameters.from_text(A1111 + "Hires upscale: 2, Hires upscaler: Latent")
    with pytest.raises(InvalidInputError, match="Hires upscale\\) without its Denoising strength"):
        pipe_zh.rerender(params)


def test_an_a1111_variation_batch_picture_sharing_a_seed_below_its_batch_pos_is_redrawn(pipe_zh):
    """A1111 gives every image of a variation batch the same seed (only the variation seed counts up), so image 3
    of seed 1 records Seed 1: its noise is seed 1's toward variation seed 13's, redrawn within its batch."""
    text = A1111.replace("Seed: 5", "Seed: 1") + "Variation seed: 13, Variation seed strength: 0.2, "
    params = GenerationParameters.from_text(text + "Batch size: 4, Batch pos: 3")
    again = pipe_zh.rerender(params)
    batch = pipe_zh.generate("山水", steps=2, guidance=7, seed=1, scheduler="euler-a", width=64, height=64,
                             num_images=4, variation_seed=10, variation_strength=0.2)  # fmt: skip
    assert again.images[0].tobytes() == batch.images[3].tobytes()
    assert (again.parameters[0].seed, again.parameters[0].variation_seed) == (1, 13)


def test_comfyuis_negative_clip_skip_is_refused_naming_a1111s_count(capsys, tmp_path, pipe_zh):
    code, _, err = run(capsys, "generate", PROMPT, "--clip-skip", -2, "-m", tmp_path / "none")
    assert_user_error(code, err, "ComfyUI's stop_at_clip_layer -2 is clip skip 2")
    with pytest.raises(InvalidInputError, match="ComfyUI's stop_at_clip_layer -2 is clip skip 2"):
        pipe_zh.rerender(GenerationParameters.from_text(A1111 + "Clip skip: -2"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--hires-strength", 0.5], "--hires-strength would change nothing without --hires-scale"),
        (["--hires-steps", 9, "--hires-upscaler", "Lanczos"], "--hires-steps, --hires-upscaler would change nothing"),
        (["--variation-seed", 7], "--variation-seed would change nothing without --variation-strength above 0"),
        (["--variation-seed", 7, "--variation-strength", 0], "--variation-seed would change nothing"),
    ],
)
def test_options_changing_nothing_without_their_switch_are_refused_before_loading(capsys, tmp_path, options, message):
    code, _, err = run(capsys, "generate", PROMPT, *options, "-m", tmp_path / "none")
    assert_user_error(code, err, message)


def test_a_prompts_file_row_can_switch_on_what_the_command_line_sets(capsys, tmp_path):
    rows = tmp_path / "p.jsonl"
    rows.write_text(json.dumps({"prompt": PROMPT, "hires_scale": 2, "variation_strength": 0.1}) + "\n", "utf-8")
    code, _, err = run(
        capsys, "generate", "--prompts-file", rows, "--hires-upscaler", "Lanczos", "--variation-seed", 7,
        "-m", tmp_path / "none", "-o", tmp_path / "out",
    )  # fmt: skip
    assert_user_error(code, err, "does not exist")  # past the check: the model is what is missing


def test_an_a1111_lora_tag_in_the_prompt_is_said_to_be_drawn_as_words(pipe_zh, log_warnings):
    pipe_zh.generate("山水 <lora:ink:0.8>，<LORA:ink:0.8>", steps=1, seed=1)
    said = [r.getMessage() for r in log_warnings.records if "network tags" in r.getMessage()]
    assert len(said) == 1 and "<lora:ink:0.8> <LORA:ink:0.8> is drawn as words" in said[0] and "--lora" in said[0]
    log_warnings.clear()
    pipe_zh.generate("山水 <小桥>", steps=1, seed=1)
    assert not [r for r in log_warnings.records if "network tags" in r.getMessage()]
