"""How well ``taiyi clip interrogate`` reads the 山水 world: the embedded CLIP's prompt for rendered held-out scenes
(never trained on) against the scenes' true attributes, and the round trip picture → prompt → picture.

For each category of the ``shanshui`` vocabulary: how often its word joins the prompt (kept) and how often a kept
word is right, over the scenes that have that attribute; for sky and water also how often a word is claimed for a
scene without one. With ``--round-trip N``, N of those prompts are drawn by ``taiyi-mini-zh`` and interrogated
again: how often each category's word comes back the same.

    python benchmarks/interrogate_probe.py --threads 2
    python benchmarks/interrogate_probe.py --scenes 400 --round-trip 48 --json out.json
"""

from __future__ import annotations

import argparse

from _bench import prepare, save_json

ATTRIBUTES = {"时间": "time", "天空": "sky", "地形": "land", "水": "water", "画风": "style"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="taiyi-mini-clip")
    parser.add_argument("--model", default="taiyi-mini-zh")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--round-trip", type=int, default=0, help="prompts drawn again and read back")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    prepare(args.threads)

    from taiyi.clip import load_clip
    from taiyi.interrogate import interrogate
    from taiyi.recipe.faithfulness import held_out_scenes

    clip = load_clip(args.clip)
    scenes, images = held_out_scenes(args.scenes)
    readings = interrogate(clip, images, "shanshui")
    figures: dict = {"scenes": len(scenes), "categories": {}}
    for category, attribute in ATTRIBUTES.items():
        have = [(s, r) for s, r in zip(scenes, readings, strict=True) if getattr(s, attribute) is not None]
        picks = [(s, next(p for p in r.picks if p["category"] == category)) for s, r in have]
        kept = [(s, p) for s, p in picks if p["kept"]]
        right = sum(p["word"] == getattr(s, attribute) for s, p in kept)
        without = [r for s, r in zip(scenes, readings, strict=True) if getattr(s, attribute) is None]
        claimed = sum(next(p for p in r.picks if p["category"] == category)["kept"] for r in without)
        row = {
            "scenes": len(have),
            "kept %": 100.0 * len(kept) / max(1, len(have)),
            "right % of kept": 100.0 * right / max(1, len(kept)),
            "best word right %": 100.0 * sum(p["word"] == getattr(s, attribute) for s, p in picks) / max(1, len(have)),
        }
        if without:
            row["claimed % without one"] = 100.0 * claimed / len(without)
        figures["categories"][category] = row
        print(category, {k: round(v, 1) for k, v in row.items()})
    if args.round_trip:
        from taiyi.pipeline import load_pipeline

        pipe = load_pipeline(args.model)
        prompts = [r.prompt for r in readings[: args.round_trip]]
        drawn = [pipe.generate(p, seed=i).images[0] for i, p in enumerate(prompts)]
        again = interrogate(clip, drawn, "shanshui")
        same = {}
        for category in ATTRIBUTES:
            pairs = [
                (
                    next(p for p in a.picks if p["category"] == category),
                    next(p for p in b.picks if p["category"] == category),
                )
                for a, b in zip(readings[: args.round_trip], again, strict=True)
            ]
            kept = [(a, b) for a, b in pairs if a["kept"]]
            same[category] = 100.0 * sum(a["word"] == b["word"] for a, b in kept) / max(1, len(kept))
        figures["round_trip"] = {"prompts": len(prompts), "same word %": same}
        print("round trip", {k: round(v, 1) for k, v in same.items()})
    save_json(args.json, args, [figures])
    return figures


if __name__ == "__main__":
    main()
