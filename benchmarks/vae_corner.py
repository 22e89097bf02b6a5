"""The dot a VAE decoder draws in a corner of dark pictures, and what the attribute probe makes of it.

Renders dusk and night 山水 scenes (and, for PSNR, scenes of any time), round-trips them through each VAE
(posterior mean, decoded as taiyi decodes it: padded when its config says ``_taiyi_decode_padding``) and
prints per VAE:

- ``corner``: for each 8×8 corner block and a middle block, the block's largest deviation from its own 5×5
  median (0–1 scale, channels pooled), averaged over the dark pictures — a dot stands out, a smooth sky does
  not (a typical block reads about 0.03);
- PSNR of the dark pictures and of the pictures of any time;
- with ``--pipeline MODEL`` (repeatable): the corner blocks of pictures the text-to-image model draws from dusk
  and night prompts (its own VAE, as taiyi decodes it);
- with ``--probe``: the probe's readings of the three things (bridge, houses, pines) on the dark round trips —
  how often it sees one that is not there (false positives) and one that is (recall) — as decoded, and with
  the bottom-left 12×12 block put back from the clean render (how much of it the corner makes).

    python benchmarks/vae_corner.py RUN/vae-base/final RUN/vae/final --probe RUN/probe
    python benchmarks/vae_corner.py src/taiyi/weights/taiyi-mini-zh/vae --probe src/taiyi/weights/taiyi-mini-probe
    python benchmarks/vae_corner.py src/taiyi/weights/taiyi-mini-zh/vae --pipeline taiyi-mini-zh
"""

from __future__ import annotations

import argparse
import sys

from _bench import parse_scene_args, save_json


def blocks(size: int) -> dict[str, tuple[int, int]]:
    """Top-left (row, column) of the four 8×8 corner blocks and a middle one."""
    middle = size // 2 - 8
    return {"bottom-left": (-8, 0), "bottom-right": (-8, -8), "top-left": (0, 0), "top-right": (0, -8),
            "middle": (middle, middle)}  # fmt: skip


def scenes(times: tuple[str, ...] | None, n: int, seed: int, size: int):
    """``n`` training-split scenes (of ``times`` only, when given) and their renders, (n, 3, S, S) in [-1, 1]."""
    import numpy as np
    import torch

    from taiyi.data import shanshui

    g = np.random.default_rng([seed, 1])
    chosen = []
    while len(chosen) < n:
        scene = shanshui.sample_scene(g, "train")
        if times is None or scene.time in times:
            chosen.append(scene)
    renders = np.stack([np.asarray(shanshui.render(s, size, [seed, i])) for i, s in enumerate(chosen)])
    return chosen, torch.from_numpy(renders.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)


def block_deviation(pictures, row: int, col: int) -> float:
    """Mean over pictures of an 8×8 block's largest |pixel − its 5×5 median| (pictures in [-1, 1])."""
    import torch.nn.functional as F

    y = (pictures.clamp(-1, 1) + 1) / 2
    r, c = row % y.shape[-2], col % y.shape[-1]
    block = y[:, :, r : r + 8, c : c + 8]  # (B, 3, 8, 8)
    padded = F.pad(block, (2, 2, 2, 2), mode="replicate")
    median = padded.unfold(2, 5, 1).unfold(3, 5, 1).flatten(-2).median(-1).values
    return float((block - median).abs().amax(dim=(1, 2, 3)).mean())


def round_trip(vae, pixels):
    import torch

    with torch.no_grad():
        return torch.cat([vae.decode(vae.encode(b).latent_dist.mean).sample for b in pixels.split(64)])


def to_images(pixels):
    from PIL import Image

    arrays = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def things_read(probe, images, chosen) -> dict:
    """Share (%) of thing judgements the probe gets as false positives and as hits."""
    from taiyi.recipe.probe import THINGS

    predictions = probe.predict(images)
    absent = [t in p["things"] for p, s in zip(predictions, chosen, strict=True) for t in THINGS if t not in s.things]
    present = [t in p["things"] for p, s in zip(predictions, chosen, strict=True) for t in THINGS if t in s.things]
    return {
        "false_positives": 100 * sum(absent) / max(len(absent), 1),
        "recall": 100 * sum(present) / max(len(present), 1),
    }


DARK_PROMPTS = ("夜晚的高山，写实", "月夜湖边的人家，水彩", "黄昏的丘陵，油画", "日暮平原上的江河，水墨画",
                "夜色中的瀑布与松树", "夕阳下的小桥流水人家")  # fmt: skip


def drawn(model: str, n: int, seed: int):
    """``n`` pictures ``model`` draws from dusk and night prompts (seeds ``seed`` …), (n, 3, S, S) in [-1, 1]."""
    import numpy as np
    import torch

    from taiyi.pipeline import load_pipeline

    pipe = load_pipeline(model, device="cpu", backend="torch")
    pictures = []
    for i in range(n):
        image = pipe.generate(DARK_PROMPTS[i % len(DARK_PROMPTS)], seed=seed + i).images[0]
        pictures.append(np.asarray(image, dtype=np.float32) / 127.5 - 1)
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vae", nargs="+", help="AutoencoderKL folders (or pipeline folders with vae/)")
    parser.add_argument("--pipeline", action="append", default=[], help="a text-to-image model: its dark pictures")
    parser.add_argument("--drawn", type=int, default=48, help="pictures per --pipeline [48]")
    parser.add_argument("--probe", help="an attribute probe folder: also judge the things in the dark round trips")
    parser.add_argument("--dark", type=int, default=256, help="dusk and night scenes [256]")
    parser.add_argument("--any", type=int, default=256, help="scenes of any time, for PSNR [256]")
    args = parse_scene_args(parser, argv)
    from taiyi.loading import decode_padding
    from taiyi.train.uncond import load_vae
    from taiyi.train.vae import psnr  # the mean per-picture PSNR `taiyi train vae` validates with

    dark_scenes, dark = scenes(("黄昏", "夜晚"), args.dark, args.seed, args.size)
    _, anytime = scenes(None, args.any, args.seed + 1, args.size)
    probe = None
    if args.probe:
        from taiyi.recipe.probe import AttributeProbe

        probe = AttributeProbe.from_pretrained(args.probe)
        clean = things_read(probe, to_images(dark), dark_scenes)
        print(f"clean renders: things false positives {clean['false_positives']:.1f} %, "
              f"recall {clean['recall']:.1f} %")  # fmt: skip
    rows = []
    for folder in args.vae:
        vae = load_vae(folder)
        out = round_trip(vae, dark)
        row = {
            "vae": folder,
            "decode_padding": decode_padding(vae),
            "corner": {name: block_deviation(out, r, c) for name, (r, c) in blocks(args.size).items()},
            "psnr_dark": psnr(out, dark),
            "psnr_any": psnr(round_trip(vae, anytime), anytime),
        }
        corners = ", ".join(f"{k} {v:.3f}" for k, v in row["corner"].items())
        print(f"{folder} (padding {row['decode_padding']}): {corners}; PSNR dark {row['psnr_dark']:.2f} dB, "
              f"any {row['psnr_any']:.2f} dB")  # fmt: skip
        if probe is not None:
            patched = out.clone()
            patched[:, :, -12:, :12] = dark[:, :, -12:, :12]
            row["things"] = things_read(probe, to_images(out), dark_scenes)
            row["things_corner_clean"] = things_read(probe, to_images(patched), dark_scenes)
            a, b = row["things"], row["things_corner_clean"]
            print(f"  things: false positives {a['false_positives']:.1f} %, recall {a['recall']:.1f} %; with the "
                  f"bottom-left 12×12 clean: {b['false_positives']:.1f} %, {b['recall']:.1f} %")  # fmt: skip
        rows.append(row)
    for model in args.pipeline:
        pictures = drawn(model, args.drawn, args.seed)
        row = {
            "pipeline": model,
            "corner": {k: block_deviation(pictures, r, c) for k, (r, c) in blocks(pictures.shape[-1]).items()},
        }
        print(
            f"{model}, {args.drawn} dark pictures drawn: "
            + ", ".join(f"{k} {v:.3f}" for k, v in row["corner"].items())
        )
        rows.append(row)
    save_json(args.json, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
