"""Image-text pairs from the four layouts Chinese text-to-image data comes in.

``open_pairs(source)`` detects the layout from ``source``:

1. a folder of ``x.jpg`` + ``x.txt`` pairs, at any depth (the Taiyi convention);
2. a ``.csv`` file with a header row (columns ``image``, ``caption`` by default; Taiyi's own CSVs
   use ``name,caption``: pass ``image_column="name"``), image paths relative to the CSV's folder;
3. a ``.jsonl`` file with the same fields, one JSON object a line;
4. WebDataset tar shards — one ``.tar``, a folder holding ``*.tar``, or a brace pattern such as
   ``data/{00000..00009}.tar`` — streamed with :mod:`tarfile`: consecutive members sharing a
   basename key (``00001.jpg``, ``00001.txt``, ``00001.json``) form one sample.

Broken samples never stop a pass: each is skipped and counted by reason in a :class:`SkipCounter`,
and the pass's summary is logged at INFO on the ``taiyi`` logger when it ends. Mistakes in the
source itself (a missing path, a CSV without the named columns, a folder with no pairs, a file that
is not a tar) raise :class:`~taiyi.errors.InvalidInputError` when the source is opened.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import os
import posixpath
import re
import tarfile
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.utils.data
from PIL import Image

from ..errors import InvalidInputError
from .decode import IMAGE_EXTENSIONS, SkipSample, clean_caption, decode_image, decode_text

logger = logging.getLogger("taiyi")

TAR_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
MAX_SHARDS = 1_000_000  # a brace pattern expanding past this is a typo, not a data set
_TAR_IMAGE_EXTENSIONS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)  # WebDataset extensions have no dot
_LAYOUTS = "a folder of image + .txt pairs, a .csv, a .jsonl, a .tar shard, a folder of .tar shards or a brace pattern"


@dataclass
class Pair:
    """One image-text sample."""

    key: str  # stable id: the image's relative path (folder), row number (CSV/JSONL) or tar key
    image: Image.Image  # always RGB, fully loaded
    caption: str  # stripped, lines joined by one space, never empty
    image_id: str = ""  # which image: several captions of one image share it (CSV/JSONL rows, retrieval eval)

    def __post_init__(self) -> None:
        if not self.image_id:
            self.image_id = self.key


class SkipCounter:
    """Thread-safe counts of skipped samples by reason ("corrupt image", "empty caption", ...).

    With a multi-process ``DataLoader`` each worker counts in its own copy and the parent's stays
    untouched: a :class:`PairSource` worker logs its own summary at INFO when its pass ends, while
    :class:`IndexedPairs` skips in workers show only in the workers' DEBUG log.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, reason: str, key: str) -> None:
        """Count one skipped sample; ``key`` is logged at DEBUG so a bad file can be found."""
        with self._lock:
            self._counts[reason] += 1
        logger.debug("skipped %s: %s", key, reason)

    @property
    def total(self) -> int:
        """Samples skipped so far, all reasons together."""
        with self._lock:
            return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """``{reason: count}``, most frequent first."""
        with self._lock:
            return dict(sorted(self._counts.items(), key=lambda item: (-item[1], item[0])))

    def summary(self) -> str:
        """One line, e.g. ``skipped 3 samples: 2 corrupt image, 1 empty caption``."""
        counts = self.as_dict()
        total = sum(counts.values())
        line = f"skipped {total} sample{'' if total == 1 else 's'}"
        return line + (": " + ", ".join(f"{n} {reason}" for reason, n in counts.items()) if counts else "")

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"

    # A Lock cannot be pickled; DataLoader workers started with "spawn" pickle the data set.
    def __getstate__(self) -> dict:
        return {"counts": self.as_dict()}

    def __setstate__(self, state: dict) -> None:
        self._lock = threading.Lock()
        self._counts = Counter(state["counts"])


# --------------------------------------------------------------------------------------------------
# Indexable layouts: folder, CSV, JSONL. Candidates are listed when the source is opened; each is
# read (and possibly skipped) only when asked for.


# A PNG without a caption file is captioned by the prompt in its ``parameters`` chunk (taiyi's, A1111's): a
# folder of generated pictures is an image-text set as it stands (CLIP score, retrieval, training).
PNG_PROMPT = "\x00parameters"  # no file name holds a NUL


def png_prompt(path: Path) -> str | None:
    """The prompt a PNG's ``parameters`` chunk records, or None when it has none (or is unreadable)."""
    from ..metadata import GenerationParameters, read_parameters_text

    try:
        return GenerationParameters.from_text(read_parameters_text(path)).prompt or None
    except InvalidInputError:
        return None


class _FolderRows:
    """``root/**/x.jpg`` with ``x.txt`` beside it, or a PNG recording its prompt; the key is the image's relative
    path."""

    def __init__(self, root: Path, images: list[str], captions: list[str | None] | None):
        self.root, self.images, self.captions = root, images, captions  # captions None: images only

    def __len__(self) -> int:
        return len(self.images)

    def key(self, index: int) -> str:
        return self.images[index]

    def image_file(self, index: int) -> Path:
        return self.root / self.images[index]

    def caption(self, index: int) -> str:
        if self.captions is None:
            return ""
        caption_file = self.captions[index]
        if caption_file is None:
            raise SkipSample("missing caption")
        if caption_file == PNG_PROMPT:
            prompt = png_prompt(self.image_file(index))
            if prompt is None:
                raise SkipSample("missing caption")
            return clean_caption(prompt)
        return clean_caption(decode_text(_read_bytes(self.root / caption_file, "caption")))

    def read(self, index: int) -> Pair:
        caption = self.caption(index)
        return Pair(self.images[index], _read_image(self.image_file(index)), caption)


class _TableRows:
    """Rows of a CSV or JSONL file; the key is the 0-based data-row number."""

    def __init__(self, base: Path, rows: list[tuple[str | None, object]], captions: bool = True):
        self.base, self.rows = base, rows  # (image path or None for an unusable row, caption value)
        self.captions = captions  # False: images only, every caption ""

    def __len__(self) -> int:
        return len(self.rows)

    def key(self, index: int) -> str:
        return str(index)

    def image_file(self, index: int) -> Path:
        image_ref = self.rows[index][0]
        if image_ref is None:
            raise SkipSample(_row_problem(self.rows[index][1]))
        if not image_ref.strip():
            raise SkipSample("missing image")
        return self.base / image_ref.strip()  # an absolute path stays absolute

    def caption(self, index: int) -> str:
        image_ref, caption_value = self.rows[index]
        if image_ref is None:
            raise SkipSample(_row_problem(caption_value))
        return clean_caption(caption_value) if self.captions else ""

    def read(self, index: int) -> Pair:
        caption = self.caption(index)
        return Pair(str(index), _read_image(self.image_file(index)), caption, image_id=self.rows[index][0].strip())


# A CSV row with more fields than its header: a caption with an unquoted comma, cut at the comma.
_EXTRA_FIELDS = "row with more fields than the header (unquoted comma?)"


def _row_problem(caption_value: object) -> str:
    """Why a row whose image is None is unusable: this very reason stored in its caption's place, or any other
    problem (a short row, a JSONL image that is not a path)."""
    return _EXTRA_FIELDS if caption_value is _EXTRA_FIELDS else "invalid row"


def _read_image(path: Path) -> Image.Image:
    return decode_image(_read_bytes(path, "image"))


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise SkipSample(f"missing {what}") from None
    except OSError:  # a folder, no permission, an I/O error
        raise SkipSample(f"unreadable {what}") from None


_Rows = _FolderRows | _TableRows


# --------------------------------------------------------------------------------------------------
# Public readers


class PairSource(torch.utils.data.IterableDataset):
    """An iterable of :class:`Pair` over any layout; made by :func:`open_pairs`.

    Iteration is split so that each sample is read exactly once across distributed ranks (see
    :meth:`shard`) and ``DataLoader`` workers: tar shards are dealt out whole, rows of a folder, CSV
    or JSONL one by one. ``len()`` and :meth:`keys` describe this rank's candidates (skipped samples
    included); tar shards are streamed, so both raise ``TypeError`` for them.

    Attributes:
        name: the source as given, for messages.
        kind: "folder", "csv", "jsonl" or "tar".
        skips: the :class:`SkipCounter` every pass adds to.
        rank, world_size: this reader's share of the data.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        *,
        rows: _Rows | None = None,
        shards: list[Path] | None = None,
        caption_files: tuple[str, ...] = (".txt",),
        caption_field: str = "caption",
        skips: SkipCounter | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        _check_rank(rank, world_size)
        self.name, self.kind = name, kind
        self._rows, self._shards = rows, shards
        self._caption_files, self._caption_field = caption_files, caption_field
        self.skips = skips if skips is not None else SkipCounter()
        self.rank, self.world_size = rank, world_size

    def shard(self, rank: int, world_size: int) -> PairSource:
        """This source restricted to distributed rank ``rank`` of ``world_size`` (sharing its ``skips``)."""
        _check_rank(rank, world_size)
        part = copy.copy(self)
        part.rank, part.world_size = rank, world_size
        return part

    @property
    def shards(self) -> list[Path]:
        """All tar shards of the source, in reading order (empty for other layouts)."""
        return list(self._shards or [])

    def _rank_indices(self) -> range:
        if self._rows is None:
            raise TypeError(f"{self.name} is streamed from tar shards; its length and keys are unknown until read")
        return range(len(self._rows))[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self._rank_indices())

    def keys(self) -> list[str]:
        """Candidate keys of this rank, in reading order (skipped samples included)."""
        return [self._rows.key(i) for i in self._rank_indices()]

    def __iter__(self) -> Iterator[Pair]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        where = self.name if workers == 1 else f"{self.name} (worker {worker + 1} of {workers})"
        this_pass = SkipCounter()

        def skip(reason: str, key: str) -> None:
            this_pass.add(reason, key)
            self.skips.add(reason, key)

        if self._rows is not None:
            pairs = _read_rows(self._rows, self._rank_indices()[worker::workers], skip)
        else:
            # Rank-major, then worker: reader r*W+w of R*W takes every (R*W)-th shard.
            reader, readers = self.rank * workers + worker, self.world_size * workers
            shards = self._shards[reader::readers]
            if not shards:
                logger.warning(
                    "%s: %d shards for %d readers (ranks x workers); this one gets none — use at least as "
                    "many shards as readers",
                    where,
                    len(self._shards),
                    readers,
                )
            pairs = (
                pair for shard in shards for pair in _iter_shard(shard, self._caption_files, self._caption_field, skip)
            )
        count = 0
        for pair in pairs:
            count += 1
            yield pair
        logger.info("%s: read %d pairs; %s", where, count, this_pass.summary())

    def __repr__(self) -> str:
        size = f"{len(self._shards)} shards" if self._rows is None else f"{len(self._rows)} rows"
        part = "" if self.world_size == 1 else f", rank {self.rank} of {self.world_size}"
        return f"PairSource({self.name!r}, {self.kind}, {size}{part})"


class IndexedPairs(torch.utils.data.Dataset):
    """Map-style pairs of a folder, CSV or JSONL file: ``pairs[i]`` is a :class:`Pair` or ``None``.

    ``None`` means sample ``i`` was skipped (and counted in ``skips``); give a ``DataLoader``
    ``collate_fn=collate_pairs`` to drop them. Shuffling and distributed splitting are the
    sampler's job here (``DataLoader(shuffle=True)``, ``DistributedSampler``).

    Args:
        source: a folder of pairs, a ``.csv`` or a ``.jsonl`` file (tar shards are streamed: use
            :func:`open_pairs`).
        image_column, caption_column, skips, caption_files: as for :func:`open_pairs`.

    Raises:
        InvalidInputError: as :func:`open_pairs`, or ``source`` is tar shards.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        image_column: str = "image",
        caption_column: str | None = "caption",
        skips: SkipCounter | None = None,
        caption_files: str | Sequence[str] = (".txt",),
    ):
        opened = open_pairs(
            source, image_column=image_column, caption_column=caption_column, skips=skips, caption_files=caption_files
        )
        if opened._rows is None:
            raise InvalidInputError(
                f"{opened.name} is tar shards, which can only be streamed; use open_pairs() instead of IndexedPairs"
            )
        self.name, self.kind, self.skips = opened.name, opened.kind, opened.skips
        self._rows = opened._rows

    def __len__(self) -> int:
        return len(self._rows)

    def keys(self) -> list[str]:
        """Candidate keys in index order."""
        return [self._rows.key(i) for i in range(len(self._rows))]

    def __getitem__(self, index: int) -> Pair | None:
        return self._skip(range(len(self._rows))[index], self._rows.read)  # negative indices; IndexError past the end

    def _skip(self, index: int, read: Callable):
        try:
            return read(index)
        except SkipSample as skipped:
            self.skips.add(skipped.reason, self._rows.key(index))
            return None

    def image_file(self, index: int) -> Path | None:
        """Where sample ``index``'s image should be (not opened), or ``None`` for a row naming none."""
        try:
            return self._rows.image_file(range(len(self._rows))[index])
        except SkipSample:
            return None

    def image(self, index: int) -> Image.Image | None:
        """Sample ``index``'s image alone (its caption unread), or ``None`` (counted in ``skips``)."""
        return self._skip(range(len(self._rows))[index], lambda i: _read_image(self._rows.image_file(i)))

    def caption(self, index: int) -> str | None:
        """Sample ``index``'s caption alone (its image unread), or ``None`` (counted in ``skips``)."""
        return self._skip(range(len(self._rows))[index], self._rows.caption)

    def __repr__(self) -> str:
        return f"IndexedPairs({self.name!r}, {self.kind}, {len(self._rows)} rows)"


def collate_pairs(batch: Sequence[Pair | None]) -> list[Pair]:
    """``DataLoader`` collate for :class:`IndexedPairs`: the batch as a list, skipped samples dropped."""
    return [pair for pair in batch if pair is not None]


def open_pairs(
    source: str | os.PathLike,
    *,
    image_column: str = "image",
    caption_column: str | None = "caption",
    skips: SkipCounter | None = None,
    caption_files: str | Sequence[str] = (".txt",),
    rank: int = 0,
    world_size: int = 1,
) -> PairSource:
    """Open image-text pairs for iteration, detecting the layout from ``source``.

    Args:
        source: a folder of ``x.jpg`` + ``x.txt`` pairs, a ``.csv`` or ``.jsonl`` file, a ``.tar``
            shard (``.tar.gz``/``.tgz`` too), a folder holding tar shards (read in name order; any
            other files in it are then ignored), or a brace pattern such as ``"data/{00000..00009}.tar"``.
        image_column: CSV column / JSONL field holding image paths (relative to the file's folder).
        caption_column: CSV column / JSONL field holding captions; also the caption field of a tar
            sample's ``.json`` member. None: images only (folder, CSV, JSONL): no captions are read and every
            pair's caption is ``""`` (the image trainers).
        skips: where skipped samples are counted; a new counter when omitted (see ``.skips``).
        caption_files: extensions of caption files (folders) or members (tar), in order of preference.
        rank, world_size: read only this distributed rank's share (see :meth:`PairSource.shard`).

    Raises:
        InvalidInputError: the source does not exist, is not one of the layouts, has no pairs at all,
            lacks the named columns, or names a shard that is missing or not a tar archive.
    """
    caption_files = _check_caption_files(caption_files)
    _check_rank(rank, world_size)
    name = os.fspath(source)
    path = Path(name)
    common = {"caption_files": caption_files, "skips": skips, "rank": rank, "world_size": world_size}
    if caption_column is None and (_is_tar_name(path.name) or "{" in name and not path.exists()):
        raise InvalidInputError(f"{name} is tar shards; images without captions are read from folders, CSV, JSONL")
    if "{" in name and not path.exists():
        shards = [Path(p) for p in expand_braces(name)]
        return PairSource(name, "tar", shards=_check_shards(shards, name), caption_field=caption_column, **common)
    if not path.exists():
        raise InvalidInputError(f"data source {name} does not exist; give {_LAYOUTS}")
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.is_file() and _is_tar_name(p.name))
        if shards and caption_column is None:
            raise InvalidInputError(
                f"{name} holds tar shards; images without captions are read from folders, CSV, JSONL"
            )
        if shards:
            return PairSource(name, "tar", shards=_check_shards(shards, name), caption_field=caption_column, **common)
        rows = _scan_folder(path, caption_files, images_only=caption_column is None)
        return PairSource(name, "folder", rows=rows, **common)
    lower = path.name.lower()
    if lower.endswith(".csv"):
        rows = _TableRows(path.parent, _read_csv(path, image_column, caption_column), caption_column is not None)
        return PairSource(name, "csv", rows=rows, **common)
    if lower.endswith(".jsonl"):
        rows = _TableRows(path.parent, _read_jsonl(path, image_column, caption_column), caption_column is not None)
        return PairSource(name, "jsonl", rows=rows, **common)
    if _is_tar_name(lower):
        return PairSource(name, "tar", shards=_check_shards([path], name), caption_field=caption_column, **common)
    raise InvalidInputError(f"data source {name} is not a layout taiyi reads; give {_LAYOUTS}")


def _check_rank(rank: int, world_size: int) -> None:
    if not (isinstance(rank, int) and isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise InvalidInputError(f"rank {rank!r} of world_size {world_size!r} is invalid; need 0 <= rank < world_size")


def _check_caption_files(caption_files: str | Sequence[str]) -> tuple[str, ...]:
    extensions = (caption_files,) if isinstance(caption_files, str) else tuple(caption_files)
    for ext in extensions:
        if not (isinstance(ext, str) and ext.startswith(".") and len(ext) > 1) or ext.lower() in IMAGE_EXTENSIONS:
            raise InvalidInputError(f"caption file extension {ext!r} is invalid; give extensions such as '.txt'")
    if not extensions:
        raise InvalidInputError("caption_files is empty; give at least one extension such as '.txt'")
    return tuple(ext.lower() for ext in extensions)


# --------------------------------------------------------------------------------------------------
# Opening each layout


def _scan_folder(root: Path, caption_files: tuple[str, ...], *, images_only: bool = False) -> _FolderRows:
    found: list[tuple[str, str | None]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .ipynb_checkpoints, .git, ...
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        captions: dict[str, dict[str, str]] = {}
        for filename in filenames:
            stem, ext = os.path.splitext(filename)
            if ext.lower() in caption_files and not filename.startswith("."):
                captions.setdefault(stem, {})[ext.lower()] = filename
        for filename in filenames:
            stem, ext = os.path.splitext(filename)
            if ext.lower() in IMAGE_EXTENSIONS and not filename.startswith("."):  # ._x.jpg: macOS metadata
                options = captions.get(stem, {})
                caption = next((options[e] for e in caption_files if e in options), None)
                if caption is None and ext.lower() == ".png":
                    found.append((prefix + filename, PNG_PROMPT))  # its recorded prompt, if it has one
                else:
                    found.append((prefix + filename, None if caption is None else prefix + caption))
    found.sort()
    if images_only and not found:
        raise InvalidInputError(f"data folder {root} has no images: no {'/'.join(IMAGE_EXTENSIONS)} files in it")
    if not images_only and not any(caption not in (None, PNG_PROMPT) for _, caption in found):
        # no caption file: a set only if its pictures record their prompts (the first PNG is asked)
        first = next((image for image, caption in found if caption == PNG_PROMPT), None)
        if first is None or png_prompt(root / first) is None:
            raise InvalidInputError(_no_pairs_message(root, len(found), caption_files))
    return _FolderRows(root, [image for image, _ in found], None if images_only else [c for _, c in found])


def _no_pairs_message(root: Path, n_images: int, caption_files: tuple[str, ...]) -> str:
    if n_images == 0:
        message = f"data folder {root} has no image-caption pairs: no {'/'.join(IMAGE_EXTENSIONS)} images in it"
    else:
        message = (
            f"data folder {root} has no image-caption pairs: {n_images} images but no caption files "
            f"(x.jpg needs x{caption_files[0]} beside it, or a PNG its prompt in a 'parameters' chunk, as taiyi "
            "and A1111 write it)"
        )
    tables = sorted(p.name for p in root.iterdir() if p.suffix.lower() in (".csv", ".jsonl"))
    if tables:
        return message + f"; if {tables[0]} holds the captions, give that file instead"
    return message + f"; give {_LAYOUTS}"


def _read_table_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return decode_text(data)
    except SkipSample:
        raise InvalidInputError(f"{path} is neither UTF-8 nor GB18030 text; save it as UTF-8") from None


def _wanted(image_column: str, caption_column: str | None) -> dict[str, str]:
    wanted = {"image_column": image_column, "caption_column": caption_column}
    return {arg: column for arg, column in wanted.items() if column is not None}


def _check_columns(path: Path, found: Sequence[str], wanted: dict[str, str], what: str) -> None:
    missing = [f"the {arg.replace('_', ' ')} {column!r}" for arg, column in wanted.items() if column not in found]
    if missing:
        raise InvalidInputError(
            f"{path} has no {what} for {' and '.join(missing)} (its {what}s: {', '.join(found) or 'none'}); "
            f"name them with --image-column/--caption-column (image_column=/caption_column= in Python), "
            f"e.g. --image-column name for Taiyi CSVs"
        )


def _read_csv(path: Path, image_column: str, caption_column: str | None) -> list[tuple[str | None, object]]:
    reader = csv.reader(io.StringIO(_read_table_text(path), newline=""))
    rows: list[tuple[str | None, object]] = []
    try:
        header = next(reader, None)
        if header is None:
            raise InvalidInputError(f"{path} is empty; a CSV needs a header row such as 'image,caption'")
        header = [column.strip() for column in header]
        _check_columns(path, header, _wanted(image_column, caption_column), "column")
        image_at = header.index(image_column)
        caption_at = image_at if caption_column is None else header.index(caption_column)  # None: images only
        for row in reader:
            if not row:
                continue  # blank line
            if len(row) <= max(image_at, caption_at):
                rows.append((None, None))
            elif any(field.strip() for field in row[len(header) :]):
                rows.append((None, _EXTRA_FIELDS))  # reading it would train on half a caption
            else:
                rows.append((row[image_at], row[caption_at]))
    except csv.Error as exc:
        raise InvalidInputError(f"{path} line {reader.line_num} is not valid CSV ({exc}); fix or remove it") from exc
    if not rows:
        raise InvalidInputError(f"{path} has a header but no rows")
    return rows


def _read_jsonl(path: Path, image_column: str, caption_column: str | None) -> list[tuple[str | None, object]]:
    rows: list[tuple[str | None, object]] = []
    checked = False
    # Split on "\n" only: str.splitlines() would also split inside strings holding U+2028.
    for line in _read_table_text(path).split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            rows.append((None, None))
            continue
        if not isinstance(record, dict):
            rows.append((None, None))
            continue
        if not checked:  # the first object plays the part of a CSV header
            _check_columns(path, list(record), _wanted(image_column, caption_column), "field")
            checked = True
        image_ref = record.get(image_column)
        caption = record.get(caption_column) if caption_column is not None else ""
        rows.append((image_ref if isinstance(image_ref, str) else None, caption))
    if not checked:
        raise InvalidInputError(
            f'{path} has no JSON object lines; each line should be like {{"image": ..., "caption": ...}}'
        )
    return rows


def _read_rows(rows: _Rows, indices: Sequence[int], skip: Callable[[str, str], None]) -> Iterator[Pair]:
    for index in indices:
        try:
            yield rows.read(index)
        except SkipSample as skipped:
            skip(skipped.reason, rows.key(index))


# --------------------------------------------------------------------------------------------------
# WebDataset tar shards


def _is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``"a/{000..002}.tar"`` → ``a/000.tar a/001.tar a/002.tar``.

    Supports numeric ranges (zero padding follows the bounds, as in bash) and comma lists
    ``{train,val}``, nested and several per pattern, expanded left to right.

    Raises:
        InvalidInputError: unbalanced braces, or an expansion past ``MAX_SHARDS`` names.
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = _closing_brace(pattern, start)
    body = pattern[start + 1 : end]
    if match := _RANGE.match(body):
        first, last = int(match.group(1)), int(match.group(2))
        if abs(last - first) >= MAX_SHARDS:
            raise InvalidInputError(f"brace pattern {pattern!r} expands to more than {MAX_SHARDS} names")
        digits = [bound.lstrip("-") for bound in match.groups()]
        padded = any(len(d) > 1 and d.startswith("0") for d in digits)  # bash: {00..10} pads, {0..10} does not
        width = max(len(bound) for bound in match.groups()) if padded else 0
        step = 1 if last >= first else -1
        options = [f"{i:0{width}d}" for i in range(first, last + step, step)]
    else:
        parts = _split_top_level(body)
        if len(parts) == 1:  # "{x}" is not an expansion: keep it literally, expand inside
            options = ["{" + option + "}" for option in expand_braces(body)]
        else:
            options = [option for part in parts for option in expand_braces(part)]
    tails = expand_braces(pattern[end + 1 :])
    if len(options) * len(tails) > MAX_SHARDS:
        raise InvalidInputError(f"brace pattern {pattern!r} expands to more than {MAX_SHARDS} names")
    return [pattern[:start] + option + tail for option in options for tail in tails]


def _closing_brace(pattern: str, start: int) -> int:
    depth = 0
    for at in range(start, len(pattern)):
        if pattern[at] == "{":
            depth += 1
        elif pattern[at] == "}":
            depth -= 1
            if depth == 0:
                return at
    raise InvalidInputError(f"brace pattern {pattern!r} has an unclosed '{{'")


def _split_top_level(body: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for at, char in enumerate(body):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(body[start:at])
            start = at + 1
    parts.append(body[start:])
    return parts


def _check_shards(shards: list[Path], name: str) -> list[Path]:
    not_tar_names = [p for p in shards if not _is_tar_name(p.name)]
    if not_tar_names:
        raise InvalidInputError(
            f"{name} names {not_tar_names[0]}, which is not a tar shard; brace patterns must name .tar files"
        )
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise InvalidInputError(f"{len(missing)} of {len(shards)} shards of {name} do not exist, e.g. {missing[0]}")
    for shard in shards:
        try:
            is_tar = tarfile.is_tarfile(shard)
        except OSError as exc:
            raise InvalidInputError(f"cannot read shard {shard}: {exc.strerror or exc}") from exc
        if not is_tar:
            raise InvalidInputError(
                f"{shard} is not a tar archive; WebDataset shards are plain (or gzipped) tar files"
            )
    return shards


class _CutWatchingTarInfo(tarfile.TarInfo):
    """Notes why ``tarfile`` stopped: past the first member it ends *silently* on a missing, cut or
    garbled header, which is how a shard cut short (an interrupted copy or download) looks."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # the end-of-archive marker: a proper end
            raise
        except tarfile.HeaderError as exc:
            tar.cut_short = str(exc) or type(exc).__name__
            raise


def _tar_samples(shard: Path, wanted: set[str], skip: Callable[[str, str], None]) -> Iterator[tuple[str, dict]]:
    """(key, {extension: bytes}) for each run of consecutive members sharing a key."""
    key, members = None, {}
    try:
        # Streaming: one pass, no seeking, any compression.
        with tarfile.open(shard, mode="r|*", tarinfo=_CutWatchingTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.removeprefix("./")
                folder, base = posixpath.split(name)
                if base.startswith(".") or "." not in base:  # ._x.jpg (macOS), extension-less files
                    continue
                stem, ext = base.split(".", 1)  # WebDataset: the key ends at the basename's first dot
                member_key = posixpath.join(folder, stem)
                if member_key != key:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                if ext.lower() in wanted:
                    members[ext.lower()] = tar.extractfile(member).read()
            if getattr(tar, "cut_short", None):
                raise tarfile.ReadError(f"no end-of-archive marker: {tar.cut_short}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        # The rest of the shard (how many samples is unknowable) is lost; the sample being read is dropped.
        logger.warning("%s is damaged (%s); skipping it from sample %s on", shard, exc, key or "one")
        skip("damaged shard", str(shard))
        return
    if key is not None:
        yield key, members


def _iter_shard(
    shard: Path, caption_files: tuple[str, ...], caption_field: str, skip: Callable[[str, str], None]
) -> Iterator[Pair]:
    caption_exts = tuple(ext[1:] for ext in caption_files)
    wanted = {*_TAR_IMAGE_EXTENSIONS, *caption_exts, "json"}
    for key, members in _tar_samples(shard, wanted, skip):
        try:
            yield _tar_pair(key, members, caption_exts, caption_field)
        except SkipSample as skipped:
            skip(skipped.reason, key)


def _tar_pair(key: str, members: dict[str, bytes], caption_exts: tuple[str, ...], caption_field: str) -> Pair:
    image_ext = next((ext for ext in _TAR_IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        raise SkipSample("missing image")
    caption_ext = next((ext for ext in caption_exts if ext in members), None)
    if caption_ext is not None:
        caption = clean_caption(decode_text(members[caption_ext]))
    elif "json" in members:
        try:
            record = json.loads(decode_text(members["json"]))
        except ValueError:
            raise SkipSample("invalid json") from None
        if not isinstance(record, dict) or caption_field not in record:
            raise SkipSample("missing caption")
        caption = clean_caption(record[caption_field])
    else:
        raise SkipSample("missing caption")
    return Pair(key, decode_image(members[image_ext]), caption)
