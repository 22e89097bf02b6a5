"""``taiyi train sd``: align a Chinese text encoder to a Stable Diffusion UNet (Taiyi SD stages 1 and 2).

The recipe (TAIYI.md §1, §3): stage 1 trains only the text encoder, with the UNet and the VAE frozen
(eval mode, ``requires_grad_(False)``, not in the optimizer, not in the checkpoints); stage 2 trains the
UNet too (the text encoder with it unless ``train_text_encoder=False``). The VAE is always frozen.

- Objective: latents = VAE posterior sample × ``vae.config.scaling_factor``; timesteps uniform over the
  scheduler's training steps; the target is the noise (``epsilon``) or the velocity (``v_prediction``),
  as the scheduler config says unless ``prediction_type`` overrides it; MSE, optionally min-SNR-γ
  weighted. Captions are replaced by ``""`` with probability ``caption_dropout`` (for classifier-free
  guidance). Prompts are encoded exactly as at inference (diffusers' ``encode_prompt``: padded to the
  tokenizer's ``model_max_length``, 512 for Taiyi BERT); longer captions are truncated and counted.
- Latent cache: since the VAE never changes, each sample's posterior *mean and std* are computed once
  (at ``resolution``, resize + centre crop) and stored in ``cache/latents-<key>.safetensors`` (key: data
  files, VAE weights, resolution). Every step then draws ``mean + std · ε`` with the step's generator,
  so cached and uncached runs see the same latents. ``cache_latents=False`` re-encodes every step, as
  the reference trainer does.
- All randomness of micro-step ``m`` (sample choice when mixing, caption dropout, the latent draw, the
  noise, the timesteps) comes from one generator seeded with ``(seed, m)``; dropout inside the text
  encoder uses the global RNG, which accelerate checkpoints. So ``resume`` continues exactly.
- Two ``data`` sources (e.g. Chinese and English captions) are mixed with ``mix_ratio`` (the share of
  samples drawn from the first), sampling with replacement; one source is read in seeded epoch order.
- LR: linear warm-up then constant (the diffusers scripts' default), so a finished run can be extended
  with a larger ``max_steps`` and ``resume``.
- Every ``val_every`` steps (and at the end) the fixed ``val_prompts`` are drawn with fixed seeds and
  saved as one grid PNG in ``validation/``; ``loss.png`` (drawn with Pillow) and ``metrics.jsonl`` hold
  the loss curve.
- ``final/`` is a pipeline folder (``taiyi generate --model OUTPUT/final``), written atomically by
  :func:`taiyi.assemble.write_pipeline_folder`; frozen components are copied file for file from the base.
- LoRA (``lora_rank``, ``taiyi train lora``): peft adapters on the UNet and/or the text encoder, base weights
  frozen; checkpoints hold the adapters only and ``final/pytorch_lora_weights.safetensors`` is diffusers'
  LoRA format (:mod:`taiyi.lora`). Prior preservation (``prior_data``) adds one class sample per instance
  sample and the weighted class loss (``taiyi train dreambooth``, :mod:`taiyi.train.dreambooth`).

Mixed precision: ``auto`` is bf16/fp16 on a GPU and off on CPU; ``fp16`` on CPU is refused (bf16 works
there). Gradient checkpointing works on any device (it only saves memory). The output folder is
described in :mod:`taiyi.train.common`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from ..data.decode import SkipSample
from ..errors import InvalidInputError
from ..prompts import check_prompt, require_text
from .clip import _DataSet, _flat_hparams, _make_accelerator, _param_groups
from .clip import open_training_data as _open_data
from .common import (
    METRICS,
    MetricsLog,
    StopOnSignal,
    check_fp16_device,
    list_checkpoints,
    load_checkpoint,
    lr_scheduler_check,
    make_lr_scheduler,
    on_main_process,
    record_run,
    remove_partial_checkpoints,
    resolve_resume,
    run_control_checks,
    step_dir_name,
)
from .common import check_output_dir as _check_output_dir

logger = logging.getLogger("taiyi")

CACHE_VERSION = "2"  # 2: keyed by the images, captions read from the source
PREDICTION_TYPES = ("epsilon", "v_prediction")
LORA_TARGETS = ("unet", "text", "both")
DEFAULT_VAL_PROMPTS = ("飞流直下三千尺，油画", "小桥流水人家", "一只红色的猫")
RESUMABLE_CHANGES = (
    "output",
    "resume",
    "overwrite",
    "max_steps",
    "epochs",
    "val_every",
    "val_prompts",
    "val_steps",
    "val_guidance",
    "save_every",
    "keep_checkpoints",
    "report_to",
    "log_every",
    "cache_dir",
    "cache_latents",  # the same latents either way (see the module docstring)
    "allow_pickle",
    "cpu",
)


@dataclass
class SDTrainConfig:
    """Settings of one ``taiyi train sd`` run (the CLI flags map one to one onto these).

    Args:
        model: the pipeline to train (folder, short name or hub id), e.g. the output of ``taiyi assemble``.
        data: one or two pair sources (folder of ``x.jpg`` + ``x.txt``, CSV, JSONL, or ``synthetic:N``).
        output: the run's folder (checkpoints, metrics, ``validation/``, ``loss.png``, ``final/``).
        stage: 1 — text encoder only (UNet and VAE frozen); 2 — UNet too.
        train_text_encoder: in stage 2, train the text encoder as well (default on); stage 1 always does.
        mix_ratio: with two sources, the share of samples drawn from the first (default 0.5).
        image_column, caption_column: CSV columns / JSONL fields.
        resolution: training images are resized (shorter side) and centre-cropped to this square.
        batch_size: global batch of one micro-step, all processes together.
        grad_accum: micro-steps per optimizer step.
        lr, weight_decay, betas, eps: AdamW (Taiyi: lr 1e-4, weight decay 0.1; none on biases and norms).
        text_encoder_lr: the text encoder's learning rate where it differs from the UNet's (None: ``lr``), as
            diffusers' ``--text_encoder_lr``: e.g. a stage 2 that teaches the text encoder new words while the
            UNet only adapts. Same schedule and warm-up.
        warmup_steps: linear warm-up steps, then ``lr_scheduler``.
        lr_scheduler: ``constant`` (diffusers' default), or ``linear`` / ``cosine`` decay to zero at the last step.
        max_steps: optimizer steps (default: ``epochs`` passes over the data).
        epochs: passes over the data when ``max_steps`` is not given.
        max_grad_norm: clip the gradient norm (None: off).
        prediction_type: ``epsilon`` or ``v_prediction``; None follows the model's scheduler config.
        caption_dropout: probability of training a sample with the empty caption (classifier-free guidance).
        snr_gamma: min-SNR-γ loss weighting (None: plain MSE; 5.0 is the paper's value).
        noise_offset: add ``noise_offset · N(0, 1)`` per sample and channel to the noise (diffusers'
            ``train_text_to_image`` convention; ~0.05–0.1 lets the model draw darker and brighter images).
        lora_rank: train LoRA adapters of this rank instead of the weights (base weights frozen); ``final/``
            then holds ``pytorch_lora_weights.safetensors`` (diffusers format) instead of a pipeline, and
            ``lora_target`` (not ``stage``) says what is adapted.
        lora_alpha: the LoRA scale numerator (the update is scaled by alpha / rank); None: the rank.
        lora_target: ``unet`` (attention to_q/to_k/to_v/to_out.0), ``text`` (the text encoder's attention
            projections: BERT query/key/value/attention.output.dense, CLIP q/k/v/out_proj) or ``both``.
        prior_data: DreamBooth prior preservation: class pairs drawn alongside ``data`` (one per instance
            sample); the loss is the instance loss + ``prior_loss_weight`` × the class loss.
        prior_loss_weight: the weight of the prior-preservation loss.
        teacher: a Stable Diffusion pipeline (folder, short name or hub id) whose predictions the trained model
            learns from, e.g. the English SD a Chinese text encoder is aligned to. Each sample's target becomes
            the teacher's prediction for the same noisy latent, conditioned on ``teacher_data``'s caption of the
            same picture, instead of (or mixed with, ``teacher_weight``) the noise / velocity. In expectation
            this is the same target — a model that denoises perfectly predicts the mean of the noise given the
            noisy latent and caption — with far less variance per sample. Needs the same VAE and prediction type.
        teacher_data: one per ``data`` source: its pictures, row for row, captioned in the teacher's language (a
            JSONL or CSV listing the same image files in the same order: the English twins of a Chinese
            manifest; for a source already in that language, the source itself).
        teacher_weight: the loss is (1 − w) × the diffusion loss + w × the distillation loss (both min-SNR-γ
            weighted alike).
        ema: keep an exponential moving average of the trained weights and export it.
        ema_decay: its decay.
        mixed_precision: ``auto``, ``no``, ``fp16`` (GPU only) or ``bf16``.
        gradient_checkpointing: recompute activations of the trained modules in the backward pass.
        cache_latents: encode each image once (VAE frozen) instead of every step.
        cache_dir: latent cache folder (default ``output/cache``).
        val_prompts: prompts drawn for the validation grid.
        val_every: validation grid every N steps (0: at the end only).
        val_steps: denoising steps of the validation images.
        val_guidance: their classifier-free guidance scale.
        save_every: checkpoint every N steps (0: at the end only).
        keep_checkpoints: keep the newest K checkpoints.
        resume: ``latest`` or a checkpoint folder: continue that run exactly.
        overwrite: start afresh in an output folder holding another run.
        report_to: accelerate tracker, ``none`` or ``auto``.
        log_every: console line every N steps.
        seed: data order and every random draw of the objective.
        allow_pickle: accept pickled ``.bin`` weights.
        cpu: train on the CPU even with a GPU.
    """

    model: str
    data: list[str]
    output: str
    stage: int = 1
    train_text_encoder: bool | None = None
    mix_ratio: float | None = None
    image_column: str = "image"
    caption_column: str = "caption"
    resolution: int = 512
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    text_encoder_lr: float | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_scheduler: str = "constant"
    max_steps: int | None = None
    epochs: int = 1
    max_grad_norm: float | None = 1.0
    prediction_type: str | None = None
    caption_dropout: float = 0.0
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_target: str = "unet"
    prior_data: str | None = None
    prior_loss_weight: float = 1.0
    teacher: str | None = None
    teacher_data: list[str] | None = None
    teacher_weight: float = 1.0
    ema: bool = False
    ema_decay: float = 0.9999
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    cache_dir: str | None = None
    val_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_VAL_PROMPTS))
    val_every: int = 500
    val_steps: int = 20
    val_guidance: float = 7.5
    save_every: int = 1000
    keep_checkpoints: int = 3
    resume: str | None = None
    overwrite: bool = False
    report_to: str = "auto"
    log_every: int = 10
    seed: int = 0
    allow_pickle: bool = False
    cpu: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        self.data = list(self.data)
        if isinstance(self.teacher_data, str):
            self.teacher_data = [self.teacher_data]
        if self.teacher_data is not None:
            self.teacher_data = list(self.teacher_data)
        self.val_prompts = list(self.val_prompts)

    def to_json(self) -> dict:
        """The settings as JSON values (what ``run_config.json`` records)."""
        return json.loads(json.dumps(asdict(self), default=str))


# --------------------------------------------------------------------------------------------------
# Checks


def validate_config(config: SDTrainConfig) -> None:
    """Reject bad settings before anything is loaded."""
    if not config.data or not all(str(d).strip() for d in config.data):
        raise InvalidInputError("no training data given; pass --data (a folder, CSV, JSONL or synthetic:N)")
    if not str(config.output).strip():
        raise InvalidInputError("no output folder given; pass --output DIR")
    for prompt in config.val_prompts:
        require_text(prompt, "--val-prompt")
        try:
            check_prompt(prompt)
        except InvalidInputError:  # found only when drawing the grid, after the training: say so now
            raise InvalidInputError(
                f"--val-prompt {prompt!r} is empty; give a prompt to draw, e.g. --val-prompt 小桥流水人家"
            ) from None
    checks = [
        (config.stage in (1, 2), f"--stage must be 1 (text encoder) or 2 (text encoder + UNet), not {config.stage}"),
        (len(config.data) <= 2, f"--data may be given at most twice (two sources to mix), not {len(config.data)}"),
        (
            config.mix_ratio is None or len(config.data) == 2,
            "--mix-ratio mixes two sources; give --data twice or drop it",
        ),
        (config.mix_ratio is None or 0 < config.mix_ratio < 1, "--mix-ratio must lie strictly between 0 and 1"),
        (
            config.stage == 2 or config.train_text_encoder is not False,
            "stage 1 trains the text encoder; it cannot be off",
        ),
        (config.resolution >= 16 and config.resolution % 8 == 0, "--resolution must be a multiple of 8, at least 16"),
        (config.batch_size >= 1, f"--batch-size must be at least 1, not {config.batch_size}"),
        (config.grad_accum >= 1, f"--grad-accum must be at least 1, not {config.grad_accum}"),
        (config.lr > 0, f"--lr must be positive, not {config.lr}"),
        (
            config.text_encoder_lr is None or config.text_encoder_lr > 0,
            f"--text-encoder-lr must be positive, not {config.text_encoder_lr}",
        ),
        (config.weight_decay >= 0, f"--weight-decay must be 0 or more, not {config.weight_decay}"),
        (config.warmup_steps >= 0, "--warmup-steps must be 0 or more"),
        lr_scheduler_check(config.lr_scheduler),
        (config.max_steps is None or config.max_steps >= 1, f"--max-steps must be at least 1, not {config.max_steps}"),
        (config.epochs >= 1, f"--epochs must be at least 1, not {config.epochs}"),
        (config.max_grad_norm is None or config.max_grad_norm > 0, "--max-grad-norm must be positive"),
        (
            config.prediction_type is None or config.prediction_type in PREDICTION_TYPES,
            f"--prediction-type must be epsilon or v_prediction, not {config.prediction_type!r}",
        ),
        (0 <= config.caption_dropout < 1, f"--caption-dropout must lie in [0, 1), not {config.caption_dropout}"),
        (config.snr_gamma is None or config.snr_gamma > 0, "--snr-gamma must be positive"),
        (config.noise_offset >= 0, f"--noise-offset must be 0 or more, not {config.noise_offset}"),
        (
            config.lora_rank is None or config.lora_rank >= 1,
            f"the LoRA rank (--rank, --lora-rank) must be at least 1, not {config.lora_rank}",
        ),
        (config.lora_alpha is None or config.lora_alpha > 0, f"--alpha must be positive, not {config.lora_alpha}"),
        (
            config.lora_target in LORA_TARGETS,
            f"--target must be one of {', '.join(LORA_TARGETS)}, not {config.lora_target!r}",
        ),
        (
            config.lora_rank is None or config.train_text_encoder is None,
            "with LoRA, --target (unet, text or both) says what is trained; drop --train-text-encoder",
        ),
        (config.prior_data is None or len(config.data) == 1, "prior preservation takes one --data source"),
        (config.prior_loss_weight >= 0, f"--prior-loss-weight must be 0 or more, not {config.prior_loss_weight}"),
        (
            (config.teacher is None) == (config.teacher_data is None),
            "--teacher and --teacher-data go together: the teacher model and the same pictures in its language",
        ),
        (
            config.teacher_data is None or len(config.teacher_data) == len(config.data),
            "give --teacher-data once per --data source (the same pictures, in the teacher's language)",
        ),
        (config.teacher is None or config.prior_data is None, "--teacher does not combine with prior preservation"),
        (config.teacher is None or config.lora_rank is None, "--teacher trains whole weights; drop LoRA's --rank"),
        (0 < config.teacher_weight <= 1, f"--teacher-weight must lie in (0, 1], not {config.teacher_weight}"),
        (0 < config.ema_decay < 1, f"--ema-decay must lie in (0, 1), not {config.ema_decay}"),
        (config.val_steps >= 1, f"--val-steps must be at least 1, not {config.val_steps}"),
        *run_control_checks(config),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidInputError(message)
    check_fp16_device(config)


def check_text_encoder(sd, name: str) -> None:
    """The text encoder must give ``last_hidden_state`` as wide as the UNet's cross-attention."""
    from ..assemble import check_text_width, cross_attention_dim

    width = getattr(sd.text_encoder.config, "hidden_size", None)
    if width is None:
        raise InvalidInputError(
            f"the text encoder of {name} ({type(sd.text_encoder).__name__}) has no hidden size; "
            "use a BERT or CLIP text encoder"
        )
    check_text_width(int(width), cross_attention_dim(dict(sd.unet.config)), f"of {name}", name)


# --------------------------------------------------------------------------------------------------
# Images → latents


def preprocess(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution``, centre-crop a square, scale to [-1, 1]: (B, 3, R, R)."""
    out = []
    for image in images:
        w, h = image.size
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        image = image.convert("RGB").resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
        out.append(torch.from_numpy(array).permute(2, 0, 1))
    return torch.stack(out)


@torch.no_grad()
def encode_posterior(vae, pixels: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen VAE's posterior mean and std (B, 4, R/f, R/f), float32, on the CPU."""
    dist = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def vae_fingerprint(vae) -> str:
    """A hash of the VAE's weights: cached latents are valid for exactly these."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(vae.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


@dataclass
class _Latents:
    """Per-sample posterior mean/std and captions of a whole source (rows of unreadable samples invalid)."""

    mean: torch.Tensor  # (N, 4, h, w)
    std: torch.Tensor  # (N, 4, h, w)
    valid: torch.Tensor  # (N,) bool
    captions: list[str]


def _images_fingerprint(pairs) -> str | None:
    """What identifies the images of an indexed source, row by row: each image file's resolved path, size
    and modification time (``None`` for sources without image files: synthetic pairs)."""
    if not hasattr(pairs, "image_file"):
        return None
    digest = hashlib.blake2b(digest_size=16)
    for i in range(len(pairs)):
        file = pairs.image_file(i)
        try:
            st = file.stat() if file is not None else None
        except OSError:
            st = None
        digest.update(
            f"{file.resolve() if file else ''}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode()
        )
    return digest.hexdigest()


def cached_latents(data: _DataSet, vae, accelerator, resolution: int, cache_dir: Path) -> tuple[_Latents, Path, bool]:
    """Load the latent cache of ``data`` or compute it (main process) and store it; returns (table, path, computed).

    The cache is keyed by the images (their files, the VAE's weights, the resolution), not by the captions:
    sources that list the same pictures with other captions (a Chinese and an English manifest) share one
    file, and captions are read from the source itself. Sources without image files (``synthetic:N``)
    keep their captions in the cache.
    """
    from safetensors.torch import load_file, save_file

    images = _images_fingerprint(data.pairs)
    key = hashlib.blake2b(
        f"{CACHE_VERSION}|{images or data.fingerprint}|{vae_fingerprint(vae)}|{resolution}".encode(), digest_size=8
    ).hexdigest()
    path = cache_dir / f"latents-{key}.safetensors"
    missing = not path.is_file()

    def encode() -> bool:
        means, stds, valid, captions = [], [], [], []
        n = len(data.pairs)
        for start in range(0, n, 16):
            if images:
                pictures = [data.pairs.image(i) for i in range(start, min(start + 16, n))]
                texts = [""] * len(pictures)
            else:
                pairs = [data.pairs[i] for i in range(start, min(start + 16, n))]
                pictures = [p.image if p is not None else None for p in pairs]
                texts = [p.caption if p is not None else "" for p in pairs]
            kept = [p for p in pictures if p is not None]
            if kept:
                mean, std = encode_posterior(vae, preprocess(kept, resolution), accelerator.device)
            it = iter(range(len(kept)))
            for picture, text in zip(pictures, texts, strict=True):
                if picture is None:
                    means.append(None), stds.append(None), valid.append(False), captions.append("")
                else:
                    j = next(it)
                    means.append(mean[j]), stds.append(std[j]), valid.append(True), captions.append(text)
        shape = next((m.shape for m in means if m is not None), None)
        if shape is None:
            raise InvalidInputError(f"data source {data.name} holds no readable image-text pair")
        zero = torch.zeros(shape)
        tensors = {
            "mean": torch.stack([m if m is not None else zero for m in means]).contiguous(),
            "std": torch.stack([s if s is not None else zero for s in stds]).contiguous(),
            "valid": torch.tensor(valid, dtype=torch.uint8),
        }
        if not images:
            tensors["captions"] = torch.frombuffer(
                bytearray(json.dumps(captions, ensure_ascii=False).encode()), dtype=torch.uint8
            )
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a shared cache folder may have two writers
        save_file(tensors, str(tmp), metadata={"source": data.name, "resolution": str(resolution)})
        os.replace(tmp, path)
        return True

    # Every process looks before the main one writes, so all take the same branch (and meet at its barrier);
    # data with no readable picture, or a full disk, ends every process with the main one's line.
    accelerator.wait_for_everyone()
    computed = bool(on_main_process(accelerator, encode)) if missing else False
    tensors = load_file(path)
    valid = tensors["valid"].bool()
    if "captions" in tensors:
        captions = json.loads(bytes(tensors["captions"].numpy()).decode("utf-8"))
    else:  # keyed by the images: this source's own captions (a row without a usable one is left out)
        captions = [data.pairs.caption(i) if valid[i] else None for i in range(len(valid))]
        valid &= torch.tensor([c is not None for c in captions], dtype=torch.bool)
        captions = [c or "" for c in captions]
    return _Latents(tensors["mean"], tensors["std"], valid, captions), path, computed


# --------------------------------------------------------------------------------------------------
# A teacher


@dataclass
class _Teacher:
    """A frozen pipeline (its tokenizer and a denoiser with nothing trained); its predictions are targets."""

    tokenizer: object
    denoiser: _Denoiser

    @torch.no_grad()
    def predict(self, captions: list[str], noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        encoder = self.denoiser._frozen["text_encoder"]
        ids, mask, _ = tokenize(self.tokenizer, encoder, captions, noisy.device)
        return self.denoiser(ids, mask, noisy, timesteps)  # (B, 4, h, w)


def load_teacher(config: SDTrainConfig, vae, noise_scheduler, prediction_type: str, device) -> _Teacher:
    """The frozen teacher of ``config.teacher``; it must share the trained model's latent space (its VAE),
    noise schedule and prediction type, or its predictions would not be targets for the same noisy latents."""
    from ..loading import load_stable_diffusion
    from ..models import resolve_model

    folder, name = resolve_model(config.teacher)
    sd = load_stable_diffusion(
        Path(folder), device=torch.device("cpu"), dtype=torch.float32, safety_checker=False,
        allow_pickle=config.allow_pickle,
    )  # fmt: skip
    if vae_fingerprint(sd.vae) != vae_fingerprint(vae):
        raise InvalidInputError(
            f"the teacher {name} has another VAE than the model: its predictions live in another latent space"
        )
    kind = sd.scheduler.config.get("prediction_type", "epsilon")
    if kind != prediction_type:
        raise InvalidInputError(f"the teacher {name} predicts {kind!r} where the model predicts {prediction_type!r}")
    theirs = type(noise_scheduler).from_config(sd.scheduler.config).alphas_cumprod
    if theirs.shape != noise_scheduler.alphas_cumprod.shape or not torch.equal(theirs, noise_scheduler.alphas_cumprod):
        raise InvalidInputError(f"the teacher {name} has another noise schedule than the model")
    sd.text_encoder.requires_grad_(False).eval().to(device)
    sd.unet.requires_grad_(False).eval().to(device)
    return _Teacher(sd.tokenizer, _Denoiser(sd.text_encoder, sd.unet, train_text=False, train_unet=False))


def teacher_captions(config: SDTrainConfig, source: str, data: _DataSet) -> list[str | None]:
    """Per row of ``data``, its picture's caption in ``source`` (None where that row is unusable).

    Raises:
        InvalidInputError: ``source`` does not list the same pictures in the same order.
    """
    teacher = _open_data(source, config, config.resolution)
    mine, theirs = _images_fingerprint(data.pairs), _images_fingerprint(teacher.pairs)
    if mine is None or mine != theirs:
        raise InvalidInputError(
            f"--teacher-data {teacher.name} must list the pictures of --data {data.name}, row for row "
            f"({len(teacher.pairs)} rows against {len(data.pairs)})"
        )
    out: list[str | None] = []
    for i in range(len(teacher.pairs)):
        try:
            out.append(teacher.pairs.caption(i))
        except SkipSample:
            out.append(None)
    return out


# --------------------------------------------------------------------------------------------------
# The model being trained


class _Denoiser(nn.Module):
    """The trained modules (text encoder and/or UNet) as one module for accelerate; frozen ones are held
    outside the module tree (not wrapped, not in the optimizer, not checkpointed)."""

    def __init__(
        self, text_encoder: nn.Module, unet: nn.Module, *, train_text: bool, train_unet: bool, lora_only: bool = False
    ):
        super().__init__()
        self.text_encoder = text_encoder if train_text else None
        self.unet = unet if train_unet else None
        self._frozen = {"text_encoder": text_encoder, "unet": unet}  # a dict: not registered as submodules
        if lora_only:
            # Checkpoints hold the adapters only: the frozen base weights are the model's own files.
            self.register_state_dict_post_hook(_keep_lora_tensors)
            self.register_load_state_dict_post_hook(_ignore_missing_base)

    def forward(self, input_ids, attention_mask, noisy_latents, timesteps):
        encoder = self.text_encoder if self.text_encoder is not None else self._frozen["text_encoder"]
        if self.text_encoder is None:
            with torch.no_grad():
                hidden = encoder(input_ids, attention_mask=attention_mask)[0]  # (B, L, D)
        else:
            hidden = encoder(input_ids, attention_mask=attention_mask)[0]  # (B, L, D)
        unet = self.unet if self.unet is not None else self._frozen["unet"]
        return unet(noisy_latents, timesteps, hidden).sample  # (B, 4, h, w)


def _module_param_groups(trainable: _Denoiser, config: SDTrainConfig) -> list[dict]:
    """AdamW groups: decay on matrices only, and the text encoder at ``text_encoder_lr`` where that is set."""
    if config.text_encoder_lr is None or trainable.text_encoder is None:
        return _param_groups(trainable, config.weight_decay)
    groups = [{**g, "lr": config.text_encoder_lr} for g in _param_groups(trainable.text_encoder, config.weight_decay)]
    if trainable.unet is not None:
        groups += _param_groups(trainable.unet, config.weight_decay)
    return [g for g in groups if g["params"]]


def _keep_lora_tensors(module, state_dict, prefix, local_metadata) -> None:  # noqa: ARG001 (torch's signature)
    for key in [k for k in state_dict if k.startswith(prefix) and ".lora_" not in k]:
        del state_dict[key]


def _ignore_missing_base(module, incompatible_keys) -> None:  # noqa: ARG001 (torch's signature)
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if ".lora_" in k]


def add_lora_adapters(unet: nn.Module | None, text_encoder: nn.Module | None, config: SDTrainConfig) -> None:
    """Add trainable peft LoRA adapters (named ``default``) to the UNet and/or the text encoder; their base
    weights stay frozen. ``lora_A`` is drawn from the global RNG (seeded by the run), ``lora_B`` starts at zero."""
    from peft import LoraConfig

    from ..lora import UNET_TARGETS, text_encoder_targets

    alpha = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
    for module, targets in ((unet, UNET_TARGETS), (text_encoder, None)):
        if module is None:
            continue
        targets = targets or text_encoder_targets(module)
        module.add_adapter(
            LoraConfig(
                r=config.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)
            )
        )


def tokenize(tokenizer, text_encoder, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Captions as diffusers' ``encode_prompt`` tokenizes prompts: (ids (B, L), mask or None, n truncated)."""
    length = tokenizer.model_max_length
    counts = [len(ids) for ids in tokenizer(captions, add_special_tokens=False, truncation=False).input_ids]
    truncated = sum(n > length - 2 for n in counts)
    tokens = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return tokens.input_ids.to(device), mask, truncated


def diffusion_loss(
    prediction: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler,
    prediction_type: str,
    snr_gamma: float | None = None,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE to the noise (epsilon) or the velocity (v_prediction), optionally min-SNR-γ weighted per sample;
    ``target`` replaces that target (a teacher's prediction), weighted alike."""
    if target is None:
        target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is None:
        return per_sample.mean()
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    weight = torch.clamp(snr, max=snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    return (per_sample * weight).mean()


# --------------------------------------------------------------------------------------------------
# Loss curve


def plot_losses(rows: list[dict], path: Path, *, size: tuple[int, int] = (640, 400)) -> Path | None:
    """Draw the training loss per step (and its running mean) as a PNG with Pillow; None without rows."""
    points = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and np.isfinite(r.get("loss", np.nan))]
    if not points:
        return None
    w, h = size
    left, right, top, bottom = 60, 20, 20, 40
    steps = np.array([p[0] for p in points], dtype=float)
    losses = np.array([p[1] for p in points], dtype=float)
    lo, hi = float(losses.min()), float(losses.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = float(steps.min()), float(max(steps.max(), steps.min() + 1))

    def xy(s, v):
        return left + (s - s0) / (s1 - s0) * (w - left - right), top + (hi - v) / (hi - lo) * (h - top - bottom)

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black")
    for value in (lo, (lo + hi) / 2, hi):
        y = xy(s0, value)[1]
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((2, y - 6), f"{value:.4g}", fill="black")
    draw.text((left, h - bottom + 8), f"step {int(s0)}", fill="black")
    draw.text((w - right - 70, h - bottom + 8), f"step {int(steps.max())}", fill="black")
    draw.text((w // 2 - 30, h - 16), "training loss", fill="black")
    line = [xy(s, v) for s, v in zip(steps, losses, strict=True)]
    draw.line(line if len(line) > 1 else line * 2, fill=(160, 160, 220), width=1)
    k = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    draw.line([xy(s, v) for s, v in zip(steps[k - 1 :], smooth, strict=True)] or line * 2, fill=(200, 30, 30), width=2)
    tmp = path.with_name(f".{path.name}.tmp.png")
    image.save(tmp)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------
# Training


def _summed(accelerator, *counts: int) -> list[int]:
    """``counts`` summed over the processes (a collective call: every process makes it)."""
    if accelerator.num_processes == 1:
        return list(counts)
    return [int(c) for c in accelerator.reduce(torch.tensor(counts, device=accelerator.device), reduction="sum")]


def _micro_generator(seed: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + micro + 1)


def train_sd(config: SDTrainConfig) -> dict:
    """Train a Stable Diffusion pipeline's text encoder (stage 1) or text encoder + UNet (stage 2).

    Works as a plain process and under ``accelerate launch`` (every process calls this). Seeds the global
    RNGs with ``config.seed`` (dropout), as a training entry point does.

    Args:
        config: the run's settings (see :class:`SDTrainConfig`).

    Returns:
        ``{"step", "total_steps", "output", "final", "lora" (the LoRA file or None), "checkpoint",
        "losses" ({step: loss} of this call), "prior_losses" ({step: class loss} with ``prior_data``),
        "truncated" (captions longer than the encoder window), "skipped" (unreadable samples),
        "validation" (grid PNG paths), "loss_plot", "cache" (paths), "cache_seconds", "train_seconds",
        "step_seconds", "resumed_from", "num_processes", "main_process", "pipeline" (the trained diffusers
        pipeline)}``.

    Raises:
        InvalidInputError: bad settings, data with no pairs, an incompatible text encoder, an output folder
            holding another run.
    """
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler

    from ..assemble import write_pipeline_folder
    from ..loading import load_stable_diffusion, vae_factor
    from ..models import resolve_model

    validate_config(config)
    output = Path(config.output)
    run_json = config.to_json()
    _check_output_dir(output, run_json, resume=config.resume, overwrite=config.overwrite, may_differ=RESUMABLE_CHANGES)
    checkpoint = resolve_resume(output, config.resume)
    accelerator = _make_accelerator(config, output)
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise InvalidInputError(
            f"--batch-size {config.batch_size} is the global batch and must be a multiple of the {world} processes"
        )
    local_batch = config.batch_size // world
    set_seed(config.seed)
    device = accelerator.device

    # --- model -------------------------------------------------------------------------------------
    folder, name = resolve_model(config.model)
    folder = Path(folder)
    sd = load_stable_diffusion(
        folder, device=torch.device("cpu"), dtype=torch.float32, safety_checker=False, allow_pickle=config.allow_pickle
    )
    check_text_encoder(sd, name)
    text_encoder, unet, vae, tokenizer = sd.text_encoder, sd.unet, sd.vae, sd.tokenizer
    lora = config.lora_rank is not None
    if lora:
        train_text, train_unet = config.lora_target in ("text", "both"), config.lora_target in ("unet", "both")
    else:
        train_text = config.stage == 1 or config.train_text_encoder is not False
        train_unet = config.stage == 2
    vae.requires_grad_(False).eval()
    unet.requires_grad_(train_unet and not lora).train(train_unet)
    text_encoder.requires_grad_(train_text and not lora).train(train_text)
    if lora:
        add_lora_adapters(unet if train_unet else None, text_encoder if train_text else None, config)
    if getattr(text_encoder, "pooler", None) is not None:
        # Prompt embeddings are the last hidden state: the pooler gets no gradient (and DDP would stall on it).
        text_encoder.pooler.requires_grad_(False)
    if config.gradient_checkpointing:
        if train_unet:
            unet.enable_gradient_checkpointing()
        if train_text and hasattr(text_encoder, "activation_checkpointing_enable"):  # transformers >= 5.20
            text_encoder.activation_checkpointing_enable({"use_reentrant": False})
        elif train_text:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    noise_scheduler = DDPMScheduler.from_config(sd.scheduler.config)
    prediction_type = config.prediction_type or noise_scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise InvalidInputError(f"the scheduler of {name} predicts {prediction_type!r}; pass --prediction-type")
    noise_scheduler.register_to_config(prediction_type=prediction_type)
    scaling = float(vae.config.scaling_factor)
    side = config.resolution // vae_factor(vae)
    latent_shape = (vae.config.latent_channels, side, side)  # (4, h, w) of one sample
    vae.to(device)
    unet.to(device)
    text_encoder.to(device)
    teacher = load_teacher(config, vae, noise_scheduler, prediction_type, device) if config.teacher else None

    # --- data --------------------------------------------------------------------------------------
    prior = config.prior_data is not None
    sources = [_open_data(src, config, config.resolution) for src in [*config.data, *([config.prior_data] * prior)]]
    for ds in sources:
        if ds.streamed:
            raise InvalidInputError(
                f"{ds.name} is tar shards; taiyi train sd reads folders, CSV or JSONL (convert the shards)"
            )
        if len(ds.pairs) == 0:
            raise InvalidInputError(f"data source {ds.name} holds no image-text pairs")
    cache_dir = Path(config.cache_dir) if config.cache_dir else output / "cache"
    tables: list[_Latents | None] = [None] * len(sources)
    cache_paths, cache_seconds, skipped_in_cache = [], 0.0, 0
    if config.cache_latents:
        started = time.perf_counter()
        for i, ds in enumerate(sources):
            table, path, computed = cached_latents(ds, vae, accelerator, config.resolution, cache_dir)
            tables[i] = table
            cache_paths.append(path)
            skipped_in_cache += int((~table.valid).sum())
            if main:
                logger.info(
                    "latents of %s: %s %s (%d samples, %d unreadable)",
                    ds.name,
                    "computed and cached in" if computed else "loaded from",
                    path,
                    len(table.captions),
                    int((~table.valid).sum()),
                )
                if computed and ds.skips is not None and ds.skips.total:  # why, as the other trainers say
                    logger.warning("%s: %s", ds.name, ds.skips.summary())
        cache_seconds = time.perf_counter() - started
    pools = [
        torch.nonzero(t.valid).flatten() if t is not None else torch.arange(len(ds.pairs))
        for t, ds in zip(tables, sources, strict=True)
    ]
    taught: list[list[str | None]] | None = None
    if teacher is not None:
        taught = [teacher_captions(config, src, ds) for src, ds in zip(config.teacher_data, sources, strict=True)]
        for k, pool in enumerate(pools):
            pools[k] = pool[torch.tensor([taught[k][int(i)] is not None for i in pool], dtype=torch.bool)]
    for pool, ds in zip(pools, sources, strict=True):
        if len(pool) == 0:
            raise InvalidInputError(f"data source {ds.name} holds no readable image-text pair")
    mixing = len(sources) == 2 and not prior
    ratio = config.mix_ratio if config.mix_ratio is not None else 0.5
    n_total = len(pools[0]) if prior else sum(len(p) for p in pools)
    if not mixing and len(pools[0]) < config.batch_size:
        raise InvalidInputError(
            f"{len(pools[0])} readable pairs are fewer than --batch-size {config.batch_size}; lower it or add data"
        )
    batches_per_epoch = max(n_total // config.batch_size, 1)
    steps_per_epoch = max(batches_per_epoch // config.grad_accum, 1)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    accelerator.wait_for_everyone()
    if main:
        record_run(output, run_json, overwrite=config.overwrite)
    accelerator.wait_for_everyone()

    def local_items(micro: int) -> list[tuple[int, int]]:
        """This process's share of micro-step ``micro``: its instance samples, then as many class samples."""
        items = plan(micro)[rank * local_batch : (rank + 1) * local_batch]
        if prior:
            # The class images are read in their own seeded epoch order, one per instance sample.
            position = micro * config.batch_size + rank * local_batch
            for k in range(position, position + local_batch):
                epoch, i = divmod(k, len(pools[1]))
                g = torch.Generator().manual_seed(config.seed * 1_000_003 + 700_001 + epoch)
                items.append((1, int(pools[1][torch.randperm(len(pools[1]), generator=g)[i]])))
        return items

    def plan(micro: int) -> list[tuple[int, int]]:
        """The global batch of micro-step ``micro`` as (source, sample index) pairs."""
        if mixing:
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + 500_009 + micro)
            out = []
            for _ in range(config.batch_size):
                s = 0 if float(torch.rand((), generator=g)) < ratio else 1
                out.append((s, int(pools[s][int(torch.randint(len(pools[s]), (), generator=g))])))
            return out
        epoch, position = divmod(micro, batches_per_epoch)
        order = pools[0][torch.randperm(len(pools[0]), generator=torch.Generator().manual_seed(config.seed + epoch))]
        return [(0, int(i)) for i in order[position * config.batch_size : (position + 1) * config.batch_size]]

    def read_batch(items: list[tuple[int, int]]):
        """(mean, std (b, 4, h, w), captions, places (of the readable samples in ``items``), skipped,
        is_prior (b,), the teacher's captions or None) of this process's readable samples."""
        means, stds, captions, images, places, kept, theirs = [], [], [], [], [], [], []
        for place, (s, i) in enumerate(items):
            table = tables[s]
            if table is not None:
                means.append(table.mean[i]), stds.append(table.std[i]), captions.append(table.captions[i])
            else:
                pair = sources[s].pairs[i]
                if pair is None:
                    continue
                images.append(pair.image), captions.append(pair.caption)
            places.append(place)
            kept.append(prior and s == 1)
            theirs.append(taught[s][i] if taught is not None else None)
        skipped = len(items) - len(places)
        is_prior = torch.tensor(kept, dtype=torch.bool)
        theirs = theirs if taught is not None else None
        if images:
            mean, std = encode_posterior(vae, preprocess(images, config.resolution), device)
            return mean, std, captions, places, skipped, is_prior, theirs
        if not means:
            return None, None, captions, places, skipped, is_prior, theirs
        return torch.stack(means), torch.stack(stds), captions, places, skipped, is_prior, theirs

    # --- optimizer, schedule, accelerate -------------------------------------------------------------
    trainable = _Denoiser(text_encoder, unet, train_text=train_text, train_unet=train_unet, lora_only=lora)
    optimizer = torch.optim.AdamW(
        _module_param_groups(trainable, config), lr=config.lr, betas=tuple(config.betas), eps=config.eps
    )
    scheduler = make_lr_scheduler(
        optimizer, config.lr_scheduler, warmup_steps=config.warmup_steps, total_steps=total_steps
    )
    model, optimizer = accelerator.prepare(trainable, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    text_own_rate = config.text_encoder_lr is not None and trainable.text_encoder is not None  # logged beside lr
    ema = None
    if config.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel([p for p in trainable.parameters() if p.requires_grad], decay=config.ema_decay)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)

    # --- resume ------------------------------------------------------------------------------------
    metrics = MetricsLog(output / METRICS, enabled=main)
    start_step, resumed_from, skipped_total, truncated_total = 0, None, 0, 0
    if config.resume is not None:
        if main:
            for path in remove_partial_checkpoints(output):
                logger.info("removed %s, a checkpoint left half-written by an interrupted run", path)
        accelerator.wait_for_everyone()
        if checkpoint is not None:
            state = load_checkpoint(accelerator, checkpoint, total_steps)
            start_step, resumed_from = int(state["step"]), checkpoint
            skipped_total, truncated_total = int(state.get("skipped", 0)), int(state.get("truncated", 0))
            if main:
                logger.info("resumed from %s at step %d of %d", checkpoint, start_step, total_steps)
    if main:
        metrics.truncate_after(start_step)
    accelerator.wait_for_everyone()
    accelerator.init_trackers("sd", config=_flat_hparams(config))

    # --- validation grid -------------------------------------------------------------------------------
    val_dir = output / "validation"
    val_paths: list[Path] = []

    def validate(step: int) -> None:
        if main and config.val_prompts:
            from diffusers import StableDiffusionPipeline

            from ..pipeline import TaiyiPipeline, make_grid

            te_mode, unet_mode = text_encoder.training, unet.training
            text_encoder.eval(), unet.eval()
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=sd.scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.set_progress_bar_config(disable=True)
            taiyi = TaiyiPipeline(pipe, model=name, device=device, dtype=torch.float32)
            images = []
            with torch.no_grad():
                for i, prompt in enumerate(config.val_prompts):
                    result = taiyi.generate(
                        prompt,
                        steps=config.val_steps,
                        guidance=config.val_guidance,
                        seed=config.seed + i,
                        width=max(config.resolution, 64),  # the pipeline's smallest size
                        height=max(config.resolution, 64),
                    )
                    images += result.images
            val_dir.mkdir(parents=True, exist_ok=True)
            path = val_dir / f"{step_dir_name(step)}.png"
            tmp = val_dir / f".{path.name}.tmp.png"
            make_grid(images).save(tmp)
            os.replace(tmp, path)
            val_paths.append(path)
            metrics.append({"step": step, "kind": "val", "grid": str(path.relative_to(output))})
            text_encoder.train(te_mode), unet.train(unet_mode)
        accelerator.wait_for_everyone()

    # --- the loop ------------------------------------------------------------------------------------
    step = start_step
    losses: dict[int, float] = {}
    step_seconds: list[float] = []
    window: list[torch.Tensor] = []
    prior_window: list[torch.Tensor] = []
    prior_losses: dict[int, float] = {}
    if main and step < total_steps:
        logger.info(
            "stage %d: training %s for %d steps from step %d (%d pairs, global batch %d x %d, %s, latents %s)",
            config.stage,
            " + ".join(n for n, on in (("text encoder", train_text), ("UNet", train_unet)) if on),
            total_steps,
            step,
            n_total,
            config.batch_size,
            config.grad_accum,
            prediction_type,
            "cached" if config.cache_latents else "encoded every step",
        )
    started = last = time.perf_counter()
    micro = step * config.grad_accum
    with StopOnSignal() as stop:
        while step < total_steps:
            items = local_items(micro)
            g = _micro_generator(config.seed, micro)
            # Every draw from g is made for the whole global batch, in this order, and each process takes its own
            # rows: N processes draw what one process with the global batch draws.
            per_step = (2 if prior else 1) * config.batch_size  # with prior preservation: + one class sample each
            drop = torch.rand(per_step, generator=g) < config.caption_dropout
            mean, std, captions, places, skipped, is_prior, theirs = read_batch(items)
            # Counted over all processes: the log, the checkpoint and the loss's weight speak of the global batch.
            readable, skipped = _summed(accelerator, len(places), skipped)
            skipped_total += skipped
            if readable == 0:
                raise InvalidInputError(
                    f"every sample of micro-batch {micro} was unreadable ({skipped_total} so far); check the data"
                )
            # The mean over the global batch's readable samples, however they fall between processes (DDP
            # averages the processes' gradients): one process with the global batch trains the same.
            weight = len(places) * world / readable
            if mean is None:  # all of this process's share was unreadable: a stand-in of no weight keeps it in step
                mean = std = torch.zeros((1, *latent_shape))
                captions, places, is_prior = [""], [0], torch.zeros(1, dtype=torch.bool)
                theirs = [""] if theirs is not None else None
            # Each sample's own row of the global draws, as one process with the global batch draws them: the
            # global batch's instance samples, then (prior preservation) its class samples.
            first = rank * local_batch
            rows = torch.tensor([(p // local_batch) * config.batch_size + first + p % local_batch for p in places])
            kept_drop = drop[rows]
            captions = ["" if d else c for c, d in zip(captions, kept_drop.tolist(), strict=True)]
            if theirs is not None:  # a dropped caption is dropped for the teacher too: its unconditional prediction
                theirs = ["" if d else c for c, d in zip(theirs, kept_drop.tolist(), strict=True)]
            latent_eps = torch.randn((per_step, *mean.shape[1:]), generator=g)[rows]
            noise = torch.randn((per_step, *mean.shape[1:]), generator=g)[rows]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (per_step,), generator=g)
            timesteps = timesteps[rows]
            if config.noise_offset:  # drawn last: runs without it keep their draws
                offset = torch.randn((per_step, mean.shape[1], 1, 1), generator=g)[rows]  # (b, 4, 1, 1)
                noise = noise + config.noise_offset * offset
            latents = ((mean + std * latent_eps) * scaling).to(device)  # (b, 4, h, w)
            noise, timesteps = noise.to(device), timesteps.to(device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            ids, mask, truncated = tokenize(tokenizer, text_encoder, captions, device)
            truncated_total += truncated
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    prediction = model(ids, mask, noisy, timesteps)
                if prior:
                    inst, cls = ~is_prior.to(device), is_prior.to(device)
                    parts = [
                        diffusion_loss(
                            prediction[m],
                            latents[m],
                            noise[m],
                            timesteps[m],
                            noise_scheduler,
                            prediction_type,
                            config.snr_gamma,
                        )
                        if bool(m.any())
                        else prediction.sum() * 0.0
                        for m in (inst, cls)
                    ]
                    prior_window.append(parts[1].detach())
                    loss = parts[0] + config.prior_loss_weight * parts[1]
                else:
                    loss = diffusion_loss(
                        prediction, latents, noise, timesteps, noise_scheduler, prediction_type, config.snr_gamma
                    )
                if teacher is not None:
                    with accelerator.autocast():
                        target = teacher.predict(theirs, noisy, timesteps)
                    distill = diffusion_loss(
                        prediction, latents, noise, timesteps, noise_scheduler, prediction_type, config.snr_gamma,
                        target=target,
                    )  # fmt: skip
                    w = config.teacher_weight
                    loss = distill if w == 1 else (1 - w) * loss + w * distill
                if weight != 1:
                    loss = loss * weight
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            window.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            rates = scheduler.get_last_lr()  # the text encoder's groups first (see _module_param_groups)
            lr, text_lr = rates[-1], (rates[0] if text_own_rate else None)
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            if ema is not None:
                ema.step([p for p in trainable.parameters() if p.requires_grad])
            step += 1
            step_loss = float(accelerator.reduce(torch.stack(window).mean(), reduction="mean"))
            window = []
            now = time.perf_counter()
            step_seconds.append(now - last)
            losses[step] = step_loss
            row = {
                "step": step,
                "kind": "train",
                "loss": step_loss,
                "lr": lr,
                **({"text_encoder_lr": text_lr} if text_lr is not None else {}),
                "epoch": round(micro / batches_per_epoch, 4),
            }
            if prior:
                prior_losses[step] = row["prior_loss"] = float(
                    accelerator.reduce(torch.stack(prior_window).mean(), reduction="mean")
                )
                prior_window = []
            metrics.append(row)
            accelerator.log({"train/loss": step_loss, "train/lr": lr}, step=step)
            if main and (step % config.log_every == 0 or step == total_steps or step == start_step + 1):
                logger.info(
                    "step %d/%d loss %.4f lr %.3g%s (%.2f s/step)%s%s",
                    step,
                    total_steps,
                    step_loss,
                    lr,
                    f" (text encoder {text_lr:.3g})" if text_lr is not None else "",
                    sum(step_seconds) / len(step_seconds),
                    f", {truncated_total} captions truncated to the encoder window" if truncated_total else "",
                    f", {skipped_total} unreadable samples skipped" if skipped_total else "",
                )
            stop.requested(accelerator, step)  # every process, every step: they agree whether to stop
            if config.val_every and step % config.val_every == 0 and step < total_steps and not stop.stopping:
                validate(step)
            state = {
                "step": step,
                "micro_batches": micro,
                "total_steps": total_steps,
                "num_processes": world,
                "skipped": skipped_total,
                "truncated": truncated_total,
            }
            stop.end_step(accelerator, output, config, step, total_steps, state)
            last = time.perf_counter()
    train_seconds = sum(step_seconds)
    if main and truncated_total:
        logger.warning(
            "%d training captions were longer than the text encoder's %d tokens and were truncated",
            truncated_total,
            tokenizer.model_max_length,
        )

    # --- the end -----------------------------------------------------------------------------------
    if ema is not None:
        ema.copy_to([p for p in trainable.parameters() if p.requires_grad])
    if step > start_step or not val_paths:
        validate(step)
    final_dir = output / "final"
    loss_plot = None
    if main and lora:
        from ..lora import save_lora

        text_encoder.eval(), unet.eval()
        if final_dir.exists():
            for stale in [p for p in final_dir.iterdir() if p.name != "pytorch_lora_weights.safetensors"]:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()  # a pipeline from a full run before
        lora_file = save_lora(
            final_dir, unet=unet if train_unet else None, text_encoder=text_encoder if train_text else None
        )
        loss_plot = plot_losses(metrics.read(), output / "loss.png")
        logger.info("saved %s (taiyi generate --model %s --lora %s)", lora_file, folder, lora_file)
    elif main:
        text_encoder.eval(), unet.eval()
        write_pipeline_folder(
            final_dir,
            unet=unet if train_unet else folder / "unet",
            vae=folder / "vae",
            scheduler=folder / "scheduler",
            text_encoder=text_encoder,  # unchanged tensors when frozen
            tokenizer=tokenizer,
            overwrite=True,
        )
        loss_plot = plot_losses(metrics.read(), output / "loss.png")
        logger.info("saved %s (taiyi generate --model %s)", final_dir, final_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    found = list_checkpoints(output)
    return {
        "step": step,
        "total_steps": total_steps,
        "output": output,
        "final": final_dir,
        "lora": final_dir / "pytorch_lora_weights.safetensors" if lora else None,
        "checkpoint": found[-1] if found else None,
        "losses": losses,
        "prior_losses": prior_losses,
        "truncated": truncated_total,
        "skipped": skipped_in_cache + skipped_total,
        "validation": val_paths,
        "loss_plot": loss_plot,
        "cache": cache_paths,
        "cache_seconds": cache_seconds,
        "train_seconds": train_seconds,
        "loop_seconds": time.perf_counter() - started,
        "step_seconds": step_seconds,
        "resumed_from": resumed_from,
        "prediction_type": prediction_type,
        "num_processes": world,
        "main_process": main,
        "pipeline": sd,
    }


__all__ = ["SDTrainConfig", "diffusion_loss", "plot_losses", "train_sd", "validate_config"]
