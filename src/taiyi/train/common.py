"""What every taiyi trainer shares: the output folder, atomic checkpoints, resuming, the metrics log.

An output folder looks like::

    run_config.json            the settings of the run (a second run with other settings is refused)
    metrics.jsonl              one JSON object per optimizer step, plus validation rows
    logs/                      the tracker's files (TensorBoard ...)
    checkpoints/step-000100/   accelerate state (model, optimizer, LR scheduler, RNG of every process)
                               + trainer_state.json (step, epoch, data position)
    final/ ...                 what the trainer exports at the end

A checkpoint is written to ``step-XXXXXX.tmp`` and renamed when complete, so a run killed while saving
leaves at most a ``.tmp`` folder, which resuming ignores and removes. ``--resume latest`` picks the
newest complete checkpoint. A checkpoint that cannot be written (a full disk) fails the run with one line
and leaves no trace; the previous checkpoints stay as they were.
Ctrl-C or SIGTERM (a scheduler's preemption, ``kill``) during the training loop ends the optimizer step,
saves a checkpoint and stops the run (:class:`StopOnSignal`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import textwrap
import threading
from collections.abc import Iterable
from pathlib import Path

from ..errors import InvalidInputError, OutputError, StoppedError

logger = logging.getLogger("taiyi")

RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
LOGS = "logs"
CACHE = "cache"  # default home of cached features: kept by --overwrite (it is keyed by content)
CRASH_ENV = "TAIYI_TRAIN_CRASH"  # test hook, see crash_point()
_SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
_STEP_DIR = re.compile(r"^step-(\d+)$")


MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
# Learning-rate schedules after the linear warm-up, by diffusers' names (``--lr-scheduler``): constant, or a
# decay to zero at the run's last step.
LR_SCHEDULERS = ("constant", "linear", "cosine")
# Settings added after runs were recorded without them, with the value those runs trained with: a recorded
# run that lacks one still resumes when the new run keeps that value.
ADDED_SETTINGS = {"lr_scheduler": "constant", "text_encoder_lr": None, "decode_padding": None}


def run_control_checks(config) -> list[tuple[bool, str]]:
    """The ``(ok, message)`` checks every trainer's run-control settings share (precision, cadence, resume)."""
    return [
        (
            config.mixed_precision in MIXED_PRECISION,
            f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, not {config.mixed_precision!r}",
        ),
        (config.val_every >= 0, f"--val-every must be 0 (at the end) or more, not {config.val_every}"),
        (config.save_every >= 0, f"--save-every must be 0 (at the end only) or more, not {config.save_every}"),
        (config.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1, not {config.keep_checkpoints}"),
        (config.log_every >= 1, f"--log-every must be at least 1, not {config.log_every}"),
        seed_check(config.seed),
        (not (config.resume is not None and config.overwrite), "--resume and --overwrite exclude each other"),
    ]


def seed_check(seed: int, name: str = "--seed") -> tuple[bool, str]:
    """The ``(ok, message)`` check of a training seed: numpy takes 0 to 2**32 - 1 (and refuses others mid-run)."""
    return 0 <= seed < 2**32, f"{name} must be between 0 and {2**32 - 1}, not {seed}"


def lr_scheduler_check(name: str) -> tuple[bool, str]:
    """The ``(ok, message)`` check of an ``--lr-scheduler`` value."""
    return name in LR_SCHEDULERS, f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, not {name!r}"


def make_lr_scheduler(optimizer, name: str, *, warmup_steps: int, total_steps: int):
    """diffusers' learning-rate schedule ``name`` (see :data:`LR_SCHEDULERS`): a linear warm-up over
    ``warmup_steps``, then constant, or a linear or cosine decay reaching zero at ``total_steps``.

    The decay follows ``total_steps`` of the invocation: extending a finished run (a larger ``--max-steps``
    with ``--resume``) stretches the schedule over the new total.
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        "constant_with_warmup" if name == "constant" else name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=max(total_steps, 1),
    )


def check_fp16_device(config) -> None:
    """fp16 mixed precision needs a CUDA GPU (one line otherwise), whether asked for with ``--mixed-precision`` or,
    with ``auto``, by ``accelerate launch`` (on the CPU accelerate would train in float32 without a word)."""
    import torch

    if config.cpu or not torch.cuda.is_available():
        if config.mixed_precision == "fp16":
            raise InvalidInputError("--mixed-precision fp16 needs a CUDA GPU; on CPU use bf16 or no")
        if config.mixed_precision == "auto" and os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower() == "fp16":
            raise InvalidInputError(
                "accelerate launch asks for fp16 mixed precision, which needs a CUDA GPU; on CPU launch with "
                "--mixed_precision bf16 or no (or pass --mixed-precision bf16 or no)"
            )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _gpu_visible() -> bool:
    import torch

    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


def use_cpu(cpu: bool) -> bool:
    """The ``cpu`` to give accelerate (``Accelerator``, ``PartialState``): ``--cpu``, or a launch by torchrun
    (``LOCAL_RANK`` set) on a machine with no GPU. accelerate's own multi-CPU mode needs mpirun; told to use the
    CPU, it joins torchrun's processes with gloo, and otherwise each process would train alone."""
    return cpu or ("LOCAL_RANK" in os.environ and not _gpu_visible())


def check_launch(*, warn: bool = True) -> None:
    """What ``accelerate launch`` was asked for and cannot give on this machine: refused in one line, or said in
    a warning when the run goes on (every training command calls this first; ``warn=False``: refusals only).

    Raises:
        InvalidInputError: an FSDP launch with no GPU, a DeepSpeed launch without DeepSpeed installed.
    """
    import importlib.util

    if _env_flag("ACCELERATE_USE_FSDP") and not _gpu_visible():
        raise InvalidInputError(
            "FSDP (accelerate's distributed_type FSDP) needs GPUs and none is visible; on the CPU train several "
            "processes with DDP: accelerate launch --multi_gpu --num_processes N (configs/accelerate/cpu_2proc.yaml)"
        )
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and importlib.util.find_spec("deepspeed") is None:
        raise InvalidInputError(
            "DeepSpeed is not installed: pip install deepspeed, or launch with DDP (configs/accelerate/ddp.yaml)"
        )
    # `accelerate launch --cpu --num_processes N` starts ONE process (accelerate's multi-CPU mode needs mpirun),
    # telling it only the rendezvous address; torchrun and mpirun would also say how many processes there are.
    launched = "MASTER_ADDR" in os.environ and _env_flag("ACCELERATE_USE_CPU")
    told = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if warn and launched and not any(name in os.environ for name in told):
        logger.warning(
            "accelerate launch --cpu starts one process whatever --num_processes says (its multi-CPU mode needs "
            "mpirun): this run trains in 1 process; for N processes on the CPU drop --cpu and pass --multi_gpu "
            "--num_processes N (or --config_file configs/accelerate/cpu_2proc.yaml)"
        )


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON next to ``path`` and rename it into place: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def check_output_dir(
    output: Path,
    config: dict,
    *,
    resume: str | None,
    overwrite: bool = False,
    may_differ: Iterable[str] = (),
) -> None:
    """Check, without writing anything, that ``output`` may hold this run (every process calls this).

    Args:
        output: the run's output folder.
        config: the run's settings (JSON values).
        resume: the ``--resume`` value; resuming requires the settings to match the recorded ones
            except for the keys in ``may_differ``.
        overwrite: a folder holding another run will be cleared (by :func:`record_run`).
        may_differ: settings that do not change the result (logging, checkpoint cadence ...).

    Raises:
        InvalidInputError: the folder holds something else, or another run and neither ``--resume``
            nor ``--overwrite`` was given, or ``--resume`` with settings that change the run (``--resume PATH``
            naming another run's checkpoint: that run's recorded settings).
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise InvalidInputError(f"output {output} is a file; give a folder for the training run")
    recorded_path = output / RUN_CONFIG
    ignore = set(may_differ)
    if recorded_path.is_file():
        try:
            recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidInputError(
                f"{recorded_path} is unreadable ({exc}); remove it or choose a new --output"
            ) from exc
        changed = _changed_settings(recorded, config, ignore)
        if overwrite:
            return
        if resume is None:
            what = f"a different run (changed: {', '.join(changed[:4])})" if changed else "this run already"
            raise InvalidInputError(
                f"output {output} holds {what}; pass --resume latest to continue it, --overwrite to start again, "
                "or choose a new --output"
            )
        if changed:
            shown = ", ".join(f"{k}: {recorded.get(k)!r} -> {config.get(k)!r}" for k in changed[:3])
            raise InvalidInputError(
                f"cannot resume the run in {output} with other settings ({shown}); use the recorded settings "
                f"(see {recorded_path}) or choose a new --output"
            )
    elif output.is_dir() and any(p.name not in (LOGS, CACHE) for p in output.iterdir()) and not overwrite:
        raise InvalidInputError(
            f"output {output} is not empty and holds no taiyi training run; choose a new --output or pass --overwrite"
        )
    if resume not in (None, "latest"):
        _check_checkpoint_run(output, config, resume, ignore)


def _changed_settings(recorded: dict, config: dict, ignore: set[str]) -> list[str]:
    """The settings that differ between a recorded run and this one (settings added since count as their old value)."""
    recorded = {**{k: v for k, v in ADDED_SETTINGS.items() if k in config}, **recorded}
    return sorted(k for k in set(recorded) | set(config) if k not in ignore and recorded.get(k) != config.get(k))


def _check_checkpoint_run(output: Path, config: dict, resume: str, ignore: set[str]) -> None:
    """``--resume PATH`` naming another run's checkpoint continues that run: its recorded settings must be this
    run's (the optimizer and schedule come from the checkpoint, so a changed --lr or --data would be recorded
    but not used)."""
    path = _resume_path(output, resume)
    run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else None
    if run_dir is None or not (run_dir / RUN_CONFIG).is_file() or run_dir.resolve() == output.resolve():
        return  # a checkpoint of --output itself (checked above), or one without a recorded run
    try:
        recorded = json.loads((run_dir / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(recorded, dict):
        return
    if set(config) - set(recorded) - set(ADDED_SETTINGS) or set(recorded) - set(config):
        return  # another kind of run: loading its checkpoint says it does not fit
    changed = _changed_settings(recorded, config, ignore)
    if changed:
        shown = ", ".join(f"{k}: {recorded.get(k)!r} -> {config.get(k)!r}" for k in changed[:3])
        raise InvalidInputError(
            f"--resume {resume} is a checkpoint of the run in {run_dir}, which had other settings ({shown}); "
            f"resume it with those settings (see {run_dir / RUN_CONFIG}) or start without --resume"
        )


def _resume_path(output: Path, resume: str) -> Path:
    """The folder ``--resume PATH`` names: the path itself, or a checkpoint name inside ``output``."""
    path = Path(resume)
    if not path.exists() and (Path(output) / CHECKPOINTS / resume).exists():
        path = Path(output) / CHECKPOINTS / resume
    return path


def record_run(output: Path, config: dict, *, overwrite: bool = False) -> None:
    """Create ``output`` and write ``run_config.json`` (main process, after :func:`check_output_dir`).

    With ``overwrite``, a previous run's checkpoints, metrics and exports (:data:`RUN_ENTRIES`) are removed first;
    anything else in the folder is left alone.
    """
    output = Path(output)
    if overwrite and output.is_dir():
        _clear_run(output)
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / RUN_CONFIG, config)


# What a run writes at the top of its output folder (the feature cache aside: it is keyed by content, and kept).
RUN_ENTRIES = frozenset(
    {RUN_CONFIG, METRICS, CHECKPOINTS, LOGS, "final", "validation", "loss.png", "vae_report.json", "tokenizer",
     "taiyi-text-tower"}
)  # fmt: skip


def _clear_run(output: Path) -> None:
    """Remove a previous run's checkpoints, metrics and exports, and nothing else: files of the user's own in the
    folder (notes, even the training data) stay."""
    for child in output.iterdir():
        if child.name not in RUN_ENTRIES and not (child.name.startswith(".") and child.name.endswith(".tmp")):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``.tmp`` folders are not complete)."""
    folder = Path(output) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def remove_partial_checkpoints(output: Path) -> list[Path]:
    """Delete ``checkpoints/*.tmp`` folders left by a run killed while saving; returns what was removed."""
    folder = Path(output) / CHECKPOINTS
    removed = [p for p in folder.glob("*.tmp")] if folder.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def resolve_resume(output: Path, resume: str | None) -> Path | None:
    """The checkpoint folder ``--resume`` names: ``latest`` (None when the run has none yet) or a path.

    Raises:
        InvalidInputError: the path is not a complete checkpoint.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output)
        return found[-1] if found else None
    path = _resume_path(output, resume)
    if not (path / TRAINER_STATE).is_file():
        raise InvalidInputError(
            f"--resume {resume}: no complete checkpoint there (no {TRAINER_STATE}); give 'latest' or a folder "
            f"such as {Path(output) / CHECKPOINTS / step_dir_name(100)}"
        )
    return path


def save_checkpoint(accelerator, output: Path, step: int, state: dict, *, keep: int) -> Path:
    """Save the accelerate state and ``state`` as ``checkpoints/step-XXXXXX``, atomically.

    Every process must call this (each saves its RNG state). The folder is written as
    ``step-XXXXXX.tmp`` and renamed once complete; then all but the newest ``keep`` checkpoints are
    deleted.

    Raises:
        OutputError: a write failed on any process (a full disk, a quota, an I/O error). The half-written
            ``.tmp`` folder is removed and the older checkpoints are untouched, so ``--resume latest``
            continues from the previous one. Every process raises, so none waits forever for the others.
    """
    folder = Path(output) / CHECKPOINTS
    final = folder / step_dir_name(step)
    tmp = folder / (step_dir_name(step) + ".tmp")
    main = accelerator.is_main_process
    failure: OSError | None = None
    if main:
        failure = _attempt(lambda: _fresh_folder(tmp))
    accelerator.wait_for_everyone()
    if failure is None:
        failure = _attempt(lambda: accelerator.save_state(str(tmp), safe_serialization=True))
    if not _any_failed(accelerator, failure) and main:

        def finish() -> None:
            write_json_atomic(tmp / TRAINER_STATE, state)
            crash_point("checkpoint", step)
            if final.exists():  # a checkpoint of this step from an interrupted earlier attempt
                shutil.rmtree(final)
            os.replace(tmp, final)

        failure = _attempt(finish)
    if _any_failed(accelerator, failure):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # resume must never see (or trip over) half a checkpoint
        accelerator.wait_for_everyone()
        raise _checkpoint_error(output, final, failure)
    if main:
        for old in list_checkpoints(output)[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def on_main_process(accelerator, work):
    """Run ``work()`` on the main process while the others wait; its result there, None elsewhere.

    A user error (:class:`InvalidInputError`) or a failed write (``OSError``) in ``work`` is raised on every
    process, so each ends with the same one line instead of the others dying in a barrier with a traceback.
    """
    result, failure = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except (InvalidInputError, OSError) as exc:
            failure = exc
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        sent = None
        if isinstance(failure, OSError):
            sent = ("os", failure.errno, failure.strerror or str(failure), failure.filename)
        elif failure is not None:
            sent = ("input", str(failure))
        sent = broadcast_object_list([sent])[0]  # every process meets here: the barrier
        if failure is None and sent is not None:
            failure = InvalidInputError(sent[1]) if sent[0] == "input" else OSError(*sent[1:])
    if failure is not None:
        raise failure
    return result


def _fresh_folder(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _attempt(write) -> OSError | None:
    """Run ``write``; the OSError it raised (disk full, quota, I/O error), or None."""
    try:
        write()
    except OSError as exc:
        return exc
    return None


def _any_failed(accelerator, failure: OSError | None) -> bool:
    """True on every process when ``failure`` is set on any of them (a collective call: all must make it)."""
    if accelerator.num_processes == 1:
        return failure is not None
    import torch

    flag = torch.tensor([0.0 if failure is None else 1.0], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum")) > 0


def _checkpoint_error(output: Path, final: Path, failure: OSError | None) -> OutputError:
    """One line: what failed, and that the previous checkpoint is kept for ``--resume latest``."""
    found = list_checkpoints(output)
    kept = (
        f"the previous checkpoint {found[-1].name} is kept: free space and continue with --resume latest"
        if found
        else "there is no earlier checkpoint: free space and run again"
    )
    if failure is None:
        what = "another process could not write its part"
    elif failure.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device"
    else:
        what = f"{failure.strerror or failure}"
    return OutputError(f"{what} while writing checkpoint {final} (removed, nothing half-written is left); {kept}")


def load_checkpoint(accelerator, path: Path, total_steps: int | None = None) -> dict:
    """Restore the accelerate state saved by :func:`save_checkpoint`; returns its trainer state.

    Args:
        accelerator: the run's ``Accelerator``.
        path: the checkpoint folder.
        total_steps: the run's last step: a checkpoint past it is refused (resuming it would train nothing and
            export the checkpoint's later weights as this run's result).
    """
    try:
        state = json.loads((Path(path) / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"checkpoint {path} is unreadable ({TRAINER_STATE}: {exc})") from exc
    step = state.get("step") if isinstance(state, dict) else None
    if total_steps is not None and isinstance(step, int) and step > total_steps:
        raise InvalidInputError(
            f"checkpoint {path} is at step {step}, past this run's {total_steps} steps; resume it with --max-steps "
            f"{step} or more, or give an earlier checkpoint"
        )
    try:
        accelerator.load_state(str(path))
    except FileNotFoundError as exc:
        raise InvalidInputError(
            f"checkpoint {path} is incomplete or was saved by a different number of processes ({exc.filename}); "
            f"resume with {state.get('num_processes', 'the same number of')} processes"
        ) from exc
    except Exception as exc:  # another kind of run's weights (missing keys), a damaged file (a bad header) ...
        reason = textwrap.shorten(" ".join(str(exc).split()), 160, placeholder=" …") or type(exc).__name__
        raise InvalidInputError(
            f"checkpoint {path} does not load into this run ({reason}); give a checkpoint of this run, "
            "or start afresh with --overwrite"
        ) from exc
    return state


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended by the main process only."""

    def __init__(self, path: Path, *, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (by a run that went on past its last checkpoint and died)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [row for row in self.read() if row.get("step", 0) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def append(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def read(self) -> list[dict]:
        """The rows; a torn line (a run killed, or a disk filled, while writing it) is left out."""
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


class StopOnSignal:
    """While a training loop runs, Ctrl-C and SIGTERM ask it to stop after the optimizer step, with a checkpoint.

    Cluster schedulers (Slurm, Kubernetes) and ``torchrun`` send SIGTERM and kill the job some seconds later;
    without this a run loses everything since its last ``--save-every`` checkpoint. At the end of
    every optimizer step the loop asks :meth:`requested` (every process, at the same step: it is a collective
    call), skips a validation when stopping, and calls :meth:`end_step`, which saves the checkpoints that are
    due or asked for and stops the run. The same signal a second time stops at once: Ctrl-C raises
    ``KeyboardInterrupt``, SIGTERM goes to the handler found before (by default, the process ends). Handlers are
    installed only from the main thread (elsewhere the loop is not stoppable this way) and put back on exit.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._noticed = False
        self.stopping = False

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNAL_NAMES:
                found = signal.getsignal(signum)
                self._previous[signum] = signal.SIG_DFL if found is None else found
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum  # noticed at the end of the step (no logging here: it may interrupt a write)
        elif signum == self.signum:  # asked twice: at once
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)

    def requested(self, accelerator, step: int) -> bool:
        """True on every process when any of them was signalled (all must call it at the same step)."""
        crash_point("signal", step)
        if accelerator.num_processes > 1:
            import torch

            flag = torch.tensor([float(self.signum or 0)], device=accelerator.device)
            got = int(accelerator.gather(flag).max())
            self.signum = self.signum or got or None
        # what every process agreed on: a signal arriving after the gather counts at the next step
        self.stopping = self.signum is not None
        if self.stopping and not self._noticed and accelerator.is_main_process:
            self._noticed = True
            logger.warning(
                "%s: saving a checkpoint after this step, then stopping (the same again stops at once)",
                _SIGNAL_NAMES.get(self.signum, f"signal {self.signum}"),
            )
        return self.stopping

    def end_step(self, accelerator, output: Path, config, step: int, total_steps: int, state: dict) -> None:
        """Save a checkpoint when one is due (every ``config.save_every`` steps, the last step) or :meth:`requested`
        said to stop; then stop (raises :class:`~taiyi.errors.StoppedError`)."""
        if (config.save_every and step % config.save_every == 0) or step == total_steps or self.stopping:
            saved = save_checkpoint(accelerator, output, step, state, keep=config.keep_checkpoints)
        crash_point("step", step)
        if self.stopping:
            accelerator.end_training()
            name = _SIGNAL_NAMES.get(self.signum, f"signal {self.signum}")
            raise StoppedError(
                f"stopped by {name} after step {step} of {total_steps}; saved {saved}: continue with --resume latest",
                128 + int(self.signum or signal.SIGTERM),
            )


def crash_point(where: str, step: int) -> None:
    """Test hook: with ``TAIYI_TRAIN_CRASH=where:step`` set, the process dies here at once, as if killed.

    ``os._exit`` skips every ``finally`` and ``atexit`` handler, as SIGKILL would, so a test sees exactly
    what a killed run leaves on disk. Points: ``checkpoint`` (a checkpoint half-written) and ``step``
    (after an optimizer step and its checkpoint, if any). ``sigterm:N`` and ``sigint:N`` instead send that
    signal to the main process (rank 0 only) after step N, before the loop asks :class:`StopOnSignal`.
    """
    wanted = os.environ.get(CRASH_ENV, "")
    if wanted in (f"sigterm:{step}", f"sigint:{step}") and where == "signal":
        if os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), signal.SIGTERM if wanted.startswith("sigterm") else signal.SIGINT)
        return
    if wanted == f"{where}:{step}":
        logger.warning("%s=%s: simulating a kill", CRASH_ENV, os.environ[CRASH_ENV])
        logging.shutdown()
        os._exit(137)
