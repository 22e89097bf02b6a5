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
# a repo's page as copied from the browser: https://huggingface.co/ORG/NAME[/tree/REVISION]
_HUB_URL = re.compile(
    r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<id>[^/@\s]+/[^/@\s]+)(?:/tree/(?P<rev>[^/\s]+))?/?$"
)


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


def _cached_repo_dir(repo_id: str) -> Path | None:
    """The cache folder ``models--ORG--NAME`` of ``repo_id``; hub ids are case-insensitive, cache folder names
    are not, so ``idea-ccnl/taiyi-...`` finds what was downloaded as ``IDEA-CCNL/Taiyi-...``."""
    cache = Path(hub_cache_dir())
    name = "models--" + repo_id.replace("/", "--")
    if (cache / name).is_dir():
        return cache / name
    try:
        return next((d for d in cache.iterdir() if d.name.lower() == name.lower() and d.is_dir()), None)
    except OSError:
        return None


def cached_revisions(repo_id: str) -> list[str]:
    """The branches and tags of ``repo_id`` recorded in the hub cache (``refs/``)."""
    repo_dir = _cached_repo_dir(repo_id)
    refs = repo_dir / "refs" if repo_dir else None
    if refs is None or not refs.is_dir():
        return []
    return sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file())


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder of ``repo_id`` (at ``revision``: a branch, tag or commit; default main) in the
    hub cache, or None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_dir = _cached_repo_dir(repo_id)
    if repo_dir is None:
        return None
    repo_id = repo_dir.name.removeprefix("models--").replace("--", "/", 1)  # as the cache spells it
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def split_revision(model: str) -> tuple[str, str | None]:
    """``ORG/NAME@REVISION`` (or the repo's hub URL) → ``(ORG/NAME, REVISION)``; anything else → ``(model, None)``."""
    url = _HUB_URL.match(model)
    if url:
        return url["id"], url["rev"]
    head, sep, revision = model.rstrip("/").partition("@")
    if sep and revision and _HUB_ID.match(head):
        return head, revision
    return model.rstrip("/") if _HUB_ID.match(model.rstrip("/")) else model, None


def cache_repo_snapshot(folder: Path) -> Path | None:
    """The snapshot of a hub cache repo folder (``.../hub/models--ORG--NAME``) given where a model folder was
    expected: the one ``refs/main`` names, else the only one; None for other folders."""
    snapshots = folder / "snapshots"
    if not (folder.name.startswith("models--") and snapshots.is_dir()):
        return None
    main = folder / "refs" / "main"
    if main.is_file() and (snapshots / main.read_text(encoding="utf-8").strip()).is_dir():
        return snapshots / main.read_text(encoding="utf-8").strip()
    found = [d for d in snapshots.iterdir() if d.is_dir()]
    return found[0] if len(found) == 1 else None


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
        model: a short name (``taiyi-zh``), a hub id (``IDEA-CCNL/...``, ``ID@REVISION`` for a branch, tag or
            commit, or the repo's huggingface.co URL) or a local folder (a hub cache repo folder
            ``models--ORG--NAME`` means its snapshot).

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
            single = path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
            raise ModelLoadError(
                f"{text} is a file, not a model folder; pass the folder that holds model_index.json"
                + (" (single-file checkpoints are not loaded: convert one with diffusers' from_single_file)"
                   if single else "")
            )  # fmt: skip
        snapshot = cache_repo_snapshot(path)
        if snapshot is not None:  # the hub cache's folder of a repo: its downloaded snapshot
            return snapshot, text
        return path, text
    short, _, short_revision = text.partition("@")  # taiyi-zh@REVISION: a revision of a short name's repo
    info = KNOWN_MODELS.get(text.lower())
    if info is None and short_revision and short.lower() in KNOWN_MODELS:
        info = KNOWN_MODELS[short.lower()]
        if info.bundled:
            raise ModelLoadError(f"{info.name} is embedded in taiyi and has no revisions; pass --model {info.name}")
    if info is not None and info.bundled:
        folder = bundled_model(info.name)
        if folder is None:
            raise ModelLoadError(
                f"{info.name} is not in this installation ({bundled_dir()}); build it with taiyi recipe mini "
                f"--out runs/mini and pass --model runs/mini/models/{info.name}, or install it with taiyi recipe ship"
            )
        return folder, info.name
    repo_id, revision = (info.repo_id, short_revision or None) if info else split_revision(text)
    if not _HUB_ID.match(repo_id) or text.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"model folder {text} does not exist (and it is not a hub id or one of: {', '.join(KNOWN_MODELS)})"
        )
    display = f"{repo_id}@{revision}" if revision else repo_id
    snapshot = cached_snapshot(repo_id, revision)
    if snapshot is not None:
        repo_id = snapshot.parents[1].name.removeprefix("models--").replace("--", "/", 1)  # the hub's spelling
        return snapshot, f"{repo_id}@{revision}" if revision else repo_id
    if hub_offline():
        at = f" --revision {revision}" if revision else ""
        others = [r for r in cached_revisions(repo_id) if r != (revision or "main")]
        if others:  # downloaded at another branch (diffusers' old revision="fp16") or commit
            raise ModelLoadError(
                f"{display} is not in the Hugging Face cache ({hub_cache_dir()}) but revision {others[0]} is; pass "
                f"--model {repo_id}@{others[0]}, or download it once with network access (hf download {repo_id}{at})"
            )
        raise ModelLoadError(
            f"{display} is not in the Hugging Face cache ({hub_cache_dir()}) and HF_HUB_OFFLINE is set; "
            f"download it once with network access (hf download {repo_id}{at}) or pass a local folder"
        )
    from huggingface_hub import snapshot_download

    try:
        # Skip the formats a diffusers pipeline never reads (Flax, TF, ONNX, single-file checkpoints).
        ignore = ["*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.ckpt", "*.pb"]
        folder = snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(), ignore_patterns=ignore)
        return Path(folder), display
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        first = textwrap.shorten(" ".join(str(exc).split()), 200, placeholder=" …") or type(exc).__name__
        raise ModelLoadError(
            f"could not download {display} ({first}); check the network, or pass a local folder"
        ) from exc


def list_models() -> list[tuple[ModelInfo, Path | None]]:
    """Every known short name with its local folder: the embedded copy, or the cached hub snapshot (None when
    not available offline)."""
    return [
        (info, bundled_model(info.name) if info.bundled else cached_snapshot(info.repo_id))
        for info in KNOWN_MODELS.values()
    ]
