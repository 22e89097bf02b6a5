"""Chinese Disco Diffusion: an unconditional diffusion model steered at sampling time by Chinese-CLIP gradients.

The pieces, each replaceable:

- :class:`UncondModel` — any unconditional diffusers ``UNet2DModel`` folder (a ``DDPMPipeline`` layout
  with its scheduler, or a bare model folder such as ``taiyi convert guided-diffusion`` writes, which
  gets guided-diffusion's linear schedule); the network may predict ε, v or x0, with or without
  learned variance channels.
- :class:`CLIPGuidance` — the guidance, as a wrapper around the denoiser (k-diffusion's
  ``make_cond_model_fn``): from the predicted clean image it takes random cutouts with augmentations,
  embeds them with the CLIP image tower, and moves the model's output along the gradient of the
  spherical distance to the prompt embeddings (plus total-variation, range and saturation losses) —
  classifier guidance in score form, ``ε' = ε − √(1−ᾱ) ∇ log p`` (expressed in v or x0 for models
  that predict those). The gradient's RMS is clamped. ``color_guidance`` gives a share of the CLIP's gradient to
  its mean over the picture, per colour channel: a small CLIP's steepest direction is texture, so its raw
  gradient can raise a prompt's score without making the picture darker or bluer (夜晚 on the embedded model).
- the sampler — a diffusers scheduler loop (``ddim`` with ``eta``, ``plms``, ``ddpm``) that never knows
  about guidance. With ``recurrence`` k > 1 each step is taken k times, x_{t-1} noised back to x_t in between
  (the self-recurrence of Bansal et al., "Universal Guidance for Diffusion Models", 2023): the guidance gets k
  pulls per step while the model pulls the sample back toward its own pictures, so a small CLIP's gradient
  steers a scene without turning it into a pattern that only the CLIP likes.

Memory: cutouts go through CLIP ``cut_batches`` at a time, each batch's graph freed after its gradient
with respect to the predicted image; the denoiser's graph is walked back once per step.
``gradient_checkpointing`` recomputes the UNet's activations in that backward pass.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InvalidInputError, ModelLoadError

__all__ = [
    "SAMPLERS",
    "DiscoSettings",
    "WeightedPrompt",
    "parse_prompts",
    "UncondModel",
    "load_uncond",
    "MakeCutouts",
    "CLIPGuidance",
    "disco_sample",
    "disco_samples",
    "disco_seeds",
    "spherical_dist_loss",
    "tv_loss",
    "range_loss",
]

SAMPLERS: tuple[str, ...] = ("ddim", "plms", "ddpm")
ProgressCallback = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class WeightedPrompt:
    text: str
    weight: float = 1.0


# A colon right after a digit is text, not a weight: 12:30 (a time), 16:9 (a ratio).
_WEIGHT = re.compile(r"^(.*?)(?<![0-9])[:：]\s*([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*$", re.S)
# Parts are split at | and at the full-width ｜ a Chinese input method types for it (as ： works for :).
_SEPARATOR = re.compile(r"[|｜]")


def parse_prompts(spec: str | Sequence[str]) -> list[WeightedPrompt]:
    """``"东临碣石，以观沧海:2|晚霞:1|文字:-0.5"`` → weighted prompts (Disco's syntax; ``：`` and ``｜`` work too).

    A part without ``:weight`` weighs 1. Negative weights push away. The weights must not sum to zero. A colon
    right after a digit is part of the text (``时间 12:30`` is one prompt of weight 1, not ``时间 12`` of weight 30).

    Raises:
        InvalidInputError: ``spec`` is not text, is empty, a weight is too large, or the weights sum to zero.
    """
    if not isinstance(spec, str) and not (isinstance(spec, Sequence) and all(isinstance(part, str) for part in spec)):
        raise InvalidInputError(f"prompt must be a string or a list of strings, not {spec!r}"[:200])
    parts = _SEPARATOR.split(spec) if isinstance(spec, str) else list(spec)
    out = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        match = _WEIGHT.match(part)
        text, weight = (match.group(1).strip(), float(match.group(2))) if match else (part, 1.0)
        if not text:
            raise InvalidInputError(f"prompt part {part!r} has a weight but no text; write e.g. 晚霞:1")
        if not math.isfinite(weight):  # a weight of hundreds of digits: inf, and every weight would become nan
            raise InvalidInputError(f"the weight of prompt part {text[:20]!r} is too large to use; write e.g. 晚霞:2")
        out.append(WeightedPrompt(text, weight))
    if not out:
        raise InvalidInputError("prompt is empty; give a description such as 东临碣石，以观沧海")
    if abs(sum(p.weight for p in out)) < 1e-6:
        raise InvalidInputError("the prompt weights sum to zero; make at least one weight larger")
    return out


# --------------------------------------------------------------------------------------------------
# The unconditional model


class UncondModel:
    """An unconditional ``UNet2DModel`` and its noise schedule, answering ε(x_t, t).

    Args:
        unet: the network (output: ε, v, or 6 channels = ε + learned variance, as guided-diffusion).
        scheduler_config: the training noise schedule (a diffusers scheduler config).
        prediction_type: what the network predicts: ``epsilon``, ``v_prediction`` or ``sample``.
        vae: for a latent model, the ``AutoencoderKL`` whose latents (× its ``scaling_factor``) the UNet
            denoises; guidance then looks at the decoded picture and its gradient flows back through the
            decoder. None: a pixel-space model.
    """

    def __init__(self, unet, scheduler_config: dict, prediction_type: str = "epsilon", name: str = "", vae=None):
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        self.prediction_type = prediction_type
        self.name = name
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        from diffusers import DDPMScheduler

        self.alphas_cumprod = DDPMScheduler.from_config(self.scheduler_config).alphas_cumprod.float()  # (T,)

    @property
    def factor(self) -> int:
        """Pixels per latent along a side (1 for a pixel model)."""
        from .loading import vae_factor

        return vae_factor(self.vae)

    @property
    def sample_size(self) -> int | None:
        """The picture side the model was trained at (None: its config does not say, as for a converted
        guided-diffusion model whose channel widths match no published size)."""
        size = self.unet.config.sample_size
        if size is None:
            return None
        return int(size[0] if isinstance(size, list | tuple) else size) * self.factor

    @property
    def size_multiple(self) -> int:
        """What a picture side must be a multiple of: the UNet halves its input once per level but the last,
        and a side its levels cannot halve evenly breaks its skip connections (never below 8)."""
        halvings = len(self.unet.config.block_out_channels) - 1
        return max(8, self.factor * 2**halvings)

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The picture (B, 3, H, W) in [-1, 1] that x shows (differentiable: decoded for a latent model)."""
        if self.vae is None:
            return x
        return self.vae.decode(x / self.vae.config.scaling_factor).sample

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model's input space for a picture in [-1, 1] (the posterior mean for a latent model)."""
        if self.vae is None:
            return pixels
        with torch.no_grad():
            return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's own output (in ``prediction_type``) and the predicted clean sample x0 (pixels, or
        latents for a latent model), both differentiable in x (B, C, H, W); t holds integer timesteps (B,)."""
        out = self.unet(x, t).sample
        if out.shape[1] == 2 * x.shape[1]:  # learned variance (learn_sigma): the first half is the prediction
            out = out[:, : x.shape[1]]
        a = self.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1).to(x.dtype)
        if self.prediction_type == "epsilon":
            x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
        elif self.prediction_type == "v_prediction":
            x0 = a.sqrt() * x - (1 - a).sqrt() * out  # no division: safe at zero terminal SNR
        else:
            x0 = out
        return out, x0


_GUIDED_DIFFUSION_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}


def load_uncond(model: str | os.PathLike, *, device: str | torch.device = "cpu", allow_pickle: bool = False):
    """Load an unconditional model: a ``DDPMPipeline``-style folder (``unet/`` + ``scheduler/``, and ``vae/``
    for a latent model from ``taiyi train uncond --vae``), or a bare ``UNet2DModel`` folder (guided-diffusion's
    linear 1000-step schedule is assumed, as Disco uses).

    Raises:
        ModelLoadError: not such a folder (a raw ``.pt`` checkpoint is pointed to ``taiyi convert``).
        InvalidInputError: an unknown or unavailable ``device``.
    """
    from .guided_diffusion import load_unet
    from .loading import check_weights, select_device
    from .models import resolve_model

    device = select_device(device)  # "gpu" or an absent GPU: one line before anything loads
    if Path(model).is_file():
        suffix = Path(model).suffix
        hint = " (convert a guided-diffusion checkpoint first: taiyi convert guided-diffusion CKPT --out DIR)"
        raise ModelLoadError(
            f"{model} is a file, not a model folder; give an unconditional diffusers model folder"
            + (hint if suffix in (".pt", ".pth", ".ckpt", ".safetensors") else "")
        )
    folder, name = resolve_model(model)
    folder = Path(folder)
    unet_folder = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    config_path = unet_folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{folder} is not an unconditional diffusion model (no unet/config.json or config.json); give a "
            "DDPMPipeline folder, a UNet2DModel folder, or convert a guided-diffusion checkpoint with taiyi convert"
        )
    config = _read_json(config_path)
    if config.get("_class_name") not in ("UNet2DModel", "ADMUNet2DModel"):
        found = config.get("_class_name") or (config.get("architectures") or [config.get("model_type", "model")])[0]
        raise ModelLoadError(
            f"{folder} holds a {found}, not an unconditional UNet2DModel; Disco Diffusion "
            "needs an unconditional model (taiyi train uncond, or taiyi convert guided-diffusion)"
        )
    # a pickled-only folder (allowed by now) is loaded as such, without diffusers' warning that safetensors are missing
    safetensors = check_weights(unet_folder, allow_pickle=allow_pickle, what=f"the model in {unet_folder}")
    try:
        unet = load_unet(unet_folder, use_safetensors=safetensors).to(device)
    except Exception as exc:  # noqa: BLE001 — one line for any broken folder
        raise ModelLoadError(f"could not load {unet_folder}: {' '.join(str(exc).split())[:200]}") from exc
    schedule_path = folder / "scheduler" / "scheduler_config.json"
    schedule = _read_json(schedule_path) if schedule_path.is_file() else _GUIDED_DIFFUSION_SCHEDULE
    vae = None
    vae_folder = _vae_folder(folder) if unet_folder != folder else None
    if vae_folder is not None:
        from .train.uncond import load_vae

        vae = load_vae(vae_folder, allow_pickle=allow_pickle).to(device)
        if vae.config.latent_channels != unet.config.in_channels:
            raise ModelLoadError(
                f"{folder}: the VAE makes {vae.config.latent_channels}-channel latents but the UNet takes "
                f"{unet.config.in_channels} channels"
            )
    return UncondModel(unet, schedule, schedule.get("prediction_type", "epsilon"), name=name, vae=vae)


def _read_json(path: Path) -> dict:
    """A model's JSON settings file as a dict; a broken or foreign one is a :class:`ModelLoadError`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a readable JSON file ({' '.join(str(exc).split())[:120]})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object of settings")
    return data


def _vae_folder(folder: Path) -> Path | None:
    """A latent model's autoencoder: its own ``vae/``, or the folder that ``model_index.json``'s ``_vae_path``
    names relative to the model (how the embedded model shares ``taiyi-mini-zh``'s VAE instead of a copy);
    None for a pixel-space model."""
    if (folder / "vae" / "config.json").is_file():
        return folder / "vae"
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else {}
    except ValueError as exc:
        raise ModelLoadError(f"{index_path} is not valid JSON: {exc}") from exc
    shared = index.get("_vae_path") if isinstance(index, dict) else None
    if not shared:
        return None
    target = (folder / str(shared)).resolve()
    if not (target / "config.json").is_file():
        raise ModelLoadError(f"{folder}: its VAE {shared} (model_index.json _vae_path) is missing")
    return target


# --------------------------------------------------------------------------------------------------
# Losses


def spherical_dist_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between normalised x (N, 1, D) and y (1, P, D) → (N, P)."""
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    # half the chord is at most 1; rounding can put opposite vectors just above, where arcsin is nan
    return (x - y).norm(dim=-1).div(2).clamp(max=1.0).arcsin().pow(2).mul(2)


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    """Total variation of images (B, C, H, W) in [-1, 1], per image (B,)."""
    x = F.pad(x, (0, 1, 0, 1), "replicate")
    dx, dy = x[..., :-1, 1:] - x[..., :-1, :-1], x[..., 1:, :-1] - x[..., :-1, :-1]
    return (dx.pow(2) + dy.pow(2)).mean(dim=(1, 2, 3)) / 2


def range_loss(x: torch.Tensor) -> torch.Tensor:
    """How far pixels stray outside [-1, 1], per image (B,)."""
    return (x - x.clamp(-1, 1)).pow(2).mean(dim=(1, 2, 3))


def saturation_loss(x: torch.Tensor) -> torch.Tensor:
    """Disco's saturation loss: mean absolute overshoot outside [-1, 1], per image (B,)."""
    return (x - x.clamp(-1, 1)).abs().mean(dim=(1, 2, 3))


# --------------------------------------------------------------------------------------------------
# Cutouts


class MakeCutouts:
    """``cutn`` random square crops of images in [-1, 1], resized to the CLIP input size, with light
    augmentations (flip, shift, grey, noise). All draws come from the given generator.

    Args:
        cut_size: the CLIP image tower's input side.
        cutn: cutouts per image.
        cut_pow: crop-size exponent (> 1: smaller crops more often).
        min_frac: the smallest crop, as a fraction of the image side.
        augment: apply the augmentations.
    """

    def __init__(self, cut_size: int, cutn: int, cut_pow: float = 1.0, min_frac: float = 0.5, augment: bool = True):
        self.cut_size, self.cutn, self.cut_pow, self.min_frac, self.augment = (
            cut_size,
            cutn,
            cut_pow,
            min_frac,
            augment,
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator, first: int = 0) -> torch.Tensor:
        """x (B, 3, H, W) → cutouts (cutn × B, 3, S, S), cutout-major; ``first``: index of the first cutout
        (cutout 0 is always the whole image), so a set taken in batches equals the set taken at once."""
        _, _, h, w = x.shape
        side = min(h, w)
        low = max(int(side * self.min_frac), 1)
        cuts = []
        for i in range(self.cutn):
            r = float(torch.rand((), generator=generator))
            size = side if i + first == 0 else int(low + (side - low) * r**self.cut_pow)  # cutout 0: the whole image
            oy = int(torch.randint(0, h - size + 1, (), generator=generator))
            ox = int(torch.randint(0, w - size + 1, (), generator=generator))
            crop = x[:, :, oy : oy + size, ox : ox + size]
            crop = F.interpolate(
                crop, size=(self.cut_size, self.cut_size), mode="bilinear", antialias=size > self.cut_size
            )
            if self.augment:
                if float(torch.rand((), generator=generator)) < 0.5:
                    crop = crop.flip(-1)
                if float(torch.rand((), generator=generator)) < 0.1:
                    crop = crop.mean(1, keepdim=True).expand_as(crop)
                noise = torch.randn(crop.shape, generator=generator, dtype=crop.dtype).to(crop.device)
                crop = crop + 0.05 * float(torch.rand((), generator=generator)) * noise
            cuts.append(crop)
        return torch.cat(cuts)


# --------------------------------------------------------------------------------------------------
# Guidance: a wrapper around the denoiser


@dataclass
class DiscoSettings:
    """Sampling and guidance settings (Disco Diffusion's names).

    Args:
        steps: denoising steps.
        sampler: ``ddim`` (with ``eta``), ``plms`` or ``ddpm``.
        eta: DDIM's noise (0: deterministic; Disco uses 0.8).
        clip_guidance_scale: weight of the CLIP loss.
        tv_scale, range_scale, sat_scale: weights of the smoothness, range and saturation losses.
        cutn: cutouts per step; cut_batches: how many CLIP passes they are split into (memory).
        cut_pow: crop-size exponent.
        clamp_max: the gradient's RMS is clamped to this (None: off).
        skip_steps: with an init image, start this many steps in (more: closer to the init image).
        seed: the seed; gradient_checkpointing: recompute UNet activations in the backward pass.
        save_every: keep the predicted image every N steps (0: none).
        recurrence: take each step this many times from re-noised samples (1: the plain sampler; not with plms,
            which remembers earlier steps).
        color_guidance: share (0-1) of the CLIP loss's gradient given to its per-channel mean over the picture —
            the picture's overall colour and brightness — rescaled to the gradient's own RMS (0: Disco's plain
            gradient; 1: colour only).
    """

    steps: int = 50
    sampler: str = "ddim"
    eta: float = 0.8
    clip_guidance_scale: float = 5000.0
    tv_scale: float = 0.0
    range_scale: float = 150.0
    sat_scale: float = 0.0
    cutn: int = 16
    cut_batches: int = 1
    cut_pow: float = 1.0
    clamp_max: float | None = 0.05
    skip_steps: int = 0
    seed: int | None = None
    gradient_checkpointing: bool = False
    save_every: int = 0
    recurrence: int = 1
    color_guidance: float = 0.0

    def check(self) -> None:
        """Raise :class:`InvalidInputError` for the first unusable setting; numpy numbers become Python ones."""
        for name in ("steps", "cutn", "cut_batches", "skip_steps", "save_every", "recurrence", "seed"):
            value = getattr(self, name)
            if isinstance(value, np.integer):
                setattr(self, name, value := int(value))
            if not (value is None and name == "seed") and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidInputError(f"{name.replace('_', '-')} must be a whole number, not {value!r}")
        for name in ("eta", "clip_guidance_scale", "tv_scale", "range_scale", "sat_scale", "cut_pow", "clamp_max",
                     "color_guidance"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, np.floating | np.integer):
                setattr(self, name, value := float(value))
            if not (value is None and name == "clamp_max") and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise InvalidInputError(f"{name.replace('_', '-')} must be a number, not {value!r}")
        if not 1 <= self.steps <= 1000:
            raise InvalidInputError(f"steps must be between 1 and 1000, not {self.steps}")
        if self.seed is not None and not 0 <= self.seed < 2**63:  # as taiyi generate: a negative seed is a mistake
            raise InvalidInputError(f"seed must be between 0 and {2**63 - 1}, not {self.seed}")
        if self.sampler not in SAMPLERS:
            raise InvalidInputError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not 0 <= self.eta <= 1:
            raise InvalidInputError(f"eta must be between 0 and 1, not {self.eta}")
        for name in ("clip_guidance_scale", "tv_scale", "range_scale", "sat_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidInputError(f"{name.replace('_', '-')} must be 0 or more, not {value}")
        if self.cutn < 1:
            raise InvalidInputError(f"cutn must be at least 1, not {self.cutn}")
        if not 1 <= self.cut_batches <= self.cutn:
            raise InvalidInputError(f"cut-batches must be between 1 and cutn ({self.cutn}), not {self.cut_batches}")
        if not 0 < self.cut_pow < math.inf:  # also refuses nan
            raise InvalidInputError(f"cut-pow must be a finite number above 0, not {self.cut_pow}")
        if self.clamp_max is not None and not self.clamp_max > 0:  # nan would blacken the picture
            raise InvalidInputError(f"clamp-max must be above 0, not {self.clamp_max}")
        if self.save_every < 0:
            raise InvalidInputError(f"save-every must be 0 (no frames) or more, not {self.save_every}")
        if not 1 <= self.recurrence <= 16:
            raise InvalidInputError(f"recurrence must be between 1 and 16, not {self.recurrence}")
        if not 0 <= self.color_guidance <= 1:  # also refuses nan
            raise InvalidInputError(f"color-guidance must be between 0 and 1, not {self.color_guidance}")
        if self.recurrence > 1 and self.sampler == "plms":
            raise InvalidInputError("recurrence needs a sampler without memory of earlier steps; use --sampler ddim")
        if not 0 <= self.skip_steps < self.steps:
            raise InvalidInputError(
                f"skip-steps must be from 0 to steps - 1 ({self.steps - 1}), not {self.skip_steps}"
            )

    def frame_count(self) -> int:
        """How many frames :func:`disco_sample` keeps with these settings (``plms`` from noise takes one step more
        than ``steps``: the sampler's own timesteps are counted)."""
        timesteps = _scheduler(self.sampler, {}, "epsilon", self.steps).timesteps
        total = len(_skip(timesteps, self.sampler, self.skip_steps))
        return len(_frame_steps(total, self.save_every))


def _skip(timesteps: torch.Tensor, sampler: str, skip_steps: int) -> torch.Tensor:
    """The sampler's timesteps left after skipping ``skip_steps`` steps; the first is the init image's noise level.

    PLMS (diffusers' PNDM) takes t0, t1, t1, t2 …: its warm-up step t0 → t1 is retaken at the second t1 with the
    averaged ε, the one after it starts at the third. So does a run from t_k: t_k, t_{k+1}, t_{k+1}, t_{k+2} … (cut
    at k, the list put the repeat in the wrong place: the retake took a sample at t1 for one at t0 for k = 1, and a
    step was applied to a sample one noise level off for k ≥ 2)."""
    if sampler != "plms":
        return timesteps[skip_steps:]
    rest = torch.cat([timesteps[:1], timesteps[2:]])[skip_steps:]  # t_k … without the repeat
    return torch.cat([rest[:2], rest[1:]]) if len(rest) > 1 else rest


def _frame_steps(total: int, save_every: int) -> list[int]:
    """The steps (from 1, after any skipped ones) whose predicted picture is kept: every ``save_every``-th of
    ``total`` and the last; none when ``save_every`` is 0."""
    if not save_every:
        return []
    return [i for i in range(1, total + 1) if i % save_every == 0 or i == total]


def _input_side(processor) -> int:
    """The CLIP image tower's input side from its processor (crop size, else the resize's shortest edge)."""
    for attr, key in (("crop_size", "height"), ("size", "shortest_edge"), ("size", "height")):
        value = getattr(processor, attr, None)
        value = value.get(key) if isinstance(value, dict) else getattr(value, key, value)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelLoadError("the CLIP image processor names no input size (crop_size or size)")


def _share_to_color(grad: torch.Tensor, share: float) -> torch.Tensor:
    """``share`` of ``grad`` (B, C, H, W) moved to its per-channel mean over the picture, rescaled per picture to
    the RMS of ``grad``: the direction that changes overall colour and brightness gets a weight of its own."""
    color = grad.mean(dim=(2, 3), keepdim=True).expand_as(grad)  # (B, C, H, W)
    size = grad.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()  # (B, 1, 1, 1)
    color = color * size / color.square().mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp(min=1e-12)
    return share * color + (1 - share) * grad


class CLIPGuidance:
    """Wraps :meth:`UncondModel.eps`: returns ε shifted along the gradient of the guidance losses.

    Args:
        model: the unconditional model.
        clip: a :class:`~taiyi.clip.ChineseCLIP` (any model with ``image_features``, ``encode_text`` and an
            ``image_processor`` giving the input size, mean and std).
        prompts: weighted prompts (:func:`parse_prompts`).
        settings: the loss weights, cutouts and clamping.
        generator: source of the cutouts' randomness.
    """

    def __init__(
        self, model: UncondModel, clip, prompts: Sequence[WeightedPrompt], settings: DiscoSettings, generator
    ):
        self.model, self.clip, self.settings, self.generator = model, clip, settings, generator
        processor = clip.image_processor
        self.cutouts = MakeCutouts(_input_side(processor), settings.cutn, settings.cut_pow)
        self.mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
        self.targets = clip.encode_text([p.text for p in prompts]).float()  # (P, D), normalised
        weights = torch.tensor([p.weight for p in prompts], dtype=torch.float32)
        self.weights = weights / weights.sum().abs()  # (P,)
        self.last_x0: torch.Tensor | None = None
        self.last_loss: float = 0.0

    def _clip_loss_grad(self, x0: torch.Tensor) -> torch.Tensor:
        """∂(scale × weighted spherical distance)/∂x0, cutouts taken ``cut_batches`` at a time."""
        s = self.settings
        grad = torch.zeros_like(x0)
        per_batch = math.ceil(s.cutn / s.cut_batches)
        total = 0.0
        for start in range(0, s.cutn, per_batch):
            n = min(per_batch, s.cutn - start)
            x_in = x0.detach().requires_grad_(True)
            self.cutouts.cutn = n
            cuts = self.cutouts(x_in.add(1).div(2), self.generator, start)  # (n·B, 3, S, S) in [0, 1]
            pixels = (cuts - self.mean.to(cuts)) / self.std.to(cuts)
            feats = self.clip.image_features(pixels).float()  # (n·B, D)
            dists = spherical_dist_loss(feats.unsqueeze(1), self.targets.to(feats.device).unsqueeze(0))  # (n·B, P)
            dists = dists.view(n, x0.shape[0], -1)  # (n, B, P)
            loss = (dists * self.weights.to(dists.device)).sum(2).mean(0).sum() * (n / s.cutn)  # mean over all cuts
            total += float(loss.detach())
            grad += torch.autograd.grad(loss * s.clip_guidance_scale, x_in)[0]
        self.cutouts.cutn = s.cutn
        self.last_loss = total
        return _share_to_color(grad, s.color_guidance) if s.color_guidance else grad

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's output (ε, v or x0, as it predicts) for x (B, C, H, W) at timesteps t (B,), moved so that
        ε shifts by −√(1−ᾱ)·g, g the clamped ascent direction of the guidance; unguided where ᾱ < 1e-4 (pure
        noise: the predicted image carries no information and the shift would blow up)."""
        s = self.settings
        a = self.model.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            out, x0 = self.model.predict(x, t)
            if float(a.min()) < 1e-4:
                with torch.no_grad():
                    self.last_x0, self.last_loss = self.model.to_pixels(x0.detach()), 0.0
                return out.detach()
            x0 = self.model.to_pixels(x0)  # the picture the losses look at (decoded for a latent model)
            x_in_grad = self._clip_loss_grad(x0) if s.clip_guidance_scale > 0 else torch.zeros_like(x0)
            x0_leaf = x0.detach().requires_grad_(True)
            aux = (
                s.tv_scale * tv_loss(x0_leaf).sum()
                + s.range_scale * range_loss(x0_leaf).sum()
                + s.sat_scale * saturation_loss(x0_leaf).sum()
            )
            if aux.requires_grad:
                x_in_grad = x_in_grad + torch.autograd.grad(aux, x0_leaf)[0]
            grad = -torch.autograd.grad(x0, x, x_in_grad)[0]  # ascent direction of log p(prompt | x)
        if not torch.isfinite(grad).all():
            grad = torch.zeros_like(grad)
        if s.clamp_max is not None:  # Disco: clamp the gradient's RMS
            magnitude = grad.square().mean().sqrt()
            grad = grad * magnitude.clamp(max=s.clamp_max) / magnitude.clamp(min=1e-12)
        self.last_x0 = x0.detach()
        kind = self.model.prediction_type
        if kind == "epsilon":
            shift = -(1 - a).sqrt() * grad
        elif kind == "v_prediction":
            shift = -((1 - a) / a).sqrt() * grad
        else:
            shift = (1 - a) / a.sqrt() * grad
        return out.detach() + shift


# --------------------------------------------------------------------------------------------------
# Sampling


def _scheduler(name: str, config: dict, prediction_type: str, steps: int):
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    if name == "plms" and prediction_type == "sample":
        raise InvalidInputError("the plms sampler cannot drive a model that predicts x0; use --sampler ddim")
    base = {**config, "prediction_type": prediction_type, "clip_sample": False}
    if name == "ddim":
        sched = DDIMScheduler.from_config(base)
    elif name == "plms":
        sched = PNDMScheduler.from_config({**base, "skip_prk_steps": True})
    else:
        sched = DDPMScheduler.from_config({**base, "variance_type": "fixed_small"})
    sched.set_timesteps(steps)
    return sched


def _to_image(x: torch.Tensor) -> Image.Image:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    return Image.fromarray(arr)


def _init_latent(image: Image.Image, size: int) -> torch.Tensor:
    image = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]  # (1, 3, S, S)


def _renoise(x: torch.Tensor, t: int, prev_t: int, alphas_cumprod: torch.Tensor, generator) -> torch.Tensor:
    """x at step ``prev_t`` → a fresh draw at step ``t`` (q(x_t | x_prev)); prev_t −1: the clean end."""
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    ratio = (a_t / a_prev).to(x.device)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return ratio.sqrt() * x + (1 - ratio).sqrt() * noise


@dataclass
class DiscoResult:
    image: Image.Image
    frames: list[Image.Image]
    settings: dict
    prompts: list[WeightedPrompt]
    losses: list[float]


def disco_sample(
    model: UncondModel,
    clip,
    prompt: str | Sequence[str],
    settings: DiscoSettings | None = None,
    *,
    init_image: Image.Image | str | os.PathLike | None = None,
    size: int | None = None,
    progress: ProgressCallback | None = None,
) -> DiscoResult:
    """Draw one image from ``model`` steered towards ``prompt`` by ``clip``.

    Args:
        model: from :func:`load_uncond`.
        clip: from :func:`taiyi.clip.load_clip`.
        prompt: ``"诗句:2|晚霞:1"`` or a list of such parts.
        settings: :class:`DiscoSettings` (defaults if None).
        init_image: start from this picture (PIL image, path or uint8 array), noised to step ``skip_steps``,
            which must then be 1 or more.
        size: picture side (default: the model's sample size); a multiple of 8, and of the UNet's total
            downsampling (:attr:`UncondModel.size_multiple`; 64 for Disco's 512 model).
        progress: called with ``(steps done, steps total)``.

    Raises:
        InvalidInputError: an unusable prompt, setting, size or init image.
    """
    from .io import as_picture

    if settings is not None and not isinstance(settings, DiscoSettings):
        raise InvalidInputError(f"settings must be a DiscoSettings, not {type(settings).__name__}")
    s = settings or DiscoSettings()
    s.check()
    prompts = parse_prompts(prompt)
    step = model.size_multiple
    if size is None and model.sample_size is None:
        raise InvalidInputError(
            f"the model does not record its picture size (sample_size in its config.json); give a size (--size), "
            f"a multiple of {step}"
        )
    side = model.sample_size if size is None else size  # 0 is refused, not taken as the default
    if isinstance(side, np.integer):
        side = int(side)
    if isinstance(side, bool) or not isinstance(side, int) or side % step or not 32 <= side <= 2048:
        raise InvalidInputError(f"size must be a multiple of {step} between 32 and 2048, not {side!r}")
    trained = len(model.alphas_cumprod)
    if s.steps > trained:  # the schedulers cannot space more steps than the noise levels the model learnt
        raise InvalidInputError(
            f"steps must be at most {trained} for this model (it was trained on {trained} noise levels), not {s.steps}"
        )
    if s.skip_steps and init_image is None:
        raise InvalidInputError("skip-steps needs an init image (--init-image)")
    if init_image is not None and not s.skip_steps:  # the sampler would start from pure noise and ignore it
        raise InvalidInputError(
            "an init image needs skip-steps of 1 or more (the steps skipped keep the picture); e.g. --skip-steps "
            f"{max(1, s.steps // 2)}"
        )
    if init_image is not None:
        init_image = as_picture(init_image, "RGB", "init image")
    if progress is not None and not callable(progress):
        raise InvalidInputError(f"progress must be a function of (step, total), not {type(progress).__name__}")
    device = next(model.unet.parameters()).device
    seed = s.seed if s.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    generator = torch.Generator().manual_seed(seed)
    if s.gradient_checkpointing and hasattr(model.unet, "enable_gradient_checkpointing"):
        model.unet.enable_gradient_checkpointing()
        model.unet.train()  # diffusers checkpoints only in training mode; the model has no dropout here
    guided = CLIPGuidance(model, clip, prompts, s, generator)
    sched = _scheduler(s.sampler, model.scheduler_config, model.prediction_type, s.steps)
    timesteps = sched.timesteps
    shape = (1, model.channels, side // model.factor, side // model.factor)
    x = torch.randn(shape, generator=generator)
    if init_image is not None:
        init = model.from_pixels(_init_latent(init_image, side).to(device)).cpu()
        timesteps = _skip(timesteps, s.sampler, s.skip_steps)
        x = sched.add_noise(init, x, timesteps[:1])
    x = x.to(device)
    frames, losses = [], []
    total = len(timesteps)
    keep = set(_frame_steps(total, s.save_every))
    try:
        for i, t in enumerate(timesteps):
            t_batch = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
            step_kwargs = {"generator": generator} if s.sampler in ("ddim", "ddpm") else {}
            if s.sampler == "ddim":
                step_kwargs["eta"] = s.eta
            prev_t = int(timesteps[i + 1]) if i + 1 < total else -1
            for r in range(s.recurrence):
                if r:  # self-recurrence: noise x_{t-1} back to x_t and take the step again
                    x = _renoise(x, int(t), prev_t, model.alphas_cumprod, generator)
                out = guided(x, t_batch)
                x = sched.step(out.cpu(), t, x.cpu(), **step_kwargs).prev_sample.to(device)
            losses.append(guided.last_loss)
            if i + 1 in keep and guided.last_x0 is not None:
                frames.append(_to_image(guided.last_x0[0]))
            if progress is not None:
                progress(i + 1, total)
    finally:
        if s.gradient_checkpointing and hasattr(model.unet, "disable_gradient_checkpointing"):
            model.unet.disable_gradient_checkpointing()
            model.unet.eval()
    settings_out = {**asdict(s), "seed": seed, "size": side, "model": model.name}
    with torch.no_grad():
        picture = model.to_pixels(x)[0]
    return DiscoResult(_to_image(picture), frames, settings_out, prompts, losses)


def disco_seeds(seed: int | None, num_images: int) -> list[int]:
    """The seeds of ``num_images`` pictures: ``seed``, ``seed + 1`` …; a random first one when ``seed`` is None.

    Raises:
        InvalidInputError: ``num_images`` is not a whole number of 1 or more, or the last seed is past the largest.
    """
    if isinstance(num_images, np.integer):
        num_images = int(num_images)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise InvalidInputError(f"num-images must be a whole number of 1 or more, not {num_images!r}")
    first = seed if seed is not None else secrets.randbelow(2**31)  # not the caller's global torch RNG
    if first + num_images - 1 >= 2**63:
        raise InvalidInputError(
            f"seed must be at most {2**63 - num_images} for {num_images} pictures (picture i uses seed+i), not {first}"
        )
    return [first + i for i in range(num_images)]


def disco_samples(
    model: UncondModel,
    clip,
    prompt: str | Sequence[str],
    settings: DiscoSettings | None = None,
    *,
    num_images: int = 1,
    init_image: Image.Image | str | os.PathLike | None = None,
    size: int | None = None,
    progress: ProgressCallback | None = None,
) -> Iterator[DiscoResult]:
    """Draw ``num_images`` pictures one after another (Disco Diffusion's ``n_batches``), picture i with the seed
    ``settings.seed + i``: each is the very picture :func:`disco_sample` draws with that seed, and each is yielded as
    soon as it is done, so that a caller can save it before the next one starts.

    Args:
        model, clip, prompt, init_image, size: as for :func:`disco_sample`.
        settings: :class:`DiscoSettings` (defaults if None); a seed of None: a random first seed.
        num_images: how many pictures.
        progress: called with ``(steps done, steps total)`` over all the pictures.

    Raises:
        InvalidInputError: at the call, before any picture is drawn: ``num_images`` below 1, seeds past the largest,
            an unusable setting; an unusable prompt, size or init image when the first picture starts.
    """
    if settings is not None and not isinstance(settings, DiscoSettings):
        raise InvalidInputError(f"settings must be a DiscoSettings, not {type(settings).__name__}")
    s = replace(settings or DiscoSettings())  # a copy: the caller's settings keep their seed
    s.check()
    first = disco_seeds(s.seed, num_images)[0]
    if progress is not None and not callable(progress):
        raise InvalidInputError(f"progress must be a function of (step, total), not {type(progress).__name__}")

    def overall(i: int) -> ProgressCallback | None:
        if progress is None:
            return None
        return lambda done, total: progress(i * total + done, num_images * total)

    def draw() -> Iterator[DiscoResult]:
        for i in range(num_images):
            one = replace(s, seed=first + i)
            yield disco_sample(model, clip, prompt, one, init_image=init_image, size=size, progress=overall(i))

    return draw()
