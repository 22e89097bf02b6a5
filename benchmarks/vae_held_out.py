"""What an autoencoder keeps of each held-out combination of the 山水 world, as the attribute probe reads it.

A text-to-image model cannot draw more of a combination than its VAE decodes. For each held-out combination
(``shanshui.HELD_OUT``, which no stage trains on) this renders scenes that have it and, for each of its values,
training-split scenes that have that value without the combination (for "moon in oil": moons in the other
styles, and oil paintings without a moon); it round-trips them through each VAE (posterior mean, decoded as
taiyi decodes: padded where the config says ``_taiyi_decode_padding``) and prints the share of pictures in
which the probe reads each value as rendered — on the clean renders (the judge's own ceiling) and on each
VAE's round trips — with the round trips' mean PSNR.

    python benchmarks/vae_held_out.py src/taiyi/weights/taiyi-mini-zh/vae
    python benchmarks/vae_held_out.py RUN/vae-base/final RUN/vae/final --probe RUN/probe --n 160
"""

from __future__ import annotations

import argparse
import sys

from _bench import parse_scene_args, save_json
from vae_corner import round_trip, to_images


def has(scene, field: str, value: str) -> bool:
    return value in scene.things if field == "things" else getattr(scene, field) == value


def read(prediction: dict, field: str, value: str) -> bool:
    """The probe reads ``value`` of ``field`` (for things: sees that thing)."""
    return value in prediction["things"] if field == "things" else prediction[field] == value


def draw(candidates: list, n: int, seed: int, size: int):
    """``n`` of ``candidates`` (with replacement), each rendered with its own layout: scenes, (n, 3, S, S) in
    [-1, 1]."""
    import numpy as np
    import torch

    from taiyi.data import shanshui

    g = np.random.default_rng(seed)
    chosen = [candidates[i] for i in g.integers(0, len(candidates), n)]
    renders = np.stack([np.asarray(shanshui.render(s, size, [seed, i])) for i, s in enumerate(chosen)])
    return chosen, torch.from_numpy(renders.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)


def share(probe, pixels, field: str, value: str) -> float:
    """% of pictures in which the probe reads ``value`` of ``field``."""
    predictions = probe.predict(to_images(pixels))
    return 100 * sum(read(p, field, value) for p in predictions) / len(predictions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vae", nargs="+", help="AutoencoderKL folders (or pipeline folders with vae/)")
    parser.add_argument("--probe", default="taiyi-mini-probe", help="attribute probe folder or short name")
    parser.add_argument("--n", type=int, default=160, help="scenes per group [160]")
    args = parse_scene_args(parser, argv)
    from taiyi.data import shanshui
    from taiyi.models import resolve_model
    from taiyi.recipe.probe import AttributeProbe
    from taiyi.train.uncond import load_vae
    from taiyi.train.vae import psnr

    probe = AttributeProbe.from_pretrained(resolve_model(args.probe)[0])
    every, seen = list(shanshui.all_scenes("all")), list(shanshui.all_scenes("train"))
    groups = []  # (combination, field, value, "held-out" | "seen", scenes, pixels)
    for k, combo in enumerate(shanshui.HELD_OUT):
        held = draw([s for s in every if combo.matches(s)], args.n, args.seed + 100 * k, args.size)
        for j, (field, value) in enumerate(combo.values):
            groups.append((combo.name, field, value, "held-out", *held))
            others = [s for s in seen if has(s, field, value)]
            groups.append((combo.name, field, value, "seen", *draw(others, args.n, args.seed + 100 * k + j + 1,
                                                                  args.size)))  # fmt: skip
    rows = [{"vae": "clean renders",
             "reads": [{"combination": c, "field": f, "value": v, "group": g, "percent": share(probe, x, f, v)}
                       for c, f, v, g, _, x in groups]}]  # fmt: skip
    for folder in args.vae:
        vae = load_vae(folder)
        row: dict = {"vae": folder, "reads": []}
        done: dict[int, object] = {}  # a held-out draw is shared by the combination's values: round-trip it once
        psnrs = []
        for c, f, v, g, _, x in groups:
            out = done.get(id(x))
            if out is None:
                out = done[id(x)] = round_trip(vae, x)
                psnrs.append(psnr(out, x))
            reading = {"combination": c, "field": f, "value": v, "group": g, "percent": share(probe, out, f, v)}
            row["reads"].append(reading)
        row["psnr"] = sum(psnrs) / len(psnrs)
        rows.append(row)
    for combo in shanshui.HELD_OUT:
        print(f"{combo.name}:")
        for field, value in combo.values:
            cells = []
            for row in rows:
                got = {r["group"]: r["percent"] for r in row["reads"] if r["combination"] == combo.name
                       and r["field"] == field and r["value"] == value}  # fmt: skip
                cells.append(f"{got['held-out']:.0f} / {got['seen']:.0f}")
            print(f"  {field} {value} (held-out / seen): " + " | ".join(cells))
    print("columns: " + " | ".join(row["vae"] for row in rows))
    print("round-trip PSNR: " + " | ".join(f"{row['vae']} {row['psnr']:.2f} dB" for row in rows[1:]))
    save_json(args.json, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
