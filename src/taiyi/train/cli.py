"""``taiyi train ...`` commands. Each maps its flags one to one onto a config object and calls the
plain training function (:func:`taiyi.train.clip.train_clip`, :func:`taiyi.train.sd.train_sd`), so the
command and the Python API are one code path. Torch and accelerate are imported only when a command runs.

Run on one process as ``taiyi train clip ...``, or on several with accelerate::

    accelerate launch --config_file configs/accelerate/ddp.yaml -m taiyi.cli train clip ...

``--batch-size`` is the global batch and ``--lr`` is not scaled by the number of processes: N processes train
what one process with the same flags trains. On a machine without a GPU, ``accelerate launch --multi_gpu
--num_processes N`` (configs/accelerate/cpu_2proc.yaml) starts N CPU processes joined with gloo; ``--cpu`` starts
one, whatever ``--num_processes`` says (a warning says so), and FSDP is refused.
"""

from __future__ import annotations

from typing import Annotated

import typer

train_app = typer.Typer(
    help="Training: Chinese CLIP (locked-image), Stable Diffusion (text encoder, UNet).", no_args_is_help=True
)

_PANEL_DATA, _PANEL_OPT, _PANEL_RUN = "Data", "Optimisation", "Run, checkpoints, logging"


def _opt(*names: str, help: str, panel: str | None = None, **kwargs) -> typer.models.OptionInfo:
    return typer.Option(*names, help=help, rich_help_panel=panel, **kwargs)


def _prepare() -> None:
    """Before a trainer runs: quiet the libraries, and refuse (or warn about) a launch this machine cannot give."""
    from ..cli import _quiet_libraries
    from .common import check_launch

    _quiet_libraries()
    check_launch()


# Run-control options every trainer shares (one definition each).
SaveEvery = Annotated[
    int | None, _opt("--save-every", help="Checkpoint every N steps [1000]; 0: at the end.", panel=_PANEL_RUN)
]
KeepCheckpoints = Annotated[
    int | None, _opt("--keep-checkpoints", help="Keep the newest K checkpoints [3].", panel=_PANEL_RUN)
]
Resume = Annotated[
    str | None, _opt("--resume", help="'latest' or a checkpoint folder: continue that run.", panel=_PANEL_RUN)
]
OverwriteRun = Annotated[
    bool,
    _opt(
        "--overwrite",
        help="Start afresh in an --output holding another run (its checkpoints, metrics and exports are removed; "
        "other files stay).",
        panel=_PANEL_RUN,
    ),
]
ReportTo = Annotated[
    str | None,
    _opt("--report-to", help="tensorboard, wandb, ..., none [auto: tensorboard if installed].", panel=_PANEL_RUN),
]
LogEvery = Annotated[int | None, _opt("--log-every", help="Console line every N steps [10].", panel=_PANEL_RUN)]
Cpu = Annotated[bool, _opt("--cpu", help="Train on the CPU even with a GPU.", panel=_PANEL_RUN)]


@train_app.command()
def clip(
    data: Annotated[
        str,
        _opt(
            "--data", help="Pairs: folder of x.jpg+x.txt, .csv, .jsonl, tar shards, or synthetic:N.", panel=_PANEL_DATA
        ),
    ],
    output: Annotated[str, _opt("--output", "-o", help="Run folder (checkpoints, metrics, logs, final/).")],
    text_tower: Annotated[
        str | None, _opt("--text-tower", help="Taiyi-CLIP text tower: short name, hub id or folder.")
    ] = None,
    image_tower: Annotated[
        str | None,
        _opt("--image-tower", help="CLIP image model (hub id or folder); default: the text tower's own."),
    ] = None,
    init_from: Annotated[
        str | None, _opt("--init-from", help="Start from a taiyi Chinese CLIP folder instead of --text-tower.")
    ] = None,
    new_clip: Annotated[
        bool, _opt("--new-clip", help="Train a CLIP from scratch: both towers, BPE tokenizer from the captions.")
    ] = False,
    from_config: Annotated[
        str | None, _opt("--from-config", help="CLIPConfig JSON over the miniature sizes (implies --new-clip).")
    ] = None,
    vocab_size: Annotated[
        int | None, _opt("--vocab-size", help="--new-clip: tokens of the learned BPE tokenizer [1024].")
    ] = None,
    allow_pickle: Annotated[bool, _opt("--allow-pickle", help="Accept pickled .bin weights (can run code).")] = False,
    image_column: Annotated[
        str | None, _opt("--image-column", help="CSV/JSONL image column [image].", panel=_PANEL_DATA)
    ] = None,
    caption_column: Annotated[
        str | None, _opt("--caption-column", help="CSV/JSONL caption column [caption].", panel=_PANEL_DATA)
    ] = None,
    negative_column: Annotated[
        str | None,
        _opt(
            "--negative-column",
            help="CSV/JSONL column of hard-negative captions, one per row (NegCLIP) [off].",
            panel=_PANEL_DATA,
        ),
    ] = None,
    val_data: Annotated[
        str | None, _opt("--val-data", help="Held-out pairs (default: a share of --data).", panel=_PANEL_DATA)
    ] = None,
    val_fraction: Annotated[
        float | None, _opt("--val-fraction", help="Share of --data held out [0.05]; 0: none.", panel=_PANEL_DATA)
    ] = None,
    val_max: Annotated[
        int | None, _opt("--val-max", help="At most this many val pairs [1000].", panel=_PANEL_DATA)
    ] = None,
    val_every: Annotated[
        int | None, _opt("--val-every", help="Validate every N steps [500]; 0: start and end only.", panel=_PANEL_DATA)
    ] = None,
    num_workers: Annotated[
        int | None, _opt("--num-workers", help="Image decoding worker processes [0].", panel=_PANEL_DATA)
    ] = None,
    cache_image_features: Annotated[
        bool | None,
        _opt(
            "--cache-image-features/--no-cache-image-features",
            help="Compute frozen image features once [on with a frozen tower].",
            panel=_PANEL_DATA,
        ),
    ] = None,
    cache_dir: Annotated[
        str | None, _opt("--cache-dir", help="Feature cache folder [OUTPUT/cache].", panel=_PANEL_DATA)
    ] = None,
    batch_size: Annotated[
        int | None, _opt("--batch-size", help="Global batch, all processes together [64].", panel=_PANEL_OPT)
    ] = None,
    grad_accum: Annotated[
        int | None, _opt("--grad-accum", help="Micro-batches per optimizer step [1].", panel=_PANEL_OPT)
    ] = None,
    lr: Annotated[
        float | None, _opt("--lr", help="Peak learning rate [1e-5; --new-clip 5e-4].", panel=_PANEL_OPT)
    ] = None,
    weight_decay: Annotated[
        float | None, _opt("--weight-decay", help="AdamW weight decay [0.1].", panel=_PANEL_OPT)
    ] = None,
    beta1: Annotated[float | None, _opt("--beta1", help="AdamW beta1 [0.9].", panel=_PANEL_OPT)] = None,
    beta2: Annotated[float | None, _opt("--beta2", help="AdamW beta2 [0.98].", panel=_PANEL_OPT)] = None,
    eps: Annotated[float | None, _opt("--eps", help="AdamW epsilon [1e-6].", panel=_PANEL_OPT)] = None,
    warmup_steps: Annotated[
        int | None, _opt("--warmup-steps", help="Linear warm-up steps [1% of the steps].", panel=_PANEL_OPT)
    ] = None,
    max_steps: Annotated[
        int | None, _opt("--max-steps", help="Optimizer steps [--epochs passes].", panel=_PANEL_OPT)
    ] = None,
    epochs: Annotated[int | None, _opt("--epochs", help="Passes over the data [1].", panel=_PANEL_OPT)] = None,
    max_grad_norm: Annotated[
        float | None, _opt("--max-grad-norm", help="Clip the gradient norm [off].", panel=_PANEL_OPT)
    ] = None,
    mixed_precision: Annotated[
        str | None,
        _opt(
            "--mixed-precision", help="auto, no, fp16 or bf16 [auto: bf16/fp16 on GPU, no on CPU].", panel=_PANEL_OPT
        ),
    ] = None,
    gradient_checkpointing: Annotated[
        bool, _opt("--gradient-checkpointing", help="Recompute text-tower activations.", panel=_PANEL_OPT)
    ] = False,
    unfreeze_image_tower: Annotated[
        bool, _opt("--unfreeze-image-tower", help="Train the image tower too (off in Taiyi).", panel=_PANEL_OPT)
    ] = False,
    seed: Annotated[int | None, _opt("--seed", help="Data order, val split, dropout [0].", panel=_PANEL_OPT)] = None,
    save_every: SaveEvery = None,
    keep_checkpoints: KeepCheckpoints = None,
    resume: Resume = None,
    overwrite: OverwriteRun = False,
    report_to: ReportTo = None,
    log_every: LogEvery = None,
    cpu: Cpu = False,
) -> None:
    """Locked-image training: a Chinese text tower learns a frozen CLIP image tower's space (Taiyi-CLIP).

    Writes OUTPUT/final (loads with load_clip) and OUTPUT/taiyi-text-tower (published Taiyi-CLIP layout).
    With --new-clip, trains a whole CLIP from scratch; OUTPUT/final is then a standard CLIP folder.
    """
    given = {k: v for k, v in locals().items() if v is not None}  # unset flags keep the config's defaults
    beta1, beta2 = given.pop("beta1", None), given.pop("beta2", None)
    _prepare()
    from .clip import ClipTrainConfig, train_clip

    if beta1 is not None or beta2 is not None:
        default = ClipTrainConfig.__dataclass_fields__["betas"].default
        given["betas"] = (beta1 if beta1 is not None else default[0], beta2 if beta2 is not None else default[1])
    result = train_clip(ClipTrainConfig(**given))
    if result["main_process"]:
        typer.echo(str(result["final"]))


# Options of the Stable Diffusion trainers (sd, lora, dreambooth), defined once. [x] is train sd's default.
_Model = Annotated[
    str, _opt("--model", help="Pipeline to train (folder, short name, hub id), e.g. from taiyi assemble.")
]
_ImageColumn = Annotated[str | None, _opt("--image-column", help="CSV/JSONL image column [image].", panel=_PANEL_DATA)]
_CaptionColumn = Annotated[
    str | None, _opt("--caption-column", help="CSV/JSONL caption column [caption].", panel=_PANEL_DATA)
]
_Resolution = Annotated[
    int | None, _opt("--resolution", help="Training image side (resize + centre crop) [512].", panel=_PANEL_DATA)
]
_CacheLatents = Annotated[
    bool | None,
    _opt("--cache-latents/--no-cache-latents", help="Encode each image once (VAE frozen) [on].", panel=_PANEL_DATA),
]
_CacheDir = Annotated[str | None, _opt("--cache-dir", help="Latent cache folder [OUTPUT/cache].", panel=_PANEL_DATA)]
_BatchSize = Annotated[
    int | None, _opt("--batch-size", help="Global batch, all processes together [1].", panel=_PANEL_OPT)
]
_GradAccum = Annotated[
    int | None, _opt("--grad-accum", help="Micro-batches per optimizer step [1].", panel=_PANEL_OPT)
]
_Lr = Annotated[
    float | None, _opt("--lr", help="Learning rate [1e-4; dreambooth 5e-6, with LoRA 1e-4].", panel=_PANEL_OPT)
]
_WeightDecay = Annotated[
    float | None, _opt("--weight-decay", help="AdamW weight decay [0.1; dreambooth 0.01].", panel=_PANEL_OPT)
]
_WarmupSteps = Annotated[
    int | None, _opt("--warmup-steps", help="Linear warm-up, then --lr-scheduler [0].", panel=_PANEL_OPT)
]
_LrScheduler = Annotated[
    str | None,
    _opt("--lr-scheduler", help="After warm-up: constant, or linear/cosine decay to 0 [constant].", panel=_PANEL_OPT),
]
_MaxSteps = Annotated[
    int | None, _opt("--max-steps", help="Optimizer steps [--epochs passes; dreambooth 400].", panel=_PANEL_OPT)
]
_Epochs = Annotated[int | None, _opt("--epochs", help="Passes over the data [1].", panel=_PANEL_OPT)]
_MaxGradNorm = Annotated[float | None, _opt("--max-grad-norm", help="Clip the gradient norm [1.0].", panel=_PANEL_OPT)]
_PredictionType = Annotated[
    str | None, _opt("--prediction-type", help="epsilon or v_prediction [the scheduler config's].", panel=_PANEL_OPT)
]
_CaptionDropout = Annotated[
    float | None, _opt("--caption-dropout", help="Empty-caption probability, for CFG [0].", panel=_PANEL_OPT)
]
_SnrGamma = Annotated[
    float | None, _opt("--snr-gamma", help="Min-SNR-γ loss weighting, e.g. 5 [off].", panel=_PANEL_OPT)
]
_NoiseOffset = Annotated[
    float | None,
    _opt("--noise-offset", help="Per-channel noise offset, e.g. 0.05 (darker/brighter images) [0].", panel=_PANEL_OPT),
]
_Ema = Annotated[bool, _opt("--ema", help="Export an EMA of the trained weights.", panel=_PANEL_OPT)]
_EmaDecay = Annotated[float | None, _opt("--ema-decay", help="EMA decay [0.9999].", panel=_PANEL_OPT)]
_MixedPrecision = Annotated[
    str | None,
    _opt("--mixed-precision", help="auto, no, fp16 (GPU) or bf16 [auto: GPU half, CPU none].", panel=_PANEL_OPT),
]
_GradientCheckpointing = Annotated[
    bool, _opt("--gradient-checkpointing", help="Recompute activations of trained modules.", panel=_PANEL_OPT)
]
_Seed = Annotated[int | None, _opt("--seed", help="Data order and noise [0].", panel=_PANEL_OPT)]
_ValPrompt = Annotated[
    list[str] | None,
    _opt("--val-prompt", help="Validation prompt (repeatable) [three Chinese prompts].", panel=_PANEL_RUN),
]
_ValEvery = Annotated[
    int | None, _opt("--val-every", help="Validation grid every N steps [500]; 0: at the end.", panel=_PANEL_RUN)
]
_ValSteps = Annotated[
    int | None, _opt("--val-steps", help="Denoising steps of validation images [20].", panel=_PANEL_RUN)
]
_AllowPickle = Annotated[bool, _opt("--allow-pickle", help="Accept pickled .bin weights (can run code).")]
_Rank = Annotated[int, _opt("--rank", help="LoRA rank (4-128 is usual).", panel=_PANEL_OPT)]
_Alpha = Annotated[
    float | None, _opt("--alpha", help="LoRA alpha: updates are scaled by alpha/rank [the rank].", panel=_PANEL_OPT)
]
_Target = Annotated[
    str | None,
    _opt("--target", help="What LoRA adapts: unet, text (the text encoder) or both [unet].", panel=_PANEL_OPT),
]


def _run_sd_trainer(given: dict, kind: str) -> None:
    """Build the config of ``kind`` (sd, lora, dreambooth) from the given flags, train, print what was written."""
    if "val_prompt" in given:
        given["val_prompts"] = given.pop("val_prompt")
    for flag, field in (("rank", "lora_rank"), ("alpha", "lora_alpha"), ("target", "lora_target")):
        if flag in given:
            given[field] = given.pop(flag)
    _prepare()
    if kind == "dreambooth":
        from .dreambooth import DreamBoothConfig as Config
        from .dreambooth import train_dreambooth as train
    else:
        from .sd import SDTrainConfig as Config
        from .sd import train_sd as train

    result = train(Config(**given))
    if result["main_process"]:
        typer.echo(str(result["lora"] or result["final"]))


@train_app.command()
def sd(
    model: _Model,
    data: Annotated[
        list[str],
        _opt(
            "--data",
            help="Pairs: folder of x.jpg+x.txt, .csv, .jsonl or synthetic:N; twice to mix two sources.",
            panel=_PANEL_DATA,
        ),
    ],
    output: Annotated[str, _opt("--output", "-o", help="Run folder (checkpoints, metrics, validation/, final/).")],
    stage: Annotated[
        int | None, _opt("--stage", help="1: text encoder only; 2: UNet too (Taiyi bilingual) [1].", panel=_PANEL_OPT)
    ] = None,
    train_text_encoder: Annotated[
        bool | None,
        _opt(
            "--train-text-encoder/--freeze-text-encoder",
            help="Stage 2: train the text encoder as well [on].",
            panel=_PANEL_OPT,
        ),
    ] = None,
    mix_ratio: Annotated[
        float | None, _opt("--mix-ratio", help="Share of samples from the first --data [0.5].", panel=_PANEL_DATA)
    ] = None,
    image_column: _ImageColumn = None,
    caption_column: _CaptionColumn = None,
    resolution: _Resolution = None,
    cache_latents: _CacheLatents = None,
    cache_dir: _CacheDir = None,
    batch_size: _BatchSize = None,
    grad_accum: _GradAccum = None,
    lr: _Lr = None,
    text_encoder_lr: Annotated[
        float | None,
        _opt("--text-encoder-lr", help="The text encoder's learning rate where it differs [--lr].", panel=_PANEL_OPT),
    ] = None,
    weight_decay: _WeightDecay = None,
    warmup_steps: _WarmupSteps = None,
    lr_scheduler: _LrScheduler = None,
    max_steps: _MaxSteps = None,
    epochs: _Epochs = None,
    max_grad_norm: _MaxGradNorm = None,
    prediction_type: _PredictionType = None,
    caption_dropout: _CaptionDropout = None,
    snr_gamma: _SnrGamma = None,
    noise_offset: _NoiseOffset = None,
    teacher: Annotated[
        str | None,
        _opt(
            "--teacher",
            help="Learn from this pipeline's predictions (e.g. the English SD) on --teacher-data's captions [off].",
            panel=_PANEL_OPT,
        ),
    ] = None,
    teacher_data: Annotated[
        list[str] | None,
        _opt(
            "--teacher-data",
            help="Per --data: its pictures, row for row, captioned in the teacher's language (.jsonl/.csv).",
            panel=_PANEL_DATA,
        ),
    ] = None,
    teacher_weight: Annotated[
        float | None,
        _opt("--teacher-weight", help="Share of the teacher's target in the loss, in (0, 1] [1].", panel=_PANEL_OPT),
    ] = None,
    ema: _Ema = False,
    ema_decay: _EmaDecay = None,
    mixed_precision: _MixedPrecision = None,
    gradient_checkpointing: _GradientCheckpointing = False,
    seed: _Seed = None,
    val_prompt: _ValPrompt = None,
    val_every: _ValEvery = None,
    val_steps: _ValSteps = None,
    save_every: SaveEvery = None,
    keep_checkpoints: KeepCheckpoints = None,
    resume: Resume = None,
    overwrite: OverwriteRun = False,
    report_to: ReportTo = None,
    log_every: LogEvery = None,
    allow_pickle: _AllowPickle = False,
    cpu: Cpu = False,
) -> None:
    """Align a Chinese text encoder to a Stable Diffusion UNet: stage 1 (text encoder) or 2 (+ UNet).

    Writes OUTPUT/final, a pipeline folder: taiyi generate --model OUTPUT/final.
    """
    _run_sd_trainer({k: v for k, v in locals().items() if v is not None}, "sd")  # unset flags keep the defaults


@train_app.command()
def lora(
    model: _Model,
    data: Annotated[
        list[str],
        _opt("--data", help="Pairs: folder of x.jpg+x.txt, .csv, .jsonl or synthetic:N.", panel=_PANEL_DATA),
    ],
    output: Annotated[str, _opt("--output", "-o", help="Run folder (checkpoints, metrics, validation/, final/).")],
    rank: _Rank,
    alpha: _Alpha = None,
    target: _Target = None,
    image_column: _ImageColumn = None,
    caption_column: _CaptionColumn = None,
    resolution: _Resolution = None,
    cache_latents: _CacheLatents = None,
    cache_dir: _CacheDir = None,
    batch_size: _BatchSize = None,
    grad_accum: _GradAccum = None,
    lr: _Lr = None,
    weight_decay: _WeightDecay = None,
    warmup_steps: _WarmupSteps = None,
    lr_scheduler: _LrScheduler = None,
    max_steps: _MaxSteps = None,
    epochs: _Epochs = None,
    max_grad_norm: _MaxGradNorm = None,
    prediction_type: _PredictionType = None,
    caption_dropout: _CaptionDropout = None,
    snr_gamma: _SnrGamma = None,
    noise_offset: _NoiseOffset = None,
    ema: _Ema = False,
    ema_decay: _EmaDecay = None,
    mixed_precision: _MixedPrecision = None,
    gradient_checkpointing: _GradientCheckpointing = False,
    seed: _Seed = None,
    val_prompt: _ValPrompt = None,
    val_every: _ValEvery = None,
    val_steps: _ValSteps = None,
    save_every: SaveEvery = None,
    keep_checkpoints: KeepCheckpoints = None,
    resume: Resume = None,
    overwrite: OverwriteRun = False,
    report_to: ReportTo = None,
    log_every: LogEvery = None,
    allow_pickle: _AllowPickle = False,
    cpu: Cpu = False,
) -> None:
    """LoRA fine-tuning (peft) of the UNet and/or the text encoder; the base weights stay frozen.

    Writes OUTPUT/final/pytorch_lora_weights.safetensors (diffusers format): taiyi generate --lora FILE[:SCALE],
    or pipe.load_lora_weights(FILE) in diffusers.
    """
    _run_sd_trainer({k: v for k, v in locals().items() if v is not None}, "lora")


@train_app.command()
def dreambooth(
    model: _Model,
    instance_data: Annotated[str, _opt("--instance-data", help="Folder of the subject's photos.", panel=_PANEL_DATA)],
    instance_prompt: Annotated[
        str, _opt("--instance-prompt", help="Prompt naming the subject, e.g. '一张sks狗的照片'.", panel=_PANEL_DATA)
    ],
    output: Annotated[str, _opt("--output", "-o", help="Run folder (checkpoints, metrics, validation/, final/).")],
    class_prompt: Annotated[
        str | None,
        _opt("--class-prompt", help="Its class, e.g. '一张狗的照片' [none: no prior loss].", panel=_PANEL_DATA),
    ] = None,
    num_class_images: Annotated[
        int | None, _opt("--num-class-images", help="Class images drawn by the base model [100].", panel=_PANEL_DATA)
    ] = None,
    class_data_dir: Annotated[
        str | None,
        _opt("--class-data-dir", help="Class image cache [OUTPUT/cache/class_images].", panel=_PANEL_DATA),
    ] = None,
    class_steps: Annotated[
        int | None, _opt("--class-steps", help="Denoising steps of class images [25].", panel=_PANEL_DATA)
    ] = None,
    prior_loss_weight: Annotated[
        float | None, _opt("--prior-loss-weight", help="Weight of the class (prior) loss [1.0].", panel=_PANEL_OPT)
    ] = None,
    lora_rank: Annotated[
        int | None, _opt("--lora-rank", help="Train a LoRA of this rank [off: full fine-tune].", panel=_PANEL_OPT)
    ] = None,
    alpha: _Alpha = None,
    target: _Target = None,
    train_text_encoder: Annotated[
        bool | None,
        _opt(
            "--train-text-encoder/--freeze-text-encoder",
            help="Full fine-tune: train the text encoder too [off].",
            panel=_PANEL_OPT,
        ),
    ] = None,
    resolution: _Resolution = None,
    cache_dir: _CacheDir = None,
    batch_size: _BatchSize = None,
    grad_accum: _GradAccum = None,
    lr: _Lr = None,
    weight_decay: _WeightDecay = None,
    warmup_steps: _WarmupSteps = None,
    lr_scheduler: _LrScheduler = None,
    max_steps: _MaxSteps = None,
    max_grad_norm: _MaxGradNorm = None,
    prediction_type: _PredictionType = None,
    snr_gamma: _SnrGamma = None,
    noise_offset: _NoiseOffset = None,
    mixed_precision: _MixedPrecision = None,
    gradient_checkpointing: _GradientCheckpointing = False,
    seed: _Seed = None,
    val_prompt: _ValPrompt = None,
    val_every: _ValEvery = None,
    val_steps: _ValSteps = None,
    save_every: SaveEvery = None,
    keep_checkpoints: KeepCheckpoints = None,
    resume: Resume = None,
    overwrite: OverwriteRun = False,
    report_to: ReportTo = None,
    log_every: LogEvery = None,
    allow_pickle: _AllowPickle = False,
    cpu: Cpu = False,
) -> None:
    """DreamBooth: teach the model a subject from a few photos, keeping its class with prior preservation.

    Class images are drawn once by the base model and cached. Full mode writes a pipeline folder
    (OUTPUT/final); with --lora-rank, OUTPUT/final/pytorch_lora_weights.safetensors.
    """
    given = {k: v for k, v in locals().items() if v is not None}
    if "lora_rank" in given:
        given["rank"] = given.pop("lora_rank")
    _run_sd_trainer(given, "dreambooth")


# Options of the image-only trainers (vae, uncond), defined once for both.
ImageData = Annotated[
    list[str],
    _opt(
        "--data",
        help="Images: folder (x.png+x.txt, e.g. shanshui write_folder), .csv, .jsonl, synthetic:N or shanshui:N; "
        "repeat to concatenate. Captions are ignored.",
        panel=_PANEL_DATA,
    ),
]
ImageOutput = Annotated[str, _opt("--output", "-o", help="Run folder (checkpoints, metrics, validation/, final/).")]
ImageColumn = Annotated[str | None, _opt("--image-column", help="CSV/JSONL image column [image].", panel=_PANEL_DATA)]
ImageResolution = Annotated[
    int | None, _opt("--resolution", help="Training image side (resize + centre crop) [64].", panel=_PANEL_DATA)
]
HFlip = Annotated[bool, _opt("--hflip", help="Mirror training images left-right at random.", panel=_PANEL_DATA)]
ValFraction = Annotated[
    float | None, _opt("--val-fraction", help="Share of the images held out [0.02].", panel=_PANEL_DATA)
]
ValMax = Annotated[int | None, _opt("--val-max", help="At most this many held-out images [256].", panel=_PANEL_DATA)]
ValEvery = Annotated[
    int | None, _opt("--val-every", help="Validate every N steps [500]; 0: at the end only.", panel=_PANEL_RUN)
]
BlockOutChannels = Annotated[
    str | None,
    _opt("--block-out-channels", help="Widths per level [vae 16,32,64; uncond 32,64,128,128].", panel=_PANEL_OPT),
]
LayersPerBlock = Annotated[
    int | None, _opt("--layers-per-block", help="ResNet blocks per level [1].", panel=_PANEL_OPT)
]
NormGroups = Annotated[int | None, _opt("--norm-num-groups", help="GroupNorm groups [16].", panel=_PANEL_OPT)]
ImageBatch = Annotated[
    int | None, _opt("--batch-size", help="Global batch, all processes together [32].", panel=_PANEL_OPT)
]
GradAccum = Annotated[int | None, _opt("--grad-accum", help="Micro-batches per optimizer step [1].", panel=_PANEL_OPT)]
WeightDecay = Annotated[float | None, _opt("--weight-decay", help="AdamW weight decay [0].", panel=_PANEL_OPT)]
WarmupSteps = Annotated[
    int | None, _opt("--warmup-steps", help="Linear warm-up, then --lr-scheduler [0].", panel=_PANEL_OPT)
]
LrScheduler = _LrScheduler
MaxSteps = Annotated[int | None, _opt("--max-steps", help="Optimizer steps [--epochs passes].", panel=_PANEL_OPT)]
Epochs = Annotated[int | None, _opt("--epochs", help="Passes over the images [1].", panel=_PANEL_OPT)]
MaxGradNorm = Annotated[float | None, _opt("--max-grad-norm", help="Clip the gradient norm [1.0].", panel=_PANEL_OPT)]
EmaDecay = Annotated[float | None, _opt("--ema-decay", help="EMA decay [0.999].", panel=_PANEL_OPT)]
MixedPrecision = Annotated[
    str | None,
    _opt("--mixed-precision", help="auto, no, fp16 (GPU) or bf16 [auto: GPU half, CPU none].", panel=_PANEL_OPT),
]
Seed = Annotated[int | None, _opt("--seed", help="Initialisation, data order and noise [0].", panel=_PANEL_OPT)]


def _image_config(given: dict) -> dict:
    """CLI values → config fields: ``--block-out-channels 32,64,64`` → a tuple of ints."""
    if "block_out_channels" in given:
        text = given["block_out_channels"]
        try:
            given["block_out_channels"] = tuple(int(c) for c in text.split(",") if c.strip())
        except ValueError:
            from ..errors import InvalidInputError

            raise InvalidInputError(
                f"--block-out-channels {text!r} is not comma-separated integers, e.g. 32,64,64"
            ) from None
    return given


@train_app.command()
def vae(
    data: ImageData,
    output: ImageOutput,
    block_out_channels: BlockOutChannels = None,
    latent_channels: Annotated[
        int | None, _opt("--latent-channels", help="Latent channels [4].", panel=_PANEL_OPT)
    ] = None,
    layers_per_block: LayersPerBlock = None,
    norm_num_groups: NormGroups = None,
    mid_attention: Annotated[
        bool | None,
        _opt("--mid-attention/--no-mid-attention", help="Self-attention at the latent size [on].", panel=_PANEL_OPT),
    ] = None,
    kl_weight: Annotated[
        float | None, _opt("--kl-weight", help="KL weight (mean per latent element) [1e-4].", panel=_PANEL_OPT)
    ] = None,
    edge_weight: Annotated[
        float | None, _opt("--edge-weight", help="L1 on image gradients, for sharpness [0.5].", panel=_PANEL_OPT)
    ] = None,
    chroma_weight: Annotated[
        float | None, _opt("--chroma-weight", help="L1 on the colour part of the error [1.0].", panel=_PANEL_OPT)
    ] = None,
    grey_fraction: Annotated[
        float | None, _opt("--grey-fraction", help="Share of images trained in grey [0.1].", panel=_PANEL_OPT)
    ] = None,
    scale_images: Annotated[
        int | None, _opt("--scale-images", help="Images measured for scaling_factor [1024].", panel=_PANEL_OPT)
    ] = None,
    init: Annotated[
        str | None,
        _opt(
            "--init",
            help="Start from this AutoencoderKL (folder, or pipeline with vae/); it sets the architecture.",
            panel=_PANEL_OPT,
        ),
    ] = None,
    decoder_only: Annotated[
        bool,
        _opt(
            "--decoder-only",
            help="With --init: train the decoder only; latents and scaling_factor stay (SD's ft-MSE VAE).",
            panel=_PANEL_OPT,
        ),
    ] = False,
    decode_padding: Annotated[
        int | None,
        _opt(
            "--decode-padding",
            help="Latent cells of edge padding the decoder trains and decodes with, cropped off [0; --init's].",
            panel=_PANEL_OPT,
        ),
    ] = None,
    allow_pickle: Annotated[
        bool, _opt("--allow-pickle", help="Accept a pickled .bin --init (can run code).", panel=_PANEL_OPT)
    ] = False,
    image_column: ImageColumn = None,
    resolution: ImageResolution = None,
    hflip: HFlip = False,
    val_fraction: ValFraction = None,
    val_max: ValMax = None,
    batch_size: ImageBatch = None,
    grad_accum: GradAccum = None,
    lr: Annotated[float | None, _opt("--lr", help="Learning rate [1e-3].", panel=_PANEL_OPT)] = None,
    weight_decay: WeightDecay = None,
    warmup_steps: WarmupSteps = None,
    lr_scheduler: LrScheduler = None,
    max_steps: MaxSteps = None,
    epochs: Epochs = None,
    max_grad_norm: MaxGradNorm = None,
    ema: Annotated[
        bool | None, _opt("--ema/--no-ema", help="Export an EMA of the weights [off].", panel=_PANEL_OPT)
    ] = None,
    ema_decay: EmaDecay = None,
    mixed_precision: MixedPrecision = None,
    seed: Seed = None,
    val_every: ValEvery = None,
    save_every: SaveEvery = None,
    keep_checkpoints: KeepCheckpoints = None,
    resume: Resume = None,
    overwrite: OverwriteRun = False,
    report_to: ReportTo = None,
    log_every: LogEvery = None,
    cpu: Cpu = False,
) -> None:
    """Train a Stable Diffusion VAE (AutoencoderKL) from scratch, or go on from one (--init); measures and writes
    its scaling_factor (kept as it was with --decoder-only).

    Writes OUTPUT/final (AutoencoderKL.from_pretrained) and OUTPUT/vae_report.json (PSNR, grey/ink chroma).
    """
    given = _image_config({k: v for k, v in locals().items() if v is not None})
    from .vae import INIT_ARCHITECTURE

    sized = [k for k in INIT_ARCHITECTURE if k in given]
    if init is not None and sized:
        from ..errors import InvalidInputError

        raise InvalidInputError(
            f"--init sets the architecture; drop {', '.join('--' + k.replace('_', '-') for k in sized)}"
        )
    _prepare()
    from .vae import VAETrainConfig, train_vae

    result = train_vae(VAETrainConfig(**given))
    if result["main_process"]:
        typer.echo(str(result["final"]))


@train_app.command()
def uncond(
    data: ImageData,
    output: ImageOutput,
    block_out_channels: BlockOutChannels = None,
    layers_per_block: LayersPerBlock = None,
    attention_levels: Annotated[
        int | None, _opt("--attention-levels", help="Coarsest levels with self-attention [1].", panel=_PANEL_OPT)
    ] = None,
    norm_num_groups: NormGroups = None,
    num_train_timesteps: Annotated[
        int | None, _opt("--num-train-timesteps", help="DDPM schedule length [1000].", panel=_PANEL_OPT)
    ] = None,
    beta_schedule: Annotated[
        str | None,
        _opt("--beta-schedule", help="linear, scaled_linear or squaredcos_cap_v2 [linear].", panel=_PANEL_OPT),
    ] = None,
    prediction_type: Annotated[
        str | None, _opt("--prediction-type", help="epsilon or v_prediction [epsilon].", panel=_PANEL_OPT)
    ] = None,
    noise_offset: Annotated[
        float | None,
        _opt("--noise-offset", help="Per-image colour offset of the noise, e.g. 0.05 [0].", panel=_PANEL_OPT),
    ] = None,
    snr_gamma: Annotated[
        float | None, _opt("--snr-gamma", help="Min-SNR-γ loss weighting, e.g. 5 [off].", panel=_PANEL_OPT)
    ] = None,
    image_column: ImageColumn = None,
    resolution: ImageResolution = None,
    hflip: HFlip = False,
    val_fraction: ValFraction = None,
    val_max: ValMax = None,
    batch_size: ImageBatch = None,
    grad_accum: GradAccum = None,
    lr: Annotated[float | None, _opt("--lr", help="Learning rate [2e-4].", panel=_PANEL_OPT)] = None,
    weight_decay: WeightDecay = None,
    warmup_steps: WarmupSteps = None,
    lr_scheduler: LrScheduler = None,
    max_steps: MaxSteps = None,
    epochs: Epochs = None,
    max_grad_norm: MaxGradNorm = None,
    ema: Annotated[
        bool | None, _opt("--ema/--no-ema", help="Export an EMA of the weights [on].", panel=_PANEL_OPT)
    ] = None,
    ema_decay: EmaDecay = None,
    mixed_precision: MixedPrecision = None,
    seed: Seed = None,
    val_images: Annotated[
        int | None, _opt("--val-images", help="Samples in the validation grid [16].", panel=_PANEL_RUN)
    ] = None,
    val_steps: Annotated[
        int | None, _opt("--val-steps", help="DDIM steps of validation samples [50].", panel=_PANEL_RUN)
    ] = None,
    val_every: ValEvery = None,
    save_every: SaveEvery = None,
    keep_checkpoints: KeepCheckpoints = None,
    resume: Resume = None,
    overwrite: OverwriteRun = False,
    report_to: ReportTo = None,
    log_every: LogEvery = None,
    cpu: Cpu = False,
    vae: Annotated[
        str | None,
        _opt(
            "--vae",
            help="Train in this AutoencoderKL's latent space (folder, or pipeline with vae/).",
            panel=_PANEL_OPT,
        ),
    ] = None,
    cache_dir: Annotated[
        str | None,
        _opt(
            "--cache-dir", help="With --vae: encode each image once into this latent cache [off].", panel=_PANEL_DATA
        ),
    ] = None,
) -> None:
    """Train an unconditional diffusion UNet from scratch (for CLIP-guided Disco Diffusion).

    Writes OUTPUT/final, a DDPMPipeline folder (model_index.json, unet/, scheduler/), plus vae/ for a
    latent model (--vae).
    """
    given = _image_config({k: v for k, v in locals().items() if v is not None})
    _prepare()
    from .uncond import UncondTrainConfig, train_uncond

    result = train_uncond(UncondTrainConfig(**given))
    if result["main_process"]:
        typer.echo(str(result["final"]))
