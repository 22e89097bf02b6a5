"""How much faster locked-image CLIP training runs with cached image features.

With the image tower frozen, ``taiyi train clip`` computes each sample's image feature once and caches
it (``--cache-image-features``, the default); without the cache every step decodes/draws its images,
preprocesses them and runs the image tower. This script runs :func:`taiyi.train.clip.train_clip` both
ways on the same random towers and synthetic data and prints steps/s, their ratio, the one-off cost of
building the cache and the machine it ran on. Steps/s come from the median step time, which a busy
machine disturbs least; the means are in the ``--json`` output.

The towers keep the proportions of Taiyi-CLIP-Roberta-102M + CLIP ViT-B/32 (224 px images in 32 px
patches, text and image towers of equal width and depth) at a quarter of the width and a third of the
depth, so a CPU runs them in minutes; pass ``--width 768 --layers 12`` for the full-size geometry.

    python benchmarks/clip_feature_cache.py                      # defaults: 20 timed steps, batch 32
    python benchmarks/clip_feature_cache.py --steps 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _bench import machine, prepare


def build_towers(root: Path, *, width: int, layers: int, image_size: int, patch: int, dim: int) -> tuple[Path, Path]:
    """A random CLIP image model and a random Taiyi-CLIP text tower (BertForSequenceClassification)."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
    )

    from taiyi.tokenization import save_bert_tokenizer_folder

    heads = max(width // 64, 1)
    torch.manual_seed(0)
    clip = CLIPModel(
        CLIPConfig(
            text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
            vision_config={
                "hidden_size": width,
                "intermediate_size": 4 * width,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "image_size": image_size,
                "patch_size": patch,
            },
            projection_dim=dim,
        )
    )
    image = root / "image-tower"
    clip.save_pretrained(image)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(image)
    torch.manual_seed(1)
    text_model = BertForSequenceClassification(
        BertConfig(
            vocab_size=21128,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * width,
            max_position_embeddings=512,
            num_labels=dim,
        )
    )
    text = root / "text-tower"
    text_model.save_pretrained(text)
    save_bert_tokenizer_folder(text, max_length=512)
    return text, image


def run(text: Path, image: Path, output: Path, *, cache: bool, args) -> dict:
    from taiyi.train.clip import ClipTrainConfig, train_clip

    result = train_clip(
        ClipTrainConfig(
            data=f"synthetic:{args.pairs}",
            output=str(output),
            text_tower=str(text),
            image_tower=str(image),
            batch_size=args.batch_size,
            max_steps=args.warmup + args.steps,
            lr=1e-4,
            warmup_steps=0,
            val_fraction=0.0,
            save_every=0,
            report_to="none",
            num_workers=args.num_workers,
            cache_image_features=cache,
            cpu=args.cpu,
            mixed_precision=args.mixed_precision,
        )
    )
    timed = result["step_seconds"][args.warmup :]
    return {
        # The median step: a machine shared with other work stalls some steps, and the median ignores them.
        "steps_per_second": 1 / statistics.median(timed),
        "mean_steps_per_second": len(timed) / sum(timed),
        "median_step_seconds": statistics.median(timed),
        "cache_seconds": result["cache_seconds"],
        "final_loss": result["losses"][max(result["losses"])],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps per mode")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=512, help="synthetic pairs (the cache encodes all of them)")
    parser.add_argument("--width", type=int, default=192, help="hidden size of both towers (ViT-B/32: 768)")
    parser.add_argument("--layers", type=int, default=4, help="layers of both towers (ViT-B/32: 12)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128, help="feature size (ViT-B/32: 512)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for the uncached run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    parser.add_argument("--mixed-precision", default="auto")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    prepare(args.threads)
    with tempfile.TemporaryDirectory(prefix="taiyi-bench-cache-") as tmp:
        root = Path(tmp)
        text, image = build_towers(
            root, width=args.width, layers=args.layers, image_size=args.image_size, patch=args.patch, dim=args.dim
        )
        started = time.perf_counter()
        uncached = run(text, image, root / "uncached", cache=False, args=args)
        cached = run(text, image, root / "cached", cache=True, args=args)
        wall = time.perf_counter() - started
    ratio = cached["steps_per_second"] / uncached["steps_per_second"]
    saved_per_step = 1 / uncached["steps_per_second"] - 1 / cached["steps_per_second"]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else argv,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "uncached": uncached,
        "cached": cached,
        "speedup": ratio,
        "cache_pays_off_after_steps": cached["cache_seconds"] / saved_per_step if saved_per_step > 0 else None,
        "wall_seconds": wall,
    }
    m = result["machine"]
    print(f"machine: {m['platform']}, {m['usable_cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)")
    print(
        f"towers: width {args.width}, {args.layers} layers, {args.image_size} px / patch {args.patch}; "
        f"batch {args.batch_size}, {args.steps} timed steps"
    )
    print(f"recomputing image features every step: {uncached['steps_per_second']:.2f} steps/s")
    print(
        f"cached image features:                  {cached['steps_per_second']:.2f} steps/s "
        f"(cache of {args.pairs} images built in {cached['cache_seconds']:.1f} s)"
    )
    print(f"speedup: {ratio:.2f}x")
    if result["cache_pays_off_after_steps"] is not None:
        print(f"the cache pays for its build after {result['cache_pays_off_after_steps']:.0f} steps")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
