"""Peak memory and time of one Disco Diffusion step: gradient checkpointing and cutout batching.

The unconditional model is the published Taiyi-Diffusion-532M-Nature architecture (OpenAI ADM 512
config: 256 channels, attention at 32/16/8, learn_sigma, resblock up/down, scale-shift norm) with
random weights; the CLIP has a ViT-B/32-sized image tower (224 px input) and a small Chinese text tower.
Each setting runs in a fresh process (peak RSS is per process; on a GPU, peak allocated memory).

    python benchmarks/disco_memory.py --size 128 --cutn 16 --steps 1
    python benchmarks/disco_memory.py --size 512 --cutn 16 --steps 1 --device cuda   # the 16 GB question
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "plain": {"gradient_checkpointing": False, "cut_batches": 1},
    "cut-batches 4": {"gradient_checkpointing": False, "cut_batches": 4},
    "checkpointing": {"gradient_checkpointing": True, "cut_batches": 1},
    "checkpointing + cut-batches 4": {"gradient_checkpointing": True, "cut_batches": 4},
}


def build(cache: Path) -> tuple[Path, Path, Path]:
    """Random full-size ADM model (converted to diffusers), a ViT-B/32-sized image tower, a small text tower."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from taiyi.guided_diffusion import ADMUNet, config_for_512_uncond, convert_guided_diffusion
    from taiyi.testing import make_tiny_taiyi_clip_text

    model, image, text = cache / "adm512", cache / "vit-b32", cache / "text"
    if not (model / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        with torch.no_grad():
            adm = ADMUNet(config_for_512_uncond())
        save_file({k: v.contiguous() for k, v in adm.state_dict().items()}, str(cache / "adm512.safetensors"))
        del adm
        convert_guided_diffusion(cache / "adm512.safetensors", model, overwrite=True)
        (cache / "adm512.safetensors").unlink()
    if not (image / "config.json").is_file():
        from transformers import CLIPImageProcessor

        torch.manual_seed(0)
        config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=224, patch_size=32,
                                  projection_dim=512)  # fmt: skip
        CLIPVisionModelWithProjection(config).save_pretrained(image)
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(image)
    if not (text / "config.json").is_file():
        make_tiny_taiyi_clip_text(text, dim=512)
    return model, image, text


def child(args: dict) -> dict:
    import resource

    import torch

    from taiyi.clip import load_clip
    from taiyi.disco import DiscoSettings, disco_sample, load_uncond

    torch.set_num_threads(args["threads"])
    device = args["device"]
    model = load_uncond(args["model"], device=device)
    clip = load_clip(args["text"], image_tower=args["image"], device=device)
    settings = DiscoSettings(steps=args["steps"], cutn=args["cutn"], seed=0, **args["setting"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    disco_sample(model, clip, "东临碣石，以观沧海", settings, size=args["size"])
    seconds = time.perf_counter() - t0
    out = {
        "seconds_per_step": seconds / args["steps"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--cutn", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "taiyi-bench" / "disco"))
    parser.add_argument("--only", action="append", help="run only these settings (names above)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    from _bench import machine, prepare

    prepare(args.threads)
    model, image, text = build(Path(args.cache))
    rows = {}
    for name, setting in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        payload = {"model": str(model), "image": str(image), "text": str(text), "size": args.size,
                   "cutn": args.cutn, "steps": args.steps, "threads": args.threads, "device": args.device,
                   "setting": setting}  # fmt: skip
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(payload)], capture_output=True, text=True
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            rows[name] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            rows[name] = json.loads(lines[-1])
        print(name, rows[name], flush=True)
    report = {"size": args.size, "cutn": args.cutn, "steps": args.steps, "device": args.device, "machine": machine(),
              "results": rows}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
