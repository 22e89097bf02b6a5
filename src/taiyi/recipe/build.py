"""In-process set-up steps of ``taiyi recipe mini``: the training data and the untrained starting models.

Everything here is deterministic from the recipe's seed. The starting models are what the real
recipe downloads (a pretrained Chinese BERT, SD v1-4's UNet); in miniature they start random.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import torch

from ..data import shanshui
from ..errors import InvalidInputError
from ..train.common import write_json_atomic

__all__ = [
    "write_data", "write_clip_config", "init_text_tower", "init_english_sd", "unet_config", "scheduler_config",
    "copy_embedded_probe", "EMBEDDED_PROBE",
]  # fmt: skip

CAPTION_LANGS = ("zh", "en", "mixed")


def _render_images(folder: str, n: int, seed: int, size: int, indices: range) -> None:
    """Write ``data/images/NNNNNN.png`` for ``indices`` (a worker's share; a picture depends only on its index)."""
    data = shanshui.ShanshuiDataset(n, seed, size, "train", "zh")
    for i in indices:
        path = Path(folder) / "images" / f"{i:06d}.png"
        if not path.is_file():  # a rerun after an interruption keeps what was rendered
            tmp = path.with_name(f".{path.name}.tmp")
            data[i].image.save(tmp, format="PNG")
            os.replace(tmp, path)


def _render_share(task: tuple) -> None:
    _render_images(*task)


def _ignore_interrupts() -> None:
    """A rendering worker's start: Ctrl-C and SIGTERM are the parent's to handle (it terminates the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_data(out: Path, preset, config) -> None:
    """Render ``preset.n_train`` training scenes (split ``train``: no held-out combination) once, as
    ``data/images/NNNNNN.png``, with one manifest per caption language (``zh.jsonl``, ``en.jsonl``,
    ``mixed.jsonl``: the same images, captions of that language) and ``scenes.jsonl`` (true attributes).

    Pictures are rendered by ``jobs × threads`` worker processes (a picture depends only on its index, so
    the files are the same for any number of workers); captions and attributes by this process."""
    folder = out / "data"
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(config.jobs * config.threads, os.cpu_count() or 1))
    chunk = max(256, -(-preset.n_train // (workers * 8)))
    shares = [range(a, min(a + chunk, preset.n_train)) for a in range(0, preset.n_train, chunk)]
    args = (str(folder), preset.n_train, config.seed, preset.size)
    if workers == 1 or len(shares) == 1:
        for share in shares:
            _render_images(*args, share)
    else:
        # spawn, not fork: the parent may already run torch's thread pools. Ctrl-C reaches the workers too (one
        # process group): they ignore it and the parent, interrupted, terminates them on leaving the pool (a
        # ProcessPoolExecutor rendered every remaining picture first, and hung for good on a second Ctrl-C).
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_ignore_interrupts) as pool:
            for _ in pool.imap_unordered(_render_share, [(*args, share) for share in shares]):
                pass
    data = {
        lang: shanshui.ShanshuiDataset(preset.n_train, config.seed, preset.size, "train", lang)
        for lang in CAPTION_LANGS
    }
    rows: dict[str, list[str]] = {lang: [] for lang in (*CAPTION_LANGS, "scenes")}
    for i in range(preset.n_train):
        name = f"images/{i:06d}.png"
        for lang in CAPTION_LANGS:
            caption = data[lang].caption(i).text
            rows[lang].append(json.dumps({"image": name, "caption": caption}, ensure_ascii=False))
        scene = data["zh"].scene(i)
        rows["scenes"].append(json.dumps({"image": name, **scene.as_dict("zh")}, ensure_ascii=False))
    for lang, lines in rows.items():
        target = folder / f"{lang}.jsonl"
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    write_json_atomic(folder / "done.json", {"n": preset.n_train, "size": preset.size, "seed": config.seed})


EMBEDDED_PROBE = "taiyi-mini-probe"


def copy_embedded_probe(out: Path, preset, config) -> Path:  # noqa: ARG001 (a stage's set-up signature)
    """The report's judge: the embedded attribute probe (``taiyi-mini-probe``), copied to ``OUT/probe``.

    A judge that is the same for every run (as FID's Inception network is) makes runs comparable with each
    other and with ``taiyi eval faithfulness``, whose default it is; the probe is the recipe's own
    (``taiyi recipe probe``; ``--train-probe`` trains one inside the run instead), so nothing outside the
    project judges.

    Raises:
        InvalidInputError: this installation has no embedded probe, it judges pictures of another size than
            the preset's, or ``OUT/probe`` holds an unfinished probe of an earlier ``--train-probe`` run.
    """
    from ..io import atomic_folder
    from ..models import bundled_model
    from .probe import CONFIG_NAME, WEIGHTS_NAME, AttributeProbe

    source = bundled_model(EMBEDDED_PROBE)
    if source is None:
        raise InvalidInputError(f"this installation has no embedded {EMBEDDED_PROBE}; run with --train-probe")
    size = AttributeProbe.from_pretrained(source).size
    if size != preset.size:
        raise InvalidInputError(
            f"the embedded {EMBEDDED_PROBE} judges {size}-px pictures, the preset draws {preset.size}-px ones; "
            "run with --train-probe"
        )
    target = out / "probe"
    if target.exists():
        raise InvalidInputError(
            f"{target} holds an unfinished probe of an earlier run; continue it with --train-probe, or remove it"
        )
    with atomic_folder(target) as tmp:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(source / name, tmp / name)
    return target


def write_clip_config(out: Path, preset, config) -> Path:
    """The English CLIP's sizes (``taiyi train clip --from-config``): text and image towers from the preset."""
    heads, vision_heads = max(preset.text_width // 32, 1), max(preset.vision_width // 32, 1)
    settings = {
        "projection_dim": preset.projection,
        "text_config": {"hidden_size": preset.text_width, "intermediate_size": 4 * preset.text_width,
                        "num_hidden_layers": preset.text_layers, "num_attention_heads": heads,
                        "max_position_embeddings": 77},
        "vision_config": {"hidden_size": preset.vision_width, "intermediate_size": 4 * preset.vision_width,
                          "num_hidden_layers": preset.vision_layers, "num_attention_heads": vision_heads,
                          "image_size": preset.size, "patch_size": 8},
    }  # fmt: skip
    target = out / "init" / "clip-en.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target, settings)
    return target


def init_text_tower(out: Path, preset, config) -> Path:
    """A random Chinese text tower in the published Taiyi-CLIP layout (``BertForSequenceClassification``,
    21128-token vocabulary, logits = features), as wide as the English text tower so that it can later
    replace it in the English SD."""
    from transformers import BertConfig, BertForSequenceClassification

    from ..tokenization import save_bert_tokenizer_folder

    target = out / "init" / "text-tower"
    if (target / "model.safetensors").is_file():
        return target
    torch.manual_seed(config.seed)  # transformers initialises from the global generator
    bert_config = BertConfig(
        vocab_size=21128,
        hidden_size=preset.text_width,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=max(preset.text_width // 32, 1),
        intermediate_size=4 * preset.text_width,
        max_position_embeddings=512,
        num_labels=preset.projection,
    )
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    BertForSequenceClassification(bert_config).eval().save_pretrained(tmp, safe_serialization=True)
    save_bert_tokenizer_folder(tmp, max_length=preset.text_max_length)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def unet_config(preset) -> dict:
    """The miniature SD v1 UNet: latents of side size/4, cross-attention at every level (16×16 included)."""
    n = len(preset.unet_channels)
    return {
        "sample_size": preset.size // 4,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": list(preset.unet_channels),
        "layers_per_block": preset.unet_layers,
        "down_block_types": ["CrossAttnDownBlock2D"] * n,
        "up_block_types": ["CrossAttnUpBlock2D"] * n,
        "cross_attention_dim": preset.text_width,
        "attention_head_dim": [max(c // 32, 1) for c in preset.unet_channels],
        "norm_num_groups": 16,
    }


def scheduler_config() -> dict:
    """SD v1's noise schedule made to reach pure noise (zero terminal SNR) with v-prediction, sampled
    with trailing timesteps: the standard schedule never hides an image's mean brightness, so a model
    trained on it cannot draw a truly dark night or a pale dawn (Lin et al., 2023)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "steps_offset": 1,
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "final_sigmas_type": "zero",
    }


def init_english_sd(out: Path, preset, config) -> Path:
    """The untrained "English SD": a random UNet, the trained VAE and the English CLIP's text tower."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..assemble import write_pipeline_folder

    target = out / "init" / "sd-en"
    if (target / "model_index.json").is_file():
        return target
    clip_folder = out / "clip-en" / "final"
    text_folder = clip_folder / "text_encoder" if (clip_folder / "text_encoder").is_dir() else clip_folder
    tok_folder = clip_folder / "tokenizer" if (clip_folder / "tokenizer").is_dir() else clip_folder
    text_encoder = CLIPTextModel.from_pretrained(text_folder, use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(tok_folder)
    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel(**unet_config(preset))
    scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config())
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_pipeline_folder(
        target,
        unet=unet,
        vae=out / "vae" / "final",
        scheduler=scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        overwrite=True,
    )
