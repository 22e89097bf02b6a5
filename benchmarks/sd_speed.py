"""Generation speed and memory: taiyi against stock diffusers on the same weights, in the same run.

Models:
- ``full``: the full-size Taiyi-Stable-Diffusion-1B-Chinese architecture with random weights (BERT-base
  text encoder with the 21128 vocabulary, SD v1 UNet 860M, SD VAE), built once into ``--cache``;
  random weights time exactly like trained ones.
- any pipeline folder or short name (``--model``), e.g. the embedded ``taiyi-mini-zh``.

    python benchmarks/sd_speed.py --model full --size 512 --runs 1 --warmup 0 --json out.json

Prints the ``taiyi bench`` table (taiyi at its defaults; stock diffusers at the model card's defaults —
PNDM, 50 steps, fp32; and stock with taiyi's scheduler and steps, which isolates the per-step cost).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _bench import prepare, write_json

FULL_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
FULL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "sample_size": 512,
}
TAIYI_SCHEDULER = {  # the published Taiyi SD scheduler_config.json
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def full_size_checkpoint(folder: Path) -> Path:
    """Write (once) a random-weight pipeline folder with the published Taiyi Chinese SD architecture."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import BertConfig, BertModel

    from taiyi.assemble import write_pipeline_folder
    from taiyi.tokenization import load_chinese_tokenizer

    torch.manual_seed(0)
    with torch.no_grad():
        unet = UNet2DConditionModel(**FULL_UNET)
        vae = AutoencoderKL(**FULL_VAE)
        bert = BertModel(BertConfig(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072, max_position_embeddings=512))  # fmt: skip
    folder.parent.mkdir(parents=True, exist_ok=True)
    return write_pipeline_folder(
        folder,
        unet=unet,
        vae=vae,
        scheduler=PNDMScheduler.from_config(TAIYI_SCHEDULER),
        text_encoder=bert.eval(),
        tokenizer=load_chinese_tokenizer(max_length=512),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="full", help="'full' (random full-size Taiyi SD) or a pipeline")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "taiyi-bench" / "taiyi-sd-full-random"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="taiyi's steps (default: its own)")
    parser.add_argument("--scheduler", default=None, help="taiyi's sampler (default: its own)")
    parser.add_argument("--guidance-end", type=float, default=None, help="taiyi's guided fraction (default: its own)")
    parser.add_argument("--engine", action="append", help="taiyi, taiyi-openvino, stock, stock-matched (repeatable)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    prepare(args.threads)
    from taiyi.bench import bench, format_table

    model = str(full_size_checkpoint(Path(args.cache))) if args.model == "full" else args.model
    report = bench(
        model, engines=tuple(args.engine or ("taiyi", "stock", "stock-matched")), size=args.size, steps=args.steps,
        scheduler=args.scheduler, runs=args.runs, warmup=args.warmup, device=args.device, dtype=args.dtype,
        threads=args.threads, guidance_end=args.guidance_end,
    )  # fmt: skip
    report["model_name"] = args.model
    print(format_table(report))
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
