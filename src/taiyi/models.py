"""Model names and where they come from: short names, hub ids resolved offline, local folders."""

from __future__ import annotations

import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError


@dataclass(frozen=True)
class ModelInfo:
    name: str  # short name accepted by --model
    repo_id: str  # Hugging Face hub id
    kind: str  # "sd" (text-to-image pipeline) or "clip" (text tower)
    description: str
    guidance: float | None = None  # the model card's recommended CFG scale
    image_tower: str | None = None  # CLIP text towers: the public CLIP image model they were aligned to
    bundled: bool = False  # the embedded models: shipped inside the package (taiyi/weights/NAME), no hub id


KNOWN_MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in [
        ModelInfo(
            "taiyi-zh",
            "IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-v0.1",
            "sd",
            "Chinese SD v1 (BERT text encoder)",
            7.5,
        ),
        ModelInfo(
            "taiyi-zh-en",
            "IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-EN-v0.1",
            "sd",
            "Chinese-English SD v1 (CLIP text encoder)",
            10.0,
        ),
        ModelInfo(
            "taiyi-clip-b32",
            "IDEA-CCNL/Taiyi-CLIP-Roberta-102M-Chinese",
            "clip",
            "RoBERTa-base + ViT-B/32",
            image_tower="openai/clip-vit-base-patch32",
        ),
        ModelInfo(
            "taiyi-clip-l14",
            "IDEA-CCNL/Taiyi-CLIP-Roberta-large-326M-Chinese",
            "clip",
            "RoBERTa-large + ViT-L/14",
            image_tower="openai/clip-vit-large-patch14",
        ),
        ModelInfo(
            "taiyi-clip-vitl",
            "IDEA-CCNL/Taiyi-CLIP-RoBERTa-102M-ViT-L-Chinese",
            "clip",
            "RoBERTa-base + ViT-L/14",
            image_tower="openai/clip-vit-large-patch14",
        ),
        ModelInfo(
            "taiyi-clip-vith",
            "IDEA-CCNL/Taiyi-CLIP-RoBERTa-326M-ViT-H-Chinese",
            "clip",
            "RoBERTa-large + ViT-H/14",
            image_tower="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        ),
        *(
            ModelInfo(name, "", kind, description, guidance, bundled=True)
            for name, kind, description, guidance in (
                ("taiyi-mini-zh", "sd", "embedded Chinese SD of the 山水 world (taiyi recipe mini)", 7.5),
                ("taiyi-mini-zh-en", "sd", "embedded bilingual SD of the 山水 world (taiyi recipe mini)", 7.5),
                ("taiyi-mini-clip", "clip", "embedded Chinese CLIP of the 山水 world (taiyi recipe mini)", None),
                ("taiyi-mini-uncond", "uncond", "embedded unconditional model for taiyi disco", None),
                ("taiyi-mini-probe", "probe", "the attribute probe that judges 山水 pictures", None),
            )
        ),
    ]
}

DEFAULT_MODEL = "taiyi-mini-zh"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set now (huggingface_hub reads it only once, at import)."""
    from huggingface_hub import constants

    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    """The hub cache folder as the environment says now (``HF_HUB_CACHE`` > ``HF_HOME/hub``)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of ``repo_id`` in the hub cache, or None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=hub_cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def bundled_dir() -> Path:
    """Where the embedded models live: ``$TAIYI_WEIGHTS`` if set, else the package's ``weights/`` folder."""
    return Path(os.environ.get("TAIYI_WEIGHTS") or Path(__file__).parent / "weights")


def bundled_model(name: str) -> Path | None:
    """The folder of an embedded model, or None when this installation does not hold it."""
    folder = bundled_dir() / name
    return folder if folder.is_dir() else None


def resolve_model(model: str | os.PathLike) -> tuple[Path, str]:
    """Turn what the user passed as ``--model`` into a local folder.

    Args:
        model: a short name (``taiyi-zh``), a hub id (``IDEA-CCNL/...``) or a local folder.

    Returns:
        ``(folder, display_name)``; the display name is what image metadata records.

    Raises:
        ModelLoadError: the folder does not exist, or a hub id is neither cached nor downloadable.
    """
    text = os.fspath(model).strip()
    if not text:
        raise ModelLoadError(
            "no model given; pass --model with a folder, a hub id or one of: " + ", ".join(KNOWN_MODELS)
        )
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{text} is a file, not a model folder; pass the folder that holds model_index.json")
        return path, text
    info = KNOWN_MODELS.get(text.lower())
    if info is not None and info.bundled:
        folder = bundled_model(info.name)
        if folder is None:
            raise ModelLoadError(
                f"{info.name} is not in this installation ({bundled_dir()}); build it with taiyi recipe mini "
                f"--out runs/mini and pass --model runs/mini/models/{info.name}, or install it with taiyi recipe ship"
            )
        return folder, info.name
    repo_id = info.repo_id if info else text
    if not _HUB_ID.match(repo_id) or text.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"model folder {text} does not exist (and it is not a hub id or one of: {', '.join(KNOWN_MODELS)})"
        )
    snapshot = cached_snapshot(repo_id)
    if snapshot is not None:
        return snapshot, repo_id
    if hub_offline():
        raise ModelLoadError(
            f"{repo_id} is not in the Hugging Face cache ({hub_cache_dir()}) and HF_HUB_OFFLINE is set; "
            f"download it once with network access (hf download {repo_id}) or pass a local folder"
        )
    from huggingface_hub import snapshot_download

    try:
        # Skip the formats a diffusers pipeline never reads (Flax, TF, ONNX, single-file checkpoints).
        ignore = ["*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.ckpt", "*.pb"]
        return Path(snapshot_download(repo_id, cache_dir=hub_cache_dir(), ignore_patterns=ignore)), repo_id
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        first = textwrap.shorten(" ".join(str(exc).split()), 200, placeholder=" …") or type(exc).__name__
        raise ModelLoadError(
            f"could not download {repo_id} ({first}); check the network, or pass a local folder"
        ) from exc


def list_models() -> list[tuple[ModelInfo, Path | None]]:
    """Every known short name with its local folder: the embedded copy, or the cached hub snapshot (None when
    not available offline)."""
    return [
        (info, bundled_model(info.name) if info.bundled else cached_snapshot(info.repo_id))
        for info in KNOWN_MODELS.values()
    ]
