"""How much faster Stable Diffusion text-encoder training (Taiyi stage 1) runs with cached latents.

The VAE is frozen in both Taiyi SD stages, so ``taiyi train sd`` encodes each image once and caches the
posterior mean and std (``--cache-latents``, the default); the reference trainer re-encodes every image
every step (TAIYI.md §3). This script runs :func:`taiyi.train.sd.train_sd` both ways on the same random
pipeline and synthetic pairs and prints steps/s, their ratio, the seconds saved per step, the one-off
cost of building the cache and the machine it ran on (median step times; means in ``--json``).

The VAE has the full SD v1 geometry (128/256/512/512 channels, 2 layers per block: the VAE the cache
removes from every step). The UNet is SD v1's layout at ``--unet-scale`` of its width (default 1/4,
so a CPU runs it in minutes; ``--unet-scale 1`` is the full 860M-parameter UNet) and the text encoder is
a 768-wide BERT of ``--text-layers`` layers. The saved seconds per step are the VAE's cost and carry over
to any UNet on the same machine: the speedup with another UNet is (T_unet + saved) / T_unet.

    python benchmarks/sd_latent_cache.py                        # 256 px, batch 1, 6 timed steps
    python benchmarks/sd_latent_cache.py --resolution 512 --unet-scale 1 --steps 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine, prepare  # noqa: E402  (shared by every benchmark)


def build_pipeline(root: Path, *, unet_scale: float, text_layers: int) -> Path:
    """A random SD v1-geometry pipeline folder with a Chinese BERT text encoder (Taiyi layout)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import BertConfig, BertModel

    from taiyi.assemble import write_pipeline_folder
    from taiyi.testing import TAIYI_SCHEDULER_CONFIG
    from taiyi.tokenization import load_chinese_tokenizer

    torch.manual_seed(0)
    widths = tuple(max(32, int(round(c * unet_scale / 32)) * 32) for c in (320, 640, 1280, 1280))
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=widths, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    bert = BertModel(BertConfig(vocab_size=21128, hidden_size=768, num_hidden_layers=text_layers))
    return write_pipeline_folder(
        root / "pipeline",
        unet=unet,
        vae=vae,
        scheduler=PNDMScheduler.from_config(TAIYI_SCHEDULER_CONFIG),
        text_encoder=bert,
        tokenizer=load_chinese_tokenizer(max_length=512),
    )


def run(model: Path, data: Path, output: Path, *, cache: bool, args) -> dict:
    from taiyi.train.sd import SDTrainConfig, train_sd

    result = train_sd(
        SDTrainConfig(
            model=str(model),
            data=[str(data)],
            output=str(output),
            stage=1,
            resolution=args.resolution,
            batch_size=args.batch_size,
            max_steps=args.warmup + args.steps,
            cache_latents=cache,
            val_prompts=[],
            save_every=0,
            report_to="none",
            cpu=args.cpu,
            mixed_precision=args.mixed_precision,
        )
    )
    timed = result["step_seconds"][args.warmup :]
    return {
        "steps_per_second": 1 / statistics.median(timed),
        "mean_steps_per_second": len(timed) / sum(timed),
        "median_step_seconds": statistics.median(timed),
        "cache_seconds": result["cache_seconds"],
        "first_loss": result["losses"][1],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per mode")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=16, help="synthetic pairs (the cache encodes all of them)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--unet-scale", type=float, default=0.25, help="UNet width relative to SD v1 (1: full)")
    parser.add_argument("--text-layers", type=int, default=2, help="layers of the 768-wide BERT (Taiyi: 12)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    parser.add_argument("--mixed-precision", default="auto")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from taiyi.data.shanshui import write_folder

    prepare(args.threads)
    with tempfile.TemporaryDirectory(prefix="taiyi-bench-latents-") as tmp:
        root = Path(tmp)
        model = build_pipeline(root, unet_scale=args.unet_scale, text_layers=args.text_layers)
        data = write_folder(root / "data", args.pairs, seed=0, size=args.resolution)
        started = time.perf_counter()
        uncached = run(model, data, root / "uncached", cache=False, args=args)
        cached = run(model, data, root / "cached", cache=True, args=args)
        wall = time.perf_counter() - started
    ratio = cached["steps_per_second"] / uncached["steps_per_second"]
    saved = uncached["median_step_seconds"] - cached["median_step_seconds"]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else argv,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "uncached": uncached,
        "cached": cached,
        "speedup": ratio,
        "seconds_saved_per_step": saved,
        "cache_pays_off_after_steps": cached["cache_seconds"] / saved if saved > 0 else None,
        "wall_seconds": wall,
    }
    m = result["machine"]
    print(f"machine: {m['platform']}, {m['usable_cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)")
    print(
        f"stage 1, {args.resolution} px, batch {args.batch_size}: SD v1 VAE, UNet at {args.unet_scale:g} of SD v1 "
        f"width, BERT 768 x {args.text_layers}; {args.steps} timed steps"
    )
    print(f"re-encoding latents every step: {uncached['steps_per_second']:.3f} steps/s")
    print(
        f"cached latents:                 {cached['steps_per_second']:.3f} steps/s "
        f"(cache of {args.pairs} images built in {cached['cache_seconds']:.1f} s)"
    )
    print(f"speedup: {ratio:.2f}x ({saved:.2f} s saved per step)")
    if result["cache_pays_off_after_steps"] is not None:
        print(f"the cache pays for its build after {result['cache_pays_off_after_steps']:.0f} steps")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
