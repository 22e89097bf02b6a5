"""taiyi train lora / dreambooth, and train sd --noise-offset, end to end on tiny random pipelines.

What is proven here: a trained LoRA file (UNet + text encoder, alpha ≠ rank) loads in stock diffusers for both
Taiyi text-encoder layouts and draws what the trained model drew and what ``taiyi generate --lora`` draws; the
base weights are bit-identical after training and checkpoints hold only the adapters; a run stopped and resumed
has the losses and the file of a straight run; DreamBooth draws its class images once (a new class prompt
draws anew), adds the prior loss with its weight, and trains the UNet alone in full mode; bad flags are one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from taiyi.data.shanshui import write_folder
from taiyi.testing import make_tiny_pipeline
from taiyi.testing import run_cli as run
from taiyi.train.dreambooth import DreamBoothConfig, train_dreambooth
from taiyi.train.sd import SDTrainConfig, train_sd

FAST = dict(resolution=32, batch_size=2, lr=2e-2, val_prompts=[], save_every=0, report_to="none")
PROMPT = "小桥流水人家"
UNET = Path("unet") / "diffusion_pytorch_model.safetensors"
TEXT = Path("text_encoder") / "model.safetensors"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-lora")
    bases = {
        layout: make_tiny_pipeline(root / f"sd-{layout}", text_encoder=kind)
        for layout, kind in (("zh", "bert"), ("en", "clip"))
    }
    data = write_folder(root / "data", 4, seed=0, size=32)
    return root, bases, data


@pytest.fixture(scope="module")
def trained(setup):
    """{layout: train_sd result} of a 3-step LoRA (rank 4, alpha 8) of the UNet and the text encoder."""
    root, bases, data = setup
    results = {}
    for layout, base in bases.items():
        results[layout] = train_sd(
            SDTrainConfig(
                model=str(base),
                data=[str(data)],
                output=str(root / f"lora-{layout}"),
                lora_rank=4,
                lora_alpha=8,
                lora_target="both",
                max_steps=3,
                noise_offset=0.05,
                **FAST,
            )
        )
    return results


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def stock_image(pipe, steps: int = 2) -> Image.Image:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=PROMPT,
        num_inference_steps=steps,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images[0]


@pytest.mark.parametrize("layout", ["zh", "en"])
def test_trained_lora_loads_in_stock_diffusers_and_equals_taiyi_generate(setup, trained, layout, capsys, tmp_path):
    from diffusers import StableDiffusionPipeline

    _, bases, _ = setup
    result = trained[layout]
    lora = result["lora"]
    assert lora == result["final"] / "pytorch_lora_weights.safetensors" and lora.is_file()
    stock = StableDiffusionPipeline.from_pretrained(
        bases[layout], safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    base = stock_image(stock)
    stock.load_lora_weights(str(lora))
    expected = stock_image(stock)
    # The model as trained (peft adapters in place) draws the same: alpha/rank = 2 survived the file.
    as_trained = stock_image(
        StableDiffusionPipeline(
            **{
                **stock.components,
                **{"unet": result["pipeline"].unet, "text_encoder": result["pipeline"].text_encoder},
            }
        )
    )
    out = tmp_path / "ours.png"
    code, _, err = run(
        capsys,
        "generate",
        PROMPT,
        "-m",
        bases[layout],
        "--lora",
        lora,
        "--scheduler",
        "pndm",
        "--steps",
        2,
        "--guidance",
        7.5,
        "--seed",
        7,
        "--no-safety-checker",
        "-o",
        out,
    )
    assert code == 0, err
    ours = Image.open(out)
    assert np.abs(pixels(ours) - pixels(expected)).max() <= 1
    assert np.abs(pixels(as_trained) - pixels(expected)).max() <= 1
    assert np.abs(pixels(expected) - pixels(base)).max() >= 2  # three steps of training changed the image


def test_lora_training_leaves_base_weights_bit_identical_and_checkpoints_small(setup, trained):
    _, bases, _ = setup
    result = trained["zh"]
    for component, file in (("unet", UNET), ("text_encoder", TEXT)):
        saved = load_file(bases["zh"] / file)
        module = getattr(result["pipeline"], component)
        state = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if "lora_" not in k}
        assert set(saved) <= set(state)
        assert all(torch.equal(saved[k], state[k]) for k in saved)
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    tensors = load_file(result["checkpoint"] / "model.safetensors")
    assert tensors and all(".lora_" in k for k in tensors)  # adapters only, not 2 GB of frozen weights
    assert result["lora"].stat().st_size < 100_000


def test_lora_resume_is_exact(setup, tmp_path):
    _, bases, data = setup
    settings = dict(
        model=str(bases["zh"]), data=[str(data)], lora_rank=2, lora_target="both", noise_offset=0.1, **FAST
    )
    straight = train_sd(SDTrainConfig(output=str(tmp_path / "a"), max_steps=4, **settings))
    train_sd(SDTrainConfig(output=str(tmp_path / "b"), max_steps=2, **{**settings, "save_every": 2}))
    resumed = train_sd(SDTrainConfig(output=str(tmp_path / "b"), max_steps=4, resume="latest", **settings))
    assert resumed["resumed_from"] is not None and sorted(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        assert resumed["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-6)
    a, b = load_file(straight["lora"]), load_file(resumed["lora"])
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_noise_offset_changes_the_noise(setup, tmp_path):
    _, bases, data = setup
    settings = dict(model=str(bases["zh"]), data=[str(data)], max_steps=1, lora_rank=2, **FAST)
    plain = train_sd(SDTrainConfig(output=str(tmp_path / "a"), **settings))
    offset = train_sd(SDTrainConfig(output=str(tmp_path / "b"), noise_offset=0.5, **settings))
    assert plain["losses"][1] != pytest.approx(offset["losses"][1])


def test_train_lora_cli_writes_the_file_and_refuses_bad_flags(setup, tmp_path, capsys):
    _, bases, data = setup
    args = ("train", "lora", "--model", bases["zh"], "--data", data, "--resolution", 32, "--batch-size", 2)
    args += ("--max-steps", 1, "--report-to", "none", "--save-every", 0, "--val-every", 0, "--val-prompt", "山水")
    args += ("--val-steps", 1)
    code, out, err = run(capsys, *args, "--output", tmp_path / "run", "--rank", 2, "--alpha", 4, "--target", "text")
    assert code == 0, err
    lora = Path(out.strip().splitlines()[-1])
    assert lora.name == "pytorch_lora_weights.safetensors"
    assert {k.split(".")[0] for k in load_file(lora)} == {"text_encoder"}
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["lora_alpha"] == 4
    assert (tmp_path / "run" / "validation").is_dir()  # validated with the adapters in place
    for flags, needle in ((("--rank", 0), "--rank"), (("--rank", 2, "--target", "vae"), "--target")):
        code, _, err = run(capsys, *args, "--output", tmp_path / "bad", *flags)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("taiyi: error: ") and needle in lines[0], err


# --- DreamBooth --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instance(setup):
    root, _, _ = setup
    folder = root / "dog"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return folder


def dreambooth(setup, instance, output, **kw) -> dict:
    root, bases, _ = setup
    settings = dict(
        model=str(bases["zh"]),
        instance_data=str(instance),
        instance_prompt="一张sks狗的照片",
        class_prompt="一张狗的照片",
        num_class_images=2,
        class_steps=1,
        class_data_dir=str(root / "classes"),
        output=str(output),
        max_steps=1,
        resolution=32,
        batch_size=1,
        val_prompts=[],
        save_every=0,
        report_to="none",
    )
    return train_dreambooth(DreamBoothConfig(**{**settings, **kw}))


def test_dreambooth_class_images_are_drawn_once_and_the_prior_loss_counts(setup, instance, tmp_path):
    first = dreambooth(setup, instance, tmp_path / "a", lora_rank=2, lr=1e-3)
    assert first["class_images_drawn"] == 2
    pngs = sorted(first["class_dir"].glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (64, 64)
    times = [p.stat().st_mtime_ns for p in pngs]
    assert first["lora"].is_file() and first["prior_losses"][1] > 0
    # Reused by the next run; its weight-0 loss is the first run's instance loss alone (same draws).
    second = dreambooth(setup, instance, tmp_path / "b", lora_rank=2, lr=1e-3, prior_loss_weight=0.0)
    assert second["class_images_drawn"] == 0 and second["class_dir"] == first["class_dir"]
    assert [p.stat().st_mtime_ns for p in pngs] == times
    assert second["prior_losses"][1] == pytest.approx(first["prior_losses"][1], rel=1e-5)
    assert second["losses"][1] == pytest.approx(first["losses"][1] - first["prior_losses"][1], rel=1e-4)
    # Another class prompt is another set of class images.
    third = dreambooth(setup, instance, tmp_path / "c", lora_rank=2, class_prompt="一只猫", num_class_images=1)
    assert third["class_images_drawn"] == 1 and third["class_dir"] != first["class_dir"]


def test_dreambooth_full_cli_trains_the_unet_only(setup, instance, tmp_path, capsys):
    root, bases, _ = setup
    out = tmp_path / "full"
    code, stdout, err = run(
        capsys,
        "train",
        "dreambooth",
        "--model",
        bases["zh"],
        "--instance-data",
        instance,
        "--instance-prompt",
        "一张sks狗的照片",
        "--class-prompt",
        "一张狗的照片",
        "--num-class-images",
        2,
        "--class-steps",
        1,
        "--class-data-dir",
        root / "classes",
        "--output",
        out,
        "--max-steps",
        1,
        "--resolution",
        32,
        "--lr",
        1e-3,
        "--report-to",
        "none",
        "--save-every",
        0,
        "--val-steps",
        1,
    )
    assert code == 0, err
    final = Path(stdout.strip().splitlines()[-1])
    assert final == out / "final" and (final / "model_index.json").is_file()
    unet_before, unet_after = load_file(bases["zh"] / UNET), load_file(final / UNET)
    assert any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    text_before, text_after = load_file(bases["zh"] / TEXT), load_file(final / TEXT)
    assert all(torch.equal(text_before[k], text_after[k]) for k in text_before)
    assert len(list((out / "validation").glob("*.png"))) == 1  # drawn with the instance prompt
    code, _, err = run(
        capsys,
        "train",
        "dreambooth",
        "--model",
        bases["zh"],
        "--instance-data",
        tmp_path / "nowhere",
        "--instance-prompt",
        "x",
        "--output",
        tmp_path / "bad",
    )
    assert code == 2 and err.startswith("taiyi: error: --instance-data") and len(err.strip().splitlines()) == 1
    for flags, needle in (
        (("--instance-prompt", "一张sks\udcff狗"), "--instance-prompt is not valid text: character 6"),
        (("--instance-prompt", "一张sks狗", "--class-prompt", "\ud800"), "--class-prompt is not valid text"),
        (("--instance-prompt", "一张sks狗", "--seed", -1), "--seed must be between 0 and 4294967295, not -1"),
    ):  # a prompt in another encoding than UTF-8 reached a manifest's write as a traceback
        code, _, err = run(capsys, "train", "dreambooth", "--model", bases["zh"], "--instance-data", instance,
                           "--output", tmp_path / "bad", *flags)  # fmt: skip
        assert code == 2 and err.startswith(f"taiyi: error: {needle}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()
