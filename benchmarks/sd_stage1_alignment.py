"""Does Taiyi stage 1 (train only the text encoder) align a swapped-in Chinese text tower to a UNet?

The experiment of TAIYI.md §1 in miniature, on the synthetic 山水 world (issue #4, "done when"):

1. An English SD: a small random SD v1-layout pipeline whose UNet and text encoder are trained together
   (``train_sd`` stage 2) on English 山水 captions. The rows "English SD, English captions" vs "no caption"
   show that its UNet really uses the text. The text encoder is a BERT reading English wordpieces of the
   Chinese BERT vocabulary (``low``, ``hill``, ``##s``, ``river``): with taiyi.testing's byte-level CLIP
   tokenizer (``--english-encoder clip``) a UNet this small had not learned to use its text after 400 steps
   (English minus no-caption loss -0.0001 ± 0.0000 on held-out scenes), which would leave nothing to align.
2. ``taiyi assemble``: its UNet, VAE and scheduler with another, random, Chinese BERT text tower of the
   UNet's cross-attention width (the unaligned swap).
3. ``train_sd`` stage 1 on Chinese captions of other 山水 scenes: only the text encoder trains.

The denoising loss (epsilon MSE, the training objective, unweighted) is measured on held-out Chinese
captions with the same fixed noise and timesteps for every model: new scenes of the training distribution,
and scenes with the attribute combinations the training split never shows. Differences are paired (the same
images, noise and timesteps) with their standard error over images. The "shuffled captions" row gives each
held-out image another image's caption: a text encoder that only learned one embedding the UNet likes
would score as well shuffled as matched. UNet and VAE weight files are checked byte-identical between the
English model, the assembled one and the stage 1 result.

The VAE is random (no trained VAE exists offline) with its posterior variance switched off and its scaling
factor set so latents have unit variance, as SD's 0.18215 does for the real VAE: the latents keep the
image's layout and colours, so captions carry information about them. Captions name every attribute
(``--short-captions``: some); both trainings weight the loss with min-SNR-γ 5 (``--snr-gamma 0``: plain MSE).

    python benchmarks/sd_stage1_alignment.py --threads 1 --json sd_stage1_alignment.json   # ~8 min, 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine, prepare  # noqa: E402  (shared by every benchmark)

WIDTH = 64  # cross-attention width = both text encoders' hidden size
TOKENS = 64  # prompt length of both tokenizers (the 山水 captions are shorter)


def build_english_sd(root: Path, data: Path, resolution: int, text_encoder: str = "bert") -> Path:
    """A random SD v1-layout pipeline (the English base before its training) with a ``bert`` (English
    wordpieces) or ``clip`` (bytes) text encoder."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from taiyi.assemble import write_pipeline_folder
    from taiyi.data import open_pairs
    from taiyi.testing import TAIYI_SCHEDULER_CONFIG, write_clip_tokenizer_folder
    from taiyi.tokenization import load_chinese_tokenizer
    from taiyi.train.sd import preprocess

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=resolution // 4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH,
        attention_head_dim=8,
    )
    torch.manual_seed(1)
    vae = AutoencoderKL(
        latent_channels=4,
        block_out_channels=(8, 16, 16),
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=resolution,
    )
    with torch.no_grad():  # posterior std e^-6: the latent is the image's encoding, not noise
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -12.0
        images = [pair.image for _, pair in zip(range(64), open_pairs(data), strict=False)]
        latents = vae.encode(preprocess(images, resolution)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    torch.manual_seed(2)
    if text_encoder == "bert":
        # English wordpieces of the Chinese BERT vocabulary (low, hill, ##s, river ...): words, not bytes.
        text = BertModel(
            BertConfig(
                vocab_size=21128,
                hidden_size=WIDTH,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=4 * WIDTH,
                max_position_embeddings=512,
            )
        )
        tokenizer = load_chinese_tokenizer(max_length=TOKENS)
    else:
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=256 * 2 + 9,  # the byte-level BPE of taiyi.testing: 512 byte symbols + merges + specials
                hidden_size=WIDTH,
                intermediate_size=4 * WIDTH,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=TOKENS,
                bos_token_id=519,
                eos_token_id=520,
                pad_token_id=520,
            )
        )
        write_clip_tokenizer_folder(root / "clip-tokenizer", max_length=TOKENS)
        tokenizer = CLIPTokenizer.from_pretrained(root / "clip-tokenizer")
    return write_pipeline_folder(
        root / "sd-en-random",
        unet=unet,
        vae=vae,
        scheduler=PNDMScheduler.from_config(TAIYI_SCHEDULER_CONFIG),
        text_encoder=text,
        tokenizer=tokenizer,
    )


def train(model: Path, data: Path, output: Path, *, stage: int, steps: int, args) -> dict:
    from taiyi.train.sd import SDTrainConfig, train_sd

    started = time.perf_counter()
    result = train_sd(
        SDTrainConfig(
            model=str(model),
            data=[str(data)],
            output=str(output),
            stage=stage,
            resolution=args.resolution,
            batch_size=args.batch_size,
            max_steps=steps,
            lr=args.lr,
            warmup_steps=min(50, steps // 10),
            caption_dropout=0.1 if stage == 2 else 0.0,  # the English SD learns an unconditional mode too
            snr_gamma=args.snr_gamma or None,
            val_prompts=[],
            save_every=0,
            report_to="none",
            seed=args.seed,
            cpu=True,
        )
    )
    losses = [result["losses"][s] for s in sorted(result["losses"])]
    k = max(1, len(losses) // 10)
    return {
        "final": result["final"],
        "steps": steps,
        "seconds": time.perf_counter() - started,
        "first_loss_mean": sum(losses[:k]) / k,  # the first and last tenth of the run
        "last_loss_mean": sum(losses[-k:]) / k,
    }


def held_out_loss(
    model: Path,
    data: Path,
    *,
    resolution: int,
    draws: int,
    seed: int,
    captions: str,
    t_range: tuple[int, int] = (0, 1000),
) -> list[float]:
    """Per-sample denoising loss (epsilon MSE averaged over ``draws`` fixed noise/timestep draws).

    ``captions``: "own" (each image's caption), "shuffled" (the next image's), or "empty".
    """
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from taiyi.data import open_pairs
    from taiyi.loading import load_stable_diffusion
    from taiyi.train.sd import encode_posterior, preprocess, tokenize

    sd = load_stable_diffusion(model, device=torch.device("cpu"), dtype=torch.float32, safety_checker=False)
    pairs = list(open_pairs(data))
    texts = [p.caption for p in pairs]
    if captions == "shuffled":
        texts = texts[1:] + texts[:1]
    elif captions == "empty":
        texts = [""] * len(texts)
    scheduler = DDPMScheduler.from_config(sd.scheduler.config)  # what train_sd trains with
    per_sample = torch.zeros(len(pairs))
    with torch.no_grad():
        mean, _ = encode_posterior(sd.vae, preprocess([p.image for p in pairs], resolution), "cpu")
        latents = mean * sd.vae.config.scaling_factor  # (N, 4, h, w)
        ids, mask, _ = tokenize(sd.tokenizer, sd.text_encoder, texts, "cpu")
        hidden = sd.text_encoder(ids, attention_mask=mask)[0]  # (N, L, D)
        for k in range(draws):
            g = torch.Generator().manual_seed(seed * 10_007 + k)  # the same draws for every model
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(*t_range, (len(pairs),), generator=g)
            for i in range(0, len(pairs), 32):
                s = slice(i, i + 32)
                noisy = scheduler.add_noise(latents[s], noise[s], t[s])
                prediction = sd.unet(noisy, t[s], hidden[s]).sample  # (b, 4, h, w)
                # train_sd's epsilon objective, kept per sample
                per_sample[s] += F.mse_loss(prediction, noise[s], reduction="none").mean(dim=(1, 2, 3))
    return (per_sample / draws).tolist()


def summary(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1))
    return {"mean": mean, "sem": sd / math.sqrt(n), "n": n}


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of a - b per sample, with its standard error (the same images, noise and timesteps)."""
    return summary([x - y for x, y in zip(a, b, strict=True)])


def same_weights(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--train-pairs", type=int, default=512, help="pairs of each training set (EN, ZH)")
    parser.add_argument("--eval-pairs", type=int, default=128, help="held-out pairs of each evaluation set")
    parser.add_argument("--english-steps", type=int, default=600, help="stage 2 steps of the English SD")
    parser.add_argument("--stage1-steps", type=int, default=300, help="stage 1 steps of the Chinese text encoder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--snr-gamma", type=float, default=5.0, help="min-SNR-γ weighting of both trainings (0: plain MSE)"
    )
    parser.add_argument(
        "--english-encoder",
        choices=("bert", "clip"),
        default="bert",
        help="text encoder of the English SD: a BERT over English wordpieces, or a CLIP text model over bytes",
    )
    parser.add_argument("--short-captions", action="store_true", help="captions name some attributes, not all")
    parser.add_argument("--draws", type=int, default=8, help="noise/timestep draws per held-out image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from taiyi.assemble import assemble
    from taiyi.data.shanshui import write_folder
    from taiyi.testing import make_tiny_taiyi_clip_text

    prepare(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="taiyi-bench-stage1-") as tmp:
        root = Path(tmp)
        size, n = args.resolution, args.train_pairs
        full, m = not args.short_captions, args.eval_pairs
        en = write_folder(root / "en", n, seed=1, size=size, captions="en", full=full)
        zh = write_folder(root / "zh", n, seed=2, size=size, captions="zh", full=full)  # other scenes than EN's
        evals = {
            "new scenes": write_folder(root / "eval-new", m, seed=3, size=size, captions="zh", full=full),
            "held-out combinations": write_folder(
                root / "eval-combo", m, seed=4, size=size, split="heldout", captions="zh", full=full
            ),
        }
        evals_en = write_folder(root / "eval-new-en", m, seed=3, size=size, captions="en", full=full)

        base = build_english_sd(root, en, size, text_encoder=args.english_encoder)
        english = train(base, en, root / "run-en", stage=2, steps=args.english_steps, args=args)
        tower = make_tiny_taiyi_clip_text(root / "zh-tower", head="pooler", dim=WIDTH, seed=5)
        swapped = assemble(english["final"], tower, root / "sd-zh-swapped", max_length=TOKENS)
        stage1 = train(swapped, zh, root / "run-stage1", stage=1, steps=args.stage1_steps, args=args)

        unet, vae = Path("unet/diffusion_pytorch_model.safetensors"), Path("vae/diffusion_pytorch_model.safetensors")
        identical = {
            part.parts[0]: same_weights(english["final"] / part, swapped / part)
            and same_weights(swapped / part, stage1["final"] / part)
            for part in (unet, vae)
        }

        def loss(model, data, captions):
            return held_out_loss(model, data, resolution=size, draws=args.draws, seed=args.seed, captions=captions)

        sets = {}
        for name, data in evals.items():
            rows = {
                "unaligned swap": loss(swapped, data, "own"),
                "after stage 1": loss(stage1["final"], data, "own"),
                "after stage 1, shuffled captions": loss(stage1["final"], data, "shuffled"),
                "English SD, no caption": loss(english["final"], data, "empty"),
            }
            if name == "new scenes":  # the same scenes with English captions: what the English SD itself reaches
                rows["English SD, English captions"] = loss(english["final"], evals_en, "own")
            sets[name] = {
                "losses": {k: summary(v) for k, v in rows.items()},
                "stage1_minus_swap": paired(rows["after stage 1"], rows["unaligned swap"]),
                "stage1_minus_shuffled": paired(rows["after stage 1"], rows["after stage 1, shuffled captions"]),
            }
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else argv,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "training": {
            "english_stage2": {k: v for k, v in english.items() if k != "final"},
            "chinese_stage1": {k: v for k, v in stage1.items() if k != "final"},
        },
        "unet_vae_bit_identical": identical,
        "held_out": sets,
        "wall_seconds": time.perf_counter() - started,
    }
    m = result["machine"]
    print(f"machine: {m['platform']}, {m['usable_cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)")
    print(
        f"English SD: stage 2 for {args.english_steps} steps ({english['seconds']:.0f} s, loss "
        f"{english['first_loss_mean']:.3f} -> {english['last_loss_mean']:.3f}); Chinese stage 1 for "
        f"{args.stage1_steps} steps ({stage1['seconds']:.0f} s, loss {stage1['first_loss_mean']:.3f} -> "
        f"{stage1['last_loss_mean']:.3f}); batch {args.batch_size}, {size} px, lr {args.lr:g}, "
        f"min-SNR-γ {args.snr_gamma:g}, English text encoder: {args.english_encoder}"
    )
    print(f"UNet and VAE bit-identical (English -> assembled -> stage 1): {identical}")
    for name, found in sets.items():
        print(f"\nheld-out denoising loss, {name} ({args.eval_pairs} images x {args.draws} draws; mean ± s.e.):")
        for row, s in found["losses"].items():
            print(f"  {row:<36} {s['mean']:.4f} ± {s['sem']:.4f}")
        d, e = found["stage1_minus_swap"], found["stage1_minus_shuffled"]
        print(f"  stage 1 - swap (paired):             {d['mean']:+.4f} ± {d['sem']:.4f}")
        print(f"  stage 1 - shuffled (paired):         {e['mean']:+.4f} ± {e['sem']:.4f}")
    print(f"\n{result['wall_seconds']:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
