"""AUTOMATIC1111's web API (``/sdapi/v1/...``) over the served model, for the tools written against it.

``txt2img`` and ``img2img`` take A1111's request bodies field for field and answer as A1111 does (``images``,
``parameters``, ``info`` as a JSON string), ``infotext`` included; ``png-info``, ``interrogate`` (the served
Chinese CLIP), ``progress``, ``interrupt``, ``skip``, ``options`` and the lists a client reads first (``sd-models``,
``samplers``, ``schedulers``, ``upscalers``, ``latent-upscale-modes``, and the empty lists of what taiyi does not
have) complete what such clients call.

What differs from A1111, on purpose:

- A field left out takes the served model's default, as the OpenAI endpoints do: its native size (A1111: 512),
  taiyi's default steps and sampler (A1111: 50, Euler) and the model's guidance (A1111: 7).
- A field taiyi cannot honour at the value sent (face restoration, tiling, styles, scripts, a refiner, ``eta`` or
  ``s_*`` noise settings away from the sampler's own, another checkpoint...) is refused with a 400 naming it, never
  ignored; unknown fields are refused too. Fields that change nothing here (``do_not_save_*``, ``comments``,
  ``force_task_id``, ``image_cfg_scale`` for a model that is not instruct-pix2pix) are accepted.
- Masks follow A1111's convention (white, or opaque on a transparent layer, is redrawn), not OpenAI's.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ..errors import InvalidInputError, TaiyiError
from ..outpaint import fill_masked
from .errors import APIError, bad_request
from .limits import (
    check_float,
    check_hires_fix,
    check_int,
    check_scheduler,
    check_text,
    decode_base64_image,
    text_layers,
)

PREFIX = "/sdapi/v1"

# A1111's schedule types by their API names (1.9+); taiyi runs the ones a sampler of SCHEDULERS records
SCHEDULE_LABELS = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
    "simple": "Simple",
    "normal": "Normal",
    "ddim": "DDIM",
    "beta": "Beta",
}

# override_settings / options keys taiyi reads, and those it accepts at the value that changes nothing here
READ_OPTIONS = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "emphasis")
NEUTRAL_OPTIONS: dict[str, tuple[Any, ...]] = {
    "samples_format": ("png",),
    "enable_pnginfo": (True,),
    "sd_vae": ("Automatic", "None", None),
    "eta_noise_seed_delta": (0,),
    "sd_checkpoint_hash": (None, ""),
}


# --- request bodies ---------------------------------------------------------------------------------------
class _Common(BaseModel):
    """The fields txt2img and img2img share (A1111 1.10's ``StableDiffusionProcessing``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_left_out(cls, data: Any) -> Any:
        """A1111's fields are all optional: ``null`` takes the field's default (a null seed is a random one), as
        clients that write every field, set or not, expect."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = Field(None, description="A1111's name (e.g. 'DPM++ 2M') or taiyi's; default taiyi's.")
    sampler_index: str | None = Field(
        "Euler", description="A1111's old name for sampler_name (read when that is not sent)."
    )
    scheduler: str | None = Field(
        None, description="A1111's schedule type: 'Automatic', 'Karras', 'Align Your Steps'."
    )
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = Field(None, description="Default: taiyi's (not A1111's 50).")
    cfg_scale: float | None = Field(None, description="Default: the model's guidance (not A1111's 7).")
    width: int | None = Field(None, description="Default: the model's native size (img2img: the picture's).")
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] | None = None
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] | None = None
    force_task_id: str | None = None
    infotext: str | None = None
    # what the infotext records that no A1111 field carries (CFG end...): keyword arguments of the pipeline's call
    _drawing: dict[str, Any] = PrivateAttr(default_factory=dict)


class Txt2ImgRequest(_Common):
    """``POST /sdapi/v1/txt2img``."""

    denoising_strength: float | None = Field(0.75, description="The hires fix's second-pass strength.")
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""


class Img2ImgRequest(_Common):
    """``POST /sdapi/v1/img2img``; with ``mask`` it inpaints."""

    init_images: list[str] | None = Field(None, description="One picture, base64 (PNG, JPEG or WebP).")
    resize_mode: int = Field(0, description="With width/height: 0 just resize, 1 crop and resize.")
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="Base64; white (or opaque on a transparent layer) is redrawn.")
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = Field(0, description="0 fill, 1 original (2 and 3, latent noise/nothing, are not run).")
    inpaint_full_res: bool = Field(True, description="'Only masked': redraw the masked area's crop at full size.")
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class InterrogateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="A picture, base64 (a data: URL too).")
    model: str = Field("clip", description='"clip": the served Chinese CLIP (taiyi serve --clip-model).')


class ExtrasSingleImageRequest(BaseModel):
    """``POST /sdapi/v1/extra-single-image``: A1111's "Extras" upscale, with the resizing upscalers taiyi has."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="A picture, base64 (a data: URL too).")
    resize_mode: int = Field(0, description="0: scale by upscaling_resize; 1: to upscaling_resize_w × _h.")
    show_extras_results: bool = True
    gfpgan_visibility: float = 0
    codeformer_visibility: float = 0
    codeformer_weight: float = 0
    upscaling_resize: float = 2
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = Field("None", description="None or Lanczos (a Lanczos resize, as A1111's), or Nearest.")
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0
    upscale_first: bool = False


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="A picture, base64 (a data: URL too).")


# --- progress ----------------------------------------------------------------------------------------------
class Skipped(Exception):
    """``/skip``: the running batch ends; the job goes on with the next."""


class Interrupted(Exception):
    """``/interrupt``: the running job ends; its finished pictures are the answer."""


class Progress:
    """What ``/sdapi/v1/progress`` reports (the running job's steps, set from the worker thread), and the
    ``/skip`` and ``/interrupt`` requests that job reads between its steps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: tuple[str, float, str] | None = None  # kind, start, A1111's job timestamp
        self._done = self._total = 0
        self._count = self._batch = 0
        self._batches = 0  # pipeline calls of the running job: A1111's job_count
        self._span = (0, 0)  # the running batch's first image and images: the job's progress counts them
        self._stop: str | None = None  # "skip" or "interrupt", asked for and not yet acted on

    def start(self, kind: str, count: int, batches: int = 1) -> None:
        """A job of ``count`` images in ``batches`` pipeline calls starts (A1111's job count is its batches)."""
        with self._lock:
            self._job = (kind, time.monotonic(), time.strftime("%Y%m%d%H%M%S"))
            self._done, self._total, self._count, self._batch, self._stop = 0, 0, count, 0, None
            self._batches = batches
            self._span = (0, count)

    def batch(self, number: int, first: int = 0, images: int | None = None) -> None:
        """Batch ``number`` starts: images ``first`` to ``first + images`` of the job (default: all of them)."""
        with self._lock:
            self._batch, self._done, self._total = number, 0, 0
            self._span = (first, self._count if images is None else images)
            if self._stop == "skip":  # asked for between two batches: it skipped nothing yet
                self._stop = None

    def step(self, done: int, total: int) -> None:
        """Record a step; raise :class:`Skipped` / :class:`Interrupted` when asked for."""
        with self._lock:
            self._done, self._total = done, total
            stop, self._stop = self._stop, (None if self._stop == "skip" else self._stop)
        if stop == "skip":
            raise Skipped()
        if stop == "interrupt":
            raise Interrupted()

    def request(self, what: str) -> bool:
        """Ask the running job to ``"skip"`` its batch or ``"interrupt"``; False when no job runs (a no-op, as
        in A1111)."""
        with self._lock:
            if self._job is None:
                return False
            if self._stop != "interrupt":
                self._stop = what
            return True

    def finish(self) -> None:
        with self._lock:
            self._job, self._stop = None, None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            job, done, total, count, batch, stop, (first, images), batches = (
                self._job, self._done, self._total, self._count, self._batch, self._stop, self._span, self._batches,
            )  # fmt: skip
        # A1111's progress is the whole job's: the batches before this one, and this one's share of its steps
        fraction = (first + images * (done / total if total else 0)) / count if job is not None and count else 0.0
        eta = 0.0
        if job is not None and fraction > 0:
            elapsed = time.monotonic() - job[1]
            eta = elapsed / fraction - elapsed
        return {
            "progress": round(fraction, 4),
            "eta_relative": round(eta, 2),
            "state": {
                "skipped": stop == "skip",
                "interrupted": stop == "interrupt",
                "stopping_generation": False,
                "job": job[0] if job else "",
                "job_count": batches if job else 0,
                "job_timestamp": job[2] if job else "0",
                "job_no": batch if job else 0,
                "sampling_step": done if job else 0,
                "sampling_steps": total if job else 0,
            },
            "current_image": None,
            "textinfo": None,
        }


# --- reading a request --------------------------------------------------------------------------------------
def _refuse(name: str, why: str) -> APIError:
    return bad_request(f"{name}: {why}", param=name, code="unsupported_parameter")


def _side(name: str, value: int, max_side: int) -> int:
    from ..pipeline import MIN_SIDE

    check_int(name, value, MIN_SIDE, max_side, why=" pixels on this server")
    if value % 8:
        raise bad_request(f"{name} must be a multiple of 8, e.g. {max(MIN_SIDE, round(value / 8) * 8)}", param=name)
    return value


def _unsupported(body: _Common) -> None:
    """Refuse what taiyi cannot do at the value sent, naming the field."""
    if body.restore_faces:
        raise _refuse("restore_faces", "taiyi has no face restoration; send false")
    if body.tiling:
        raise _refuse("tiling", "taiyi does not draw tiling pictures; send false")
    if body.styles:
        raise _refuse("styles", "this server keeps no prompt styles; put the style's words in the prompt")
    if body.script_name:
        raise _refuse("script_name", "this server runs no A1111 scripts")
    if body.alwayson_scripts:
        names = ", ".join(list(body.alwayson_scripts)[:5])
        raise _refuse("alwayson_scripts", f"this server runs no A1111 extensions ({names})")
    if body.refiner_checkpoint not in (None, "", "None"):
        raise _refuse("refiner_checkpoint", "taiyi has no refiner pass")
    if body.firstpass_image:
        raise _refuse("firstpass_image", "a given first pass is not supported; draw the whole picture here")
    for name in ("seed_resize_from_h", "seed_resize_from_w"):
        if (getattr(body, name) or 0) > 0:
            raise _refuse(name, "resizing a seed's noise is not supported; send -1")
    if body.save_images:
        raise _refuse("save_images", "this server keeps no pictures; save the ones it returns")
    neutral = {"s_min_uncond": (0,), "s_churn": (0,), "s_tmin": (0,), "s_noise": (1,), "s_tmax": (0, math.inf)}
    for name, values in neutral.items():
        value = getattr(body, name)
        if value is not None and value not in values:
            raise _refuse(name, f"taiyi's samplers take no {name}; send {values[0]} or leave it out")


def _check_eta(eta: float | None, scheduler: str) -> None:
    """``eta`` only at the value taiyi's sampler draws with: 0 for DDIM, 1 for the ancestral and SDE ones; A1111's
    other samplers ignore it, as taiyi's do."""
    if eta is None:
        return
    own = {"ddim": 0.0, "euler-a": 1.0, "dpm++-sde": 1.0, "dpm++-sde-ays": 1.0}.get(scheduler)
    if own is not None and eta != own:
        raise _refuse("eta", f"the {scheduler} sampler draws with eta {own:g} here; send {own:g} or leave it out")


def _scheduler(body: _Common) -> str:
    """taiyi's scheduler for A1111's sampler name (``sampler_index`` when ``sampler_name`` is not sent) and
    schedule type; a schedule type taiyi does not run with that sampler is refused, not dropped."""
    from ..schedulers import DEFAULT_SCHEDULER, SCHEDULERS

    name = body.sampler_name
    if name is None and "sampler_index" in body.model_fields_set:
        name = body.sampler_index
    if not name:
        if body.scheduler not in (None, "", "automatic", "Automatic"):
            raise _refuse("scheduler", "a schedule type needs its sampler_name")
        return DEFAULT_SCHEDULER
    base = check_scheduler(name)
    schedule = (body.scheduler or "automatic").strip()
    key = schedule.lower().replace(" ", "_")
    if key not in SCHEDULE_LABELS:
        raise bad_request(
            f"scheduler {schedule!r} is not one of A1111's schedule types ({', '.join(SCHEDULE_LABELS.values())})",
            param="scheduler",
        )
    if key == "automatic":
        return base
    spec = SCHEDULERS[base]
    label = SCHEDULE_LABELS[key]
    for candidate in SCHEDULERS.values():
        if candidate.a1111_sampler == spec.a1111_sampler and candidate.a1111_schedule == label:
            return candidate.name
    if spec.a1111_schedule == label:
        return base
    runs = [s.a1111_schedule for s in SCHEDULERS.values() if s.a1111_sampler == spec.a1111_sampler]
    raise _refuse("scheduler", f"taiyi runs {spec.a1111_sampler} with {' or '.join(runs)} only, not {label}")


def _options(body: _Common, defaults: dict[str, Any], model: str, layers: int | None) -> dict[str, Any]:
    """The request's A1111 settings: the server's options, then its override_settings."""
    settings = dict(defaults)
    for key, value in (body.override_settings or {}).items():
        settings[key] = check_option(key, value, model, layers)
    return settings


def check_option(key: str, value: Any, model: str, layers: int | None = None) -> Any:
    """One A1111 setting (``override_settings`` or ``POST /options``), as taiyi reads it; ``layers``: the served text
    encoder's, clip skip's bound."""
    from ..pipeline import check_clip_skip
    from ..prompts import check_emphasis

    name = f"override_settings.{key}"
    if key == "sd_model_checkpoint":
        if not served_model(value, model):
            raise APIError(
                404, f"model {value!r} is not served here; this server serves {model!r}", code="model_not_found",
                param=name,
            )  # fmt: skip
        return model
    if key == "CLIP_stop_at_last_layers":
        try:
            return check_clip_skip(value, layers)
        except InvalidInputError as exc:
            raise bad_request(f"{key}: {exc}", param=name) from None
    if key == "emphasis":
        try:
            return check_emphasis(value)
        except InvalidInputError as exc:
            raise bad_request(f"{key}: {exc}", param=name) from None
    if key in NEUTRAL_OPTIONS:
        if value not in NEUTRAL_OPTIONS[key]:
            raise _refuse(name, f"taiyi keeps {NEUTRAL_OPTIONS[key][0]!r} here")
        return value
    raise _refuse(
        name,
        f"taiyi reads {', '.join(READ_OPTIONS)} (and accepts {', '.join(NEUTRAL_OPTIONS)} at their usual values); "
        f"{key!r} is not one of them",
    )


def served_model(name: Any, model: str) -> bool:
    """Whether an A1111 checkpoint name (``model_name``, a title ``name [hash]``, a file name) is the served model."""
    if not isinstance(name, str):
        return False
    text = name.strip()
    if text.endswith("]") and " [" in text:
        text = text[: text.rindex(" [")]
    for suffix in (".safetensors", ".ckpt"):
        text = text.removesuffix(suffix)
    return text in (model, model.rsplit("/", 1)[-1])


@dataclass
class Plan:
    """A validated request: the pipeline call each batch makes and what ``info`` reports."""

    kind: str  # "txt2img", "img2img", "inpaint"
    prompt: str
    negative_prompt: str
    scheduler: str
    steps: int
    guidance: float
    emphasis: str
    clip_skip: int
    batch_size: int
    n_iter: int
    seed: int
    subseed: int
    subseed_strength: float
    width: int | None = None
    height: int | None = None
    denoising_strength: float | None = None
    call: dict[str, Any] = field(default_factory=dict)  # the other keyword arguments of the pipeline's call
    drawing: dict[str, Any] = field(default_factory=dict)  # those the infotext records (CFG end, CFG rescale...)

    def batches(self, max_batch: int) -> list[tuple[int, int]]:
        """(index of the first image, images) of every pipeline call: each A1111 batch, split at ``max_batch``."""
        calls = []
        for k in range(self.n_iter):
            for start in range(0, self.batch_size, max_batch):
                calls.append((k * self.batch_size + start, min(max_batch, self.batch_size - start)))
        return calls

    def seeds(self, index: int) -> tuple[int, int | None]:
        """Image ``index``'s seed and variation seed, A1111's way: with a variation strength every image keeps the
        seed and the variation seed counts up; without, the seed counts up."""
        if self.subseed_strength > 0:
            return self.seed, self.subseed + index
        return self.seed + index, None


# infotext keys of what taiyi does not run (the request's field that would ask for it); with a value, only away
# from it: A1111 writes most of them only when they change the picture
UNHONOURED_KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Face restoration": ("restore_faces", ()),
    "Tiling": ("tiling", ("False",)),
    "Hires prompt": ("hr_prompt", ()),
    "Hires negative prompt": ("hr_negative_prompt", ()),
    "Hires sampler": ("hr_sampler_name", ()),
    "Hires schedule type": ("hr_scheduler", ()),
    "Hires checkpoint": ("hr_checkpoint_name", ()),
    "Hires CFG Scale": ("hr_cfg", ()),
    "Seed resize from": ("seed_resize_from_w", ("-1x-1",)),
    "Refiner": ("refiner_checkpoint", ()),
    "Noise multiplier": ("initial_noise_multiplier", ("1", "1.0")),
    "ENSD": ("eta_noise_seed_delta", ("0",)),
    "Styles array": ("styles", ("[]",)),
}
INPAINT_FILLS = {"fill": 0, "original": 1, "latent noise": 2, "latent nothing": 3}


def apply_infotext(body: _Common) -> _Common:
    """A1111 1.7's ``infotext``: a picture's parameters text fills every field the request did not send (a field
    sent wins), as A1111 reads it; keys that name no field here (``Model``, ``Version``...) are left, and keys of
    what taiyi does not run (``Face restoration``...) are refused. What a taiyi text records that no A1111 field
    carries (``CFG end``, ``CFG rescale``, ``Prompt normalization``) is drawn as recorded, so the text redraws its
    picture."""
    from ..metadata import GenerationParameters, a1111_fields
    from ..prompts import EMPHASIS_MODES

    if not body.infotext:
        return body
    try:
        params = GenerationParameters.from_text(body.infotext)
    except InvalidInputError as exc:
        raise bad_request(f"infotext: {exc}", param="infotext") from None
    recorded = set(params.recorded or ())
    for key, (name, neutral) in UNHONOURED_KEYS.items():
        if key in params.extras and params.extras[key].strip() not in neutral:
            raise bad_request(
                f"infotext records A1111's {key}: {params.extras[key]} ({name}), which taiyi does not run; "
                "take it out of the text",
                param="infotext",
            )
    # a taiyi text leaves out what is at its default (CFG end 1, CFG rescale 0, normalization on); another tool's
    # records none of them, so the served model's defaults stay, as for any field left out
    own = a1111_fields(body.infotext).get("Version", "").startswith("taiyi ")
    drawing: dict[str, Any] = {}
    if own or "CFG end" in recorded:
        drawing["guidance_end"] = params.guidance_end
    if own or "Prompt normalization" in recorded:
        drawing["normalize"] = params.normalize
    if own or "CFG rescale" in recorded:
        if isinstance(body, Txt2ImgRequest):
            drawing["guidance_rescale"] = params.guidance_rescale
        elif params.guidance_rescale > 0:
            raise bad_request("infotext: CFG rescale is drawn for txt2img only here", param="infotext")
    found: dict[str, Any] = {"prompt": params.prompt, "negative_prompt": params.negative_prompt}
    if "Steps" in recorded:
        found["steps"] = params.steps
    if "CFG scale" in recorded:
        found["cfg_scale"] = params.guidance
    if "Seed" in recorded:
        found["seed"] = params.seed
    if "Size" in recorded:
        found["width"], found["height"] = params.width, params.height
    if "Sampler" in recorded:
        if not params.scheduler:
            raise bad_request(
                f"infotext: {params.extras.get('Sampler')!r} is not a sampler taiyi runs", param="infotext"
            )
        sampler, schedule = a1111_sampler_name(params.scheduler)
        found["sampler_name"], found["scheduler"] = sampler, schedule
    if params.variation_seed is not None and params.variation_strength > 0:
        found["subseed"], found["subseed_strength"] = params.variation_seed, params.variation_strength
    if params.strength is not None:
        found["denoising_strength"] = params.strength
    if isinstance(body, Txt2ImgRequest) and (params.hires_scale is not None or "Hires resize" in params.extras):
        found.update(enable_hr=True, hr_upscaler=params.hires_upscaler, hr_second_pass_steps=params.hires_steps)
        if params.hires_scale is not None:
            found["hr_scale"] = params.hires_scale
        else:  # A1111 writes the size asked for instead of a scale
            size = params.extras["Hires resize"].strip().split("x")
            if len(size) != 2 or not all(side.isdigit() for side in size):
                raise bad_request(
                    f"infotext: Hires resize {params.extras['Hires resize']!r} is not WxH", param="infotext"
                )
            found["hr_resize_x"], found["hr_resize_y"] = int(size[0]), int(size[1])
    if isinstance(body, Img2ImgRequest):
        found.update(_inpaint_fields(params.extras, body))
    settings = {}
    if "Clip skip" in recorded:
        settings["CLIP_stop_at_last_layers"] = params.clip_skip
    if "Emphasis" in recorded:
        settings["emphasis"] = EMPHASIS_MODES[params.emphasis]
    if settings:
        found["override_settings"] = {**settings, **(body.override_settings or {})}
    update = {k: v for k, v in found.items() if k not in body.model_fields_set or k == "override_settings"}
    body = body.model_copy(update=update)
    body._drawing = drawing
    return body


def _inpaint_fields(extras: dict[str, str], body: Img2ImgRequest) -> dict[str, Any]:
    """The inpainting fields an infotext records, as A1111 reads them."""
    found: dict[str, Any] = {}
    try:
        if "Mask blur" in extras and not {"mask_blur", "mask_blur_x", "mask_blur_y"} & body.model_fields_set:
            found["mask_blur"] = round(float(extras["Mask blur"]))
        if "Masked area padding" in extras:
            found["inpaint_full_res_padding"] = int(extras["Masked area padding"])
    except ValueError:
        raise bad_request("infotext: its Mask blur or Masked area padding is not a number", param="infotext") from None
    if "Inpaint area" in extras:
        found["inpaint_full_res"] = extras["Inpaint area"].strip() == "Only masked"
    if "Masked content" in extras:
        fill = extras["Masked content"].strip()
        if fill not in INPAINT_FILLS:
            raise bad_request(f"infotext: Masked content {fill!r} is not one of A1111's", param="infotext")
        found["inpainting_fill"] = INPAINT_FILLS[fill]
    return found


def read_common(body: _Common, *, state, options: dict[str, Any], strength: float | None) -> Plan:
    """Checks shared by txt2img and img2img; returns the plan without the kind-specific call arguments."""
    from ..pipeline import MAX_SEED, seeds_for

    config, pipe = state.config, state.pipe
    _unsupported(body)
    settings = _options(body, options, state.model_name, text_layers(state.pipe))
    emphasis = settings.get("emphasis", "original")
    clip_skip = settings.get("CLIP_stop_at_last_layers", 1)
    batch_size = check_int("batch_size", body.batch_size, 1, config.max_n, why=" on this server")
    n_iter = check_int("n_iter", body.n_iter, 1, config.max_n, why=" on this server")
    total = batch_size * n_iter
    if total > config.max_n:
        raise bad_request(
            f"batch_size {batch_size} × n_iter {n_iter} asks for {total} images; this server draws at most "
            f"{config.max_n} a request",
            param="n_iter",
        )
    from ..pipeline import DEFAULT_STEPS

    steps = check_int("steps", DEFAULT_STEPS if body.steps is None else body.steps, 1, config.max_steps,
                      why=" on this server")  # fmt: skip
    guidance = check_float("cfg_scale", pipe.default_guidance if body.cfg_scale is None else body.cfg_scale, 0, 100)
    scheduler = _scheduler(body)
    _check_eta(body.eta, scheduler)
    prompt = body.prompt
    check_text("prompt", prompt, config.max_prompt_chars, required=True, emphasis=emphasis)
    negative = body.negative_prompt or ""
    check_text("negative_prompt", negative, config.max_prompt_chars, required=False, emphasis=emphasis)
    seed = check_int("seed", body.seed, -1, MAX_SEED - total, why="; -1 picks one at random")
    seed = seeds_for(None, 1)[0] if seed == -1 else seed
    subseed_strength = check_float("subseed_strength", body.subseed_strength, 0, 1)
    subseed = check_int("subseed", body.subseed, -1, MAX_SEED - total, why="; -1 picks one at random")
    subseed = seeds_for(None, 1)[0] if subseed == -1 else subseed
    if strength is not None:
        strength = check_float("denoising_strength", strength, 0, 1, low_open=True)
    return Plan(
        kind="txt2img", prompt=prompt, negative_prompt=negative, scheduler=scheduler, steps=steps, guidance=guidance,
        emphasis=emphasis, clip_skip=clip_skip, batch_size=batch_size, n_iter=n_iter, seed=seed, subseed=subseed,
        subseed_strength=subseed_strength, denoising_strength=strength, drawing=dict(body._drawing),
    )  # fmt: skip


def read_txt2img(body: Txt2ImgRequest, *, state, options: dict[str, Any]) -> Plan:

    config, pipe = state.config, state.pipe
    plan = read_common(
        body, state=state, options=options, strength=body.denoising_strength if body.enable_hr else None
    )
    width = _side("width", pipe.default_size if body.width is None else body.width, config.max_side)
    height = _side("height", pipe.default_size if body.height is None else body.height, config.max_side)
    plan.width, plan.height = width, height
    plan.call = {"width": width, "height": height}
    if plan.subseed_strength > 0:
        plan.call["variation_strength"] = plan.subseed_strength
    if not body.enable_hr:
        return plan
    if body.firstphase_width or body.firstphase_height:
        raise _refuse("firstphase_width", "A1111's pre-1.0 hires fix is not supported; use hr_scale")
    if body.hr_checkpoint_name not in (None, "", "Use same checkpoint") and not served_model(
        body.hr_checkpoint_name, state.model_name
    ):
        raise _refuse("hr_checkpoint_name", "the second pass runs the served model; leave it out")
    for name, same in (("hr_sampler_name", "Use same sampler"), ("hr_scheduler", "Use same scheduler")):
        value = getattr(body, name)
        if value not in (None, "", same) and not (
            name == "hr_sampler_name" and check_scheduler(value) == plan.scheduler
        ):
            raise _refuse(name, "the second pass runs the first pass's sampler here; leave it out")
    for name, same in (("hr_prompt", plan.prompt), ("hr_negative_prompt", plan.negative_prompt)):
        if getattr(body, name) not in (None, "", same):
            raise _refuse(name, "the second pass draws the first pass's prompt here; leave it out")
    scale = _resize_scale(body, width, height) if body.hr_resize_x or body.hr_resize_y else body.hr_scale
    upscaler = body.hr_upscaler or "Latent"
    if upscaler.strip().lower() == "none":  # A1111's "None" upscaler resizes the picture with Lanczos
        upscaler = "Lanczos"
    names = {"scale": "hr_scale", "strength": "denoising_strength", "steps": "hr_second_pass_steps",
             "upscaler": "hr_upscaler"}  # fmt: skip
    hires = check_hires_fix(
        names, scale, plan.denoising_strength, body.hr_second_pass_steps, upscaler, steps=plan.steps,
        size=(width, height), config=config,
    )  # fmt: skip
    plan.call.update(
        hires_scale=hires.scale, hires_strength=hires.strength, hires_steps=hires.steps, hires_upscaler=hires.upscaler
    )
    return plan


def _resize_scale(body: Txt2ImgRequest, width: int, height: int) -> float:
    """The scale ``hr_resize_x`` / ``hr_resize_y`` ask for, when they keep the first pass's shape (A1111 would crop
    otherwise, which taiyi does not)."""
    x, y = body.hr_resize_x, body.hr_resize_y
    scale = x / width if x else y / height
    target = (int(width * scale) // 8 * 8, int(height * scale) // 8 * 8)
    if (x and target[0] != x) or (y and target[1] != y):
        raise _refuse(
            "hr_resize_x",
            f"{x or '-'}x{y or '-'} is not {width}x{height} scaled (it would be {target[0]}x{target[1]}); "
            "taiyi does not crop: send hr_scale",
        )
    return scale


def read_img2img(
    body: Img2ImgRequest, *, state, options: dict[str, Any]
) -> tuple[Plan, Image.Image, Image.Image | None]:
    """The plan, the picture and taiyi's mask (white = redraw; None: image-to-image)."""
    config = state.config
    if body.subseed_strength:
        raise _refuse("subseed_strength", "variation seeds are for txt2img here")
    plan = read_common(body, state=state, options=options, strength=body.denoising_strength)
    if plan.denoising_strength is None:
        plan.denoising_strength = 0.75
    if int(plan.steps * plan.denoising_strength) < 1:
        raise bad_request(
            f"denoising_strength {plan.denoising_strength:g} × {plan.steps} steps leaves no denoising step; "
            "raise either",
            param="denoising_strength",
        )
    if not body.init_images:
        raise bad_request(
            "init_images is required: one picture, base64", param="init_images", code="missing_parameter"
        )
    if len(body.init_images) > 1:
        raise bad_request(
            f"{len(body.init_images)} init_images were sent; this server edits one picture a request",
            param="init_images",
        )
    if body.latent_mask:
        raise _refuse("latent_mask", "a separate latent mask is not supported")
    if body.initial_noise_multiplier not in (None, 1, 1.0):
        raise _refuse("initial_noise_multiplier", "taiyi adds the sampler's own noise; send 1 or leave it out")
    if body.resize_mode not in (0, 1):
        raise _refuse("resize_mode", "taiyi resizes with 0 (just resize) or 1 (crop and resize)")
    for name in ("width", "height"):
        if getattr(body, name) is not None:
            _side(name, getattr(body, name), config.max_side)
    picture = decode_base64_image(body.init_images[0], param="init_images[0]")
    mask = None
    if body.mask:
        if body.inpainting_fill not in (0, 1):
            raise _refuse("inpainting_fill", "taiyi starts the masked area from the picture: 0 (fill) or 1 (original)")
        if body.inpainting_mask_invert not in (0, 1):
            raise bad_request("inpainting_mask_invert must be 0 or 1", param="inpainting_mask_invert")
        blur = (body.mask_blur, body.mask_blur) if body.mask_blur is not None else (body.mask_blur_x, body.mask_blur_y)
        if blur[0] != blur[1]:
            raise _refuse("mask_blur_x", "taiyi blurs a mask's edge alike both ways; send mask_blur")
        check_int("mask_blur", blur[0], 0, 64)
        check_int("inpaint_full_res_padding", body.inpaint_full_res_padding, 0, 256)
        mask_image = decode_base64_image(body.mask, param="mask")
        if not body.mask_round and any(mask_channel(mask_image).histogram()[1:255]):
            raise _refuse("mask_round", "taiyi redraws a pixel wholly or not at all (above 128 of 255); send true")
        mask = a1111_mask(mask_image, invert=bool(body.inpainting_mask_invert))
        if mask.size != picture.size:  # A1111 stretches the mask over the picture
            mask = mask.resize(picture.size, Image.NEAREST)
        if not mask.getbbox():
            raise bad_request(
                "the mask marks nothing to redraw: paint the area white (or opaque)", param="mask", code="invalid_mask"
            )
        plan.kind = "inpaint"
        plan.call = {"feather": float(blur[0])}
    else:
        plan.kind = "img2img"
    if mask is None or not body.inpaint_full_res:  # drawn at the picture's own size where width/height are not sent
        _check_picture_size(picture, body, config.max_side)
    return plan, picture, mask


def _check_picture_size(picture: Image.Image, body: Img2ImgRequest, max_side: int) -> None:
    """A side the request leaves to the picture must be one this server draws (the library would draw up to its
    own limit, or stretch a small picture without a word)."""
    from ..pipeline import MIN_SIDE

    for given, own in ((body.width, picture.width), (body.height, picture.height)):
        if given is None and not MIN_SIDE <= own <= max_side:
            raise bad_request(
                f"init_images[0] is {picture.width}x{picture.height}; each side must be {MIN_SIDE} to {max_side} "
                "pixels on this server: send width and height to resize it",
                param="init_images[0]",
                code="invalid_image",
            )


def mask_channel(image: Image.Image) -> Image.Image:
    """What A1111 reads of a mask (mode L): a picture with transparency its alpha (opaque strokes on a transparent
    layer), any other its brightness."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return image.convert("L")


def a1111_mask(image: Image.Image, *, invert: bool = False) -> Image.Image:
    """An A1111 mask → taiyi's (mode L, white = redraw): what :func:`mask_channel` reads, above 128 as A1111
    rounds it (white, or opaque on a transparent layer, is redrawn)."""
    mask = mask_channel(image).point(lambda v: 255 if v > 128 else 0)
    return ImageOps.invert(mask) if invert else mask


# --- pictures ----------------------------------------------------------------------------------------------
def crop_and_resize(image: Image.Image, width: int, height: int, resample: int = Image.LANCZOS) -> Image.Image:
    """A1111's resize mode 1: scaled to cover ``width``×``height``, centred, the overflow cut."""
    scale = max(width / image.width, height / image.height)
    scaled = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                          resample)  # fmt: skip
    left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
    return scaled.crop((left, top, left + width, top + height))


# --- running -----------------------------------------------------------------------------------------------
def run_plan(state, plan: Plan, picture, mask, body, progress: Callable[[int, int], None]):
    """Every batch of ``plan`` through the pipeline (on the worker thread); a GenerationResult of all images."""
    from ..pipeline import GenerationResult, feather_mask

    pipe, config = state.pipe, state.config
    common = dict(
        negative_prompt=plan.negative_prompt or None, steps=plan.steps, guidance=plan.guidance,
        scheduler=plan.scheduler, emphasis=plan.emphasis, clip_skip=plan.clip_skip, progress=progress, **plan.drawing,
    )  # fmt: skip
    images, params, nsfw = [], [], []
    if plan.kind == "img2img":
        width, height = body.width, body.height
        if body.resize_mode == 1 and (width or height):
            picture = crop_and_resize(picture, width or picture.width, height or picture.height)
        common.update(width=width, height=height, strength=plan.denoising_strength)
    elif plan.kind == "inpaint":
        source = picture.convert("RGB")
        if body.inpainting_fill == 0:
            picture = fill_masked(source, mask)  # A1111's "fill": the hole starts from its surroundings
        if body.inpaint_full_res:  # "only masked": the library crops, draws at width × height and pastes back
            work_mask = mask
            size = pipe.default_size
            common.update(only_masked=True, padding=body.inpaint_full_res_padding, width=body.width or size,
                          height=body.height or size)  # fmt: skip
        else:
            work_mask = mask
            if body.width or body.height:
                target = (body.width or picture.width, body.height or picture.height)
                if body.resize_mode == 1:  # picture and mask cut alike
                    picture, source = crop_and_resize(picture, *target), crop_and_resize(source, *target)
                    mask = work_mask = crop_and_resize(mask, *target, Image.NEAREST)
                else:
                    picture, source = picture.resize(target, Image.LANCZOS), source.resize(target, Image.LANCZOS)
                    mask = work_mask = mask.resize(target, Image.NEAREST)
        # the pipeline's paste-back is hard-edged here: the feather is laid against the untouched picture below
        common.update(strength=plan.denoising_strength, feather=0.0)
    else:
        common.update(plan.call)
    for number, (first, count) in enumerate(plan.batches(config.max_batch)):
        state.progress.batch(number, first, count)
        seed, variation = plan.seeds(first)
        try:
            if plan.kind == "txt2img":
                result = pipe.generate(plan.prompt, seed=seed, num_images=count, variation_seed=variation, **common)
            elif plan.kind == "img2img":
                result = pipe.edit(picture, plan.prompt, seed=seed, num_images=count, **common)
            else:
                result = pipe.inpaint(picture, work_mask, plan.prompt, seed=seed, num_images=count, **common)
        except Skipped:
            continue
        except Interrupted:
            break
        for image, p in zip(result.images, result.parameters, strict=True):
            p.extras = {**p.extras, **_inpaint_keys(plan, body)}
            if plan.kind == "inpaint":  # through the mask over the untouched picture, feathered inward
                image = _paste(source, image, mask, plan.call.get("feather", 4.0), feather_mask)
            images.append(image)
            params.append(p)
        nsfw += result.nsfw or [False] * len(result.images)
    return GenerationResult(images, params, nsfw)


def _inpaint_keys(plan: Plan, body) -> dict[str, str]:
    """A1111's infotext keys of an inpainting picture."""
    if plan.kind != "inpaint":
        return {}
    keys = {"Mask blur": f"{plan.call.get('feather', 4.0):g}"}
    if body.inpaint_full_res:
        keys.update({"Inpaint area": "Only masked", "Masked area padding": str(body.inpaint_full_res_padding)})
    else:  # A1111 leaves its default out, but the request's default here is "Only masked": the text must say
        keys["Inpaint area"] = "Whole picture"
    keys["Masked content"] = "fill" if body.inpainting_fill == 0 else "original"
    return keys


def _paste(source, image, mask, feather, feather_mask) -> Image.Image:
    """``image`` over ``source`` where ``mask`` is white, feathered ``feather`` pixels inward; every other pixel is
    the source's own."""
    alpha = feather_mask(mask, feather)[..., None]
    blended = np.asarray(source, np.float32) * (1 - alpha) + np.asarray(image, np.float32) * alpha
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


# --- answering ----------------------------------------------------------------------------------------------
def encode_png(image: Image.Image, params) -> str:
    from ..metadata import pnginfo

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo(params))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def a1111_sampler_name(scheduler: str) -> tuple[str, str]:
    from ..schedulers import SCHEDULERS

    spec = SCHEDULERS[scheduler]
    return spec.a1111_sampler, spec.a1111_schedule


def info_json(plan: Plan, result, *, model: str, version: str) -> str:
    """A1111's ``info``: the batch's settings and every image's seeds and parameters text."""
    params = result.parameters
    texts = [p.to_text() for p in params]
    sampler, schedule = a1111_sampler_name(plan.scheduler)
    seeds = [p.seed for p in params]
    # A1111 counts the variation seed up with the image, used or not (an image's index: its seed's offset)
    subseeds = [plan.subseed + p.seed - plan.seed if p.variation_seed is None else p.variation_seed for p in params]
    first = params[0] if params else None
    info = {
        "prompt": plan.prompt,
        "all_prompts": [plan.prompt] * len(params),
        "negative_prompt": plan.negative_prompt,
        "all_negative_prompts": [plan.negative_prompt] * len(params),
        "seed": seeds[0] if seeds else plan.seed,
        "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else plan.subseed,
        "all_subseeds": subseeds,
        "subseed_strength": plan.subseed_strength,
        "width": first.width if first else plan.width,
        "height": first.height if first else plan.height,
        "sampler_name": sampler,
        "scheduler": schedule,
        "cfg_scale": plan.guidance,
        "steps": plan.steps,
        "batch_size": plan.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model,
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": plan.denoising_strength,
        "extra_generation_params": {k: v for k, v in (first.extras if first else {}).items()},
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": plan.clip_skip,
        "is_using_inpainting_conditioning": plan.kind == "inpaint",
        "version": version,
    }
    return json.dumps(info, ensure_ascii=False)


def echo(body: _Common) -> dict[str, Any]:
    """A1111's ``parameters``: the request as read, its pictures only with ``include_init_images``."""
    data = json.loads(body.model_dump_json())  # as JSON writes it: an unused "inf" or "nan" field echoes null
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        data["init_images"], data["mask"] = None, None
    return data


def exif_comment(image: Image.Image) -> str:
    """Where A1111 keeps a JPEG's or WebP's parameters: the EXIF UserComment, as piexif writes it (an 8-byte
    character code, then the text); "" when there is none."""
    try:
        raw = image.getexif().get_ifd(0x8769).get(0x9286)  # the Exif IFD's UserComment
    except (SyntaxError, ValueError, OSError, struct.error):  # a broken EXIF block: the picture still reads
        return ""
    if not isinstance(raw, bytes) or len(raw) <= 8:
        return ""
    codec = {b"UNICODE\0": "utf-16-be", b"ASCII\0\0\0": "ascii"}.get(raw[:8], "utf-8")
    return raw[8:].decode(codec, errors="replace").rstrip("\0")


RESIZERS = {
    "none": ("Lanczos", Image.LANCZOS),
    "lanczos": ("Lanczos", Image.LANCZOS),
    "nearest": ("Nearest", Image.NEAREST),
}
MAX_UPSCALED_SIDE = 4096


def upscale_extras(body: ExtrasSingleImageRequest) -> dict[str, Any]:
    """A1111's Extras upscale of one picture: its parameters text kept, with A1111's postprocessing keys added."""
    from ..metadata import PARAMETERS_KEY

    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(body, name):
            raise _refuse(name, "taiyi has no face restoration; send 0")
    resizers = []
    for name, value in (("upscaler_1", body.upscaler_1), ("upscaler_2", body.upscaler_2)):
        resizer = RESIZERS.get(str(value).strip().lower())
        if resizer is None:
            raise _refuse(name, f"taiyi upscales with None or Lanczos (a Lanczos resize, as A1111's) or Nearest only, "
                                f"not {str(value)[:100]!r}")  # fmt: skip
        resizers.append(resizer)
    second = check_float("extras_upscaler_2_visibility", body.extras_upscaler_2_visibility, 0, 1)
    if body.resize_mode not in (0, 1):
        raise bad_request("resize_mode must be 0 (scale by upscaling_resize) or 1 (to a size)", param="resize_mode")
    picture = decode_base64_image(body.image, param="image")
    text = picture.info.get(PARAMETERS_KEY) if isinstance(picture.info.get(PARAMETERS_KEY), str) else None
    picture = picture.convert("RGBA" if picture.mode in ("RGBA", "LA", "PA") else "RGB")
    if body.resize_mode == 0:
        scale = check_float("upscaling_resize", body.upscaling_resize, 0, 8, low_open=True)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        target = None
    else:
        width = check_int("upscaling_resize_w", body.upscaling_resize_w, 1, MAX_UPSCALED_SIDE)
        height = check_int("upscaling_resize_h", body.upscaling_resize_h, 1, MAX_UPSCALED_SIDE)
        scale = max(width / picture.width, height / picture.height)
        size = (round(picture.width * scale), round(picture.height * scale))
        target = (width, height) if body.upscaling_crop else None
    if max(size) > MAX_UPSCALED_SIDE:
        raise bad_request(
            f"the upscaled picture would be {size[0]}x{size[1]}; sides are at most {MAX_UPSCALED_SIDE} pixels",
            param="upscaling_resize" if body.resize_mode == 0 else "upscaling_resize_w",
        )
    out = picture.resize(size, resizers[0][1])
    if second > 0:
        out = Image.blend(out, picture.resize(size, resizers[1][1]), second)
    if target is not None and out.size != target:  # centred, the overflow cut
        left, top = (out.width - target[0]) // 2, (out.height - target[1]) // 2
        out = out.crop((left, top, left + target[0], top + target[1]))
    info = f"Postprocess upscale by: {scale:g}, Postprocess upscaler: {resizers[0][0]}"
    if second > 0:
        info += f", Postprocess upscaler 2: {resizers[1][0]}"
    buffer = io.BytesIO()
    pnginfo = None
    if text:  # as A1111's Extras: the picture's own parameters, its postprocessing on the last line
        from PIL import PngImagePlugin

        pnginfo = PngImagePlugin.PngInfo()
        pnginfo.add_text(PARAMETERS_KEY, f"{text.rstrip()}, {info}")
    out.save(buffer, format="PNG", pnginfo=pnginfo)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"html_info": f"<p>{info}</p>", "image": encoded if body.show_extras_results else None}


def png_info(image_bytes_b64: str) -> dict[str, Any]:
    """``/png-info``: the picture's ``parameters`` text, its other text chunks, and the text's fields."""
    from ..metadata import PARAMETERS_KEY, a1111_fields

    image = decode_base64_image(image_bytes_b64, param="image")
    texts = {k: v for k, v in getattr(image, "text", image.info).items() if isinstance(v, str)}
    text = texts.pop(PARAMETERS_KEY, "") or exif_comment(image)
    if not text:
        return {"info": "", "items": texts, "parameters": {}}
    try:
        fields = a1111_fields(text)
    except TaiyiError:
        fields = {"Prompt": text}
    return {"info": text, "items": texts, "parameters": fields}


# --- routes ------------------------------------------------------------------------------------------------
def add_routes(app, state, *, run_job, dependencies, responses, version: str) -> None:
    """Mount ``/sdapi/v1/...`` on ``app``; ``run_job`` queues a :class:`~taiyi.serve.worker.Job` and waits for it."""
    from .worker import Job

    options: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "emphasis": "original"}
    options_lock = threading.Lock()
    tags = ["a1111"]

    def current_options() -> dict[str, Any]:
        with options_lock:
            return dict(options)

    async def answer(request, body: _Common, plan: Plan, picture=None, mask=None) -> JSONResponse:
        progress = state.progress

        def run(should_abort) -> Any:
            from .jobs import abort_progress

            stop = abort_progress(should_abort)

            def step(done: int, total: int) -> None:
                progress.step(done, total)
                stop(done, total)

            progress.start(plan.kind, plan.batch_size * plan.n_iter, len(plan.batches(state.config.max_batch)))
            try:
                return run_plan(state, plan, picture, mask, body, step)
            finally:
                progress.finish()

        result = await run_job(request, state, Job(plan.kind, run, rows=plan.batch_size * plan.n_iter))
        if not body.override_settings_restore_afterwards:  # A1111 keeps the request's settings for later ones
            drawn = {"CLIP_stop_at_last_layers": plan.clip_skip, "emphasis": plan.emphasis}
            with options_lock:
                options.update({k: v for k, v in drawn.items() if k in (body.override_settings or {})})

        def encode() -> dict[str, Any]:
            images = [encode_png(i, p) for i, p in zip(result.images, result.parameters, strict=True)]
            return {
                "images": images if body.send_images else [],
                "parameters": echo(body),
                "info": info_json(plan, result, model=state.model_name, version=version),
            }

        data = await anyio.to_thread.run_sync(encode)
        state.metrics.images.inc(len(result.images))
        return JSONResponse(data)

    @app.post(f"{PREFIX}/txt2img", dependencies=dependencies, responses=responses, tags=tags,
              summary="Text to image (A1111's API)")  # fmt: skip
    async def txt2img(body: Txt2ImgRequest, request: Request) -> JSONResponse:
        body = apply_infotext(body)
        plan = read_txt2img(body, state=state, options=current_options())
        return await answer(request, body, plan)

    @app.post(f"{PREFIX}/img2img", dependencies=dependencies, responses=responses, tags=tags,
              summary="Image to image, or inpainting with a mask (A1111's API)")  # fmt: skip
    async def img2img(body: Img2ImgRequest, request: Request) -> JSONResponse:
        body = apply_infotext(body)
        plan, picture, mask = await anyio.to_thread.run_sync(
            lambda: read_img2img(body, state=state, options=current_options())
        )
        return await answer(request, body, plan, picture, mask)

    @app.post(f"{PREFIX}/extra-single-image", dependencies=dependencies, responses=responses, tags=tags,
              summary="Upscale a picture with a resizing upscaler (A1111's Extras)")  # fmt: skip
    async def extra_single_image(body: ExtrasSingleImageRequest) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(upscale_extras, body)

    @app.post(f"{PREFIX}/png-info", dependencies=dependencies, responses=responses, tags=tags,
              summary="A picture's generation parameters")  # fmt: skip
    async def png_info_route(body: PngInfoRequest) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(png_info, body.image)

    @app.post(f"{PREFIX}/interrogate", dependencies=dependencies, responses=responses, tags=tags,
              summary="A Chinese prompt for a picture, read by the served CLIP (提示词反推)")  # fmt: skip
    async def interrogate_route(body: InterrogateRequest, request: Request) -> dict[str, Any]:
        from ..interrogate import interrogate, vocabulary_for

        if body.model != "clip":
            raise APIError(
                404, f"interrogation model {body.model[:100]!r} is not here; taiyi reads pictures with its Chinese "
                'CLIP only: send "clip"', code="model_not_found", param="model",
            )  # fmt: skip
        if state.clip is None:
            raise APIError(
                404, "CLIP is not enabled on this server; start it with --clip-model (a Chinese CLIP folder or name)",
                code="clip_not_configured",
            )  # fmt: skip
        picture = await anyio.to_thread.run_sync(lambda: decode_base64_image(body.image, param="image").convert("RGB"))
        vocabulary = vocabulary_for(state.clip_name or "")
        run = lambda should_abort: interrogate(state.clip, [picture], vocabulary)[0]  # noqa: E731
        reading = await run_job(request, state, Job("clip", run, rows=1))
        return {"caption": reading.prompt}

    @app.get(f"{PREFIX}/progress", dependencies=dependencies, tags=tags, summary="The running job's progress")
    async def progress_route(skip_current_image: bool = False) -> dict[str, Any]:  # noqa: ARG001 (A1111's query)
        return state.progress.snapshot()

    @app.post(f"{PREFIX}/interrupt", dependencies=dependencies, tags=tags,
              summary="End the running job; its request answers with the pictures finished so far")  # fmt: skip
    async def interrupt() -> dict[str, Any]:
        state.progress.request("interrupt")
        return {}

    @app.post(f"{PREFIX}/skip", dependencies=dependencies, tags=tags,
              summary="End the running job's batch; the job goes on with the next")  # fmt: skip
    async def skip() -> dict[str, Any]:
        state.progress.request("skip")
        return {}

    @app.post(f"{PREFIX}/refresh-checkpoints", dependencies=dependencies, tags=tags,
              summary="Nothing to refresh: one model is served")  # fmt: skip
    async def refresh_checkpoints() -> None:
        return None

    @app.get(f"{PREFIX}/options", dependencies=dependencies, tags=tags, summary="The settings taiyi reads")
    async def get_options() -> dict[str, Any]:
        from ..prompts import EMPHASIS_MODES

        current = current_options()
        return {
            "sd_model_checkpoint": state.model_name,
            "CLIP_stop_at_last_layers": current["CLIP_stop_at_last_layers"],
            "emphasis": EMPHASIS_MODES[current["emphasis"]],
            "samples_format": "png",
            "enable_pnginfo": True,
            "sd_vae": "Automatic",
            "eta_noise_seed_delta": 0,
        }

    @app.post(f"{PREFIX}/options", dependencies=dependencies, responses=responses, tags=tags,
              summary="Set the server's defaults for later requests (clip skip, emphasis)")  # fmt: skip
    async def set_options(body: dict[str, Any]) -> None:
        layers = text_layers(state.pipe)
        checked = {key: check_option(key, value, state.model_name, layers) for key, value in body.items()}
        with options_lock:
            options.update({k: v for k, v in checked.items() if k in ("CLIP_stop_at_last_layers", "emphasis")})

    @app.get(f"{PREFIX}/sd-models", dependencies=dependencies, tags=tags, summary="The served model")
    async def sd_models() -> list[dict[str, Any]]:
        name = state.model_name
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}]

    @app.get(f"{PREFIX}/samplers", dependencies=dependencies, tags=tags, summary="The samplers, by A1111's names")
    async def samplers() -> list[dict[str, Any]]:
        from ..schedulers import SCHEDULERS

        by_name: dict[str, list[str]] = {}
        for spec in SCHEDULERS.values():
            by_name.setdefault(spec.a1111_sampler, []).append(spec.name)
        return [{"name": name, "aliases": aliases, "options": {}} for name, aliases in by_name.items()]

    @app.get(f"{PREFIX}/schedulers", dependencies=dependencies, tags=tags, summary="The schedule types taiyi runs")
    async def schedulers() -> list[dict[str, Any]]:
        from ..schedulers import SCHEDULERS

        labels = {spec.a1111_schedule for spec in SCHEDULERS.values()}
        return [
            {"name": key, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for key, label in SCHEDULE_LABELS.items()
            if label in labels
        ]

    @app.get(f"{PREFIX}/upscalers", dependencies=dependencies, tags=tags, summary="The hires fix's picture upscalers")
    async def upscalers() -> list[dict[str, Any]]:
        from ..pipeline import HIRES_UPSCALERS

        return [
            {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": None}
            for name in HIRES_UPSCALERS
            if not name.startswith("Latent")
        ]

    @app.get(f"{PREFIX}/latent-upscale-modes", dependencies=dependencies, tags=tags,
             summary="The hires fix's latent upscalers")  # fmt: skip
    async def latent_modes() -> list[dict[str, Any]]:
        from ..pipeline import HIRES_UPSCALERS

        return [{"name": name} for name in HIRES_UPSCALERS if name.startswith("Latent")]

    empty: dict[str, Any] = {
        "sd-vae": [], "loras": [], "prompt-styles": [], "hypernetworks": [], "face-restorers": [],
        "realesrgan-models": [], "embeddings": {"loaded": {}, "skipped": {}},
        "scripts": {"txt2img": [], "img2img": []},
    }  # fmt: skip
    for path, value in empty.items():
        app.add_api_route(
            f"{PREFIX}/{path}", _constant(value), methods=["GET"], dependencies=dependencies, tags=tags,
            summary="Empty: taiyi has none",
        )  # fmt: skip


def _constant(value: Any):
    async def constant() -> Any:
        return value

    return constant
