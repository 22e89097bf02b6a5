"""``taiyi recipe mini``: the whole Taiyi recipe, in miniature, on the 山水 world.

Stages (each one of the project's own commands, run as a subprocess; a finished stage is skipped
and an interrupted one resumes from its latest checkpoint when the recipe is run again)::

    data      render the training scenes once; captions in Chinese, English and mixed
    probe     the judge of pictures: the embedded attribute probe        (copied)
              (--train-probe: one trained in the run)                 taiyi recipe probe
    clip-en   "English CLIP", both towers from scratch                taiyi train clip --from-config
    clip-zh   "Taiyi-CLIP": Chinese BERT tower vs the frozen image tower   taiyi train clip
    vae       the autoencoder, then its decoder alone (latents kept)  taiyi train vae [--decoder-only]
    sd-en     "English SD": UNet on the frozen English text tower     taiyi train sd --stage 2
    sd-zh     "Taiyi SD Chinese": assemble + stage 1 (text encoder)   taiyi assemble, taiyi train sd
    sd-zh-en  "Taiyi SD bilingual": stage 2 (UNet too) on zh + en,   taiyi train sd --stage 2
              from the Chinese model (its stage 1: text encoder only, Chinese data)
    uncond    unconditional latent diffusion (for Disco Diffusion)    taiyi train uncond --vae
    report    faithfulness + CLIP evaluation, bit-identity check, report.json / report.md, exports

Independent stages may run side by side (``jobs`` processes, ``threads`` each). The default is one stage at a
time on two threads: on the 2-core machine the recipe was calibrated on, a stage on one core beside another
ran 1.5× (English SD), 1.6× (English CLIP) and 1.85× (VAE) slower than alone on both, so pairs gain little,
and nothing can take a stage's second core back when its partner ends (README). Sizes and step counts come
from a preset: ``full`` is the shipped recipe (budget: 60 minutes on 2 cores; a whole run took 76 there before
the shared latent cache and the data workers, which save a few minutes), ``tiny`` is the same code at toy
sizes for the test suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import InvalidInputError, TaiyiError
from ..train.common import seed_check, write_json_atomic

__all__ = ["PRESETS", "Preset", "RecipeConfig", "STAGES", "run_recipe"]


@dataclass(frozen=True)
class Preset:
    """Sizes and step counts of one recipe run."""

    n_train: int = 20000
    size: int = 64
    text_width: int = 128  # English CLIP text width = Chinese BERT hidden = UNet cross-attention width
    text_layers: int = 4
    text_max_length: int = 64
    vision_width: int = 128
    vision_layers: int = 4
    projection: int = 128
    unet_channels: tuple[int, ...] = (32, 64, 96)
    unet_layers: int = 1
    vae_channels: tuple[int, ...] = (16, 32, 64)
    uncond_channels: tuple[int, ...] = (32, 64, 64)  # on the VAE's latents (16×16 for 64 px)
    batch: dict = field(default_factory=lambda: {"clip": 128, "vae": 16, "sd": 32, "uncond": 32, "probe": 64})
    steps: dict = field(
        default_factory=lambda: {
            "probe": 1000,
            "clip-en": 1000,
            "clip-zh": 800,
            "vae": 1000,
            # then the decoder alone (the latents, hence every diffusion stage, stay as they were): a sharper,
            # truer decoder; on mini15's models +3 to +7 points of land, +3 of style, +2 to +6 of sky (docs/recipe.md)
            "vae-decoder": 1000,
            # 2400: more UNet training draws the rivers (+25 points) the Chinese model's water bar needs
            # (docs/recipe.md)
            "sd-en": 2400,
            "sd-zh": 900,
            "sd-zh-en": 900,  # stage 2; its stage 1 is the Chinese model's (Taiyi: stage 1 on Chinese data only)
            "uncond": 1000,
        }
    )
    lr: dict = field(
        default_factory=lambda: {
            "clip": 5e-4,
            "vae": 1e-3,
            "sd-unet": 4e-4,
            "sd-text": 2e-4,
            # the bilingual stage 2's text encoder (its UNet: sd-unet / 4): English words must be learnt there,
            # and at the UNet's rate "dawn" (word pieces da ##wn in the Chinese vocabulary) was not (docs/recipe.md)
            "sd-zh-en-text": 4e-4,
            "uncond": 4e-4,
            "probe": 2e-3,
        }
    )
    # the Chinese stage 1 learns from the English SD's prediction on the same noisy latent, captioned with the
    # picture's English twin, half and half with the diffusion loss (``taiyi train sd --teacher``; not Taiyi's
    # published recipe): sky +7, land +3, held-out style +8 points. The bilingual stage 2 needs a teacher too,
    # or a taught stage 1 costs it the English dawn (README); its weight is the next field
    sd_teacher_weight: float | None = 0.5
    # the bilingual stage 2: the English SD's prediction as its only target, and its weights averaged (EMA).
    # On the 576-prompt set, four draws (seeds 0-3) of mini16's stage 2 read seen sky −1 (English prompts) and
    # +1 (Chinese) against the English SD, where the average alone read −12 and −6 and the stage without
    # either swung from −5 to −17 between draws (docs/recipe.md, "How much of the bilingual model's sky is the
    # training draw")
    sd_zh_en_teacher_weight: float | None = 1.0
    sd_zh_en_ema_decay: float | None = 0.99
    noise_offset: float = 0.1
    snr_gamma: float | None = 5.0  # min-SNR loss weighting of the SD stages (+10 points of time: docs/recipe.md)
    # after the warm-up, for the VAE, SD and unconditional stages (CLIP decays with a cosine of its own).
    # constant: a run with every one of them cosine (mini3) had a sharper VAE but less faithful SD models
    lr_scheduler: str = "constant"
    image_warmup_steps: int = 0  # of the VAE and unconditional stages (the SD stages warm up for 10 %, ≤ 50 steps)
    # the decoder fine-tune trains, and the shipped VAE decodes, on latents padded by this many cells (cropped off):
    # the dot an unpadded decoder draws at its bottom-left corner in dark pictures falls outside the picture
    # (docs/recipe.md, "Decode padding")
    vae_decode_padding: int = 2
    # seen, held-out: the pictures of one prompt are alike, so many prompts with 2 pictures each judge more
    # precisely than few with many (docs/recipe.md, "How precise the judging is")
    eval_prompts: tuple[int, int] = (192, 96)
    eval_images: int = 2
    eval_steps: int | None = None  # None: the pipeline's default sampler, steps and guidance span


PRESETS: dict[str, Preset] = {
    "full": Preset(),
    "tiny": Preset(
        n_train=48,
        text_width=32,
        text_layers=2,
        text_max_length=32,
        vision_width=32,
        vision_layers=2,
        projection=32,
        unet_channels=(32, 32),
        unet_layers=1,
        vae_channels=(16, 32, 32),
        uncond_channels=(16, 32),
        batch={"clip": 8, "vae": 4, "sd": 4, "uncond": 4, "probe": 8},
        steps={
            k: 3 for k in ("probe", "clip-en", "clip-zh", "vae", "vae-decoder", "sd-en", "sd-zh", "sd-zh-en", "uncond")
        },
        eval_prompts=(2, 1),
        eval_images=2,
        eval_steps=2,
    ),
}


@dataclass
class RecipeConfig:
    """One ``taiyi recipe mini`` run.

    Args:
        out: the run folder (stages in subfolders; ``report.json``, ``report.md``, ``models/``).
        preset: ``full`` (the shipped models) or ``tiny`` (the test suite's toy run).
        jobs: stages run side by side.
        threads: CPU threads per stage.
        seed: seed of the data, initialisations and training.
        only: run just these stages (and nothing that depends on a missing one).
        progress_every: seconds between progress lines of the running stages (their latest step, from their
            logs); 0: only a line when a stage starts and ends.
        train_probe: train the attribute probe that judges the models inside the run (``taiyi recipe probe``)
            instead of judging with the embedded one (``taiyi-mini-probe``, the recipe's own probe command's).
    """

    out: str
    preset: str = "full"
    jobs: int = 1
    threads: int = 2
    seed: int = 0
    only: list[str] | None = None
    progress_every: float = 60.0
    train_probe: bool = False


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    needs: tuple[str, ...]
    commands: Callable[[Path, Preset, RecipeConfig], list[list[str]]]  # taiyi argv lists, run in order
    done: str  # relative path whose existence marks the stage finished
    prepare: Callable[[Path, Preset, RecipeConfig], None] | None = None  # in-process set-up before the commands


def _train_common(out: Path, stage: str, steps: int, seed: int) -> list[str]:
    return [
        "--output", str(out / stage), "--max-steps", str(steps), "--seed", str(seed),
        "--save-every", str(max(steps // 4, 1)), "--keep-checkpoints", "1", "--report-to", "none",
        "--resume", "latest",
    ]  # fmt: skip


def _data(out: Path, lang: str) -> str:
    return str(out / "data" / f"{lang}.jsonl")


def _teacher(out: Path, weight: float | None, *, sources: int) -> list[str]:
    """The English SD as teacher of a Chinese or bilingual SD stage: every source's English twins."""
    if not weight:
        return []
    return ["--teacher", str(out / "sd-en" / "final"), *["--teacher-data", _data(out, "en")] * sources,
            "--teacher-weight", str(weight)]  # fmt: skip


def _stages() -> list[Stage]:
    def probe(out, p, c):
        if not c.train_probe:  # the embedded probe judges (build.copy_embedded_probe)
            return []
        return [["recipe", "probe", "--out", str(out / "probe"), "--steps", str(p.steps["probe"]),
                 "--batch-size", str(p.batch["probe"]), "--size", str(p.size), "--seed", str(c.seed),
                 "--threads", str(c.threads)]]  # fmt: skip

    def clip_en(out, p, c):
        return [
            ["train", "clip", "--from-config", str(out / "init" / "clip-en.json"), "--data", _data(out, "en"),
             "--batch-size", str(p.batch["clip"]), "--lr", str(p.lr["clip"]), "--val-fraction", "0.02",
             "--num-workers", "1",  # decodes the next batch's pictures meanwhile: the same batches, ~5 % faster
             *_train_common(out, "clip-en", p.steps["clip-en"], c.seed)]
        ]  # fmt: skip

    def clip_zh(out, p, c):
        return [
            ["train", "clip", "--text-tower", str(out / "init" / "text-tower"), "--image-tower",
             str(out / "clip-en" / "final"), "--data", _data(out, "zh"), "--batch-size", str(p.batch["clip"]),
             "--lr", str(p.lr["clip"]), "--val-fraction", "0.02",
             *_train_common(out, "clip-zh", p.steps["clip-zh"], c.seed)]
        ]  # fmt: skip

    def vae(out, p, c):
        # the autoencoder (vae-base), then its decoder alone fine-tuned (vae): the latents stay the base's
        common = ["train", "vae", "--data", _data(out, "zh"), "--resolution", str(p.size),
                  "--batch-size", str(p.batch["vae"]), "--lr", str(p.lr["vae"]), "--lr-scheduler", p.lr_scheduler,
                  "--warmup-steps", str(p.image_warmup_steps), "--val-fraction", "0.02"]  # fmt: skip
        size = ["--block-out-channels", ",".join(map(str, p.vae_channels))]
        if not p.steps.get("vae-decoder"):
            return [[*common, *size, *_train_common(out, "vae", p.steps["vae"], c.seed)]]
        return [[*common, *size, *_train_common(out, "vae-base", p.steps["vae"], c.seed)],
                [*common, "--init", str(out / "vae-base" / "final"), "--decoder-only",
                 "--decode-padding", str(p.vae_decode_padding),
                 *_train_common(out, "vae", p.steps["vae-decoder"], c.seed)]]  # fmt: skip

    def sd_common(out, p, steps, lr):
        # one latent cache for every SD stage: its key (data file, VAE weights, resolution) is the same
        # for all of them, so each data file is encoded once per run rather than once per stage
        return ["--resolution", str(p.size), "--cache-dir", str(out / "cache"),
                "--batch-size", str(p.batch["sd"]), "--lr", str(lr),
                "--noise-offset", str(p.noise_offset), "--caption-dropout", "0.1", "--val-every", "0",
                "--warmup-steps", str(min(50, steps // 10)), "--lr-scheduler", p.lr_scheduler,
                *(["--snr-gamma", str(p.snr_gamma)] if p.snr_gamma else []),
                *(["--val-steps", str(p.eval_steps)] if p.eval_steps else [])]  # fmt: skip

    def sd_en(out, p, c):
        return [
            ["train", "sd", "--model", str(out / "init" / "sd-en"), "--data", _data(out, "en"), "--stage", "2",
             "--freeze-text-encoder", *sd_common(out, p, p.steps["sd-en"], p.lr["sd-unet"]),
             "--val-prompt", "A realistic landscape of tall peaks at night.",
             *_train_common(out, "sd-en", p.steps["sd-en"], c.seed)]
        ]  # fmt: skip

    def sd_zh(out, p, c):
        return [
            ["assemble", "--base", str(out / "sd-en" / "final"), "--text-encoder", str(out / "clip-zh" / "final"),
             "--out", str(out / "init" / "sd-zh"), "--max-length", str(p.text_max_length), "--overwrite"],
            ["train", "sd", "--model", str(out / "init" / "sd-zh"), "--data", _data(out, "zh"), "--stage", "1",
             *sd_common(out, p, p.steps["sd-zh"], p.lr["sd-text"]), "--val-prompt", "夜晚的高山，水墨画",
             *_teacher(out, p.sd_teacher_weight, sources=1),
             *_train_common(out, "sd-zh", p.steps["sd-zh"], c.seed)],
        ]  # fmt: skip

    def sd_zh_en(out, p, c):
        # Taiyi's bilingual recipe: stage 1 trains the text encoder on Chinese data only (that is the Chinese
        # model, sd-zh), stage 2 unfreezes the UNet on Chinese + English. Measured against a stage 1 of its own
        # on mixed captions (300 steps, then 600 of stage 2): English sky 53 → 80 %, Chinese sky 77 → 90 %
        # (docs/recipe.md)
        mixed = ["--data", _data(out, "zh"), "--data", _data(out, "en"), "--mix-ratio", "0.5"]
        return [
            ["train", "sd", "--model", str(out / "sd-zh" / "final"), *mixed, "--stage", "2",
             *sd_common(out, p, p.steps["sd-zh-en"], p.lr["sd-unet"] / 4),
             "--text-encoder-lr", str(p.lr["sd-zh-en-text"]), *_teacher(out, p.sd_zh_en_teacher_weight, sources=2),
             *(["--ema", "--ema-decay", str(p.sd_zh_en_ema_decay)] if p.sd_zh_en_ema_decay else []),
             "--val-prompt", "夜晚的高山，ink wash painting",
             *_train_common(out, "sd-zh-en", p.steps["sd-zh-en"], c.seed)],
        ]  # fmt: skip

    def uncond(out, p, c):
        return [
            ["train", "uncond", "--data", _data(out, "zh"), "--resolution", str(p.size),
             "--vae", str(out / "vae" / "final"), "--block-out-channels", ",".join(map(str, p.uncond_channels)),
             "--batch-size", str(p.batch["uncond"]),
             "--lr", str(p.lr["uncond"]), "--lr-scheduler", p.lr_scheduler,
             "--warmup-steps", str(p.image_warmup_steps),
             "--noise-offset", str(p.noise_offset), "--val-fraction", "0.02",
             *_train_common(out, "uncond", p.steps["uncond"], c.seed)]
        ]  # fmt: skip

    def report(out, p, c):
        return [["recipe", "report", str(out), "--preset", c.preset, "--seed", str(c.seed)]]

    from . import build

    return [
        Stage("data", "render the 山水 training set", (), lambda o, p, c: [], "data/done.json", build.write_data),
        Stage("probe", "attribute probe (the report's judge)", (), probe, "probe/config.json",
              lambda o, p, c: None if c.train_probe else build.copy_embedded_probe(o, p, c)),
        Stage("clip-en", "English CLIP (both towers, from scratch)", ("data",), clip_en, "clip-en/final",
              build.write_clip_config),
        Stage("vae", "autoencoder, then its decoder alone", ("data",), vae, "vae/final"),
        Stage("clip-zh", "Taiyi-CLIP (Chinese tower, frozen image tower)", ("clip-en",), clip_zh, "clip-zh/final",
              build.init_text_tower),
        Stage("sd-en", "English SD (UNet on the frozen English tower)", ("vae", "clip-en"), sd_en, "sd-en/final",
              build.init_english_sd),
        Stage("sd-zh", "Taiyi SD Chinese (stage 1)", ("sd-en", "clip-zh"), sd_zh, "sd-zh/final"),
        Stage("sd-zh-en", "Taiyi SD bilingual (stage 2 on the Chinese model)", ("sd-zh",), sd_zh_en, "sd-zh-en/final"),
        Stage("uncond", "unconditional latent diffusion (Disco Diffusion)", ("data", "vae"), uncond, "uncond/final"),
        Stage("report", "evaluation, report and exports", ("probe", "clip-zh", "sd-zh", "sd-zh-en", "uncond"),
              report, "report.json"),
    ]  # fmt: skip


STAGES: tuple[str, ...] = (
    "data", "probe", "clip-en", "vae", "clip-zh", "sd-en", "sd-zh", "sd-zh-en", "uncond", "report",
)  # fmt: skip


# the trainers' progress lines: "step 800/2400 loss … (0.46 s/step)", "… (1.37 steps/s)",
# "probe step 900/1000 … (251.8 s)"
_STEP = re.compile(r"\bstep (\d+)/(\d+)\b")
_PACE = re.compile(r"\((\d+(?:\.\d+)?) (s/step|steps/s|s)\)")


def stage_progress(log_text: str) -> str | None:
    """The latest ``step N/M`` in a stage's log, with the minutes its pace leaves (None: no step logged yet)."""
    for line in reversed(log_text.splitlines()):
        found = _STEP.search(line)
        if not found:
            continue
        done, total = int(found[1]), int(found[2])
        text = f"step {done}/{total}"
        if done >= total:
            return f"{text}, finishing"
        pace = _PACE.findall(line[found.end() :])
        if pace and done >= 10:  # the first steps' pace includes the warm-up
            value, unit = float(pace[-1][0]), pace[-1][1]
            per_step = {"s/step": value, "steps/s": 1 / value if value else 0.0, "s": value / done}[unit]
            left = (total - done) * per_step / 60
            text += f", about {left:.0f} min left" if left >= 1 else ", under a minute left"
        return text
    return None


def _read_from(path: Path, offset: int, limit: int = 8192) -> str:
    """The last ``limit`` bytes of a log written since ``offset`` ('' if unreadable)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _check(config: RecipeConfig) -> Preset:
    if config.preset not in PRESETS:
        raise InvalidInputError(f"unknown preset {config.preset!r}; use one of {', '.join(PRESETS)}")
    if config.jobs < 1 or config.threads < 1:
        raise InvalidInputError("--jobs and --threads must be at least 1")
    if not config.progress_every >= 0:  # also refuses NaN
        raise InvalidInputError(f"--progress-every must be 0 or more seconds, not {config.progress_every}")
    ok, message = seed_check(config.seed)
    if not ok:
        raise InvalidInputError(message)
    for name in config.only or ():
        if name not in STAGES:
            raise InvalidInputError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    if not str(config.out).strip():
        raise InvalidInputError("--out must name a folder for the run")
    out = Path(config.out)
    if out.is_dir() and not _is_run(out) and any(out.iterdir()):
        # anything else is the user's, which the stages would mix with
        raise InvalidInputError(f"{config.out} is not empty and holds no recipe run; choose a new --out")
    recorded = recorded_config(out / "recipe.json")
    for option in ("preset", "seed"):  # a run continued with other sizes or seeds would mix two runs' models
        if option in recorded and recorded[option] != getattr(config, option):
            raise InvalidInputError(
                f"{config.out} is a run of --{option} {recorded[option]}, not {getattr(config, option)}; "
                f"continue it with --{option} {recorded[option]}, or choose a new --out"
            )
    wanted = set(config.only or STAGES)
    done = {s.name for s in _stages() if (out / s.done).exists()}
    for stage in _stages():  # before any work: a stage whose needs neither ran nor will run cannot start
        missing = [n for n in stage.needs if n not in done and n not in wanted]
        if stage.name in wanted and stage.name not in done and missing:
            raise InvalidInputError(
                f"stage {stage.name} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                f"not done; run {'it' if len(missing) == 1 else 'them'} too"
            )
    return PRESETS[config.preset]


# what a run folder holds besides its stages' folders (temporary ones start with a dot)
_RUN_NAMES = {"logs", "init", "cache", "vae-base", "grids", "models", "recipe.json", "report.json", "report.md"}


def _is_run(out: Path) -> bool:
    """Whether ``out`` holds a recipe run: its ``recipe.json``, or (a run stopped before writing one) a ``logs/``
    of stage logs beside nothing but what a run writes — a user's own folder holds other files."""
    if recorded_config(out / "recipe.json"):
        return True
    logs = out / "logs"
    if not logs.is_dir():
        return False
    known = _RUN_NAMES | set(STAGES)
    return all(p.name in {f"{s}.log" for s in STAGES} | {_LOCK} for p in logs.iterdir()) and all(
        p.name in known or p.name.startswith(".") for p in out.iterdir()
    )


def recorded_config(record: Path) -> dict:
    """The ``config`` a run's ``recipe.json`` records (empty if the file is missing or not a recipe record)."""
    try:
        found = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    config = found.get("config") if isinstance(found, dict) else None
    return config if isinstance(config, dict) and "preset" in config else {}


def _taiyi(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "taiyi.cli", *argv]


def _earlier_record(record: Path) -> tuple[dict[str, float], list[dict]]:
    """What a previous invocation recorded in ``recipe.json``: the seconds of its finished stages and the
    host calibrations (both empty if the file is missing or unreadable)."""
    try:
        found = json.loads(record.read_text(encoding="utf-8"))
        stages, calibrations = found.get("stages", {}), found.get("calibrations", [])
    except (OSError, ValueError, AttributeError):
        return {}, []
    seconds = {
        name: float(v["seconds"])
        for name, v in (stages.items() if isinstance(stages, dict) else ())
        if isinstance(v, dict) and str(v.get("status", "")).startswith("done") and "seconds" in v
    }
    return seconds, [c for c in calibrations if isinstance(c, dict)] if isinstance(calibrations, list) else []


def expected_minutes(stages: list[str], config: RecipeConfig, calibration: float) -> dict | None:
    """Roughly how many minutes ``stages`` take on this host: the shipped models' own run (``weights/SOURCE.json``)
    took so many for them at its host calibration, scaled by this host's (``calibration`` seconds) — a rough
    guide, since stages do not all slow alike (the English CLIP ran 2.0× slower on a host that calibrated 2.4×).

    Returns ``{"minutes", "run", "run_minutes", "run_calibration"}``, or None where that record does not compare
    (another preset or thread count, side-by-side stages, a stage it lacks, no record).
    """
    from ..models import bundled_dir

    try:
        record = json.loads((bundled_dir() / "SOURCE.json").read_text(encoding="utf-8"))
        took = {name: float(v["seconds"]) for name, v in record["stages"].items()}
        reference = [float(c["seconds_median"]) for c in record["calibrations"] if c["threads"] == config.threads]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not config.train_probe:
        took["probe"] = 0.0  # the embedded probe, copied
    if record.get("preset") != config.preset or config.jobs != 1 or not reference or not set(stages) <= set(took):
        return None
    run_minutes = sum(took[name] for name in stages) / 60
    return {"minutes": run_minutes * calibration / min(reference), "run": record.get("run"),
            "run_minutes": run_minutes, "run_calibration": min(reference)}  # fmt: skip


CALIBRATION_WORKLOAD = "4 SGD steps of a 3-layer 64-channel conv net on 32×4×32×32, seeded; median and best of 5"


def host_calibration(threads: int, *, repeats: int = 5, steps: int = 4) -> dict:
    """Seconds a fixed small training workload takes here: how fast this host is today.

    The same code on the same machine ran up to 1.7× slower on some days, so a stage's minutes mean
    little without the host's speed beside them; ``recipe.json`` keeps one figure per invocation.
    """
    import statistics

    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = torch.nn.Sequential(
                torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.SiLU(),
                torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.SiLU(),
                torch.nn.Conv2d(64, 4, 3, padding=1),
            )  # fmt: skip
        x = torch.randn(32, 4, 32, 32, generator=gen)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()

        step()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    from ..bench import machine

    host = machine()
    return {
        "seconds_median": round(statistics.median(times), 3),
        "seconds_best": round(min(times), 3),
        "threads": threads,
        # one host ran this workload in 0.54-0.69 s, another in 0.21: minutes mean little without the processor
        "processor": host["processor"],
        "usable_cores": host["usable_cores"],
        "workload": CALIBRATION_WORKLOAD,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """SIGTERM (``kill``, a job scheduler's stop) ends the recipe as Ctrl-C does, so the stage it is running
    ends with it; Python's default would end the recipe alone and leave the stage training on in the run folder.
    Signal handlers can only be set from the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_recipe(config: RecipeConfig, *, echo: Callable[[str], None] = print) -> dict:
    """Run (or continue) the recipe; returns ``{stage: {"status", "seconds"}}`` and writes ``OUT/recipe.json``.

    Raises:
        TaiyiError: a stage failed (its log is named in the message); finished stages stay finished.
        KeyboardInterrupt: Ctrl-C or SIGTERM; the running stages are ended first (they resume on the next run).
    """
    preset = _check(config)
    out = Path(config.out).resolve()  # the stages run in it (cwd), so the paths they are given must not be relative
    try:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        lock = open(out / "logs" / _LOCK, "a+")  # noqa: SIM115 (held until the run ends)
    except OSError as exc:  # --out names a file, or a folder inside one, or one that cannot be written
        raise InvalidInputError(f"cannot use {config.out} as the run folder: {exc.strerror}") from None
    with lock:
        try:  # two invocations on one folder would train the same stages into the same files
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            raise InvalidInputError(
                f"{config.out} is in use by another taiyi recipe mini; wait for it to end, or stop it"
            ) from None
        return _run(config, preset, out, echo)


_LOCK = "recipe.lock"  # in logs/: held by the invocation running in the folder


def _run(config: RecipeConfig, preset: Preset, out: Path, echo: Callable[[str], None]) -> dict:
    stages = {s.name: s for s in _stages()}
    wanted = set(config.only or STAGES)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # threads are set per command (threads_for)
    status: dict[str, dict] = {}
    done = {name for name, s in stages.items() if (out / s.done).exists()}
    earlier, calibrations = _earlier_record(out / "recipe.json")
    for name in sorted(done, key=STAGES.index):
        # a continued run keeps what its finished stages cost (the time budget is over all of them)
        status[name] = {"status": "done before", **({"seconds": earlier[name]} if name in earlier else {})}
        if name in wanted:
            echo(f"[recipe] {name}: already done")
    pending = [n for n in STAGES if n in wanted and n not in done]
    if pending:  # this invocation's host speed, beside the minutes its stages take
        calibrations.append(host_calibration(config.threads))
        c = calibrations[-1]
        echo(f"[recipe] host calibration: {c['seconds_median']:.2f} s ({CALIBRATION_WORKLOAD}; {c['processor']})")
        guess = expected_minutes(pending, config, c["seconds_median"])
        if guess is not None and guess["run_minutes"] >= 0.1:  # not for the embedded probe's copy alone
            echo(
                f"[recipe] expect roughly {guess['minutes']:.0f} min for {len(pending)} stage(s): the shipped "
                f"models' run {guess['run']} took {guess['run_minutes']:.1f} at a calibration of "
                f"{guess['run_calibration']:.2f} s"
            )
    running: dict[str, tuple[subprocess.Popen | None, list[list[str]], float]] = {}
    started: set[str] = set()  # stages this invocation ran
    began = time.monotonic()
    log_start: dict[str, int] = {}
    shown: dict[str, str] = {}  # the progress line last echoed per stage
    parts: dict[str, list[int]] = {}  # per stage of several commands: [the running one's number, how many]
    last_progress = began

    def ready(name: str) -> bool:
        return all(n in done for n in stages[name].needs)

    def threads_for(name: str) -> int:
        """--threads, or every thread the other running commands leave free when no pending stage could
        start now (the last stages, which would otherwise leave cores idle)."""
        if any(ready(n) for n in pending):
            return config.threads
        used = sum(getattr(p, "_taiyi_threads", config.threads) for n, (p, _, _) in running.items()
                   if n != name and p is not None and p.poll() is None)  # fmt: skip
        return max(config.threads, config.jobs * config.threads - used)

    def start_next_command(name: str) -> bool:
        """Start the stage's next command; False when it has none left."""
        _, queue, t0 = running[name]
        if not queue:
            return False
        argv = queue.pop(0)
        part = parts.setdefault(name, [0, len(queue) + 1])
        part[0] += 1
        if part[0] > 1:  # its step count starts again: say which command it is
            echo(f"[recipe] {name}: part {part[0]}/{part[1]} …")
        threads = threads_for(name)
        log = open(out / "logs" / f"{name}.log", "a", encoding="utf-8")  # noqa: SIM115 (closed with the process)
        log.write(f"$ taiyi {' '.join(argv)}  # {threads} thread(s)\n")
        log.flush()
        log_start[name] = log.tell()  # progress is read from here on: not an earlier invocation's steps
        n = str(threads)
        from .report import STAGE_STARTED

        started = time.time() - (time.monotonic() - t0)  # the stage's start on the clock every process shares
        proc_env = {**env, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, STAGE_STARTED: repr(started)}
        proc = subprocess.Popen(_taiyi(argv), stdout=log, stderr=subprocess.STDOUT, env=proc_env, cwd=out)
        proc._taiyi_threads = threads  # type: ignore[attr-defined]
        proc._taiyi_log = log  # type: ignore[attr-defined]
        running[name] = (proc, queue, t0)
        return True

    def write_record() -> None:
        record = {
            "preset": config.preset,
            "config": asdict(config),
            "preset_values": asdict(PRESETS[config.preset]),
            "stages": status,
            "wall_seconds": round(time.monotonic() - began, 1),  # this invocation
            "stage_seconds": round(sum(v.get("seconds", 0) for v in status.values()), 1),  # every stage, all runs
            "calibrations": calibrations,  # one per invocation that ran stages (host_calibration)
        }
        write_json_atomic(out / "recipe.json", record)

    def finish(name: str, ok: bool) -> None:
        _, _, t0 = running.pop(name)
        seconds = time.monotonic() - t0
        status[name] = {"status": "done" if ok else "failed", "seconds": round(seconds, 1)}
        echo(f"[recipe] {name}: {'done' if ok else 'FAILED'} in {seconds / 60:.1f} min")
        write_record()  # after every stage, so the report stage sees what the stages before it cost

    with _sigterm_as_ctrl_c():
        try:
            while pending or running:
                for name in list(pending):
                    stage = stages[name]
                    if len(running) >= config.jobs:
                        break
                    missing = [n for n in stage.needs if n not in done]
                    if any(n not in wanted and n not in done for n in missing):
                        raise InvalidInputError(
                            f"stage {name} needs {', '.join(missing)}, which is not done; run it too"
                        )
                    if missing:
                        continue
                    pending.remove(name)
                    started.add(name)
                    echo(f"[recipe] {name}: {stage.title} …")
                    t0 = time.monotonic()
                    if stage.prepare is not None:
                        stage.prepare(out, preset, config)
                    running[name] = (None, stage.commands(out, preset, config), t0)
                    if not start_next_command(name):
                        finish(name, True)
                        done.add(name)
                for name, (proc, _, _) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    proc._taiyi_log.close()  # type: ignore[attr-defined]
                    if code != 0:
                        finish(name, False)
                        raise TaiyiError(
                            f"recipe stage {name} failed (exit {code}); see {out / 'logs' / (name + '.log')}"
                        )
                    if not start_next_command(name):
                        if not (out / stages[name].done).exists():
                            finish(name, False)
                            raise TaiyiError(f"recipe stage {name} ended without writing {out / stages[name].done}")
                        finish(name, True)
                        done.add(name)
                if running and config.progress_every and time.monotonic() - last_progress >= config.progress_every:
                    last_progress = time.monotonic()
                    for name in running:
                        line = stage_progress(_read_from(out / "logs" / f"{name}.log", log_start.get(name, 0)))
                        if line and parts[name][1] > 1:
                            line = f"part {parts[name][0]}/{parts[name][1]}, {line}"
                        if line and line != shown.get(name):
                            shown[name] = line
                            echo(f"[recipe] {name}: {line}")
                if running:
                    time.sleep(0.5)
        finally:
            for proc, _, _ in running.values():  # an interrupted run ends its stages too: none trains on, orphaned
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            if started or not (out / "recipe.json").exists():  # a run that ran nothing keeps the record it found
                write_record()
    return status


def with_preset(config: RecipeConfig, **changes) -> RecipeConfig:
    """A copy of ``config`` with fields changed (convenience for callers and tests)."""
    return replace(config, **changes)
