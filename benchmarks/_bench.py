"""What every benchmark shares: quiet libraries, thread settings, and a description of the machine."""

from __future__ import annotations

import logging
import os
import platform


def prepare(threads: int | None) -> None:
    """Silence library chatter and set torch's threads (default: the usable cores)."""
    import torch

    from taiyi.cli import _quiet_libraries
    from taiyi.loading import limit_threads

    _quiet_libraries()
    logging.getLogger("taiyi").setLevel(logging.WARNING)
    limit_threads()
    if threads:
        torch.set_num_threads(threads)


def machine() -> dict:
    import torch

    from taiyi.backends import cpu_bf16_instructions
    from taiyi.bench import _cpu_name
    from taiyi.loading import cpu_count

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_name(),
        "cpu_bf16": cpu_bf16_instructions(),
        "usable_cores": cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def save_json(path: str | None, args, rows: list) -> None:
    """Write a benchmark's figures with the machine and its arguments to ``path`` (nothing when None)."""
    if path:
        write_json(path, {"machine": machine(), "args": vars(args), "rows": rows})


def write_json(path, report: dict) -> None:
    """``report`` as JSON in ``path``, replaced atomically: minutes of figures are never left half-written."""
    import json

    from taiyi.io import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode(), overwrite=True)


def parse_scene_args(parser, argv: list[str] | None):
    """Add the options of the benchmarks that render 山水 scenes (``--size``, ``--seed``, ``--threads``,
    ``--json``), parse ``argv`` and :func:`prepare` the threads; returns the parsed arguments."""
    parser.add_argument("--size", type=int, default=64, help="picture size [64]")
    parser.add_argument("--seed", type=int, default=0, help="scene draw [0]")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    prepare(args.threads)
    return args
