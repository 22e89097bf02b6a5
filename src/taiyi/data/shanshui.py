"""The 山水 world: procedural Chinese landscapes with true attributes and captions.

A miniature, fully known stand-in for web-scale image-text data, on which the project reproduces
the Taiyi recipe (CLIP, then Stable Diffusion) and judges what the models draw. Every scene has
six attributes (:class:`Scene`); :func:`render` paints it deterministically from a seed in one of
four styles; :func:`caption_zh`, :func:`caption_en` and :func:`caption_mixed` describe it with
many templates; :func:`prompt_zh` / :func:`prompt_en` / :func:`prompt_mixed` give fixed
full-attribute prompts from a separate template set for evaluation; :data:`HELD_OUT` lists
attribute combinations that never appear in training (``split="train"``) so composition can be
measured; :class:`ShanshuiDataset` and :func:`write_folder` serve it as image-caption pairs.

Needs only NumPy and Pillow (plus ``torch.utils.data`` for :class:`ShanshuiDataset`). Fast: a
64×64 scene renders in well under 2 ms on one core (``python -m taiyi.data.shanshui --bench``).

The visual contract every rendered image keeps (checked by :func:`contract_failures`, documented
with the attribute table, held-out set and caption examples in ``docs/shanshui.md``):

- the sky is the top quarter of the image; only sky, stars, sun and moon are painted there (land
  stops at 28 % of the height) and the sky measures include the sun/moon disc;
- 正午: mean(B) − mean(R) ≥ 0.15 and mean(B) ≥ mean(G) in the sky (写实, 水彩, 油画);
- 黄昏: mean(R) − mean(B) ≥ 0.20 in the sky (写实, 水彩, 油画);
- 夜晚: mean sky luminance < 0.25; 清晨: mean sky luminance > 0.60 (every style, 水墨 included);
- 水墨: mean chroma (max − min of R, G, B) < 0.05 over the whole image;
- 油画: mean HSV saturation ≥ that of the same scene and seed in 写实 + 0.15, and ≥ 0.30;
- 水彩: mean luminance ≥ 写实's + 0.04 and high-frequency energy ≤ 0.80 × 写实's.

Command line::

    python -m taiyi.data.shanshui --sheet sheet.png      # contact sheet: rows of scenes × 4 styles
    python -m taiyi.data.shanshui --folder out/ --n 100  # x.png + x.txt + x.json pairs
    python -m taiyi.data.shanshui --bench                # scenes per second at --size
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch.utils.data
from PIL import Image, ImageFilter

from ..errors import InvalidInputError, OutputError, TaiyiError
from .pairs import Pair

__all__ = [
    "CAPTION_KINDS",
    "CONTRACT",
    "HELD_OUT",
    "LANDS",
    "SKIES",
    "SPLITS",
    "STYLES",
    "THINGS",
    "TIMES",
    "WATERS",
    "Caption",
    "Combination",
    "Scene",
    "ShanshuiDataset",
    "all_scenes",
    "caption_en",
    "caption_mixed",
    "caption_zh",
    "contact_sheet",
    "contract_failures",
    "english",
    "image_stats",
    "is_held_out",
    "make_caption",
    "prompt_en",
    "prompt_mixed",
    "prompt_zh",
    "render",
    "sample_scene",
    "sky_stats",
    "words_for",
    "write_folder",
]

# --------------------------------------------------------------------------------------------------
# Attributes

TIMES: tuple[str, ...] = ("清晨", "正午", "黄昏", "夜晚")
SKIES: tuple[str | None, ...] = ("太阳", "月亮", None)
LANDS: tuple[str, ...] = ("高山", "丘陵", "平原")
WATERS: tuple[str | None, ...] = ("江河", "湖泊", "瀑布", None)
THINGS: tuple[str, ...] = ("小桥", "人家", "松树")
STYLES: tuple[str, ...] = ("写实", "水墨", "水彩", "油画")

_ENGLISH = {
    "清晨": "dawn",
    "正午": "noon",
    "黄昏": "dusk",
    "夜晚": "night",
    "太阳": "sun",
    "月亮": "moon",
    "高山": "peaks",
    "丘陵": "hills",
    "平原": "plain",
    "江河": "river",
    "湖泊": "lake",
    "瀑布": "waterfall",
    "小桥": "bridge",
    "人家": "houses",
    "松树": "pines",
    "写实": "realistic",
    "水墨": "ink",
    "水彩": "watercolor",
    "油画": "oil",
}
_CHINESE = {en: zh for zh, en in _ENGLISH.items()}
_VALUES = {"time": TIMES, "sky": SKIES, "land": LANDS, "water": WATERS, "style": STYLES}
_SUN_TIMES = ("清晨", "正午")
_MOON_TIMES = ("黄昏", "夜晚")


def english(value: str | None) -> str:
    """The English name of an attribute value (``"黄昏"`` → ``"dusk"``; ``None`` → ``"none"``)."""
    if value is None:
        return "none"
    try:
        return _ENGLISH[value]
    except KeyError:
        raise InvalidInputError(f"{value!r} is not a 山水 attribute value; use one of {', '.join(_ENGLISH)}") from None


@dataclass(frozen=True)
class Scene:
    """One 山水 scene: six attributes, in Chinese. Invalid combinations cannot be built.

    Rules of the world: the sun (太阳) appears only at 清晨/正午 and the moon (月亮) only at 黄昏/夜晚;
    a bridge (小桥) needs water to cross; a waterfall (瀑布) needs a cliff, so not on 平原.
    ``things`` may be given as any iterable and is stored as a frozenset; iterate it through
    :attr:`things_in_order` for a stable order.
    """

    time: str
    sky: str | None
    land: str
    water: str | None
    things: frozenset[str]
    style: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "things", frozenset(self.things))
        for field, allowed in _VALUES.items():
            if getattr(self, field) not in allowed:
                names = ", ".join("None" if v is None else v for v in allowed)
                raise InvalidInputError(f"Scene {field}={getattr(self, field)!r} is invalid; use one of {names}")
        if not self.things <= set(THINGS):
            raise InvalidInputError(f"Scene things={sorted(self.things)!r} is invalid; use a subset of {THINGS}")
        if self.sky == "太阳" and self.time not in _SUN_TIMES:
            raise InvalidInputError(f"the sun only appears at 清晨 or 正午, not {self.time}; use sky='月亮' or None")
        if self.sky == "月亮" and self.time not in _MOON_TIMES:
            raise InvalidInputError(f"the moon only appears at 黄昏 or 夜晚, not {self.time}; use sky='太阳' or None")
        if "小桥" in self.things and self.water is None:
            raise InvalidInputError(
                "a 小桥 needs water to cross; give water='江河', '湖泊' or '瀑布', or drop the bridge"
            )
        if self.water == "瀑布" and self.land == "平原":
            raise InvalidInputError("a 瀑布 needs a cliff; use land='高山' or '丘陵' with a waterfall")

    @property
    def things_in_order(self) -> tuple[str, ...]:
        """``things`` in the canonical order 小桥, 人家, 松树 (a frozenset's own order varies by process)."""
        return tuple(t for t in THINGS if t in self.things)

    def as_dict(self, lang: str = "zh") -> dict:
        """JSON-ready attributes, ``lang="zh"`` (Chinese values) or ``"en"`` (English names; None → "none")."""
        if lang == "zh":
            return {
                "time": self.time,
                "sky": self.sky,
                "land": self.land,
                "water": self.water,
                "things": list(self.things_in_order),
                "style": self.style,
            }
        if lang == "en":
            return {
                "time": english(self.time),
                "sky": english(self.sky),
                "land": english(self.land),
                "water": english(self.water),
                "things": [english(t) for t in self.things_in_order],
                "style": english(self.style),
            }
        raise InvalidInputError(f"lang={lang!r} is invalid; use 'zh' or 'en'")

    @property
    def en(self) -> dict:
        """The attributes by their English names (``{"time": "dusk", "sky": "moon", ...}``)."""
        return self.as_dict("en")

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        """Build from :meth:`as_dict` output, Chinese or English values (``"none"``/``None`` for no sky or water)."""

        def zh(value):
            if value is None or value == "none":
                return None
            return _CHINESE.get(value, value)

        try:
            return cls(
                time=zh(data["time"]),
                sky=zh(data.get("sky")),
                land=zh(data["land"]),
                water=zh(data.get("water")),
                things=frozenset(zh(t) for t in data.get("things", ())),
                style=zh(data["style"]),
            )
        except KeyError as exc:
            raise InvalidInputError(f"scene dict lacks {exc.args[0]!r}; it needs time, land and style") from None


# --------------------------------------------------------------------------------------------------
# Sampling and the held-out combinations


@dataclass(frozen=True)
class Combination:
    """A combination of attribute values; ``things`` values mean "the scene contains this thing"."""

    name: str  # short English label for reports
    values: tuple[tuple[str, str], ...]  # (field, value) pairs

    def matches(self, scene: Scene) -> bool:
        """True when ``scene`` has every value of the combination."""
        for field, value in self.values:
            if field == "things":
                if value not in scene.things:
                    return False
            elif getattr(scene, field) != value:
                return False
        return True

    def __str__(self) -> str:
        return "+".join(value for _, value in self.values)


# Held out of every training split. Each is a pair or triple, so every single attribute value is
# still seen in training (checked by the tests); together they cover all six attributes.
HELD_OUT: tuple[Combination, ...] = (
    Combination("waterfall at night", (("time", "夜晚"), ("water", "瀑布"))),
    Combination("ink lake at dusk", (("style", "水墨"), ("time", "黄昏"), ("water", "湖泊"))),
    Combination("bridge on the plain at noon", (("time", "正午"), ("land", "平原"), ("things", "小桥"))),
    Combination("moon in oil", (("style", "油画"), ("sky", "月亮"))),
    Combination("pines on peaks in watercolor", (("style", "水彩"), ("land", "高山"), ("things", "松树"))),
    Combination("river in the hills at dawn", (("time", "清晨"), ("land", "丘陵"), ("water", "江河"))),
)

SPLITS = ("train", "heldout", "all")


def is_held_out(scene: Scene) -> bool:
    """True when ``scene`` has any :data:`HELD_OUT` combination (never produced by ``split="train"``)."""
    return any(combo.matches(scene) for combo in HELD_OUT)


def _generator(rng: np.random.Generator | int | Sequence[int]) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"rng={rng!r} is invalid; give a numpy Generator, a seed int or a list of ints"
        ) from None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InvalidInputError(f"split={split!r} is invalid; use one of {', '.join(SPLITS)}")


def _draw_scene(g: np.random.Generator) -> Scene:
    """One scene from the world's natural frequencies (see docs/shanshui.md)."""
    u = g.random(12)
    time_ = TIMES[int(u[0] * 4)]
    # A sky object in 60 % of scenes: the one that fits the time.
    sky = ("太阳" if time_ in _SUN_TIMES else "月亮") if u[1] < 0.6 else None
    land = LANDS[int(u[2] * 3)]
    waters = WATERS if land != "平原" else ("江河", "湖泊", None)
    water = waters[int(u[3] * len(waters))]
    things = set()
    if water is not None and u[4] < 0.5:
        things.add("小桥")
    if u[5] < 0.45:
        things.add("人家")
    if u[6] < 0.45:
        things.add("松树")
    style = STYLES[int(u[7] * 4)]
    return Scene(time_, sky, land, water, frozenset(things), style)


def sample_scene(rng: np.random.Generator | int | Sequence[int], split: str = "train") -> Scene:
    """Draw a valid scene.

    Args:
        rng: a numpy ``Generator`` (advanced in place) or a seed for one.
        split: ``"train"`` never returns a :data:`HELD_OUT` combination (rejection sampling, so the
            other frequencies are the world's own); ``"heldout"`` picks one held-out combination
            uniformly, then a scene having it; ``"all"`` samples the whole world.
    """
    _check_split(split)
    g = _generator(rng)
    if split == "heldout":
        combo = HELD_OUT[int(g.integers(len(HELD_OUT)))]
        while not combo.matches(scene := _draw_scene(g)):
            pass
        return scene
    while True:
        scene = _draw_scene(g)
        if split == "all" or not is_held_out(scene):
            return scene


def all_scenes(split: str = "all") -> Iterator[Scene]:
    """Every valid scene of the world (4 × … combinations), in a fixed order, optionally one split only."""
    _check_split(split)
    subsets = [frozenset(c) for r in range(4) for c in itertools.combinations(THINGS, r)]
    for time_, sky, land, water, things, style in itertools.product(TIMES, SKIES, LANDS, WATERS, subsets, STYLES):
        try:
            scene = Scene(time_, sky, land, water, things, style)
        except InvalidInputError:
            continue
        if split == "all" or (split == "heldout") == is_held_out(scene):
            yield scene


# --------------------------------------------------------------------------------------------------
# Rendering. Everything is painted in float32 planar RGB (3, S, S), 0–1, in normalised coordinates
# (x right, y down, both 0–1), so one seed gives the same composition at every size. Shapes get
# anti-aliased edges from signed distances measured in pixels.

MIN_SIZE, MAX_SIZE = 32, 1024
SKY_FRACTION = 0.25  # the contract's sky: the top quarter of the image
_LAND_TOP = 0.28  # no land, water or thing ever reaches above this line

# (top of the sky, horizon) per time; each scene jitters them a little.
_SKY = {
    "清晨": ((0.80, 0.83, 0.92), (1.00, 0.87, 0.74)),
    "正午": ((0.18, 0.42, 0.84), (0.62, 0.80, 0.95)),
    "黄昏": ((0.66, 0.25, 0.30), (1.00, 0.58, 0.22)),
    "夜晚": ((0.02, 0.03, 0.09), (0.13, 0.16, 0.31)),
}
# How the light of each time colours the land: colour * mul + add.
_LIGHT = {
    "清晨": ((0.82, 0.80, 0.82), (0.14, 0.11, 0.11)),
    "正午": ((1.00, 1.00, 1.00), (0.00, 0.00, 0.00)),
    "黄昏": ((0.78, 0.55, 0.45), (0.04, 0.01, 0.00)),
    "夜晚": ((0.17, 0.20, 0.34), (0.00, 0.00, 0.01)),
}
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@functools.lru_cache(maxsize=8)
def _axis(size: int) -> np.ndarray:
    """Pixel centres in normalised units, (S,)."""
    return ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)


def _cover(distance_px: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (positive inside)."""
    return np.minimum(np.maximum(distance_px + 0.5, 0.0), 1.0)


def _c(color) -> np.ndarray:
    return np.array(color, np.float32).reshape(3, 1, 1)


def _mix(a, b, t: float) -> tuple[float, float, float]:
    """``a`` moved a fraction ``t`` of the way to ``b`` (colours as 3-tuples)."""
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t)


class _Draws:
    """A fixed block of uniforms for one element, so that elements never shift each other's draws."""

    def __init__(self, values: np.ndarray):
        self.values, self.at = values, 0

    def u(self, lo: float = 0.0, hi: float = 1.0) -> float:
        value = lo + (hi - lo) * float(self.values[self.at % len(self.values)])
        self.at += 1
        return value

    def i(self, n: int) -> int:
        return min(int(self.u() * n), n - 1)

    def vector(self, n: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
        at = self.at % len(self.values)
        self.at += n
        return lo + (hi - lo) * np.resize(np.roll(self.values, -at), n)


class _Painter:
    """The canvas of one render, with the scene's light and the layout's random draws."""

    SLOTS = 128  # uniforms per element (the most any element uses is about 80)

    def __init__(self, scene: Scene, size: int, g: np.random.Generator):
        self.scene, self.size = scene, size
        self.ax = _axis(size)
        self.Y, self.X = self.ax[:, None], self.ax[None, :]
        blocks = g.random((len(_ELEMENTS), self.SLOTS))
        self.draws = {name: _Draws(blocks[k]) for k, name in enumerate(_ELEMENTS)}
        self.tex = np.random.default_rng(g.integers(2**63))  # textures: size-dependent, so drawn last
        self.light = _LIGHT[scene.time]
        self.rgb = np.empty((3, size, size), np.float32)
        self.wet = np.zeros((size, size), np.float32)  # water coverage, for placing things on dry land
        self.solid = np.zeros((size, size), np.float32)  # land coverage: everything that is not sky
        self.occupied: list[tuple[float, float, float, float]] = []
        self.orb: tuple[float, tuple] | None = None  # (x, colour) of the sun or moon, for reflections
        self.lake: tuple[float, float, float, float] | None = None  # centre x, y and radii, for the bridge
        self.river: tuple | None = None  # the river's (or waterfall stream's) course, see _river_at

    def lit(self, color: tuple[float, float, float]) -> tuple[float, float, float]:
        (m0, m1, m2), (a0, a1, a2) = self.light
        return (color[0] * m0 + a0, color[1] * m1 + a1, color[2] * m2 + a2)

    def rows(self, lo: float, hi: float) -> slice:
        return slice(max(int(np.floor(lo * self.size)) - 1, 0), min(int(np.ceil(hi * self.size)) + 1, self.size))

    def paint(self, cover: np.ndarray, color, sy: slice = slice(None), sx: slice = slice(None)) -> None:
        region = self.rgb[:, sy, sx]  # a view: painted in place
        if not isinstance(color, np.ndarray):
            color = _c(color)
        region += (color - region) * cover


# Each element of a layout draws from its own block of uniforms, so adding a house never moves a peak.
_ELEMENTS = ("sky", "orb", "stars", "far", "mid", "near", "water", "bridge", "houses", "pines", "cliff")


def render(scene: Scene, size: int = 64, rng: np.random.Generator | int | Sequence[int] = 0) -> Image.Image:
    """Paint ``scene`` as an RGB image, deterministic for (scene, size, seed).

    The layout (peak positions, river course, where houses stand) depends only on the seed, not on
    the size or the style, so one seed renders the same composition at any size and in every style.

    Args:
        scene: what to paint.
        size: width and height in pixels, 32 to 1024 (the visual contract is checked from 32 up).
        rng: a numpy ``Generator`` (advanced in place) or a seed (int or list of ints) for one.
    """
    if not isinstance(scene, Scene):
        raise InvalidInputError(f"render() needs a Scene, got {type(scene).__name__}; build one with Scene(...)")
    if not isinstance(size, int) or isinstance(size, bool) or not MIN_SIZE <= size <= MAX_SIZE:
        raise InvalidInputError(f"size={size!r} is invalid; give an int from {MIN_SIZE} to {MAX_SIZE}")
    p = _Painter(scene, size, _generator(rng))
    horizon = _paint_sky(p)
    _paint_orb(p)
    ground = _paint_land(p, horizon)
    _paint_water(p, ground, horizon)
    _paint_things(p, ground)
    return _STYLE_PASSES[scene.style](p)


# ----- sky


def _paint_sky(p: _Painter) -> tuple[tuple, tuple]:
    d = p.draws["sky"]
    top, horizon = _SKY[p.scene.time]
    shift = d.u(-0.025, 0.025)
    top = tuple(min(max(c + shift + d.u(-0.02, 0.02), 0.0), 1.0) for c in top)
    horizon = tuple(min(max(c + shift, 0.0), 1.0) for c in horizon)
    t = np.minimum(p.ax * (1 / 0.62), 1.0) ** 1.2  # (S,)
    p.rgb[:] = (_c(top)[:, :, 0] + _c(horizon)[:, :, 0] * t - _c(top)[:, :, 0] * t)[:, :, None]
    if p.scene.time == "夜晚":
        s = p.draws["stars"]
        n = 18
        ys = (s.vector(n, 0.01, 0.5) * p.size).astype(int)
        xs = (s.vector(n, 0.01, 0.99) * p.size).astype(int)
        p.rgb[:, ys, xs] = s.vector(n, 0.45, 0.85).astype(np.float32)
    return top, horizon


def _paint_orb(p: _Painter) -> None:
    """The sun or the moon, always inside the top quarter; the contract's sky measures include it."""
    sky = p.scene.sky
    if sky is None:
        return
    d = p.draws["orb"]
    cx, cy, r = d.u(0.14, 0.86), d.u(0.10, 0.15), d.u(0.045, 0.06)
    glow_r = 3.2 * r
    sy, sx = p.rows(cy - glow_r, cy + glow_r), p.rows(cx - glow_r, cx + glow_r)
    dist = np.sqrt((p.Y[sy] - cy) ** 2 + (p.X[:, sx] - cx) ** 2)  # normalised
    time_ = p.scene.time
    if sky == "太阳":
        disc, glow, strength = {
            "清晨": ((1.00, 0.55, 0.32), (1.00, 0.80, 0.62), 0.45),
            "正午": ((1.00, 0.98, 0.86), (1.00, 0.97, 0.85), 0.22),
        }[time_]
    else:
        disc, glow, strength = {
            "黄昏": ((1.00, 0.93, 0.78), (1.00, 0.85, 0.70), 0.18),
            "夜晚": ((0.98, 0.96, 0.86), (0.55, 0.58, 0.70), 0.20),
        }[time_]
    p.orb = (cx, disc)
    halo = strength * np.exp(-np.maximum(dist - r, 0.0) / (0.8 * r)) * (dist < glow_r)
    p.paint(halo, glow, sy, sx)
    p.paint(_cover((r - dist) * p.size), disc, sy, sx)
    if sky == "月亮":  # a crescent: the sky's own colour covers most of the disc, so it can't pass for a sun
        ox, oy = d.u(0.35, 0.6) * r * (1 if cx < 0.5 else -1), -0.25 * r
        bite = np.sqrt((p.Y[sy] - cy - oy) ** 2 + (p.X[:, sx] - cx - ox) ** 2)
        color = _c(p.rgb[:, int(cy * p.size), min(int((cx + ox + 1.6 * r) * p.size), p.size - 1)])
        p.paint(_cover((0.92 * r - bite) * p.size) * _cover((r + 0.5 / p.size - dist) * p.size), color, sy, sx)


# ----- land


def _layer(p: _Painter, h: np.ndarray, top, bottom, depth: float, haze: float, horizon, shade=None) -> None:
    """Fill everything below the profile ``h`` (S,) with a vertical gradient from ``top`` to ``bottom``."""
    sy = p.rows(float(h.min()), 1.0)
    below = p.Y[sy] - h  # (s, S): how far under the profile, normalised
    cover = _cover(below * p.size)
    t = np.minimum(below * (1.0 / depth), 1.0)
    # Atmospheric perspective: far layers fade towards the colour of the horizon.
    top, bottom = _c(_mix(p.lit(top), horizon, haze)), _c(_mix(p.lit(bottom), horizon, haze))
    color = top + (bottom - top) * t  # (3, s, S)
    if shade is not None:
        color *= shade
    p.paint(cover, color, sy)
    np.maximum(p.solid[sy], cover, out=p.solid[sy])


def _mist(p: _Painter, y: float, width: float, alpha: float, color) -> None:
    """A horizontal band of mist, the 山水 painter's way of separating near from far."""
    sy = p.rows(y - 2.5 * width, y + 2.5 * width)
    band = alpha * np.exp(-(((p.Y[sy] - y) / width) ** 2))
    p.paint(np.broadcast_to(band, (band.shape[0], p.size)), color, sy)


def _peaks(p: _Painter, d: _Draws, n: int, tops, widths, base: float, sharp=(0.5, 1.8)):
    """A range of steep peaks: profile (S,), and a per-column shade (rims and the shadow side darker)."""
    x = p.ax
    h = np.full(p.size, base, np.float32)
    rim = np.ones(p.size, np.float32)
    side = np.zeros(p.size, np.float32)
    for k in range(n):
        c = (k + d.u(0.2, 0.8)) / n * 1.1 - 0.05
        w, top, power = d.u(*widths), d.u(*tops), d.u(*sharp)  # power < 1: a spire; > 1: a rounded pillar
        dist = np.minimum(np.abs(x - c) / w, 1.0)
        hp = top + (base - top) * dist**power
        closer = hp < h
        h = np.where(closer, hp, h)
        rim = np.where(closer, dist, rim)
        side = np.where(closer, x - c, side)
    for _ in range(2):  # jagged ridges: a few high-frequency notches
        f, phase, a = d.u(9, 19), d.u(0, 6.28), d.u(0.004, 0.01)
        h = h + a * np.abs(np.sin(f * 3.14159 * x + phase))
    texture = 1.0 + 0.07 * np.sin(x * d.u(90, 130) + d.u(0, 6.28)) * np.sin(x * d.u(30, 50))  # 皴: vertical strokes
    shade = (1.0 - 0.3 * rim**2) * np.where(side < 0, 1.0, 0.86) * texture
    return np.maximum(h, _LAND_TOP).astype(np.float32), shade.astype(np.float32)


def _hills(p: _Painter, d: _Draws, level: float, amp: float, freq=(0.6, 1.6)):
    """A rolling profile (S,) and a shade lighter on the slopes that face the light (from the left)."""
    x = p.ax
    h = np.full(p.size, level, np.float32)
    for k in range(3):
        f, phase = d.u(*freq) * (k + 1), d.u(0, 6.28)
        h = h + amp / (k + 1) * np.sin(f * 3.14159 * x + phase)
    slope = np.diff(h, append=h[-1]) * p.size  # dy/dx in normalised units; < 0 rises to the right
    shade = 1.0 + np.clip(slope * 0.6, -0.12, 0.12)
    return np.maximum(h, _LAND_TOP).astype(np.float32), shade.astype(np.float32)


def _paint_land(p: _Painter, sky: tuple[tuple, tuple]) -> float:
    """Land layers back to front; returns the ground line (where the flat foreground begins)."""
    horizon = sky[1]
    land = p.scene.land
    far, mid, near = p.draws["far"], p.draws["mid"], p.draws["near"]
    mist = _mix(horizon, p.lit((0.94, 0.94, 0.92)), 0.5)
    if land == "高山":
        h, shade = _peaks(p, far, 5, (0.30, 0.42), (0.08, 0.16), 0.62)
        _layer(p, h, (0.36, 0.46, 0.54), (0.80, 0.82, 0.82), 0.28, 0.45, horizon, shade)
        _mist(p, 0.58, 0.04, 0.6, mist)
        h, shade = _peaks(p, mid, 4, (0.29, 0.44), (0.06, 0.12), 0.74, (0.7, 2.4))
        _layer(p, h, (0.14, 0.30, 0.28), (0.62, 0.66, 0.60), 0.36, 0.06, horizon, shade)
        _mist(p, 0.68, 0.035, 0.7, mist)
        ground = 0.70
    elif land == "丘陵":
        h, shade = _hills(p, far, 0.45, 0.05)
        _layer(p, h, (0.36, 0.52, 0.52), (0.70, 0.76, 0.72), 0.15, 0.45, horizon, shade)
        _mist(p, 0.53, 0.03, 0.5, mist)
        h, shade = _hills(p, mid, 0.54, 0.055)
        _layer(p, h, (0.30, 0.52, 0.26), (0.56, 0.62, 0.38), 0.2, 0.08, horizon, shade)
        ground = 0.66
    else:
        level = far.u(0.54, 0.58)
        h, _ = _hills(p, far, level - 0.035, 0.012, (1.0, 2.5))
        _layer(p, h, (0.44, 0.52, 0.60), (0.66, 0.70, 0.72), 0.05, 0.5, horizon)
        h, _ = _hills(p, mid, level - 0.01, 0.005, (6.0, 12.0))  # a far line of trees
        _layer(p, h, (0.18, 0.34, 0.22), (0.26, 0.38, 0.24), 0.03, 0.25, horizon)
        h = np.full(p.size, level, np.float32)
        _layer(p, h, (0.64, 0.70, 0.42), (0.44, 0.58, 0.26), 0.45, 0.1, horizon)
        # Fields in strips that widen towards the viewer.
        sy = p.rows(level, 1.0)
        z = 1.0 / np.maximum(p.Y[sy] - level + 0.03, 0.03)
        strips = (np.sin(z * 1.6 + near.u(0, 6.28) + 0.2 * np.sin(p.X * 3.0)) > 0.1) * np.float32(0.3)
        p.paint(strips, p.lit((0.80, 0.72, 0.36)), sy)
        return level + 0.02
    h, shade = _hills(p, near, ground, 0.012)
    _layer(p, h, (0.46, 0.58, 0.30), (0.34, 0.42, 0.24), 0.3, 0.0, horizon, shade)
    return ground


# ----- water


# How water looks at each time: (share of the sky's horizon colour it reflects, brightening of that reflection)
_WATER = {"清晨": (0.4, 1.0), "正午": (0.35, 1.0), "黄昏": (0.55, 1.05), "夜晚": (0.6, 2.4)}


def _water_color(p: _Painter, sky_horizon, sy: slice) -> np.ndarray:
    """(3, s, S): deep blue-green mixed with the reflected sky, rippled, with a glittering path under the
    sun or moon."""
    share, gain = _WATER[p.scene.time]
    base = _mix(p.lit((0.10, 0.36, 0.56)), tuple(min(c * gain, 1.0) for c in sky_horizon), share)
    wave = np.sin(p.Y[sy] * (p.size * 1.9) + 2.0 * np.sin(p.X * 23.0)) * np.sin(p.X * 7.0 + 1.0)  # (s, S)
    color = _c(base) * (1.0 + 0.06 * wave)
    color += (_c(_mix(base, (1.0, 1.0, 1.0), 0.5)) - color) * (0.4 * np.maximum(wave - 0.6, 0.0))  # sparkles
    if p.orb is not None:
        glitter = 0.35 * np.exp(-(((p.X - p.orb[0]) * (1 / 0.025)) ** 2)) * (wave > 0.5)
        color += (_c(p.orb[1]) - color) * glitter
    return color


def _paint_water(p: _Painter, ground: float, sky: tuple[tuple, tuple]) -> None:
    water = p.scene.water
    if water is None:
        return
    d = p.draws["water"]
    horizon = sky[1]
    if water == "江河":
        _river(p, d, ground - 0.01, d.u(0.3, 0.7), d.u(0.25, 0.75), 0.012, d.u(0.22, 0.3), horizon)
    elif water == "湖泊":
        cx, cy = d.u(0.35, 0.65), d.u(0.8, 0.85)
        rx, ry = d.u(0.22, 0.32), d.u(0.06, 0.09)
        cy = max(cy, ground + ry + 0.02)
        sy = p.rows(cy - ry, cy + ry)
        dist = np.sqrt(((p.X - cx) / rx) ** 2 + ((p.Y[sy] - cy) / ry) ** 2)
        cover = _cover((1.0 - dist) * ry * p.size)
        # a darker shore ring, then the water
        p.paint(0.45 * _cover((1.0 - dist) * ry * p.size + 1.2), p.lit((0.16, 0.16, 0.12)), sy)
        p.paint(cover, _water_color(p, horizon, sy), sy)
        p.wet[sy] = np.maximum(p.wet[sy], cover)
        p.lake = (cx, cy, rx, ry)
    else:
        _waterfall(p, d, ground, horizon)


def _river(p: _Painter, d: _Draws, start: float, x0: float, x1: float, w0: float, w1: float, horizon) -> None:
    """A river winding from ``start`` (narrow, far) to the bottom edge (wide, near)."""
    sy = p.rows(start, 1.0)
    Y = p.Y[sy]
    t = np.maximum((Y - start) / (1.0 - start), 0.0)  # 0 far … 1 near
    amp, f, phase = d.u(0.05, 0.1), d.u(1.2, 2.2), d.u(0, 6.28)
    centre = x0 + (x1 - x0) * t + amp * np.sin(f * 3.14159 * t + phase) * t
    half = 0.5 * (w0 + (w1 - w0) * t**1.5)
    inside = (half - np.abs(p.X - centre)) * p.size
    cover = _cover(inside) * _cover((Y - start) * p.size)
    p.paint(0.45 * _cover(inside + 1.2) * _cover((Y - start) * p.size), p.lit((0.16, 0.16, 0.12)), sy)  # banks
    p.paint(cover, _water_color(p, horizon, sy), sy)
    p.wet[sy] = np.maximum(p.wet[sy], cover)
    p.river = (start, x0, x1, amp, f, phase, w0, w1)


def _river_at(p: _Painter, y: float) -> tuple[float, float]:
    start, x0, x1, amp, f, phase, w0, w1 = p.river
    t = max((y - start) / (1.0 - start), 0.0)
    return x0 + (x1 - x0) * t + amp * float(np.sin(f * 3.14159 * t + phase)) * t, 0.5 * (w0 + (w1 - w0) * t**1.5)


def _waterfall(p: _Painter, d: _Draws, ground: float, horizon) -> None:
    c = p.draws["cliff"]
    cx = c.u(0.3, 0.7)
    top = c.u(0.34, 0.42) if p.scene.land == "高山" else c.u(0.42, 0.48)
    half = c.u(0.1, 0.14)
    bottom = ground + 0.03
    # The cliff: a steep-faced crag, wooded on its crown, its flanks falling to the ground.
    x = p.ax
    flank = np.maximum(np.abs(x - cx) - 0.5 * half, 0.0) ** 0.75 * c.u(0.9, 1.2)  # steep, then easing
    h = top + 0.012 * np.sin(x * 55.0 + c.u(0, 6.28)) + 0.006 * np.sin(x * 130.0) + flank
    sy = p.rows(top - 0.02, bottom)
    Y = p.Y[sy]
    cover = _cover((Y - h[None, :]) * p.size) * _cover((bottom - Y) * p.size)
    t = np.clip((Y - h[None, :]) / 0.05, 0.0, 1.0)  # 0 on the crown … 1 on the rock face
    crown, face = p.lit((0.22, 0.36, 0.24)), p.lit((0.36, 0.35, 0.32))
    strata = 1.0 + 0.1 * np.sin(x * 97.0 + 0.6 * np.sin(Y * 40.0)) - 0.25 * (Y - top) / (bottom - top)
    p.paint(cover, (_c(crown) + (_c(face) - _c(crown)) * t) * strata, sy)
    np.maximum(p.solid[sy], cover, out=p.solid[sy])
    # Falling water: a pale band with vertical streaks, widening a little as it falls.
    fw = c.u(0.022, 0.032)
    sy = p.rows(top - 0.01, bottom)
    Y = p.Y[sy]
    band = fw * (1.0 + 0.6 * (Y - top) / (bottom - top))
    cover = _cover((band - np.abs(p.X - cx)) * p.size) * _cover((Y - top + 0.01) * p.size)
    streak = 0.9 + 0.1 * np.sin((p.X - cx) * 260.0)
    foam = p.lit((0.90, 0.94, 0.98))
    p.paint(cover, _c(foam) * streak, sy)
    p.wet[sy] = np.maximum(p.wet[sy], cover)
    # The plunge pool and the stream that leaves it towards the viewer.
    _river(p, d, bottom, cx, d.u(0.2, 0.8), 0.05, d.u(0.13, 0.18), horizon)
    sy = p.rows(bottom - 0.05, bottom + 0.05)
    mist = 0.7 * np.exp(-(((p.X - cx) / 0.09) ** 2) - ((p.Y[sy] - bottom) / 0.025) ** 2)
    p.paint(mist, foam, sy)


# ----- things


def _crowding(p: _Painter, x0: float, x1: float, y0: float, y1: float) -> float:
    """How badly a box is placed: water under it counts most, then overlap with things already placed."""
    sy, sx = p.rows(y0, y1), p.rows(x0, x1)
    wet = p.wet[sy, sx]
    cost = 10.0 * float(wet.max()) if wet.size else 0.0
    for a0, a1, b0, b1 in p.occupied:
        overlap = max(0.0, min(x1, a1) - max(x0, a0)) * max(0.0, min(y1, b1) - max(y0, b0))
        cost += overlap / ((x1 - x0) * (y1 - y0))
    return cost


def _spot(p: _Painter, d: _Draws, w: float, h: float, lo: float, hi: float, xs=(0.06, 0.94)):
    """The best of 12 drawn places (x centre, baseline y) for a w × h thing: dry and uncrowded."""
    best = None
    for _ in range(12):
        x, y = d.u(*xs), d.u(lo, hi)
        cost = _crowding(p, x - w / 2, x + w / 2, y - h, y)
        if best is None or cost < best[0]:
            best = (cost, x, y)
        if cost == 0.0:
            break
    _, x, y = best
    p.occupied.append((x - w / 2, x + w / 2, y - h, y))
    return x, y


def _paint_things(p: _Painter, ground: float) -> None:
    things = p.scene.things
    lo = max(ground + 0.06, 0.6)
    drawn: list[tuple[float, Callable[[], None]]] = []  # (baseline, painter): painted back to front
    if "小桥" in things:
        drawn.append(_bridge(p))
    if "人家" in things:
        d = p.draws["houses"]
        scale = d.u(0.9, 1.15)
        for _ in range(1 + d.i(3)):
            s = scale * d.u(0.85, 1.1)
            x, y = _spot(p, d, 0.1 * s, 0.1 * s, lo + 0.04, 0.95)
            drawn.append((y, functools.partial(_house, p, x, y, s)))
    if "松树" in things:
        d = p.draws["pines"]
        for _ in range(1 + d.i(3)):
            s = d.u(0.9, 1.25)
            x, y = _spot(p, d, 0.1 * s, 0.19 * s, lo, 0.97, xs=(0.05, 0.95))
            drawn.append((y, functools.partial(_pine, p, x, y, s, d.u(-1, 1))))
    for _, paint in sorted(drawn, key=lambda item: item[0]):
        paint()


def _bridge(p: _Painter):
    d = p.draws["bridge"]
    stone, dark = p.lit((0.72, 0.68, 0.62)), p.lit((0.16, 0.15, 0.15))
    if p.scene.water == "湖泊":
        cx, cy, rx, ry = p.lake
        y = cy + 0.25 * ry
        half = rx * float(np.sqrt(1 - 0.25**2)) + 0.02
        height, n = 0.045, max(3, round(half / 0.05))
        p.occupied.append((cx - half, cx + half, y - height, y + 0.01))

        def paint() -> None:  # a long bridge on a row of arches across the lake, like 十七孔桥
            sy, sx = p.rows(y - height - 0.01, y + 0.01), p.rows(cx - half, cx + half)
            Y, X = p.Y[sy], p.X[:, sx]
            inside = _cover((half - np.abs(X - cx)) * p.size)
            crown = y - height - 0.012 * (1 - ((X - cx) / half) ** 2)  # the deck humps a little
            body = _cover((Y - crown) * p.size) * _cover((y - Y) * p.size) * inside
            span = 2 * half / n
            offset = ((X - (cx - half)) / span % 1.0 - 0.5) * span  # from the nearest arch's centre
            radius = 0.36 * span
            hole = _cover((radius - np.sqrt(offset**2 + np.maximum(y - Y, 0) ** 2 * 1.3)) * p.size)
            p.paint(body, stone, sy, sx)
            p.paint(body * hole, dark, sy, sx)
            p.paint(_cover((0.007 - np.abs(Y - crown)) * p.size) * inside, dark, sy, sx)

        return y, paint
    y = d.u(0.8, 0.9)
    cx, half_water = _river_at(p, y)
    half = half_water + 0.04
    rise = min(0.45 * half + 0.02, 0.09)
    thick = 0.035
    p.occupied.append((cx - half, cx + half, y - rise - thick, y + 0.01))

    def paint() -> None:  # one high arch, the classic 拱桥, its opening in shadow
        sy, sx = p.rows(y - rise - thick - 0.01, y + 0.01), p.rows(cx - half, cx + half)
        Y, X = p.Y[sy], p.X[:, sx]
        u = np.minimum(np.abs(X - cx) / half, 1.0)
        deck = y - rise * (1.0 - u**2)  # top of the deck
        opening_half = half_water * 0.9
        ou = np.abs(X - cx) / opening_half
        opening = y - (rise - thick) * np.sqrt(np.maximum(1.0 - ou**2, 0.0))
        body = _cover((Y - deck) * p.size) * _cover((y + 0.006 - Y) * p.size) * _cover((1 - u) * half * p.size)
        hole = _cover((Y - opening) * p.size) * _cover((1.0 - ou) * opening_half * p.size)
        p.paint(body, stone, sy, sx)
        p.paint(body * hole, dark, sy, sx)
        rail = _cover((0.007 - np.abs(Y - deck)) * p.size) * _cover((1 - u) * half * p.size)
        p.paint(rail, dark, sy, sx)

    return y, paint


def _house(p: _Painter, x: float, y: float, s: float) -> None:
    """A whitewashed house with a dark tiled roof and upturned eaves."""
    w, wall_h, roof_h = 0.1 * s, 0.055 * s, 0.036 * s
    sy, sx = p.rows(y - wall_h - roof_h - 0.01, y + 0.005), p.rows(x - w, x + w)
    Y, X = p.Y[sy], p.X[:, sx]
    dx = np.abs(X - x)
    wall = _cover((w / 2 - dx) * p.size) * _cover((y - Y) * p.size) * _cover((Y - (y - wall_h)) * p.size)
    p.paint(wall, p.lit((0.93, 0.91, 0.86)), sy, sx)
    door = _cover((0.011 * s - dx) * p.size) * _cover((Y - (y - wall_h * 0.55)) * p.size) * wall
    p.paint(door, p.lit((0.25, 0.2, 0.18)), sy, sx)
    eave = y - wall_h - 0.012 * s * (dx / (0.65 * w)) ** 3  # the roof's lower edge curls up at the ends
    ridge = y - wall_h - roof_h
    slope = ridge + roof_h * np.maximum(dx - 0.3 * w, 0) / (0.35 * w)
    roof = _cover((0.66 * w - dx) * p.size) * _cover((eave - Y) * p.size) * _cover((Y - slope) * p.size)
    p.paint(roof, p.lit((0.20, 0.21, 0.24)), sy, sx)


def _pine(p: _Painter, x: float, y: float, s: float, lean: float) -> None:
    """A pine in the painters' manner: a bent trunk under flat, layered tufts of needles."""
    height = 0.19 * s
    sy, sx = p.rows(y - height - 0.02, y + 0.005), p.rows(x - 0.07 * s, x + 0.07 * s)
    Y, X = p.Y[sy], p.X[:, sx]
    up = np.maximum(y - Y, 0.0) * (1.0 / height)  # 0 at the foot, 1 at the top
    trunk_x = x + lean * 0.02 * s * np.sin(up * 3.0)
    trunk = _cover((0.009 * s * (1.2 - 0.5 * up) - np.abs(X - trunk_x)) * p.size)
    trunk *= _cover((y - Y) * p.size) * _cover((Y - (y - height * 0.9)) * p.size)
    p.paint(trunk, p.lit((0.30, 0.22, 0.16)), sy, sx)
    # Three tiers, each a flat ellipse, swaying alternately with the lean: (3, 1, 1) parameters.
    level = np.array([0.45, 0.68, 0.88], np.float32).reshape(3, 1, 1)
    width = np.array([0.062, 0.05, 0.034], np.float32).reshape(3, 1, 1) * s
    tx = x + lean * 0.02 * s * np.sin(level * 3.0) + np.array([-0.01, 0.012, -0.01]).reshape(3, 1, 1) * s * lean
    ell = ((X - tx) / width) ** 2 + ((Y - (y - height * level)) * (1.0 / (0.024 * s))) ** 2
    tufts = _cover((1.0 - ell.min(axis=0)) * (0.012 * s * p.size))
    p.paint(tufts, p.lit((0.10, 0.30, 0.20)), sy, sx)


# ----- styles: each takes the painted canvas and returns the final RGB image


def _to_image(rgb: np.ndarray, lut: np.ndarray | None = None) -> Image.Image:
    """(3, S, S) float 0–1 → RGB image, optionally through a 256-entry tone curve."""
    planes = np.clip(rgb * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    if lut is not None:
        planes = lut[planes]
    return Image.merge("RGB", [Image.fromarray(plane, "L") for plane in planes])


@functools.lru_cache(maxsize=32)
def _smooth_field(size: int, cells: int) -> np.ndarray:
    """Tileable smooth noise, about −1…1, with features ``size / cells`` pixels across: random waves of
    whole-number frequencies up to ``cells``, so it wraps around seamlessly."""
    g = np.random.default_rng([size, cells])
    ax = np.arange(size, dtype=np.float64) / size * 2 * np.pi
    field = np.zeros((size, size))
    for _ in range(12):
        fy, fx = g.integers(-cells // 2, cells // 2 + 1, 2)
        field += np.cos(fy * ax[:, None] + fx * ax[None, :] + g.random() * 2 * np.pi) / (1 + np.hypot(fy, fx))
    return (field / np.abs(field).max()).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _grain(size: int) -> np.ndarray:
    """A fixed field of fine noise, N(0, 1), per size."""
    return np.random.default_rng(size).standard_normal((size, size)).astype(np.float32)


def _rolled(p: _Painter, field: np.ndarray) -> np.ndarray:
    """A cached texture moved to this render's own offset (and maybe flipped): cheap variety."""
    dy, dx, flip = (int(v) for v in p.tex.integers(0, p.size, 3))
    field = np.roll(field, (dy, dx), axis=(0, 1))
    return field[:, ::-1] if flip % 2 else field


def _low_noise(p: _Painter, cells: int) -> np.ndarray:
    """Smooth noise in about [-1, 1] at the render size, features ``size / cells`` pixels across."""
    return _rolled(p, _smooth_field(p.size, cells))


def _rolled_grain(p: _Painter) -> np.ndarray:
    return _rolled(p, _grain(p.size))


def _lut(f) -> np.ndarray:
    """A 256-entry uint8 tone curve from ``f`` on 0–1 (applied by indexing: Image.point re-reads lists)."""
    return np.array([min(max(round(255.0 * f(i / 255.0)), 0), 255) for i in range(256)], np.uint8)


def _style_plain(p: _Painter) -> Image.Image:
    return _to_image(p.rgb + 0.008 * _rolled_grain(p))


# 水墨 sky: tone = 1 − (1 − luminance) × strength — the sky's grey says the time (dawn ≈ paper, noon a
# light wash, dusk a middle grey, night a dark wash); the sun or moon stays a lighter disc.
_INK_SKY = {"清晨": 0.45, "正午": 0.5, "黄昏": 0.75, "夜晚": 0.92}
_INK_LAND = {"清晨": 1.3, "正午": 1.25, "黄昏": 1.6, "夜晚": 2.5}  # land brightened to a paper-white ground
_INK_PAPER = (1.0, 0.99, 0.97)  # a warm paper tint; chroma stays under 0.03
_INK_TINT = [_lut(lambda v, k=k: v * k) for k in _INK_PAPER[1:]]


def _style_ink(p: _Painter) -> Image.Image:
    """水墨: luminance mapped to ink tones on paper, contours where land meets sky, uneven wash, grain."""
    r, g, b = p.rgb
    L = 0.299 * r + 0.587 * g + 0.114 * b
    ink, paper = 0.06, 0.95
    land = ink + (paper - ink) * np.minimum(np.maximum(L * _INK_LAND[p.scene.time], 0.0), 1.0) ** 1.3
    sky = paper - (paper * _INK_SKY[p.scene.time]) * (1.0 - L)
    tone = sky + (land - sky) * p.solid
    edge = np.zeros_like(L)  # brush contours where the land meets the sky
    edge[:, 1:] += np.abs(np.diff(p.solid, axis=1))
    edge[1:] += np.abs(np.diff(p.solid, axis=0))
    tone *= 1.0 - 0.35 * np.minimum(edge, 1.0)
    tone *= 1.0 + 0.05 * _low_noise(p, 5)
    tone += 0.012 * _rolled_grain(p)
    grey = np.clip(tone * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    return Image.merge("RGB", [Image.fromarray(plane, "L") for plane in (grey, *(lut[grey] for lut in _INK_TINT))])


_WATERCOLOR_LUT = _lut(lambda v: v**0.78)  # lighter, transparent washes


@functools.lru_cache(maxsize=8)
def _margins(size: int) -> tuple[np.ndarray, np.ndarray, Image.Image]:
    ax = _axis(size)
    Y, X = ax[:, None], ax[None, :]
    edge = np.minimum(np.minimum(X, 1.0 - X), 1.0 - Y)  # distance to the side and bottom edges
    below_sky = np.clip((Y - SKY_FRACTION - 0.05) / 0.15, 0.0, 1.0) + 0 * X
    return edge.astype(np.float32), below_sky.astype(np.float32), Image.new("RGB", (size, size), (252, 250, 242))


def _style_watercolor(p: _Painter) -> Image.Image:
    """水彩: lighter transparent washes, soft edges, unpainted paper along a ragged margin, faint blooms."""
    edge, below_sky, paper_image = _margins(p.size)
    edge = edge + 0.035 * _low_noise(p, 9)
    paper = np.clip((0.07 - edge) * (1 / 0.06), 0.0, 0.9) + np.clip(_low_noise(p, 5) - 0.45, 0.0, 0.12)
    paper *= below_sky  # never in the sky
    mask = Image.fromarray((np.minimum(paper, 1.0) * 255.0).astype(np.uint8), "L")
    image = Image.composite(paper_image, _to_image(p.rgb, _WATERCOLOR_LUT), mask)
    return image.filter(ImageFilter.GaussianBlur(max(1.0, 0.75 * p.size / 64)))


@functools.lru_cache(maxsize=8)
def _ridges(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tileable streaky noise along the two stroke directions, as a brightness multiplier, per size."""
    noise = _grain(size)
    k = max(3, size // 12)  # stroke length in pixels
    out = []
    for step in ((0, 1), (1, 1)):
        streak = sum(np.roll(noise, (j * step[0], j * step[1]), axis=(0, 1)) for j in range(k)) / np.sqrt(k)
        out.append(np.clip(0.98 + 0.05 * streak, 0.85, 1.1).astype(np.float32))
    return out[0], out[1]


def _drag(rgb: np.ndarray, k: int, dy: int) -> np.ndarray:
    """Each pixel the mean of a run of ``k`` pixels to its right (and ``dy`` down per step): a brush drag."""
    size = rgb.shape[1]
    padded = np.pad(rgb, ((0, 0), (0, k * dy), (0, k)), mode="edge")
    total = padded[:, :size, :size].copy()
    for j in range(1, k):
        total += padded[:, j * dy : j * dy + size, j : j + size]
    return total * (1.0 / k)


def _style_oil(p: _Painter) -> Image.Image:
    """油画: saturated colour laid on in short strokes, sideways in some patches and slanting in others,
    with ridged, impasto texture."""
    # Saturation S → 1 − (1 − S)⁴ at the same hue: pale colours gain the most ...
    rgb = np.clip(p.rgb, 0.0, 1.0)
    top = rgb.max(axis=0)
    sat = 1.0 - rgb.min(axis=0) / np.maximum(top, 1e-4)
    luma = _LUMA @ rgb.reshape(3, -1)
    rgb = top - (top - rgb) * (4.0 - sat * (6.0 - sat * (4.0 - sat)))  # (1 − (1 − S)⁴) / S, a polynomial
    # ... then brightened back to the luminance it had, so a pale dawn stays light.
    rgb *= np.minimum(luma / np.maximum(_LUMA @ rgb.reshape(3, -1), 1e-3), 1.6).reshape(1, p.size, p.size)
    k = max(3, p.size // 16)
    slanting = _low_noise(p, 7) > 0.25
    rgb = np.where(slanting, _drag(rgb, k, 1), _drag(rgb, k, 0))
    across, slant = _ridges(p.size)
    return _to_image(rgb * np.where(slanting, _rolled(p, slant), _rolled(p, across)))


_STYLE_PASSES = {"写实": _style_plain, "水墨": _style_ink, "水彩": _style_watercolor, "油画": _style_oil}


# --------------------------------------------------------------------------------------------------
# The visual contract, measured


class _Planes:
    """An image as three float planes, 0–1, (3, H, W): the measures below read whole planes, fast."""

    def __init__(self, image: Image.Image | np.ndarray | _Planes):
        if isinstance(image, _Planes):
            self.rgb = image.rgb
        elif isinstance(image, Image.Image):
            self.rgb = np.stack([np.asarray(band, np.float32) for band in image.convert("RGB").split()]) / 255.0
        else:  # (H, W, 3) floats on 0–1
            self.rgb = np.moveaxis(np.asarray(image, np.float32), -1, 0)


def sky_stats(image: Image.Image | np.ndarray) -> dict[str, float]:
    """Mean R, G, B and luminance (Rec. 601) of the top quarter, 0–1, sun/moon disc included.

    Args:
        image: a PIL image, or an (H, W, 3) array of floats on 0–1.
    """
    rgb = _Planes(image).rgb
    r, g, b = (float(plane[: max(1, plane.shape[0] // 4)].mean()) for plane in rgb)
    return {"r": r, "g": g, "b": b, "luma": 0.299 * r + 0.587 * g + 0.114 * b}


def image_stats(image: Image.Image | np.ndarray) -> dict[str, float]:
    """Whole-image measures used by the style contract, all 0–1.

    ``chroma``: mean of max(R,G,B) − min(R,G,B); ``saturation``: mean HSV saturation, (max − min) / max
    (0 for black); ``luma``: mean Rec. 601 luminance; ``hf``: high-frequency energy, the mean absolute
    difference between a pixel's luminance and the mean of its 3 × 3 neighbourhood (edges repeated).

    Args:
        image: a PIL image, or an (H, W, 3) array of floats on 0–1.
    """
    r, g, b = _Planes(image).rgb
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    padded = np.pad(luma, 1, mode="edge")
    rows = padded[:-2] + padded[1:-1] + padded[2:]  # separable 3 × 3 box sum
    box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
    return {
        "chroma": float((hi - lo).mean()),
        "saturation": float(((hi - lo) / np.maximum(hi, 1e-6)).mean()),
        "luma": float(luma.mean()),
        "hf": float(np.abs(luma - box * (1.0 / 9.0)).mean()),
    }


# name: (styles it applies to, threshold); see contract_failures and docs/shanshui.md
CONTRACT = {
    "noon_blue": (("写实", "水彩", "油画"), 0.15),  # sky mean B − mean R ≥, and B ≥ G
    "dusk_red": (("写实", "水彩", "油画"), 0.20),  # sky mean R − mean B ≥
    "night_dark": (STYLES, 0.25),  # sky mean luminance <
    "dawn_light": (STYLES, 0.60),  # sky mean luminance >
    "ink_grey": (("水墨",), 0.05),  # whole-image mean chroma <
    "oil_saturated": (("油画",), 0.15),  # mean saturation ≥ plain's + this, and ≥ OIL_MIN_SATURATION
    "watercolor_light": (("水彩",), 0.04),  # mean luminance ≥ plain's + this
    "watercolor_soft": (("水彩",), 0.80),  # hf ≤ this × plain's
}
OIL_MIN_SATURATION = 0.30


def contract_failures(
    image: Image.Image | np.ndarray, scene: Scene, plain: Image.Image | np.ndarray | None = None
) -> list[str]:
    """The visual-contract checks that ``image`` of ``scene`` fails (empty when it keeps them all).

    Args:
        image: a rendered (or generated) picture of ``scene``.
        scene: what the picture should show; only the checks that apply to its time and style run.
        plain: the same scene and seed rendered in 写实, needed by the 油画 and 水彩 checks
            (they compare with it); those checks are skipped without it.
    """
    failures = []
    image = _Planes(image)  # converted once for both measures
    sky = sky_stats(image)
    style, time_ = scene.style, scene.time

    def applies(name: str) -> bool:
        return style in CONTRACT[name][0]

    if time_ == "正午" and applies("noon_blue"):
        if not (sky["b"] - sky["r"] >= CONTRACT["noon_blue"][1] and sky["b"] >= sky["g"]):
            failures.append(f"noon_blue: sky B−R {sky['b'] - sky['r']:.3f}, B−G {sky['b'] - sky['g']:.3f}")
    if time_ == "黄昏" and applies("dusk_red") and not sky["r"] - sky["b"] >= CONTRACT["dusk_red"][1]:
        failures.append(f"dusk_red: sky R−B {sky['r'] - sky['b']:.3f}")
    if time_ == "夜晚" and not sky["luma"] < CONTRACT["night_dark"][1]:
        failures.append(f"night_dark: sky luminance {sky['luma']:.3f}")
    if time_ == "清晨" and not sky["luma"] > CONTRACT["dawn_light"][1]:
        failures.append(f"dawn_light: sky luminance {sky['luma']:.3f}")
    stats = image_stats(image)
    if style == "水墨" and not stats["chroma"] < CONTRACT["ink_grey"][1]:
        failures.append(f"ink_grey: mean chroma {stats['chroma']:.3f}")
    if plain is not None and style in ("油画", "水彩"):
        base = image_stats(plain)
        if style == "油画":
            gain = stats["saturation"] - base["saturation"]
            if not (gain >= CONTRACT["oil_saturated"][1] and stats["saturation"] >= OIL_MIN_SATURATION):
                failures.append(f"oil_saturated: saturation {stats['saturation']:.3f} (+{gain:.3f} over 写实)")
        else:
            if not stats["luma"] - base["luma"] >= CONTRACT["watercolor_light"][1]:
                failures.append(f"watercolor_light: luminance {stats['luma']:.3f} vs 写实 {base['luma']:.3f}")
            if not stats["hf"] <= CONTRACT["watercolor_soft"][1] * base["hf"]:
                failures.append(f"watercolor_soft: hf {stats['hf']:.4f} vs 写实 {base['hf']:.4f}")
    return failures


# --------------------------------------------------------------------------------------------------
# Captions. Training captions come from the frames below; evaluation prompts (prompt_zh/prompt_en/
# prompt_mixed) use a separate fixed frame whose markers ("画的是", "拍的是", "showing", a closing full
# stop) no training caption ever contains, so an evaluation prompt is never a training caption.

# Words for each value. Each list's words name only that value (tests check no caption names a
# value the scene does not have); the first word is the value itself.
_ZH_WORDS: dict[str, tuple[str, ...]] = {
    "清晨": ("清晨", "早晨", "晨曦", "破晓", "拂晓", "黎明", "清早", "晨光"),
    "正午": ("正午", "中午", "日中", "晌午", "正午时分", "午间"),
    "黄昏": ("黄昏", "傍晚", "日暮", "夕阳", "暮色", "薄暮", "夕照", "晚霞"),
    "夜晚": ("夜晚", "夜里", "夜幕", "深夜", "夜色", "夜间", "入夜", "星夜"),
    "太阳": ("太阳", "红日", "一轮红日", "日头"),
    "月亮": ("月亮", "明月", "皓月", "一弯新月", "弯月", "新月", "月牙"),
    "高山": ("高山", "群山", "山峰", "崇山峻岭", "奇峰", "峻峭的山峰", "连绵的高山", "险峰"),
    "丘陵": ("丘陵", "山丘", "小山丘", "起伏的丘陵", "连绵的山丘", "缓坡"),
    "平原": ("平原", "平川", "原野", "旷野", "辽阔的平原", "田野"),
    "江河": ("江河", "河流", "一条河", "大河", "江水", "蜿蜒的河流", "小河", "流水"),
    "湖泊": ("湖泊", "湖", "湖水", "湖面", "一片湖", "平静的湖面"),
    "瀑布": ("瀑布", "飞瀑", "一道瀑布", "飞流直下的瀑布", "山间瀑布"),
    "小桥": ("小桥", "石桥", "拱桥", "一座小桥", "小石桥"),
    "人家": ("人家", "村舍", "房屋", "农家", "几户人家", "小屋", "村落", "屋舍"),
    "松树": ("松树", "青松", "松林", "古松", "苍松", "几棵松树"),
    "写实": ("写实", "照片", "摄影", "写实风格", "实景照片", "写实摄影"),
    "水墨": ("水墨画", "水墨", "水墨风格", "国画", "中国水墨画"),
    "水彩": ("水彩画", "水彩", "水彩风格"),
    "油画": ("油画", "油画风格", "布面油画"),
}
# Sky words that also say the time; used only when both hold.
_ZH_SKY_AT = {("太阳", "清晨"): ("旭日", "朝阳"), ("太阳", "正午"): ("烈日", "骄阳")}
# Time as a modifier ("…的群山").
_ZH_TIME_OF = {
    "清晨": ("清晨的", "晨曦中的", "破晓时分的", "黎明时的", "早晨的"),
    "正午": ("正午的", "中午的", "日中的", "正午时分的", "午间的"),
    "黄昏": ("黄昏的", "夕阳下的", "日暮时分的", "傍晚的", "暮色中的", "晚霞中的"),
    "夜晚": ("夜晚的", "夜色中的", "深夜的", "夜幕下的", "夜里的", "星夜下的"),
}
# Four-character (and a few longer) poetic phrases: (words, what they mention).
_ZH_IDIOMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("time", "清晨"): ("晨曦微露", "破晓时分", "晨光熹微", "东方既白"),
    ("time", "正午"): ("正午时分", "晴空万里", "日中之时"),
    ("time", "黄昏"): ("夕阳西下", "日暮黄昏", "暮色苍茫", "晚霞满天"),
    ("time", "夜晚"): ("夜幕低垂", "夜深人静", "星斗满天", "夜色深沉"),
    ("sky", "太阳"): ("红日高照", "阳光普照"),
    ("sky", "月亮"): ("明月当空", "皓月当空", "明月高悬", "新月如钩"),
    ("land", "高山"): ("崇山峻岭", "层峦叠嶂", "奇峰突兀", "群峰耸立", "高山巍峨"),
    ("land", "丘陵"): ("丘陵起伏", "山丘连绵", "缓坡起伏"),
    ("land", "平原"): ("一马平川", "沃野千里", "平川旷野", "原野辽阔"),
    ("water", "江河"): ("江水悠悠", "河流蜿蜒", "曲水长流", "大河奔流"),
    ("water", "湖泊"): ("湖平如镜", "湖光潋滟", "一湖碧水", "湖水清澈"),
    ("water", "瀑布"): ("飞流直下", "飞瀑流泉", "瀑布高悬", "飞瀑如练"),
    ("things", "小桥"): ("小桥横卧", "石桥卧波", "拱桥如虹"),
    ("things", "人家"): ("村舍俨然", "三两人家", "屋舍错落"),
    ("things", "松树"): ("青松挺立", "松涛阵阵", "古松苍劲", "苍松如盖"),
}
# Phrases that say the time and the sky at once.
_ZH_TIME_SKY = {
    ("清晨", "太阳"): ("旭日东升",),
    ("正午", "太阳"): ("烈日当空", "骄阳似火"),
    ("夜晚", "月亮"): ("月明星稀",),
}
_ZH_SHORT = {  # one character each, for painting titles such as 《暮山飞瀑图》
    "清晨": "晓", "正午": "午", "黄昏": "暮", "夜晚": "夜", "太阳": "日", "月亮": "月",
    "高山": "山", "丘陵": "丘", "平原": "原", "江河": "江", "湖泊": "湖", "瀑布": "飞瀑",
    "小桥": "桥", "人家": "村", "松树": "松",
}  # fmt: skip
_ZH_SEPARATORS = ("，", "，", "、", ",", " ", ", ")

_EN_WORDS: dict[str, tuple[str, ...]] = {
    "清晨": ("dawn", "daybreak", "early morning", "first light", "morning"),
    "正午": ("noon", "midday", "high noon", "noontime", "the middle of the day"),
    "黄昏": ("dusk", "sunset", "evening", "twilight", "the evening glow"),
    "夜晚": ("night", "nighttime", "late at night", "the dead of night", "a starry night"),
    "太阳": ("the sun", "a bright sun", "a red sun"),
    "月亮": ("the moon", "a crescent moon", "a bright moon", "a new moon"),
    "高山": ("tall peaks", "towering peaks", "steep peaks", "mountains", "jagged peaks", "mountain peaks"),
    "丘陵": ("rolling hills", "hills", "gentle hills", "low hills"),
    "平原": ("a flat plain", "plains", "open fields", "a wide plain", "flatland"),
    "江河": ("a river", "a winding river", "a stream", "a flowing river"),
    "湖泊": ("a lake", "a calm lake", "a still lake", "a quiet lake"),
    "瀑布": ("a waterfall", "a cascading waterfall", "falling water", "a tall waterfall"),
    "小桥": ("a small bridge", "a stone bridge", "an arched bridge", "a bridge"),
    "人家": ("houses", "cottages", "a village", "farmhouses", "a few houses", "huts"),
    "松树": ("pine trees", "pines", "old pines", "a pine tree"),
    "写实": ("photo", "a photo", "photograph", "realistic photo", "photorealistic"),
    "水墨": ("ink wash painting", "Chinese ink painting", "ink painting", "sumi-e"),
    "水彩": ("watercolor", "watercolour painting", "watercolor painting", "watercolour"),
    "油画": ("oil painting", "oil on canvas", "an oil painting"),
}
_EN_TIME_AT = {  # the time as an adverbial: "… at dusk"
    "清晨": ("at dawn", "at daybreak", "in the early morning", "at first light"),
    "正午": ("at noon", "at midday", "at high noon", "in the middle of the day"),
    "黄昏": ("at dusk", "at sunset", "in the evening", "at twilight"),
    "夜晚": ("at night", "late at night", "on a starry night", "in the dead of night"),
}
_EN_SKY_AT = {("太阳", "清晨"): ("the rising sun",), ("太阳", "正午"): ("a blazing sun", "the midday sun")}
_EN_POETIC: dict[tuple[str, str], tuple[str, ...]] = {
    ("time", "清晨"): ("first light breaking", "the hush of daybreak", "morning mist"),
    ("time", "正午"): ("a clear noon sky", "bright midday light", "noon light"),
    ("time", "黄昏"): ("the glow of sunset", "evening falling", "dusk settling in"),
    ("time", "夜晚"): ("a night full of stars", "the quiet of night", "deep night"),
    ("sky", "太阳"): ("the sun shining", "sunlight pouring down"),
    ("sky", "月亮"): ("a moon hanging high", "moonlight", "a crescent moon above"),
    ("land", "高山"): ("peaks piercing the clouds", "towering peaks", "layer upon layer of mountains"),
    ("land", "丘陵"): ("hills rolling away", "gentle rolling hills", "hills upon hills"),
    ("land", "平原"): ("a plain stretching away", "endless open fields", "a wide flat plain"),
    ("water", "江河"): ("a river winding through", "a long river flowing", "a meandering stream"),
    ("water", "湖泊"): ("a lake as still as a mirror", "a calm lake", "the quiet lake"),
    ("water", "瀑布"): ("a waterfall plunging down", "water tumbling down the cliff", "a falling cascade"),
    ("things", "小桥"): ("a stone bridge arching over", "a little arched bridge", "an old bridge"),
    ("things", "人家"): ("a few cottages", "a quiet village", "houses nestled below"),
    ("things", "松树"): ("old pines standing", "pines clinging on", "a lone pine tree"),
}
_EN_STYLE_OF = {  # "<style> of <scene>"
    "写实": ("a photo of", "a photograph of", "a realistic photo of"),
    "水墨": ("an ink wash painting of", "a Chinese ink painting of", "an ink painting of"),
    "水彩": ("a watercolor of", "a watercolour painting of", "a watercolor painting of"),
    "油画": ("an oil painting of", "oil on canvas of", "an oil painting with"),
}
_EN_STYLE_MIXED = {
    "写实": ("photo", "realistic photo", "photograph"),
    "水墨": ("ink wash painting", "Chinese ink painting", "ink painting"),
    "水彩": ("watercolor", "watercolor painting", "watercolour"),
    "油画": ("oil painting", "oil on canvas"),
}
_EVAL_MARKERS = ("画的是", "拍的是", "showing")


@dataclass(frozen=True)
class Caption:
    """A caption and how it was made: the frame (``"zh/poetic"``, ``"en/list"``, …) and what it mentions —
    attribute names ("time", "sky", "land", "water", "style") and the things it names ("小桥", …)."""

    text: str
    template: str
    mentions: frozenset[str]


def _pick(g: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(g.integers(len(options)))]


def _mentions(scene: Scene, g: np.random.Generator, full: bool) -> list[str]:
    """Which attributes a caption names, in canonical order; a training caption drops some at random."""
    present = [f for f in ("time", "sky", "land", "water") if getattr(scene, f) is not None]
    present += list(scene.things_in_order) + ["style"]
    if full:
        return present
    keep = {"time": 0.85, "sky": 0.6, "land": 0.85, "water": 0.85, "style": 0.85}
    u = g.random(len(present))
    chosen = [f for f, x in zip(present, u, strict=True) if x < keep.get(f, 0.7)]
    return chosen or [_pick(g, ["land", "time"])]


def _value(scene: Scene, name: str) -> str:
    return name if name in THINGS else getattr(scene, name)


def _zh_word(scene: Scene, name: str, g: np.random.Generator, names: Sequence[str] = ()) -> str:
    """A word for ``name``'s value; sky words that also say the time (旭日, 烈日) only when ``names``
    has the time too."""
    value = _value(scene, name)
    words = _ZH_WORDS[value] + (_ZH_SKY_AT.get((value, scene.time), ()) if "time" in names else ())
    return _pick(g, words)


def _join(parts: Sequence[str], g: np.random.Generator, separators: Sequence[str] = _ZH_SEPARATORS) -> str:
    """Parts joined by one separator, with now and then a different one in a gap (real captions mix them)."""
    main = _pick(g, separators)
    out = parts[0]
    for part in parts[1:]:
        out += (main if g.random() < 0.8 else _pick(g, separators)) + part
    return out


def _zh_and(words: Sequence[str], g: np.random.Generator) -> str:
    if len(words) == 1:
        return words[0]
    return "、".join(words[:-1]) + _pick(g, ("和", "与", "、")) + words[-1]


def _zh_style(scene: Scene, text: str, g: np.random.Generator) -> str:
    word = _zh_word(scene, "style", g)
    form = int(g.integers(5))
    if form == 0:
        return f"{word}：{text}"
    if form == 1:
        return f"{word}，{text}"
    if form == 2:
        return f"{text}（{word}）"
    return f"{text}{_pick(g, ('，', ', ', ' ', '，'))}{word}"


def _zh_list(scene: Scene, names: list[str], g: np.random.Generator) -> str:
    style = "style" in names
    parts = [_zh_word(scene, n, g, names) for n in names if n != "style"]
    if len(parts) > 1 and g.random() < 0.5:  # word order varies
        order = g.permutation(len(parts))
        parts = [parts[i] for i in order]
    if not parts:
        return _zh_word(scene, "style", g)
    text = _join(parts, g)
    if style:
        word = _zh_word(scene, "style", g)
        text = (
            f"{word}{_pick(g, _ZH_SEPARATORS)}{text}"
            if g.random() < 0.35
            else f"{text}{_pick(g, _ZH_SEPARATORS)}{word}"
        )
    return text


def _zh_core(scene: Scene, names: list[str], g: np.random.Generator) -> str:
    """The time as a modifier of the land and water: 黄昏的群山与湖泊."""
    nouns = [_zh_word(scene, n, g) for n in ("land", "water") if n in names]
    core = "".join(nouns) if len(nouns) == 1 else _pick(g, ("和", "与", "、")).join(nouns)
    if "time" in names:
        if not core:
            return _zh_word(scene, "time", g) + _pick(g, ("的风景", "的景色", "的郊野"))
        return _pick(g, _ZH_TIME_OF[scene.time]) + core
    return core


def _zh_sentence(scene: Scene, names: list[str], g: np.random.Generator) -> str:
    clauses = []
    core = _zh_core(scene, names, g)
    if core:
        clauses.append(core)
    if "sky" in names:
        sky = _zh_word(scene, "sky", g, names)
        clauses.append(
            _pick(g, (f"天上挂着{sky}", f"天空中有{sky}", f"{sky}当空", f"{sky}高悬", f"空中一轮{sky}"))
            if not sky.startswith("一")
            else _pick(g, (f"天上挂着{sky}", f"天空中有{sky}"))
        )
    things = [_zh_word(scene, n, g) for n in THINGS if n in names]
    if things:
        listed = _zh_and(things, g)
        frames = [f"有{listed}", f"点缀着{listed}", f"{listed}点缀其间", f"近处有{listed}"]
        if scene.water is not None and "water" in names:
            frames.append(f"岸边有{listed}")
        clauses.append(_pick(g, frames))
    if not clauses:
        return _zh_word(scene, "style", g)
    text = _join(clauses, g, ("，", "，", ", ", " ", "；"))
    return _zh_style(scene, text, g) if "style" in names else text


def _zh_poetic(scene: Scene, names: list[str], g: np.random.Generator) -> str:
    left = [n for n in names if n != "style"]
    phrases = []
    if {"小桥", "人家"} <= set(left) and scene.water == "江河" and "water" in left and g.random() < 0.8:
        phrases.append("小桥流水人家")
        left = [n for n in left if n not in ("小桥", "人家", "water")]
    if "time" in left and "sky" in left and (scene.time, scene.sky) in _ZH_TIME_SKY and g.random() < 0.6:
        phrases.append(_pick(g, _ZH_TIME_SKY[(scene.time, scene.sky)]))
        left = [n for n in left if n not in ("time", "sky")]
    for n in left:
        key = ("things", n) if n in THINGS else (n, getattr(scene, n))
        phrases.append(_pick(g, _ZH_IDIOMS[key]))
    if len(phrases) > 2 and g.random() < 0.3:
        phrases = [phrases[i] for i in g.permutation(len(phrases))]
    if not phrases:
        return _zh_word(scene, "style", g)
    text = _join(phrases, g, ("，", "，", " ", "、"))
    return _zh_style(scene, text, g) if "style" in names else text


def _zh_title(scene: Scene, names: list[str], g: np.random.Generator) -> str:
    heads = [n for n in ("time", "sky", "land", "water") if n in names]
    rest = [_zh_word(scene, n, g) for n in THINGS if n in names]
    title = "".join(_ZH_SHORT[_value(scene, n)] for n in heads) + _pick(g, ("图", "图", "图卷"))
    text = f"《{title}》"
    if rest:
        text += _pick(g, ("，", " ", "：")) + _zh_and(rest, g)
    if "style" in names:
        text += _pick(g, ("，", " ", "，")) + _zh_word(scene, "style", g)
    return text


def _zh_painting(scene: Scene, names: list[str], g: np.random.Generator) -> str:
    core = _zh_core(scene, names, g)
    extra = [_zh_word(scene, n, g, names) for n in ("sky", *THINGS) if n in names]
    if extra:
        core = (core + _pick(g, ("，还有", "，有", "、"))) if core else ""
        core += _zh_and(extra, g)
    word = _pick(g, _ZH_STYLE_NOUNS[scene.style])
    if scene.style == "写实":
        return _pick(g, (f"一张{core}的{word}", f"{core}的{word}", f"{word}：{core}"))
    return _pick(g, (f"一幅描绘{core}的{word}", f"{core}的{word}", f"以{core}为题的{word}", f"{word}里的{core}"))


# The style as a noun for "一幅…的水墨画" (every one contains a word of _ZH_WORDS).
_ZH_STYLE_NOUNS = {
    "写实": ("照片", "实景照片", "摄影作品"),
    "水墨": ("水墨画", "国画", "中国水墨画"),
    "水彩": ("水彩画",),
    "油画": ("油画", "布面油画"),
}


_ZH_FRAMES = {
    "list": _zh_list,
    "sentence": _zh_sentence,
    "poetic": _zh_poetic,
    "title": _zh_title,
    "painting": _zh_painting,
}
_ZH_FRAME_WEIGHTS = (0.25, 0.3, 0.2, 0.1, 0.15)


def _en_word(scene: Scene, name: str, g: np.random.Generator, names: Sequence[str] = ()) -> str:
    """A word for ``name``'s value; "the rising sun" and the like only when ``names`` has the time."""
    value = _value(scene, name)
    words = _EN_WORDS[value] + (_EN_SKY_AT.get((value, scene.time), ()) if "time" in names else ())
    return _pick(g, words)


def _en_and(words: Sequence[str], g: np.random.Generator) -> str:
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + _pick(g, (" and ", " and ", ", ", " & ")) + words[-1]


def _en_list(scene: Scene, names: list[str], g: np.random.Generator) -> str:
    parts = [_en_word(scene, n, g, names) for n in names]
    if len(parts) > 1 and g.random() < 0.4:
        parts = [parts[i] for i in g.permutation(len(parts))]
    return _join(parts, g, (", ", ", ", "; "))


def _en_scene(scene: Scene, names: list[str], g: np.random.Generator, time_first: bool = True) -> str:
    """ "towering peaks and a calm lake at dusk under a crescent moon, with pine trees"."""
    nouns = [_en_word(scene, n, g) for n in ("land", "water") if n in names]
    text = _pick(g, (" and ", " with ", " beside ")).join(nouns) if nouns else _pick(g, ("a landscape", "a scene"))
    if "time" in names:
        if g.random() < 0.6 or not time_first:
            text = f"{text} {_pick(g, _EN_TIME_AT[scene.time])}"
        else:
            text = f"{_en_word(scene, 'time', g)}, {text}"
    if "sky" in names:
        text += _pick(g, (" under ", ", ", " beneath ")) + _en_word(scene, "sky", g, names)
    things = [_en_word(scene, n, g) for n in THINGS if n in names]
    if things:
        text += _pick(g, (", with ", " with ", ", ")) + _en_and(things, g)
    return text


def _en_sentence(scene: Scene, names: list[str], g: np.random.Generator) -> str:
    text = _en_scene(scene, names, g)
    if "style" in names:
        text += _pick(g, (", ", ", ", " - ", " | ")) + _en_word(scene, "style", g)
    return text


def _en_style_of(scene: Scene, names: list[str], g: np.random.Generator) -> str:
    return _pick(g, _EN_STYLE_OF[scene.style]) + " " + _en_scene(scene, names, g, time_first=False)


def _en_poetic(scene: Scene, names: list[str], g: np.random.Generator) -> str:
    phrases = []
    for n in names:
        if n == "style":
            continue
        key = ("things", n) if n in THINGS else (n, getattr(scene, n))
        phrases.append(_pick(g, _EN_POETIC[key]))
    if not phrases:
        return _en_word(scene, "style", g)
    text = _join(phrases, g, (", ", ", ", "; ", " - "))
    if "style" in names:
        text += _pick(g, (", ", ", in ", " | ")) + _en_word(scene, "style", g)
    return text


_EN_FRAMES = {"list": _en_list, "sentence": _en_sentence, "style-of": _en_style_of, "poetic": _en_poetic}
_EN_FRAME_WEIGHTS = (0.25, 0.3, 0.3, 0.15)


def _choose(frames: dict, weights: Sequence[float], g: np.random.Generator):
    k = int(np.searchsorted(np.cumsum(weights), g.random() * sum(weights), side="right"))
    name = list(frames)[min(k, len(frames) - 1)]
    return name, frames[name]


def words_for(value: str, lang: str = "zh") -> tuple[str, ...]:
    """Every word or phrase a training caption may use to name ``value`` (a Chinese attribute value),
    including poetic phrases and, in Chinese, the one-character forms of painting titles.

    Words of one value never name another value of the same attribute, so a caption can be checked
    against the scene it describes.
    """
    if value not in _ENGLISH:
        raise InvalidInputError(f"{value!r} is not a 山水 attribute value; use one of {', '.join(_ENGLISH)}")
    field = next(f for f, values in {**_VALUES, "things": THINGS}.items() if value in values)
    key = ("things" if field == "things" else field, value)
    if lang == "zh":
        words = [*_ZH_WORDS[value], *_ZH_IDIOMS.get(key, ()), _ZH_SHORT.get(value, "")]
        words += [w for (v, _), ws in _ZH_SKY_AT.items() if v == value for w in ws]
        words += _ZH_TIME_OF.get(value, ())
        words += [w for pair, ws in _ZH_TIME_SKY.items() if value in pair for w in ws]
        if value in ("小桥", "人家", "江河"):
            words.append("小桥流水人家")
    elif lang == "en":
        words = [*_EN_WORDS[value], *_EN_POETIC.get(key, ()), *_EN_TIME_AT.get(value, ())]
        words += [w for (v, _), ws in _EN_SKY_AT.items() if v == value for w in ws]
        words += [*_EN_STYLE_OF.get(value, ()), *_EN_STYLE_MIXED.get(value, ())]
    else:
        raise InvalidInputError(f"lang={lang!r} is invalid; use 'zh' or 'en'")
    return tuple(dict.fromkeys(w for w in words if w))


def make_caption(
    scene: Scene, rng: np.random.Generator | int | Sequence[int], lang: str = "zh", *, full: bool = False
) -> Caption:
    """A training caption of ``scene`` with its frame and what it mentions.

    Args:
        scene: what the caption describes.
        rng: a numpy ``Generator`` (advanced in place) or a seed for one.
        lang: ``"zh"`` (Chinese), ``"en"`` (English) or ``"mixed"`` (Chinese scene + English style).
        full: name every attribute that has a value (time, land and style always; sky, water and
            each thing when present) instead of dropping some at random — the training-style
            variant for probing; for evaluation prompts that are never training captions use
            :func:`prompt_zh` / :func:`prompt_en`.
    """
    if not isinstance(scene, Scene):
        raise InvalidInputError(f"captions need a Scene, got {type(scene).__name__}")
    g = _generator(rng)
    names = _mentions(scene, g, full)
    if lang == "zh":
        frame, make = _choose(_ZH_FRAMES, _ZH_FRAME_WEIGHTS, g)
        if frame == "painting" and ("style" not in names or len(names) == 1):  # it needs a style and a subject
            frame, make = "sentence", _zh_sentence
        text = make(scene, names, g)
    elif lang == "en":
        frame, make = _choose(_EN_FRAMES, _EN_FRAME_WEIGHTS, g)
        if frame == "style-of" and "style" not in names:
            frame, make = "sentence", _en_sentence
        text = make(scene, names, g)
    elif lang == "mixed":
        names = [n for n in names if n != "style"] + ["style"]  # the English style is always named
        frame, make = _choose(
            {k: _ZH_FRAMES[k] for k in ("list", "sentence", "poetic", "title")}, _ZH_FRAME_WEIGHTS[:4], g
        )
        scene_names = [n for n in names if n != "style"]
        text = make(scene, scene_names, g) if scene_names else ""
        style = _pick(g, _EN_STYLE_MIXED[scene.style])
        if not text:
            text = style
        elif g.random() < 0.7:
            text = f"{text}{_pick(g, (', ', ', ', '，', ' '))}{style}"
        else:
            text = f"{style}{_pick(g, (': ', ', ', ' '))}{text}"
    else:
        raise InvalidInputError(f"lang={lang!r} is invalid; use 'zh', 'en' or 'mixed'")
    return Caption(text.strip(), f"{lang}/{frame}", frozenset(names))


def caption_zh(scene: Scene, rng: np.random.Generator | int | Sequence[int], *, full: bool = False) -> str:
    """A Chinese training caption (see :func:`make_caption`)."""
    return make_caption(scene, rng, "zh", full=full).text


def caption_en(scene: Scene, rng: np.random.Generator | int | Sequence[int], *, full: bool = False) -> str:
    """The English twin: same world, English templates (see :func:`make_caption`)."""
    return make_caption(scene, rng, "en", full=full).text


def caption_mixed(scene: Scene, rng: np.random.Generator | int | Sequence[int], *, full: bool = False) -> str:
    """A Chinese description with the style in English, e.g. ``"黄昏的群山与湖泊, ink wash painting"``."""
    return make_caption(scene, rng, "mixed", full=full).text


_PROMPT_STYLE_ZH = {
    "写实": "一张写实照片，拍的是",
    "水墨": "一幅水墨画，画的是",
    "水彩": "一幅水彩画，画的是",
    "油画": "一幅油画，画的是",
}
_PROMPT_STYLE_EN = {
    "写实": "A photo",
    "水墨": "An ink wash painting",
    "水彩": "A watercolor painting",
    "油画": "An oil painting",
}
_PROMPT_EN = {
    "清晨": "dawn", "正午": "noon", "黄昏": "dusk", "夜晚": "night", "太阳": "the sun", "月亮": "the moon",
    "高山": "tall peaks", "丘陵": "rolling hills", "平原": "a flat plain", "江河": "a river", "湖泊": "a lake",
    "瀑布": "a waterfall", "小桥": "a small bridge", "人家": "houses", "松树": "pine trees",
}  # fmt: skip


def _prompt_body_zh(scene: Scene) -> str:
    body = f"{scene.time}的{scene.land}" + (f"和{scene.water}" if scene.water else "")
    if scene.sky:
        body += f"，天上有{scene.sky}"
    if scene.things:
        body += "，还有" + "、".join(scene.things_in_order)
    return body


def prompt_zh(scene: Scene) -> str:
    """The fixed Chinese evaluation prompt naming every attribute, in a frame no training caption uses.

    ``一幅水墨画，画的是黄昏的高山和湖泊，天上有月亮，还有小桥、人家。``
    """
    return _PROMPT_STYLE_ZH[scene.style] + _prompt_body_zh(scene) + "。"


def prompt_en(scene: Scene) -> str:
    """The fixed English evaluation prompt, e.g.
    ``An ink wash painting showing tall peaks and a lake at dusk under the moon, with a small bridge and houses.``"""
    text = f"{_PROMPT_STYLE_EN[scene.style]} showing {_PROMPT_EN[scene.land]}"
    if scene.water:
        text += f" and {_PROMPT_EN[scene.water]}"
    text += f" at {_PROMPT_EN[scene.time]}"
    if scene.sky:
        text += f" under {_PROMPT_EN[scene.sky]}"
    things = [_PROMPT_EN[t] for t in scene.things_in_order]
    if things:
        text += ", with " + (things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1])
    return text + "."


def prompt_mixed(scene: Scene) -> str:
    """The fixed mixed evaluation prompt: Chinese scene, English style, e.g.
    ``画的是黄昏的高山和湖泊，天上有月亮。ink wash painting``."""
    return "画的是" + _prompt_body_zh(scene) + "。" + _EN_STYLE_MIXED[scene.style][0]


# --------------------------------------------------------------------------------------------------
# Data sets

CAPTION_KINDS = ("zh", "en", "mixed", "all")


def _sample_rngs(seed: int, index: int) -> tuple[np.random.Generator, int | list[int], np.random.Generator]:
    """Independent streams for sample ``index`` of data set ``seed``: scene, picture, caption. Separate
    streams keep each one unchanged when another changes (a different size or caption language)."""
    return (
        np.random.default_rng([seed, index, 0]),
        [seed, index, 1],
        np.random.default_rng([seed, index, 2]),
    )


def _swap_one(scene: Scene, named: frozenset[str], g: np.random.Generator, split: str) -> Scene:
    """``scene`` with one named attribute (or named thing) changed to another value, keeping which
    attributes are present (so a caption draws the same mentions); the rules of the world hold."""
    options = _swaps(scene, named, split) or _swaps(scene, frozenset(_VALUES), split)
    # one attribute at random first, then one of its values: each named attribute is as likely as any other
    fields = sorted({_changed_field(scene, o) for o in options})
    field = fields[int(g.integers(len(fields)))]
    chosen = [o for o in options if _changed_field(scene, o) == field]
    return chosen[int(g.integers(len(chosen)))]


def _swaps(scene: Scene, named: frozenset[str], split: str) -> list[Scene]:
    options: list[Scene] = []
    for field in ("time", "sky", "land", "water", "style"):
        if field not in named:
            continue
        for value in _VALUES[field]:
            if value is None or value == getattr(scene, field):
                continue
            try:
                options.append(replace(scene, **{field: value}))
            except InvalidInputError:
                continue
    for thing in named & set(THINGS):
        for new in set(THINGS) - scene.things:  # the same number of things, one of them another
            try:
                options.append(replace(scene, things=(scene.things - {thing}) | {new}))
            except InvalidInputError:
                continue
    return [o for o in options if not is_held_out(o)] if split == "train" else options


def _changed_field(a: Scene, b: Scene) -> str:
    return next(f for f in ("time", "sky", "land", "water", "things", "style") if getattr(a, f) != getattr(b, f))


def _check_dataset_args(n: int, seed: int, size: int, split: str, captions: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise InvalidInputError(f"n={n!r} is invalid; give the number of samples, an int ≥ 0")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InvalidInputError(f"seed={seed!r} is invalid; give an int ≥ 0")
    if not isinstance(size, int) or isinstance(size, bool) or not MIN_SIZE <= size <= MAX_SIZE:
        raise InvalidInputError(f"size={size!r} is invalid; give an int from {MIN_SIZE} to {MAX_SIZE}")
    _check_split(split)
    if captions not in CAPTION_KINDS:
        raise InvalidInputError(f"captions={captions!r} is invalid; use one of {', '.join(CAPTION_KINDS)}")


class ShanshuiDataset(torch.utils.data.Dataset):
    """``n`` procedural samples as :class:`~taiyi.data.Pair` (key and image_id = the index as a string).

    Sample ``i`` depends only on ``(seed, i)`` — not on access order, workers or other samples — so the
    data set needs no storage and every worker sees the same data. The scene does not depend on
    ``size`` or ``captions`` either: the same ``seed`` gives the same scenes at any size and language.

    Args:
        n: number of samples.
        seed: which data set.
        size: image size in pixels (32–1024).
        split: ``"train"`` (no :data:`HELD_OUT` combination), ``"heldout"`` (only those) or ``"all"``.
        captions: ``"zh"``, ``"en"``, ``"mixed"``, or ``"all"`` (each sample picks one of the three).
        full: captions name every attribute (see :func:`make_caption`).
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        size: int = 64,
        split: str = "train",
        captions: str = "zh",
        *,
        full: bool = False,
    ):
        _check_dataset_args(n, seed, size, split, captions)
        self.n, self.seed, self.size, self.split, self.captions, self.full = n, seed, size, split, captions, full

    def __len__(self) -> int:
        return self.n

    def _index(self, index: int) -> int:
        return range(self.n)[index]  # negative indices; IndexError past the end

    def scene(self, index: int) -> Scene:
        """The true attributes of sample ``index``."""
        return sample_scene(_sample_rngs(self.seed, self._index(index))[0], self.split)

    def caption(self, index: int) -> Caption:
        """Sample ``index``'s caption with its frame and what it mentions."""
        return self._caption(self.scene(index), _sample_rngs(self.seed, self._index(index))[2])

    def negative_scene(self, index: int) -> Scene:
        """Sample ``index``'s scene with one attribute (or thing) that its caption names changed to another
        value — what :meth:`negative_caption` describes. It obeys the world's rules and, in the ``train``
        split, is never a held-out combination (those stay out of all training text, negatives included)."""
        index = self._index(index)
        named = self.caption(index).mentions
        return _swap_one(self.scene(index), named, np.random.default_rng([self.seed, index, 3]), self.split)

    def negative_caption(self, index: int) -> Caption:
        """A hard negative for sample ``index``'s caption (NegCLIP's swapped-attribute negatives): the caption
        of :meth:`negative_scene`, drawn with the same caption stream, so that frame and wording stay as close
        to the true caption as the new value allows."""
        index = self._index(index)
        return self._caption(self.negative_scene(index), _sample_rngs(self.seed, index)[2])

    def _caption(self, scene: Scene, rng: np.random.Generator) -> Caption:
        lang = self.captions
        if lang == "all":
            lang = ("zh", "en", "mixed")[int(rng.integers(3))]
        return make_caption(scene, rng, lang, full=self.full)

    def __getitem__(self, index: int) -> Pair:
        index = self._index(index)
        scene_rng, render_seed, caption_rng = _sample_rngs(self.seed, index)
        scene = sample_scene(scene_rng, self.split)
        image = render(scene, self.size, render_seed)
        return Pair(key=str(index), image=image, caption=self._caption(scene, caption_rng).text, image_id=str(index))

    def __repr__(self) -> str:
        return (
            f"ShanshuiDataset(n={self.n}, seed={self.seed}, size={self.size}, split={self.split!r}, "
            f"captions={self.captions!r})"
        )


def write_folder(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    size: int = 64,
    split: str = "train",
    captions: str = "zh",
    *,
    full: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` samples as ``000000.png`` + ``000000.txt`` + ``000000.json`` — the folder pair layout
    :func:`~taiyi.data.open_pairs` reads. The JSON holds the attributes (Chinese and English), the
    caption, its frame, the held-out flag, the seed and the index.

    Args:
        out_dir: the folder (created if missing).
        n, seed, size, split, captions, full: as for :class:`ShanshuiDataset`.
        overwrite: replace existing sample files; by default finding one is an error.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        OutputError: the folder cannot be created or written, or holds samples and ``overwrite`` is off.
    """
    data = ShanshuiDataset(n, seed, size, split, captions, full=full)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}; choose another folder (--out)") from exc
    width = max(6, len(str(max(n - 1, 0))))
    if not overwrite and n and (out / f"{0:0{width}d}.png").exists():
        raise OutputError(
            f"{out} already holds samples ({0:0{width}d}.png); pass --overwrite (overwrite=True) or use a new folder"
        )
    for index in range(n):
        pair = data[index]
        scene, caption = data.scene(index), data.caption(index)
        stem = out / f"{index:0{width}d}"
        record = {
            "index": index,
            "seed": seed,
            "split": split,
            "held_out": is_held_out(scene),
            "scene": scene.as_dict("zh"),
            "scene_en": scene.as_dict("en"),
            "caption": caption.text,
            "template": caption.template,
            "mentions": sorted(caption.mentions),
        }
        try:
            pair.image.save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(caption.text + "\n", encoding="utf-8")
            stem.with_suffix(".json").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write {stem}.png/.txt/.json: {exc.strerror or exc}") from exc
    return out


def contact_sheet(
    n: int = 8, seed: int = 0, size: int = 64, split: str = "train", *, scale: int = 2, styles: Sequence[str] = STYLES
) -> tuple[Image.Image, list[Scene]]:
    """A grid for looking at the world: one row per sample of ``ShanshuiDataset(n, seed, size, split)``,
    one column per style; a row keeps its sample's layout seed, so it shows one picture in every style.
    Returns the sheet (each cell ``size × scale`` pixels, 2-pixel white gaps) and the row scenes as
    sampled (their own ``style`` is whichever the sampler drew)."""
    _check_dataset_args(n, seed, size, split, "zh")
    for style in styles:
        if style not in STYLES:
            raise InvalidInputError(f"style {style!r} is invalid; use {', '.join(STYLES)}")
    cell, gap = size * scale, 2
    sheet = Image.new("RGB", (cell * len(styles) + gap * (len(styles) - 1), cell * n + gap * (n - 1)), "white")
    scenes = []
    for row in range(n):
        scene_rng, render_seed, _ = _sample_rngs(seed, row)
        scene = sample_scene(scene_rng, split)
        scenes.append(scene)
        for col, style in enumerate(styles):
            image = render(
                Scene(scene.time, scene.sky, scene.land, scene.water, scene.things, style), size, render_seed
            )
            sheet.paste(image.resize((cell, cell), Image.NEAREST), (col * (cell + gap), row * (cell + gap)))
    return sheet, scenes


# --------------------------------------------------------------------------------------------------
# Command line: python -m taiyi.data.shanshui


def _bench(size: int, n: int, seed: int) -> float:
    """Scenes rendered per second of this process's CPU time (one core), sampling included."""
    g = np.random.default_rng(seed)
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for index in range(n):
            render(sample_scene(g), size, [seed, index])
        best = min(best, time.process_time() - start)
    return n / best


def main(argv: list[str] | None = None) -> int:
    """``python -m taiyi.data.shanshui``: a contact sheet, a folder of pairs, or a speed figure."""
    parser = argparse.ArgumentParser(prog="python -m taiyi.data.shanshui", description=__doc__.split("\n")[0])
    parser.add_argument("--sheet", metavar="PNG", help="write a contact sheet: --n scenes × the four styles")
    parser.add_argument("--folder", metavar="DIR", help="write --n samples as x.png + x.txt + x.json")
    parser.add_argument("--bench", action="store_true", help="print scenes per second (one core) at --size")
    parser.add_argument("--n", type=int, default=None, help="scenes (default: 8 for --sheet, 100 otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--scale", type=int, default=2, help="contact sheet zoom (default 2)")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--captions", choices=CAPTION_KINDS, default="zh")
    parser.add_argument("--overwrite", action="store_true", help="--folder: replace existing samples")
    args = parser.parse_args(argv)
    if not (args.sheet or args.folder or args.bench):
        parser.error("give --sheet PNG, --folder DIR or --bench")
    try:
        if args.sheet:
            n = 8 if args.n is None else args.n
            sheet, scenes = contact_sheet(n, args.seed, args.size, args.split, scale=args.scale)
            try:
                sheet.save(args.sheet)
            except (OSError, ValueError) as exc:
                raise OutputError(f"cannot write {args.sheet}: {exc}; give a writable .png path") from exc
            print(f"wrote {args.sheet}: {n} rows × {' '.join(STYLES)}")
            for row, scene in enumerate(scenes):
                values = [v for v in (scene.time, scene.sky, scene.land, scene.water, *scene.things_in_order) if v]
                print(f"{row}: {' '.join(values)} ({', '.join(english(v) for v in values)})")
        if args.folder:
            n = 100 if args.n is None else args.n
            write_folder(args.folder, n, args.seed, args.size, args.split, args.captions, overwrite=args.overwrite)
            print(f"wrote {n} samples to {args.folder}")
        if args.bench:
            n = 100 if args.n is None else args.n
            if n < 1:
                raise InvalidInputError("--bench needs --n ≥ 1")
            rate = _bench(args.size, n, args.seed)
            print(f"{rate:.0f} scenes/s at {args.size}×{args.size} (best of 5 × {n}, one core)")
    except TaiyiError as exc:
        print(f"taiyi: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
