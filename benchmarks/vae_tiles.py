"""VAE decoding of pictures larger than the VAE's native size: whole, in taiyi's tiles, in diffusers' own tiles.

For each picture side, one decode of seeded latents three ways, median of ``--runs`` after a warm-up:

- ``whole``: tiling off;
- ``taiyi``: the memory mode ``auto`` (tiles of at least 512 px, :data:`taiyi.pipeline.MIN_TILE_PIXELS`);
- ``diffusers``: tiling on at diffusers' own tile size (the VAE's ``sample_size``: 64 px for the embedded VAE);

and how far each tiled picture lies from the whole one (mean absolute difference, 0–1 scale).

    python benchmarks/vae_tiles.py                       # the embedded VAE, 128 / 256 / 512 px
    python benchmarks/vae_tiles.py --model taiyi-mini-zh --sizes 128,1024 --threads 2 -o tiles.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from _bench import machine, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline (default: the embedded taiyi-mini-zh)")
    parser.add_argument("--sizes", default="128,256,512", help="picture sides in px, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-o", "--output", default=None, help="also write the table as JSON")
    args = parser.parse_args(argv)
    prepare(args.threads)
    import torch

    from taiyi.loading import vae_factor
    from taiyi.pipeline import load_pipeline

    vae = load_pipeline(args.model, safety_checker=False).sd.vae  # memory "auto"
    taiyi_tiles = (vae.tile_sample_min_size, vae.tile_latent_min_size)
    native = vae.config.sample_size
    factor = vae_factor(vae)
    ways = {
        "whole": (False, taiyi_tiles),
        "taiyi": (True, taiyi_tiles),
        "diffusers": (True, (native, native // factor)),
    }
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        z = torch.randn(
            1, vae.config.latent_channels, side // factor, side // factor, generator=torch.Generator().manual_seed(0)
        )
        pictures, row = {}, {"side": side}
        for way, (tiling, (tile, latent_tile)) in ways.items():
            vae.enable_tiling() if tiling else vae.disable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile, latent_tile
            seconds = []
            with torch.no_grad():
                for i in range(args.runs + 1):
                    started = time.perf_counter()
                    pictures[way] = vae.decode(z).sample.clamp(-1, 1)
                    if i:
                        seconds.append(time.perf_counter() - started)
            row[f"{way}_s"] = round(statistics.median(seconds), 3)
            if way != "whole":
                row[f"{way}_vs_whole"] = round(float((pictures[way] - pictures["whole"]).abs().mean() / 2), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"model": args.model or "taiyi-mini-zh", "native_px": native, "taiyi_tile_px": taiyi_tiles[0],
              "runs": args.runs, "rows": rows, "machine": machine()}  # fmt: skip
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report["machine"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
