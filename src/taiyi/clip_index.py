"""Search a photo folder in Chinese: an incremental index of CLIP image embeddings, search, previews.

An index is a folder::

    embeddings.safetensors   {"embeddings": float32 (N, D)}, row i ↔ files[i] of index.json, L2-normalised
    index.json               {"format": "taiyi-clip-index", "version": 1, "root": <indexed folder, absolute>,
                              "dim": D, "model": {"name", "config", "image_tower_sha256", "image_processor"},
                              "files": [{"path": <relative, "/"-separated>, "size": bytes, "mtime_ns": ns}, ...]}

Re-indexing embeds only files that are new or whose size or mtime changed, and drops deleted ones.
The embeddings depend only on the image tower, so an index is tied to it (``image_tower_sha256``, a
hash of its weights and preprocessing): a model with another image tower is refused, while a retrained
text tower over the same frozen tower (locked-image tuning) searches the index as it is.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .errors import InvalidInputError, OutputError
from .io import check_writable, load_image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
INDEX_JSON = "index.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
INDEX_FORMAT = "taiyi-clip-index"
INDEX_VERSION = 1
# Preprocessing settings that change embeddings (class names differ between the PIL and torchvision backends).
_PROCESSOR_KEYS = (
    "size",
    "crop_size",
    "image_mean",
    "image_std",
    "do_resize",
    "do_center_crop",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "do_convert_rgb",
)


@dataclass
class ClipIndex:
    """A loaded index: where its images are, which image tower embedded them, and the embeddings."""

    folder: Path
    root: Path
    model: dict
    files: list[dict]
    embeddings: torch.Tensor  # (N, D) float32, normalised

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def path_of(self, row: int) -> Path:
        return self.root / self.files[row]["path"]


@dataclass
class IndexReport:
    """What one ``build_index`` run did."""

    total: int = 0
    embedded: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: list[str] = field(default_factory=list)  # unreadable files (relative paths)

    def summary(self, out: Path) -> str:
        line = (
            f"{out}: {self.total} images ({self.embedded} embedded, {self.unchanged} unchanged, "
            f"{self.removed} removed)"
        )
        if self.skipped:
            line += f"; {len(self.skipped)} unreadable skipped (e.g. {self.skipped[0]})"
        return line


@dataclass
class SearchHit:
    score: float  # cosine similarity
    path: Path


# --- model identity ----------------------------------------------------------------------------------
def image_processor_settings(model) -> dict:
    settings = model.image_processor.to_dict()
    return {k: settings[k] for k in _PROCESSOR_KEYS if k in settings}


def image_tower_fingerprint(model) -> str:
    """sha256 of the image tower's weights (as float32) and preprocessing: what the embeddings depend on."""
    digest = hashlib.sha256()
    digest.update(json.dumps(image_processor_settings(model), sort_keys=True, default=str).encode())
    state = model.vision_model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy())  # (buffer protocol: no copy)
    return digest.hexdigest()


def model_identity(model, name: str, image_tower: str | None = None) -> dict:
    """What index.json records about the model that built it."""
    return {
        "name": name,
        "image_tower": image_tower,
        "config": model.config_dict(),
        "image_tower_sha256": image_tower_fingerprint(model),
        "image_processor": image_processor_settings(model),
    }


def check_same_image_tower(index: ClipIndex, model, name: str, fingerprint: str | None = None) -> None:
    """Refuse a model whose image tower is not the one that built ``index``.

    Args:
        fingerprint: the model's :func:`image_tower_fingerprint` when already computed.
    """
    built_by = index.model.get("name", "another model")
    if index.model.get("image_tower"):
        built_by += f" --image-tower {index.model['image_tower']}"
    fingerprint = fingerprint or image_tower_fingerprint(model)
    if model.image_dim != index.dim or fingerprint != index.model.get("image_tower_sha256"):
        raise InvalidInputError(
            f"index {index.folder} was built by another image tower than that of {name}; use the model that "
            f"built it (-m {built_by}), or build a new index with this one"
        )


# --- reading and writing ---------------------------------------------------------------------------
def load_index(folder: str | os.PathLike) -> ClipIndex:
    """Read an index folder, checking that its parts agree; one-line errors for a missing or corrupt one."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.exists():
        raise InvalidInputError(f"index {folder} does not exist; build it with: taiyi clip index DIR --out {folder}")
    if not folder.is_dir() or not (folder / INDEX_JSON).is_file():
        raise InvalidInputError(
            f"{folder} is not a taiyi clip index (no {INDEX_JSON}); build one with taiyi clip index"
        )
    corrupt = f"index {folder} is corrupt"
    rebuild = "delete it and rebuild it with taiyi clip index"
    try:
        meta = json.loads((folder / INDEX_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{corrupt} ({INDEX_JSON} is not valid JSON); {rebuild}") from exc
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise InvalidInputError(f"{corrupt} ({INDEX_JSON} is not a taiyi clip index); {rebuild}")
    if meta.get("version") != INDEX_VERSION:
        raise InvalidInputError(
            f"index {folder} has format version {meta.get('version')}, not {INDEX_VERSION}; {rebuild}"
        )
    try:
        files = meta["files"]
        root, model, dim = Path(meta["root"]), dict(meta["model"]), int(meta["dim"])
        if not all(isinstance(f["path"], str) and int(f["size"]) >= 0 and int(f["mtime_ns"]) >= 0 for f in files):
            raise ValueError("bad file entry")
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{corrupt} ({INDEX_JSON} lacks or garbles {exc}); {rebuild}") from exc
    try:
        embeddings = load_file(folder / EMBEDDINGS_FILE)["embeddings"]
    except FileNotFoundError as exc:
        raise InvalidInputError(f"{corrupt} ({EMBEDDINGS_FILE} is missing); {rebuild}") from exc
    except Exception as exc:  # safetensors raises its own error types for a truncated or garbled file
        raise InvalidInputError(f"{corrupt} ({EMBEDDINGS_FILE} is unreadable); {rebuild}") from exc
    if embeddings.ndim != 2 or tuple(embeddings.shape) != (len(files), dim):
        raise InvalidInputError(
            f"{corrupt} ({EMBEDDINGS_FILE} holds {tuple(embeddings.shape)}, index.json lists {len(files)} files "
            f"of dimension {dim}); {rebuild}"
        )
    return ClipIndex(folder, root, model, files, embeddings.float())


def _write_index(out: Path, meta: dict, embeddings: torch.Tensor) -> None:
    """Write both files into a temporary folder beside ``out``, then swap it in by renames."""
    from safetensors.torch import save

    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    old = None
    try:
        tmp.mkdir()  # not mkdtemp, nor safetensors' save_file: their 0700/0600 modes would stay on the index
        data = save({"embeddings": embeddings.contiguous()}, metadata={"format": INDEX_FORMAT})
        (tmp / EMBEDDINGS_FILE).write_bytes(data)
        (tmp / INDEX_JSON).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
        if out.exists():
            old = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous index back
            old = None
        if isinstance(exc, OSError):
            raise OutputError(f"could not write index {out}: {exc.strerror or exc}") from exc
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --- building ----------------------------------------------------------------------------------------
def find_images(root: Path, *, exclude: Path | None = None) -> list[str]:
    """Relative ("/"-separated) paths of the images under ``root``, sorted; hidden files and folders skipped."""
    exclude = exclude.resolve() if exclude is not None else None
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (exclude is None or (here / d).resolve() != exclude)
        )
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append((here / name).relative_to(root).as_posix())
    return sorted(found)


def open_for_update(root: str | os.PathLike, out: str | os.PathLike) -> ClipIndex | None:
    """Check ``root`` and ``out`` before any work; return the index already at ``out`` (None for a new one)."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise InvalidInputError(
            f"image folder {root} does not exist" if not root.exists() else f"{root} is not a folder"
        )
    if not out.parent.is_dir():
        raise OutputError(f"output folder {out.parent} does not exist; create it first")
    check_writable(out if out.is_dir() else out.parent)  # before every picture is embedded, not after
    if not out.exists():
        return None
    if not out.is_dir():
        raise OutputError(f"{out} is a file; --out must name a new or existing index folder")
    if not (out / INDEX_JSON).exists():
        if any(out.iterdir()):
            raise OutputError(f"{out} is a folder that holds no taiyi clip index; choose a new --out folder")
        return None
    previous = load_index(out)
    if previous.root != root.resolve():
        raise InvalidInputError(
            f"index {out} indexes {previous.root}, not {root.resolve()}; choose another --out for this folder"
        )
    return previous


def build_index(
    model,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model_name: str,
    image_tower: str | None = None,
    previous: ClipIndex | None | bool = True,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> IndexReport:
    """Index the images under ``root`` into the folder ``out``, re-embedding only new or changed files.

    Args:
        model: a :class:`taiyi.clip.ChineseCLIP`.
        root: the photo folder (walked recursively; jpg, jpeg, png, webp, bmp, gif).
        out: the index folder; an index there is updated (it must come from the same folder and image tower).
        model_name, image_tower: how index.json names the model (what the user passed as ``--model`` and
            ``--image-tower``).
        previous: the index already at ``out`` when the caller has read it with :func:`open_for_update`;
            True (default) reads it here.
        batch_size: images per forward pass.
        progress: called as ``progress(done, total)`` after each batch of new or changed images.

    Unreadable images are skipped and listed in the report; nothing is written when no image is readable.
    """
    if batch_size < 1:
        raise InvalidInputError("--batch-size must be at least 1")
    root, out = Path(root), Path(out)
    if previous is True:
        previous = open_for_update(root, out)
    previous = previous or None
    identity = model_identity(model, model_name, image_tower)
    if previous is not None:
        check_same_image_tower(previous, model, model_name, identity["image_tower_sha256"])
    old = {f["path"]: (f["size"], f["mtime_ns"], i) for i, f in enumerate(previous.files)} if previous else {}
    old_embeddings = previous.embeddings if previous is not None else None

    report = IndexReport()
    entries: dict[str, tuple[dict, torch.Tensor]] = {}
    todo: list[tuple[str, dict]] = []
    present = find_images(root, exclude=out)
    for rel in present:
        try:
            st = (root / rel).stat()
        except OSError:
            report.skipped.append(rel)
            continue
        entry = {"path": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        seen = old.get(rel)
        if seen is not None and seen[:2] == (st.st_size, st.st_mtime_ns):
            entries[rel] = (entry, old_embeddings[seen[2]])
            report.unchanged += 1
        else:
            todo.append((rel, entry))
    report.removed = len(old.keys() - set(present))

    for start in range(0, len(todo), batch_size):
        batch = []
        for rel, entry in todo[start : start + batch_size]:
            try:
                batch.append((rel, entry, load_image(root / rel)))
            except InvalidInputError:
                report.skipped.append(rel)
        if batch:
            embeds = model.encode_image([im for _, _, im in batch], batch_size=batch_size)  # (B, D)
            for (rel, entry, _), row in zip(batch, embeds, strict=True):
                entries[rel] = (entry, row)
            report.embedded += len(batch)
        if progress is not None:
            progress(min(start + batch_size, len(todo)), len(todo))

    if not entries:
        where = f"{root} holds no readable image" if report.skipped else f"no images found in {root}"
        raise InvalidInputError(f"{where} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); nothing was written")
    report.total = len(entries)
    order = sorted(entries)
    meta = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "root": str(root.resolve()),
        "dim": model.image_dim,
        "model": identity,
        "files": [entries[rel][0] for rel in order],
    }
    embeddings = torch.stack([entries[rel][1] for rel in order]).float()  # (N, D)
    _write_index(out, meta, embeddings)
    return report


# --- searching and previews ----------------------------------------------------------------------------
def read_query(query: str) -> str | Image.Image:
    """A query ending in an image suffix (``.jpg``, ``.png``…) is an image file to search by; anything else
    is text (returned as is). A missing or unreadable query image is an error, not a search for its name."""
    if Path(query).suffix.lower() in IMAGE_SUFFIXES:
        return load_image(query, what="query image")
    return query


def search_index(model, index: ClipIndex, query: str | Image.Image, k: int = 10) -> list[SearchHit]:
    """The ``k`` indexed images closest to a text or image query, best first (cosine similarity)."""
    if k < 1:
        raise InvalidInputError("-k must be at least 1")
    rows, scores = model.retrieve(query, index.embeddings, k)
    return [SearchHit(score, index.path_of(row)) for row, score in zip(rows, scores, strict=True)]


def _thumbnail(path: Path, size: int) -> Image.Image | None:
    try:
        image = load_image(path)
    except InvalidInputError:
        return None  # deleted or broken since it was indexed: the preview shows a gap
    return ImageOps.contain(image, (size, size))


def render_html(query: str, hits: Sequence[SearchHit], *, thumb_size: int = 256) -> str:
    """A self-contained HTML page of the hits: thumbnails embedded as base64 JPEG, text escaped."""
    cards = []
    for rank, hit in enumerate(hits, 1):
        thumb = _thumbnail(hit.path, thumb_size)
        if thumb is None:
            picture = '<div class="missing">image unavailable</div>'
        else:
            buffer = io.BytesIO()
            thumb.save(buffer, format="JPEG", quality=85)
            data = base64.b64encode(buffer.getvalue()).decode("ascii")
            picture = f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(hit.path.name)}">'
        cards.append(
            f"<figure>{picture}<figcaption><b>{rank}.</b> {hit.score:.4f}<br>"
            f"{html.escape(str(hit.path))}</figcaption></figure>"
        )
    title = html.escape(query)
    return (
        '<!DOCTYPE html>\n<html lang="zh"><head><meta charset="utf-8">'
        f"<title>taiyi clip search: {title}</title><style>"
        "body{font-family:sans-serif;margin:1em}figure{display:inline-block;vertical-align:top;margin:.5em;"
        f"width:{thumb_size}px}}figure img{{max-width:100%}}figcaption{{font-size:small;word-break:break-all}}"
        f".missing{{width:{thumb_size}px;height:{thumb_size // 2}px;background:#eee}}"
        f"</style></head><body><h1>{title}</h1>\n" + "\n".join(cards) + "\n</body></html>\n"
    )


def render_grid(hits: Sequence[SearchHit], *, cell: int = 192, columns: int = 5) -> Image.Image:
    """A contact sheet: one cell per hit, best first, labelled with rank and score."""
    from PIL import ImageDraw

    label_h = 18
    columns = max(1, min(columns, len(hits)))
    rows = math.ceil(len(hits) / columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, hit in enumerate(hits):
        x, y = (i % columns) * cell, (i // columns) * (cell + label_h)
        thumb = _thumbnail(hit.path, cell - 4)
        if thumb is None:
            draw.rectangle((x + 2, y + 2, x + cell - 3, y + cell - 3), fill=(230, 230, 230))
        else:
            sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        draw.text((x + 4, y + cell + 2), f"{i + 1}. {hit.score:.4f}", fill="black")
    return sheet
