"""Image-text pair readers shared by Chinese CLIP training/eval and Stable Diffusion training.

``open_pairs(source)`` reads a folder of ``x.jpg`` + ``x.txt`` pairs, a CSV or JSONL file, or
WebDataset tar shards, yielding :class:`Pair` (key, RGB image, caption) and counting every broken
sample it skips in a :class:`SkipCounter`. ``IndexedPairs`` is the map-style variant for folders,
CSV and JSONL. Only Pillow, NumPy and ``torch.utils.data`` are needed.

This folder also holds package data (``vocab.txt``, ``NOTICE``) read through ``importlib.resources``.
"""

from __future__ import annotations

from .decode import IMAGE_EXTENSIONS, MAX_PIXELS, decode_image, decode_text
from .pairs import IndexedPairs, Pair, PairSource, SkipCounter, collate_pairs, expand_braces, open_pairs

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "IndexedPairs",
    "Pair",
    "PairSource",
    "SkipCounter",
    "collate_pairs",
    "decode_image",
    "decode_text",
    "expand_braces",
    "open_pairs",
]
