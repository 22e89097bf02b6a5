"""Outpainting (扩图): a picture's canvas grown on some sides and the new margin drawn by inpainting.

:func:`outpaint_canvas` builds the grown canvas and its mask; :func:`fill_masked` gives a masked area the
colours around it (A1111's "fill" start for inpainting), so that a redraw below strength 1 starts from the
surroundings rather than from blank.
"""

from __future__ import annotations

from PIL import Image, ImageFilter, ImageOps, ImageStat

from .errors import InvalidInputError

MAX_MARGIN = 1024  # pixels a side may grow by in one call


def check_margins(left: int, top: int, right: int, bottom: int) -> tuple[int, int, int, int]:
    """Whole numbers of pixels, 0 to :data:`MAX_MARGIN`, at least one above 0."""
    margins = (left, top, right, bottom)
    for name, value in zip(("left", "top", "right", "bottom"), margins, strict=True):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInputError(f"the {name} margin must be a whole number of pixels, not {value!r}")
        if not 0 <= value <= MAX_MARGIN:
            raise InvalidInputError(f"the {name} margin must be 0 to {MAX_MARGIN} pixels, not {value}")
    if not any(margins):
        raise InvalidInputError("nothing to outpaint: grow at least one side (left, top, right or bottom) by pixels")
    return margins


def check_grown(width: int, height: int, margins: tuple[int, int, int, int], max_side: int, where: str = "") -> None:
    """The grown picture's sides are at most ``max_side`` (``where``: e.g. " on this server")."""
    left, top, right, bottom = margins
    grown = (width + left + right, height + top + bottom)
    if max(grown) > max_side:
        raise InvalidInputError(
            f"the picture is {width}x{height} and would grow to {grown[0]}x{grown[1]}; sides are at most {max_side} "
            f"pixels{where}: resize the picture first, or grow it less"
        )


def outpaint_canvas(
    image: Image.Image, left: int, top: int, right: int, bottom: int
) -> tuple[Image.Image, Image.Image]:
    """The picture on a canvas grown by the margins, the margin filled from the picture's edges
    (:func:`fill_masked`), and the mask of the margin (mode L, white = to draw)."""
    left, top, right, bottom = check_margins(left, top, right, bottom)
    image = image.convert("RGB")
    size = (image.width + left + right, image.height + top + bottom)
    canvas = Image.new("RGB", size)
    canvas.paste(image, (left, top))
    mask = Image.new("L", size, 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return fill_masked(canvas, mask), mask


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``image`` with its masked area (white in ``mask``) filled by the colours around it: the unmasked pixels
    blurred from wide to narrow radii and laid over one another (A1111's "fill"), fading to their mean colour where
    the blurs hardly reach; unmasked pixels unchanged."""
    keep = ImageOps.invert(mask.convert("L"))
    layer = Image.new("RGBa", image.size)
    layer.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    filled = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = layer.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(blurred)
    # The blurs reach a few hundred pixels: beyond, the layers are transparent and their colour black (it shows below
    # strength 1 on a wide margin), and where they are nearly so their 8-bit colour is off. There the fill fades to
    # the kept pixels' mean colour; where they cover an eighth or more it is A1111's.
    mean = ImageStat.Stat(image.convert("RGB"), keep).mean
    cover = filled.getchannel("A").point(lambda a: min(255, 8 * a))
    filled = Image.composite(filled.convert("RGB"), Image.new("RGB", image.size, tuple(round(c) for c in mean)), cover)
    out = image.convert("RGB")
    out.paste(filled, mask=mask.convert("L"))
    return out
