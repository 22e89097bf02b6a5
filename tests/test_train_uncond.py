"""taiyi train uncond: an unconditional pixel UNet2DModel from scratch, end to end at 32×32 with tiny widths.

What is proven here: final/ loads with stock ``DDPMPipeline.from_pretrained`` (no flags) and samples; the
scheduler keeps the trained prediction type; a run stopped at step 2 and resumed to 4 has the per-step
losses and final (EMA) weights of a straight 4-step run; the noise offset changes the loss; the CLI
refuses bad input in one line with exit 2.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from taiyi.cli import main
from taiyi.errors import InvalidInputError
from taiyi.train.uncond import UncondTrainConfig, build_unet, train_uncond

TINY = dict(
    data=["shanshui:12"],
    resolution=32,
    block_out_channels=(8, 16),
    norm_num_groups=8,
    batch_size=4,
    save_every=0,
    val_every=0,
    val_images=2,
    val_steps=2,
    report_to="none",
)
UNET = "unet/diffusion_pytorch_model.safetensors"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_final_is_a_stock_ddpm_pipeline(tmp_path):
    from diffusers import DDPMPipeline

    config = UncondTrainConfig(output=str(tmp_path / "run"), max_steps=2, prediction_type="v_prediction", **TINY)
    result = train_uncond(config)
    pipe = DDPMPipeline.from_pretrained(result["final"])
    assert json.loads((result["final"] / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.unet.config.sample_size == 32
    pipe.set_progress_bar_config(disable=True)
    image = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert (tmp_path / "run" / "validation" / "step-000002.png").is_file() and result["loss_plot"].is_file()


def test_default_size_is_a_few_million_parameters():
    unet = build_unet(UncondTrainConfig(data=["x"], output="y"))
    assert 2e6 <= sum(p.numel() for p in unet.parameters()) <= 6e6
    assert unet.config.sample_size == 64 and unet.config.in_channels == 3


def test_resume_continues_with_the_same_losses(tmp_path):
    settings = dict(noise_offset=0.1, snr_gamma=5.0, **TINY)  # EMA is on by default
    straight = train_uncond(UncondTrainConfig(output=str(tmp_path / "a"), max_steps=4, **settings))
    first = train_uncond(UncondTrainConfig(output=str(tmp_path / "b"), max_steps=2, **settings))["losses"]
    second = train_uncond(UncondTrainConfig(output=str(tmp_path / "b"), max_steps=4, resume="latest", **settings))
    assert second["resumed_from"].name == "step-000002"
    resumed = {**first, **second["losses"]}
    for step in range(1, 5):
        assert resumed[step] == pytest.approx(straight["losses"][step], abs=1e-6), step
    a, b = load_file(tmp_path / "a" / "final" / UNET), load_file(tmp_path / "b" / "final" / UNET)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    plain = train_uncond(UncondTrainConfig(output=str(tmp_path / "c"), max_steps=1, snr_gamma=5.0, **TINY))
    assert plain["losses"][1] != pytest.approx(straight["losses"][1], abs=1e-6)  # the offset is in the noise


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = [
        "train",
        "uncond",
        "--output",
        str(tmp_path / "o"),
        "--block-out-channels",
        "8,16",
        "--norm-num-groups",
        "8",
    ]
    cases = [
        (base + ["--data", str(empty)], "no image"),
        (base + ["--data", "shanshui:8", "--lr", "-0.1"], "--lr must be positive"),
        (base + ["--data", "shanshui:8", "--seed", str(2**32)], "--seed must be between 0 and 4294967295"),
        (base + ["--data", "shanshui:8", "--prediction-type", "sample"], "--prediction-type"),
        (base + ["--data", "shanshui:0"], "shanshui:5000"),
        (base + ["--data", "shanshui:8", "--resolution", "36"], "--resolution"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("taiyi: error:") and "\n" not in err and message in err, err
    with pytest.raises(InvalidInputError, match="--noise-offset"):
        train_uncond(UncondTrainConfig(data=["shanshui:4"], output=str(tmp_path / "n"), noise_offset=-1.0))


def _tiny_vae(folder):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
        scaling_factor=0.5,
    )  # fmt: skip
    vae.save_pretrained(folder)
    return folder


def test_latent_model_trains_on_scaled_vae_latents_and_ships_its_vae(tmp_path):
    from taiyi.disco import load_uncond

    vae_dir = _tiny_vae(tmp_path / "vae")
    config = UncondTrainConfig(output=str(tmp_path / "run"), max_steps=2, vae=str(vae_dir), **TINY)
    result = train_uncond(config)
    final = result["final"]
    index = json.loads((final / "model_index.json").read_text())
    assert index["_class_name"] == "LatentUncondPipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    unet_config = json.loads((final / "unet" / "config.json").read_text())
    assert (unet_config["in_channels"], unet_config["sample_size"]) == (4, 16)  # 32 px / VAE factor 2
    assert not json.loads((final / "scheduler" / "scheduler_config.json").read_text())["clip_sample"]
    assert (
        load_file(final / "vae" / "diffusion_pytorch_model.safetensors").keys()
        == load_file(vae_dir / "diffusion_pytorch_model.safetensors").keys()
    )
    assert all(math.isfinite(loss) for loss in result["losses"].values()) and len(result["losses"]) == 2
    from PIL import Image

    assert Image.open(tmp_path / "run" / "validation" / "step-000002.png").size[1] == 32  # decoded pictures
    model = load_uncond(final)
    assert model.vae is not None and model.factor == 2 and model.sample_size == 32


def test_latent_model_refuses_a_folder_that_is_not_a_vae(tmp_path):
    (tmp_path / "notvae").mkdir()
    (tmp_path / "notvae" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(InvalidInputError, match="not an AutoencoderKL"):
        train_uncond(
            UncondTrainConfig(output=str(tmp_path / "run"), max_steps=1, vae=str(tmp_path / "notvae"), **TINY)
        )


def test_cached_latents_train_the_same_weights_as_encoding_every_step(tmp_path):
    """--cache-dir encodes each image once (the SD trainer's cache, keyed by the images) and draws the
    posterior sample from the same generator as encoding every step: the same training up to float
    rounding (a convolution's result may depend on the batch an image is encoded in)."""
    from taiyi.data.shanshui import write_folder

    vae_dir = _tiny_vae(tmp_path / "vae")
    folder = write_folder(tmp_path / "scenes", 12, seed=0, size=32)
    settings = {**TINY, "data": [str(folder)], "max_steps": 3, "vae": str(vae_dir)}
    live = train_uncond(UncondTrainConfig(output=str(tmp_path / "live"), **settings))
    cache = tmp_path / "cache"
    cached = train_uncond(UncondTrainConfig(output=str(tmp_path / "cached"), cache_dir=str(cache), **settings))
    assert len(list(cache.glob("latents-*.safetensors"))) == 1
    assert cached["losses"] == pytest.approx(live["losses"], rel=1e-5)
    a, b = load_file(live["final"] / UNET), load_file(cached["final"] / UNET)
    # Adam moves every weight by about lr per step whatever the gradient's size: only a weight whose
    # gradient is ~0 can take another direction, so the two stay within a step or two of lr apart
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2 * 3 * settings.get("lr", 2e-4)
    with pytest.raises(InvalidInputError, match="--hflip"):
        train_uncond(UncondTrainConfig(output=str(tmp_path / "f"), cache_dir=str(cache), hflip=True, **settings))
    with pytest.raises(InvalidInputError, match="give --vae"):
        train_uncond(UncondTrainConfig(output=str(tmp_path / "v"), cache_dir=str(cache), **{**settings, "vae": None}))
