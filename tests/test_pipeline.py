"""TaiyiPipeline: same images as stock diffusers, seeds, re-rendering, inpainting, prompts, input checks, saving."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import taiyi.io
from taiyi.encoding import encode_prompts
from taiyi.errors import InvalidInputError, OutputError
from taiyi.metadata import read_parameters
from taiyi.pipeline import GenerationResult, load_pipeline
from taiyi.prompts import normalize_prompt
from taiyi.schedulers import DEFAULT_SCHEDULER

PROMPT = "小桥流水人家，油画"  # left unchanged by normalisation, so stock diffusers sees the same text
STEPS = 3
SEED = 1234


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size
    return int(np.abs(pixels(a) - pixels(b)).max())


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def centre_mask(width: int, height: int, margin: int = 16) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[margin : height - margin, margin : width - margin] = 255
    return Image.fromarray(mask)


def assert_one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message.strip() and "\n" not in message, repr(message)
    return message


# --- equal to stock diffusers ----------------------------------------------------------------------


def stock_scheduler(name: str, config):
    from diffusers import DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    if name in ("dpm++", "dpm++-sde"):
        algorithm = "sde-dpmsolver++" if name == "dpm++-sde" else "dpmsolver++"
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type=algorithm, solver_order=2)
    return {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "deis": DEISMultistepScheduler}[name].from_config(config)


def stock_pipeline(folder, cls_name: str = "StableDiffusionPipeline"):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stock(tiny_zh, tiny_en):
    """Stock diffusers pipelines on the tiny checkpoints, loaded once: {(layout, class name): pipeline}."""
    cache = {}

    def get(layout: str, cls_name: str = "StableDiffusionPipeline"):
        key = (layout, cls_name)
        if key not in cache:
            cache[key] = stock_pipeline(tiny_zh if layout == "zh" else tiny_en, cls_name)
        return cache[key]

    return get


@pytest.fixture
def pipes(pipe_zh, pipe_en):
    return {"zh": pipe_zh, "en": pipe_en}


def test_comparison_prompt_is_left_unchanged_by_normalisation():
    assert normalize_prompt(PROMPT) == PROMPT


@pytest.mark.parametrize("scheduler", ["dpm++", "pndm", "ddim", "deis", "dpm++-sde"])
@pytest.mark.parametrize("layout", ["zh", "en"])
def test_text_to_image_equals_stock_diffusers(pipes, stock, layout, scheduler):
    pipe, ref = pipes[layout], stock(layout)
    ref.scheduler = stock_scheduler(scheduler, ref.scheduler.config)
    expected = ref(
        prompt=PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images[0]
    ours = pipe.generate(PROMPT, steps=STEPS, guidance=7.5, seed=SEED, scheduler=scheduler).images[0]
    assert ours.size == (64, 64)
    assert pixels(expected).std() > 1  # not a blank image: the comparison means something
    assert max_diff(ours, expected) <= 1


@pytest.mark.parametrize(("layout", "scheduler"), [("zh", "dpm++"), ("en", "dpm++"), ("zh", "ddim")])
def test_image_to_image_equals_stock_diffusers(pipes, stock, layout, scheduler):
    pipe, ref = pipes[layout], stock(layout, "StableDiffusionImg2ImgPipeline")
    ref.scheduler = stock_scheduler(scheduler, ref.scheduler.config)
    init = noise_image(64, 64)
    expected = ref(
        prompt=PROMPT,
        image=init,
        strength=0.6,
        num_inference_steps=5,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images[0]
    result = pipe.edit(init, PROMPT, strength=0.6, steps=5, guidance=7.5, seed=SEED, scheduler=scheduler)
    assert result.images[0].size == (64, 64)
    assert max_diff(result.images[0], expected) <= 1
    assert max_diff(result.images[0], init) > 10  # it was redrawn
    assert result.parameters[0].strength == 0.6


# --- seeds and batches ----------------------------------------------------------------------------


def test_same_seed_same_image_and_different_seed_different_image(pipe_zh):
    a = pipe_zh.generate(PROMPT, steps=STEPS, seed=7).images[0]
    b = pipe_zh.generate(PROMPT, steps=STEPS, seed=7).images[0]
    c = pipe_zh.generate(PROMPT, steps=STEPS, seed=8).images[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 5


def test_no_seed_picks_a_random_one_that_reproduces(pipe_zh):
    result = pipe_zh.generate(PROMPT, steps=STEPS)
    seed = result.parameters[0].seed
    assert 0 <= seed < 2**32
    again = pipe_zh.generate(PROMPT, steps=STEPS, seed=seed)
    assert np.array_equal(pixels(result.images[0]), pixels(again.images[0]))


@pytest.mark.parametrize("scheduler", ["dpm++-sde", "euler-a"])
def test_stochastic_samplers_reproduce_by_seed_in_a_batch_too(pipe_zh, scheduler):
    """Samplers that add fresh noise draw it from each image's own seeded generator."""
    batch = pipe_zh.generate(PROMPT, steps=STEPS, seed=SEED, num_images=2, scheduler=scheduler).images
    for i, image in enumerate(batch):
        single = pipe_zh.generate(PROMPT, steps=STEPS, seed=SEED + i, scheduler=scheduler).images[0]
        assert max_diff(image, single) <= 1
    other = pipe_zh.generate(PROMPT, steps=STEPS, seed=SEED + 5, scheduler=scheduler).images[0]
    assert max_diff(batch[0], other) > 10


@pytest.mark.parametrize("layout", ["zh", "en"])
def test_batch_equals_singles_at_consecutive_seeds(pipes, layout):
    pipe = pipes[layout]
    batch = pipe.generate(PROMPT, steps=STEPS, seed=SEED, num_images=3)
    assert len(batch.images) == 3 and batch.nsfw == [False] * 3
    for i, (image, params) in enumerate(zip(batch.images, batch.parameters, strict=True)):
        single = pipe.generate(PROMPT, steps=STEPS, seed=SEED + i).images[0]
        assert max_diff(image, single) <= 1
        assert (params.seed, params.batch_pos, params.batch_size) == (SEED + i, i, 3)
        assert params.prompt == PROMPT and params.steps == STEPS and params.scheduler == DEFAULT_SCHEDULER
        assert (params.width, params.height) == (64, 64) and params.strength is None
    assert np.abs(pixels(batch.images[0]) - pixels(batch.images[1])).mean() > 5


def test_default_guidance_and_size_come_from_the_model(pipe_zh, hub_like_en):
    params = pipe_zh.generate(PROMPT, steps=1, seed=0).parameters[0]
    assert params.guidance == 7.5 and (params.width, params.height) == (64, 64)
    assert hub_like_en.default_guidance == 10.0  # the bilingual model card's scale


@pytest.fixture
def hub_like_en(tiny_en, tmp_path, monkeypatch):
    from taiyi.testing import populate_hf_cache

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    populate_hf_cache(tmp_path, "IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-EN-v0.1", tiny_en)
    return load_pipeline("IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-EN-v0.1")


def test_progress_reports_every_step_that_runs(pipe_zh):
    calls = []
    pipe_zh.generate(PROMPT, steps=3, seed=0, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()  # an edit at strength 0.6 runs int(5 * 0.6) = 3 of its 5 steps
    pipe_zh.edit(noise_image(64, 64), PROMPT, strength=0.6, steps=5, seed=0, progress=lambda *a: calls.append(a))
    assert calls == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("method", ["generate", "edit"])
def test_text_or_image_to_image_on_an_inpainting_model_is_invalid_input(pipe_inpaint, method):
    with pytest.raises(InvalidInputError) as exc_info:
        if method == "generate":
            pipe_inpaint.generate(PROMPT, steps=2, seed=0)
        else:
            pipe_inpaint.edit(noise_image(64, 64), PROMPT, steps=2, seed=0)
    assert "inpaint" in assert_one_line(exc_info)


# --- re-rendering from parameters -----------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_of_two(pipe_zh) -> GenerationResult:
    return pipe_zh.generate(PROMPT, negative_prompt="模糊", steps=STEPS, seed=SEED, num_images=2, scheduler="euler-a")


@pytest.mark.parametrize("i", [0, 1])
def test_rerender_is_bit_identical(pipe_zh, batch_of_two, i):
    again = pipe_zh.rerender(batch_of_two.parameters[i])
    assert len(again.images) == 1
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(batch_of_two.images[i]))
    assert again.parameters[0] == batch_of_two.parameters[i]


def test_rerender_through_a_png(pipe_zh, batch_of_two, tmp_path):
    paths = batch_of_two.save(tmp_path)
    for path, image in zip(paths, batch_of_two.images, strict=True):
        with Image.open(path) as saved:
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))
        params = read_parameters(path)
        again = pipe_zh.rerender(params)
        assert np.array_equal(np.asarray(again.images[0]), np.asarray(image))


def test_rerender_with_batch_pos_outside_the_batch_is_invalid_input(pipe_zh):
    from taiyi.metadata import GenerationParameters

    text = "山水\nSteps: 2, Sampler: DPM++ 2M, CFG scale: 7, Seed: 10, Size: 64x64, Batch size: 2, Batch pos: 5"
    with pytest.raises(InvalidInputError) as exc_info:
        pipe_zh.rerender(GenerationParameters.from_text(text))
    assert "batch" in assert_one_line(exc_info).lower()


def test_rerender_refuses_edit_parameters(pipe_zh):
    params = pipe_zh.edit(noise_image(64, 64), PROMPT, steps=2, seed=0).parameters[0]
    with pytest.raises(InvalidInputError) as exc_info:
        pipe_zh.rerender(params)
    assert_one_line(exc_info)


# --- inpainting ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe_inpaint(tiny_inpaint):
    pipe = load_pipeline(tiny_inpaint)
    assert pipe.is_inpainting_model
    return pipe


@pytest.fixture(params=["4-channel", "9-channel"])
def inpainter(request, pipe_zh):
    if request.param == "4-channel":
        assert not pipe_zh.is_inpainting_model
        return pipe_zh
    return request.getfixturevalue("pipe_inpaint")


@pytest.mark.parametrize("size", [(64, 64), (70, 66)])
def test_inpaint_keeps_every_pixel_outside_the_mask(inpainter, size):
    width, height = size
    image, mask = noise_image(width, height, seed=1), centre_mask(width, height)
    result = inpainter.inpaint(image, mask, PROMPT, steps=STEPS, seed=SEED)
    out = result.images[0]
    assert out.size == size
    diff = np.abs(pixels(out) - pixels(image))  # (H, W, 3)
    inside = np.asarray(mask) >= 128
    assert diff[~inside].max() <= 2
    assert diff[inside].mean() > 20  # the masked square was redrawn
    params = result.parameters[0]
    assert (params.width, params.height) == size and params.strength == 1.0


def test_inpaint_reads_image_and_mask_from_files(pipe_zh, tmp_path):
    image, mask = noise_image(64, 64, seed=2), centre_mask(64, 64)
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    from_files = pipe_zh.inpaint(tmp_path / "in.png", str(tmp_path / "mask.png"), PROMPT, steps=2, seed=4)
    from_images = pipe_zh.inpaint(image, mask, PROMPT, steps=2, seed=4)
    assert np.array_equal(pixels(from_files.images[0]), pixels(from_images.images[0]))


@pytest.mark.parametrize("method", ["edit", "inpaint"])
def test_edit_and_inpaint_without_checker_do_not_nag(pipe_zh, log_warnings, method):
    image = noise_image(64, 64)
    with log_warnings.at_level(logging.WARNING):
        if method == "edit":
            pipe_zh.edit(image, PROMPT, steps=2, seed=0)
        else:
            pipe_zh.inpaint(image, centre_mask(64, 64), PROMPT, steps=2, seed=0)
    assert not [r for r in log_warnings.records if "disabled the safety checker" in r.getMessage()]


def test_inpaint_mask_of_another_size_is_invalid(pipe_zh):
    with pytest.raises(InvalidInputError) as exc_info:
        pipe_zh.inpaint(noise_image(64, 64), centre_mask(72, 64), PROMPT, steps=2, seed=0)
    message = assert_one_line(exc_info)
    assert "72x64" in message and "64x64" in message


# --- prompts ---------------------------------------------------------------------------------------


def test_prompt_normalisation_is_applied(pipe_zh):
    traditional, simplified = "飛流直下三千尺,油畫", "飞流直下三千尺，油画"
    a = pipe_zh.generate(traditional, steps=STEPS, seed=SEED)
    b = pipe_zh.generate(simplified, steps=STEPS, seed=SEED)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert a.parameters[0].prompt == traditional  # the metadata keeps what the user typed
    c = pipe_zh.generate(traditional, steps=STEPS, seed=SEED, normalize=False)
    d = pipe_zh.generate(simplified, steps=STEPS, seed=SEED, normalize=False)
    assert np.array_equal(pixels(d.images[0]), pixels(b.images[0]))
    assert not np.array_equal(pixels(c.images[0]), pixels(d.images[0]))
    assert c.parameters[0].normalize is False


def test_negative_prompt_changes_the_image(pipe_zh):
    a = pipe_zh.generate(PROMPT, steps=STEPS, seed=SEED)
    b = pipe_zh.generate(PROMPT, negative_prompt="模糊，低质量", steps=STEPS, seed=SEED)
    assert not np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert b.parameters[0].negative_prompt == "模糊，低质量"


LONG_WORDS = "a red house near the river with tall trees and blue mountains under a bright summer sky".split()


def test_long_clip_prompt_uses_every_token(pipe_en, stock, log_warnings):
    tok = pipe_en.sd.tokenizer
    words = LONG_WORDS * 3
    while len(tok(" ".join(words), add_special_tokens=False).input_ids) > 200:
        words.pop()
    prompt = " ".join(words)
    n_tokens = len(tok(prompt, add_special_tokens=False).input_ids)
    assert 180 <= n_tokens <= 200 and normalize_prompt(prompt) == prompt

    embeds, negative = encode_prompts(pipe_en.sd, [prompt], [""], pipe_en.device, 7.5)
    assert embeds.shape == (1, 3 * 77, 32) and negative.shape == embeds.shape  # three chunks of 75 tokens
    # The first chunk is what stock diffusers encodes: the prompt cut after its first 75 tokens.
    truncated, _ = pipe_en.sd.encode_prompt(prompt, pipe_en.device, 1, False)
    assert torch.allclose(embeds[:, :77], truncated, atol=1e-5)
    assert not torch.allclose(embeds[:, 77:154], truncated, atol=1e-2)  # the rest of the prompt, not padding
    assert torch.allclose(negative[:, 77:154], negative[:, :77])  # "" padded with empty chunks

    with log_warnings.at_level(logging.WARNING, logger="taiyi"):
        long_image = pipe_en.generate(prompt, steps=STEPS, guidance=7.5, seed=SEED, scheduler="dpm++").images[0]
    assert not [r for r in log_warnings.records if r.name == "taiyi"], "nothing is dropped, so nothing to warn about"
    ref = stock("en")
    ref.scheduler = stock_scheduler("dpm++", ref.scheduler.config)
    cut = ref(
        prompt=prompt,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images[0]
    assert long_image.size == (64, 64)
    assert np.abs(pixels(long_image) - pixels(cut)).mean() > 1


def test_long_bert_prompt_is_truncated_with_a_warning(pipe_zh, log_warnings):
    prompt = "小桥流水人家" * 100  # 600 tokens; BERT reads 510 between [CLS] and [SEP]
    assert len(pipe_zh.sd.tokenizer(prompt, add_special_tokens=False).input_ids) == 600
    with log_warnings.at_level(logging.WARNING, logger="taiyi"):
        result = pipe_zh.generate(prompt, steps=STEPS, seed=SEED)
    warnings = [r.getMessage() for r in log_warnings.records if r.name == "taiyi" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "600" in warnings[0] and "510" in warnings[0] and "last 90 were dropped" in warnings[0]
    # What was dropped is exactly the tail: same image as the first 510 characters alone.
    first_510 = pipe_zh.generate(prompt[:510], steps=STEPS, seed=SEED).images[0]
    assert np.array_equal(pixels(result.images[0]), pixels(first_510))


# --- invalid input ---------------------------------------------------------------------------------


def _text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image")
    return path


BAD_CALLS = {
    "empty prompt": lambda p, t: p.generate("", steps=2),
    "punctuation-only prompt": lambda p, t: p.generate("   ，。", steps=2),
    "width not a multiple of 8": lambda p, t: p.generate(PROMPT, width=65, steps=2),
    "width too large": lambda p, t: p.generate(PROMPT, width=4096, steps=2),
    "height too small": lambda p, t: p.generate(PROMPT, height=56, steps=2),
    "zero steps": lambda p, t: p.generate(PROMPT, steps=0),
    "too many steps": lambda p, t: p.generate(PROMPT, steps=10**9),
    "negative guidance": lambda p, t: p.generate(PROMPT, guidance=-1, steps=2),
    "nan guidance": lambda p, t: p.generate(PROMPT, guidance=float("nan"), steps=2),
    "zero images": lambda p, t: p.generate(PROMPT, num_images=0, steps=2),
    "unknown scheduler": lambda p, t: p.generate(PROMPT, scheduler="warp-drive", steps=2),
    "negative seed": lambda p, t: p.generate(PROMPT, seed=-1, steps=2),
    "zero strength": lambda p, t: p.edit(noise_image(64, 64), PROMPT, strength=0, steps=2),
    "strength above 1": lambda p, t: p.edit(noise_image(64, 64), PROMPT, strength=1.5, steps=2),
    "strength leaving no step": lambda p, t: p.edit(noise_image(64, 64), PROMPT, strength=0.1, steps=2),
    "unreadable image": lambda p, t: p.edit(_text_file(t), PROMPT, steps=2),
    "missing image": lambda p, t: p.edit(t / "missing.png", PROMPT, steps=2),
    "missing inpaint mask": lambda p, t: p.inpaint(noise_image(64, 64), t / "missing.png", PROMPT, steps=2),
    "empty edit prompt": lambda p, t: p.edit(noise_image(64, 64), "。", steps=2),
    "fractional steps": lambda p, t: p.generate(PROMPT, steps=2.5),
    "float width": lambda p, t: p.generate(PROMPT, width=64.0, steps=2),
    "bool images": lambda p, t: p.generate(PROMPT, num_images=True, steps=2),
    "string guidance": lambda p, t: p.generate(PROMPT, guidance="7.5", steps=2),
    "negative feather": lambda p, t: p.inpaint(noise_image(64, 64), centre_mask(64, 64), PROMPT, feather=-1),
    "black inpaint mask": lambda p, t: p.inpaint(noise_image(64, 64), Image.new("L", (64, 64)), PROMPT, steps=2),
    "prompt not text": lambda p, t: p.generate("山\udcff", steps=2),
    "negative prompt not text": lambda p, t: p.generate(PROMPT, negative_prompt="\ud800", steps=2, normalize=False),
    "negative prompt not a string": lambda p, t: p.generate(PROMPT, negative_prompt=5, steps=2),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_one_line_invalid_input_error(pipe_zh, tmp_path, case):
    with pytest.raises(InvalidInputError) as exc_info:
        BAD_CALLS[case](pipe_zh, tmp_path)
    assert_one_line(exc_info)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"width": 65}, "try 64"),
        ({"width": 4096}, "2048"),
        ({"steps": 0}, "steps"),
        ({"steps": 10**9}, "1000"),
        ({"num_images": 0}, "num_images"),
        ({"scheduler": "warp-drive"}, "dpm++"),
    ],
)
def test_bad_input_messages_say_what_to_do(pipe_zh, kwargs, expected):
    with pytest.raises(InvalidInputError, match=expected):
        pipe_zh.generate(PROMPT, **{"steps": 2, **kwargs})


def test_image_paths_in_errors(pipe_zh, tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        pipe_zh.edit(tmp_path / "missing.png", PROMPT, steps=2)
    with pytest.raises(InvalidInputError, match="not a readable image"):
        pipe_zh.edit(_text_file(tmp_path), PROMPT, steps=2)


# --- saving ----------------------------------------------------------------------------------------


def test_save_writes_pngs_whose_parameters_read_back(batch_of_two, tmp_path):
    paths = batch_of_two.save(tmp_path)
    assert [p.name for p in paths] == [f"00000-{SEED}.png", f"00001-{SEED + 1}.png"]
    for path, params in zip(paths, batch_of_two.parameters, strict=True):
        assert read_parameters(path) == params
    # A second run in the same folder continues the numbering instead of clobbering.
    more = batch_of_two.save(tmp_path)
    assert [p.name for p in more] == [f"00002-{SEED}.png", f"00003-{SEED + 1}.png"]


def test_save_to_a_png_name(batch_of_two, tmp_path):
    paths = batch_of_two.save(tmp_path / "castle.png")
    assert [p.name for p in paths] == ["castle-0.png", "castle-1.png"]
    single = GenerationResult(batch_of_two.images[:1], batch_of_two.parameters[:1], [False])
    assert single.save(tmp_path / "one.png") == [tmp_path / "one.png"]
    assert read_parameters(tmp_path / "one.png") == batch_of_two.parameters[0]


def test_save_refuses_to_overwrite_unless_asked(batch_of_two, tmp_path):
    target = tmp_path / "out.png"
    single = GenerationResult(batch_of_two.images[:1], batch_of_two.parameters[:1], [False])
    single.save(target)
    other = GenerationResult(batch_of_two.images[1:], batch_of_two.parameters[1:], [False])
    with pytest.raises(OutputError) as exc_info:
        other.save(target)
    assert "already exists" in assert_one_line(exc_info) and "overwrite" in str(exc_info.value)
    assert read_parameters(target) == batch_of_two.parameters[0]  # untouched
    other.save(target, overwrite=True)
    assert read_parameters(target) == batch_of_two.parameters[1]
    with Image.open(target) as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(batch_of_two.images[1]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


@pytest.mark.parametrize("output", ["missing/out.png", "missing/"])
def test_save_into_a_missing_folder(batch_of_two, tmp_path, output):
    with pytest.raises(OutputError) as exc_info:
        batch_of_two.save(f"{tmp_path}/{output}")
    assert "does not exist" in assert_one_line(exc_info)
    assert not (tmp_path / "missing").exists()


def test_save_without_output_goes_to_outputs_in_the_working_folder(batch_of_two, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = batch_of_two.save()
    assert [str(p) for p in paths] == [f"outputs/00000-{SEED}.png", f"outputs/00001-{SEED + 1}.png"]
    assert all(read_parameters(tmp_path / p) == q for p, q in zip(paths, batch_of_two.parameters, strict=True))


def test_save_with_a_non_png_name_is_refused(batch_of_two, tmp_path):
    with pytest.raises(OutputError):
        batch_of_two.save(tmp_path / "out.jpg")


def test_disk_full_leaves_nothing_behind(batch_of_two, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(taiyi.io.os, "fsync", full)
    with pytest.raises(OutputError) as exc_info:
        batch_of_two.save(tmp_path / "out.png")
    assert "disk full" in assert_one_line(exc_info)
    assert list(tmp_path.iterdir()) == []  # neither the image nor a temporary file


def test_disk_full_while_overwriting_keeps_the_old_file(batch_of_two, tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    GenerationResult(batch_of_two.images[:1], batch_of_two.parameters[:1], [False]).save(target)
    before = target.read_bytes()

    def full(fh, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(taiyi.io.os, "fsync", full)
    with pytest.raises(OutputError, match="disk full"):
        GenerationResult(batch_of_two.images[1:], batch_of_two.parameters[1:], [False]).save(target, overwrite=True)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_grid_is_written_beside_the_images(batch_of_two, pipe_zh, tmp_path):
    paths = batch_of_two.save(tmp_path / "g.png", grid=True)
    assert [p.name for p in paths] == ["g-0.png", "g-1.png", "g-grid.png"]
    with Image.open(paths[-1]) as grid:
        assert grid.size == (128, 64)  # two 64 px images side by side
        grid = grid.convert("RGB")
        assert np.array_equal(np.asarray(grid)[:, :64], np.asarray(batch_of_two.images[0]))
        assert np.array_equal(np.asarray(grid)[:, 64:], np.asarray(batch_of_two.images[1]))
    three = pipe_zh.generate(PROMPT, steps=1, seed=0, num_images=3)
    paths = three.save(tmp_path / "h.png", grid=True)
    with Image.open(paths[-1]) as grid:
        assert grid.size == (128, 128)  # 2x2, one cell empty
    # One image: no grid.
    single = GenerationResult(batch_of_two.images[:1], batch_of_two.parameters[:1], [False])
    assert [p.name for p in single.save(tmp_path / "s.png", grid=True)] == ["s.png"]


def test_generate_many_rows_equal_single_runs(pipe_zh):
    rows = pipe_zh.generate_many(["山水", "夜晚的湖泊", "松树"], seeds=[1, 2, None], steps=3)
    single = pipe_zh.generate("夜晚的湖泊", seed=2, steps=3)
    diff = np.abs(np.asarray(rows.images[1], dtype=int) - np.asarray(single.images[0], dtype=int))
    assert diff.max() <= 1
    assert [p.prompt for p in rows.parameters] == ["山水", "夜晚的湖泊", "松树"]
    assert rows.parameters[1].seed == 2 and rows.parameters[1].batch_size == 1
    assert 0 <= rows.parameters[2].seed < 2**32  # a random seed, recorded
    with pytest.raises(InvalidInputError):
        pipe_zh.generate_many(["山", "水"], seeds=[1])
    with pytest.raises(InvalidInputError):
        pipe_zh.generate_many(["山", ""], seeds=[1, 2])


def test_prompt_cache_encodes_each_text_once_and_draws_the_same(tiny_zh):
    from taiyi.pipeline import load_pipeline

    pipe = load_pipeline(tiny_zh, safety_checker=False)
    calls = []
    forward = pipe.sd.text_encoder.forward
    pipe.sd.text_encoder.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    first = pipe.generate("小桥流水人家", steps=2, seed=3).images[0]
    assert len(calls) == 1  # the prompt and the empty negative prompt, in one batch
    again = pipe.generate("小桥流水人家", steps=2, seed=3).images[0]
    assert len(calls) == 1 and pipe.prompt_cache.hits >= 2  # repeat prompt and negative: no encoding
    assert np.asarray(first).tobytes() == np.asarray(again).tobytes()
    pipe.prompt_cache.clear()
    fresh = pipe.generate("小桥流水人家", steps=2, seed=3).images[0]
    assert np.abs(np.asarray(fresh, np.int16) - np.asarray(first, np.int16)).max() <= 1
    pipe.generate("夜晚", steps=2, seed=3)
    assert len(calls) == 3  # a new prompt: only it is encoded (the negative is cached)


# --- guidance on the first part of the steps only ----------------------------------------------------


def unet_batches(pipe, run) -> list[int]:
    """The batch size of every UNet call ``run()`` makes."""
    sizes: list[int] = []
    handle = pipe.sd.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        run()
    finally:
        handle.remove()
    return sizes


@pytest.mark.parametrize(("end", "guided"), [(1.0, 6), (0.5, 3), (0.4, 3), (0.01, 1)])
def test_guidance_end_guides_only_the_first_steps(pipe_zh, end, guided):
    sizes = unet_batches(
        pipe_zh, lambda: pipe_zh.generate(PROMPT, steps=6, guidance=7.5, guidance_end=end, seed=SEED, num_images=2)
    )
    assert sizes == [4] * guided + [2] * (6 - guided)  # CFG doubles the batch while it runs


def test_the_defaults_guide_every_step_but_the_last(pipe_zh):
    """The default sampling is what the README's speed and faithfulness tables measured: 9 steps, the first 8
    guided (a CFG batch of 2 per picture), the last one conditional call."""
    from taiyi.pipeline import DEFAULT_STEPS

    sizes = unet_batches(pipe_zh, lambda: pipe_zh.generate(PROMPT, seed=SEED))
    assert DEFAULT_STEPS == 9 and sizes == [2] * 8 + [1]
    assert unet_batches(pipe_zh, lambda: pipe_zh.generate(PROMPT, seed=SEED, steps=1)) == [2]  # one step: guided


def test_guidance_end_does_nothing_without_guidance(pipe_zh):
    full = pipe_zh.generate(PROMPT, steps=4, guidance=1.0, guidance_end=1.0, seed=SEED).images[0]
    sizes = unet_batches(
        pipe_zh, lambda: pipe_zh.generate(PROMPT, steps=4, guidance=1.0, guidance_end=0.5, seed=SEED).images[0]
    )
    assert sizes == [1] * 4
    again = pipe_zh.generate(PROMPT, steps=4, guidance=1.0, guidance_end=0.5, seed=SEED).images[0]
    assert np.array_equal(np.asarray(full), np.asarray(again))


def test_guidance_end_counts_the_steps_an_edit_runs(pipe_zh):
    # strength 0.5 of 6 steps runs 3; guidance on the first ceil(0.5 × 3) = 2 of them
    sizes = unet_batches(
        pipe_zh,
        lambda: pipe_zh.edit(noise_image(64, 64), PROMPT, strength=0.5, steps=6, guidance_end=0.5, seed=SEED),
    )
    assert sizes == [2, 2, 1]


def test_inpaint_with_guidance_end_keeps_the_outside(inpainter):
    image, mask = noise_image(64, 64, seed=1), centre_mask(64, 64)
    sizes = unet_batches(
        inpainter, lambda: inpainter.inpaint(image, mask, PROMPT, steps=4, guidance_end=0.5, seed=SEED, num_images=2)
    )
    assert sizes == [4, 4, 2, 2]
    result = inpainter.inpaint(image, mask, PROMPT, steps=4, guidance_end=0.5, seed=SEED)
    diff = np.abs(pixels(result.images[0]) - pixels(image))
    inside = np.asarray(mask) >= 128
    assert diff[~inside].max() <= 2 and diff[inside].mean() > 20
    assert result.parameters[0].guidance_end == 0.5


def test_guidance_end_is_recorded_and_rerenders_bit_identically(pipe_zh, tmp_path):
    result = pipe_zh.generate(PROMPT, steps=4, guidance_end=0.5, seed=SEED, num_images=2)
    paths = result.save(tmp_path)
    params = read_parameters(paths[1])
    assert params.guidance_end == 0.5 and "CFG end: 0.5" in params.to_text()
    again = pipe_zh.rerender(params)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[1]))


def test_guidance_end_of_one_is_not_written(pipe_zh):
    params = pipe_zh.generate(PROMPT, steps=2, guidance_end=1.0, seed=SEED).parameters[0]
    assert "CFG end" not in params.to_text()


@pytest.mark.parametrize("end", [0, -0.5, 1.5, float("nan"), "0.5", True])
def test_bad_guidance_end_is_invalid_input(pipe_zh, end):
    with pytest.raises(InvalidInputError, match="guidance end") as exc_info:
        pipe_zh.generate(PROMPT, steps=2, guidance_end=end)
    assert_one_line(exc_info)


# --- guidance rescale (diffusers' guidance_rescale) ----------------------------------------------------


def test_guidance_rescale_defaults_to_zero_for_the_usual_noise_schedule(pipe_zh):
    assert not pipe_zh.sd.scheduler.config.get("rescale_betas_zero_snr") and pipe_zh.default_guidance_rescale == 0
    params = pipe_zh.generate(PROMPT, steps=2, seed=SEED).parameters[0]
    assert params.guidance_rescale == 0 and "CFG rescale" not in params.to_text()


def test_guidance_rescale_is_recorded_and_rerenders_bit_identically(pipe_zh, tmp_path):
    result = pipe_zh.generate(PROMPT, steps=3, guidance_rescale=0.7, seed=SEED, num_images=2)
    plain = pipe_zh.generate(PROMPT, steps=3, seed=SEED, num_images=2)
    assert not np.array_equal(np.asarray(result.images[1]), np.asarray(plain.images[1]))
    params = read_parameters(result.save(tmp_path)[1])
    assert params.guidance_rescale == 0.7 and "CFG rescale: 0.7" in params.to_text()
    again = pipe_zh.rerender(params)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[1]))


def test_guidance_rescale_reaches_every_row_of_a_batched_call(pipe_zh):
    one = pipe_zh.generate(PROMPT, steps=2, guidance_rescale=0.5, seed=SEED)
    rows = pipe_zh.generate_many([PROMPT, "夜晚"], seeds=[SEED, 1], steps=2, guidance_rescale=0.5)
    assert [p.guidance_rescale for p in rows.parameters] == [0.5, 0.5]
    assert np.abs(pixels(rows.images[0]) - pixels(one.images[0])).max() <= 2


@pytest.mark.parametrize("rescale", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_guidance_rescale_is_invalid_input(pipe_zh, rescale):
    with pytest.raises(InvalidInputError, match="guidance rescale") as exc_info:
        pipe_zh.generate(PROMPT, steps=2, guidance_rescale=rescale)
    assert_one_line(exc_info)


def test_align_your_steps_sampler_equals_stock_diffusers_with_those_timesteps(pipe_zh, stock):
    from diffusers.schedulers import AysSchedules

    ref = stock("zh")
    ref.scheduler = stock_scheduler("dpm++-sde", ref.scheduler.config)
    expected = ref(
        prompt=PROMPT,
        timesteps=AysSchedules["StableDiffusionTimesteps"],
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images[0]
    result = pipe_zh.generate(PROMPT, steps=10, guidance=7.5, guidance_end=1.0, seed=SEED, scheduler="dpm++-sde-ays")
    assert max_diff(result.images[0], expected) <= 1
    text = result.parameters[0].to_text()
    assert "Sampler: DPM++ 2M SDE, Schedule type: Align Your Steps" in text


def test_align_your_steps_with_too_many_steps_is_invalid_input(pipe_zh):
    with pytest.raises(InvalidInputError, match="at most") as exc_info:
        pipe_zh.generate(PROMPT, steps=900, scheduler="dpm++-sde-ays")
    assert_one_line(exc_info)


def test_cpu_pipelines_keep_freed_memory_in_the_heap_unless_told_not_to(tmp_path):
    """On Linux/glibc a CPU pipeline raises malloc's mmap and trim thresholds once per process (no page
    faults per UNet call); TAIYI_CPU_ALLOCATOR=system leaves the C library alone."""
    import platform

    code = (
        "import json, taiyi.backends as b; from taiyi import load_pipeline; from taiyi.testing import "
        "make_tiny_pipeline; p = load_pipeline(make_tiny_pipeline(__import__('sys').argv[1])); "
        "print(json.dumps([b._allocator_tuned, b.tune_cpu_allocator()]))"
    )
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    for i, (env, expected) in enumerate((({}, glibc), ({"TAIYI_CPU_ALLOCATOR": "system"}, False))):
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / f"tiny{i}")],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert json.loads(out.strip().splitlines()[-1]) == [expected, expected], env
