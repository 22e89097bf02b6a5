"""Turning the bytes of one sample into an RGB image and a clean caption, or a reason to skip it.

Web-scraped image-text data is full of broken files; a reader must never crash on one. Every
function here either returns a usable value or raises :class:`SkipSample` naming why the sample is
unusable ("corrupt image", "empty caption", ...), which the readers count in a ``SkipCounter``.
"""

from __future__ import annotations

import codecs
import io

import numpy as np
from PIL import Image, ImageOps

from ..io import has_alpha, on_white

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
MAX_PIXELS = 8192 * 8192  # larger images are skipped undecoded (decompression bombs, absurd scans)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_EXIF_ORIENTATION = 0x0112


class SkipSample(Exception):
    """A sample cannot be used; ``reason`` is the short label it is counted under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes) -> Image.Image:
    """Fully decode encoded image bytes into an upright RGB image.

    The image is ``load()``-ed here, so truncated files fail now rather than later inside a training
    step; ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone (it is process-global).

    Args:
        data: the encoded file (JPEG, PNG, WebP, BMP, GIF — whatever Pillow reads).

    Raises:
        SkipSample: "zero-byte image", "corrupt image", "truncated image", "oversized image"
            (over ``MAX_PIXELS``) or "unsupported image mode".
    """
    if not data:
        raise SkipSample("zero-byte image")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise SkipSample("oversized image") from None
    except Exception:  # UnidentifiedImageError, SyntaxError, struct.error...: not an image we can read
        raise SkipSample("corrupt image") from None
    if image.width * image.height > MAX_PIXELS:
        raise SkipSample("oversized image")
    try:
        image.load()
    except OSError as exc:
        raise SkipSample("truncated image" if "truncated" in str(exc) else "corrupt image") from None
    except Exception:  # decoders raise a zoo of types (ValueError, EOFError, IndexError...) on bad data
        raise SkipSample("corrupt image") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` turned upright (EXIF orientation) and converted to 8-bit RGB.

    Transparent pixels are composited onto white (a transparent PNG logo is "a logo on white", not
    "a logo on black"); 16-bit greyscale is scaled to 0-255 rather than clipped, which is what
    Pillow's own ``convert`` does.

    Raises:
        SkipSample: "unsupported image mode" when Pillow cannot convert the mode to RGB.
    """
    image = _upright(image)
    mode = image.mode
    try:
        if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
            return Image.fromarray(_to_uint8(np.asarray(image), mode), mode="L").convert("RGB")
        if has_alpha(image):
            return on_white(image)
        if mode == "RGB":
            return image
        return image.convert("RGB")  # L, P, 1, CMYK (Adobe-inverted JPEGs are handled by Pillow), YCbCr
    except (ValueError, OSError) as exc:
        raise SkipSample("unsupported image mode") from exc


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    pixels = pixels.astype(np.float64)
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and pixels.max(initial=0) > 255):
        pixels = pixels / 257.0  # 65535 -> 255
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _upright(image: Image.Image) -> Image.Image:
    # Phone photos store "rotate me" in EXIF; the caption describes the picture as displayed.
    try:
        if image.getexif().get(_EXIF_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block is no reason to lose the image
        pass
    return image


def decode_text(data: bytes) -> str:
    """Decode a caption file: UTF-8 (with or without BOM), UTF-16 with BOM, then GB18030.

    GB18030 (a superset of GBK/GB2312) is the usual encoding of Chinese captions that are not UTF-8.

    Raises:
        SkipSample: "undecodable caption" when none of them fits.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise SkipSample("undecodable caption")


def clean_caption(text: object) -> str:
    """``text`` with surrounding whitespace stripped and its lines joined by one space.

    Raises:
        SkipSample: "empty caption" for a missing, empty or whitespace-only caption, "invalid caption"
            for a value that is not a string (a number or list in a JSON file).
    """
    if text is None:
        raise SkipSample("empty caption")
    if not isinstance(text, str):
        raise SkipSample("invalid caption")
    caption = " ".join(line.strip() for line in text.splitlines() if line.strip())  # str.strip() drops U+3000 too
    if not caption:
        raise SkipSample("empty caption")
    return caption
