"""``taiyi train clip``: locked-image training of a Chinese CLIP (the Taiyi-CLIP / LiT recipe).

A Chinese text tower learns to land in the space of a *frozen* CLIP image tower (TAIYI.md §1, §3):

- the image tower is in eval mode with ``requires_grad_(False)`` and is not in the optimizer; since it
  never changes, each sample's image feature is computed once and cached on disk (safetensors, keyed
  by a fingerprint of the data and the tower) and reused by every epoch and by a resumed run;
  ``unfreeze_image_tower`` trains it too (Chinese-CLIP style) and turns the cache off;
- the loss is symmetric InfoNCE over the *global* batch: features are all-gathered across processes
  with the gradient flowing back to each process's own slice, so N processes compute exactly the loss
  (and gradients) of one process given the whole batch; logits = ``exp(logit_scale).clamp(max=100)`` ×
  cosine;
- AdamW (no weight decay on biases, norms and the logit scale), linear warm-up then cosine decay,
  gradient accumulation, mixed precision on GPU and gradient checkpointing, all through accelerate;
- every ``val_every`` steps, text→image and image→text R@1/5/10 on a held-out split;
- checkpoints are written atomically every ``save_every`` steps and ``resume`` continues exactly: the
  step counter, optimizer, LR schedule, RNG states and the position in the (seeded) data order.

From scratch (``new_clip`` / ``--new-clip``, or ``from_config`` / ``--from-config CONFIG.json``; recipe
stage (a), the stand-in for OpenAI CLIP): a byte-level BPE tokenizer is first learned from the training
captions (:func:`taiyi.recipe.tokenizer.train_clip_tokenizer`, saved as ``OUTPUT/tokenizer``), then a
transformers ``CLIPModel`` of the miniature sizes (:data:`MINIATURE_CLIP`, overridden by the JSON) is
built and *both* towers and the logit scale are trained by the same loop (no cache; lr 5e-4 unless
given). ``final/`` is then a standard CLIP folder (see :mod:`taiyi.clip`): ``CLIPModel.from_pretrained``,
``--image-tower`` of a Chinese run, and ``text_encoder/`` + ``tokenizer/`` for Stable Diffusion v1.

``batch_size`` is the *global* batch of one micro-step (all processes together; each process takes
``batch_size / num_processes`` of it), so the data order and the loss do not depend on how many
processes run. Run it as a plain process or under ``accelerate launch`` (configs in
``configs/accelerate/``); the output folder is described in :mod:`taiyi.train.common`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..clip import MAX_LOGIT_SCALE, ChineseCLIP
from ..errors import InvalidInputError
from .common import (
    LOGS,
    METRICS,
    MIXED_PRECISION,
    MetricsLog,
    StopOnSignal,
    check_fp16_device,
    check_launch,
    list_checkpoints,
    load_checkpoint,
    record_run,
    remove_partial_checkpoints,
    resolve_resume,
    seed_check,
    step_dir_name,
    use_cpu,
)
from .common import check_output_dir as _check_output_dir
from .synthetic import SyntheticPairs, parse_synthetic

logger = logging.getLogger("taiyi")

CACHE_VERSION = "1"
CACHE_BARRIER_SECONDS = 6 * 3600  # how long processes wait for the main one to encode a cache (process group timeout)
TOKENIZER = "tokenizer"  # the learned tokenizer of a from-scratch run, inside the output folder
LR = 1e-5  # Taiyi-CLIP (TAIYI.md §3)
LR_NEW_CLIP = 5e-4  # from scratch: both towers, small widths
# Recipe stage (a): a CLIP small enough to train on the 山水 world in minutes on a CPU core.
MINIATURE_CLIP: dict = {
    "projection_dim": 128,
    "text_config": {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,  # SD v1 pads prompts to 77 tokens
    },
    "vision_config": {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 8,
    },
}
# Settings that may change between a run and its resumption without changing what it computes.
RESUMABLE_CHANGES = (
    "output",
    "resume",
    "overwrite",
    "val_every",
    "val_max",
    "save_every",
    "keep_checkpoints",
    "report_to",
    "log_every",
    "num_workers",
    "cache_dir",
    "allow_pickle",
    "cpu",
)


@dataclass
class ClipTrainConfig:
    """Settings of one ``taiyi train clip`` run (the CLI flags map one to one onto these).

    Args:
        data: training pairs: ``synthetic:N``, a folder of ``x.jpg`` + ``x.txt``, a CSV/JSONL file or
            WebDataset tar shards (see :func:`taiyi.data.open_pairs`).
        output: the run's folder (checkpoints, metrics, logs, ``final/``, ``taiyi-text-tower/``).
        text_tower: Taiyi-CLIP text tower to start from (short name, hub id or folder).
        new_clip: train an English-style CLIP from scratch, both towers, with a BPE tokenizer learned from
            the training captions (:data:`MINIATURE_CLIP` sizes).
        from_config: a JSON file of ``CLIPConfig`` settings laid over :data:`MINIATURE_CLIP` (e.g.
            ``{"vision_config": {"image_size": 32}}``); implies ``new_clip``.
        vocab_size: tokens of the learned tokenizer (512 byte symbols + merges + 2 special tokens).
        image_tower: CLIP image model (hub id or folder); default: the one the text tower was aligned to.
        init_from: a taiyi Chinese CLIP folder (``ChineseCLIP.save_pretrained``) to start from instead.
        allow_pickle: accept pickled ``.bin`` weights (the published Taiyi-CLIP repos ship them).
        image_column, caption_column: CSV columns / JSONL fields of image paths and captions.
        negative_column: CSV column / JSONL field of each row's hard-negative caption (NegCLIP): a caption
            that does not describe the row's image, scored against every image of the batch in the
            image→text term. Rows without one are left out of training.
        val_data: held-out pairs for validation; by default ``val_fraction`` of ``data`` is held out.
        val_fraction: share of ``data`` held out for validation (0 with no ``val_data``: no validation).
        val_max: at most this many validation pairs (retrieval among 1000 is the usual benchmark size).
        val_every: validate every N steps (0: only before training and at the end).
        batch_size: global batch of one micro-step, all processes together (a multiple of their number).
        grad_accum: micro-steps per optimizer step.
        lr, weight_decay, betas, eps: AdamW (Taiyi: lr 1e-5, weight decay 0.1); ``lr`` None: 1e-5, or 5e-4
            from scratch.
        warmup_steps: linear warm-up steps before the cosine decay (default: 1 % of the steps).
        max_steps: optimizer steps to train (default: ``epochs`` passes over the data).
        epochs: passes over the data when ``max_steps`` is not given.
        max_grad_norm: clip the gradient norm to this (None: no clipping).
        mixed_precision: ``auto`` (bf16/fp16 on a GPU, none on CPU, or what ``accelerate launch`` says),
            ``no``, ``fp16`` or ``bf16``.
        gradient_checkpointing: recompute the text tower's activations in the backward pass.
        unfreeze_image_tower: train the image tower too (Chinese-CLIP style); off in the Taiyi recipe.
        cache_image_features: compute frozen image features once (default: on when the tower is frozen).
        cache_dir: where cached features live (default ``output/cache``); a shared folder lets runs reuse them.
        save_every: checkpoint every N steps (0: only at the end).
        keep_checkpoints: keep the newest K checkpoints.
        resume: ``latest`` or a checkpoint folder; continues that run exactly.
        overwrite: start afresh in an output folder that holds another run.
        report_to: accelerate tracker (``tensorboard``, ``wandb`` ...), ``none``, or ``auto``
            (TensorBoard when installed).
        log_every: console log line every N steps (metrics.jsonl gets every step).
        num_workers: DataLoader worker processes that decode and preprocess images.
        seed: seeds the data order, the validation split and dropout.
        cpu: train on the CPU even where a GPU is available.
    """

    data: str
    output: str
    text_tower: str | None = None
    new_clip: bool = False
    from_config: str | None = None
    vocab_size: int = 1024
    image_tower: str | None = None
    init_from: str | None = None
    allow_pickle: bool = False
    image_column: str = "image"
    caption_column: str = "caption"
    negative_column: str | None = None
    val_data: str | None = None
    val_fraction: float = 0.05
    val_max: int = 1000
    val_every: int = 500
    batch_size: int = 64
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int | None = None
    max_steps: int | None = None
    epochs: int = 1
    max_grad_norm: float | None = None
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    unfreeze_image_tower: bool = False
    cache_image_features: bool | None = None
    cache_dir: str | None = None
    save_every: int = 1000
    keep_checkpoints: int = 3
    resume: str | None = None
    overwrite: bool = False
    report_to: str = "auto"
    log_every: int = 10
    num_workers: int = 0
    seed: int = 0
    cpu: bool = False

    def to_json(self) -> dict:
        """The settings as JSON values (what ``run_config.json`` records)."""
        return json.loads(json.dumps(asdict(self), default=str))

    @property
    def from_scratch(self) -> bool:
        """Both towers are built new (``new_clip`` or ``from_config``)."""
        return self.new_clip or self.from_config is not None

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return LR_NEW_CLIP if self.from_scratch else LR


def new_clip_config(from_config: str | None = None):
    """The ``CLIPConfig`` of a from-scratch run: :data:`MINIATURE_CLIP` with ``from_config``'s JSON laid over it.

    Raises:
        InvalidInputError: the file is missing or not a JSON object, or the sizes do not fit together.
    """
    from transformers import CLIPConfig

    settings = json.loads(json.dumps(MINIATURE_CLIP))
    if from_config is not None:
        path = Path(from_config)
        try:
            given = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidInputError(
                f"--from-config {from_config} does not exist; give a CLIP config JSON file"
            ) from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InvalidInputError(f"--from-config {from_config} is not readable JSON ({exc})") from None
        if not isinstance(given, dict):
            raise InvalidInputError(f"--from-config {from_config} must hold a JSON object of CLIPConfig settings")
        for key, value in given.items():
            if key in ("text_config", "vision_config"):
                if not isinstance(value, dict):
                    raise InvalidInputError(f"--from-config {from_config}: {key} must be a JSON object")
                settings[key].update(value)
            else:
                settings[key] = value
    text, vision = settings["text_config"], settings["vision_config"]
    for name, tower in (("text", text), ("vision", vision)):
        width, heads = tower.get("hidden_size"), tower.get("num_attention_heads")
        if not all(isinstance(v, int) and v > 0 for v in (width, heads)) or width % heads:
            raise InvalidInputError(
                f"the {name} tower's hidden_size ({width}) must be a positive multiple of its num_attention_heads "
                f"({heads})"
            )
    size, patch = vision.get("image_size"), vision.get("patch_size")
    if not all(isinstance(v, int) and v > 0 for v in (size, patch)) or size % patch:
        raise InvalidInputError(f"image_size ({size}) must be a positive multiple of patch_size ({patch})")
    if not isinstance(text.get("max_position_embeddings"), int) or text["max_position_embeddings"] < 3:
        raise InvalidInputError("text_config.max_position_embeddings must be an integer of at least 3")
    projection = settings.get("projection_dim")
    if not isinstance(projection, int) or projection < 1:
        raise InvalidInputError(f"projection_dim must be a positive integer, not {projection!r}")
    # The towers carry the projection size too, so CLIP{Text,Vision}ModelWithProjection load the folder alone.
    text["projection_dim"] = vision["projection_dim"] = projection
    return CLIPConfig(**settings)


# --------------------------------------------------------------------------------------------------
# The loss


class _AllGather(torch.autograd.Function):
    """All-gather (W·n, D) whose backward hands each process the gradient of its own rows, summed over
    processes (every process computes the same global loss; DDP then averages the gradients)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum over processes; plain all-reduce works on every backend (gloo too)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """Rows of every process in rank order (G, D), differentiable with respect to this process's rows.

    Processes may hold different numbers of rows (samples skipped while loading); a single process
    returns ``x`` unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    if min(sizes) == 0:
        raise InvalidInputError(
            "a process got a batch whose samples were all unreadable; check the data or raise --batch-size"
        )
    rows = max(sizes)
    padded = F.pad(x, (0, 0, 0, rows - x.shape[0])) if x.shape[0] < rows else x
    gathered = _AllGather.apply(padded)  # (W * rows, D)
    return torch.cat([gathered[r * rows : r * rows + n] for r, n in enumerate(sizes)])


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    negative_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch: mean of image→text and text→image cross-entropy.

    Args:
        image_features: this process's unnormalised image features (b, D); pair i is (image i, text i).
        text_features: this process's unnormalised text features (b, D).
        logit_scale: log temperature; ``exp`` is clamped to 100 (CLIP, Taiyi-CLIP).
        negative_features: hard-negative captions' features (b, D), row i a caption that does not describe
            image i (NegCLIP, Yuksekgonul et al. 2023): every image is scored against them as well as
            against the batch's texts; the text→image term is unchanged.
    """
    image = gather_features(F.normalize(image_features.float(), dim=-1))  # (G, D)
    text = gather_features(F.normalize(text_features.float(), dim=-1))  # (G, D)
    scale = logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)
    logits = scale * image @ text.T  # (G, G): row i = image i against every text
    labels = torch.arange(logits.shape[0], device=logits.device)
    if negative_features is None:
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    negative = gather_features(F.normalize(negative_features.float(), dim=-1))  # (G, D)
    image_to_text = torch.cat([logits, scale * image @ negative.T], dim=1)  # (G, 2G)
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(logits.T, labels)) / 2


class _Trainable(nn.Module):
    """What the optimizer trains and the checkpoints hold: the text tower, the logit scale and, when
    unfrozen, the image tower. The frozen image tower stays outside (not wrapped, not checkpointed)."""

    def __init__(self, clip: ChineseCLIP, *, train_image_tower: bool):
        super().__init__()
        self.text_model = clip.text_model
        self.text_head = clip.text_head
        self.logit_scale = clip.logit_scale  # the same Parameter: training updates the ChineseCLIP
        self.vision_model = clip.vision_model if train_image_tower else None

    def forward(self, input_ids, attention_mask, pixel_values=None):
        # ChineseCLIP's own feature rule, applied to this module's (possibly DDP-wrapped) submodules.
        text = ChineseCLIP.text_features(self, input_ids, attention_mask)  # (b, D)
        image = None if pixel_values is None else self.vision_model(pixel_values=pixel_values).image_embeds
        return text, image, self.logit_scale


# --------------------------------------------------------------------------------------------------
# Data


class _Samples(torch.utils.data.Dataset):
    """Sample ``i`` of a map-style pair set as ``(i, pixel_values (3, S, S) | None, caption | None)``."""

    def __init__(self, pairs, preprocess):
        self.pairs, self.preprocess = pairs, preprocess

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        pair = self.pairs[index]
        if pair is None:  # skipped by the reader (and counted there)
            return index, None, None
        return index, self.preprocess([pair.image])[0], pair.caption


def _collate(batch):
    """Readable samples of a batch: (indices, pixel values (b, 3, S, S) or None, captions, skipped)."""
    kept = [item for item in batch if item[1] is not None]
    pixels = torch.stack([item[1] for item in kept]) if kept else None
    return [item[0] for item in kept], pixels, [item[2] for item in kept], len(batch) - len(kept)


def _as_list(batch):
    return batch


@dataclass
class _DataSet:
    """A training or validation source: a map-style pair set, or tar shards (streamed; cache only)."""

    name: str
    pairs: object  # SyntheticPairs | IndexedPairs | PairSource (tar)
    fingerprint: str
    skips: object | None = None

    @property
    def streamed(self) -> bool:
        return getattr(self.pairs, "kind", None) == "tar"


def open_training_data(source: str, config: ClipTrainConfig, image_size: int, *, captions: bool = True) -> _DataSet:
    """Open ``source`` (``synthetic:N`` or anything :func:`taiyi.data.open_pairs` reads); ``captions=False``: the
    images alone (the image trainers), every caption ``""`` and none required."""
    n = parse_synthetic(source)
    if n is not None:
        pairs = SyntheticPairs(n, image_size=image_size)
        return _DataSet(source, pairs, f"{source}:{image_size}:seed0")
    from ..data import IndexedPairs, SkipCounter, open_pairs

    skips = SkipCounter()
    columns = {"image_column": config.image_column, "caption_column": config.caption_column if captions else None}
    opened = open_pairs(source, skips=skips, **columns)
    pairs = opened if opened.kind == "tar" else IndexedPairs(source, skips=skips, **columns)
    return _DataSet(source, pairs, _source_fingerprint(source, pairs, columns), skips)


def _source_fingerprint(source: str, pairs, columns: dict) -> str:
    """What identifies a data source's contents cheaply: its files' names, sizes and modification times."""
    digest = hashlib.blake2b(digest_size=16)
    path = Path(source)
    digest.update(json.dumps([str(path.resolve()), getattr(pairs, "kind", ""), columns]).encode())
    if getattr(pairs, "kind", None) == "tar":
        files = list(pairs.shards)
    elif getattr(pairs, "kind", None) == "folder":
        keys = pairs.keys()
        files = [path / key for key in keys]
        files += [p.with_suffix(".txt") for p in files]
    else:
        files = [path]
    for file in files:
        try:
            st = file.stat()
            digest.update(f"{file}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{file}|missing\n".encode())
    return digest.hexdigest()


def image_tower_fingerprint(clip: ChineseCLIP) -> str:
    """A hash of the image tower's weights and its preprocessing: cached features are only valid for both."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(clip.image_processor.to_json_string().encode())
    for name, tensor in sorted(clip.vision_model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _image_size(clip: ChineseCLIP) -> int:
    crop = getattr(clip.image_processor, "crop_size", None) or {}
    size = getattr(clip.image_processor, "size", None) or {}
    return int(crop.get("height") or size.get("shortest_edge") or size.get("height") or 224)


# --------------------------------------------------------------------------------------------------
# Image features: computed by the frozen tower, cached once


@torch.no_grad()
def _frozen_image_features(clip: ChineseCLIP, pixel_values: torch.Tensor, accelerator) -> torch.Tensor:
    """The frozen tower's features (b, D) in float32: the one computation both the cache and uncached steps use."""
    with accelerator.autocast():
        return clip.image_features(pixel_values.to(accelerator.device)).float()


@dataclass
class _Table:
    """Per-sample image features and captions of a whole source, in a canonical order."""

    features: torch.Tensor  # (N, D) float32; rows of skipped samples are zero
    valid: torch.Tensor  # (N,) bool
    captions: list[str]  # "" for skipped samples


def _encode_all(data: _DataSet, clip: ChineseCLIP, accelerator, config: ClipTrainConfig) -> _Table:
    """Every sample's frozen image feature, each process encoding its share; all processes get the table."""
    rank, world = accelerator.process_index, accelerator.num_processes
    rows: list[tuple[object, torch.Tensor | None, str | None]] = []  # (order key, feature, caption)
    if data.streamed:
        shard = data.pairs.shard(rank, world)
        loader = torch.utils.data.DataLoader(shard, batch_size=64, num_workers=config.num_workers, collate_fn=_as_list)
        for batch in loader:
            feats = _frozen_image_features(clip, clip.preprocess([p.image for p in batch]), accelerator).cpu()
            rows += [(p.key, f, p.caption) for p, f in zip(batch, feats, strict=True)]
    else:
        indices = list(range(len(data.pairs)))[rank::world]
        loader = torch.utils.data.DataLoader(
            _Samples(data.pairs, clip.preprocess),
            batch_sampler=[indices[i : i + 64] for i in range(0, len(indices), 64)],
            num_workers=config.num_workers,
            collate_fn=_as_list,
            generator=torch.Generator(),  # a DataLoader otherwise draws its seed from the global RNG
        )
        for batch in loader:
            kept = [item for item in batch if item[1] is not None]
            feats = (
                _frozen_image_features(clip, torch.stack([item[1] for item in kept]), accelerator).cpu()
                if kept
                else []
            )
            rows += [(i, f, c) for (i, _, c), f in zip(kept, feats, strict=True)]
            rows += [(item[0], None, None) for item in batch if item[1] is None]
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    rows.sort(key=lambda row: row[0])  # index order (tar: key order), the same whatever the process count
    if data.streamed and not rows:
        raise InvalidInputError(f"data source {data.name} holds no readable image-text pair")
    dim = next((f.shape[0] for _, f, _ in rows if f is not None), clip.image_dim)
    features = torch.zeros(len(rows), dim)
    for i, (_, f, _) in enumerate(rows):
        if f is not None:
            features[i] = f
    valid = torch.tensor([f is not None for _, f, _ in rows], dtype=torch.bool)
    return _Table(features, valid, [c or "" for _, _, c in rows])


def _cache_path(cache_dir: Path, data: _DataSet, tower: str) -> Path:
    key = hashlib.blake2b(f"{CACHE_VERSION}|{data.fingerprint}|{tower}".encode(), digest_size=8).hexdigest()
    return cache_dir / f"image-features-{key}.safetensors"


def cached_image_features(
    data: _DataSet, clip: ChineseCLIP, accelerator, config: ClipTrainConfig, cache_dir: Path, tower: str
) -> tuple[_Table, Path, bool]:
    """Load the cached feature table of ``data`` for this image tower, or compute and store it.

    Returns:
        ``(table, path, computed)``.
    """
    from safetensors.torch import load_file, save_file

    path = _cache_path(cache_dir, data, tower)
    found = path.is_file()
    accelerator.wait_for_everyone()  # every process has looked before the main one may write the cache
    if found:
        tensors = load_file(path)
        captions = json.loads(bytes(tensors["captions"].numpy()).decode("utf-8"))
        return _Table(tensors["features"], tensors["valid"].bool(), captions), path, False
    table = _encode_all(data, clip, accelerator, config)
    if accelerator.is_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        captions = torch.frombuffer(
            bytearray(json.dumps(table.captions, ensure_ascii=False).encode()), dtype=torch.uint8
        )
        metadata = {"source": data.name, "data_fingerprint": data.fingerprint, "image_tower": tower}
        save_file(
            {"features": table.features.contiguous(), "valid": table.valid.to(torch.uint8), "captions": captions},
            str(tmp),
            metadata=metadata,
        )
        os.replace(tmp, path)
    accelerator.wait_for_everyone()
    return table, path, True


# --------------------------------------------------------------------------------------------------
# Setting up


def _validate_config(config: ClipTrainConfig) -> None:
    """Reject bad settings before anything is loaded."""
    if not str(config.data).strip():
        raise InvalidInputError(
            "no training data given; pass --data (a folder, CSV, JSONL, tar shards or synthetic:N)"
        )
    if not str(config.output).strip():
        raise InvalidInputError("no output folder given; pass --output DIR")
    starts = [config.text_tower is not None, config.init_from is not None, config.from_scratch]
    if sum(starts) != 1:
        raise InvalidInputError(
            "give exactly one of --text-tower (a Taiyi-CLIP text tower), --init-from (a taiyi Chinese CLIP folder) "
            "or --new-clip / --from-config (a CLIP trained from scratch)"
        )
    if config.init_from is not None and config.image_tower is not None:
        raise InvalidInputError("--init-from brings its own image tower; drop --image-tower")
    if config.from_scratch:
        if config.image_tower is not None:
            raise InvalidInputError("--new-clip builds both towers; drop --image-tower")
        if config.cache_image_features:
            raise InvalidInputError(
                "--new-clip trains the image tower, so its features cannot be cached; drop --cache-image-features"
            )
        new_clip_config(config.from_config)  # a bad file or bad sizes fail here, before anything is written
        if config.vocab_size < 514:
            raise InvalidInputError(
                f"--vocab-size must be at least 514 (512 byte symbols + 2 special tokens), not {config.vocab_size}"
            )
    checks = [
        (config.batch_size >= 2, f"--batch-size must be at least 2 (a contrastive batch), not {config.batch_size}"),
        seed_check(config.seed),
        (config.grad_accum >= 1, f"--grad-accum must be at least 1, not {config.grad_accum}"),
        (config.learning_rate > 0, f"--lr must be positive, not {config.lr}"),
        (config.weight_decay >= 0, f"--weight-decay must be 0 or more, not {config.weight_decay}"),
        (all(0 <= b < 1 for b in config.betas), f"AdamW betas must lie in [0, 1), not {config.betas}"),
        (0 <= config.val_fraction < 1, f"--val-fraction must lie in [0, 1), not {config.val_fraction}"),
        (config.val_max >= 2, f"--val-max must be at least 2, not {config.val_max}"),
        (config.val_every >= 0, f"--val-every must be 0 (off) or more, not {config.val_every}"),
        (config.save_every >= 0, f"--save-every must be 0 (at the end only) or more, not {config.save_every}"),
        (config.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1, not {config.keep_checkpoints}"),
        (config.max_steps is None or config.max_steps >= 1, f"--max-steps must be at least 1, not {config.max_steps}"),
        (config.epochs >= 1, f"--epochs must be at least 1, not {config.epochs}"),
        (config.warmup_steps is None or config.warmup_steps >= 0, "--warmup-steps must be 0 or more"),
        (config.max_grad_norm is None or config.max_grad_norm > 0, "--max-grad-norm must be positive"),
        (config.log_every >= 1, f"--log-every must be at least 1, not {config.log_every}"),
        (config.num_workers >= 0, f"--num-workers must be 0 or more, not {config.num_workers}"),
        (
            config.mixed_precision in MIXED_PRECISION,
            f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, not {config.mixed_precision!r}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidInputError(message)
    if config.unfreeze_image_tower and config.cache_image_features:
        raise InvalidInputError("--cache-image-features needs a frozen image tower; drop it or --unfreeze-image-tower")
    if config.resume is not None and config.overwrite:
        raise InvalidInputError("--resume continues a run and --overwrite starts one afresh; give one of them")
    check_fp16_device(config)  # on the CPU accelerate would train fp16 as float32 without a word


def _make_accelerator(config: ClipTrainConfig, output: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    # A second run in the same process (tests, notebooks) starts from fresh accelerate state; the
    # process group, if any, is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    check_launch(warn=False)  # for the Python API: FSDP without GPUs, DeepSpeed not installed (the CLI checked)
    cpu = use_cpu(config.cpu)
    mixed = config.mixed_precision
    if mixed == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            mixed = None  # what accelerate launch was configured with
        elif torch.cuda.is_available() and not cpu:
            mixed = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mixed = "no"
    report = config.report_to
    if report == "auto":
        report = "tensorboard" if importlib.util.find_spec("tensorboard") is not None else None
    elif report == "none":
        report = None
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed,
        gradient_accumulation_steps=config.grad_accum,
        log_with=report,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / LOGS)),
        step_scheduler_with_optimizer=False,
        # The feature and latent caches are encoded by the main process while the others wait at a barrier:
        # a large dataset takes longer than torch's default timeout (10-30 min), which would end the run.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=CACHE_BARRIER_SECONDS))],
    )


def _as_indices(indices) -> list[int]:
    return indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)


def _negative_captions(data: _DataSet, config: ClipTrainConfig, n: int) -> list[str | None]:
    """Each row's hard-negative caption from ``--negative-column`` (``None`` where the row has none)."""
    from ..data import IndexedPairs

    if getattr(data.pairs, "kind", None) not in ("csv", "jsonl"):
        raise InvalidInputError("--negative-column needs a CSV or JSONL --data (a column beside the captions)")
    missing = f"{data.name} has no {config.negative_column!r} column (--negative-column)"
    try:
        pairs = IndexedPairs(config.data, image_column=config.image_column, caption_column=config.negative_column)
    except InvalidInputError:
        raise InvalidInputError(missing) from None
    out = [(text or "").strip() or None for text in map(pairs.caption, range(n))]
    if all(t is None for t in out):
        raise InvalidInputError(missing)
    return out


def _captions(data: _DataSet, indices: list[int]) -> list[str]:
    """The captions of samples ``indices`` (unreadable ones left out)."""
    pairs = data.pairs
    if hasattr(pairs, "caption"):  # synthetic: the caption without drawing the image
        return [str(pairs.caption(i)) for i in indices]
    return [pair.caption for pair in (pairs[i] for i in indices) if pair is not None]


def _new_model(config: ClipTrainConfig, data: _DataSet, val_data: _DataSet | None, output: Path) -> ChineseCLIP:
    """A new CLIP (both towers) with a tokenizer learned from the training captions, or the one a run being
    resumed learned (``OUTPUT/tokenizer``); the weights are drawn from the global RNG (seeded by the caller)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from ..recipe.tokenizer import train_clip_tokenizer

    clip_config = new_clip_config(config.from_config)
    max_length = clip_config.text_config.max_position_embeddings
    saved = output / TOKENIZER
    if config.resume is not None and (saved / "vocab.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(saved)
    else:
        train_idx, _ = _train_val_indices(config, data.name, len(data.pairs), None if val_data is None else 0)
        started = time.perf_counter()
        captions = _captions(data, train_idx.tolist())
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = train_clip_tokenizer(captions, tmp, vocab_size=config.vocab_size, max_length=max_length)
        logger.info(
            "tokenizer: %d tokens learned from %d training captions in %.1fs",
            len(tokenizer),
            len(captions),
            time.perf_counter() - started,
        )
    text = clip_config.text_config
    text.vocab_size = len(tokenizer)
    text.bos_token_id = tokenizer.bos_token_id
    text.eos_token_id = tokenizer.eos_token_id  # the text feature is read at the first end-of-text token
    text.pad_token_id = tokenizer.pad_token_id
    size = clip_config.vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return ChineseCLIP.from_clip_model(CLIPModel(clip_config), tokenizer, processor, max_length=max_length)


def _load_model(config: ClipTrainConfig) -> ChineseCLIP:
    if config.init_from is not None:
        from ..clip import load_clip

        return load_clip(config.init_from, allow_pickle=config.allow_pickle, device="cpu")
    return ChineseCLIP.from_taiyi(
        config.text_tower, config.image_tower, allow_pickle=config.allow_pickle, device="cpu"
    )


def _split(n: int, fraction: float, cap: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded hold-out: (train indices, validation indices), both sorted."""
    if fraction <= 0:
        return torch.arange(n), torch.arange(0)
    n_val = min(max(2, round(n * fraction)), cap)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    return order[n_val:].sort().values, order[:n_val].sort().values


def _train_val_indices(
    config: ClipTrainConfig,
    name: str,
    n: int,
    n_val_data: int | None,
    valid: torch.Tensor | None = None,
    val_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation sample indices; readable ones only where that is known (the cache).

    Args:
        n: samples of the training source; n_val_data: samples of ``--val-data`` (None: hold out a share).
        valid, val_valid: (N,) masks of readable samples, when the cache has read them.
    """
    if n == 0:
        raise InvalidInputError(f"data source {name} holds no image-text pairs")
    if n_val_data is not None:
        train, val = torch.arange(n), torch.arange(n_val_data)[: config.val_max]
    else:
        train, val = _split(n, config.val_fraction, config.val_max, config.seed)
    if valid is not None:  # unreadable samples are known: leave them out of the order
        train = train[valid[train]]
        if n_val_data is None:
            val = val[valid[val]]
    if val_valid is not None:
        val = val[val_valid[val]]
    if len(train) < config.batch_size:
        raise InvalidInputError(
            f"{len(train)} readable training pairs (after holding out {len(val)} for validation) are fewer than "
            f"--batch-size {config.batch_size}; lower it or give more data"
        )
    return train, val


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm gains and the logit scale are left alone (CLIP, open_clip)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _flat_hparams(config: ClipTrainConfig) -> dict:
    out = {}
    for key, value in config.to_json().items():
        out[key] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


# --------------------------------------------------------------------------------------------------
# Training


def train_clip(config: ClipTrainConfig) -> dict:
    """Train a Chinese CLIP's text tower against a frozen CLIP image tower (or, ``new_clip``, a whole CLIP
    from scratch); export it when done.

    Works as a plain process and under ``accelerate launch`` (every process calls this). Seeds the
    global RNGs with ``config.seed`` (dropout), as a training entry point does.

    Args:
        config: the run's settings (see :class:`ClipTrainConfig`).

    Returns:
        ``{"step", "total_steps", "epoch", "output", "final", "text_tower", "checkpoint", "losses"
        ({step: loss} of the steps run by this call), "val_initial", "val" (retrieval metrics before and
        after, or None), "skipped" (unreadable samples), "train_seconds", "loop_seconds",
        "steps_per_second", "step_seconds", "cache" (path or None), "cache_seconds", "resumed_from",
        "num_processes", "main_process", "model" (the trained ChineseCLIP)}``.

    Raises:
        InvalidInputError: bad settings, data that holds no pairs, an output folder holding another run.
    """
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from ..evaluation import retrieval_metrics

    _validate_config(config)
    output = Path(config.output)
    run_json = config.to_json()
    _check_output_dir(output, run_json, resume=config.resume, overwrite=config.overwrite, may_differ=RESUMABLE_CHANGES)
    checkpoint = resolve_resume(output, config.resume)  # None: a fresh start
    accelerator = _make_accelerator(config, output)
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise InvalidInputError(
            f"--batch-size {config.batch_size} is the global batch and must be a multiple of the {world} processes"
        )
    local_batch = config.batch_size // world
    set_seed(config.seed)

    # --- model and data ----------------------------------------------------------------------------
    frozen = not (config.unfreeze_image_tower or config.from_scratch)
    cache = frozen if config.cache_image_features is None else config.cache_image_features

    def open_data(image_size: int) -> tuple[_DataSet, _DataSet | None]:
        data = open_training_data(config.data, config, image_size)
        if data.streamed and not cache:
            raise InvalidInputError(
                f"{data.name} is tar shards, which are streamed; train on them with the frozen image tower and "
                "its feature cache (--cache-image-features), or convert them to a folder/CSV"
            )
        val_data = open_training_data(config.val_data, config, image_size) if config.val_data else None
        if not data.streamed:  # sizes are known before any image is read: fail fast
            _train_val_indices(config, data.name, len(data.pairs), None if val_data is None else 0)
        return data, val_data

    if config.from_scratch:  # the tokenizer is learned from the data, so the data comes first
        data, val_data = open_data(new_clip_config(config.from_config).vision_config.image_size)
        clip = _new_model(config, data, val_data, output)
    else:
        clip = _load_model(config)
        data, val_data = open_data(_image_size(clip))
    clip.vision_model.requires_grad_(not frozen)
    clip.vision_model.train(not frozen)
    clip.text_model.requires_grad_(True)
    clip.logit_scale.requires_grad_(True)
    if config.gradient_checkpointing:
        if hasattr(clip.text_model, "activation_checkpointing_enable"):  # transformers >= 5.20
            clip.text_model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            clip.text_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tower = image_tower_fingerprint(clip) if cache else ""
    # The frozen tower stays float32 (autocast runs it in half precision): a half copy would be saved
    # into final/ and the tower would no longer be the one it was trained against, bit for bit.
    clip.to(accelerator.device)

    # --- feature cache ---------------------------------------------------------------------------
    cache_dir = Path(config.cache_dir) if config.cache_dir else output / "cache"
    cache_seconds, cache_path, table, val_table, skipped_in_cache = 0.0, None, None, None, 0
    if cache:
        started = time.perf_counter()
        table, cache_path, computed = cached_image_features(data, clip, accelerator, config, cache_dir, tower)
        if val_data is not None:
            val_table, _, _ = cached_image_features(val_data, clip, accelerator, config, cache_dir, tower)
        cache_seconds = time.perf_counter() - started
        skipped_in_cache = int((~table.valid).sum())
        if main:
            logger.info(
                "image features: %s %s (%d samples, %d unreadable and skipped%s) in %.1fs",
                "computed and cached in" if computed else "loaded from cache",
                cache_path,
                len(table.captions),
                skipped_in_cache,
                f"; {data.skips.summary()}" if computed and data.skips is not None and data.skips.total else "",
                cache_seconds,
            )
    n_samples = len(table.captions) if table is not None else len(data.pairs)
    n_val_data = None if val_data is None else len(val_table.captions) if val_table else len(val_data.pairs)
    train_idx, val_idx = _train_val_indices(
        config,
        data.name,
        n_samples,
        n_val_data,
        table.valid if table is not None else None,
        val_table.valid if val_table is not None else None,
    )
    negatives = None
    if config.negative_column is not None:
        negatives = _negative_captions(data, config, n_samples)
        keep = torch.tensor([negatives[i] is not None for i in train_idx.tolist()], dtype=torch.bool)
        if main and int((~keep).sum()):
            logger.warning(
                "%d training rows have no --negative-column %r caption and are left out",
                int((~keep).sum()),
                config.negative_column,
            )
        train_idx = train_idx[keep]
        if len(train_idx) < config.batch_size:
            raise InvalidInputError(
                f"only {len(train_idx)} training rows of {data.name} have a {config.negative_column!r} caption; "
                f"--batch-size is {config.batch_size}"
            )
    batches_per_epoch = len(train_idx) // config.batch_size
    # Recorded once the model and the data have loaded: a run that fails on a typo leaves no run behind.
    accelerator.wait_for_everyone()
    if main:
        record_run(output, run_json, overwrite=config.overwrite)
        if config.from_scratch and not (output / TOKENIZER / "vocab.json").is_file():
            from ..recipe.tokenizer import save_clip_tokenizer

            save_clip_tokenizer(clip.tokenizer, output / TOKENIZER, max_length=clip.max_length)
    accelerator.wait_for_everyone()
    steps_per_epoch = max(batches_per_epoch // config.grad_accum, 1)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup = config.warmup_steps if config.warmup_steps is not None else math.ceil(0.01 * total_steps)

    # --- optimizer, schedule, accelerate -----------------------------------------------------------
    trainable = _Trainable(clip, train_image_tower=not frozen)
    optimizer = torch.optim.AdamW(
        _param_groups(trainable, config.weight_decay),
        lr=config.learning_rate,
        betas=tuple(config.betas),
        eps=config.eps,
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    model, optimizer = accelerator.prepare(trainable, optimizer)
    # Not prepared: accelerate would step a prepared scheduler once per process. Checkpointed all the same.
    accelerator.register_for_checkpointing(scheduler)
    logit_scale = trainable.logit_scale

    # --- resume ------------------------------------------------------------------------------------
    metrics = MetricsLog(output / METRICS, enabled=main)
    start_step, resumed_from, skipped_total = 0, None, 0
    if config.resume is not None:
        if main:
            for path in remove_partial_checkpoints(output):
                logger.info("removed %s, a checkpoint left half-written by an interrupted run", path)
        accelerator.wait_for_everyone()
        if checkpoint is None:
            if main:
                logger.info("--resume %s: %s has no checkpoint yet; starting the run", config.resume, output)
        else:
            state = load_checkpoint(accelerator, checkpoint, total_steps)
            if state.get("num_processes", world) != world and main:
                logger.warning(
                    "resuming with %d processes a run saved with %d: same data order, but float sums differ",
                    world,
                    state["num_processes"],
                )
            start_step, resumed_from = int(state["step"]), checkpoint
            skipped_total = int(state.get("skipped", 0))
            if main:
                logger.info("resumed from %s at step %d of %d", checkpoint, start_step, total_steps)
    if main:
        metrics.truncate_after(start_step)
    accelerator.wait_for_everyone()
    accelerator.init_trackers("clip", config=_flat_hparams(config))

    # --- validation ----------------------------------------------------------------------------------
    val_source = val_data or data
    val_source_table = val_table if val_data is not None else table
    val_image_memo: dict[str, torch.Tensor] = {}

    def validate(step: int) -> dict | None:
        if len(val_idx) < 2:
            return None
        result = None
        if main:
            text_was_training = clip.text_model.training
            with torch.no_grad():
                if val_source_table is not None:
                    captions = [val_source_table.captions[i] for i in val_idx.tolist()]
                    image_embeds = F.normalize(val_source_table.features[val_idx].float(), dim=-1)  # (V, D)
                elif frozen and "images" in val_image_memo:
                    captions, image_embeds = val_image_memo["captions"], val_image_memo["images"]
                else:
                    captions, chunks = [], []
                    clip.vision_model.eval()
                    for start in range(0, len(val_idx), 64):
                        batch = [val_source.pairs[i] for i in val_idx[start : start + 64].tolist()]
                        batch = [p for p in batch if p is not None]
                        if batch:
                            feats = _frozen_image_features(
                                clip, clip.preprocess([p.image for p in batch]), accelerator
                            )
                            chunks.append(F.normalize(feats.cpu(), dim=-1))
                            captions += [p.caption for p in batch]
                    clip.vision_model.train(not frozen)
                    image_embeds = torch.cat(chunks) if chunks else torch.zeros(0, clip.image_dim)
                    if frozen:
                        val_image_memo.update(captions=captions, images=image_embeds)
                if len(captions) >= 2:
                    # (V, D); eval mode, no dropout
                    text_embeds = clip.encode_text(captions, batch_size=256, warn_long=False)
                    result = retrieval_metrics(image_embeds.cpu(), text_embeds, list(range(len(captions))))
            clip.text_model.train(text_was_training)
            if result is not None:
                t2i, i2t = result["text_to_image"], result["image_to_text"]
                logger.info(
                    "step %d validation (%d pairs): text→image R@1 %.1f R@5 %.1f R@10 %.1f | image→text R@1 %.1f "
                    "R@5 %.1f R@10 %.1f | mean recall %.1f",
                    step,
                    result["num_texts"],
                    t2i["R@1"],
                    t2i["R@5"],
                    t2i["R@10"],
                    i2t["R@1"],
                    i2t["R@5"],
                    i2t["R@10"],
                    result["mean_recall"],
                )
                metrics.append({"step": step, "kind": "val", **result})
                flat = {f"val/t2i_{k}": v for k, v in t2i.items()}
                flat.update({f"val/i2t_{k}": v for k, v in i2t.items()})
                flat["val/mean_recall"] = result["mean_recall"]
                accelerator.log(flat, step=step)
        accelerator.wait_for_everyone()
        return result

    # --- the data order ------------------------------------------------------------------------------
    def epoch_order(epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        return train_idx[torch.randperm(len(train_idx), generator=generator)]

    def micro_batches(start_micro: int):
        """(micro-step, indices, pixel values or None, captions, skipped) for this process, from ``start_micro`` on."""
        micro = start_micro
        while True:
            epoch, position = divmod(micro, batches_per_epoch)
            order = epoch_order(epoch)
            local = [
                order[p * config.batch_size + rank * local_batch : p * config.batch_size + (rank + 1) * local_batch]
                for p in range(position, batches_per_epoch)
            ]
            if table is not None:
                for indices in local:
                    yield micro, indices, None, [table.captions[i] for i in indices.tolist()], 0
                    micro += 1
            else:
                loader = torch.utils.data.DataLoader(
                    _Samples(data.pairs, clip.preprocess),
                    batch_sampler=[indices.tolist() for indices in local],
                    num_workers=config.num_workers,
                    collate_fn=_collate,
                    generator=torch.Generator(),  # keep the global RNG (dropout) untouched by the loader
                )
                for indices, pixels, captions, skipped in loader:
                    yield micro, indices, pixels, captions, skipped
                    micro += 1

    features_on_device = table.features.to(accelerator.device) if table is not None else None

    # --- the loop ------------------------------------------------------------------------------------
    val_initial = validate(0) if start_step == 0 else None
    val_last = val_initial
    step = start_step
    losses: dict[int, float] = {}
    step_seconds: list[float] = []
    window: list[torch.Tensor] = []
    model.train()
    clip.vision_model.train(not frozen)
    if main and step < total_steps:
        logger.info(
            "training %d steps from step %d: %d pairs (%d held out), global batch %d x %d accumulation, %d "
            "process%s, image features %s",
            total_steps,
            step,
            len(train_idx),
            len(val_idx),
            config.batch_size,
            config.grad_accum,
            world,
            "" if world == 1 else "es",
            "cached" if cache else "computed every step",
        )
    started_loop = last = time.perf_counter()
    batches = micro_batches(step * config.grad_accum) if step < total_steps else iter(())
    learnable = False  # whether the optimizer step being accumulated has a micro-batch it can learn from
    with StopOnSignal() as stop:
        for micro, indices, pixels, captions, skipped in batches:
            if table is None:  # samples are read now: count what every process skipped, and stop them all alike
                counts = torch.tensor([[len(captions), skipped]], device=accelerator.device)
                counts = accelerator.gather(counts) if world > 1 else counts  # (W, 2)
                skipped_total += int(counts[:, 1].sum())
                if int(counts[:, 0].min()) == 0:
                    raise InvalidInputError(
                        f"every sample of a process's share of micro-batch {micro} was unreadable; check the data "
                        f"({skipped_total} unreadable samples so far) or raise --batch-size"
                    )
                # one sample is its own only candidate: loss 0, no gradient; AdamW would still move the weights
                # (momentum, decay), so a step made only of such micro-batches makes no update
                learnable = learnable or int(counts[:, 0].sum()) > 1 or negatives is not None
            else:
                learnable = True
            with accelerator.accumulate(model):
                hard = [negatives[i] for i in _as_indices(indices)] if negatives is not None else []
                tokens = clip.tokenize(captions + hard)  # one text-tower pass for captions and negatives
                with accelerator.autocast():
                    text_features, image_features, scale = model(
                        tokens["input_ids"],
                        tokens["attention_mask"],
                        pixel_values=None if frozen else pixels.to(accelerator.device),
                    )
                negative_features = text_features[len(captions) :] if hard else None
                text_features = text_features[: len(captions)]
                if image_features is None:
                    image_features = (
                        features_on_device[indices.to(accelerator.device)]
                        if features_on_device is not None
                        else _frozen_image_features(clip, pixels, accelerator)
                    )
                loss = contrastive_loss(image_features, text_features, scale, negative_features)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                if learnable or not accelerator.sync_gradients:
                    optimizer.step()
                elif main:
                    logger.warning(
                        "step %d: its batch kept one readable sample, from which a contrastive loss learns "
                        "nothing; no update",
                        step + 1,
                    )
                optimizer.zero_grad(set_to_none=True)
            window.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            updated, learnable = learnable, False
            # --- one optimizer step done ---
            lr = scheduler.get_last_lr()[0]
            if updated and not accelerator.optimizer_step_was_skipped:  # as accelerate does for a skipped step
                scheduler.step()
            with torch.no_grad():
                logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))  # never stuck above the clamp with no gradient
            step += 1
            step_loss = float(torch.stack(window).mean())
            window = []
            now = time.perf_counter()
            step_seconds.append(now - last)
            losses[step] = step_loss
            epoch = (micro + 1) / batches_per_epoch
            row = {
                "step": step,
                "kind": "train",
                "epoch": round(epoch, 4),
                "loss": step_loss,
                "lr": lr,
                "logit_scale": float(logit_scale.detach().exp()),
            }
            metrics.append(row)
            logged = {"train/loss": step_loss, "train/lr": lr, "train/logit_scale": row["logit_scale"]}
            accelerator.log(logged, step=step)
            if main and (step % config.log_every == 0 or step == total_steps or step == start_step + 1):
                rate = len(step_seconds) / max(sum(step_seconds), 1e-9)
                logger.info(
                    "step %d/%d epoch %.2f loss %.4f lr %.3g logit scale %.2f (%.2f steps/s)%s",
                    step,
                    total_steps,
                    epoch,
                    step_loss,
                    lr,
                    row["logit_scale"],
                    rate,
                    f", {skipped_total} unreadable samples skipped" if skipped_total else "",
                )
            stop.requested(accelerator, step)  # every process, every step: they agree whether to stop
            if config.val_every and step % config.val_every == 0 and step < total_steps and not stop.stopping:
                val_last = validate(step)
                model.train()
            state = {
                "step": step,
                "micro_batches": micro + 1,
                "epoch": (micro + 1) // batches_per_epoch,
                "batch_in_epoch": (micro + 1) % batches_per_epoch,
                "total_steps": total_steps,
                "num_processes": world,
                "skipped": skipped_total,
            }
            stop.end_step(accelerator, output, config, step, total_steps, state)
            last = time.perf_counter()
            if step >= total_steps:
                break
    train_seconds = sum(step_seconds)
    loop_seconds = time.perf_counter() - started_loop

    # --- the end -----------------------------------------------------------------------------------
    if step > start_step or val_last is None:
        val_last = validate(step)
    if skipped_total and main:
        logger.info("data: %d unreadable samples skipped in this run", skipped_total)
    final_dir, text_dir = output / "final", output / "taiyi-text-tower"
    if main and clip.text_head == "projection":  # a CLIP text tower: final/ is a standard CLIP folder
        clip.eval()
        clip.save_pretrained(final_dir, overwrite=True)
        logger.info("saved %s (CLIPModel; text_encoder/ + tokenizer/ for Stable Diffusion)", final_dir)
    elif main:
        clip.eval()
        clip.save_pretrained(final_dir, overwrite=True)
        clip.export_taiyi(text_dir, overwrite=True)  # atomically, as final/
        logger.info("saved %s (load_clip) and %s (Taiyi-CLIP text tower layout)", final_dir, text_dir)
    if main:
        from .sd import plot_losses

        plot_losses(metrics.read(), output / "loss.png")  # as the other trainers draw theirs
    accelerator.wait_for_everyone()
    accelerator.end_training()
    last_checkpoint = list_checkpoints(output)
    return {
        "step": step,
        "total_steps": total_steps,
        "epoch": step * config.grad_accum / batches_per_epoch,
        "output": output,
        "final": final_dir,
        "text_tower": None if clip.text_head == "projection" else text_dir,
        "checkpoint": last_checkpoint[-1] if last_checkpoint else None,
        "losses": losses,
        "val_initial": val_initial,
        "val": val_last,
        "skipped": skipped_in_cache + skipped_total,
        "train_seconds": train_seconds,
        "loop_seconds": loop_seconds,
        "steps_per_second": len(step_seconds) / train_seconds if train_seconds else None,
        "step_seconds": step_seconds,
        "cache": cache_path,
        "cache_seconds": cache_seconds,
        "resumed_from": resumed_from,
        "num_processes": world,
        "main_process": main,
        "model": clip,
    }


__all__ = [
    "MINIATURE_CLIP",
    "ClipTrainConfig",
    "contrastive_loss",
    "gather_features",
    "image_tower_fingerprint",
    "new_clip_config",
    "step_dir_name",
    "train_clip",
]
