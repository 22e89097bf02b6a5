"""A deterministic synthetic image-text set: coloured shapes drawn with Pillow, captioned in Chinese.

Each sample shows one shape on a pale background; its caption names the visual attributes that
tell it apart, e.g. ``一个大的红色圆形在左边`` (size × colour × shape × position: 2 × 8 × 5 × 5 =
400 distinct captions). The first 400 indices cover every caption once, in a seeded order; later
indices repeat captions with new jitter. Colour, size and position are jittered per sample, so no
two images are the same. Used by ``taiyi train clip --data synthetic:N``, the tests and the
benchmarks: it needs no download, and a text tower trained on it measurably learns to retrieve.
"""

from __future__ import annotations

import random

import torch.utils.data
from PIL import Image, ImageDraw

from ..data import Pair
from ..errors import InvalidInputError

PREFIX = "synthetic:"
MAX_SIZE = 10_000_000

COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("红色", (220, 30, 30)),
    ("绿色", (30, 160, 50)),
    ("蓝色", (30, 60, 220)),
    ("黄色", (235, 205, 20)),
    ("紫色", (140, 50, 180)),
    ("橙色", (245, 135, 20)),
    ("黑色", (25, 25, 25)),
    ("青色", (20, 190, 200)),
)
SHAPES: tuple[str, ...] = ("圆形", "方块", "三角形", "菱形", "十字")
POSITIONS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("左边", (0.27, 0.5)),
    ("右边", (0.73, 0.5)),
    ("上面", (0.5, 0.27)),
    ("下面", (0.5, 0.73)),
    ("中间", (0.5, 0.5)),
)
SIZES: tuple[tuple[str, float], ...] = (("大的", 0.42), ("小的", 0.22))  # shape width / image width


def parse_synthetic(source: str) -> int | None:
    """``"synthetic:N"`` → N; ``None`` for any other source.

    Raises:
        InvalidInputError: the source starts with ``synthetic:`` but N is not a positive integer.
    """
    if not source.startswith(PREFIX):
        return None
    text = source[len(PREFIX) :]
    if not text.isdigit() or not 0 < int(text) <= MAX_SIZE:
        raise InvalidInputError(
            f"synthetic data source {source!r} needs a pair count from 1 to {MAX_SIZE}, e.g. synthetic:256"
        )
    return int(text)


class SyntheticPairs(torch.utils.data.Dataset):
    """``pairs[i]`` is a :class:`taiyi.data.Pair` whose RGB image is ``image_size`` square.

    Args:
        size: number of pairs.
        image_size: side of the drawn images in pixels (use the image tower's input size).
        seed: which order the attribute combinations come in, and the jitter.
    """

    def __init__(self, size: int, *, image_size: int = 224, seed: int = 0):
        if size < 1:
            raise InvalidInputError(f"a synthetic set needs at least one pair, not {size}")
        if image_size < 16:
            raise InvalidInputError(f"synthetic images must be at least 16 pixels wide, not {image_size}")
        self.size, self.image_size, self.seed = size, image_size, seed
        self.name = f"{PREFIX}{size}"
        n = len(COLOURS) * len(SHAPES) * len(POSITIONS) * len(SIZES)
        self._order = list(range(n))
        random.Random(f"taiyi-synthetic-order:{seed}").shuffle(self._order)

    def __len__(self) -> int:
        return self.size

    def keys(self) -> list[str]:
        return [str(i) for i in range(self.size)]

    def attributes(self, index: int) -> dict[str, str]:
        """The Chinese words of sample ``index``: ``{"size", "colour", "shape", "position"}``."""
        combo = self._order[range(self.size)[index] % len(self._order)]
        combo, size = divmod(combo, len(SIZES))
        combo, position = divmod(combo, len(POSITIONS))
        colour, shape = divmod(combo, len(SHAPES))
        return {
            "size": SIZES[size][0],
            "colour": COLOURS[colour][0],
            "shape": SHAPES[shape],
            "position": POSITIONS[position][0],
        }

    def caption(self, index: int) -> str:
        a = self.attributes(index)
        return f"一个{a['size']}{a['colour']}{a['shape']}在{a['position']}"

    def __getitem__(self, index: int) -> Pair:
        index = range(self.size)[index]
        a = self.attributes(index)
        rng = random.Random(f"taiyi-synthetic:{self.seed}:{index}")
        s = self.image_size
        grey = rng.randint(215, 245)
        background = tuple(grey + rng.randint(-6, 6) for _ in range(3))
        image = Image.new("RGB", (s, s), background)
        colour = next(rgb for name, rgb in COLOURS if name == a["colour"])
        colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in colour)
        fx, fy = next(xy for name, xy in POSITIONS if name == a["position"])
        width = next(w for name, w in SIZES if name == a["size"]) * s * rng.uniform(0.85, 1.1)
        cx = (fx + rng.uniform(-0.04, 0.04)) * s
        cy = (fy + rng.uniform(-0.04, 0.04)) * s
        _draw_shape(ImageDraw.Draw(image), a["shape"], cx, cy, width / 2, colour)
        return Pair(str(index), image, self.caption(index))

    def __repr__(self) -> str:
        return f"SyntheticPairs({self.size}, image_size={self.image_size}, seed={self.seed})"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    if shape == "圆形":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "方块":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=colour)
    elif shape == "三角形":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
    elif shape == "菱形":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=colour)
    elif shape == "十字":
        t = r * 0.32
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)
    else:  # pragma: no cover - SHAPES lists every shape drawn above
        raise ValueError(f"unknown shape {shape!r}")
