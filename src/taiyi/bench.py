"""``taiyi bench``: how fast and how lean is generation on this machine, against stock diffusers, same weights.

Each engine runs in a fresh subprocess, so its peak memory (``ru_maxrss``; on GPU ``max_memory_allocated``)
is its own. Within a run the UNet, text encoder and VAE decoder are timed by wrapping their calls, so
the table splits an image into text encoding, UNet steps and decoding.

Engines:

- ``taiyi`` — :func:`taiyi.load_pipeline` + ``generate`` at taiyi's defaults (or the steps/scheduler given);
- ``stock`` — ``diffusers.StableDiffusionPipeline.from_pretrained`` at the model card's defaults
  (the checkpoint's own scheduler, 50 steps, guidance 7.5, float32 on CPU / float16 on GPU);
- ``stock-matched`` — stock diffusers with taiyi's scheduler and step count, which isolates the per-step cost.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer

from .cli_options import AllowPickle, Overwrite
from .errors import InvalidInputError, TaiyiError

ENGINES: tuple[str, ...] = ("taiyi", "taiyi-openvino", "stock", "stock-matched")
PROMPT = "飞流直下三千尺，油画"


@dataclass
class BenchConfig:
    """One engine's measurement (what the child process receives as JSON)."""

    engine: str
    model: str
    size: int = 512
    steps: int | None = None  # None: the engine's default
    scheduler: str | None = None
    guidance: float | None = None
    runs: int = 2
    warmup: int = 1
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    guidance_end: float | None = None  # taiyi engines only; None: taiyi's default
    allow_pickle: bool = False  # accept pickled .bin weights (every engine)


class _Timer:
    """Accumulates the wall time of every call of a wrapped function."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self._sync()  # work queued before the call (a sampler step) is not the call's
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        return timed

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


@contextmanager
def _timed_components(sd):
    """Time the UNet, text encoder and VAE decoder of a diffusers pipeline ``sd`` while inside."""
    timers = {"unet": _Timer(), "text_encoder": _Timer(), "vae_decode": _Timer()}
    saved = (sd.unet.forward, sd.text_encoder.forward, sd.vae.decode)
    sd.unet.forward = timers["unet"].wrap(sd.unet.forward)
    sd.text_encoder.forward = timers["text_encoder"].wrap(sd.text_encoder.forward)
    sd.vae.decode = timers["vae_decode"].wrap(sd.vae.decode)
    try:
        yield timers
    finally:
        sd.unet.forward, sd.text_encoder.forward, sd.vae.decode = saved


def _peak_memory_mb(device) -> dict:
    import resource

    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if getattr(device, "type", str(device)) == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def measure(config: BenchConfig) -> dict:
    """Load and run one engine in this process; returns per-image, per-step and per-phase seconds and memory."""
    import torch

    from .loading import limit_threads, select_device, select_dtype

    if config.threads:
        torch.set_num_threads(config.threads)
    limit_threads()  # every engine, not only taiyi's (load_pipeline does it): stock oversubscribed the cores
    device = select_device(config.device)
    t0 = time.perf_counter()
    if config.engine in ("taiyi", "taiyi-openvino"):
        from .pipeline import DEFAULT_STEPS, check_guidance_end, load_pipeline
        from .schedulers import DEFAULT_SCHEDULER

        backend = "openvino" if config.engine == "taiyi-openvino" else "auto"
        pipe = load_pipeline(config.model, device=config.device, dtype=config.dtype, safety_checker=False,
                             backend=backend, allow_pickle=config.allow_pickle)  # fmt: skip
        sd = pipe.sd
        steps = config.steps or DEFAULT_STEPS
        scheduler = config.scheduler or DEFAULT_SCHEDULER
        guidance_end = check_guidance_end(config.guidance_end)

        def run(seed: int):
            kwargs = {"guidance": config.guidance} if config.guidance is not None else {}
            pipe.generate(PROMPT, steps=steps, seed=seed, width=config.size, height=config.size,
                          scheduler=scheduler, guidance_end=guidance_end, **kwargs)  # fmt: skip

        settings = {"scheduler": scheduler, "steps": steps, "guidance_end": guidance_end,
                    "dtype": str(pipe.dtype).removeprefix("torch."), "backend": pipe.backend}  # fmt: skip
        if pipe.backend == "openvino":  # the precision OpenVINO runs the UNet in (bf16 on CPUs that have it)
            settings["dtype"] = f"ov-{sd.unet._taiyi_openvino_precision}"
    else:
        from diffusers import StableDiffusionPipeline

        from .loading import check_pipeline_folder
        from .models import resolve_model
        from .schedulers import make_scheduler, sampling_kwargs

        folder, _ = resolve_model(config.model)
        check_pipeline_folder(Path(folder), allow_pickle=config.allow_pickle)  # the same refusal as taiyi's
        dtype = select_dtype(config.dtype, device)
        sd = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                                     requires_safety_checker=False,
                                                     use_safetensors=None if config.allow_pickle else True,
                                                     ).to(device)  # fmt: skip
        sd.set_progress_bar_config(disable=True)
        if config.engine == "stock-matched":
            from .pipeline import DEFAULT_STEPS
            from .schedulers import DEFAULT_SCHEDULER

            scheduler = config.scheduler or DEFAULT_SCHEDULER
            sd.scheduler = make_scheduler(scheduler, dict(sd.scheduler.config))
            steps = config.steps or DEFAULT_STEPS
            sampling = sampling_kwargs(scheduler, steps)
        else:
            scheduler, steps = type(sd.scheduler).__name__, config.steps or 50
            sampling = {"num_inference_steps": steps}
        guidance = config.guidance if config.guidance is not None else 7.5

        def run(seed: int):
            generator = torch.Generator(device="cpu").manual_seed(seed)
            sd(PROMPT, guidance_scale=guidance, height=config.size, width=config.size, generator=generator,
               **sampling)  # fmt: skip

        settings = {"scheduler": scheduler, "steps": steps, "guidance_end": 1.0,
                    "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
    load_seconds = time.perf_counter() - t0
    for i in range(config.warmup):
        run(1000 + i)
    with _timed_components(sd) as timers:
        t0 = time.perf_counter()
        for i in range(config.runs):
            run(i)
        total = time.perf_counter() - t0
    runs = max(config.runs, 1)
    unet = timers["unet"]
    return {
        "engine": config.engine,
        **settings,
        "size": config.size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "load_s": round(load_seconds, 2),
        "image_s": total / runs,
        "unet_step_s": unet.seconds / max(unet.calls, 1),
        "unet_calls_per_image": unet.calls / runs,
        "text_encode_s": timers["text_encoder"].seconds / runs,
        "vae_decode_s": timers["vae_decode"].seconds / runs,
        **_peak_memory_mb(device),
    }


def run_engine(config: BenchConfig, *, timeout: float | None = None) -> dict:
    """:func:`measure` in a fresh Python process (clean peak memory), returning its result."""
    cmd = [sys.executable, "-m", "taiyi.bench", json.dumps(asdict(config))]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode < 0:  # no Python error to show: the kernel's OOM killer sends SIGKILL
        oom = " (out of memory? try a smaller --size)" if proc.returncode == -9 else ""
        raise TaiyiError(f"benchmark of {config.engine} failed: killed by signal {-proc.returncode}{oom}")
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        tail = re.sub(r"^(?:\w+\.)*\w+(?:Error|Exception): ", "", tail)  # the child's error, not its class name
        raise TaiyiError(f"benchmark of {config.engine} failed: {tail}")
    return json.loads(lines[-1])


def bench(
    model: str,
    *,
    engines: tuple[str, ...] = ("taiyi", "stock"),
    size: int = 512,
    steps: int | None = None,
    scheduler: str | None = None,
    runs: int = 2,
    warmup: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    guidance_end: float | None = None,
    allow_pickle: bool = False,
) -> dict:
    """Measure ``engines`` on ``model`` and return ``{"machine", "results": [...], "ratios": {...}}``."""
    for engine in engines:
        if engine not in ENGINES:
            raise InvalidInputError(f"unknown engine {engine!r}; use {', '.join(ENGINES)}")
    if runs < 1 or warmup < 0:
        raise InvalidInputError("--runs must be at least 1 and --warmup 0 or more")
    if steps is not None and not 1 <= steps <= 1000:
        raise InvalidInputError(f"--steps must be between 1 and 1000, not {steps}")
    if threads is not None and threads < 1:
        raise InvalidInputError(f"--threads must be at least 1, not {threads}")
    if guidance_end is not None and not 0 < guidance_end <= 1:
        raise InvalidInputError(f"--guidance-end must be above 0 and at most 1, not {guidance_end}")
    if size % 8 or not 64 <= size <= 2048:
        raise InvalidInputError(f"--size must be a multiple of 8 between 64 and 2048, not {size}")
    if "taiyi-openvino" in engines:  # before the other engines' minutes, not after
        _check_openvino_engine(device, dtype)
    results = []
    for engine in engines:
        own = engine != "stock"  # stock runs at the model card's defaults
        config = BenchConfig(engine, model, size, steps if own else None, scheduler if own else None, None, runs,
                             warmup, device, dtype, threads, guidance_end, allow_pickle)  # fmt: skip
        results.append(run_engine(config))
    ratios = {}
    base = next((r for r in results if r["engine"] == "taiyi"), results[0])  # else the first engine measured
    for other in results:
        if other is base:
            continue
        name = f"{other['engine']} / {base['engine']}"
        ratios[f"{name}, per image"] = other["image_s"] / base["image_s"]
        ratios[f"{name}, per UNet call"] = other["unet_step_s"] / base["unet_step_s"]
    return {"machine": machine(), "model": model, "results": results, "ratios": ratios}


def _check_openvino_engine(device: str, dtype: str) -> None:
    """What ``taiyi-openvino`` needs, said in this command's words (its child would say ``--backend``)."""
    import torch

    from .backends import _openvino
    from .loading import select_device, select_dtype

    dev = select_device(device)
    torch_dtype = select_dtype(dtype, dev)
    if dev.type != "cpu" or torch_dtype != torch.float32:
        here = f"{dev.type}, {str(torch_dtype).removeprefix('torch.')}"
        raise InvalidInputError(
            f"--engine taiyi-openvino runs on the CPU in float32 (here {here}); pass --device cpu --dtype float32"
            " or leave that engine out"
        )
    if _openvino() is None:
        raise InvalidInputError("--engine taiyi-openvino needs the openvino package: pip install 'taiyi[openvino]'")


def machine() -> dict:
    """The machine the figures belong to."""
    import platform

    import torch

    from .backends import cpu_bf16_instructions
    from .loading import cpu_count

    info = {
        "processor": _cpu_name() or platform.machine(),
        "cpu_bf16": cpu_bf16_instructions(),
        "usable_cores": cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def format_table(report: dict) -> str:
    """The report as a plain-text table."""
    head = (
        f"{'engine':<16}{'scheduler':<28}{'steps':>6}{'CFG end':>8}{'dtype':>10}{'s/image':>10}{'s/UNet':>9}"
        f"{'text s':>8}{'VAE s':>8}{'peak MB':>9}"
    )
    lines = [head]
    for r in report["results"]:
        peak = r.get("peak_gpu_mb", r["peak_rss_mb"])
        lines.append(
            f"{r['engine']:<16}{str(r['scheduler'])[:27]:<28}{r['steps']:>6}{r.get('guidance_end', 1.0):>8g}"
            f"{r['dtype']:>10}{r['image_s']:>10.2f}{r['unet_step_s']:>9.3f}{r['text_encode_s']:>8.3f}"
            f"{r['vae_decode_s']:>8.3f}{peak:>9.0f}"
        )
    for name, value in report["ratios"].items():  # ratios of seconds: above 1, the first engine named is slower
        lines.append(f"{name}: {value:.2f}× the time")
    m = report["machine"]
    threads = sorted({r["threads"] for r in report["results"] if "threads" in r})
    lines.append(
        f"machine: {m['processor']}, {m['usable_cores']} cores"
        + (f", torch threads {'/'.join(map(str, threads))}" if threads else "")
        + (f" ({', '.join(m['cpu_bf16'])})" if m.get("cpu_bf16") else "")
        + f", torch {m['torch']}"
        + (f", {m['gpu']}" if "gpu" in m else "")
    )
    return "\n".join(lines)


def bench_command(
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Pipeline to measure [the default model].")
    ] = None,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 512,
    steps: Annotated[int | None, typer.Option("--steps", help="taiyi's steps [its default].")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="taiyi's sampler [its default].")] = None,
    guidance_end: Annotated[
        float | None, typer.Option("--guidance-end", help="taiyi's fraction of guided steps [its default].")
    ] = None,
    engine: Annotated[
        list[str] | None,
        typer.Option("--engine", help="taiyi, taiyi-openvino, stock, stock-matched; repeatable [taiyi, stock]."),
    ] = None,
    runs: Annotated[int, typer.Option("--runs", help="Timed images per engine.")] = 2,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed images first.")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda ...")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, float16, bfloat16.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads [all usable cores].")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Also write the report as JSON.")] = None,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Time an image, a UNet step, text encoding and VAE decoding, and peak memory: taiyi vs stock diffusers."""
    from .io import check_output_file
    from .models import DEFAULT_MODEL

    if output:
        if Path(output).is_dir():  # check_output_file's words are for pictures
            raise InvalidInputError(f"{output} is a folder; give a file name for the JSON report")
        check_output_file(Path(output), overwrite=overwrite)  # before minutes of timing, not after
    report = bench(
        model or DEFAULT_MODEL, engines=tuple(engine or ("taiyi", "stock")), size=size, steps=steps,
        scheduler=scheduler, runs=runs, warmup=warmup, device=device, dtype=dtype, threads=threads,
        guidance_end=guidance_end, allow_pickle=allow_pickle,
    )  # fmt: skip
    typer.echo(format_table(report))
    if output:
        from .io import atomic_write_bytes

        atomic_write_bytes(output, (json.dumps(report, indent=2) + "\n").encode(), overwrite=overwrite)


def _child(argv: list[str]) -> int:
    import logging

    from .cli import _quiet_libraries

    _quiet_libraries()
    logging.getLogger("taiyi").setLevel(logging.ERROR)
    config = BenchConfig(**json.loads(argv[0]))
    print(json.dumps(measure(config)))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
