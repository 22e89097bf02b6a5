"""``taiyi train dreambooth``: teach a model one subject from a few photos, with prior preservation.

DreamBooth (Ruiz et al. 2022; diffusers' ``train_dreambooth.py``): the instance photos are captioned with one
prompt naming the subject by a rare token (``一张sks狗的照片``); to keep the model's idea of the class (``一张狗
的照片``), images of the class drawn by the *base* model are trained alongside, one per instance sample, and the
loss is ``instance loss + prior_loss_weight × class loss``.

- Class images are drawn once by taiyi's own pipeline (``num_class_images``, seeds ``seed + i``) into
  ``OUTPUT/cache/class_images/<key>/`` (or ``class_data_dir/<key>/``) as ``NNNNN.png`` + ``NNNNN.txt``; under
  ``cache/`` they survive ``--overwrite``, like the latent cache. The key hashes the
  base model (folder and its weight files' sizes and times), the class prompt, the size, steps and guidance,
  so another model or prompt draws anew and a second run (or a larger ``num_class_images``) reuses what is
  there.
- Training is :func:`taiyi.train.sd.train_sd` itself (one loop: latent cache, EMA, checkpoints and exact
  resume, validation): full mode trains the UNet (stage 2; the text encoder only with
  ``train_text_encoder``) and writes a pipeline folder; LoRA mode (``lora_rank``) writes
  ``final/pytorch_lora_weights.safetensors`` for ``taiyi generate --lora``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import InvalidInputError
from ..prompts import require_text
from .common import CACHE, check_output_dir, on_main_process, use_cpu
from .sd import RESUMABLE_CHANGES, SDTrainConfig, train_sd, validate_config

logger = logging.getLogger("taiyi")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CLASS_VERSION = "1"


@dataclass
class DreamBoothConfig(SDTrainConfig):
    """Settings of one ``taiyi train dreambooth`` run: those of :class:`SDTrainConfig` (``data`` is filled in
    from ``instance_data``) with DreamBooth's defaults, plus:

    Args:
        instance_data: a folder of photos of the subject (captions are not read: every photo gets
            ``instance_prompt``).
        instance_prompt: the prompt naming the subject, e.g. ``一张sks狗的照片``.
        class_prompt: the prompt of its class, e.g. ``一张狗的照片``; None trains without prior preservation.
        num_class_images: class images drawn by the base model (and trained alongside).
        class_data_dir: where class images are cached (default ``OUTPUT/cache/class_images``); share it
            between runs.
        class_steps: denoising steps of the class images.
        class_guidance: their guidance scale (None: the model's default).
        prior_loss_weight: weight of the class (prior-preservation) loss.
    """

    data: list[str] = field(default_factory=list)
    output: str = ""
    stage: int = 2
    lr: float | None = None  # 5e-6 for a full fine-tune, 1e-4 for LoRA (diffusers' DreamBooth scripts)
    weight_decay: float = 1e-2
    max_steps: int | None = 400
    val_prompts: list[str] = field(default_factory=list)  # empty: the instance prompt
    val_every: int = 100
    save_every: int = 200
    instance_data: str = ""
    instance_prompt: str = ""
    class_prompt: str | None = None
    num_class_images: int = 100
    class_data_dir: str | None = None
    class_steps: int = 25
    class_guidance: float | None = None


def _check(config: DreamBoothConfig) -> Path:
    folder = Path(config.instance_data)
    if not str(config.instance_data).strip() or not folder.is_dir():
        raise InvalidInputError(f"--instance-data {config.instance_data!r} is not a folder; give the subject's photos")
    require_text(config.instance_prompt, "--instance-prompt")
    if not config.instance_prompt.strip():
        raise InvalidInputError("no --instance-prompt given; name the subject, e.g. '一张sks狗的照片'")
    if config.class_prompt is not None:
        require_text(config.class_prompt, "--class-prompt")
    if config.class_prompt is not None and not config.class_prompt.strip():
        raise InvalidInputError("--class-prompt is empty; name the class (e.g. '一张狗的照片') or drop it")
    if config.class_prompt is not None and config.num_class_images < 1:
        raise InvalidInputError(f"--num-class-images must be at least 1, not {config.num_class_images}")
    if config.class_steps < 1:
        raise InvalidInputError(f"--class-steps must be at least 1, not {config.class_steps}")
    if not str(config.output).strip():
        raise InvalidInputError("no output folder given; pass --output DIR")
    return folder


def _write_if_changed(path: Path, text: str) -> None:
    """Write atomically, and only when the text differs: the latent cache keys on the file's time."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def instance_manifest(folder: Path, prompt: str, out: Path, exclude: tuple[Path, ...] = ()) -> Path:
    """A JSONL pair list: every image under ``folder`` captioned ``prompt``.

    Images under ``exclude`` (the run's own output folder, the class images) and hidden files and folders are left
    out: an --output inside --instance-data must not feed the run's class images, validation grids and loss plot
    back in as photos of the subject when it resumes.
    """
    skip = [p.resolve() for p in exclude if not folder.resolve().is_relative_to(p.resolve())]

    def wanted(path: Path) -> bool:
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            return False
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            return False
        resolved = path.resolve()
        return not any(resolved.is_relative_to(other) for other in skip)

    images = sorted(p for p in folder.rglob("*") if wanted(p))
    if not images:
        raise InvalidInputError(f"--instance-data {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    rows = [json.dumps({"image": str(p.resolve()), "caption": prompt}, ensure_ascii=False) for p in images]
    _write_if_changed(out, "\n".join(rows) + "\n")
    return out


def class_key(model_folder: Path, config: DreamBoothConfig) -> str:
    """What the class images depend on: the base model's files, the class prompt and how they are drawn."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{CLASS_VERSION}|{model_folder.resolve()}|{config.class_prompt}|".encode())
    digest.update(f"{max(config.resolution, 64)}|{config.class_steps}|{config.class_guidance}|{config.seed}".encode())
    for sub in ("unet", "text_encoder", "vae", "tokenizer", "scheduler"):
        for path in sorted((model_folder / sub).glob("*")) if (model_folder / sub).is_dir() else []:
            st = path.stat()
            digest.update(f"{sub}/{path.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def class_images(config: DreamBoothConfig, output: Path, state=None) -> tuple[Path, int]:
    """Draw the missing class images with the base model; return (their folder, number drawn).

    Under ``accelerate launch`` (``state``: accelerate's ``PartialState``) each process draws its share on its own
    device; image i is seed + i's, whoever draws it.
    """
    from accelerate import PartialState

    from ..models import resolve_model

    folder, _ = resolve_model(config.model)
    key = class_key(Path(folder), config)
    root = Path(config.class_data_dir) if config.class_data_dir else output / CACHE / "class_images"
    target = root / key
    names = [f"{i:05d}.png" for i in range(config.num_class_images)]
    missing = [i for i, name in enumerate(names) if not (target / name).is_file()]
    state = state if state is not None else PartialState(cpu=use_cpu(config.cpu))
    mine = missing[state.process_index :: state.num_processes]
    if missing and state.is_main_process:
        target.mkdir(parents=True, exist_ok=True)
        _write_if_changed(
            target / "class.json",
            json.dumps({"model": str(config.model), "prompt": config.class_prompt}, ensure_ascii=False) + "\n",
        )
        logger.info("drawing %d class images of %r with %s into %s", len(missing), config.class_prompt, folder, target)
    state.wait_for_everyone()
    if mine:
        from ..io import save_png
        from ..metadata import pnginfo
        from ..pipeline import load_pipeline

        device = "cpu" if state.device.type == "cpu" else str(state.device)  # this process's GPU under a launch
        pipe = load_pipeline(config.model, device=device, safety_checker=False, allow_pickle=config.allow_pickle)
        size = max(config.resolution, 64)  # the pipeline's smallest size; training resizes
        for i in mine:  # image i is the single image of seed + i, whatever was drawn before
            result = pipe.generate(
                config.class_prompt,
                steps=config.class_steps,
                guidance=config.class_guidance,
                seed=config.seed + i,
                width=size,
                height=size,
            )
            (target / f"{i:05d}.txt").write_text(config.class_prompt, encoding="utf-8")
            save_png(result.images[0], target / names[i], pnginfo=pnginfo(result.parameters[0]), overwrite=True)
        del pipe
    state.wait_for_everyone()
    return target, len(missing)


def train_dreambooth(config: DreamBoothConfig) -> dict:
    """Fine-tune a model (full or LoRA) on a subject's photos with prior preservation.

    Args:
        config: the run's settings (see :class:`DreamBoothConfig`).

    Returns:
        :func:`taiyi.train.sd.train_sd`'s result, plus ``"class_dir"`` (the class images' folder or None) and
        ``"class_images_drawn"`` (how many this call drew; 0 when all were cached).

    Raises:
        InvalidInputError: bad settings or data (as ``train_sd``), no instance images.
    """
    folder = _check(config)
    output = Path(config.output)
    lists = output / CACHE / "dreambooth"  # under cache/: kept by --overwrite, allowed in a fresh --output
    train_text = config.train_text_encoder
    if config.lora_rank is None and train_text is None:
        train_text = False  # DreamBooth's default: the UNet only
    run = replace(
        config,
        lr=config.lr if config.lr is not None else (5e-6 if config.lora_rank is None else 1e-4),
        data=[str(lists / "instance.jsonl")],
        prior_data=str(lists / "class.jsonl") if config.class_prompt is not None else None,
        train_text_encoder=train_text,
        val_prompts=config.val_prompts or [config.instance_prompt],
    )
    # Refuse bad settings and a bad --output before writing lists or drawing class images (which can take
    # long); train_sd checks again.
    validate_config(run)
    check_output_dir(
        output, run.to_json(), resume=config.resume, overwrite=config.overwrite, may_differ=RESUMABLE_CHANGES
    )
    from accelerate import PartialState

    # Under accelerate launch the main process writes the lists (one writer), every process draws class images.
    state = PartialState(cpu=use_cpu(config.cpu))
    own = (output, *([Path(config.class_data_dir)] if config.class_data_dir else []))
    on_main_process(
        state, lambda: instance_manifest(folder, config.instance_prompt, lists / "instance.jsonl", exclude=own)
    )
    class_dir, drawn = None, 0
    if run.prior_data is not None:
        class_dir, drawn = class_images(config, output, state)
        rows = [
            json.dumps({"image": str((class_dir / f"{i:05d}.png").resolve()), "caption": config.class_prompt})
            for i in range(config.num_class_images)
        ]
        on_main_process(state, lambda: _write_if_changed(Path(run.prior_data), "\n".join(rows) + "\n"))
    result = train_sd(run)
    return {**result, "class_dir": class_dir, "class_images_drawn": drawn}


__all__ = ["DreamBoothConfig", "train_dreambooth"]
