"""``taiyi train uncond``: an unconditional diffusion model (diffusers ``UNet2DModel``) from scratch.

Taiyi Disco Diffusion (TAIYI.md §1, §2) steers an *unconditional* diffusion model with the gradients of
Chinese-CLIP similarity at sampling time; this trains the miniature recipe's model: 64×64 RGB, a few
million parameters, a DDPM noise schedule. In pixel space by default (as guided-diffusion); with ``vae``
in the latent space of a trained ``AutoencoderKL`` (latent diffusion: the UNet works on
``resolution / f``-sided latents, f the VAE's downsampling factor, so it learns a scene's layout in a
fraction of the steps a pixel model needs).

- Data: as ``taiyi train vae`` (folder / CSV / JSONL / ``synthetic:N`` / ``shanshui:N``; captions
  ignored), pixels scaled to [-1, 1].
- Objective: timesteps uniform over the schedule's ``num_train_timesteps``; the target is the noise
  (``epsilon``) or the velocity (``v_prediction``); MSE, optionally min-SNR-γ weighted
  (:func:`taiyi.train.sd.diffusion_loss`). ``noise_offset`` adds a per-image, per-channel constant to the
  noise (so the model learns to change overall brightness: night and dawn scenes).
- Validation (every ``val_every`` steps and at the end): a grid of ``val_images`` samples drawn with
  DDIM in ``val_steps`` steps from fixed seeds, saved in ``validation/``.
- ``OUTPUT/final`` is a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``):
  ``diffusers.DDPMPipeline.from_pretrained(OUTPUT/final)`` loads it with no flags. A latent model adds
  ``vae/`` (the frozen autoencoder, whose ``scaling_factor`` the latents are multiplied by); its
  ``model_index.json`` names the class ``LatentUncondPipeline`` — diffusers has no unconditional
  pipeline for an ``AutoencoderKL`` (``LDMPipeline`` takes a VQ model and unscaled latents), and
  :func:`taiyi.disco.load_uncond` reads both layouts.

Checkpoints, exact resume, metrics.jsonl, loss.png and EMA come from the loop shared with
``taiyi train vae`` (:func:`taiyi.train.vae.run_image_training`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidInputError
from ..loading import vae_factor
from .common import step_dir_name
from .vae import RESUMABLE_CHANGES, SHANSHUI_PREFIX, Images, ImageTrainConfig, run_image_training, write_folder_atomic

logger = logging.getLogger("taiyi")

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class UncondTrainConfig(ImageTrainConfig):
    """Settings of one ``taiyi train uncond`` run (the CLI flags map one to one onto these).

    Args (beyond :class:`~taiyi.train.vae.ImageTrainConfig`):
        block_out_channels: UNet channels per resolution level (each level after the first halves the side).
        layers_per_block: ResNet blocks per level.
        attention_levels: the last K levels (the coarsest) use self-attention.
        norm_num_groups: GroupNorm groups (must divide every width).
        num_train_timesteps: length of the DDPM noise schedule.
        beta_schedule: ``linear`` (DDPM, guided-diffusion), ``scaled_linear`` or ``squaredcos_cap_v2`` (cosine).
        prediction_type: ``epsilon`` or ``v_prediction``.
        noise_offset: std of the per-image, per-channel offset added to the noise (0: off; 0.05–0.1 typical).
        snr_gamma: min-SNR-γ loss weighting (None: plain MSE).
        val_images: samples in the validation grid.
        val_steps: DDIM steps of the validation samples.
        vae: an ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``): train in its latent space.
        cache_dir: with ``vae``, encode each image once into this latent cache (``taiyi train sd``'s, keyed
            by the images, the VAE and the resolution, so runs on the same pictures share it) instead of
            every step. The same latents up to float rounding (a convolution's result can depend on the
            batch an image is encoded in), so not bit-identical to a run without it. Folder, CSV and
            JSONL sources only; not with ``hflip``.
    """

    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)
    layers_per_block: int = 1
    attention_levels: int = 1
    norm_num_groups: int = 16
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    val_images: int = 16
    val_steps: int = 50
    lr: float = 2e-4
    batch_size: int = 32
    ema: bool = True
    vae: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)


def _validate_config(config: UncondTrainConfig, factor: int = 1) -> None:
    """Checks every setting; ``factor`` is the VAE's downsampling factor (1 in pixel space)."""
    config.check()
    levels = config.block_out_channels
    side = 2 ** (len(levels) - 1) * factor
    checks = [
        (len(levels) >= 2 and all(c >= 1 for c in levels), "--block-out-channels needs 2+ widths, e.g. 32,64,128,128"),
        (
            all(c % config.norm_num_groups == 0 for c in levels),
            f"--norm-num-groups {config.norm_num_groups} must divide every width of {list(levels)}",
        ),
        (
            config.resolution % side == 0,
            f"--resolution {config.resolution} must be divisible by {side} ({len(levels)} UNet levels"
            + (f", VAE factor {factor})" if factor > 1 else ")"),
        ),
        (config.layers_per_block >= 1, f"--layers-per-block must be at least 1, not {config.layers_per_block}"),
        (
            0 <= config.attention_levels <= len(levels),
            f"--attention-levels must lie in 0..{len(levels)}, not {config.attention_levels}",
        ),
        (
            config.num_train_timesteps >= 2,
            f"--num-train-timesteps must be at least 2, not {config.num_train_timesteps}",
        ),
        (
            config.beta_schedule in BETA_SCHEDULES,
            f"--beta-schedule must be one of {', '.join(BETA_SCHEDULES)}, not {config.beta_schedule!r}",
        ),
        (
            config.prediction_type in PREDICTION_TYPES,
            f"--prediction-type must be epsilon or v_prediction, not {config.prediction_type!r}",
        ),
        (config.noise_offset >= 0, f"--noise-offset must be 0 or more, not {config.noise_offset}"),
        (config.snr_gamma is None or config.snr_gamma > 0, "--snr-gamma must be positive"),
        (config.val_images >= 0, f"--val-images must be 0 or more, not {config.val_images}"),
        (config.val_steps >= 1, f"--val-steps must be at least 1, not {config.val_steps}"),
        (config.cache_dir is None or config.vae is not None, "--cache-dir caches VAE latents: give --vae too"),
        (
            config.cache_dir is None or not config.hflip,
            "--cache-dir keeps the latents of unflipped images; drop --hflip or --cache-dir",
        ),
        *(
            (not source.startswith(SHANSHUI_PREFIX), f"--cache-dir needs folder, CSV or JSONL sources, not {source}")
            for source in (config.data if config.cache_dir is not None else ())
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidInputError(message)


def build_unet(config: UncondTrainConfig, vae=None):
    """A fresh ``UNet2DModel`` for ``resolution``² RGB images (or their ``vae`` latents); the coarsest
    ``attention_levels`` levels attend."""
    from diffusers import UNet2DModel

    n = len(config.block_out_channels)
    attend = [i >= n - config.attention_levels for i in range(n)]
    channels = vae.config.latent_channels if vae is not None else 3
    return UNet2DModel(
        sample_size=config.resolution // vae_factor(vae),
        in_channels=channels,
        out_channels=channels,
        layers_per_block=config.layers_per_block,
        block_out_channels=config.block_out_channels,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attend),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend)),
        norm_num_groups=config.norm_num_groups,
        attention_head_dim=min(32, config.block_out_channels[-1]),
    )


def build_scheduler(config: UncondTrainConfig):
    """The DDPM noise schedule (``clip_sample`` on in pixel space, where pixels live in [-1, 1])."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=config.vae is None,
    )


def load_vae(path: str | os.PathLike, *, allow_pickle: bool = False):
    """A frozen ``AutoencoderKL`` from its folder or a pipeline folder's ``vae/`` (safetensors only by default)."""
    from diffusers import AutoencoderKL

    from ..errors import ModelLoadError
    from ..loading import check_weights, use_decode_padding

    folder = Path(path)
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config = folder / "config.json"
    if not config.is_file() or '"AutoencoderKL"' not in config.read_text(encoding="utf-8"):
        raise InvalidInputError(f"{path} is not an AutoencoderKL folder (nor a pipeline folder with vae/)")
    check_weights(folder, allow_pickle=allow_pickle, what=f"the VAE in {folder}")
    try:
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=None if allow_pickle else True)
    except Exception as exc:  # noqa: BLE001 — one line for any broken folder
        raise ModelLoadError(f"could not load {folder}: {' '.join(str(exc).split())[:200]}") from exc
    return use_decode_padding(vae).float().eval().requires_grad_(False)


@torch.no_grad()
def sample_images(unet, scheduler_config: dict, n: int, steps: int, seed: int, vae=None) -> list:
    """``n`` samples drawn with DDIM in ``steps`` steps, image ``i`` from seed ``seed + i`` (PIL images);
    with ``vae``, latents decoded to pictures."""
    from diffusers import DDIMScheduler, DDPMPipeline

    scheduler = DDIMScheduler.from_config(scheduler_config)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    if vae is None:
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=n, generator=generators, num_inference_steps=steps).images
    from diffusers.image_processor import VaeImageProcessor

    device = next(unet.parameters()).device
    side, channels = unet.config.sample_size, unet.config.in_channels
    latents = torch.cat([torch.randn(1, channels, side, side, generator=g) for g in generators]).to(device)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        latents = scheduler.step(unet(latents, t).sample, t, latents).prev_sample
    pixels = vae.to(device).decode(latents / vae.config.scaling_factor).sample
    return VaeImageProcessor().postprocess(pixels, output_type="pil")


def train_uncond(config: UncondTrainConfig) -> dict:
    """Train an unconditional pixel-space ``UNet2DModel`` and export a ``DDPMPipeline`` folder to ``OUTPUT/final``.

    Works as a plain process and under ``accelerate launch``.

    Args:
        config: the run's settings (see :class:`UncondTrainConfig`).

    Returns:
        :func:`~taiyi.train.vae.run_image_training`'s dict; ``"export"`` holds ``parameters`` and the
        validation grid path.

    Raises:
        InvalidInputError: bad settings, no readable images, an output folder holding another run.
    """
    from .sd import diffusion_loss

    vae = load_vae(config.vae) if config.vae is not None else None
    _validate_config(config, vae_factor(vae))
    noise_scheduler = build_scheduler(config)
    n_steps = noise_scheduler.config.num_train_timesteps

    def cached_posteriors(images: Images, accelerator):
        """``batch(indices)`` → the cached posterior mean and std of those images, (b, 2 × C, h, w)."""
        from .clip import open_training_data
        from .sd import cached_latents

        means, stds = [], []
        for source in config.data:
            ds = open_training_data(source, config, config.resolution, captions=False)
            table, path, computed = cached_latents(ds, vae, accelerator, config.resolution, Path(config.cache_dir))
            # the images load_images kept: rows with a readable image, in order
            means.append(table.mean[table.valid]), stds.append(table.std[table.valid])
            logger.info("latents of %s: %s %s", source, "computed and cached in" if computed else "loaded from", path)
        mean, std = torch.cat(means), torch.cat(stds)
        if len(mean) != len(images.pixels):  # a source changed between the two reads
            raise InvalidInputError(f"{len(images.pixels)} images read but {len(mean)} latents cached; run again")
        return lambda indices: torch.cat([mean[indices], std[indices]], dim=1)

    def loss_fn(model, pixels, g):
        if vae is not None and config.cache_dir is not None:  # the cached posterior: sampled as below
            mean, std = pixels.chunk(2, dim=1)
            pixels = (mean + std * torch.randn(mean.shape, generator=g)) * vae.config.scaling_factor
        elif vae is not None:  # latent diffusion: the frozen VAE's posterior sample, scaled to unit std
            with torch.no_grad():
                posterior = vae.to(pixels.device).encode(pixels).latent_dist
                pixels = posterior.sample(g if pixels.device.type == "cpu" else None) * vae.config.scaling_factor
        noise = torch.randn(pixels.shape, generator=g)  # (b, C, R, R)
        offset = torch.randn(pixels.shape[0], pixels.shape[1], 1, 1, generator=g)
        timesteps = torch.randint(0, n_steps, (pixels.shape[0],), generator=g)
        if config.noise_offset:
            noise = noise + config.noise_offset * offset
        noise, timesteps = noise.to(pixels.device), timesteps.to(pixels.device)
        noisy = noise_scheduler.add_noise(pixels, noise, timesteps)
        prediction = model(noisy, timesteps).sample
        loss = diffusion_loss(
            prediction, pixels, noise, timesteps, noise_scheduler, config.prediction_type, config.snr_gamma
        )
        return loss, {}

    def validate(model, images: Images, step: int, output: Path) -> dict:
        if not config.val_images:
            return {}
        from ..pipeline import make_grid

        samples = sample_images(
            model, dict(noise_scheduler.config), config.val_images, config.val_steps, config.seed, vae
        )
        folder = output / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{step_dir_name(step)}.png"
        tmp = folder / f".{path.name}.tmp.png"
        make_grid(samples).save(tmp)
        os.replace(tmp, path)
        return {"grid": str(path.relative_to(output))}

    def export(model, images: Images, final_dir: Path) -> dict:
        from diffusers import DDPMPipeline

        pipe = DDPMPipeline(unet=model, scheduler=build_scheduler(config))

        def write(tmp: Path) -> None:
            pipe.save_pretrained(tmp, safe_serialization=True)
            if vae is not None:
                vae.save_pretrained(tmp / "vae", safe_serialization=True)
                index = json.loads((tmp / "model_index.json").read_text(encoding="utf-8"))
                index.update(_class_name="LatentUncondPipeline", vae=["diffusers", "AutoencoderKL"])
                (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

        write_folder_atomic(final_dir, write)
        return {"parameters": sum(p.numel() for p in model.parameters()), "latent": vae is not None}

    return run_image_training(
        config,
        name="uncond",
        build=lambda: build_unet(config, vae),
        loss_fn=loss_fn,
        validate=validate,
        export=export,
        resumable=(*RESUMABLE_CHANGES, "cache_dir"),
        inputs=cached_posteriors if config.cache_dir is not None else None,
    )


__all__ = ["UncondTrainConfig", "build_scheduler", "build_unet", "load_vae", "sample_images", "train_uncond"]
