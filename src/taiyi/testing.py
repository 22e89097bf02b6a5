"""Tiny random Stable Diffusion checkpoints in the exact layouts real Taiyi checkpoints use.

Real weights cannot always be downloaded (CI, air-gapped machines), so every loading path is
exercised with small random models saved exactly as the published ones are:

- ``text_encoder="bert"``: Taiyi-Stable-Diffusion-1B-Chinese layout — ``BertModel`` text encoder
  with the 21128-token Chinese vocabulary, ``BertTokenizer`` folder holding ``vocab.txt``, PNDM
  scheduler with ``clip_sample=False``.
- ``text_encoder="clip"``: Taiyi-Stable-Diffusion-1B-Chinese-EN layout (and plain English SD v1) —
  ``CLIPTextModel`` + ``CLIPTokenizer`` (byte-level BPE ``vocab.json`` + ``merges.txt``).

The images these models draw are noise: they prove plumbing, not quality. Run as
``python -m taiyi.testing OUT_DIR [--clip] [--inpaint] [--safety-checker] [--fp16-variant]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import torch

from .tokenization import save_bert_tokenizer_folder

# PNDM settings of the published Taiyi scheduler_config.json (SD v1 betas, clip_sample off).
TAIYI_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}

TEXT_WIDTH = 32  # hidden size of the tiny text encoders = UNet cross-attention width


def run_cli(capsys, *argv, device: str | None = None) -> tuple[int, str, str]:
    """``taiyi *argv`` in-process: (exit code, stdout, stderr) as pytest's ``capsys`` caught them.

    Args:
        device: appended as ``--device`` unless ``argv`` gives one (commands whose reference numbers are CPU ones).
    """
    from .cli import main

    args = [str(a) for a in argv]
    if device is not None and "--device" not in args:
        args += ["--device", device]
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    """A user mistake as the CLI reports one: exit 2 and one ``taiyi: error:`` line holding every needle."""
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("taiyi: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest to U+0100+.
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer_folder(folder: str | Path, max_length: int = 77) -> None:
    """Write a small but real CLIP BPE tokenizer: the 256 byte symbols (with and without ``</w>``),
    a few merges for common English, and CLIP's special tokens."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>"), ("e", "r"), ("a", "t")]
    for a, b in merges:
        vocab.append(a + b)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def tiny_components(
    text_encoder: str = "bert", *, inpaint: bool = False, safety_checker: bool = False, seed: int = 0
) -> dict:
    """Random tiny components: UNet (16/32 channels), VAE with downsampling factor 4, 2-layer text
    encoder of width 32. Seeded before each component, as diffusers' ``get_dummy_components``."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,  # 16 latents x factor 4 = 64 px default
        in_channels=9 if inpaint else 4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16),
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=64,
    )
    torch.manual_seed(seed + 2)
    if text_encoder == "bert":
        config = BertConfig(
            vocab_size=21128,
            hidden_size=TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=512,
        )
        encoder = BertModel(config, add_pooling_layer=True)
    elif text_encoder == "clip":
        config = CLIPTextConfig(
            vocab_size=len(_bytes_to_unicode()) * 2 + 7 + 2,
            hidden_size=TEXT_WIDTH,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=519,
            eos_token_id=520,
            pad_token_id=520,
        )
        encoder = CLIPTextModel(config)
    else:
        raise ValueError(f"text_encoder must be 'bert' or 'clip', not {text_encoder!r}")
    components = {
        "unet": unet,
        "vae": vae,
        "text_encoder": encoder.eval(),
        "scheduler": PNDMScheduler.from_config(TAIYI_SCHEDULER_CONFIG),
        "safety_checker": None,
        "feature_extractor": None,
    }
    if safety_checker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPConfig, CLIPImageProcessor

        torch.manual_seed(seed + 3)
        clip_config = CLIPConfig(
            text_config={"hidden_size": 16, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2},
            vision_config={
                "hidden_size": 16,
                "intermediate_size": 37,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            projection_dim=16,
        )
        components["safety_checker"] = StableDiffusionSafetyChecker(clip_config).eval()
        components["feature_extractor"] = CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
    return components


def make_tiny_pipeline(
    out_dir: str | Path,
    *,
    text_encoder: str = "bert",
    inpaint: bool = False,
    safety_checker: bool = False,
    fp16_variant: bool = False,
    safe_serialization: bool = True,
    seed: int = 0,
) -> Path:
    """Save a tiny random SD v1 pipeline folder in the published Taiyi layout and return its path.

    Args:
        out_dir: folder to create (must not exist or be empty).
        text_encoder: ``"bert"`` (Taiyi Chinese) or ``"clip"`` (Taiyi bilingual / English SD v1).
        inpaint: 9-channel inpainting UNet instead of the 4-channel one.
        safety_checker: include a (tiny random) safety checker and feature extractor.
        fp16_variant: also write ``*.fp16.safetensors`` weights, as the hub repos do.
        safe_serialization: ``False`` writes pickled ``.bin`` weights (to test that they are refused).
        seed: weights seed.
    """
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import BertTokenizer, CLIPTokenizer

    out_dir = Path(out_dir)
    components = tiny_components(text_encoder, inpaint=inpaint, safety_checker=safety_checker, seed=seed)
    tok_dir = out_dir / "tokenizer"
    if text_encoder == "bert":
        save_bert_tokenizer_folder(tok_dir, max_length=512)
        tokenizer = BertTokenizer.from_pretrained(tok_dir)
    else:
        write_clip_tokenizer_folder(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    pipe = cls(**components, tokenizer=tokenizer, requires_safety_checker=safety_checker)
    if fp16_variant:
        # Written first: each save rewrites config.json, which must end up describing float32 weights.
        half = {
            k: (copy.deepcopy(v).to(torch.float16) if isinstance(v, torch.nn.Module) else v)
            for k, v in pipe.components.items()
        }
        cls(**half, requires_safety_checker=safety_checker).save_pretrained(
            out_dir, safe_serialization=safe_serialization, variant="fp16"
        )
    pipe.save_pretrained(out_dir, safe_serialization=safe_serialization)
    if not safe_serialization:
        # transformers 5 writes safetensors whatever it is told; pickle those weights as 2022 repos had them.
        from safetensors.torch import load_file

        for st in out_dir.glob("*/model*.safetensors"):
            torch.save(
                load_file(st), st.with_name(st.name.replace("model", "pytorch_model").replace(".safetensors", ".bin"))
            )
            st.unlink()
    _write_2022_layout(out_dir, components)
    # Lay the tokenizer folder out as the hub repo has it (transformers 5 writes only tokenizer.json).
    shutil.rmtree(tok_dir)
    if text_encoder == "bert":
        save_bert_tokenizer_folder(tok_dir, max_length=512)
    else:
        write_clip_tokenizer_folder(tok_dir)
    return out_dir


def _write_2022_layout(out_dir: Path, components: dict) -> None:
    """Rewrite the index and feature-extractor config as the published (diffusers 0.x, 2022) repos have
    them: they name ``CLIPFeatureExtractor``, a class transformers 5 no longer has."""
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.10.0",
        "feature_extractor": ["transformers", "CLIPFeatureExtractor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", type(components["text_encoder"]).__name__],
        "tokenizer": [
            "transformers",
            "BertTokenizer" if type(components["text_encoder"]).__name__ == "BertModel" else "CLIPTokenizer",
        ],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if components["safety_checker"] is None:
        index["safety_checker"] = [None, None]
        index["feature_extractor"] = [None, None]
    else:
        size = components["feature_extractor"].crop_size["height"]
        config = {
            "crop_size": size,
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "size": size,
        }
        (out_dir / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))


def make_tiny_clip_image_tower(out_dir: str | Path, *, dim: int = 16, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny random ``CLIPModel`` folder (the layout of openai/clip-vit-*) with its image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=dim,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(out_dir)
    return Path(out_dir)


def make_tiny_taiyi_clip_text(
    out_dir: str | Path, *, head: str = "logits", dim: int = 16, seed: int = 0, safe_serialization: bool = True
) -> Path:
    """A tiny random Taiyi-CLIP text tower in the published layout.

    Args:
        head: ``"logits"`` — ``BertForSequenceClassification`` with ``num_labels=dim`` (Taiyi-CLIP-Roberta-102M
            style); ``"pooler"`` — ``BertModel`` with hidden size ``dim`` (Taiyi-CLIP-RoBERTa-102M-ViT-L style).
        dim: feature size; must equal the image tower's projection size.
        safe_serialization: ``False`` writes ``pytorch_model.bin`` as the published repos do.
    """
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    hidden = 32 if head == "logits" else dim
    config = BertConfig(
        vocab_size=21128,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=512,
        num_labels=dim,
    )
    model = BertForSequenceClassification(config) if head == "logits" else BertModel(config)
    model.eval().save_pretrained(out_dir, safe_serialization=True)
    out_dir = Path(out_dir)
    if not safe_serialization:
        from safetensors.torch import load_file

        st = out_dir / "model.safetensors"
        torch.save(load_file(st), out_dir / "pytorch_model.bin")
        st.unlink()
    save_bert_tokenizer_folder(out_dir, max_length=512)
    return out_dir


def populate_hf_cache(
    cache_dir: str | Path,
    repo_id: str,
    folder: str | Path,
    commit: str = "0" * 40,
    *,
    ref: str = "main",
    blobs: bool = False,
) -> Path:
    """Copy a pipeline folder into a Hugging Face hub cache as if ``repo_id`` had been downloaded.

    Lays out ``models--{org}--{name}/snapshots/{commit}/`` and ``refs/{ref}`` as ``huggingface_hub`` does, so
    ``HF_HUB_OFFLINE=1`` resolution can be tested without a network. ``blobs``: as ``hf download`` leaves it
    exactly, the files in ``blobs/<sha256>`` and the snapshot's entries relative symlinks into them.
    """
    import hashlib
    import os

    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    if blobs:
        (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
                blob.write_bytes(data)
                link = snapshot / path.relative_to(folder)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(blob, link.parent))
    else:
        shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m taiyi.testing", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--clip", action="store_true", help="CLIP text encoder (bilingual layout)")
    parser.add_argument("--inpaint", action="store_true")
    parser.add_argument("--safety-checker", action="store_true")
    parser.add_argument("--fp16-variant", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if Path(args.out_dir, "model_index.json").exists():
        print(f"{args.out_dir} already holds a pipeline; kept")
        return
    path = make_tiny_pipeline(
        args.out_dir,
        text_encoder="clip" if args.clip else "bert",
        inpaint=args.inpaint,
        safety_checker=args.safety_checker,
        fp16_variant=args.fp16_variant,
        seed=args.seed,
    )
    print(f"tiny random pipeline written to {path}")


if __name__ == "__main__":
    main()
