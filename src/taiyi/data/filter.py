"""Keep the image-text pairs a Chinese CLIP finds matching: the Taiyi data recipe (TAIYI.md §3).

Taiyi SD was trained only on pairs whose Taiyi-CLIP score exceeded 0.2. :func:`filter_pairs` scores
every pair of a source (folder, CSV or JSONL) with a :class:`~taiyi.clip.ChineseCLIP` — the score is
the cosine of the L2-normalised image and text features, the quantity that 0.2 threshold refers to —
and writes:

- a JSONL manifest of the kept pairs (``{"image": ..., "caption": ..., "score": ...}`` a line, image
  paths relative to the manifest's folder), which :func:`~taiyi.data.open_pairs` and ``taiyi train``
  read as they are;
- optionally a histogram PNG of every score with the threshold marked (drawn with Pillow).

Both are written atomically (a temporary file renamed into place). Unreadable samples (corrupt image,
missing caption ...) are skipped and counted by reason, never fatal.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InvalidInputError, OutputError

HISTOGRAM_SIZE = (640, 400)
HISTOGRAM_BINS = 40


@dataclass
class FilterReport:
    """What :func:`filter_pairs` did.

    Attributes:
        manifest: the JSONL manifest written.
        histogram: the histogram PNG, or None.
        threshold: pairs with a score ≥ this were kept.
        kept, dropped: scored pairs kept and dropped.
        skipped: unreadable samples by reason (``{"corrupt image": 2}``).
        scores: every scored pair's score, in source order.
    """

    manifest: Path
    histogram: Path | None
    threshold: float
    kept: int
    dropped: int
    skipped: dict[str, int] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line, e.g. ``kept 80 of 100 scored pairs (score ≥ 0.2), dropped 20, skipped 3 unreadable (...)``."""
        scored = self.kept + self.dropped
        line = f"kept {self.kept} of {scored} scored pairs (score ≥ {self.threshold:g}), dropped {self.dropped}"
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.items())
        line += f", skipped {self.skipped_total} unreadable" + (f" ({reasons})" if reasons else "")
        return line + f"; manifest {self.manifest}" + (f", histogram {self.histogram}" if self.histogram else "")


def check_threshold(threshold: float) -> float:
    """A cosine threshold must be a finite number in [-1, 1]."""
    if not (isinstance(threshold, int | float) and math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
        raise InvalidInputError(
            f"--threshold must be a cosine between -1 and 1 (Taiyi kept pairs scoring above 0.2), not {threshold}"
        )
    return float(threshold)


def check_filter_outputs(out: Path, histogram: Path | None, *, overwrite: bool = False) -> None:
    """Refuse unusable output paths before any scoring is done."""
    from ..io import check_output_file

    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{out} is a folder; give the manifest's file name, e.g. {out / 'kept.jsonl'}")
    if out.suffix.lower() != ".jsonl":
        raise OutputError(f"the manifest {out} must end in .jsonl (the layout open_pairs and taiyi train read)")
    check_output_file(out, overwrite=overwrite)
    if histogram is not None:
        histogram = Path(histogram)
        if histogram.suffix.lower() != ".png":
            raise OutputError(f"the histogram {histogram} must end in .png")
        if histogram.resolve() == out.resolve():
            raise OutputError("--histogram and --out name the same file")
        check_output_file(histogram, overwrite=overwrite)


def open_filter_source(data: str | os.PathLike, *, image_column: str, caption_column: str, skips=None):
    """Open ``data`` as :func:`~taiyi.data.open_pairs` does, refusing tar shards (a manifest names image files)."""
    from . import open_pairs

    source = open_pairs(data, image_column=image_column, caption_column=caption_column, skips=skips)
    if source.kind == "tar":
        raise InvalidInputError(
            f"{source.name} is tar shards; a manifest names image files, so give a folder, CSV or JSONL "
            "(extract the shards first)"
        )
    return source


def _image_path(source, pair) -> Path:
    """The absolute path of ``pair``'s image file (folder: key is relative to the folder; CSV/JSONL: to the file's)."""
    if source.kind == "folder":
        return Path(source.name).absolute() / pair.key
    return Path(source.name).absolute().parent / pair.image_id  # an absolute image_id stays absolute


def filter_pairs(
    clip,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    threshold: float,
    histogram: str | os.PathLike | None = None,
    batch_size: int = 32,
    image_column: str = "image",
    caption_column: str = "caption",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> FilterReport:
    """Score every pair of ``data`` with ``clip`` and write a manifest of those scoring ≥ ``threshold``.

    Args:
        clip: a :class:`~taiyi.clip.ChineseCLIP` (see :func:`taiyi.clip.load_clip`).
        data: a folder of ``x.jpg`` + ``x.txt`` pairs, a ``.csv`` or a ``.jsonl`` file.
        out: the manifest to write (``.jsonl``); image paths in it are relative to its folder.
        threshold: the cosine a pair must reach to be kept (Taiyi used 0.2).
        histogram: also draw the score histogram with the threshold marked to this ``.png``.
        batch_size: pairs per forward pass.
        image_column, caption_column: CSV columns / JSONL fields of ``data``.
        overwrite: replace existing output files.
        progress: called with (pairs read so far, candidates) after each batch.

    Returns:
        a :class:`FilterReport` (kept, dropped, skipped by reason, every score).

    Raises:
        InvalidInputError: a bad threshold or batch size, a source that is missing, empty, tar shards, or
            holds no readable pair.
        OutputError: an output path that cannot be written (existing without ``overwrite``, wrong suffix,
            missing folder, full disk).
    """
    from ..io import atomic_write_bytes, save_png
    from . import SkipCounter

    threshold = check_threshold(threshold)
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, not {batch_size}")
    out = Path(out)
    histogram = Path(histogram) if histogram is not None else None
    check_filter_outputs(out, histogram, overwrite=overwrite)
    skips = SkipCounter()
    source = open_filter_source(data, image_column=image_column, caption_column=caption_column, skips=skips)
    total = len(source)
    base = out.absolute().parent
    rows: list[dict] = []
    scores: list[float] = []
    batch: list = []

    def score(pairs: list) -> None:
        images = clip.encode_image([p.image for p in pairs], batch_size=batch_size)  # (b, D)
        texts = clip.encode_text([p.caption for p in pairs], batch_size=batch_size)  # (b, D)
        for pair, cosine in zip(pairs, (images * texts).sum(dim=-1).tolist(), strict=True):
            scores.append(cosine)
            if cosine >= threshold:
                path = os.path.relpath(_image_path(source, pair), base)
                rows.append({"image": Path(path).as_posix(), "caption": pair.caption, "score": round(cosine, 6)})
        if progress is not None:
            progress(len(scores) + skips.total, total)

    for pair in source:
        batch.append(pair)
        if len(batch) == batch_size:
            score(batch)
            batch = []
    if batch:
        score(batch)
    if not scores:
        raise InvalidInputError(f"{source.name} holds no readable image-text pair ({skips.summary()})")
    manifest = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_bytes(out, manifest.encode("utf-8"), overwrite=overwrite)
    if histogram is not None:
        save_png(draw_histogram(scores, threshold), histogram, overwrite=overwrite)
    return FilterReport(
        manifest=out,
        histogram=histogram,
        threshold=threshold,
        kept=len(rows),
        dropped=len(scores) - len(rows),
        skipped=skips.as_dict(),
        scores=scores,
    )


def draw_histogram(
    scores: list[float], threshold: float, *, bins: int = HISTOGRAM_BINS, size: tuple[int, int] = HISTOGRAM_SIZE
) -> Image.Image:
    """Bars of the score counts (kept bins green, dropped grey) and the threshold as a red line."""
    values = np.asarray(scores, dtype=float)
    lo, hi = min(float(values.min()), threshold), max(float(values.max()), threshold)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    pad = (hi - lo) * 0.02
    lo, hi = lo - pad, hi + pad
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    w, h = size
    left, right, top, bottom = 50, 20, 30, 40
    plot_w, plot_h = w - left - right, h - top - bottom
    peak = max(int(counts.max()), 1)

    def x_of(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for count, a, b in zip(counts.tolist(), edges[:-1], edges[1:], strict=True):
        if count:
            colour = (70, 160, 90) if (a + b) / 2 >= threshold else (170, 170, 170)
            draw.rectangle([x_of(a), top + plot_h * (1 - count / peak), x_of(b) - 1, top + plot_h], fill=colour)
    draw.line([(left, top), (left, top + plot_h), (w - right, top + plot_h)], fill="black")
    draw.text((4, top - 6), str(peak), fill="black")
    draw.text((4, top + plot_h - 6), "0", fill="black")
    draw.text((left, top + plot_h + 8), f"{lo:.3f}", fill="black")
    draw.text((w - right - 40, top + plot_h + 8), f"{hi:.3f}", fill="black")
    draw.text((w // 2 - 60, h - 16), "CLIP score (cosine)", fill="black")
    tx = x_of(threshold)
    draw.line([(tx, top - 4), (tx, top + plot_h)], fill=(220, 30, 30), width=2)
    kept = int((values >= threshold).sum())
    draw.text(
        (min(tx + 4, w - right - 200), 8),
        f"threshold {threshold:g}: kept {kept}, dropped {len(values) - kept}",
        fill=(220, 30, 30),
    )
    return image


__all__ = ["FilterReport", "check_threshold", "draw_histogram", "filter_pairs", "open_filter_source"]
