"""Prompt interrogation (提示词反推): a Chinese prompt for a picture, read by a Chinese CLIP.

Each category of a vocabulary (画种, 题材, 时间 ...) is a zero-shot classification of the picture over the
category's words; the best word of every category the CLIP is sure enough of joins the prompt, in the
vocabulary's order — A1111's "Interrogate CLIP" without its captioning model, and in Chinese. Two vocabularies
ship: ``shanshui``, the embedded models' world (what ``taiyi-mini-clip`` knows), and ``general``, words for
real pictures and the published Taiyi-CLIP models; a JSON file ``{"category": ["word", ...], ...}`` gives any
other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import InvalidInputError

VOCABULARIES: dict[str, dict[str, tuple[str, ...]]] = {
    "shanshui": {
        "时间": ("清晨", "正午", "黄昏", "夜晚"),
        "天空": ("太阳", "月亮"),
        "地形": ("高山", "丘陵", "平原"),
        "水": ("江河", "湖泊", "瀑布"),
        "画风": ("写实", "水墨", "水彩", "油画"),
    },
    "general": {
        "画种": ("照片", "油画", "水彩画", "水墨画", "素描", "版画", "工笔画", "插画", "漫画", "3D渲染", "像素画"),
        "题材": (
            "山水",
            "人物肖像",
            "花鸟",
            "动物",
            "城市街景",
            "建筑",
            "室内",
            "静物",
            "美食",
            "海景",
            "森林",
            "田园",
            "星空",
        ),  # fmt: skip
        "时间与天气": ("清晨", "正午", "黄昏", "夜晚", "雨天", "雪景", "雾", "阴天"),
        "色调": ("暖色调", "冷色调", "黑白", "色彩鲜艳", "柔和的色彩", "暗调"),
        "风格": ("写实", "国风", "印象派", "赛博朋克", "极简主义", "复古", "梦幻", "动漫风格"),
        "构图": ("特写", "中景", "远景", "俯视", "全景"),
    },
}
# Templates a vocabulary's words are read in (None: the CLIP's own zero-shot templates)
TEMPLATES: dict[str, tuple[str, ...] | None] = {"shanshui": ("{}", "一幅{}的山水画", "{}的风景"), "general": None}
EMBEDDED_CLIP = "taiyi-mini-clip"
MAX_WORDS = 200
MAX_WORD_CHARS = 100  # a word is read by the text tower in every template: one of a million characters never ends
MAX_FILE_BYTES = 1 << 20  # 200 words of 100 characters are far less; a bigger file is not a vocabulary


@dataclass
class Interrogation:
    """One picture's reading: the prompt, and every category's best word with its probability (in the
    vocabulary's order; ``kept`` says whether it joined the prompt)."""

    prompt: str
    picks: list[dict] = field(default_factory=list)  # {"category", "word", "probability", "kept"}


def vocabulary_for(model: str) -> str:
    """The shipped vocabulary a CLIP reads by default: the 山水 world's for the embedded CLIP, else ``general``."""
    return "shanshui" if os.fspath(model) == EMBEDDED_CLIP else "general"


def load_vocabulary(source: str | os.PathLike | dict) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...] | None]:
    """A vocabulary by name (:data:`VOCABULARIES`), from a JSON file, or as a dict; returns it checked, with its
    templates (None for the CLIP's own)."""
    if isinstance(source, dict):
        return _check(source, "the vocabulary"), None
    name = os.fspath(source)
    if name in VOCABULARIES:
        return VOCABULARIES[name], TEMPLATES[name]
    if not os.path.isfile(name):
        raise InvalidInputError(
            f"vocabulary {name!r} is neither one of {', '.join(VOCABULARIES)} nor a JSON file "
            '({"category": ["word", ...], ...})'
        )
    if os.path.getsize(name) > MAX_FILE_BYTES:
        raise InvalidInputError(
            f"the vocabulary {name} is over {MAX_FILE_BYTES >> 20} MB; a vocabulary holds at most {MAX_WORDS} "
            f"words of {MAX_WORD_CHARS} characters"
        )
    from .data.decode import SkipSample, decode_text

    try:
        with open(name, "rb") as f:
            text = decode_text(f.read())  # UTF-8 with or without a BOM (Windows Notepad), UTF-16, GB18030
        data = json.loads(text, object_pairs_hook=_categories)
    except (OSError, SkipSample, ValueError) as exc:  # ValueError: bad JSON, a category named twice
        raise InvalidInputError(f"cannot read the vocabulary {name}: {exc}") from None
    return _check(data, name), None


def _categories(pairs: list[tuple]) -> dict:
    """A JSON object, refused when it names a key twice (json would keep the last one without a word)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"category {key!r} is named twice; give each category once, with all its words")
        seen[key] = value
    return seen


def _check(data, where: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(data, dict) or not data:
        raise InvalidInputError(f'{where} must be a JSON object of categories: {{"category": ["word", ...], ...}}')
    checked, total = {}, 0
    for category, words in data.items():
        if not isinstance(words, list | tuple) or len(words) < 2:
            raise InvalidInputError(f"{where}: category {category!r} needs a list of at least two words")
        if any(not isinstance(w, str) or not w.strip() for w in words):
            raise InvalidInputError(f"{where}: category {category!r} holds an empty or non-text word")
        if long := next((w for w in words if len(w.strip()) > MAX_WORD_CHARS), None):
            raise InvalidInputError(
                f"{where}: category {category!r} holds a word of {len(long.strip())} characters; at most "
                f"{MAX_WORD_CHARS}"
            )
        words = tuple(w.strip() for w in words)
        if len(set(words)) < len(words):
            raise InvalidInputError(f"{where}: category {category!r} repeats a word")
        total += len(words)
        checked[str(category)] = words
    if total > MAX_WORDS:
        raise InvalidInputError(f"{where} holds {total} words; at most {MAX_WORDS}")
    return checked


def default_threshold(words: int) -> float:
    """A word joins the prompt when its probability is at least twice chance among its category's words
    (capped at 0.9: a two-word category needs 0.9)."""
    return min(0.9, 2.0 / words)


def interrogate(
    clip,
    images,
    vocabulary: str | os.PathLike | dict = "general",
    *,
    min_probability: float | None = None,
    separator: str = "，",
) -> list[Interrogation]:
    """A Chinese prompt for each picture (see the module's description).

    Args:
        clip: a :class:`~taiyi.clip.ChineseCLIP` (Chinese text tower).
        images: PIL images, file paths or uint8 arrays; one of them alone is a list of one.
        vocabulary: a name of :data:`VOCABULARIES`, a JSON file, or a dict ``{category: [words]}``.
        min_probability: in (0, 1]: the probability a category's best word needs to join the prompt; None takes
            :func:`default_threshold` of each category.
        separator: between the words of the prompt.
    """
    if getattr(clip, "text_head", None) == "projection":
        raise InvalidInputError("interrogation reads Chinese words; this CLIP's text tower is English")
    if min_probability is not None and not 0 < min_probability <= 1:
        raise InvalidInputError(f"the least probability must be in (0, 1], not {min_probability}")
    categories, templates = load_vocabulary(vocabulary)
    # one picture as itself: a path string is a Sequence too, and would be read as one file per character
    one = isinstance(images, str | os.PathLike) or not isinstance(images, Sequence)
    images = [images] if one else list(images)
    image_embeds = clip.encode_image(images)  # (N, D), normalised
    readings = [Interrogation("") for _ in images]
    for category, words in categories.items():
        label_embeds = clip.label_embeddings(list(words), templates)
        probs = (clip.scale() * image_embeds @ label_embeds.T).softmax(dim=-1)  # (N, W)
        least = default_threshold(len(words)) if min_probability is None else min_probability
        best = probs.max(dim=-1)
        for reading, p, j in zip(readings, best.values.tolist(), best.indices.tolist(), strict=True):
            reading.picks.append({"category": category, "word": words[j], "probability": p, "kept": p >= least})
    for reading in readings:  # a word two categories share is said once
        reading.prompt = separator.join(dict.fromkeys(pick["word"] for pick in reading.picks if pick["kept"]))
    return readings
