"""Reading user images and writing outputs atomically (temporary name, then rename)."""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidInputError, OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; outputs should get the user's usual permissions.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()

MAX_INPUT_PIXELS = 4096 * 4096  # larger inputs are refused rather than decoded (decompression bombs)


def load_image(path: str | os.PathLike, *, mode: str | None = "RGB", what: str = "image") -> Image.Image:
    """Open an image file fully, upright (its EXIF rotation applied) and converted to ``mode`` (None: as stored,
    16-bit greyscale scaled to 8 bits); one-line errors for anything unusable."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"{what} {path} is a folder; give an image file")
    if not path.is_file():
        raise InvalidInputError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_INPUT_PIXELS:
                raise InvalidInputError(f"{what} {path} is {im.width}x{im.height}; the largest accepted is 4096x4096")
            im.load()
            return convert(as_displayed(im), mode) if mode else as_displayed(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, InvalidInputError):
            raise
        if isinstance(exc, UnidentifiedImageError):
            reason = "no format Pillow knows"
        elif isinstance(exc, Image.DecompressionBombError):
            reason = "too large to decode; the largest accepted is 4096x4096"
        else:  # truncated data, a broken header or chunk
            reason = f"damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        raise InvalidInputError(f"{what} {path} is not a readable image: {reason}") from exc


# Pillow's convert() clips these at 255 instead of scaling: a mid-grey 16-bit picture would come out white
HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit or 32-bit greyscale scaled to 8 bits (as :func:`taiyi.data.decode.to_rgb` does); others unchanged."""
    if image.mode not in HIGH_BIT_MODES:
        return image
    from .data.decode import to_rgb

    return to_rgb(image)


def as_displayed(image: Image.Image) -> Image.Image:
    """A decoded file as a viewer shows it, in 8 bits: the EXIF rotation applied (diffusers' ``load_image`` does
    too; a phone photo is stored sideways) and high-bit greyscale scaled (:func:`to_8bit`)."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block is no reason to refuse the picture
        pass
    return to_8bit(image)


def as_picture(
    image: Image.Image | str | os.PathLike | np.ndarray, mode: str = "RGB", what: str = "image"
) -> Image.Image:
    """A PIL image, an image file's path or a uint8 numpy array (H, W[, C]) as a PIL image in ``mode``.

    A file is read as displayed (its EXIF rotation applied); 16-bit and 32-bit greyscale is scaled to 8 bits (as
    :func:`taiyi.data.decode.to_rgb` does), not clipped.

    Args:
        image: the picture; a boolean (H, W) array is a mask (True = 255).
        mode: the PIL mode wanted (``RGB``, ``L``).
        what: how error messages name it (``image``, ``mask``, ``init image``).

    Raises:
        InvalidInputError: a missing or unreadable file, an array that is not uint8 pixels, or another type.
    """
    if isinstance(image, str | os.PathLike):
        image = load_image(image, mode=None, what=what)  # upright, 8 bits
    elif isinstance(image, np.ndarray):
        image = _array_picture(image, what)
    elif not isinstance(image, Image.Image):
        raise InvalidInputError(
            f"{what} must be a PIL image, a file path or a uint8 numpy array, not {type(image).__name__}"
            + (
                "; for a (3, H, W) tensor in 0-1: (t.permute(1, 2, 0) * 255).round().byte().numpy()"
                if type(image).__module__.split(".")[0] == "torch"  # torch is not imported for this
                else ""
            )
        )
    return convert(to_8bit(image), mode)


ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` has transparent pixels to composite (an alpha channel or a transparent palette entry)."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def on_white(image: Image.Image) -> Image.Image:
    """``image`` composited onto white, as RGB: what a page or viewer shows of a transparent picture."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def convert(image: Image.Image, mode: str) -> Image.Image:
    """``image.convert(mode)``, but a transparent picture turned RGB is composited onto white (as the training data
    reader does, and as a page shows it) rather than showing the colours its transparent pixels happen to hold."""
    if mode == "RGB" and has_alpha(image):
        return on_white(image)
    return image.convert(mode)


def _array_picture(array: np.ndarray, what: str) -> Image.Image:
    if array.dtype == np.bool_ and array.ndim == 2:  # a boolean mask: True = redraw
        return Image.fromarray(array.astype(np.uint8) * 255)
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if array.dtype != np.uint8 or not shape_ok:
        raise InvalidInputError(
            f"{what} array is {array.dtype} of shape {array.shape}; give uint8 (H, W) or (H, W, 3) pixels in "
            "0-255, e.g. (array * 255).round().astype(np.uint8) for floats in 0-1"
        )
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    A crash, a full disk or Ctrl-C leaves either the old file or nothing, never a partial file.

    Raises:
        OutputError: the folder is missing, the file exists and ``overwrite`` is False, or the disk is full.
    """
    path = Path(path)
    check_output_file(path, overwrite=overwrite)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # a read-only or special folder: nothing was written
        raise OutputError(f"could not write {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if a file appeared meanwhile: never clobber without --overwrite
            os.unlink(tmp)
    except FileExistsError as exc:
        _unlink_quietly(tmp)
        raise OutputError(f"{path} already exists; pass --overwrite to replace it") from exc
    except OSError as exc:
        _unlink_quietly(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"disk full while writing {path}; nothing was written") from exc
        raise OutputError(f"could not write {path}: {exc.strerror or exc}") from exc
    except BaseException:  # Ctrl-C mid-write: nothing left behind either
        _unlink_quietly(tmp)
        raise
    return path


def make_temp_dir(out: Path) -> Path:
    """A fresh folder beside ``out`` (``.<name>.XXXX``, the user's usual permissions), to be renamed to ``out``.

    Raises:
        OutputError: the folder cannot be created there (read-only, no permission, a special file system).
    """
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"could not write {out}: {exc.strerror or exc}") from exc
    os.chmod(tmp, DIR_MODE)  # mkdtemp makes it private
    return tmp


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Write a folder atomically: fill the temporary folder this yields; on success it replaces ``out`` (an
    existing ``out`` is removed first: check ``overwrite`` before), on any error it is removed and ``out`` stays.

    Raises:
        OutputError: the folder cannot be created or written (no permission, a full disk).
    """
    tmp = make_temp_dir(out)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"could not write {out}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def check_output_file(path: Path, *, overwrite: bool = False) -> None:
    if path.parent.exists() and not path.parent.is_dir():
        raise OutputError(f"{path.parent} is a file, not a folder; give an output in an existing folder")
    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name ending in .png")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; pass --overwrite to replace it")
    check_writable(path.parent)


def check_writable(folder: Path) -> None:
    """Refuse a folder this process cannot create files in, before any work is spent on what goes there."""
    try:  # what an atomic write does first; permissions alone miss read-only mounts and ACLs
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".taiyi-probe-")
    except OSError as exc:
        raise OutputError(f"cannot write in {folder}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def save_png(image: Image.Image, path: str | os.PathLike, *, pnginfo=None, overwrite: bool = False) -> Path:
    """Encode ``image`` as PNG (with its text chunks) and write it atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return atomic_write_bytes(path, buffer.getvalue(), overwrite=overwrite)


_NUMBERED = re.compile(r"^(\d{5})-")


def next_index(folder: Path) -> int:
    """Next free counter for ``NNNNN-<seed>.png`` names in ``folder`` (A1111's outputs convention)."""
    used = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(used, default=-1) + 1


def output_paths(output: str | os.PathLike | None, seeds: list[int], *, default_dir: str = "outputs") -> list[Path]:
    """Where the images of one run go.

    - ``None``: ``outputs/NNNNN-<seed>.png`` (the folder is created; names never collide);
    - an existing folder (or a path ending in ``/``): the same numbered names inside it;
    - a ``.png`` file name: that file for one image, ``<stem>-<i>.png`` for several.
    """
    if output is None:
        folder = Path(default_dir)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        text = os.fspath(output)
        folder = Path(text)
        if not (folder.is_dir() or text.endswith(("/", os.sep))):
            path = Path(text)
            if path.suffix.lower() != ".png":
                raise OutputError(f"output {path} must end in .png (or be an existing folder)")
            if len(seeds) == 1:
                return [path]
            return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(len(seeds))]
        if folder.exists() and not folder.is_dir():  # "a.png/" where a.png is a picture: it does exist
            raise OutputError(f"{folder} is a file, not a folder; drop the trailing / to replace it (--overwrite)")
        if not folder.is_dir():
            raise OutputError(f"output folder {folder} does not exist; create it first")
    start = next_index(folder)
    return [folder / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]
