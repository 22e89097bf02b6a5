"""Peak memory of one generation per memory mode, each in a fresh process (peak RSS is per process).

The model is the full-size Taiyi-Stable-Diffusion-1B-Chinese architecture with random weights that
``sd_speed.py`` builds (BERT-base text encoder, SD v1 UNet 860M, SD VAE); peak memory does not depend
on the step count, so one step is enough.

    python benchmarks/sd_memory.py --size 1024 --modes off,auto,low --json sd_memory.json

The UNet runs in PyTorch (``--backend``): the default ``auto`` would run it in OpenVINO on CPUs with bf16
instructions for ``off`` and ``auto`` but not for ``low``, and the modes would not be compared on one runtime.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _bench import machine, write_json

CHILD = """
import json, resource, sys, time, torch
sys.path.insert(0, {bench!r})
from _bench import prepare
prepare({threads!r})
from taiyi import load_pipeline
t0 = time.perf_counter()
pipe = load_pipeline({model!r}, safety_checker=False, memory={mode!r}, backend={backend!r})
loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t1 = time.perf_counter()
pipe.generate("小桥流水人家，水墨", seed=0, steps={steps}, width={size}, height={size})
t2 = time.perf_counter()
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_load_mb": loaded_rss, "load_s": t1 - t0, "generate_s": t2 - t1}}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path.home() / ".cache" / "taiyi-bench" / "taiyi-sd-full-random"),
                        help="pipeline folder (default: the full-size random model sd_speed.py builds)")  # fmt: skip
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--modes", default="off,auto")
    parser.add_argument("--backend", default="torch", choices=("torch", "openvino", "auto"), help="UNet [torch]")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from taiyi.pipeline import MEMORY_MODES

    if unknown := [m for m in args.modes.split(",") if m not in MEMORY_MODES]:
        parser.error(f"unknown memory mode {unknown[0]!r} in --modes; use {', '.join(MEMORY_MODES)}")
    if not Path(args.model).is_dir():
        print(f"{args.model} not found; build it with: python benchmarks/sd_speed.py --model full", file=sys.stderr)
        return 2
    rows = {}
    for mode in args.modes.split(","):
        code = CHILD.format(bench=str(Path(__file__).parent), threads=args.threads, model=args.model, mode=mode,
                            backend=args.backend, steps=args.steps, size=args.size)  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            rows[mode] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}
        else:
            rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        rows[mode]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"{mode:>5}: {json.dumps(rows[mode])}", flush=True)
    out = {"size": args.size, "steps": args.steps, "model": args.model, "backend": args.backend, "modes": rows,
           "machine": machine()}  # fmt: skip
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
