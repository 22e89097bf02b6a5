"""Where the UNet runs: PyTorch, or OpenVINO's CPU runtime.

The UNet is the cost of a picture (every denoising step calls it, twice with guidance). With
``backend="openvino"`` it is converted once to OpenVINO IR — traced from the loaded model, so LoRA-free
weights of any Taiyi / SD v1 checkpoint, inpainting UNets included — saved in the cache (see
:func:`cache_dir`) under a fingerprint of its weights and config, and run by OpenVINO's CPU plugin from
then on (``taiyi cache list`` / ``prune``: :func:`cache_entries`, :func:`prune_cache`). The rest of the
pipeline (text encoder, scheduler, VAE) stays in PyTorch. OpenVINO picks the precision: bf16 on CPUs with bf16
instructions (``avx512_bf16``/AMX; UNet outputs within cosine 0.9997 of float32 at full size), float32 elsewhere
(float32 rounding apart from PyTorch).

``auto`` is ``openvino`` on CPUs with bf16 instructions when the package is installed, ``torch`` elsewhere,
from measurements of the full-size UNet (512², classifier-free-guidance batch of 2, same run each):
- 16-core Xeon with AMX: PyTorch float32 1.92 s per call, PyTorch bf16 autocast 0.85, OpenVINO bf16 0.63,
  OpenVINO float32 1.76; a default picture 19.6 s (PyTorch) against 12.1 s (OpenVINO) at 6.3 against
  11.8 GB peak — so there OpenVINO is the default, and ``--memory low`` or a LoRA keeps PyTorch;
- the 2-core AVX2 machine of the README's figures: OpenVINO's float32 UNet 1.02–1.11× faster per call but
  2.2× the memory (12.9 GB for one picture, where PyTorch fits 1024² in 8 GB) — so there it is ``torch``.
``--backend openvino`` asks for it anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidInputError, ModelLoadError

__all__ = [
    "BACKENDS",
    "CacheEntry",
    "PruneReport",
    "cache_dir",
    "cache_entries",
    "check_backend",
    "cpu_bf16_instructions",
    "format_size",
    "installed_versions",
    "prune_cache",
    "remove_cache_entry",
    "resolve_backend",
    "tune_cpu_allocator",
    "use_openvino_unet",
]

BACKENDS: tuple[str, ...] = ("auto", "torch", "openvino")
# the backend that ``auto`` stands for when set (``torch`` keeps a process's pictures the same on every CPU)
BACKEND_ENV = "TAIYI_BACKEND"
_IR_NAME = "unet.xml"
_IR_FORMAT = 1  # how _convert traces the UNet: a change of it must not reuse IR traced the old way
_ENTRY_INFO = "taiyi-entry.json"  # written with the IR: the versions that made it and the model it came from
_LAST_USED = "last-used"  # its modification time is when a load last read the entry
_ENTRY_NAME = re.compile(r"[0-9a-f]{32}")  # unet_fingerprint's digest
_PARTIAL = (".converting-", ".removing-")  # _save's temporary folders; remove_cache_entry's, renamed away
_WRITING_S = 600  # a .converting- folder changed this recently may be a conversion saving now: left alone
logger = logging.getLogger("taiyi")


CPU_ALLOCATOR_ENV = "TAIYI_CPU_ALLOCATOR"  # "system": leave the C library's malloc settings as they are
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters
_allocator_tuned: bool | None = None


def tune_cpu_allocator() -> bool:
    """Keep the memory of freed tensors in the C heap rather than handing it back to the OS (once per process).

    A denoising step on CPU allocates and frees its activations, megabytes each. glibc serves such blocks
    with ``mmap`` and returns them on ``free``, so the next call faults in and zeroes every page again:
    about 0.7 million page faults per call of the full-size UNet at 512², and in the kernel 8 % of the
    run's CPU time. With the mmap threshold at glibc's maximum (32 MiB) and the trim threshold at 1 GiB,
    freed blocks are reused: no page faults after the first call, and 5–6 % less time per UNet call on
    the 2-core machine of the README's figures — the effect of the jemalloc/tcmalloc preload that CPU
    tuning guides for PyTorch recommend, without a preload. The process keeps its peak memory mapped
    between pictures instead of returning it.

    Linux with glibc only; ``TAIYI_CPU_ALLOCATOR=system`` (or ``off``) leaves it off. Returns whether it is in effect.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    setting = os.environ.get(CPU_ALLOCATOR_ENV, "").strip().lower()
    if setting in ("system", "off"):
        return False
    if setting:  # a typo would silently keep the tuning the user meant to turn off
        logger.warning("%s=%s is not 'system': the CPU allocator is tuned as by default", CPU_ALLOCATOR_ENV, setting)
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        _allocator_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
        )
    except (OSError, AttributeError):
        pass
    return _allocator_tuned


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InvalidInputError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    return backend


def _openvino():
    try:
        import openvino
    except ImportError:
        return None
    return openvino


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype, *, memory: str = "auto", loras: bool = False
) -> str:
    """``torch`` or ``openvino`` for this device and dtype; a request that cannot be met is one line.

    ``auto`` is ``openvino`` where it was measured to win — a CPU with bf16 instructions (OpenVINO then
    runs the UNet in bf16), float32 weights, the openvino package installed — unless the ``low`` memory
    mode or LoRAs ask for PyTorch; everywhere else it is ``torch``. ``TAIYI_BACKEND`` (``torch`` or
    ``openvino``), when set, is what ``auto`` means instead of the CPU's instructions; the ``low`` memory mode
    and LoRAs still run in PyTorch then (a LoRA is not in the converted UNet).
    """
    check_backend(backend)
    asked, instead = "the openvino backend", "use --backend torch"
    if backend == "auto" and os.environ.get(BACKEND_ENV):  # what auto means here, set by the environment
        chosen = os.environ[BACKEND_ENV]
        if chosen not in BACKENDS:
            raise InvalidInputError(f"{BACKEND_ENV}={chosen!r} is not a backend; use one of {', '.join(BACKENDS)}")
        if chosen == "openvino" and (memory == "low" or loras):
            return "torch"  # as for auto: the lean path, and LoRAs, which the converted UNet would drop
        backend, asked, instead = chosen, f"{BACKEND_ENV}=openvino", f"unset {BACKEND_ENV}"
    if backend == "auto":
        wins = device.type == "cpu" and dtype == torch.float32 and bool(cpu_bf16_instructions())
        if wins and memory != "low" and not loras and _openvino() is not None:
            return "openvino"
        return "torch"
    if backend != "openvino":
        return "torch"
    if device.type != "cpu" or dtype != torch.float32:
        here = f"{device.type}, {str(dtype).removeprefix('torch.')}"
        raise InvalidInputError(f"{asked} runs on the CPU in float32 (here {here}); {instead}, or cpu and float32")
    if _openvino() is None:
        raise InvalidInputError(f"{asked} needs the openvino package: pip install 'taiyi[openvino]', or {instead}")
    if memory == "low":  # asked by name: run it, but say what low does not do there
        logger.warning(
            "--memory low slices attention in PyTorch's UNet only; with the openvino backend it tiles the VAE and"
            " the UNet runs whole (--backend torch for the least memory)"
        )
    return "openvino"


def cache_dir() -> Path:
    """``TAIYI_CACHE``, else ``XDG_CACHE_HOME/taiyi``, else ``~/.cache/taiyi`` (a leading ``~`` is the home folder)."""
    if os.environ.get("TAIYI_CACHE"):
        return Path(os.environ["TAIYI_CACHE"]).expanduser()  # quoted in a unit or .env file, ~ reaches us as is
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "taiyi"


def unet_fingerprint(unet) -> str:
    """A digest of the UNet's config, every tensor's bytes and the converter's versions: same key, same model.

    Where the model was loaded from is not in it: a moved or copied checkpoint reuses its conversion.
    """
    import diffusers

    ov = _openvino()
    h = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in dict(unet.config).items() if k != "_name_or_path"}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    versions = f"openvino {ov.__version__ if ov else '-'} torch {torch.__version__} diffusers {diffusers.__version__}"
    h.update(f"{versions} ir {_IR_FORMAT}".encode())  # diffusers' forward is what is traced
    for name, tensor in sorted(unet.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class _Traceable(torch.nn.Module):
    """The UNet with positional tensors in and one tensor out, as the converter traces it."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _convert(unet, folder: Path):
    """Trace ``unet`` to OpenVINO IR in ``folder``; returns None, or the traced model where ``folder`` cannot be
    written (a read-only cache), which then runs from memory."""
    ov = _openvino()
    c, s, d = unet.config.in_channels, unet.config.sample_size, unet.config.cross_attention_dim
    example = (torch.randn(2, c, s, s), torch.tensor([500.0, 500.0]), torch.randn(2, 8, d))
    shapes = [ov.PartialShape([-1, c, -1, -1]), ov.PartialShape([-1]), ov.PartialShape([-1, -1, d])]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: harmless
            model = ov.convert_model(_Traceable(unet).eval(), example_input=example, input=shapes)
    except Exception as e:  # the converter's own errors name no file; say which step failed
        raise ModelLoadError(f"OpenVINO could not convert this UNet: {str(e).splitlines()[0][:200]}") from e
    info = {**installed_versions(), "model": str(getattr(unet.config, "_name_or_path", "") or "") or None}
    try:
        _save(model, folder, info)
    except (OSError, RuntimeError) as e:  # OpenVINO's own writes fail with RuntimeError (a full disk)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
        logger.warning(
            "cannot write the OpenVINO cache %s (%s): the UNet is converted again at every load; set TAIYI_CACHE"
            " to a folder you can write to",
            folder,
            reason,
        )
        return model
    return None


def _save(model, folder: Path, info: dict | None = None) -> None:
    """Save ``model`` as IR in ``folder``, with ``info`` (versions, model) beside it for ``taiyi cache list``
    (written to a temporary folder, then renamed into place)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_PARTIAL[0], dir=folder.parent))
    try:
        _openvino().save_model(model, tmp / _IR_NAME, compress_to_fp16=False)
        if info is not None:
            (tmp / _ENTRY_INFO).write_text(json.dumps(info, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        for attempt in range(2):
            try:
                tmp.rename(folder)
                return
            except OSError:
                if (folder / _IR_NAME).is_file():  # another process converted the same model first: keep theirs
                    return
                if attempt:
                    raise
                shutil.rmtree(folder, ignore_errors=True)  # no IR in it (a file deleted by hand): replace it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cpu_bf16_instructions() -> list[str]:
    """This CPU's bfloat16 instruction sets (``avx512_bf16``, ``amx_bf16``) as Linux reports them; [] elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]


def compile_unet(unet, *, threads: int | None = None, precision: str | None = None, echo=None):
    """The UNet compiled by OpenVINO for the CPU, converting (and caching) it on first use.

    ``precision`` is OpenVINO's inference precision hint (``"f32"``, ``"bf16"``); None leaves OpenVINO's
    own choice, which is bf16 on CPUs with bf16 instructions and f32 elsewhere.
    """
    ov = _openvino()
    folder = cache_dir() / "openvino" / unet_fingerprint(unet)
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    if (folder / _IR_NAME).is_file():
        try:
            compiled = core.compile_model(core.read_model(folder / _IR_NAME), "CPU", config)
        except Exception:  # a damaged cache entry (a truncated file): convert again
            shutil.rmtree(folder, ignore_errors=True)
        else:
            _mark_used(folder)
            return compiled
    if echo is not None:
        echo(f"converting the UNet to OpenVINO (once; cached in {folder})")
    unsaved = _convert(unet, folder)
    if unsaved is not None:  # a read-only cache
        return core.compile_model(unsaved, "CPU", config)
    compiled = core.compile_model(core.read_model(folder / _IR_NAME), "CPU", config)
    _mark_used(folder)
    _note_stale_entries()
    return compiled


def use_openvino_unet(unet, *, threads: int | None = None, echo=None) -> None:
    """Route ``unet``'s forward through OpenVINO (same signature, same outputs).

    Calls with inputs the IR does not take (ControlNet residuals, extra conditioning, LoRA scales) go
    to the PyTorch forward, so nothing silently changes meaning.
    """
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    compiled = compile_unet(unet, threads=threads, echo=echo)
    request = compiled.create_infer_request()
    torch_forward = unet.forward

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        if args or any(v is not None for v in kwargs.values()) or sample.device.type != "cpu":
            return torch_forward(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        request.infer(
            [
                np.ascontiguousarray(sample.detach().float().numpy()),
                np.ascontiguousarray(t.numpy()),
                np.ascontiguousarray(encoder_hidden_states.detach().float().numpy()),
            ]
        )
        out = torch.from_numpy(request.get_output_tensor(0).data.copy()).to(sample.dtype)
        self._taiyi_openvino_calls += 1
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    unet.forward = types.MethodType(forward, unet)
    unet._taiyi_torch_forward = torch_forward
    unet._taiyi_openvino_calls = 0  # calls OpenVINO answered (the rest went to torch)
    unet._taiyi_openvino_precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # f32 or bf16


def use_torch_unet(unet) -> None:
    """Undo :func:`use_openvino_unet`."""
    torch_forward = unet.__dict__.pop("_taiyi_torch_forward", None)
    if torch_forward is not None:
        unet.__dict__.pop("forward", None)
        unet.__dict__.pop("_taiyi_openvino_calls", None)
        unet.__dict__.pop("_taiyi_openvino_precision", None)


# The cache of converted UNets: what is there, and removing what this install can never use again.


def installed_versions() -> dict[str, str | int | None]:
    """The versions a conversion depends on, as installed (None: not installed), and the tracing's format.

    An entry made under other versions has another fingerprint, so this install can never load it.
    """
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "diffusers": version("diffusers"),
        "openvino": version("openvino"),
        "torch": version("torch"),
        "ir": _IR_FORMAT,
    }


@dataclass(frozen=True)
class CacheEntry:
    """One folder of the OpenVINO cache (``cache_dir() / "openvino"``).

    Attributes:
        path: the entry's folder.
        size: bytes of its files (each file once; symbolic links not followed).
        made: when it was written (seconds since the epoch).
        last_used: when a load last read it; None where no load recorded it (entries of older taiyi versions).
        versions: ``diffusers``, ``openvino``, ``torch`` and ``ir`` (the tracing's format) it was made with;
            None where not recorded.
        model: the folder (or hub snapshot) the UNet was loaded from when converted; None where not recorded.
        complete: False for a conversion that never finished (killed while saving) or a damaged entry.
        writing: an incomplete entry changed in the last 10 minutes: perhaps a conversion saving now.
    """

    path: Path
    size: int
    made: float
    last_used: float | None = None
    versions: dict | None = None
    model: str | None = None
    complete: bool = True
    writing: bool = False

    @property
    def name(self) -> str:
        return self.path.name

    def stale(self, installed: dict | None = None) -> bool:
        """Made under other versions than ``installed`` (default: :func:`installed_versions`), so never loaded."""
        installed = installed if installed is not None else installed_versions()
        return self.versions is not None and any(self.versions.get(k) != v for k, v in installed.items())


@dataclass
class PruneReport:
    """What :func:`prune_cache` removed (or would remove), each entry with why, and what it could not remove."""

    removed: list[tuple[CacheEntry, str]]
    failed: list[tuple[CacheEntry, str]]
    kept: list[CacheEntry]
    dry_run: bool = False

    @property
    def freed(self) -> int:
        return sum(entry.size for entry, _ in self.removed)


def cache_entries(now: float | None = None) -> list[CacheEntry]:
    """The entries of the OpenVINO cache, most recently used (or made) first; [] when there is none.

    Only real folders named as a fingerprint or as a temporary folder of a conversion are entries; anything
    else there (a symbolic link, a file of the user's) is not listed, and never removed.
    """
    root = cache_dir() / "openvino"
    now = time.time() if now is None else now
    try:
        children = sorted(os.scandir(root), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    entries = []
    for child in children:
        named = bool(_ENTRY_NAME.fullmatch(child.name))
        if not (named or child.name.startswith(_PARTIAL)) or not child.is_dir(follow_symlinks=False):
            continue
        try:
            entries.append(_read_entry(Path(child.path), named, now))
        except FileNotFoundError:  # removed meanwhile (a conversion's temporary folder renamed into place)
            continue
    return sorted(entries, key=lambda e: -(e.last_used or e.made))


def _read_entry(path: Path, named: bool, now: float) -> CacheEntry:
    size, made, last_used, seen, files = 0, None, None, set(), set()
    for folder, _, names in os.walk(path):  # os.walk does not enter linked folders
        for name in names:
            try:
                st = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            size += st.st_size
            if folder == str(path):
                files.add(name)
            if folder == str(path) and name == _LAST_USED:
                last_used = st.st_mtime
            else:
                made = st.st_mtime if made is None else max(made, st.st_mtime)
    if made is None:  # no file in it (a conversion killed before saving any): the folder's own time
        made = os.lstat(path).st_mtime
    versions = model = None
    try:
        info = json.loads((path / _ENTRY_INFO).read_text(encoding="utf-8"))
        versions = {k: info[k] for k in ("diffusers", "openvino", "torch", "ir")}
        model = info.get("model") if isinstance(info.get("model"), str) else None
    except (OSError, ValueError, KeyError, TypeError):  # an entry of an older taiyi, or a damaged record
        pass
    complete = named and {_IR_NAME, Path(_IR_NAME).with_suffix(".bin").name} <= files
    writing = not complete and path.name.startswith(_PARTIAL[0]) and now - made < _WRITING_S
    return CacheEntry(path, size, made, last_used, versions, model, complete, writing)


def _mark_used(folder: Path) -> None:
    """Record that a load read ``folder`` now (the time of a file in it); never fails a load."""
    try:
        (folder / _LAST_USED).touch()  # the time only; an empty file is created whole or not at all
    except OSError:  # a read-only cache, or the entry removed meanwhile
        pass


def _removal_reason(
    entry: CacheEntry,
    installed: dict,
    now: float,
    older_than_days: float | None,
    stale_versions: bool,
    everything: bool,
) -> str | None:
    if entry.writing:  # a conversion may be saving it now
        return None
    if not entry.complete:
        return "incomplete"
    if everything:
        return "all"
    if stale_versions and entry.stale(installed):
        return "other versions"
    when = entry.last_used or entry.made
    if older_than_days is not None and now - when > older_than_days * 86400:
        days = round((now - when) / 86400)
        return f"{'last used' if entry.last_used else 'made'} {days} day{'' if days == 1 else 's'} ago"
    return None


def prune_cache(
    *,
    older_than_days: float | None = None,
    stale_versions: bool = False,
    everything: bool = False,
    dry_run: bool = False,
    now: float | None = None,
) -> PruneReport:
    """Remove entries of the OpenVINO cache; a removed entry is converted again when its UNet is next loaded.

    Args:
        older_than_days: remove entries no load has read for this many days (an entry without a record of
            use, made by an older taiyi, counts from when it was made).
        stale_versions: remove entries made by other diffusers/OpenVINO/torch versions than the installed ones
            (or traced the way of another taiyi): this install can never load them.
        everything: remove every entry.
        dry_run: remove nothing; the report says what would go.

    Incomplete entries (a conversion killed while saving, a damaged entry) go with any selector, unless
    changed in the last 10 minutes (a conversion may be saving it now). Raises InvalidInputError without a
    selector or with a negative age.
    """
    if older_than_days is None and not stale_versions and not everything:
        raise InvalidInputError("say what to remove: older_than_days, stale_versions or everything")
    if older_than_days is not None and not (math.isfinite(older_than_days) and older_than_days >= 0):
        raise InvalidInputError(f"older_than_days must be 0 or more, not {older_than_days}")
    now = time.time() if now is None else now
    installed = installed_versions()
    report = PruneReport([], [], [], dry_run)
    for entry in cache_entries(now):
        reason = _removal_reason(entry, installed, now, older_than_days, stale_versions, everything)
        if reason is None:
            report.kept.append(entry)
            continue
        try:
            if not dry_run:
                remove_cache_entry(entry)
        except OSError as e:
            report.failed.append((entry, f"{e.strerror or e}"))
            report.kept.append(entry)
        else:
            report.removed.append((entry, reason))
    return report


def remove_cache_entry(entry: CacheEntry) -> None:
    """Remove one entry of :func:`cache_entries`: only a real folder of the OpenVINO cache named as an entry.

    A complete entry is first renamed aside, so a load never reads a half-removed one; links in it are removed,
    never followed.
    """
    root = cache_dir() / "openvino"
    path = entry.path
    named = bool(_ENTRY_NAME.fullmatch(path.name))
    if path.parent != root or not (named or path.name.startswith(_PARTIAL)):
        raise InvalidInputError(f"{path} is not an entry of the OpenVINO cache {root}")
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise InvalidInputError(f"{path} is not a folder; the OpenVINO cache's entries are folders")
    if named:
        aside = root / f"{_PARTIAL[1]}{path.name}-{secrets.token_hex(4)}"
        os.rename(path, aside)
        path = aside
    try:
        shutil.rmtree(path)  # removes links in the folder, never what they point to
    except FileNotFoundError:  # removed meanwhile by another prune
        pass


def _note_stale_entries() -> None:
    """Say once a new entry is written that entries of other versions take space and how to remove them."""
    try:
        installed = installed_versions()
        stale = [entry for entry in cache_entries() if entry.complete and entry.stale(installed)]
    except OSError:
        return
    if stale:
        logger.info(
            "%d OpenVINO cache %s made by other diffusers/OpenVINO/torch versions take %s in %s; this install never"
            " loads them: `taiyi cache prune --stale-versions` removes them",
            len(stale),
            "entry" if len(stale) == 1 else "entries",
            format_size(sum(entry.size for entry in stale)),
            cache_dir() / "openvino",
        )


def format_size(n: int) -> str:
    """``n`` bytes for people: ``3.4 GB``, ``512 B`` (powers of 1000, as ``du --si`` and the hub's cache tools)."""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 999.95 or unit == "TB":
            return f"{n:.1f} {unit}"
