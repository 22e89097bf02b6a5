"""Where the UNet runs: PyTorch, or OpenVINO's CPU runtime.

The UNet is the cost of a picture (every denoising step calls it, twice with guidance). With
``backend="openvino"`` it is converted once to OpenVINO IR — traced from the loaded model, so LoRA-free
weights of any Taiyi / SD v1 checkpoint, inpainting UNets included — saved in the cache (see
:func:`cache_dir`) under a fingerprint of its weights and config, and run by OpenVINO's CPU plugin from
then on. The rest of the pipeline (text encoder, scheduler, VAE) stays in PyTorch. OpenVINO picks the
precision: bf16 on CPUs with bf16 instructions (``avx512_bf16``/AMX; UNet outputs within cosine 0.9997 of
float32 at full size), float32 elsewhere (float32 rounding apart from PyTorch).

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
import os
import shutil
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidInputError, ModelLoadError

__all__ = [
    "BACKENDS",
    "cache_dir",
    "check_backend",
    "cpu_bf16_instructions",
    "resolve_backend",
    "tune_cpu_allocator",
    "use_openvino_unet",
]

BACKENDS: tuple[str, ...] = ("auto", "torch", "openvino")
# the backend that ``auto`` stands for when set (``torch`` keeps a process's pictures the same on every CPU)
BACKEND_ENV = "TAIYI_BACKEND"
_IR_NAME = "unet.xml"
_IR_FORMAT = 1  # how _convert traces the UNet: a change of it must not reuse IR traced the old way
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
    try:
        _save(model, folder)
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


def _save(model, folder: Path) -> None:
    """Save ``model`` as IR in ``folder`` (written to a temporary folder, then renamed into place)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        _openvino().save_model(model, tmp / _IR_NAME, compress_to_fp16=False)
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
            return core.compile_model(core.read_model(folder / _IR_NAME), "CPU", config)
        except Exception:  # a damaged cache entry (a truncated file): convert again
            shutil.rmtree(folder, ignore_errors=True)
    if echo is not None:
        echo(f"converting the UNet to OpenVINO (once; cached in {folder})")
    unsaved = _convert(unet, folder)
    if unsaved is not None:  # a read-only cache
        return core.compile_model(unsaved, "CPU", config)
    return core.compile_model(core.read_model(folder / _IR_NAME), "CPU", config)


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
