"""Generation parameters stored in every PNG taiyi writes, in the layout other Stable Diffusion tools read.

AUTOMATIC1111's web UI records how an image was made in a PNG text chunk named ``parameters``;
ComfyUI, InvokeAI, civitai and image viewers read the same plain-text layout::

    a castle on a hill
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, ...

That is: the prompt (any number of lines), an optional ``Negative prompt:`` line (its continuation lines
follow it), and one last line of ``Key: value`` pairs joined by ", ". Values holding ``,``, ``:`` or a
newline are JSON-quoted. Writing our images this way lets those tools show and re-use taiyi's settings,
and :meth:`GenerationParameters.from_text` reads theirs (``taiyi`` can re-render an A1111 image).

Only PNG is read: A1111 stores JPEG/WebP parameters in EXIF, which taiyi never writes.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import InvalidInputError
from .prompts import EMPHASIS_MODES, check_emphasis, has_emphasis
from .schedulers import scheduler_spec, spec_from_a1111

__all__ = ["PARAMETERS_KEY", "GenerationParameters", "pnginfo", "read_parameters", "read_parameters_text"]

PARAMETERS_KEY = "parameters"
"""Name of the PNG text chunk (A1111's key, which ComfyUI and others look for)."""

# A1111's own pattern (modules/infotext_utils.py): a key, then a JSON-quoted value or anything up to the next comma.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY_RE = re.compile(r"\w[\w \-/]+")
_SIZE_RE = re.compile(r"(\d+)x(\d+)")
_NEGATIVE_PREFIX = "Negative prompt:"
# A1111 treats the last line as the parameters line only when it holds at least this many pairs.
_MIN_PARAMS = 3

# Keys the fields below write; an extra under one of these names would be read back into the field instead.
_FIELD_KEYS = frozenset(
    [
        "Steps",
        "CFG scale",
        "CFG end",
        "CFG rescale",
        "Seed",
        "Size",
        "Model",
        "Denoising strength",
        "Batch size",
        "Batch pos",
        "Dtype",
        "Prompt normalization",
        "Emphasis",
        "Variation seed",
        "Variation seed strength",
        "Hires upscale",
        "Hires steps",
        "Hires upscaler",
        "Clip skip",
        "Version",
    ]
)
_SAMPLER_KEYS = ("Sampler", "Schedule type")


def _version() -> str:
    from . import __version__

    return f"taiyi {__version__}"


def _quote(value: str) -> str:
    """Quote ``value`` as A1111 does, so the parameters line still splits into the same pairs."""
    # Beyond A1111's ",", ":" and newline: a leading quote would be taken for JSON by the reader, "\r" may be
    # turned into a line break by other tools, and the reader's regex drops leading/trailing whitespace.
    if any(c in value for c in ",:\n\r") or value.startswith('"') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:  # looked quoted but is not JSON: keep the text as written, like A1111
            return value
    return value


def _format_float(value: float) -> str:
    # A1111 prints the number its UI slider hands over: "7" for whole values, "7.5" otherwise. repr() is the
    # shortest text that reads back as the same float, so the round trip is exact.
    value = float(value)
    if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _parse_int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidInputError(f"generation parameters: {key} {value!r} is not a whole number") from None


def _parse_float(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise InvalidInputError(f"generation parameters: {key} {value!r} is not a number") from None
    if not math.isfinite(number):  # no tool writes "nan" or "inf"; read back, they would be JSON's NaN/Infinity
        raise InvalidInputError(f"generation parameters: {key} {value!r} is not a finite number")
    return number


@dataclass
class GenerationParameters:
    """How one image was generated, as recorded in (and read from) the PNG ``parameters`` chunk.

    Args:
        prompt: the prompt, as given (may span several lines).
        negative_prompt: the negative prompt; "" for none.
        steps: number of denoising steps.
        scheduler: taiyi's short scheduler name (see :data:`taiyi.schedulers.SCHEDULERS`). ``from_text`` sets
            "" when the text names an A1111 sampler taiyi cannot run; that sampler's name is then kept in
            ``extras["Sampler"]`` (and ``extras["Schedule type"]``), and re-rendering raises
            :class:`InvalidInputError` when it looks the scheduler up.
        guidance: classifier-free guidance scale (A1111 "CFG scale").
        guidance_end: fraction of the steps that ran guidance (taiyi's "CFG end"); recorded only when below 1,
            so a text without it (any other tool's) reads as guidance on every step.
        guidance_rescale: the guidance rescale factor φ (Lin et al. 2023; diffusers' ``guidance_rescale``, taiyi's
            "CFG rescale"); recorded only when above 0, so a text without it reads as plain guidance.
        seed: the seed that produced this image.
        width: image width in pixels.
        height: image height in pixels.
        model: the model as the user named it (hub id, short name or folder); written only when not "".
        strength: img2img / inpaint strength (A1111 "Denoising strength"); None for text-to-image.
        batch_size: images generated together (A1111 "Batch size"); recorded only when above 1.
        batch_pos: this image's index in its batch (A1111 "Batch pos"); recorded only when batch_size > 1.
        dtype: weights dtype such as "float16" (taiyi's "Dtype" key); None leaves it out.
        normalize: whether taiyi's Chinese prompt normalisation ran; recorded only when off.
        emphasis: how the prompts' ``(words:1.3)`` weighting was read, one of :data:`taiyi.prompts.EMPHASIS_MODES`;
            recorded as A1111's "Emphasis" (its names) when not ``"original"``, and also whenever the prompt or
            negative prompt holds emphasis syntax — so that a taiyi picture with such syntax and no "Emphasis" was
            drawn before taiyi read it, with the brackets as words, and reads back as ``"none"``. Any other
            tool's text without the key reads as ``"original"``, A1111's default.
        variation_seed: A1111's "Variation seed" (None: none); recorded with ``variation_strength`` (A1111's
            "Variation seed strength") when that is above 0.
        variation_strength: in [0, 1].
        hires_scale: A1111's hires fix ("Hires upscale"; None: none): ``width``/``height`` are then the first pass's
            size, as A1111 records them, and ``strength`` the second pass's ("Denoising strength").
        hires_steps: the second pass's steps ("Hires steps", written when not 0: the first pass's).
        hires_upscaler: "Hires upscaler", A1111's name.
        clip_skip: A1111's "Clip skip" (1: the text encoder's last layer; recorded when above 1).
        extras: any other ``Key: value`` pairs, kept in order and written after the fields above; a text
            read from another tool keeps its unknown keys (e.g. "Model hash") here. "Version" is not kept:
            ``to_text`` always writes taiyi's own.
        recorded: the keys a parsed text held (None when the parameters were not parsed): a field missing there
            holds its default, not what drew the image.
    """

    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    scheduler: str = "dpm++"
    guidance: float = 7.5
    guidance_end: float = 1.0
    guidance_rescale: float = 0.0
    seed: int = 0
    width: int = 512
    height: int = 512
    model: str = ""
    strength: float | None = None
    batch_size: int = 1
    batch_pos: int = 0
    dtype: str | None = None
    normalize: bool = True
    emphasis: str = "original"
    variation_seed: int | None = None
    variation_strength: float = 0.0
    hires_scale: float | None = None
    hires_steps: int = 0
    hires_upscaler: str = "Latent"
    clip_skip: int = 1
    extras: dict[str, str] = field(default_factory=dict)
    recorded: tuple[str, ...] | None = field(default=None, compare=False, repr=False)  # keys a parsed text held

    def to_text(self) -> str:
        """The A1111-style text for the ``parameters`` chunk.

        Raises:
            InvalidInputError: the scheduler is unknown, or an extras key could not be read back as itself
                (it names a field, is one character, or holds more than letters, digits, spaces, ``_-/``).
        """
        sampler_from_extras = not self.scheduler
        for key in self.extras:
            reserved = key in _FIELD_KEYS or (key in _SAMPLER_KEYS and not sampler_from_extras)
            if reserved or not _KEY_RE.fullmatch(key):
                raise InvalidInputError(
                    f"generation parameters: extra key {key!r} cannot be stored; use a name of 2 or more letters, "
                    "digits, spaces, '_', '-' or '/', starting with a letter or digit, that no field uses"
                )

        pairs: list[tuple[str, str]] = [("Steps", str(self.steps))]
        if sampler_from_extras:  # an A1111 sampler taiyi cannot run: write it back where A1111 put it
            pairs += [(key, self.extras[key]) for key in _SAMPLER_KEYS if key in self.extras]
        else:
            spec = scheduler_spec(self.scheduler)
            pairs += [("Sampler", spec.a1111_sampler), ("Schedule type", spec.a1111_schedule)]
        pairs += [
            ("CFG scale", _format_float(self.guidance)),
        ]
        if self.guidance_end < 1:
            pairs.append(("CFG end", _format_float(self.guidance_end)))
        if self.guidance_rescale > 0:
            pairs.append(("CFG rescale", _format_float(self.guidance_rescale)))
        pairs.append(("Seed", str(self.seed)))
        if self.variation_strength > 0 and self.variation_seed is not None:  # A1111 writes them beside the seed
            pairs += [
                ("Variation seed", str(self.variation_seed)),
                ("Variation seed strength", _format_float(self.variation_strength)),
            ]
        pairs.append(("Size", f"{self.width}x{self.height}"))
        if self.model:
            pairs.append(("Model", self.model))
        if self.strength is not None:
            pairs.append(("Denoising strength", _format_float(self.strength)))
        if self.batch_size > 1:
            pairs += [("Batch size", str(self.batch_size)), ("Batch pos", str(self.batch_pos))]
        if self.clip_skip > 1:
            pairs.append(("Clip skip", str(self.clip_skip)))
        if self.hires_scale is not None:
            pairs.append(("Hires upscale", _format_float(self.hires_scale)))
            if self.hires_steps:
                pairs.append(("Hires steps", str(self.hires_steps)))
            pairs.append(("Hires upscaler", self.hires_upscaler))
        if self.dtype is not None:
            pairs.append(("Dtype", self.dtype))
        if not self.normalize:
            pairs.append(("Prompt normalization", "off"))
        if self.emphasis != "original" or has_emphasis(self.prompt) or has_emphasis(self.negative_prompt):
            pairs.append(("Emphasis", EMPHASIS_MODES[check_emphasis(self.emphasis)]))
        pairs += [(k, str(v)) for k, v in self.extras.items() if not (sampler_from_extras and k in _SAMPLER_KEYS)]
        pairs.append(("Version", _version()))

        lines = [self.prompt] if self.prompt else []  # A1111 strips the text, so an empty prompt has no line
        if self.negative_prompt:
            lines.append(f"{_NEGATIVE_PREFIX} {self.negative_prompt}")
        lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in pairs))
        return "\n".join(lines)

    @classmethod
    def from_text(cls, text: str) -> GenerationParameters:
        """Read a ``parameters`` text written by taiyi, AUTOMATIC1111 or a tool following it.

        Follows A1111's ``parse_generation_parameters``: the last line holds the parameters only if it
        yields at least 3 ``Key: value`` pairs (otherwise the whole text is the prompt); a line starting
        ``Negative prompt:`` and the lines after it are the negative prompt. Unlike A1111 it keeps each
        line's whitespace, so taiyi's own texts read back exactly. A prompt line that itself starts with
        ``Negative prompt:`` is read as the negative prompt, by A1111 as by us: the format cannot tell.

        Args:
            text: the chunk's text.

        Raises:
            InvalidInputError: Steps, CFG scale, Seed, Size or another field's value is malformed.
        """
        prompt, negative, pairs = _split_text(text)
        params = cls(prompt=prompt, negative_prompt=negative)

        sampler: dict[str, str] = {}
        extras: dict[str, str] = {}
        for key, raw in pairs:
            value = _unquote(raw)
            if key in _SAMPLER_KEYS:
                sampler[key] = value
            elif key == "Steps":
                params.steps = _parse_int(key, value)
            elif key == "CFG scale":
                params.guidance = _parse_float(key, value)
            elif key == "CFG end":
                params.guidance_end = _parse_float(key, value)
            elif key == "CFG rescale":
                params.guidance_rescale = _parse_float(key, value)
            elif key == "Seed":
                params.seed = _parse_int(key, value)
            elif key == "Variation seed":
                params.variation_seed = _parse_int(key, value)
            elif key == "Variation seed strength":
                params.variation_strength = _parse_float(key, value)
            elif key == "Clip skip":
                params.clip_skip = _parse_int(key, value)
            elif key == "Hires upscale":
                params.hires_scale = _parse_float(key, value)
            elif key == "Hires steps":
                params.hires_steps = _parse_int(key, value)
            elif key == "Hires upscaler":
                params.hires_upscaler = value.strip()
            elif key == "Size":
                size = _SIZE_RE.fullmatch(value.strip())
                if size is None:
                    raise InvalidInputError(f"generation parameters: Size {value!r} is not WIDTHxHEIGHT")
                params.width, params.height = int(size[1]), int(size[2])
            elif key == "Model":
                params.model = value
            elif key == "Denoising strength":
                params.strength = _parse_float(key, value)
            elif key == "Batch size":
                params.batch_size = _parse_int(key, value)
            elif key == "Batch pos":
                params.batch_pos = _parse_int(key, value)
            elif key == "Dtype":
                params.dtype = value
            elif key == "Prompt normalization":
                if value.strip() not in ("on", "off"):
                    raise InvalidInputError(f"generation parameters: Prompt normalization {value!r} is not on/off")
                params.normalize = value.strip() == "on"
            elif key == "Emphasis":
                try:
                    params.emphasis = check_emphasis(value.strip())
                except InvalidInputError as exc:
                    raise InvalidInputError(f"generation parameters: Emphasis {value!r}: {exc}") from None
            elif key != "Version":  # the writer's version: to_text writes taiyi's own instead
                extras[key] = value

        # A "Schedule type" without a "Sampler" names nothing taiyi can run: it is dropped and the default stays.
        if "Sampler" in sampler:
            try:
                params.scheduler = spec_from_a1111(sampler["Sampler"], sampler.get("Schedule type")).name
            except InvalidInputError:
                # Not an error yet: the text is still worth reading; re-rendering it is what cannot be done.
                params.scheduler = ""
                extras = {**sampler, **extras}
        keys = [key for key, _ in pairs]
        writer = next((_unquote(raw) for key, raw in pairs if key == "Version"), "")
        if "Emphasis" not in keys and writer.startswith("taiyi "):
            if has_emphasis(params.prompt) or has_emphasis(params.negative_prompt):
                params.emphasis = "none"  # drawn before taiyi read emphasis: its brackets were words
        params.extras = extras
        params.recorded = tuple(keys)
        return params


def _split_text(text: str) -> tuple[str, str, list[tuple[str, str]]]:
    """A ``parameters`` text → (prompt, negative prompt, the last line's ``(key, raw value)`` pairs), as A1111's
    ``parse_generation_parameters`` splits it (see :meth:`GenerationParameters.from_text`)."""
    # A text whose every line ends in CRLF (written on Windows, or edited there) reads as lines; taiyi's own
    # texts end the prompt lines in "\n" (a "\r" in a value is quoted), so a "\r" they hold is kept.
    if "\r\n" in text and text.count("\n") == text.count("\r\n"):
        text = text.replace("\r\n", "\n")
    # Only the end is stripped: it is the parameters line, whose values keep their whitespace in quotes.
    *lines, last = text.rstrip().split("\n")
    pairs = _PARAM_RE.findall(last)
    if len(pairs) < _MIN_PARAMS:
        lines.append(last)
        pairs = []
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None and line.startswith(_NEGATIVE_PREFIX):
            negative = line[len(_NEGATIVE_PREFIX) :]
            negative_lines = [negative[1:] if negative.startswith(" ") else negative]
        elif negative_lines is not None:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines or []), pairs


def a1111_fields(text: str) -> dict[str, str]:
    """A ``parameters`` text as A1111's API shows it (``/sdapi/v1/png-info``'s ``parameters``): ``Prompt``,
    ``Negative prompt``, then every key with its value as written (unquoted), ``Size`` also as ``Size-1`` (width)
    and ``Size-2`` (height)."""
    prompt, negative, pairs = _split_text(text)
    fields = {"Prompt": prompt, "Negative prompt": negative}
    for key, raw in pairs:
        value = _unquote(raw)
        fields[key] = value
        size = _SIZE_RE.fullmatch(value.strip()) if key in ("Size", "Hires resize") else None
        if size is not None:
            fields[f"{key}-1"], fields[f"{key}-2"] = size[1], size[2]
    return fields


def pnginfo(params: GenerationParameters) -> PngImagePlugin.PngInfo:
    """PNG metadata holding ``params`` as the ``parameters`` text chunk; pass it as ``image.save(..., pnginfo=)``.

    Pillow writes a tEXt chunk when the text is latin-1 and an iTXt (UTF-8) chunk otherwise, so Chinese
    prompts survive; readers that look only at tEXt chunks (ComfyUI's old loader) miss the iTXt ones.

    Args:
        params: the parameters to record.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, params.to_text())
    return info


def read_parameters(path: str | os.PathLike) -> GenerationParameters:
    """Read the generation parameters stored in a PNG file (by taiyi, AUTOMATIC1111 or compatible tools).

    Args:
        path: the image file.

    Raises:
        InvalidInputError: the file is missing or unreadable, is not an image, or holds no ``parameters`` chunk.
    """
    return GenerationParameters.from_text(read_parameters_text(path))


def read_parameters_text(path: str | os.PathLike) -> str:
    """The ``parameters`` text a PNG file carries, exactly as stored (``taiyi disco`` pictures, for one, carry
    keys that :class:`GenerationParameters` has no fields for, and lack ones it fills with defaults).

    Raises:
        InvalidInputError: as :func:`read_parameters`.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise InvalidInputError(f"{name} does not exist; give the path of a PNG image taiyi or A1111 wrote")
    if os.path.isdir(name):
        raise InvalidInputError(f"{name} is a directory; give the path of a PNG image")
    try:
        with Image.open(name) as image:
            image_format = image.format
            # .text also loads chunks stored after the image data, where some writers put their text.
            text = image.text.get(PARAMETERS_KEY) if isinstance(image, PngImagePlugin.PngImageFile) else None
    except UnidentifiedImageError:
        raise InvalidInputError(f"{name} is not an image file Pillow can read; give a PNG image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated, corrupt, huge
        raise InvalidInputError(f"cannot read {name}: {e}") from None
    if text is None:
        if image_format != "PNG":
            raise InvalidInputError(
                f"{name} has no generation parameters: taiyi reads them only from the {PARAMETERS_KEY!r} text chunk "
                f"of PNG files, and this is a {image_format} image"
            )
        raise InvalidInputError(f"{name} has no generation parameters (no {PARAMETERS_KEY!r} text chunk)")
    return str(text)
