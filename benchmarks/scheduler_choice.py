"""Which sampler and how many steps: faithfulness of the embedded model and distance to 50-step PNDM.

The model card's default (PNDM, 50 steps) is the reference. For each setting the same evaluation
prompts (Chinese, seen and held-out combinations) are drawn with the same seeds — so the same
starting noise — and scored two ways:

- faithfulness: the attribute probe's per-attribute accuracy (``taiyi eval faithfulness``);
- distance to the reference: mean absolute pixel difference (0–255) and PSNR against the PNDM-50
  picture of the same prompt and seed (meaningless for ancestral samplers, which add fresh noise).

    python benchmarks/scheduler_choice.py --json scheduler_choice.json
    python benchmarks/scheduler_choice.py --settings pndm:50,dpm++:10 --seen 4 --held-out 2   # quick look
    python benchmarks/scheduler_choice.py --settings pndm:50:1,dpm++:15:1,dpm++:15:0.5   # third field: guidance end

A setting is ``scheduler:steps[:guidance_end]``; guidance end is the fraction of steps that run classifier-free
guidance (1 when left out here, whatever taiyi's default), and "UNet calls" counts each guided step as 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _bench import machine, prepare  # noqa: E402

DEFAULT_SETTINGS = "pndm:50,dpm++:25,dpm++:15,dpm++:10,dpm++:8,dpm++:6,unipc:10,ddim:25,euler-a:25"
ATTRS = ("time", "sky", "land", "water", "style", "things")


def _settings(text: str) -> list[tuple[str, int, float]]:
    out = []
    for item in text.split(","):
        name, steps, *end = item.strip().split(":")
        out.append((name, int(steps), float(end[0]) if end else 1.0))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="taiyi-mini-zh")
    parser.add_argument("--probe", default="taiyi-mini-probe")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="scheduler:steps,... (first = reference)")
    parser.add_argument("--seen", type=int, default=24)
    parser.add_argument("--held-out", type=int, default=12)
    parser.add_argument("--images", type=int, default=8, help="pictures per prompt")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    prepare(args.threads)

    from taiyi import load_pipeline
    from taiyi.models import resolve_model
    from taiyi.pipeline import guidance_steps
    from taiyi.recipe.faithfulness import eval_prompts, judge
    from taiyi.recipe.probe import AttributeProbe

    pipe = load_pipeline(args.model)
    probe = AttributeProbe.from_pretrained(resolve_model(args.probe)[0])
    prompts = eval_prompts("zh", n_seen=args.seen, n_held_out=args.held_out)
    settings = _settings(args.settings)
    reference: dict[tuple[str, int], np.ndarray] = {}
    rows = []
    for k, (scheduler, steps, end) in enumerate(settings):
        drawn: dict[tuple[str, int], np.ndarray] = {}

        def draw(prompt, n, first_seed, scheduler=scheduler, steps=steps, end=end, drawn=drawn):
            images = pipe.generate(
                prompt, num_images=n, seed=first_seed, scheduler=scheduler, steps=steps, guidance_end=end
            ).images
            for i, image in enumerate(images):
                drawn[(prompt, first_seed + i)] = np.asarray(image.convert("RGB"), dtype=np.float64)
            return images

        t0 = time.perf_counter()
        result = judge(draw, prompts, probe, images_per_prompt=args.images)
        seconds = time.perf_counter() - t0
        if k == 0:
            reference = drawn
        diffs = [np.abs(drawn[key] - reference[key]).mean() for key in drawn]
        mse = [((drawn[key] - reference[key]) ** 2).mean() for key in drawn]
        psnr = [10 * math.log10(255**2 / m) if m > 0 else math.inf for m in mse]
        row = {
            "scheduler": scheduler,
            "steps": steps,
            "guidance_end": end,
            "unet_calls": steps + guidance_steps(end, steps),
            "seen": result["seen"],
            "held_out": result["held_out"],
            "all": result["all"],
            "mean_abs_diff_to_reference": round(float(np.mean(diffs)), 2),
            "psnr_to_reference_db": round(float(np.mean([p for p in psnr if math.isfinite(p)] or [math.inf])), 2),
            "seconds_per_image": round(seconds / result["images"], 4),
        }
        rows.append(row)
        cells = " ".join(f"{a} {row['all'].get(a, float('nan')):5.1f}" for a in ATTRS)
        print(
            f"{scheduler:>8}:{steps:<3} end {end:<4} {cells} | Δ {row['mean_abs_diff_to_reference']:5.2f} "
            f"PSNR {row['psnr_to_reference_db']:5.2f} | {row['seconds_per_image']:.3f} s/image",
            flush=True,
        )
    out = {"model": args.model, "images_per_prompt": args.images, "prompts": len(prompts), "rows": rows,
           "machine": machine()}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, ensure_ascii=False, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
