"""Text-to-image, image-to-image and inpainting on Taiyi-format Stable Diffusion checkpoints.

:func:`load_pipeline` returns a :class:`TaiyiPipeline`, which drives stock diffusers pipelines
(``StableDiffusionPipeline``, ``...Img2ImgPipeline``, ``...InpaintPipeline``, sharing one set of
weights) and adds what the Chinese models need: prompt normalisation, encoders of either kind with
long prompts, validated arguments, per-image seeds and the generation parameters of every image.

Seeds: image ``i`` of a run started at seed ``S`` is drawn from its own CPU generator seeded
``S + i``, so it equals a single-image run with seed ``S + i`` (the same noise on every device) up to
the float rounding of the batched UNet call (at most 1/255 per pixel); :meth:`TaiyiPipeline.rerender`
redraws an image within its batch, bit-identically.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from .backends import check_backend, resolve_backend, tune_cpu_allocator, use_openvino_unet, use_torch_unet
from .encoding import PromptCache, encode_prompts, window_count
from .encoding import logger as encoding_logger
from .errors import InvalidInputError
from .io import as_picture
from .loading import limit_threads, load_stable_diffusion, select_device, select_dtype
from .lora import LoadedLora, lora_extras, recorded_loras
from .metadata import GenerationParameters, pnginfo
from .models import DEFAULT_MODEL, KNOWN_MODELS, resolve_model, split_revision
from .prompt_editing import ScheduledPrompt
from .prompts import (
    WeightedPrompt,
    check_emphasis,
    parameters_line,
    prepare_prompt,
)
from .schedulers import DEFAULT_SCHEDULER, make_scheduler, sampling_kwargs, scheduler_spec

logger = logging.getLogger("taiyi")

MAX_SIDE = 2048  # pixels; larger sizes are refused (documented in the README)
MIN_SIDE = 64
MAX_STEPS = 1000  # the models' training timesteps: more steps cannot add anything
MAX_IMAGES = 64
MAX_SEED = 2**63 - 1
MAX_MASK_PADDING = 256  # pixels around an only-masked inpainting's box
DEFAULT_STEPS = 9  # with DEFAULT_SCHEDULER and DEFAULT_GUIDANCE_END: chosen by measured faithfulness (README)
# The fraction of the steps that run classifier-free guidance: the first ceil(end × steps) do, so at the
# default 9 steps the first 8 are guided and the last is one conditional call.
DEFAULT_GUIDANCE_END = 0.85
# Guidance rescale φ (Lin et al. 2023, diffusers' ``guidance_rescale``) for models whose noise schedule reaches
# pure noise (zero terminal SNR, like the embedded models): plain CFG over-saturates them. 1.0 was measured
# (README: faithfulness of the embedded models, two prompt sets); the paper used 0.7. Other models: 0, as stock.
ZERO_SNR_GUIDANCE_RESCALE = 1.0
_NETWORK_TAG_RE = re.compile(r"<(?:lora|lyco|hypernet):[^<>]+>", re.IGNORECASE)  # A1111's <lora:name:0.8>
_LORA_BACKEND = "LoRAs run on the torch backend; load the model with --backend torch to use them"

ProgressCallback = Callable[[int, int], None]  # (steps done, steps total)


@dataclass
class GenerationResult:
    """Images of one call with the parameters that reproduce each."""

    images: list[Image.Image]
    parameters: list[GenerationParameters]
    nsfw: list[bool] = field(default_factory=list)

    def save(self, output: str | os.PathLike | None = None, *, overwrite: bool = False, grid: bool = False):
        """Write every image as PNG with its ``parameters`` chunk (atomically); return the paths.

        Args:
            output: a ``.png`` path, an existing folder, or None for ``outputs/``.
            overwrite: replace existing files instead of refusing.
            grid: also write all images tiled into one ``<name>-grid.png``.
        """
        from .io import check_output_file, output_paths, save_png

        paths = output_paths(output, [p.seed for p in self.parameters])
        grid_at = grid_path(output, paths) if grid and len(self.images) > 1 else None
        if not overwrite:  # refuse before writing anything: never half a run
            for path in [*paths, *([grid_at] if grid_at is not None else [])]:
                check_output_file(path)
        for image, params, path in zip(self.images, self.parameters, paths, strict=True):
            save_png(image, path, pnginfo=pnginfo(params), overwrite=overwrite)
        if grid_at is not None:
            save_png(make_grid(self.images), grid_at, pnginfo=pnginfo(self.parameters[0]), overwrite=overwrite)
            paths.append(grid_at)
        return paths


def grid_path(output: str | os.PathLike | None, paths: list[Path]) -> Path:
    """Where ``--grid`` tiles a run's images: ``<name>-grid.png`` beside a named ``.png`` output, else beside the
    first image."""
    named = output is not None and os.fspath(output).lower().endswith(".png")
    base = Path(output) if named else paths[0]
    return base.with_name(f"{base.stem}-grid.png")


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images (all of one size) into a near-square grid."""
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def _plain(value):
    """A numpy scalar (``np.int64`` from ``np.arange``, ``np.float32`` from an array) as the Python number it
    holds; anything else unchanged, for the checks to judge."""
    return value.item() if isinstance(value, np.integer | np.floating) else value


def _check_range(name: str, value, low, high) -> None:
    """``low <= value <= high``; integer bounds also require an integer (a bool is not one)."""
    if isinstance(low, int) and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidInputError(f"{name} must be a whole number, not {value!r}")
    if not isinstance(value, int | float) or not (low <= value <= high):
        raise InvalidInputError(f"{name} must be between {low} and {high}, not {value!r}")


def validate_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        _validate_side(name, value)


def _validate_side(name: str, value: int) -> None:
    _check_range(name, value, MIN_SIDE, MAX_SIDE)
    if value % 8:
        raise InvalidInputError(f"{name} {value} is not a multiple of 8; try {max(8, round(value / 8) * 8)}")


def check_settings(
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float | None = None,
    guidance_end: float | None = None,
    guidance_rescale: float | None = None,
    scheduler: str = DEFAULT_SCHEDULER,
    seed: int | None = None,
    num_images: int = 1,
    width: int | None = None,
    height: int | None = None,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    normalize: bool = True,
    emphasis: str = "original",
    variation_seed: int | None = None,
    variation_strength: float = 0.0,
    hires_scale: float | None = None,
    hires_strength: float = 0.7,
    hires_steps: int = 0,
    hires_upscaler: str = "Latent",
    clip_skip: int = 1,
) -> None:
    """Judge the settings of a generate / edit / inpaint call that need no model, as the call will (None: the
    default), so that a command refuses them before it spends time loading one.

    Raises:
        InvalidInputError: the first setting the call would refuse.
    """
    _check_range("steps", steps, 1, MAX_STEPS)
    if guidance is not None:
        if isinstance(guidance, int | float) and guidance < 0:
            raise InvalidInputError(f"guidance must be 0 or more, not {guidance} (7.5 is usual; 1 turns it off)")
        _check_range("guidance", guidance, 0.0, 100.0)
    check_guidance_end(guidance_end)
    if guidance_rescale is not None:
        check_guidance_rescale(guidance_rescale)
    _check_range("num_images", num_images, 1, MAX_IMAGES)
    sampling_kwargs(scheduler, steps)  # an unknown sampler, or more steps than it can take
    if seed is not None:
        seeds_for(seed, num_images)
    for name, value in (("width", width), ("height", height)):
        if value is not None:  # each side alone: the other may be the model's
            _validate_side(name, value)
    check_emphasis(emphasis)
    check_variation(variation_seed, variation_strength, num_images)
    check_clip_skip(clip_skip)
    hires = check_hires(hires_scale, hires_strength, hires_steps, hires_upscaler, steps=steps)
    if hires is not None and width is not None and height is not None:
        validate_size(*hires.size(width, height))
    if prompt is not None:  # its words and weights
        prepare_prompt(prompt, normalize=normalize, emphasis=emphasis, steps=steps)
    if negative_prompt is not None:
        prepare_prompt(
            negative_prompt,
            normalize=normalize,
            emphasis=emphasis,
            what="negative prompt",
            required=False,
            steps=steps,
        )


def check_clip_skip(clip_skip: int, layers: int | None = None) -> int:
    """A1111's "Clip skip": a whole number from 1 (the last layer) to the text encoder's layer count (``layers``;
    A1111's 12 when it is not known yet)."""
    if isinstance(clip_skip, int) and not isinstance(clip_skip, bool) and clip_skip < 0:  # ComfyUI's count
        raise InvalidInputError(
            f"clip skip counts from the last layer as A1111's, 1 and up, not {clip_skip}: ComfyUI's "
            f"stop_at_clip_layer {clip_skip} is clip skip {-clip_skip}"
        )
    _check_range("clip skip", clip_skip, 1, layers or 12)
    return clip_skip


def check_variation(variation_seed: int | None, strength: float, num_images: int = 1) -> None:
    """A1111's variation seed and strength: a seed (or None) and a strength in [0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 <= strength <= 1:
        raise InvalidInputError(
            f"variation strength must be between 0 and 1 (0: the seed's own picture), not {strength!r}"
        )
    if variation_seed is not None:
        seeds_for(variation_seed, num_images)


# A1111's hires upscalers taiyi runs: latent ones as (torch interpolation mode, antialias), picture ones as PIL filters
HIRES_UPSCALERS: dict[str, tuple] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
    "Lanczos": (Image.LANCZOS,),
    "Nearest": (Image.NEAREST,),
}
MAX_HIRES_SCALE = 4.0


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix: the second pass's upscale factor, denoising strength, steps (0: the first pass's) and
    upscaler (a key of :data:`HIRES_UPSCALERS`)."""

    scale: float
    strength: float
    steps: int
    upscaler: str

    @property
    def latent(self) -> bool:
        return self.upscaler.startswith("Latent")

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size: each side × the scale, rounded down to a multiple of 8 (A1111's rule)."""
        return int(width * self.scale) // 8 * 8, int(height * self.scale) // 8 * 8


def check_hires(scale, strength, steps_2: int, upscaler: str, *, steps: int) -> HiresFix | None:
    """The hires fix these settings ask for (None when ``scale`` is None), judged as A1111 would take them."""
    if scale is None:
        return None
    _check_number("hires scale", scale)
    if not 1 <= scale <= MAX_HIRES_SCALE:
        raise InvalidInputError(
            f"hires scale must be between 1 and {MAX_HIRES_SCALE:g} (2 doubles each side), not {scale}"
        )
    _check_range("hires steps", steps_2, 0, MAX_STEPS)
    check_strength(strength, steps_2 or steps)
    by_name = {name.lower(): name for name in HIRES_UPSCALERS}
    name = by_name.get(upscaler.strip().lower()) if isinstance(upscaler, str) else None
    if name is None:
        raise InvalidInputError(f"hires upscaler must be one of {', '.join(HIRES_UPSCALERS)}, not {upscaler!r}")
    return HiresFix(float(scale), float(strength), int(steps_2), name)


class _HiresProgress:
    """One progress count over both passes: the second pass's steps follow the first's."""

    def __init__(self, progress: ProgressCallback):
        self.progress, self.offset, self.first_total = progress, 0, 0

    def second_pass(self) -> None:
        self.offset = self.first_total

    def __call__(self, done: int, total: int) -> None:
        if not self.offset:
            self.first_total = total
        self.progress(self.offset + done, self.offset + total)


def variation_noise(sd, generators, variation_seeds, strength, width, height, embeds) -> torch.Tensor:
    """The starting noise of a batch with A1111's variation seeds: row ``i`` drawn from ``generators[i]`` exactly as
    diffusers draws it (so the generator goes on to the sampler's noise as it would), then moved toward the noise of
    ``variation_seeds[i]`` by ``strength`` along the great circle between them (A1111's slerp, over the whole latent).
    """
    shape = (1, sd.unet.config.in_channels, height // sd.vae_scale_factor, width // sd.vae_scale_factor)
    rows = []
    for generator, other in zip(generators, variation_seeds, strict=True):
        own = torch.randn(shape, generator=generator, dtype=embeds.dtype)  # diffusers' randn_tensor, row by row
        away = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(other), dtype=embeds.dtype)
        rows.append(slerp(strength, own, away))
    return torch.cat(rows).to(embeds.device)  # (B, 4, h, w)


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), computed in float64; linear where they are
    nearly parallel (as A1111's)."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    dot = torch.dot(a64 / a64.norm(), b64 / b64.norm()).clamp(-1, 1)
    if dot > 0.9995:
        out = (1 - t) * a64 + t * b64
    else:
        omega = torch.acos(dot)
        out = (torch.sin((1 - t) * omega) * a64 + torch.sin(t * omega) * b64) / torch.sin(omega)
    return out.reshape(a.shape).to(a.dtype)


def check_guidance_rescale(value: float) -> float:
    """A guidance rescale φ in [0, 1], as a float."""
    if isinstance(value, bool):
        raise InvalidInputError(f"guidance rescale must be a number between 0 and 1 (0: plain CFG), not {value}")
    _check_range("guidance rescale", value, 0.0, 1.0)
    return float(value)


def seeds_for(seed: int | None, n: int) -> list[int]:
    """The per-image seeds of a run: ``S, S+1, ...``; a random ``S`` when none is given."""
    if seed is None:
        seed = secrets.randbelow(2**32)
    if isinstance(seed, int) and not isinstance(seed, bool) and seed < 0:  # A1111 and ComfyUI users type -1
        raise InvalidInputError(f"seed must be 0 or more, not {seed}; for a random seed give none (no --seed)")
    _check_range("seed", seed, 0, MAX_SEED - n)
    return [seed + i for i in range(n)]


def _mask_picture(mask: Image.Image | str | os.PathLike | np.ndarray) -> tuple[Image.Image, bool]:
    """An inpainting mask in mode L, and whether it had transparent pixels.

    A mask painted on a transparent layer is read as it looks: a transparent pixel is unpainted, black, whatever colour
    it hides (editors store white there too, which read as L would redraw the whole picture).
    """
    rgba = as_picture(mask, "RGBA", "mask")
    transparent = rgba.getextrema()[3][0] < 255
    if transparent:
        rgba = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return rgba.convert("L"), transparent


def feather_mask(mask: Image.Image, radius: float) -> np.ndarray:
    """Blend weights (H, W) in [0, 1]: 0 everywhere outside the mask, softened inward near its edge."""
    binary = (np.asarray(mask.convert("L"), dtype=np.float32) >= 128).astype(np.float32)
    if radius <= 0:
        return binary
    blurred = np.asarray(Image.fromarray((binary * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius)))
    return binary * blurred.astype(np.float32) / 255.0


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """A1111's "only masked" crop: the mask's bounding box grown by ``padding``, then widened or heightened to
    ``width``:``height``'s shape, all within the picture."""
    x1, y1, x2, y2 = mask.getbbox()
    x1, y1 = max(0, x1 - padding), max(0, y1 - padding)
    x2, y2 = min(mask.width, x2 + padding), min(mask.height, y2 + padding)
    ratio = width / height
    w, h = x2 - x1, y2 - y1
    if w / h < ratio:  # too tall: widen
        grow = min(mask.width, round(h * ratio)) - w
        x1 = max(0, x1 - grow // 2)
        x2 = min(mask.width, x1 + w + grow)
        x1 = max(0, x2 - (w + grow))
    else:  # too wide: heighten
        grow = min(mask.height, round(w / ratio)) - h
        y1 = max(0, y1 - grow // 2)
        y2 = min(mask.height, y1 + h + grow)
        y1 = max(0, y2 - (h + grow))
    return x1, y1, x2, y2


def _check_progress(progress) -> None:
    if progress is not None and not callable(progress):
        raise InvalidInputError(f"progress must be a function of (step, total), not {type(progress).__name__}")


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"{name} must be a number, not {value!r}")


@dataclass(frozen=True)
class _Job:
    """The validated settings one generate / edit / inpaint call shares across its images."""

    prompt: str  # as given (recorded in the metadata)
    negative_prompt: str
    # normalised and read with emphasis (and for prompt editing: a ScheduledPrompt), one per image
    prompts: list[str | WeightedPrompt | ScheduledPrompt]
    negatives: list[str | WeightedPrompt | ScheduledPrompt]
    steps: int
    guidance: float
    scheduler: str
    normalize: bool
    guidance_end: float
    emphasis: str = "original"
    clip_skip: int = 1


class TaiyiPipeline:
    """A loaded Stable Diffusion model (Chinese, bilingual or English text encoder) on one device.

    Prefer :func:`load_pipeline` to constructing this directly. ``sd`` is the stock
    ``diffusers.StableDiffusionPipeline`` holding the weights; edit and inpaint pipelines share them.
    """

    def __init__(self, sd, *, model: str, device: torch.device, dtype: torch.dtype, backend: str = "torch"):
        self.sd = sd
        self.model = model
        self.device = device
        self.dtype = dtype
        self.backend = backend  # where the UNet runs: "torch" or "openvino" (see taiyi.backends)
        self.backend_chosen = False  # True when backend "auto" chose it: a LoRA then moves the UNet to torch
        self._base_scheduler_config = dict(sd.scheduler.config)
        self._pipelines: dict[type, object] = {}
        self.loras: list[LoadedLora] = []  # in the order applied
        self.prompt_cache = PromptCache()
        if device.type == "cpu":
            # oneDNN convolutions run the VAE 1.1× faster in channels-last on CPU (README, "Measuring speed");
            # the UNet is slower that way, so it stays contiguous.
            sd.vae.to(memory_format=torch.channels_last)
            tune_cpu_allocator()  # freed activations stay in the heap: no page faults per UNet call

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0, *, allow_pickle: bool = False) -> TaiyiPipeline:
        """Apply a LoRA file (diffusers, peft or Kohya/A1111 format) on top of those already applied.

        Text-to-image, edit and inpaint all draw with it; every image records it (A1111 ``Lora hashes``).

        Args:
            path: a ``.safetensors`` LoRA file, or a folder holding ``pytorch_lora_weights.safetensors``
                (e.g. a ``taiyi train lora`` run); ``"FILE:SCALE"`` is read as :func:`taiyi.lora.parse_lora_spec`.
            scale: its strength (1.0: as trained; 0: off); ignored when ``path`` carries one.
            allow_pickle: accept a pickled (``.bin``/``.pt``/``.ckpt``) file.

        Raises:
            InvalidInputError: the file is missing, pickled, or does not fit this model.
        """
        from .lora import activate_loras, apply_loras, parse_lora_spec

        if self.backend != "torch" and not self.backend_chosen:
            raise InvalidInputError(_LORA_BACKEND)
        spec = parse_lora_spec(path)
        if spec.path == Path(os.fspath(path)):  # no ":SCALE" in it
            spec = parse_lora_spec((spec.path, scale))
        loras = apply_loras(self.sd, [spec], model=self.model, allow_pickle=allow_pickle, start=len(self.loras))
        if self.backend != "torch":  # chosen by "auto": the converted UNet has no LoRA in it
            use_torch_unet(self.sd.unet)
            self.backend = "torch"
            logger.info("the UNet runs in PyTorch from now on: LoRAs are applied there")
        self.loras += loras
        activate_loras(self.sd, self.loras)
        return self

    def unload_loras(self) -> None:
        """Remove every applied LoRA: the pipeline draws with its own weights again."""
        if self.loras:
            self.sd.unload_lora_weights()
            self.loras = []

    @property
    def default_size(self) -> int:
        return self.sd.unet.config.sample_size * self.sd.vae_scale_factor

    @property
    def is_inpainting_model(self) -> bool:
        return self.sd.unet.config.in_channels == 9

    def _sub_pipeline(self, cls):
        """An edit/inpaint pipeline sharing this pipeline's weights (built once per class)."""
        if cls not in self._pipelines:
            components = dict(self.sd.components)
            # Without a checker, say so: diffusers would otherwise warn on every construction.
            components["requires_safety_checker"] = components.get("safety_checker") is not None
            pipe = cls(**components)
            pipe.set_progress_bar_config(disable=True)
            self._pipelines[cls] = pipe
        return self._pipelines[cls]

    def _require_plain_unet(self, task: str) -> None:
        if self.is_inpainting_model:
            raise InvalidInputError(
                f"{self.model} is an inpainting model (9-channel UNet); it cannot run {task}, use taiyi inpaint"
            )

    def _params(
        self,
        prompt: str,
        negative: str,
        steps: int,
        guidance: float,
        scheduler: str,
        normalize: bool,
        width: int,
        height: int,
        strength: float | None,
        seeds: list[int],
        guidance_end: float = 1.0,
        guidance_rescale: float = 0.0,
        emphasis: str = "original",
    ) -> list[GenerationParameters]:
        base = GenerationParameters(
            prompt=prompt,
            negative_prompt=negative,
            steps=steps,
            scheduler=scheduler,
            guidance=guidance,
            guidance_end=guidance_end,
            guidance_rescale=guidance_rescale,
            width=width,
            height=height,
            model=self.model,
            strength=strength,
            batch_size=len(seeds),
            dtype=str(self.dtype).removeprefix("torch."),
            normalize=normalize,
            emphasis=emphasis,
            extras=lora_extras(self.loras),
        )
        return [replace(base, seed=s, batch_pos=i) for i, s in enumerate(seeds)]

    def _job(
        self,
        prompt,
        negative_prompt,
        steps,
        guidance,
        scheduler,
        num_images,
        normalize,
        guidance_end,
        emphasis,
        clip_skip=1,
    ) -> _Job:
        """Validate the arguments every task shares; the prompt is normalised and read with emphasis once here."""
        if not isinstance(normalize, bool):  # "no" would be true, and normalise
            raise InvalidInputError(f"normalize must be True or False, not {normalize!r}")
        emphasis = check_emphasis(emphasis)
        clip_skip = check_clip_skip(_plain(clip_skip), self.sd.text_encoder.config.num_hidden_layers)
        guidance = self.default_guidance if guidance is None else guidance
        guidance_end = check_guidance_end(guidance_end)
        scheduler = scheduler_spec(scheduler).name  # "Euler a" or a diffusers class name: recorded as taiyi's name
        prompts, negatives = self._prepare(
            prompt,
            negative_prompt,
            steps=steps,
            guidance=guidance,
            scheduler=scheduler,
            num_images=num_images,
            normalize=normalize,
            emphasis=emphasis,
        )
        negative = negative_prompt or ""
        return _Job(
            prompt, negative, prompts, negatives, steps, guidance, scheduler, normalize, guidance_end, emphasis,
            clip_skip,
        )  # fmt: skip

    def _draw(
        self, job: _Job, pipe, seed, progress, *, size, strength=None, variation=(None, 0.0), hires=None, **call_kwargs
    ) -> GenerationResult:
        """Run one task's batch (seeds ``seed, seed+1, ...``) and record each image's parameters at ``size``;
        ``variation`` is ``(variation seed, strength)`` and ``hires`` a :class:`HiresFix` (text-to-image)."""
        _check_progress(progress)
        seeds = seeds_for(seed, len(job.prompts))
        variation_seeds = seeds_for(variation[0], len(seeds)) if variation[1] > 0 else None
        if variation_seeds:  # A1111: a variation batch keeps one seed, its variation seeds count up
            seeds = [seeds[0]] * len(seeds)
        first_pass = {}
        if hires is not None:  # the first pass hands over latents or pictures; the second redraws them larger
            first_pass = {"output_type": "latent" if hires.latent else "pil"}
            progress = _HiresProgress(progress) if progress is not None else None
        images, nsfw = self._run(
            pipe,
            prompts=job.prompts,
            negatives=job.negatives,
            steps=job.steps,
            guidance=job.guidance,
            guidance_end=job.guidance_end,
            scheduler=job.scheduler,
            seeds=seeds,
            progress=progress,
            variation=(variation_seeds, variation[1]) if variation_seeds else None,
            clip_skip=job.clip_skip,
            **({"strength": strength} if strength is not None else {}),
            **first_pass,
            **call_kwargs,
        )
        if hires is not None:
            images, nsfw = self._hires_pass(job, images, seeds, hires, progress, size)
            strength = hires.strength
        params = self._params(
            job.prompt,
            job.negative_prompt,
            job.steps,
            job.guidance,
            job.scheduler,
            job.normalize,
            size[0],
            size[1],
            strength,
            seeds,
            job.guidance_end,
            call_kwargs.get("guidance_rescale", 0.0),
            job.emphasis,
        )
        if job.clip_skip > 1:
            params = [replace(p, clip_skip=job.clip_skip) for p in params]
        if variation_seeds:
            params = [
                replace(p, variation_seed=v, variation_strength=variation[1])
                for p, v in zip(params, variation_seeds, strict=True)
            ]
        if hires is not None:
            params = [replace(p, hires_scale=hires.scale, hires_steps=hires.steps, hires_upscaler=hires.upscaler)
                      for p in params]  # fmt: skip
        return GenerationResult(images, params, nsfw)

    def _hires_pass(self, job: _Job, first, seeds, hires: HiresFix, progress, size):
        """A1111's second pass: the first pass's latents (or pictures) upscaled to ``hires.size(*size)`` and redrawn
        by image-to-image at ``hires.strength``, each image from a generator seeded as its first pass was."""
        from diffusers import StableDiffusionImg2ImgPipeline

        width, height = hires.size(*size)
        if hires.latent:
            mode, antialias = HIRES_UPSCALERS[hires.upscaler]
            f = self.sd.vae_scale_factor
            upscaled = torch.nn.functional.interpolate(
                first, size=(height // f, width // f), mode=mode, antialias=antialias
            )  # (B, C, H/f, W/f), handed over as latents
        else:
            upscaled = [image.resize((width, height), HIRES_UPSCALERS[hires.upscaler][0]) for image in first]
        if progress is not None:
            progress.second_pass()
        return self._run(
            self._sub_pipeline(StableDiffusionImg2ImgPipeline),
            first_pass=job.steps,
            prompts=job.prompts,
            negatives=job.negatives,
            steps=hires.steps or job.steps,
            guidance=job.guidance,
            guidance_end=job.guidance_end,
            scheduler=job.scheduler,
            seeds=seeds,
            progress=progress,
            image=upscaled,
            strength=hires.strength,
            clip_skip=job.clip_skip,
        )

    def _prepare(
        self,
        prompt: str,
        negative_prompt: str | None,
        *,
        steps: int,
        guidance: float,
        scheduler: str,
        num_images: int,
        normalize: bool,
        emphasis: str = "original",
    ) -> tuple[list[str | WeightedPrompt | ScheduledPrompt], list[str | WeightedPrompt | ScheduledPrompt]]:
        check_settings(steps=steps, guidance=guidance, scheduler=scheduler, num_images=num_images)
        text = prepare_prompt(prompt, normalize=normalize, emphasis=emphasis, steps=steps)
        if pasted := parameters_line(prompt):  # the picture's parameters would not read back as this prompt
            raise InvalidInputError(
                f"the prompt holds a line starting {pasted!r}, as pasted generation parameters do; give the prompt "
                "alone, the negative prompt and settings separately (--negative-prompt, --steps …), or redraw the "
                "picture with --from IMAGE"
            )
        negative = negative_prompt or ""
        negative_read = prepare_prompt(
            negative, normalize=normalize, emphasis=emphasis, what="negative prompt", required=False, steps=steps
        )
        if tags := _NETWORK_TAG_RE.findall(prompt):  # A1111 loads these; here they would be drawn as words
            logger.warning(
                "A1111's network tags are not read from the prompt: %s is drawn as words; load a LoRA with --lora "
                "FILE:SCALE (lora=)",
                " ".join(dict.fromkeys(tags)),
            )
        if negative.strip() and guidance <= 1:  # diffusers drops it without a word
            logger.warning(
                "the negative prompt has no effect at guidance %s: it steers only when guidance is above 1", guidance
            )
        return [text] * num_images, [negative_read] * num_images

    def _run(
        self,
        sd,
        *,
        prompts,
        negatives,
        steps,
        guidance,
        scheduler,
        seeds,
        progress,
        guidance_end=1.0,
        variation=None,
        clip_skip=1,
        first_pass=None,
        **kwargs,
    ):
        limit_threads()
        sd.scheduler = make_scheduler(scheduler, self._base_scheduler_config)
        tag = tuple((lora.hash, lora.scale) for lora in self.loras)  # LoRAs change the text encoder's output
        # A1111's prompt editing: the prompts of step 1 now, of each later step in the callback; an edit's run takes
        # int(steps × strength) steps, and the hires fix's second pass (``first_pass``: the first pass's steps) counts
        # its steps as A1111 since 1.6.
        scheduled = any(isinstance(x, ScheduledPrompt) for x in (*prompts, *negatives))
        planned = min(int(steps * kwargs["strength"]), steps) if "strength" in kwargs else steps

        said: set[str] = set()

        def once(record: logging.LogRecord) -> bool:  # the encoder's warnings once a run, not once a step
            new = (message := record.getMessage()) not in said
            said.add(message)
            return new

        def encode(step: int):
            at = [x.item_at(step, planned, first_pass) if isinstance(x, ScheduledPrompt) else x
                  for x in (*prompts, *negatives)]  # fmt: skip
            encoding_logger.addFilter(once)
            try:
                return encode_prompts(
                    sd, at[: len(prompts)], at[len(prompts) :], self.device, guidance, cache=self.prompt_cache,
                    cache_tag=tag, clip_skip=clip_skip,
                )  # fmt: skip
            finally:
                encoding_logger.removeFilter(once)

        embeds, negative_embeds = encode(1)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        if variation is not None:  # text-to-image: the starting noise, drawn here from the same generators
            kwargs["latents"] = variation_noise(sd, generators, *variation, kwargs["width"], kwargs["height"], embeds)
        # Guidance stops after the first ``guidance_end`` of the steps: diffusers' documented way of
        # turning it off mid-run (keep the conditional half of every CFG-doubled tensor, guidance scale 0).
        halved = [name for name in _CFG_DOUBLED if name in sd._callback_tensor_inputs]
        stop_cfg = guidance_end < 1.0 and guidance > 1.0

        def callback(pipe, i, t, cb_kwargs):  # noqa: ARG001 (diffusers' signature)
            total = pipe._num_timesteps
            if stop_cfg and pipe.do_classifier_free_guidance and i + 1 == guidance_steps(guidance_end, total):
                for name in halved:
                    cb_kwargs[name] = cb_kwargs[name].chunk(2)[1]
                pipe._guidance_scale = 0.0
            if scheduled and i + 2 <= total:  # the next step's prompts ([unconditional; conditional] while guiding)
                # PLMS (pndm) makes one call more than its steps, at their start: its first two calls are step 1.
                pos, neg = encode(max(1, i + 2 - (total - planned)))
                cb_kwargs["prompt_embeds"] = torch.cat([neg, pos]) if pipe.do_classifier_free_guidance else pos
            if progress is not None:
                progress(i + 1, total)
            return cb_kwargs

        with torch.inference_mode():
            out = sd(
                prompt_embeds=embeds,
                negative_prompt_embeds=negative_embeds,
                guidance_scale=guidance,
                generator=generators,
                callback_on_step_end=callback if stop_cfg or scheduled or progress is not None else None,
                callback_on_step_end_tensor_inputs=[
                    *(halved if stop_cfg else ["latents"]),
                    *(["prompt_embeds"] if scheduled and not stop_cfg else []),
                ],
                **sampling_kwargs(scheduler, steps),
                **kwargs,
            )
        nsfw = [bool(x) for x in (out.nsfw_content_detected or [False] * len(out.images))]
        for i, (image, flagged) in enumerate(zip(out.images, nsfw, strict=True)):
            if flagged:
                logger.warning(
                    "image %d (seed %d) was blanked by the checkpoint's safety checker; pass --no-safety-checker "
                    "(safety_checker=False) to keep it",
                    i,
                    seeds[i],
                )
            elif not np.asarray(image).any():
                logger.warning(
                    "image %d (seed %d) is entirely black: in float16 the VAE can overflow; try --dtype float32 "
                    "or bfloat16",
                    i,
                    seeds[i],
                )
        return out.images, nsfw

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        steps: int = DEFAULT_STEPS,
        guidance: float | None = None,
        guidance_end: float | None = None,
        guidance_rescale: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        width: int | None = None,
        height: int | None = None,
        scheduler: str = DEFAULT_SCHEDULER,
        normalize: bool = True,
        emphasis: str = "original",
        clip_skip: int = 1,
        variation_seed: int | None = None,
        variation_strength: float = 0.0,
        hires_scale: float | None = None,
        hires_strength: float = 0.7,
        hires_steps: int = 0,
        hires_upscaler: str = "Latent",
        progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        """Text-to-image.

        Args:
            prompt: Chinese, English or mixed description of the image.
            negative_prompt: what to steer away from.
            steps: denoising steps (1–1000).
            guidance: classifier-free guidance scale (≥ 0; ≤ 1 disables it); None takes the model's default.
            guidance_end: in (0, 1]; guidance runs on the first ``ceil(guidance_end × steps)`` steps and the rest
                are single conditional UNet calls (about half the cost). None takes :data:`DEFAULT_GUIDANCE_END`.
            guidance_rescale: φ in [0, 1], diffusers' ``guidance_rescale``: the guided prediction's spread is
                pulled back toward the conditional one's (0: plain CFG). None takes the model's default
                (:attr:`default_guidance_rescale`).
            seed: seed of the first image; image ``i`` uses ``seed + i``. None picks one at random.
            num_images: images to draw in one batch.
            width: multiple of 8 in [64, 2048]; None takes the model's native size. Same for ``height``.
            scheduler: one of :data:`taiyi.schedulers.SCHEDULERS`.
            normalize: apply :func:`taiyi.prompts.normalize_prompt` to prompt and negative prompt.
            emphasis: how ``(words:1.3)``, ``(words)``, ``[words]`` and ``BREAK`` are read, as A1111's option of that
                name: ``"original"`` (weighted, A1111's default), ``"no-norm"``, or ``"none"`` (they are words); see
                :func:`taiyi.prompts.read_emphasis`.
            clip_skip: A1111's "Clip skip": 1 (the default) reads the text encoder's last layer, 2 the one before
                (for CLIP through its final LayerNorm, as A1111 and diffusers' ``clip_skip=1``), and so on.
            variation_seed: A1111's variation seed: image ``i`` starts from ``seed``'s noise (every image of a
                variation batch keeps the seed, as in A1111) moved toward the noise of ``variation_seed + i`` by
                ``variation_strength`` (spherical interpolation); None with a strength picks one at random.
            variation_strength: in [0, 1]; 0 (the default) draws the seed's own picture, 1 the variation seed's
                noise (with the seed's sampler noise).
            hires_scale: A1111's hires fix: draw at ``width``×``height``, upscale by this factor (1–4; the sides
                rounded down to multiples of 8) and redraw with image-to-image at ``hires_strength``; None: off.
            hires_strength: the second pass's denoising strength, in (0, 1] (A1111's "Denoising strength").
            hires_steps: the second pass's steps (``int(hires_steps × hires_strength)`` are run, as for an edit);
                0 takes ``steps``.
            hires_upscaler: one of :data:`HIRES_UPSCALERS` (A1111's names): the latent upscalers resize the first
                pass's latents, ``Lanczos`` and ``Nearest`` its decoded picture.
            progress: called with ``(step, total)`` after every denoising step (of both passes with the hires fix).
        """
        self._require_plain_unet("text-to-image")
        variation_seed, variation_strength = map(_plain, (variation_seed, variation_strength))
        check_variation(variation_seed, variation_strength, num_images)
        hires = check_hires(hires_scale, hires_strength, hires_steps, hires_upscaler, steps=steps)
        steps, guidance, guidance_end, guidance_rescale, seed, num_images, width, height = map(
            _plain, (steps, guidance, guidance_end, guidance_rescale, seed, num_images, width, height)
        )
        width = self.default_size if width is None else width  # 0 is refused, not taken as the default
        height = self.default_size if height is None else height
        validate_size(width, height)
        job = self._job(
            prompt, negative_prompt, steps, guidance, scheduler, num_images, normalize, guidance_end, emphasis,
            clip_skip,
        )  # fmt: skip
        rescale = self._guidance_rescale(guidance_rescale)
        if hires is not None:
            validate_size(*hires.size(width, height))
        return self._draw(
            job, self.sd, seed, progress, size=(width, height), width=width, height=height, guidance_rescale=rescale,
            variation=(variation_seed, float(variation_strength)), hires=hires,
        )  # fmt: skip

    def generate_many(
        self,
        prompts: list[str],
        *,
        negative_prompts: list[str] | None = None,
        seeds: list[int | None] | None = None,
        steps: int = DEFAULT_STEPS,
        guidance: float | None = None,
        guidance_end: float | None = None,
        guidance_rescale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        scheduler: str = DEFAULT_SCHEDULER,
        normalize: bool = True,
        emphasis: str = "original",
        clip_skip: int = 1,
        progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        """Text-to-image for independent rows in one batched call (a server batching requests).

        Row ``i`` draws one image from ``prompts[i]`` with its own generator seeded ``seeds[i]``, so
        it equals ``generate(prompts[i], seed=seeds[i])`` up to float rounding of the batched UNet
        call. Its parameters record it as a single image: re-rendering it is equal within rounding,
        not bit-identical.

        Args:
            prompts: one prompt per image.
            negative_prompts: one per image (default: none).
            seeds: one per image; None entries get a random seed.
            Other arguments as :meth:`generate`; they are shared by every row.
        """
        self._require_plain_unet("text-to-image")
        if isinstance(prompts, str):  # its characters would be taken for the rows
            raise InvalidInputError("prompts must be a list of prompts, one per image; for one prompt use generate")
        steps, guidance, guidance_end, guidance_rescale, width, height = map(
            _plain, (steps, guidance, guidance_end, guidance_rescale, width, height)
        )
        _check_progress(progress)
        emphasis = check_emphasis(emphasis)
        n = len(prompts)
        _check_range("rows", n, 1, MAX_IMAGES)
        negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * n
        seeds = list(seeds) if seeds is not None else [None] * n
        if len(negative_prompts) != n or len(seeds) != n:
            raise InvalidInputError("prompts, negative_prompts and seeds must have the same length")
        guidance = self.default_guidance if guidance is None else guidance
        guidance_end = check_guidance_end(guidance_end)
        scheduler = scheduler_spec(scheduler).name
        rescale = self._guidance_rescale(guidance_rescale)
        width = self.default_size if width is None else width  # 0 is refused, not taken as the default
        height = self.default_size if height is None else height
        validate_size(width, height)
        texts, negatives = [], []
        for prompt, negative in zip(prompts, negative_prompts, strict=True):
            text, neg = self._prepare(
                prompt,
                negative,
                steps=steps,
                guidance=guidance,
                scheduler=scheduler,
                num_images=1,
                normalize=normalize,
                emphasis=emphasis,
            )
            texts += text
            negatives += neg
        seeds = [seeds_for(_plain(s), 1)[0] for s in seeds]
        # Rows run together only with rows of as many encoder windows (BREAKs, CLIP's long prompts): in one call the
        # shorter would be padded with empty windows, and drawn otherwise than alone.
        groups: dict[object, list[int]] = {}
        for i, (text, negative) in enumerate(zip(texts, negatives, strict=True)):
            if isinstance(text, ScheduledPrompt) or isinstance(negative, ScheduledPrompt):
                groups[("edited", i)] = [i]  # its windows may change with the step: a call of its own
                continue
            windows = max(window_count(self.sd, text), window_count(self.sd, negative) if guidance > 1 else 1)
            groups.setdefault(windows, []).append(i)
        images, nsfw = [None] * n, [False] * n
        for rows in groups.values():
            drawn, flagged = self._run(
                self.sd,
                prompts=[texts[i] for i in rows],
                negatives=[negatives[i] for i in rows],
                steps=steps,
                guidance=guidance,
                guidance_end=guidance_end,
                scheduler=scheduler,
                seeds=[seeds[i] for i in rows],
                progress=progress,
                width=width,
                height=height,
                guidance_rescale=rescale,
            )
            for i, image, flag in zip(rows, drawn, flagged, strict=True):
                images[i], nsfw[i] = image, flag
        params = []
        for p, neg, s in zip(prompts, negative_prompts, seeds, strict=True):  # one seed each: one parameter set
            params += self._params(
                p, neg or "", steps, guidance, scheduler, normalize, width, height, None, [s], guidance_end, rescale,
                emphasis,
            )  # fmt: skip
        return GenerationResult(images, params, nsfw)

    @property
    def default_guidance(self) -> float:
        model = split_revision(self.model)[0]  # ID@REVISION: the repo's own model card
        info = next((m for m in KNOWN_MODELS.values() if model in (m.repo_id, m.name)), None)
        return info.guidance if info and info.guidance else 7.5

    @property
    def default_guidance_rescale(self) -> float:
        """:data:`ZERO_SNR_GUIDANCE_RESCALE` when the model's noise schedule has zero terminal SNR, else 0."""
        return ZERO_SNR_GUIDANCE_RESCALE if self._base_scheduler_config.get("rescale_betas_zero_snr") else 0.0

    def _guidance_rescale(self, value: float | None) -> float:
        if value is None:
            return self.default_guidance_rescale
        return check_guidance_rescale(value)

    def _init_image(self, image: Image.Image | str | os.PathLike, width: int | None, height: int | None):
        image = as_picture(image, "RGB", "image")
        # By default the picture's own size, in multiples of 8, scaled down to fit when a side is over the limit
        chosen = width is not None or height is not None
        fit = 1.0 if chosen else min(1.0, MAX_SIDE / max(image.width, image.height))
        width = max(MIN_SIDE, int(image.width * fit) // 8 * 8) if width is None else width
        height = max(MIN_SIDE, int(image.height * fit) // 8 * 8) if height is None else height
        if not chosen and abs(math.log((width / height) / (image.width / image.height))) > math.log(1.1):
            # a side below the least size raised to it: the picture would come back distorted without a word
            logger.warning(
                "the image is %dx%d; drawn at %dx%d, which changes its shape (sides are %d to %d); crop it first "
                "to keep its proportions",
                image.width, image.height, width, height, MIN_SIDE, MAX_SIDE,
            )  # fmt: skip
        elif fit < 1:
            logger.info(
                "the image is %dx%d; drawn at %dx%d (sides are at most %d; -W/-H choose the size)",
                image.width, image.height, width, height, MAX_SIDE,
            )  # fmt: skip
        validate_size(width, height)
        return image, width, height

    def edit(
        self,
        image: Image.Image | str | os.PathLike,
        prompt: str,
        *,
        strength: float = 0.6,
        negative_prompt: str | None = None,
        steps: int = DEFAULT_STEPS,
        guidance: float | None = None,
        guidance_end: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        width: int | None = None,
        height: int | None = None,
        scheduler: str = DEFAULT_SCHEDULER,
        normalize: bool = True,
        emphasis: str = "original",
        clip_skip: int = 1,
        progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        """Image-to-image: redraw ``image`` following ``prompt``.

        Args:
            image: the picture to edit (PIL image, path, or uint8 numpy array (H, W[, C])); resized to
                ``width``×``height`` (default: its own size rounded down to a multiple of 8).
            strength: in (0, 1]; how much is redrawn (1 ignores the input). ``int(steps * strength)``
                steps are run.
            Other arguments as :meth:`generate`.
        """
        from diffusers import StableDiffusionImg2ImgPipeline

        self._require_plain_unet("image-to-image")
        strength, steps, guidance, guidance_end, seed, num_images, width, height = map(
            _plain, (strength, steps, guidance, guidance_end, seed, num_images, width, height)
        )
        check_strength(strength, steps)
        job = self._job(
            prompt, negative_prompt, steps, guidance, scheduler, num_images, normalize, guidance_end, emphasis,
            clip_skip,
        )  # fmt: skip
        image, width, height = self._init_image(image, width, height)
        init = image.resize((width, height), Image.LANCZOS) if image.size != (width, height) else image
        pipe = self._sub_pipeline(StableDiffusionImg2ImgPipeline)
        return self._draw(job, pipe, seed, progress, size=(width, height), strength=strength, image=init)

    def inpaint(
        self,
        image: Image.Image | str | os.PathLike,
        mask: Image.Image | str | os.PathLike,
        prompt: str,
        *,
        strength: float = 1.0,
        feather: float = 4.0,
        negative_prompt: str | None = None,
        steps: int = DEFAULT_STEPS,
        guidance: float | None = None,
        guidance_end: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        scheduler: str = DEFAULT_SCHEDULER,
        normalize: bool = True,
        emphasis: str = "original",
        clip_skip: int = 1,
        only_masked: bool = False,
        padding: int = 32,
        width: int | None = None,
        height: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        """Redraw the white part of ``mask`` following ``prompt``; everything else is kept.

        Works with 9-channel inpainting UNets and with ordinary 4-channel ones (latents outside the
        mask are re-blended from the input at every step). The result is pasted over the original
        through the mask, feathered ``feather`` pixels inward, so pixels outside the mask are the
        input's own. The output has the input's size (processing happens at a multiple of 8).

        Args:
            image: the picture to edit (PIL image, path, or uint8 numpy array (H, W[, C])).
            mask: same size as ``image``; white (≥ 128) = redraw, black = keep, read as it looks: a transparent
                pixel is black, whatever colour it hides (also a path, a uint8 array, or a boolean (H, W) array,
                True = redraw).
            strength: in (0, 1]; 1 redraws the masked area from noise.
            feather: blur radius in pixels of the paste-back edge (inside the mask only).
            only_masked: A1111's "Inpaint area: Only masked": only the mask's bounding box grown by ``padding``
                pixels (widened to the drawing's shape) is drawn, at ``width``×``height`` (default: the model's
                native size), and pasted back — small areas get the model's whole resolution. Recorded as A1111's
                "Inpaint area" and "Masked area padding".
            padding: pixels around the mask's box, 0 to 256 (A1111's "Only masked padding").
            width: the crop's drawing size with ``only_masked`` (multiples of 8); the same for ``height``.
            Other arguments as :meth:`generate`.
        """
        from diffusers import StableDiffusionInpaintPipeline

        strength, feather, steps, guidance, guidance_end, seed, num_images = map(
            _plain, (strength, feather, steps, guidance, guidance_end, seed, num_images)
        )
        check_strength(strength, steps)
        _check_number("feather", feather)
        if feather < 0:
            raise InvalidInputError(f"feather must be 0 or more pixels, not {feather}")
        job = self._job(
            prompt, negative_prompt, steps, guidance, scheduler, num_images, normalize, guidance_end, emphasis,
            clip_skip,
        )  # fmt: skip
        image, image_width, image_height = self._init_image(image, None, None)
        mask, transparent = _mask_picture(mask)
        if mask.size != image.size:
            raise InvalidInputError(
                f"mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; they must match"
            )
        if mask.getextrema()[1] < 128:  # the picture would come back unchanged after a whole run
            why = (
                "its transparent pixels count as black, unlike the HTTP API's masks: paint the area to redraw white"
                if transparent
                else "is the mask inverted?"
            )
            raise InvalidInputError(
                "the mask has no white pixels, so nothing would be redrawn; white (128 or more) marks what to redraw "
                f"and black what to keep ({why})"
            )
        pipe = self._sub_pipeline(StableDiffusionInpaintPipeline)
        region = None
        if only_masked:
            width, height, region = self._masked_region(mask, padding, width, height)
            work_image = image.crop(region).resize((width, height), Image.LANCZOS)
            work_mask = (
                mask.crop(region).resize((width, height), Image.LANCZOS).point(lambda v: 255 if v >= 128 else 0)
            )
            if not work_mask.getbbox():
                raise InvalidInputError("the mask's area is too small to redraw at this size; paint it larger")
        else:
            if width is not None or height is not None:
                raise InvalidInputError("width and height choose the drawing size of only_masked inpainting only")
            size = (width, height) = image_width, image_height
            work_image = image.resize(size, Image.LANCZOS) if image.size != size else image
            work_mask = mask.resize(size, Image.NEAREST) if mask.size != size else mask
        result = self._draw(
            job,
            pipe,
            seed,
            progress,
            size=(width, height) if only_masked else image.size,
            strength=strength,
            image=work_image,
            mask_image=work_mask,
            width=width,
            height=height,
        )
        if only_masked:
            for params in result.parameters:
                params.extras = {**params.extras, "Inpaint area": "Only masked", "Masked area padding": str(padding)}
        alpha = feather_mask(mask, feather)[..., None]  # (H, W, 1), 0 outside the mask
        original = np.asarray(image, dtype=np.float32)
        for k, generated in enumerate(result.images):
            if region is not None:  # the drawn crop, back in its place in the picture
                placed = image.copy()
                placed.paste(
                    generated.resize((region[2] - region[0], region[3] - region[1]), Image.LANCZOS), region[:2]
                )
                generated = placed
            elif generated.size != image.size:
                generated = generated.resize(image.size, Image.LANCZOS)
            blended = original * (1 - alpha) + np.asarray(generated, dtype=np.float32) * alpha
            result.images[k] = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
        return result

    def outpaint(
        self,
        image: Image.Image | str | os.PathLike,
        prompt: str,
        *,
        left: int = 0,
        top: int = 0,
        right: int = 0,
        bottom: int = 0,
        strength: float = 1.0,
        feather: float = 4.0,
        negative_prompt: str | None = None,
        steps: int = DEFAULT_STEPS,
        guidance: float | None = None,
        guidance_end: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        scheduler: str = DEFAULT_SCHEDULER,
        normalize: bool = True,
        emphasis: str = "original",
        clip_skip: int = 1,
        progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        """Outpainting (扩图): grow the picture's canvas by ``left``, ``top``, ``right`` and ``bottom`` pixels and
        draw the new margin following ``prompt``; the picture itself is kept pixel for pixel.

        The margin starts from the picture's edge colours blurred outward (A1111's "fill"; it shows below strength
        1), is redrawn by :meth:`inpaint` and pasted back feathered ``feather`` pixels into the margin. The
        parameters record an inpaint of the grown canvas, with the margins under ``Outpaint``.

        Args:
            image: the picture (PIL image, path, or uint8 numpy array (H, W[, C])).
            prompt: what the whole grown picture shows.
            left: pixels added on the left, 0 to 1024; the same for ``top``, ``right`` and ``bottom`` (at least
                one above 0; the grown canvas at most 2048 a side).
            Other arguments as :meth:`inpaint`.
        """
        from .outpaint import check_grown, check_margins, outpaint_canvas

        left, top, right, bottom = map(_plain, (left, top, right, bottom))
        picture = as_picture(image, "RGB", "image")
        check_grown(picture.width, picture.height, check_margins(left, top, right, bottom), MAX_SIDE)
        canvas, mask = outpaint_canvas(picture, left, top, right, bottom)
        result = self.inpaint(
            canvas, mask, prompt, strength=strength, feather=feather, negative_prompt=negative_prompt, steps=steps,
            guidance=guidance, guidance_end=guidance_end, seed=seed, num_images=num_images, scheduler=scheduler,
            normalize=normalize, emphasis=emphasis, clip_skip=clip_skip, progress=progress,
        )  # fmt: skip
        for params in result.parameters:
            params.extras = {**params.extras, "Outpaint": f"left {left} top {top} right {right} bottom {bottom}"}
        return result

    def _masked_region(self, mask: Image.Image, padding: int, width: int | None, height: int | None):
        """ "Only masked" inpainting's drawing size and crop: (width, height, (x1, y1, x2, y2))."""
        width, height, padding = map(_plain, (width, height, padding))
        width = self.default_size if width is None else width
        height = self.default_size if height is None else height
        validate_size(width, height)
        _check_range("padding", padding, 0, MAX_MASK_PADDING)
        return width, height, crop_region(mask, padding, width, height)

    def rerender(self, params: GenerationParameters, *, progress: ProgressCallback | None = None) -> GenerationResult:
        """Draw again the text-to-image picture ``params`` describes (bit-identical on the same machine).

        An image that was number ``batch_pos`` of a batch is re-drawn within the same batch, since a
        batched UNet call may round differently from a single one.
        """
        if hires_extras := [key for key in params.extras if key.startswith("Hires ")]:
            raise InvalidInputError(
                f"these parameters use A1111's {', '.join(hires_extras)} (a hires fix taiyi runs only with the first "
                "pass's prompt, sampler and CFG, at an upscale factor); generate with its prompt instead"
            )
        unread = [key for key in ("Seed resize from",) if key in params.extras]
        if unread:  # the picture would come back another one without a word
            raise InvalidInputError(
                f"these parameters use A1111's {' and '.join(unread)}, which taiyi does not run, so --from would draw "
                "another picture; generate with its prompt instead"
            )
        if "Outpaint" in params.extras:
            raise InvalidInputError(
                f"these parameters come from an outpaint ({params.extras['Outpaint']}); re-run taiyi outpaint with "
                "the source picture and those margins instead"
            )
        if params.strength is not None and params.hires_scale is None:
            raise InvalidInputError(
                "these parameters come from an edit or inpaint; re-run taiyi edit/inpaint with "
                "the source image instead"
            )
        if params.hires_scale is not None and params.strength is None:  # A1111 writes both; some tools drop one
            raise InvalidInputError(
                "these parameters record a hires fix (Hires upscale) without its Denoising strength, so the picture "
                "cannot be drawn again; generate it with its prompt and --hires-strength"
            )
        if not 0 <= params.batch_pos < params.batch_size:
            raise InvalidInputError(f"batch position {params.batch_pos} is outside a batch of {params.batch_size}")
        if not params.scheduler:
            raise InvalidInputError(f"sampler {params.extras.get('Sampler')!r} is not one taiyi can run")
        keys = params.recorded if params.recorded is not None else ("Steps", "Seed", "Size")
        missing = [key for key in ("Steps", "Seed", "Size") if key not in keys]
        if missing:  # the defaults would draw some other picture, said to be this one
            raise InvalidInputError(
                f"the parameters do not record {', '.join(missing)}, so the picture cannot be drawn again; "
                "generate it anew with a prompt and those settings"
            )
        recorded = sorted((h, scale) for _, h, scale in recorded_loras(params.extras))
        if recorded != sorted((x.hash, x.scale) for x in self.loras):
            ours = lora_extras(self.loras)
            logger.warning(
                "the image was drawn with LoRAs %s (weights %s), this pipeline has %s (%s); the image will differ",
                params.extras.get("Lora hashes", "none"),
                params.extras.get("Lora weights", "none"),
                ours.get("Lora hashes", "none"),
                ours.get("Lora weights", "none"),
            )
        pos, size = params.batch_pos, params.batch_size
        varied = params.variation_seed is not None and params.variation_strength > 0
        first_seed = params.seed if varied else params.seed - pos  # a variation batch shares its seed (A1111's rule)
        if first_seed < 0:  # a batch that could not have been drawn with seeds S + i: drawn alone
            pos, size, first_seed = 0, 1, params.seed
        result = self.generate(
            params.prompt,
            negative_prompt=params.negative_prompt,
            steps=params.steps,
            guidance=params.guidance,
            guidance_end=params.guidance_end,
            guidance_rescale=params.guidance_rescale,
            seed=first_seed,
            num_images=size,
            width=params.width,
            height=params.height,
            scheduler=params.scheduler,
            normalize=params.normalize,
            emphasis=params.emphasis,
            clip_skip=params.clip_skip,
            variation_seed=None if params.variation_seed is None else params.variation_seed - pos,
            variation_strength=params.variation_strength,
            **(
                {"hires_scale": params.hires_scale, "hires_strength": params.strength,
                 "hires_steps": params.hires_steps, "hires_upscaler": params.hires_upscaler}
                if params.hires_scale is not None else {}
            ),
            progress=progress,
        )  # fmt: skip
        return GenerationResult([result.images[pos]], [result.parameters[pos]], result.nsfw[pos : pos + 1])


_CFG_DOUBLED = ("prompt_embeds", "mask", "masked_image_latents")  # [unconditional; conditional] while guiding


def check_guidance_end(guidance_end: float | None) -> float:
    """``guidance_end`` validated, None → :data:`DEFAULT_GUIDANCE_END`."""
    if guidance_end is None:
        return DEFAULT_GUIDANCE_END
    if isinstance(guidance_end, bool) or not isinstance(guidance_end, int | float) or not 0 < guidance_end <= 1:
        raise InvalidInputError(
            f"guidance end must be above 0 and at most 1 (the fraction of steps that are guided), not {guidance_end}"
        )
    return float(guidance_end)


def guidance_steps(guidance_end: float, steps: int) -> int:
    """How many of ``steps`` denoising steps run classifier-free guidance."""
    return max(1, math.ceil(guidance_end * steps - 1e-9))


def check_strength(strength: float, steps: int) -> None:
    _check_range("steps", steps, 1, MAX_STEPS)
    _check_number("strength", strength)
    if not (0 < strength <= 1):
        raise InvalidInputError(f"strength must be in (0, 1], not {strength}")
    if int(steps * strength) < 1:
        raise InvalidInputError(f"strength {strength} × {steps} steps leaves no denoising step; raise either")


MEMORY_MODES = ("auto", "low", "off")
# Tiled decoding never cuts tiles smaller than this (SD v1's native size): a VAE of a small native size (the
# embedded one's, 64 px) decodes whole up to it — 4× faster at 128 px, 2× at 512, and without the tiles' seams.
MIN_TILE_PIXELS = 512


def check_memory_mode(mode: str) -> None:
    if mode not in MEMORY_MODES:
        raise InvalidInputError(f"unknown memory mode {mode!r}; use {', '.join(MEMORY_MODES)}")


def _tiles_of_at_least(vae, pixels: int) -> None:
    """diffusers tiles at the VAE's ``sample_size``; make its tiles at least ``pixels`` px a side."""
    from .loading import vae_factor

    native = vae.config.sample_size
    native = max(native) if isinstance(native, (list, tuple)) else int(native)
    side = max(native, pixels)
    vae.tile_sample_min_size = side
    vae.tile_latent_min_size = side // vae_factor(vae)


def apply_memory_mode(sd, mode: str) -> None:
    """Set how a loaded ``StableDiffusionPipeline`` trades speed for memory.

    - ``auto`` (the default): the VAE decodes a batch one picture at a time, and pictures larger than
      its native size (512 px for SD v1), or than 512 px where that is smaller, in overlapping tiles — nothing
      changes at or below that size, and 1024×1024 decodes in a fraction of the memory;
    - ``low``: also attention slicing (one head at a time; slower, for the tightest memory);
    - ``off``: diffusers' defaults (whole-batch, untiled decoding).
    """
    check_memory_mode(mode)
    if mode == "off":
        sd.vae.disable_slicing()
        sd.vae.disable_tiling()
        sd.disable_attention_slicing()
        return
    sd.vae.enable_slicing()
    sd.vae.enable_tiling()
    _tiles_of_at_least(sd.vae, MIN_TILE_PIXELS)
    if mode == "low":
        sd.enable_attention_slicing("max")
    else:
        sd.disable_attention_slicing()


def load_pipeline(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    safety_checker: bool = True,
    allow_pickle: bool = False,
    variant: str | None = None,
    loras: list[str | os.PathLike | tuple[str | os.PathLike, float]] | None = None,
    memory: str = "auto",
    backend: str = "auto",
) -> TaiyiPipeline:
    """Load a Taiyi-format Stable Diffusion model.

    Args:
        model: a short name (``taiyi-zh``, ``taiyi-zh-en``; see ``taiyi models``), a hub id resolved
            through the Hugging Face cache (offline with ``HF_HUB_OFFLINE=1``), or a local diffusers folder.
        device: ``"auto"``/None (cuda, then mps, then cpu), or an explicit torch device.
        dtype: ``"auto"``/None (float16 on GPU, float32 on CPU), ``float32``, ``float16``, ``bfloat16``.
            Half precision loads the checkpoint's ``fp16`` variant files when it has them.
        safety_checker: keep the checkpoint's safety checker (if it has one); images it flags are
            blanked and a warning says so.
        allow_pickle: accept pickled (``.bin``) weights; refused by default since loading them can run code.
        variant: force a weights variant (e.g. ``"fp16"``).
        loras: LoRA files to apply, each a path, ``"FILE:SCALE"`` or ``(path, scale)`` (see
            :meth:`TaiyiPipeline.load_lora`). Checked before the model loads when they are missing or pickled.
        memory: ``auto``, ``low`` or ``off`` (see :func:`apply_memory_mode`).
        backend: where the UNet runs: ``torch``, ``openvino`` (CPU, float32 weights; converted once and
            cached, see :mod:`taiyi.backends`) or ``auto`` (``openvino`` on CPUs with bf16 instructions
            when it is installed, unless ``memory="low"`` or LoRAs; else ``torch``).

    Raises:
        ModelLoadError: one line naming what is missing or broken.
        InvalidInputError: a LoRA is missing, pickled without ``allow_pickle``, or does not fit the model.
    """
    from .lora import activate_loras, apply_loras, parse_lora_spec, resolve_lora_file

    check_memory_mode(memory)  # before the model loads
    check_backend(backend)
    specs = [parse_lora_spec(x) for x in loras or []]
    if specs and backend == "openvino":
        raise InvalidInputError(_LORA_BACKEND)
    for spec in specs:  # a typo fails before the model is loaded
        resolve_lora_file(spec.path, allow_pickle=allow_pickle)
    folder, name = resolve_model(model if model is not None else DEFAULT_MODEL)
    dev = select_device(device)
    torch_dtype = select_dtype(dtype, dev)
    requested = backend
    backend = resolve_backend(backend, dev, torch_dtype, memory=memory, loras=bool(specs))
    limit_threads()
    sd = load_stable_diffusion(
        Path(folder),
        device=dev,
        dtype=torch_dtype,
        safety_checker=safety_checker,
        allow_pickle=allow_pickle,
        variant=variant,
    )
    apply_memory_mode(sd, memory)
    if backend == "openvino":
        use_openvino_unet(sd.unet, echo=logger.info)
    pipe = TaiyiPipeline(sd, model=name, device=dev, dtype=torch_dtype, backend=backend)
    pipe.backend_chosen = requested == "auto"
    if specs:
        pipe.loras = apply_loras(sd, specs, model=name, allow_pickle=allow_pickle)
        activate_loras(sd, pipe.loras)
    return pipe
