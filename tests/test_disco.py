"""Chinese Disco Diffusion: prompt weights, losses, cutouts, the guidance wrapper, samplers, models, CLI errors."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from taiyi.disco import (
    CLIPGuidance,
    DiscoSettings,
    MakeCutouts,
    UncondModel,
    disco_sample,
    load_uncond,
    parse_prompts,
    range_loss,
    spherical_dist_loss,
    tv_loss,
)
from taiyi.errors import InvalidInputError, ModelLoadError


def _tiny_unet(out_channels: int = 3, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=out_channels, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )  # fmt: skip


def _save_pipeline(folder, prediction_type="epsilon", **schedule):
    from diffusers import DDPMPipeline, DDPMScheduler

    scheduler = DDPMScheduler(prediction_type=prediction_type, **schedule)
    DDPMPipeline(unet=_tiny_unet(), scheduler=scheduler).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from taiyi.clip import load_clip
    from taiyi.testing import make_tiny_clip_image_tower, make_tiny_taiyi_clip_text

    root = tmp_path_factory.mktemp("disco-clip")
    make_tiny_clip_image_tower(root / "image", dim=16, image_size=32)
    make_tiny_taiyi_clip_text(root / "text", dim=16)
    return load_clip(root / "text", image_tower=root / "image", device="cpu")


@pytest.fixture(scope="module")
def uncond_dir(tmp_path_factory):
    return _save_pipeline(tmp_path_factory.mktemp("uncond") / "model")


@pytest.fixture(scope="module")
def uncond(uncond_dir):
    return load_uncond(uncond_dir)


FAST = dict(steps=4, cutn=4, seed=3)


def test_parse_prompts_weights_and_errors():
    parts = parse_prompts("东临碣石，以观沧海:2|晚霞：1.5|文字:-0.5|小桥流水")
    assert [(p.text, p.weight) for p in parts] == [
        ("东临碣石，以观沧海", 2.0),
        ("晚霞", 1.5),
        ("文字", -0.5),
        ("小桥流水", 1.0),
    ]
    assert parse_prompts("时间: 12点")[0].text == "时间: 12点"  # a colon inside the text is not a weight
    for bad, match in (("", "empty"), (" | ", "empty"), ("a:1|b:-1", "sum to zero"), (":2", "no text")):
        with pytest.raises(InvalidInputError, match=match):
            parse_prompts(bad)


def test_losses():
    a = torch.nn.functional.normalize(torch.randn(3, 1, 8), dim=-1)
    assert torch.allclose(spherical_dist_loss(a, a.transpose(0, 1)).diagonal(), torch.zeros(3), atol=1e-6)
    opposite = spherical_dist_loss(a[:1], -a[:1])
    assert opposite.item() == pytest.approx(2 * (math.pi / 2) ** 2, rel=1e-4)
    many = torch.randn(2000, 1, 8, generator=torch.Generator().manual_seed(0))  # some round to a chord above 2
    antipodal = torch.stack([spherical_dist_loss(v[None], -v[None]) for v in many]).flatten()
    assert torch.isfinite(antipodal).all() and antipodal.sub(2 * (math.pi / 2) ** 2).abs().max() < 1e-2
    flat = torch.full((2, 3, 8, 8), 0.3)
    assert tv_loss(flat).abs().max() == 0 and range_loss(flat).abs().max() == 0
    assert range_loss(flat * 5).min() > 0 and tv_loss(torch.randn(2, 3, 8, 8)).min() > 0


def test_cutouts_shape_and_determinism():
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    cut = MakeCutouts(16, cutn=5)
    one = cut(x, torch.Generator().manual_seed(0))
    assert one.shape == (10, 3, 16, 16)
    assert torch.equal(one, cut(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(one, cut(x, torch.Generator().manual_seed(1)))


def test_wrapper_without_guidance_is_the_plain_denoiser(uncond, clip):
    """Scale 0 and no auxiliary losses: the wrapper returns exactly the model's output, so the sampler
    (which only ever sees the wrapper) draws the unguided picture."""
    settings = DiscoSettings(clip_guidance_scale=0, range_scale=0, **FAST)
    guided = CLIPGuidance(uncond, clip, parse_prompts("夜晚"), settings, torch.Generator().manual_seed(0))
    x, t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    with torch.no_grad():
        plain, _ = uncond.predict(x, t)
    assert torch.equal(guided(x, t), plain)
    settings.clip_guidance_scale = 5000
    assert not torch.allclose(guided(x, t), plain)


def _distance(clip, image, text):
    return float(spherical_dist_loss(clip.encode_image([image])[:, None], clip.encode_text([text])[None]))


def test_guidance_lowers_the_clip_distance_to_the_prompt(uncond, clip):
    base = dict(steps=8, cutn=8, seed=11, eta=0.0, range_scale=0)
    plain = disco_sample(uncond, clip, "夜晚的高山", DiscoSettings(clip_guidance_scale=0, **base)).image
    steered = disco_sample(uncond, clip, "夜晚的高山", DiscoSettings(clip_guidance_scale=20000, clamp_max=0.5, **base))
    assert _distance(clip, steered.image, "夜晚的高山") < _distance(clip, plain, "夜晚的高山")
    assert len(steered.losses) == 8


def test_color_guidance_gives_a_share_of_the_gradient_to_the_overall_colour(uncond, clip):
    """``color_guidance`` w: (1 − w) × the gradient + w × its per-channel mean over the picture, rescaled per picture
    to the gradient's RMS — the direction that darkens or tints the whole picture, which a small CLIP's raw
    gradient barely takes."""
    from taiyi.disco import _share_to_color

    grad = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + torch.tensor([0.3, -0.2, 0.1]).view(
        1, 3, 1, 1
    )
    color = _share_to_color(grad, 1.0)
    assert torch.allclose(color, color[:, :, :1, :1].expand_as(color))  # constant over the picture
    assert torch.allclose(color.square().mean((1, 2, 3)), grad.square().mean((1, 2, 3)))  # the gradient's size
    assert torch.equal(torch.sign(color[:, :, 0, 0]), torch.sign(grad.mean((2, 3))))  # the mean's direction
    assert torch.allclose(_share_to_color(grad, 0.25), 0.25 * color + 0.75 * grad)
    assert torch.equal(_share_to_color(grad, 0.0), grad)

    settings = DiscoSettings(clip_guidance_scale=20000, clamp_max=0.5, **FAST)
    plain = disco_sample(uncond, clip, "夜晚", settings).image
    tinted = [disco_sample(uncond, clip, "夜晚", DiscoSettings(**{**vars(settings), "color_guidance": 0.7})).image
              for _ in range(2)]  # fmt: skip
    assert tinted[0].tobytes() == tinted[1].tobytes() and tinted[0].tobytes() != plain.tobytes()
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(InvalidInputError, match="color-guidance must be between 0 and 1"):
            DiscoSettings(color_guidance=bad).check()


@pytest.mark.parametrize("sampler", ["ddim", "plms", "ddpm"])
def test_samplers_are_seeded_and_save_frames(uncond, clip, sampler):
    settings = DiscoSettings(sampler=sampler, save_every=2, **FAST)
    one = disco_sample(uncond, clip, "晚霞:2|文字:-1", settings)
    two = disco_sample(uncond, clip, "晚霞:2|文字:-1", settings)
    assert one.image.size == (32, 32) and one.image.tobytes() == two.image.tobytes()
    assert len(one.frames) >= 2 and one.settings["seed"] == 3 and one.settings["sampler"] == sampler
    assert len(one.frames) == settings.frame_count()  # what the CLI checks for taken names before sampling


def test_recurrence_retakes_each_step_from_renoised_samples(uncond, clip):
    """Self-recurrence: each step taken k times, x_{t-1} noised back to x_t in between — seeded, and k = 1 is the
    plain sampler."""
    once = disco_sample(uncond, clip, "夜晚", DiscoSettings(**FAST))
    assert np.array_equal(np.asarray(once.image), np.asarray(disco_sample(uncond, clip, "夜晚", DiscoSettings(
        recurrence=1, **FAST)).image))  # fmt: skip
    thrice = [disco_sample(uncond, clip, "夜晚", DiscoSettings(recurrence=3, **FAST)) for _ in range(2)]
    assert np.array_equal(np.asarray(thrice[0].image), np.asarray(thrice[1].image))
    assert not np.array_equal(np.asarray(thrice[0].image), np.asarray(once.image))
    assert len(thrice[0].losses) == FAST["steps"]
    for bad, match in ((dict(recurrence=0), "recurrence must be"), (dict(recurrence=2, sampler="plms"), "ddim")):
        with pytest.raises(InvalidInputError, match=match):
            DiscoSettings(**bad).check()


def test_gradient_checkpointing_gives_the_same_picture(uncond, clip):
    one = disco_sample(uncond, clip, "夜晚", DiscoSettings(**FAST))
    two = disco_sample(uncond, clip, "夜晚", DiscoSettings(gradient_checkpointing=True, **FAST))
    diff = np.abs(np.asarray(one.image, np.int16) - np.asarray(two.image, np.int16)).max()
    assert diff <= 1
    assert not uncond.unet.training  # put back in inference mode


def test_cut_batches_split_the_same_cutouts(uncond, clip):
    one = disco_sample(uncond, clip, "夜晚", DiscoSettings(cut_batches=1, **FAST))
    two = disco_sample(uncond, clip, "夜晚", DiscoSettings(cut_batches=2, **FAST))
    assert one.losses == pytest.approx(two.losses, rel=1e-4)
    diff = np.abs(np.asarray(one.image, np.int16) - np.asarray(two.image, np.int16)).max()
    assert diff <= 1


def test_init_image_and_skip_steps_stay_close_to_the_init(uncond, clip):
    init = Image.new("RGB", (32, 32), (200, 40, 40))
    settings = DiscoSettings(steps=10, skip_steps=8, cutn=2, seed=5, clip_guidance_scale=100)
    near = np.asarray(disco_sample(uncond, clip, "夜晚", settings, init_image=init).image, np.float32)
    far = np.asarray(disco_sample(uncond, clip, "夜晚", DiscoSettings(steps=10, cutn=2, seed=5)).image, np.float32)
    target = np.asarray(init, np.float32)
    assert np.abs(near - target).mean() < np.abs(far - target).mean()
    with pytest.raises(InvalidInputError, match="init image"):
        disco_sample(uncond, clip, "夜晚", settings)


def test_v_prediction_zero_snr_model_stays_finite(tmp_path, clip):
    folder = _save_pipeline(tmp_path / "v", "v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    model = load_uncond(folder)
    assert model.prediction_type == "v_prediction" and float(model.alphas_cumprod[-1]) < 1e-6
    result = disco_sample(model, clip, "夜晚", DiscoSettings(**FAST))
    assert np.isfinite(np.asarray(result.image, np.float32)).all() and all(math.isfinite(v) for v in result.losses)


def test_learned_variance_and_bare_unet_folder(tmp_path, clip):
    """A guided-diffusion style model: 6 output channels, a bare UNet folder with no scheduler."""
    _tiny_unet(out_channels=6).save_pretrained(tmp_path / "bare")
    model = load_uncond(tmp_path / "bare")
    assert model.scheduler_config["beta_schedule"] == "linear"
    assert disco_sample(model, clip, "夜晚", DiscoSettings(**FAST)).image.size == (32, 32)


def test_converted_guided_diffusion_checkpoint_runs(tmp_path, clip):
    from safetensors.torch import save_file

    from taiyi.guided_diffusion import ADMConfig, ADMUNet, convert_guided_diffusion

    config = ADMConfig(image_size=32, model_channels=32, num_res_blocks=1, attention_resolutions=(2,),
                       channel_mult=(1, 2), num_head_channels=16)  # fmt: skip
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in ADMUNet(config).state_dict().items()}, str(tmp_path / "gd.safetensors"))
    folder = convert_guided_diffusion(tmp_path / "gd.safetensors", tmp_path / "converted", config=config)
    assert isinstance(load_uncond(folder), UncondModel)
    assert disco_sample(load_uncond(folder), clip, "东临碣石", DiscoSettings(**FAST)).image.size == (32, 32)


def test_bad_models_give_one_line(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ModelLoadError, match="taiyi convert guided-diffusion"):
        load_uncond(tmp_path / "model.pt")
    with pytest.raises(ModelLoadError, match="not an unconditional diffusion model"):
        load_uncond(tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cutn", "0"], "cutn must be at least 1"),
        (["--clip-guidance-scale", "-1"], "clip-guidance-scale must be 0 or more"),
        (["--steps", "0"], "steps must be between 1 and 1000"),
        (["--seed", "-1"], "seed must be between 0 and 9223372036854775807, not -1"),  # was taken as a seed
        (["--sampler", "euler"], "unknown sampler"),
        (["--color-guidance", "1.5"], "color-guidance must be between 0 and 1"),
        (["--save-every", "-1"], "save-every must be 0 (no frames) or more, not -1"),  # saved every step
        (["--skip-steps", "9", "--steps", "5"], "skip-steps must be from 0"),
        (["--init-image", "{bad}"], "not a readable image"),
        (["--model", "{tmp}"], "not an unconditional diffusion model"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, uncond_dir, args, message):
    from taiyi.cli import main

    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    args = [a.format(bad=bad, tmp=tmp_path) for a in args]
    argv = ["disco", "夜晚", "--model", str(uncond_dir), "--clip", "none-such-clip", "-o", str(tmp_path / "o.png")]
    assert main(argv + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.png").exists()


def test_cli_writes_png_with_parameters_and_frames(tmp_path, uncond_dir, clip, capsys):
    import importlib.metadata

    from taiyi.cli import main

    clip.save_pretrained(tmp_path / "clip")
    out = tmp_path / "night.png"
    argv = ["disco", "夜晚:2|晚霞:1", "--model", str(uncond_dir), "--clip", str(tmp_path / "clip"), "--steps", "3",
            "--cutn", "2", "--seed", "7", "--save-every", "1", "--clamp-max", "0.25", "--cut-pow", "1.5",
            "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = Image.open(out).text["parameters"]
    assert text.startswith("夜晚:2|晚霞:1\n") and "Seed: 7" in text and "Sampler: DDIM" in text
    # every setting that changes the picture is recorded: the gradient clamp and the crop sizes too
    assert "Clamp max: 0.25" in text and "Cut pow: 1.5" in text and "Cut batches: 1" in text
    assert "Init image" not in text and "CLIP image tower" not in text  # only where given
    assert text.endswith(f"Color guidance: 0.0, Version: taiyi {importlib.metadata.version('taiyi')}")
    assert len(list((tmp_path / "night-frames").glob("*.png"))) == 3
    capsys.readouterr()
    assert main(["info", str(out)]) == 0  # as stored: no CFG scale or schedule the picture never had
    assert capsys.readouterr().out == text + "\n"
    assert main(argv) == 2  # no silent overwrite
    (tmp_path / "night-frames" / "notes.txt").write_text("mine")
    assert main([*argv, "--save-every", "2", "--overwrite"]) == 0  # 2 frames now: the earlier third is not this run's
    assert sorted(p.name for p in (tmp_path / "night-frames").iterdir()) == ["0000.png", "0001.png", "notes.txt"]


def test_latent_model_is_steered_through_its_decoder(tmp_path, clip):
    """A latent model (taiyi train uncond --vae): Disco denoises latents and looks at decoded pictures."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
        scaling_factor=0.5,
    )  # fmt: skip
    unet = UNet2DModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )  # fmt: skip
    folder = tmp_path / "latent"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    DDPMScheduler(clip_sample=False).save_pretrained(folder / "scheduler")
    model = load_uncond(folder)
    assert model.vae is not None and model.sample_size == 32 and model.channels == 4
    base = dict(steps=6, cutn=4, seed=2, eta=0.0, range_scale=0, save_every=3)
    plain = disco_sample(model, clip, "夜晚的高山", DiscoSettings(clip_guidance_scale=0, **base))
    steered = disco_sample(model, clip, "夜晚的高山", DiscoSettings(clip_guidance_scale=20000, clamp_max=0.5, **base))
    assert plain.image.size == steered.image.size == (32, 32) and plain.frames[0].size == (32, 32)
    assert _distance(clip, steered.image, "夜晚的高山") < _distance(clip, plain.image, "夜晚的高山")
    # a model folder may name its VAE instead of carrying it (how the embedded model shares taiyi-mini-zh's)
    vae.save_pretrained(tmp_path / "shared" / "vae")
    shared = tmp_path / "shared" / "latent"
    unet.save_pretrained(shared / "unet")
    DDPMScheduler(clip_sample=False).save_pretrained(shared / "scheduler")
    (shared / "model_index.json").write_text(
        json.dumps({"_class_name": "LatentUncondPipeline", "_vae_path": "../vae"})
    )
    again = disco_sample(load_uncond(shared), clip, "夜晚的高山", DiscoSettings(clip_guidance_scale=0, **base))
    assert np.array_equal(np.asarray(again.image), np.asarray(plain.image))
    (shared / "model_index.json").write_text(json.dumps({"_class_name": "LatentUncondPipeline", "_vae_path": "../no"}))
    with pytest.raises(ModelLoadError, match="_vae_path"):
        load_uncond(shared)
    init = Image.new("RGB", (32, 32), (200, 40, 40))
    near = disco_sample(model, clip, "夜晚", DiscoSettings(steps=10, skip_steps=8, cutn=2, seed=5), init_image=init)
    assert near.image.size == (32, 32)
    with pytest.raises(InvalidInputError, match="multiple of 8"):
        disco_sample(model, clip, "夜晚", DiscoSettings(**FAST), size=36)


def test_cli_refuses_existing_frames_before_sampling(tmp_path, capsys, uncond_dir):
    """A frame of an earlier run is never replaced without --overwrite, and the names are checked before anything
    loads (the CLIP named here does not exist: reaching it would give another error)."""
    from taiyi.cli import main

    frames = tmp_path / "fr-frames"
    frames.mkdir()
    (frames / "0002.png").write_bytes(b"earlier frame")
    argv = ["disco", "山", "--model", str(uncond_dir), "--clip", "none-such-clip", "--steps", "4", "--cutn", "2",
            "--save-every", "2", "-o", str(tmp_path / "fr.png")]  # fmt: skip
    assert main(argv + ["--sampler", "plms"]) == 2  # plms takes 5 steps: frames 0000-0002
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"taiyi: error: {frames / '0002.png'} already exists; pass --overwrite to replace it or choose "
                   "another -o"]  # fmt: skip
    assert (frames / "0002.png").read_bytes() == b"earlier frame" and not (tmp_path / "fr.png").exists()
    assert main(argv) == 2  # ddim: frames 0000-0001 only, so the names pass and the missing CLIP is what stops it
    assert "none-such-clip" in capsys.readouterr().err
    assert main(argv + ["--sampler", "plms", "--overwrite"]) == 2  # --overwrite: past the frames, to the CLIP
    assert "none-such-clip" in capsys.readouterr().err
    (frames / "0002.png").unlink()
    frames.rmdir()
    frames.write_text("a file where the frames folder goes")
    assert main(argv) == 2
    assert "fr-frames is a file" in capsys.readouterr().err


def test_long_prompt_warns_as_generate_does(uncond, clip, log_warnings):
    """The CLIP's text tower reads 75 tokens between [CLS] and [SEP]; a longer prompt part is cut with the same
    warning as ``taiyi generate``'s, once per part."""
    settings = DiscoSettings(steps=1, cutn=1, seed=0)
    with log_warnings.at_level(logging.WARNING, logger="taiyi"):
        disco_sample(uncond, clip, "小桥流水人家" * 20 + ":2|晚霞:1", settings)  # 120 characters, one token each
    warnings = [r.getMessage() for r in log_warnings.records if r.name == "taiyi" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("prompt is 120 tokens but the text encoder reads 75; the last 45 were dropped")


def test_cli_help_says_how_seeds_count_up_with_k(capsys):
    from taiyi.cli import main

    assert main(["disco", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Seed of the picture; with -k, of the first: picture i uses seed + i" in out
