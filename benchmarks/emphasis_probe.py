"""How far a prompt weight, ``(word:W)``, moves the embedded model's pictures, as the attribute probe reads them.

Two words compete in each prompt (two times of day; two styles); the first is weighted W and the probe counts,
over ``--seeds`` pictures each, how many it reads as either word. With ``--editing``, A1111's prompt editing
instead: ``[清晨:夜晚:F]`` draws dawn for the first F of the steps, then night. Default settings of ``taiyi generate``.

    python benchmarks/emphasis_probe.py
    python benchmarks/emphasis_probe.py --model taiyi-mini-zh-en --weights 1,1.5,4 --seeds 24 --json out.json
"""

from __future__ import annotations

import argparse

from _bench import prepare, save_json

CASES = (  # (attribute, weighted word, the other word, prompt template)
    ("time", "清晨", "夜晚", "{a}，{b}，高山，湖泊"),
    ("style", "水墨", "油画", "高山，湖泊，{a}，{b}"),
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="taiyi-mini-zh")
    parser.add_argument("--probe", default="taiyi-mini-probe")
    parser.add_argument("--weights", default="0,1,1.5,2,4,8", help="comma-separated weights of the first word")
    parser.add_argument("--seeds", type=int, default=24, help="pictures per prompt (seeds 0 … N-1)")
    parser.add_argument("--editing", default=None, help="comma-separated fractions F of [清晨:夜晚:F] instead")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    prepare(args.threads)

    from taiyi.models import resolve_model
    from taiyi.pipeline import load_pipeline
    from taiyi.recipe.probe import AttributeProbe

    probe = AttributeProbe.from_pretrained(resolve_model(args.probe)[0])
    pipe = load_pipeline(args.model)
    rows = []
    cases = CASES
    if args.editing:  # one case: the time of day edited at F (the weight column holds F)
        cases = [("time", "清晨", "夜晚", None)]
    for attribute, a, b, template in cases:
        for weight in (float(w) for w in (args.editing or args.weights).split(",")):
            if template is None:
                prompt = f"[{a}:{b}:{weight}]，高山，湖泊"
            else:
                prompt = template.format(a=a if weight == 1 else f"({a}:{weight:g})", b=b)
            images = []
            for first in range(0, args.seeds, 8):
                images += pipe.generate(prompt, seed=first, num_images=min(8, args.seeds - first)).images
            read = [p[attribute] for p in probe.predict(images)]
            rows.append({"prompt": prompt, "weight": weight, a: read.count(a), b: read.count(b), "of": len(read)})
            print(f"{prompt}: {a} {read.count(a)}/{len(read)}, {b} {read.count(b)}/{len(read)}", flush=True)
    save_json(args.json, args, rows)
    return {"model": args.model, "rows": rows}


if __name__ == "__main__":
    main()
