"""Checks of what clients send, before anything is queued: one-line 4xx errors naming the field and the limit.

Everything a request asks of the model is checked here (against the server's caps, which are tighter than
the library's), so a batch of several requests never fails because of one of them.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..errors import InvalidInputError
from ..io import MAX_INPUT_PIXELS, as_displayed
from ..pipeline import MAX_SEED, MIN_SIDE
from .config import ServeConfig
from .errors import APIError, bad_request

# Formats accepted as uploads, by what the bytes are (never by the client's file name or Content-Type).
UPLOAD_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_SIZE = re.compile(r"\s*(\d{1,7})\s*[xX×*]\s*(\d{1,7})\s*")


def check_int(name: str, value: int, low: int, high: int, *, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be a whole number, not {value!r}", param=name)
    if not low <= value <= high:
        raise bad_request(f"{name} must be between {low} and {high}{why}, not {value}", param=name)
    return value


def check_float(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = float(value)
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:  # also refuses NaN
        interval = f"({low:g}, {high:g}]" if low_open else f"between {low:g} and {high:g}"
        raise bad_request(f"{name} must be {'in ' if low_open else ''}{interval}, not {value:g}", param=name)
    return value


def parse_size(text: str, max_side: int, *, param: str = "size") -> tuple[int, int]:
    """``"WxH"`` → (W, H), each a multiple of 8 between 64 and ``max_side``."""
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise APIError(
            400, f'size must look like "512x512" (width x height), not {text!r}', code="invalid_size", param=param
        )
    width, height = int(match[1]), int(match[2])
    for side, value in (("width", width), ("height", height)):
        if not MIN_SIDE <= value <= max_side:
            raise APIError(
                400,
                f"size {width}x{height}: the {side} must be between {MIN_SIDE} and {max_side} pixels on this server",
                code="invalid_size",
                param=param,
            )
        if value % 8:
            near = max(MIN_SIDE, round(value / 8) * 8)
            raise APIError(
                400,
                f"size {width}x{height}: the {side} must be a multiple of 8, e.g. {near}",
                code="invalid_size",
                param=param,
            )
    return width, height


def check_text(name: str, text: str | None, max_chars: int, *, required: bool, emphasis: str = "original") -> str:
    """A prompt-like field: present when required, within the length cap, its weights readable with ``emphasis``;
    returns it normalised."""
    from ..prompts import normalize_prompt, prepare_prompt

    if text is None or (not required and text == ""):
        if required:
            raise bad_request(f"{name} is required", param=name, code="missing_parameter")
        return ""
    if len(text) > max_chars:
        raise bad_request(f"{name} is {len(text)} characters long; the limit is {max_chars}", param=name)
    try:
        prepare_prompt(text, what=name, required=required, emphasis=emphasis)  # its words and weights, as drawn
        return normalize_prompt(text, escape_brackets=emphasis != "none")  # sent back, it reads the same
    except InvalidInputError as exc:
        raise bad_request(str(exc), param=name) from None


def check_form_text(fields: dict[str, str | None]) -> None:
    """Multipart text fields must be text, as JSON strings must: bytes that are not UTF-8 arrive as lone
    surrogates (see :mod:`.forms`) and are refused by the rule prompts follow everywhere, before any field is used."""
    from ..prompts import require_text

    for name, value in fields.items():
        if value is not None:
            try:
                require_text(value, name)
            except InvalidInputError as exc:
                raise bad_request(str(exc), param=name) from None


def check_labels(labels: list[str]) -> list[str]:
    """Zero-shot labels follow the CLI's rule (:func:`taiyi.evaluation.check_labels`): at least two, none repeated."""
    from ..evaluation import check_labels as check

    try:
        return check(labels)
    except InvalidInputError as exc:
        raise bad_request(str(exc), param="labels") from None


def check_response_format(value: str | None) -> None:
    if value not in (None, "b64_json"):
        raise bad_request(
            f"response_format {value!r} is not supported: this server returns images inline only; use b64_json",
            param="response_format",
            code="unsupported_response_format",
        )


def check_scheduler(name: str | None) -> str:
    from ..schedulers import DEFAULT_SCHEDULER, scheduler_spec

    try:
        return scheduler_spec(name or DEFAULT_SCHEDULER).name
    except InvalidInputError as exc:
        raise bad_request(str(exc), param="scheduler") from None


def check_seeds(seed: int | None, n: int) -> tuple[int, ...]:
    """The per-image seeds ``S, S+1, ...`` (random ``S`` when none is given), as the library numbers them."""
    from ..pipeline import seeds_for

    if seed is not None:
        check_int("seed", seed, 0, MAX_SEED - n)
    return tuple(seeds_for(seed, n))


@dataclass(frozen=True)
class Sampling:
    """The settings a request shares with the requests it may be batched with."""

    steps: int
    guidance: float
    scheduler: str
    guidance_end: float
    guidance_rescale: float = 0.0  # text-to-image only
    emphasis: str = "original"


def check_sampling(
    steps: int | None,
    guidance: float | None,
    scheduler: str | None,
    *,
    config: ServeConfig,
    pipe,
    guidance_end: float | None = None,
    guidance_rescale: float | None = None,
    emphasis: str | None = None,
) -> Sampling:
    from ..pipeline import DEFAULT_GUIDANCE_END, DEFAULT_STEPS
    from ..prompts import check_emphasis

    steps = check_int("steps", DEFAULT_STEPS if steps is None else steps, 1, config.max_steps, why=" on this server")
    guidance = check_float("guidance", pipe.default_guidance if guidance is None else guidance, 0.0, 100.0)
    end = DEFAULT_GUIDANCE_END if guidance_end is None else guidance_end
    end = check_float("guidance_end", end, 0, 1, low_open=True)
    rescale = pipe.default_guidance_rescale if guidance_rescale is None else guidance_rescale
    rescale = check_float("guidance_rescale", rescale, 0.0, 1.0)
    try:
        emphasis = check_emphasis("original" if emphasis is None else emphasis)
    except InvalidInputError as exc:
        raise bad_request(str(exc), param="emphasis") from None
    return Sampling(steps, guidance, check_scheduler(scheduler), end, rescale, emphasis)


def check_hires_fix(names: dict[str, str], scale, strength, steps_2: int, upscaler: str, *, steps: int, size,
                    config: ServeConfig):  # fmt: skip
    """A request's hires fix as the library takes it (:func:`taiyi.pipeline.check_hires`), its second pass held to
    this server's steps and sides; ``names`` maps ``scale``, ``strength``, ``steps``, ``upscaler`` to the request's
    fields, which each refusal names."""
    from ..pipeline import check_hires

    check_int(names["steps"], steps_2, 0, config.max_steps, why=" on this server (0: the first pass's steps)")
    try:
        hires = check_hires(scale, strength, steps_2, upscaler, steps=steps)
    except InvalidInputError as exc:  # the library's words name the setting: so does the answer
        message = str(exc)
        kind = next((k for k in ("upscaler", "strength", "steps") if message.startswith(("hires " + k, k))), "scale")
        param = names[kind]
        raise bad_request(message if message.startswith("hires") else f"{param}: {message}", param=param) from None
    drawn = hires.size(*size)
    if max(drawn) > config.max_side:
        raise bad_request(
            f"the hires pass would draw {drawn[0]}x{drawn[1]}; sides are at most {config.max_side} pixels on this "
            "server",
            param=names["scale"],
        )
    return hires


def text_layers(pipe) -> int | None:
    """The text encoder's layer count, clip skip's upper bound (None where the pipeline does not show it)."""
    config = getattr(getattr(getattr(pipe, "sd", None), "text_encoder", None), "config", None)
    return getattr(config, "num_hidden_layers", None)


def check_model(model: str | None, served: str) -> None:
    if model is not None and model != served:
        raise APIError(
            404,
            f"model {model!r} is not served here; this server serves {served!r}",
            code="model_not_found",
            param="model",
        )


# --- uploads -------------------------------------------------------------------------------------------
def decode_image(data: bytes, *, param: str) -> Image.Image:
    """Bytes of an upload → a fully decoded image; 415 for what is not a PNG/JPEG/WebP, 400 for a broken one."""
    if not data:
        raise bad_request(f"{param} is empty", param=param, code="invalid_image")
    kinds = "PNG, JPEG or WebP"
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise APIError(
            415, f"{param} is not an image; send a {kinds} file", code="unsupported_media_type", param=param
        ) from None
    if image.format not in UPLOAD_FORMATS:
        raise APIError(
            415,
            f"{param} is a {image.format} image; send a {kinds} file",
            code="unsupported_media_type",
            param=param,
        )
    if image.width * image.height > MAX_INPUT_PIXELS:  # checked from the header, before decoding: no bombs
        raise bad_request(
            f"{param} is {image.width}x{image.height}; the largest accepted is 4096x4096 pixels",
            param=param,
            code="invalid_image",
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # Pillow's own words ("image file is truncated (3 bytes not processed)"), not its exception class
        reason = str(exc).splitlines()[0] if str(exc) else "corrupt data"
        raise bad_request(f"{param} is damaged: {reason}", param=param, code="invalid_image") from None
    # As the library reads a file: upright (a phone photo is stored sideways, its mask drawn upright) and
    # 16-bit greyscale scaled to 8 bits, where Pillow's convert() would clip a mid-grey picture to white.
    return as_displayed(image)


def decode_base64_image(text: str, *, param: str) -> Image.Image:
    if not isinstance(text, str):
        raise bad_request(f"{param} must be a base64 string", param=param, code="invalid_image")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = "".join(text.split())  # the line breaks base64 and MIME wrap it with are not data
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} is not valid base64", param=param, code="invalid_image") from None
    return decode_image(data, param=param)


def has_transparency(image: Image.Image) -> bool:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return image.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return False


def mask_from_upload(mask: Image.Image) -> Image.Image:
    """An uploaded mask → taiyi's mask (mode L, white = redraw).

    OpenAI's convention comes first: a mask with transparent pixels marks them as the area to edit (alpha
    below 128 counts as transparent). A mask with no transparency (mode L or RGB, or fully opaque RGBA) is
    read in taiyi's convention: white (≥ 128) = redraw, black = keep.
    """
    if has_transparency(mask):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a < 128 else 0)
    return mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
