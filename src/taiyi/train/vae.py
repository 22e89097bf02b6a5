"""``taiyi train vae``: a Stable Diffusion VAE (diffusers ``AutoencoderKL``) trained on images, from scratch or
from an existing one (``--init``); ``--decoder-only`` fine-tunes the decoder alone, keeping every latent and the
``scaling_factor``, so diffusion models trained on that VAE's latents stay valid (Stable Diffusion's "ft-MSE" VAE
was made so).

The miniature recipe needs its own VAE: 64×64 pictures, downsampling factor 4, 16×16×4 latents.

- Data: any image source the project reads — a folder of pairs (``x.png`` + ``x.txt``; the folders
  :func:`taiyi.data.shanshui.write_folder` writes, whose ``x.json`` sidecars are ignored), CSV, JSONL,
  ``synthetic:N`` — or ``shanshui:N`` (N procedural 山水 scenes of the training split, rendered on the
  fly). Captions are ignored. Images are resized (shorter side) and centre-cropped to ``resolution``
  once and held in memory as uint8 (N × 3 × R × R bytes: 12 KB per 64×64 image). A seeded share is
  held out for validation.
- Objective: L1 reconstruction of a posterior sample + ``kl_weight`` × KL (mean per latent element)
  + ``edge_weight`` × L1 of the finite-difference image gradients (cheap sharpness; no LPIPS/GAN).
  + ``chroma_weight`` × L1 of the error's colour part (the error minus its mean over R, G, B), so errors
  fall on brightness rather than hue; and a ``grey_fraction`` of the training images is turned grey.
  Both keep grey pictures grey.
- Validation (every ``val_every`` steps and at the end): PSNR of posterior-mean reconstructions of the
  held-out images, and the mean chroma (max − min of R, G, B, 0–1) of reconstructions of greyscale
  pictures — the held-out images turned grey, and rendered 水墨 (ink) scenes — which must stay grey
  (< 0.05) for ink-style generation to work.
- At the end, the latent std over (up to 1024) training images is measured and ``scaling_factor = 1/std``
  is written into the VAE config, as Stable Diffusion does (0.18215 for SD v1), so latents × scaling
  have unit variance (with ``decoder_only``, the init's factor is kept: its latents are unchanged).
  ``OUTPUT/final`` loads with ``AutoencoderKL.from_pretrained`` and no flags.

The training loop (checkpoints, exact resume, metrics.jsonl, loss.png, EMA) is shared with
``taiyi train uncond`` (:mod:`taiyi.train.uncond`): :func:`run_image_training` here serves both.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from ..loading import DECODE_PADDING_KEY, use_decode_padding
from .common import (
    METRICS,
    MetricsLog,
    StopOnSignal,
    check_fp16_device,
    list_checkpoints,
    load_checkpoint,
    lr_scheduler_check,
    make_lr_scheduler,
    record_run,
    remove_partial_checkpoints,
    resolve_resume,
    run_control_checks,
)
from .common import check_output_dir as _check_output_dir

logger = logging.getLogger("taiyi")

SHANSHUI_PREFIX = "shanshui:"
# Settings that may change between a run and its resumption without changing what it computes.
RESUMABLE_CHANGES = (
    "output",
    "resume",
    "overwrite",
    "max_steps",
    "epochs",
    "val_every",
    "save_every",
    "keep_checkpoints",
    "report_to",
    "log_every",
    "cpu",
)


@dataclass
class ImageTrainConfig:
    """Settings every image-only trainer shares (``taiyi train vae``, ``taiyi train uncond``).

    Args:
        data: image sources (folder, CSV, JSONL, ``synthetic:N``, ``shanshui:N``); several are concatenated.
        output: the run's folder (checkpoints, metrics, ``loss.png``, ``validation/``, ``final/``).
        image_column: CSV column / JSONL field of the image path.
        resolution: training images are resized (shorter side) and centre-cropped to this square.
        hflip: mirror each training image left-right with probability 1/2.
        val_fraction: share of the images held out for validation (at most ``val_max``).
        val_max: at most this many validation images.
        batch_size: global batch of one micro-step, all processes together.
        grad_accum: micro-steps per optimizer step.
        lr, weight_decay: AdamW (no weight decay on biases and norms).
        warmup_steps: linear warm-up, then ``lr_scheduler``.
        lr_scheduler: ``constant`` (a finished run can be extended as it was), or ``linear`` / ``cosine`` decay
            to zero at the last step.
        max_steps: optimizer steps (default: ``epochs`` passes over the training images).
        epochs: passes when ``max_steps`` is not given.
        max_grad_norm: clip the gradient norm (None: off).
        ema: export an exponential moving average of the weights (diffusers ``EMAModel``).
        ema_decay: its decay.
        mixed_precision: ``auto`` (GPU half, CPU none), ``no``, ``fp16`` (GPU) or ``bf16``.
        val_every: validate every N steps (0: at the end only).
        save_every: checkpoint every N steps (0: at the end only).
        keep_checkpoints: keep the newest K checkpoints.
        resume: ``latest`` or a checkpoint folder: continue that run exactly.
        overwrite: start afresh in an output folder holding another run.
        report_to: accelerate tracker, ``none`` or ``auto``.
        log_every: console line every N steps.
        seed: initialisation, data order and every random draw of the objective.
        cpu: train on the CPU even with a GPU.
    """

    data: list[str]
    output: str
    image_column: str = "image"
    caption_column: str = "caption"  # read by the pair readers; captions are ignored
    resolution: int = 64
    hflip: bool = False
    val_fraction: float = 0.02
    val_max: int = 256
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "constant"
    max_steps: int | None = None
    epochs: int = 1
    max_grad_norm: float | None = 1.0
    ema: bool = False
    ema_decay: float = 0.999
    mixed_precision: str = "auto"
    val_every: int = 500
    save_every: int = 1000
    keep_checkpoints: int = 3
    resume: str | None = None
    overwrite: bool = False
    report_to: str = "auto"
    log_every: int = 10
    seed: int = 0
    cpu: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        self.data = list(self.data)

    def to_json(self) -> dict:
        """The settings as JSON values (what ``run_config.json`` records)."""
        return json.loads(json.dumps(asdict(self), default=str))

    def check(self) -> None:
        """Reject bad shared settings before anything is loaded (one line each)."""
        if not self.data or not all(str(d).strip() for d in self.data):
            raise InvalidInputError("no training images given; pass --data (a folder, CSV, JSONL or shanshui:N)")
        if not str(self.output).strip():
            raise InvalidInputError("no output folder given; pass --output DIR")
        checks = [
            (self.resolution >= 16 and self.resolution % 8 == 0, "--resolution must be a multiple of 8, at least 16"),
            (0 <= self.val_fraction < 1, f"--val-fraction must lie in [0, 1), not {self.val_fraction}"),
            (self.val_max >= 1, f"--val-max must be at least 1, not {self.val_max}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, not {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, not {self.grad_accum}"),
            (self.lr > 0, f"--lr must be positive, not {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be 0 or more, not {self.weight_decay}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be 0 or more, not {self.warmup_steps}"),
            lr_scheduler_check(self.lr_scheduler),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1, not {self.max_steps}"),
            (self.epochs >= 1, f"--epochs must be at least 1, not {self.epochs}"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "--max-grad-norm must be positive"),
            (0 < self.ema_decay < 1, f"--ema-decay must lie in (0, 1), not {self.ema_decay}"),
            *run_control_checks(self),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInputError(message)
        check_fp16_device(self)


@dataclass
class VAETrainConfig(ImageTrainConfig):
    """Settings of one ``taiyi train vae`` run (the CLI flags map one to one onto these).

    Args (beyond :class:`ImageTrainConfig`):
        block_out_channels: channels per encoder/decoder level; n levels downsample by 2^(n−1)
            (diffusers' convention: (16, 32, 64) is factor 4, 16×16 latents at 64×64; 0.68 M parameters).
        latent_channels: latent channels (4, as Stable Diffusion).
        layers_per_block: ResNet blocks per level.
        norm_num_groups: GroupNorm groups (must divide every width).
        mid_attention: self-attention in the middle block (at the latent resolution).
        kl_weight: weight of the KL term (mean per latent element).
        edge_weight: weight of the L1 loss on finite-difference image gradients (0: off).
        chroma_weight: weight of the L1 loss on the colour part of the error (the error minus its mean over
            R, G, B): errors then fall on brightness, not hue, so greys stay grey (0: off).
        grey_fraction: share of training images turned grey (channel mean) at random, so grey pictures
            reconstruct grey (水墨 needs it; the check is ``ink_chroma`` / ``grey_chroma``).
        scale_images: training images measured for ``scaling_factor`` (at most).
        allow_pickle: accept a pickled (``.bin``) ``init``; refused by default since loading one can run code.
        init: start from this ``AutoencoderKL`` (its folder, or a pipeline folder's ``vae/``; safetensors only)
            instead of a fresh one; its architecture replaces the size settings above.
        decoder_only: with ``init``, train only the decoder (and ``post_quant_conv``): the encoder, hence every
            latent and the ``scaling_factor``, stays as it was, so diffusion models trained on the init's latents
            keep working with the new decoder (how Stable Diffusion's fine-tuned "ft-MSE" VAE was made).
        decode_padding: latent cells of edge padding around the latents whenever the decoder runs (training,
            validation, and every decode after, through ``_taiyi_decode_padding`` in the exported config), the
            picture's margin cropped off: the decoder's corners, where a decoder trained unpadded draws a dot
            into dark pictures, fall outside the picture. ``None``: the init's (0 for a fresh VAE).
    """

    block_out_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 16
    mid_attention: bool = True
    kl_weight: float = 1e-4
    edge_weight: float = 0.5
    chroma_weight: float = 1.0
    grey_fraction: float = 0.1
    scale_images: int = 1024
    init: str | None = None
    decoder_only: bool = False
    decode_padding: int | None = None
    allow_pickle: bool = False
    lr: float = 1e-3
    batch_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)


# --------------------------------------------------------------------------------------------------
# Images


@dataclass
class Images:
    """The training images of a run, in memory: (N, 3, R, R) uint8, with a seeded validation split."""

    pixels: torch.Tensor  # (N, 3, R, R) uint8
    train: torch.Tensor  # (n_train,) indices
    val: torch.Tensor  # (n_val,) indices
    names: list[str]
    skipped: int = 0

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Images ``indices`` as float (b, 3, R, R) in [-1, 1]."""
        return self.pixels[indices].float() / 127.5 - 1.0


def _shanshui_count(source: str) -> int | None:
    if not source.startswith(SHANSHUI_PREFIX):
        return None
    text = source[len(SHANSHUI_PREFIX) :]
    if not text.isdigit() or int(text) < 1:
        raise InvalidInputError(f"data source {source!r} needs a scene count, e.g. shanshui:5000")
    return int(text)


def _to_uint8(images, resolution: int) -> torch.Tensor:
    from .sd import preprocess

    return ((preprocess(images, resolution) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (b, 3, R, R)


def load_images(config: ImageTrainConfig) -> Images:
    """Read every source (captions ignored), resize + centre-crop to ``resolution``, split off validation.

    Raises:
        InvalidInputError: a source cannot be read or no readable image is found.
    """
    from .clip import _split
    from .clip import open_training_data as _open_data

    chunks, names, skipped = [], [], 0
    for source in config.data:
        n = _shanshui_count(source)
        if n is not None:
            from ..data.shanshui import ShanshuiDataset

            pairs = ShanshuiDataset(n, seed=0, size=max(config.resolution, 32), split="train")
        else:
            ds = _open_data(source, config, config.resolution, captions=False)
            if ds.streamed:
                raise InvalidInputError(f"{ds.name} is tar shards; image trainers read folders, CSV, JSONL")
            pairs = ds.pairs
        kept, before = [], skipped
        for i in range(len(pairs)):
            pair = pairs[i]
            if pair is None:
                skipped += 1
                continue
            kept.append(pair.image)
            if len(kept) == 256:
                chunks.append(_to_uint8(kept, config.resolution))
                kept = []
        if kept:
            chunks.append(_to_uint8(kept, config.resolution))
        names.append(source)
        if skipped > before:  # corrupt or missing images are skipped, and said so (as the other trainers do)
            counted = n is None and ds.skips is not None  # a folder, CSV or JSONL counts why
            logger.warning("%s: %s", source, ds.skips.summary() if counted else f"skipped {skipped - before} samples")
    if not chunks:
        raise InvalidInputError(f"no readable images in {', '.join(config.data)}; check --data")
    pixels = torch.cat(chunks)
    train, val = _split(len(pixels), config.val_fraction, config.val_max, config.seed)
    if len(train) < config.batch_size:
        raise InvalidInputError(
            f"{len(train)} training images (after holding out {len(val)}) are fewer than --batch-size "
            f"{config.batch_size}; lower it or give more images"
        )
    return Images(pixels, train, val, names, skipped)


def chroma(pixels: torch.Tensor) -> float:
    """Mean chroma (max − min over R, G, B, on a 0–1 scale) of (B, 3, H, W) pictures in [-1, 1]."""
    x = (pixels.clamp(-1, 1) + 1) / 2
    return float((x.amax(dim=1) - x.amin(dim=1)).mean())


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean PSNR in dB of (B, 3, H, W) pictures in [-1, 1] (peak = the 0–1 range)."""
    mse = (((reconstruction.clamp(-1, 1) - target) / 2) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)  # (B,)
    return float((10 * torch.log10(1.0 / mse)).mean())


# --------------------------------------------------------------------------------------------------
# The loop both image trainers share


def _micro_generator(seed: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + micro + 1)


def write_folder_atomic(out: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a sibling temporary folder, then replace ``out`` with it in one rename."""
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out


def run_image_training(
    config: ImageTrainConfig,
    *,
    name: str,
    build: Callable[[], nn.Module],
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict]],
    validate: Callable[[nn.Module, Images, int, Path], dict],
    export: Callable[[nn.Module, Images, Path], dict],
    resumable: tuple[str, ...] = RESUMABLE_CHANGES,
    inputs: Callable[[Images, object], Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> dict:
    """Train ``build()`` on ``config.data``'s images: the loop of ``taiyi train vae`` and ``taiyi train uncond``.

    Args:
        config: the run's settings (its own fields beyond :class:`ImageTrainConfig` are recorded too).
        name: the tracker's project name.
        build: makes the model (called once, under ``config.seed``).
        loss_fn: ``loss_fn(model, pixels (b, 3, R, R) in [-1, 1], generator) → (loss, extra metrics)``;
            every random draw of a micro-step must come from that generator (exact resume).
        validate: ``validate(model, images, step, output) → metrics row`` (main process; eval mode).
        export: ``export(model, images, final_dir) → info`` writes ``final_dir`` (main process).
        inputs: ``inputs(images, accelerator) → batch(indices)``: what ``loss_fn`` gets in place of the
            pixels of ``indices`` (e.g. cached latents); called once, before training.

    Returns:
        ``{"step", "total_steps", "output", "final", "checkpoint", "losses" ({step: loss} of this call),
        "val" (rows), "loss_plot", "train_seconds", "step_seconds", "resumed_from", "main_process",
        "model", "export" (what ``export`` returned)}``.
    """
    from accelerate.utils import set_seed

    from .clip import _flat_hparams, _make_accelerator, _param_groups
    from .sd import plot_losses

    config.check()
    output = Path(config.output)
    run_json = config.to_json()
    _check_output_dir(output, run_json, resume=config.resume, overwrite=config.overwrite, may_differ=resumable)
    checkpoint = resolve_resume(output, config.resume)
    images = load_images(config)
    accelerator = _make_accelerator(config, output)
    batch_of = inputs(images, accelerator) if inputs is not None else images.batch
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise InvalidInputError(
            f"--batch-size {config.batch_size} is the global batch and must be a multiple of the {world} processes"
        )
    local_batch = config.batch_size // world
    set_seed(config.seed)
    device = accelerator.device
    model = build()
    model.train()
    n_train = len(images.train)
    batches_per_epoch = max(n_train // config.batch_size, 1)
    total_steps = config.max_steps or config.epochs * max(batches_per_epoch // config.grad_accum, 1)
    accelerator.wait_for_everyone()
    if main:
        record_run(output, run_json, overwrite=config.overwrite)
    accelerator.wait_for_everyone()

    def plan(micro: int) -> torch.Tensor:
        """Image indices of the global batch of micro-step ``micro`` (seeded epoch order)."""
        epoch, position = divmod(micro, batches_per_epoch)
        order = images.train[torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed + epoch))]
        return order[position * config.batch_size : (position + 1) * config.batch_size]

    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    scheduler = make_lr_scheduler(
        optimizer, config.lr_scheduler, warmup_steps=config.warmup_steps, total_steps=total_steps
    )
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    ema = None
    if config.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(list(model.parameters()), decay=config.ema_decay)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)

    metrics = MetricsLog(output / METRICS, enabled=main)
    start_step, resumed_from = 0, None
    if config.resume is not None:
        if main:
            for path in remove_partial_checkpoints(output):
                logger.info("removed %s, a checkpoint left half-written by an interrupted run", path)
        accelerator.wait_for_everyone()
        if checkpoint is not None:
            state = load_checkpoint(accelerator, checkpoint, total_steps)
            start_step, resumed_from = int(state["step"]), checkpoint
            if main:
                logger.info("resumed from %s at step %d of %d", checkpoint, start_step, total_steps)
    if main:
        metrics.truncate_after(start_step)
    accelerator.wait_for_everyone()
    accelerator.init_trackers(name, config=_flat_hparams(config))

    val_rows: list[dict] = []

    def run_validation(step: int) -> None:
        if main:
            mode = model.training
            model.eval()
            if ema is not None:  # judge the weights that will be exported
                ema.store(model.parameters())
                ema.copy_to(model.parameters())
            with torch.no_grad():
                row = {"step": step, "kind": "val", **validate(model, images, step, output)}
            if ema is not None:
                ema.restore(model.parameters())
            model.train(mode)
            metrics.append(row)
            accelerator.log({f"val/{k}": v for k, v in row.items() if isinstance(v, float)}, step=step)
            logger.info("validation at step %d: %s", step, _describe(row))
            val_rows.append(row)
        accelerator.wait_for_everyone()

    step = start_step
    losses: dict[int, float] = {}
    step_seconds: list[float] = []
    window: list[torch.Tensor] = []
    extras: dict[str, list[float]] = {}
    if main and step < total_steps:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        logger.info(
            "training %s (%s) for %d steps from step %d (%d images, %d held out, batch %d x %d)",
            type(model).__name__,
            f"{total / 1e6:.2f} M parameters" + ("" if trained == total else f", {trained / 1e6:.2f} M trained"),
            total_steps,
            step,
            n_train,
            len(images.val),
            config.batch_size,
            config.grad_accum,
        )
    started = last = time.perf_counter()
    micro = step * config.grad_accum
    with StopOnSignal() as stop:
        while step < total_steps:
            indices = plan(micro)[rank * local_batch : (rank + 1) * local_batch]
            g = _micro_generator(config.seed, micro)
            pixels = batch_of(indices)  # (b, 3, R, R), or what ``inputs`` gives
            if config.hflip:
                flip = torch.rand(len(pixels), generator=g) < 0.5
                pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
            with accelerator.accumulate(wrapped):
                with accelerator.autocast():
                    loss, extra = loss_fn(wrapped, pixels.to(device), g)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(wrapped.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            window.append(loss.detach().float())
            for key, value in extra.items():
                extras.setdefault(key, []).append(float(value))
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            if ema is not None:
                ema.step(model.parameters())
            step += 1
            step_loss = float(accelerator.reduce(torch.stack(window).mean(), reduction="mean"))
            window = []
            row = {
                "step": step,
                "kind": "train",
                "loss": step_loss,
                "lr": lr,
                "epoch": round(micro / batches_per_epoch, 4),
            }
            row.update({k: sum(v) / len(v) for k, v in extras.items()})
            extras = {}
            now = time.perf_counter()
            step_seconds.append(now - last)
            losses[step] = step_loss
            metrics.append(row)
            accelerator.log({f"train/{k}": v for k, v in row.items() if k not in ("step", "kind")}, step=step)
            if main and (step % config.log_every == 0 or step == total_steps or step == start_step + 1):
                logger.info(
                    "step %d/%d loss %.4f lr %.3g (%.2f s/step)",
                    step,
                    total_steps,
                    step_loss,
                    lr,
                    sum(step_seconds) / len(step_seconds),
                )
            stop.requested(accelerator, step)  # every process, every step: they agree whether to stop
            if config.val_every and step % config.val_every == 0 and step < total_steps and not stop.stopping:
                run_validation(step)
            state = {"step": step, "micro_batches": micro, "total_steps": total_steps, "num_processes": world}
            stop.end_step(accelerator, output, config, step, total_steps, state)
            last = time.perf_counter()

    if ema is not None:
        ema.copy_to(model.parameters())
    final_dir = output / "final"
    loss_plot, info = None, {}
    model.eval()
    if step > start_step or not (output / METRICS).is_file():
        run_validation(step)  # every process: it ends at a barrier they all meet
    if main:
        with torch.no_grad():
            info = export(model, images, final_dir)
        loss_plot = plot_losses(metrics.read(), output / "loss.png")
        logger.info("saved %s", final_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    found = list_checkpoints(output)
    return {
        "step": step,
        "total_steps": total_steps,
        "output": output,
        "final": final_dir,
        "checkpoint": found[-1] if found else None,
        "losses": losses,
        "val": val_rows,
        "loss_plot": loss_plot,
        "train_seconds": sum(step_seconds),
        "loop_seconds": time.perf_counter() - started,
        "step_seconds": step_seconds,
        "resumed_from": resumed_from,
        "main_process": main,
        "model": model,
        "export": info,
    }


def _describe(row: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "kind")


# --------------------------------------------------------------------------------------------------
# The VAE


# the settings an --init VAE brings with it (its config's names)
INIT_ARCHITECTURE = {
    "block_out_channels": "block_out_channels",
    "latent_channels": "latent_channels",
    "layers_per_block": "layers_per_block",
    "norm_num_groups": "norm_num_groups",
    "mid_attention": "mid_block_add_attention",
}


def build_vae(config: VAETrainConfig):
    """A fresh ``AutoencoderKL`` of the configured size (downsampling factor 2^(levels − 1)), or the ``init`` one:
    then the config's size settings are set from it, and with ``decoder_only`` the encoder is frozen; either
    decodes with ``decode_padding`` when it is given."""
    vae = _build_vae(config)
    if config.decode_padding is not None:
        vae.register_to_config(**{DECODE_PADDING_KEY: config.decode_padding})
    return use_decode_padding(vae)


def _build_vae(config: VAETrainConfig):
    from diffusers import AutoencoderKL

    if config.init is not None:
        from .uncond import load_vae

        vae = load_vae(config.init, allow_pickle=config.allow_pickle)
        for ours, theirs in INIT_ARCHITECTURE.items():
            value = vae.config[theirs]
            setattr(config, ours, tuple(value) if isinstance(value, list) else value)
        vae.train().requires_grad_(True)
        if config.decoder_only:
            vae.encoder.requires_grad_(False)
            if vae.quant_conv is not None:
                vae.quant_conv.requires_grad_(False)
        return vae
    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.resolution,
        mid_block_add_attention=config.mid_attention,
    )


class _Autoencode(nn.Module):
    """One forward for accelerate: pixels + ε → (reconstruction, KL per latent element (B,))."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels).latent_dist
        z = dist.mean if eps is None else dist.mean + dist.std * eps  # (B, C, R/f, R/f)
        kl = dist.kl() / dist.mean[0].numel()  # (B,)
        return self.vae.decode(z).sample, kl


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    kl: torch.Tensor,
    kl_weight: float,
    edge_weight: float,
    chroma_weight: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """L1 + ``kl_weight`` × KL + ``edge_weight`` × L1 of image gradients + ``chroma_weight`` × L1 of the
    error's colour part (error minus its channel mean); returns (loss, its parts)."""
    l1 = F.l1_loss(reconstruction.float(), target.float())
    loss = l1 + kl_weight * kl.float().mean()
    parts = {"l1": l1.detach(), "kl": kl.detach().float().mean()}
    if edge_weight:
        (rx, ry), (tx, ty) = _edges(reconstruction.float()), _edges(target.float())
        edge = F.l1_loss(rx, tx) + F.l1_loss(ry, ty)
        loss = loss + edge_weight * edge
        parts["edge"] = edge.detach()
    if chroma_weight:
        error = reconstruction.float() - target.float()  # (B, 3, H, W)
        colour = (error - error.mean(dim=1, keepdim=True)).abs().mean()
        loss = loss + chroma_weight * colour
        parts["chroma"] = colour.detach()
    return loss, parts


def _ink_pictures(n: int, resolution: int) -> torch.Tensor:
    """``n`` rendered 水墨 scenes (fixed seeds), (n, 3, R, R) in [-1, 1]."""
    import dataclasses

    from ..data import shanshui

    g = np.random.default_rng([2024, 7])
    scenes = [dataclasses.replace(shanshui.sample_scene(g, "all"), style="水墨") for _ in range(n)]
    size = max(resolution, 32)
    return (
        _to_uint8([shanshui.render(s, size, [2024, i]) for i, s in enumerate(scenes)], resolution).float() / 127.5 - 1
    )


@torch.no_grad()
def reconstruction_report(vae, pixels: torch.Tensor, *, resolution: int, ink: int = 32) -> dict:
    """PSNR of posterior-mean reconstructions of ``pixels`` (B, 3, R, R) in [-1, 1]; chroma of reconstructed
    grey pictures (``pixels`` turned grey, and ``ink`` rendered 水墨 scenes) against the inputs' own."""
    auto = _Autoencode(vae)
    device = next(vae.parameters()).device
    row: dict = {}
    if len(pixels):
        recon = torch.cat([auto(p.to(device))[0].float().cpu() for p in pixels.split(64)])
        grey = pixels.mean(dim=1, keepdim=True).expand_as(pixels)
        recon_grey = torch.cat([auto(p.to(device))[0].float().cpu() for p in grey.split(64)])
        row.update(psnr=psnr(recon, pixels), l1=float((recon.clamp(-1, 1) - pixels).abs().mean()))
        row.update(grey_chroma=chroma(recon_grey))
    if ink:
        inks = _ink_pictures(ink, resolution)
        recon_ink = torch.cat([auto(p.to(device))[0].float().cpu() for p in inks.split(64)])
        row.update(ink_chroma=chroma(recon_ink), ink_input_chroma=chroma(inks), ink_psnr=psnr(recon_ink, inks))
    return row


@torch.no_grad()
def latent_std(vae, images: Images, n: int, seed: int) -> float:
    """Std of posterior samples of up to ``n`` training images (what ``scaling_factor`` normalises)."""
    device = next(vae.parameters()).device
    chosen = images.train[torch.randperm(len(images.train), generator=torch.Generator().manual_seed(seed))[:n]]
    g = torch.Generator().manual_seed(seed + 1)
    samples = []
    for part in chosen.split(64):
        dist = vae.encode(images.batch(part).to(device)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=g).to(device)
        samples.append((dist.mean + dist.std * eps).float().cpu())
    return float(torch.cat(samples).std())


def _validate_vae_config(config: VAETrainConfig) -> None:
    config.check()
    if config.decoder_only and config.init is None:
        raise InvalidInputError("--decoder-only needs --init VAE: the autoencoder whose decoder to fine-tune")
    if config.init is not None:  # fail before reading any image; the run takes the init's architecture
        build_vae(config)
    levels = config.block_out_channels
    checks = [
        (
            len(levels) >= 1 and all(c >= 1 for c in levels),
            "--block-out-channels needs positive widths, e.g. 32,64,64",
        ),
        (
            all(c % config.norm_num_groups == 0 for c in levels),
            f"--norm-num-groups {config.norm_num_groups} must divide every width of {list(levels)}",
        ),
        (
            config.resolution % 2 ** (len(levels) - 1) == 0,
            f"--resolution {config.resolution} must be divisible by the downsampling factor {2 ** (len(levels) - 1)}",
        ),
        (config.latent_channels >= 1, f"--latent-channels must be at least 1, not {config.latent_channels}"),
        (config.layers_per_block >= 1, f"--layers-per-block must be at least 1, not {config.layers_per_block}"),
        (config.kl_weight >= 0, f"--kl-weight must be 0 or more, not {config.kl_weight}"),
        (config.edge_weight >= 0, f"--edge-weight must be 0 or more, not {config.edge_weight}"),
        (config.chroma_weight >= 0, f"--chroma-weight must be 0 or more, not {config.chroma_weight}"),
        (0 <= config.grey_fraction <= 1, f"--grey-fraction must lie in [0, 1], not {config.grey_fraction}"),
        (config.scale_images >= 1, f"--scale-images must be at least 1, not {config.scale_images}"),
        (
            config.decode_padding is None or config.decode_padding >= 0,
            f"--decode-padding must be 0 or more latent cells, not {config.decode_padding}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidInputError(message)


def train_vae(config: VAETrainConfig) -> dict:
    """Train an ``AutoencoderKL`` from scratch and export it to ``OUTPUT/final`` with its ``scaling_factor``.

    Works as a plain process and under ``accelerate launch``.

    Args:
        config: the run's settings (see :class:`VAETrainConfig`).

    Returns:
        :func:`run_image_training`'s dict; ``"export"`` holds ``scaling_factor``, ``latent_std``,
        ``latent_shape`` and the final validation (``psnr``, ``grey_chroma``, ``ink_chroma`` ...).

    Raises:
        InvalidInputError: bad settings, no readable images, an output folder holding another run.
    """
    _validate_vae_config(config)
    val_ink = 32

    def loss_fn(model, pixels, g):
        eps_shape = (
            pixels.shape[0],
            config.latent_channels,
            *(s // 2 ** (len(config.block_out_channels) - 1) for s in pixels.shape[-2:]),
        )
        eps = torch.randn(eps_shape, generator=g).to(pixels.device)
        grey = (torch.rand(pixels.shape[0], generator=g) < config.grey_fraction).to(pixels.device)
        pixels = torch.where(grey[:, None, None, None], pixels.mean(dim=1, keepdim=True).expand_as(pixels), pixels)
        reconstruction, kl = model(pixels, eps)
        return vae_loss(reconstruction, pixels, kl, config.kl_weight, config.edge_weight, config.chroma_weight)

    def validate(model, images, step, output):
        return reconstruction_report(model.vae, images.batch(images.val), resolution=config.resolution, ink=val_ink)

    def export(model, images, final_dir):
        vae = model.vae
        if config.decoder_only:  # the latents are the init's: so is their scale
            std = 1.0 / float(vae.config.scaling_factor)
        else:
            std = latent_std(vae, images, config.scale_images, config.seed)
            vae.register_to_config(scaling_factor=1.0 / std)
        write_folder_atomic(final_dir, lambda tmp: vae.save_pretrained(tmp, safe_serialization=True))
        factor = 2 ** (len(config.block_out_channels) - 1)
        info = {
            "scaling_factor": 1.0 / std,
            "latent_std": std,
            "latent_shape": [config.latent_channels, config.resolution // factor, config.resolution // factor],
        }
        (final_dir.parent / "vae_report.json").write_text(
            json.dumps({**info, **(val_rows_last(final_dir.parent))}, indent=2) + "\n", encoding="utf-8"
        )
        logger.info("scaling_factor = 1/%.4f = %.4f", std, 1.0 / std)
        return info

    return run_image_training(
        config,
        name="vae",
        build=lambda: _Autoencode(build_vae(config)),
        loss_fn=loss_fn,
        validate=validate,
        export=export,
    )


def val_rows_last(output: Path) -> dict:
    """The newest validation row of a run's metrics (empty when none)."""
    rows = [r for r in MetricsLog(output / METRICS).read() if r.get("kind") == "val"]
    return {k: v for k, v in rows[-1].items() if k != "kind"} if rows else {}


__all__ = [
    "ImageTrainConfig",
    "Images",
    "VAETrainConfig",
    "build_vae",
    "chroma",
    "latent_std",
    "load_images",
    "psnr",
    "reconstruction_report",
    "run_image_training",
    "train_vae",
    "vae_loss",
]
