"""Put a Chinese CLIP text tower into an English SD v1 pipeline (the first step of Taiyi SD, TAIYI.md §1).

``assemble(base, text_encoder, out)`` writes a new diffusers pipeline folder in the published
Taiyi-Stable-Diffusion-1B-Chinese layout::

    model_index.json   text_encoder ["transformers", "BertModel"], tokenizer ["transformers", "BertTokenizer"]
    unet/ vae/ scheduler/   copied file for file from the SD v1 base (bit-identical)
    text_encoder/      the Chinese CLIP text tower's BERT body, without its projection head, as BertModel
    tokenizer/         BertTokenizer: vocab.txt (21128 tokens), model_max_length 512

Prompt embeddings are the BERT body's last hidden state, so its width must equal the UNet's
cross-attention width (768 for SD v1; the Taiyi-CLIP base towers are 768 wide).

The safety checker and feature extractor are dropped: the English checker judges images, not text,
and Taiyi users found it blanking harmless outputs (TAIYI.md §5); ``taiyi generate`` runs without it.

:func:`write_pipeline_folder` is the one writer of pipeline folders: ``taiyi train sd`` exports
``final/`` with it too (components given as modules are saved, components given as folders are copied).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Annotated

import typer

from .errors import InvalidInputError, ModelLoadError
from .io import atomic_folder

logger = logging.getLogger("taiyi")

TOKENIZER_MAX_LENGTH = 512  # the published Taiyi SD tokenizer pads prompts to 512


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


def load_text_tower(source: str | os.PathLike, *, allow_pickle: bool = False, max_length: int = TOKENIZER_MAX_LENGTH):
    """The BERT body (``BertModel``, no projection head) and tokenizer of a Chinese CLIP text tower.

    Args:
        source: a taiyi Chinese CLIP folder (``ChineseCLIP.save_pretrained``), or a Taiyi-CLIP text tower
            (short name, hub id or folder in the published layout).
        allow_pickle: accept pickled ``.bin`` weights (the published Taiyi-CLIP repos ship them).
        max_length: the tokenizer's prompt length (the published Taiyi SD pads to 512).

    Returns:
        ``(bert_model, tokenizer)``: a ``BertForSequenceClassification`` gives its ``.bert``; a
        ``BertModel`` is taken whole.
    """
    from transformers import AutoConfig, BertForSequenceClassification, BertModel

    from .clip import CLASS_NAME, text_head_of
    from .loading import check_weights
    from .models import resolve_model
    from .tokenization import check_tokenizer, load_chinese_tokenizer

    folder, _ = resolve_model(source)
    folder = Path(folder)
    config_path = folder / "config.json"
    text_folder, tok_folder = folder, folder
    if config_path.is_file() and f'"{CLASS_NAME}"' in config_path.read_text(encoding="utf-8", errors="replace"):
        text_folder, tok_folder = folder / "text_encoder", folder / "tokenizer"
    if not (text_folder / "config.json").is_file():
        raise ModelLoadError(
            f"{text_folder} has no config.json; give a Chinese CLIP folder or a Taiyi-CLIP text tower"
        )
    check_weights(text_folder, allow_pickle=allow_pickle)
    try:
        config = AutoConfig.from_pretrained(text_folder)
        if getattr(config, "model_type", "") != "bert":
            raise InvalidInputError(
                f"{source} holds a {config.model_type!r} model, not a BERT text tower; give a Chinese CLIP text tower"
            )
        use_st = None if allow_pickle else True
        if text_head_of(config) == "logits":
            bert = BertForSequenceClassification.from_pretrained(text_folder, use_safetensors=use_st).bert
        else:
            bert = BertModel.from_pretrained(text_folder, use_safetensors=use_st)
        tokenizer = load_chinese_tokenizer(tok_folder, max_length=max_length)
    except (InvalidInputError, ModelLoadError):
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load the text tower in {text_folder}: {_first_line(exc)}") from exc
    tokenizer.model_max_length = max_length
    check_tokenizer(tokenizer, bert, where=str(text_folder))
    return bert.eval(), tokenizer


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """BERT tokenizers in the published layout (vocab.txt); others (CLIP BPE) as transformers saves them."""
    from .tokenization import save_tokenizer_as_folder

    if type(tokenizer).__name__.startswith("BertTokenizer"):
        save_tokenizer_as_folder(tokenizer, folder, max_length=tokenizer.model_max_length)
    else:
        tokenizer.save_pretrained(folder)


def _library_of(obj) -> str:
    return "transformers" if type(obj).__module__.startswith("transformers") else "diffusers"


def _skip_pickles(folder: str, names: list[str]) -> list[str]:
    """``copytree``'s ignore: pickled weights beside safetensors ones (hub repos of 2022 hold both) stay behind."""
    from .loading import PICKLE_SUFFIXES

    if not any(n.endswith(".safetensors") for n in names):
        return []
    return [n for n in names if n.endswith(PICKLE_SUFFIXES)]


def _load_pickled_part(folder: Path):
    """A diffusers model whose folder holds only pickled weights (the caller allowed them), to save as safetensors."""
    import diffusers

    class_name = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name", "")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ModelLoadError(f"{folder} holds a {class_name or 'model without _class_name'}, not a diffusers model")
    try:
        return cls.from_pretrained(folder, use_safetensors=False)
    except Exception as exc:
        raise ModelLoadError(f"could not load {folder}: {_first_line(exc)}") from exc


def write_pipeline_folder(
    out: str | os.PathLike,
    *,
    unet,
    vae,
    scheduler,
    text_encoder,
    tokenizer,
    overwrite: bool = False,
) -> Path:
    """Write a Stable Diffusion pipeline folder atomically (a temporary folder, then one rename).

    Args:
        out: the folder to create.
        unet, vae, scheduler: a module / scheduler object to save, or the folder of one to copy unchanged (its
            pickled weights left behind when it has safetensors ones).
        text_encoder: the text encoder module (``BertModel`` or ``CLIPTextModel``).
        tokenizer: its tokenizer (BERT ones are saved in the published ``vocab.txt`` layout).
        overwrite: replace an existing ``out``.

    Raises:
        InvalidInputError: ``out`` exists and ``overwrite`` is off, or its parent folder is missing.
    """
    import diffusers

    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise InvalidInputError(f"{out} already exists; pass --overwrite to replace it or choose a new --out")
    if not out.parent.is_dir():
        raise InvalidInputError(f"output folder {out.parent} does not exist; create it first")
    index: dict = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__}
    with atomic_folder(out) as tmp:
        for name, part in (("unet", unet), ("vae", vae), ("scheduler", scheduler)):
            if isinstance(part, str | os.PathLike):
                shutil.copytree(part, tmp / name, ignore=_skip_pickles)
                config_name = "scheduler_config.json" if name == "scheduler" else "config.json"
                class_name = json.loads((tmp / name / config_name).read_text(encoding="utf-8"))["_class_name"]
                index[name] = ["diffusers", class_name]
            else:
                part.save_pretrained(tmp / name, **({} if name == "scheduler" else {"safe_serialization": True}))
                index[name] = ["diffusers", type(part).__name__]
        text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        _save_tokenizer(tokenizer, tmp / "tokenizer")
        index["text_encoder"] = [_library_of(text_encoder), type(text_encoder).__name__]
        tok_class = type(tokenizer).__name__.removesuffix("Fast")
        index["tokenizer"] = ["transformers", tok_class]
        index["safety_checker"] = [None, None]
        index["feature_extractor"] = [None, None]
        index["requires_safety_checker"] = False
        (tmp / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2), encoding="utf-8")
    return out


def cross_attention_dim(unet_config: dict) -> int:
    dim = unet_config.get("cross_attention_dim")
    if isinstance(dim, list | tuple):  # per-block widths (SDXL-style configs); SD v1 has one
        dim = dim[0]
    return int(dim)


def check_text_width(text_width: int, cross_dim: int, text_name: str, unet_name: str) -> None:
    """Raise one line when the text encoder's width is not the UNet's cross-attention width."""
    if text_width != cross_dim:
        raise InvalidInputError(
            f"text encoder {text_name} is {text_width} wide but the UNet of {unet_name} cross-attends to "
            f"{cross_dim}-d embeddings; pick a text tower of width {cross_dim} (SD v1: a 768-wide base tower)"
        )


def assemble(
    base: str | os.PathLike,
    text_encoder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    max_length: int = TOKENIZER_MAX_LENGTH,
) -> Path:
    """Build a Chinese SD pipeline: UNet, VAE and scheduler of ``base``, text encoder of a Chinese CLIP.

    Args:
        base: an SD v1 pipeline folder (or short name / hub id in the local cache).
        text_encoder: a taiyi Chinese CLIP folder, or a Taiyi-CLIP text tower (short name, hub id or folder).
        out: the pipeline folder to write (atomically).
        overwrite: replace an existing ``out``.
        allow_pickle: accept pickled ``.bin`` weights in the text tower.
        max_length: prompt length in tokens (512 as published; short prompts make small models faster).

    Returns:
        ``out``, which loads with :func:`taiyi.load_pipeline` and ``taiyi generate --model``.

    Raises:
        ModelLoadError: ``base`` is not a pipeline folder with unet/vae/scheduler, or the tower does not load.
        InvalidInputError: the widths differ, or ``out`` exists without ``overwrite``.
    """
    from .loading import check_weights, read_model_index
    from .models import resolve_model

    out = Path(out).expanduser()
    if out.exists() and not overwrite:  # before any loading: fail fast
        raise InvalidInputError(f"{out} already exists; pass --overwrite to replace it or choose a new --out")
    base_folder, base_name = resolve_model(base)
    base_folder = Path(base_folder)
    read_model_index(base_folder)
    for sub in ("unet", "vae", "scheduler"):
        if not (base_folder / sub).is_dir():
            raise ModelLoadError(f"{base_folder} has no {sub}/ folder; give a Stable Diffusion v1 pipeline folder")
    parts: dict = {}
    for sub in ("unet", "vae"):
        safe = check_weights(base_folder / sub, allow_pickle=allow_pickle, what=f"component {sub!r} in {base_folder}")
        parts[sub] = base_folder / sub if safe else None
    unet_config = json.loads((base_folder / "unet" / "config.json").read_text(encoding="utf-8"))
    if not 8 <= max_length <= 512:
        raise InvalidInputError(f"--max-length must be between 8 and 512 tokens, not {max_length}")
    bert, tokenizer = load_text_tower(text_encoder, allow_pickle=allow_pickle, max_length=max_length)
    check_text_width(bert.config.hidden_size, cross_attention_dim(unet_config), str(text_encoder), base_name)
    for sub, part in parts.items():  # pickled ones (allowed) are written as safetensors: the result loads as is
        parts[sub] = part or _load_pickled_part(base_folder / sub)
    written = write_pipeline_folder(
        out,
        unet=parts["unet"],
        vae=parts["vae"],
        scheduler=base_folder / "scheduler",
        text_encoder=bert,
        tokenizer=tokenizer,
        overwrite=overwrite,
    )
    logger.info("assembled %s: UNet/VAE/scheduler of %s, text encoder of %s", written, base_name, text_encoder)
    return written


def assemble_command(
    base: Annotated[str, typer.Option("--base", help="SD v1 pipeline (folder, short name or hub id).")],
    text_encoder: Annotated[
        str, typer.Option("--text-encoder", help="Chinese CLIP folder, or Taiyi-CLIP text tower (name, id, folder).")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Pipeline folder to write.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept pickled .bin weights.")] = False,
    max_length: Annotated[
        int, typer.Option("--max-length", help="Prompt length in tokens (the published Taiyi SD: 512).")
    ] = TOKENIZER_MAX_LENGTH,
) -> None:
    """Chinese SD: UNet, VAE and scheduler of an SD v1 pipeline + a Chinese CLIP text tower (BERT body).

    The result loads with taiyi generate --model OUT; align it with taiyi train sd --stage 1.
    """
    from .cli import _quiet_libraries

    _quiet_libraries()  # loading bars on stderr would make an error two lines
    written = assemble(base, text_encoder, out, overwrite=overwrite, allow_pickle=allow_pickle, max_length=max_length)
    typer.echo(str(written))


__all__ = ["assemble", "assemble_command", "check_text_width", "load_text_tower", "write_pipeline_folder"]
