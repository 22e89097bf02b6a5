"""Batch jobs: ``taiyi generate --prompts-file F`` (txt, jsonl or csv), resumable.

- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
- ``.jsonl``: one JSON object per line with ``prompt`` and any of the per-row overrides below.
- ``.csv``: a header row naming ``prompt`` and any overrides.

Row ``r`` writes ``NNNNN.png`` (``NNNNN-i.png`` for several images) in the output folder; rows whose
files all exist are skipped, so re-running a killed job finishes it. ``manifest.jsonl`` lists every
row's files and parameters when the job ends.

Scale-out: under ``accelerate launch`` (or torchrun) with N processes, process k takes rows k, k+N,
k+2N… on its own device, writes their files, and after all have finished the main process writes one
manifest for every row (read back from the PNGs' parameters)::

    accelerate launch --config_file configs/accelerate/ddp.yaml -m taiyi.cli generate --prompts-file p.jsonl -o out/
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from pathlib import Path

from .errors import InvalidInputError, OutputError
from .prompts import require_text

OVERRIDES = {
    "negative_prompt": str,
    "steps": int,
    "guidance": float,
    "guidance_end": float,
    "guidance_rescale": float,
    "seed": int,
    "num_images": int,
    "width": int,
    "height": int,
    "scheduler": str,
    "emphasis": str,
    "variation_seed": int,
    "variation_strength": float,
    "hires_scale": float,
    "hires_strength": float,
    "hires_steps": int,
    "hires_upscaler": str,
    "clip_skip": int,
}


def _convert(key: str, kind: type, value, where: str):
    """``value`` as ``kind``: a CSV cell's text, or a JSON value of that type (a whole float for an int). A bool, or
    a fraction for a whole number, is refused rather than rounded: ``"steps": 1.5`` is not 1 step."""
    if kind is str:
        ok = isinstance(value, str)
    elif isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            ok = False
    elif kind is int:
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    else:
        ok = isinstance(value, int | float)
    if ok and not isinstance(value, bool):
        return kind(value)
    what = {int: "a whole number", float: "a number", str: "text"}[kind]
    raise InvalidInputError(f"{where}: {key} must be {what}, not {value!r}")


def check_settings(settings: dict, where: str) -> None:
    """Judge a row's settings (those given; None is "the default") as ``generate`` will, before any is drawn.

    Raises:
        InvalidInputError: a value ``generate`` would refuse, in one line naming the row.
    """
    import inspect

    from .pipeline import check_settings as check

    judged = inspect.signature(check).parameters  # the settings that need no model (not prompts, normalize …)
    given = {k: v for k, v in settings.items() if v is not None and k in judged}
    try:
        check(**given)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None


def _coerce(row: dict, where: str) -> dict:
    unknown = set(row) - set(OVERRIDES) - {"prompt"}
    if unknown:
        raise InvalidInputError(
            f"{where}: unknown column(s) {', '.join(sorted(unknown))}; allowed: prompt, " + ", ".join(OVERRIDES)
        )
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise InvalidInputError(f"{where}: no prompt" if not row.get("prompt") else f"{where}: prompt must be text")
    out = {"prompt": row["prompt"]}
    for key, kind in OVERRIDES.items():
        value = row.get(key)
        if value is None or value == "":
            continue
        out[key] = _convert(key, kind, value, where)
    for key in ("prompt", "negative_prompt"):
        if key in out:
            try:
                require_text(out[key], key)  # JSON can carry a lone surrogate, "\ud800"
            except InvalidInputError as exc:
                raise InvalidInputError(f"{where}: {exc}") from None
    check_settings(out, where)
    return out


def read_prompts_file(path: str | os.PathLike) -> list[dict]:
    """Read a prompts file into rows of ``{"prompt": ..., <overrides>}``."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"prompts file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as exc:
        raise InvalidInputError(f"prompts file {path} is not UTF-8 text") from exc
    suffix = path.suffix.lower()
    rows: list[dict] = []
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise InvalidInputError(f"{path}:{n}: each line must be a JSON object with a prompt")
            rows.append(_coerce(obj, f"{path}:{n}"))
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise InvalidInputError(f"{path}: the first row must be a header naming a 'prompt' column")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if any(v not in ("", None) for v in row.get(None) or []):  # csv's restkey: cells beyond the header
                raise InvalidInputError(
                    f"{where}: {len(reader.fieldnames) + len(row[None])} cells, but the header names "
                    f"{len(reader.fieldnames)} columns; quote a cell that holds a comma"
                )
            rows.append(_coerce({k: v for k, v in row.items() if k is not None}, where))
    else:
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append({"prompt": line.strip()})
    if not rows:
        raise InvalidInputError(f"prompts file {path} holds no prompts")
    return rows


def row_paths(out_dir: Path, index: int, num_images: int) -> list[Path]:
    if num_images == 1:
        return [out_dir / f"{index:05d}.png"]
    return [out_dir / f"{index:05d}-{i}.png" for i in range(num_images)]


def process_group():
    """``(rank, world_size, state)`` when launched with several processes, else ``(0, 1, None)``.

    ``state`` is accelerate's ``PartialState`` (its ``device`` is this process's GPU, or the CPU: with no
    GPU, processes started by torchrun are joined with gloo on the CPU, as the trainers do).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state


def check_output_folder(out_dir: Path) -> None:
    """Refuse an output that cannot be the batch's folder (it is created when missing, its parent is not)."""
    if not out_dir.parent.is_dir():
        raise InvalidInputError(f"output folder {out_dir.parent} does not exist; create it first")
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"{out_dir} is a file; --prompts-file writes a folder of pictures: give a folder")


def run_batch(
    pipe,
    rows: list[dict],
    defaults: dict,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    on_row=None,
    rank: int = 0,
    world_size: int = 1,
    barrier=None,
) -> dict:
    """Generate every row into ``out_dir`` (created if missing), skipping rows already written.

    Args:
        pipe: a loaded :class:`taiyi.pipeline.TaiyiPipeline`.
        rows: from :func:`read_prompts_file`.
        defaults: keyword arguments of ``generate`` that rows may override.
        out_dir: output folder.
        overwrite: redo rows whose files exist.
        on_row: called with the row index after each row (progress).
        rank, world_size: this process takes rows ``rank``, ``rank + world_size``, …
        barrier: called once this process's rows are written (all processes meet there); then the main
            process (rank 0) writes the manifest of every row.

    Returns:
        ``{"written": n, "skipped": n}`` for this process's rows.
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}") from exc
    try:
        return _run_rows(pipe, rows, defaults, out_dir, overwrite, on_row, rank, world_size, barrier)
    except BaseException:
        if created and world_size == 1 and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a run that wrote nothing leaves nothing
        raise


def _differs(params, prompt: str, settings: dict, pos: int, pipe) -> str | None:
    """How the picture ``params`` describes is not image ``pos`` of this row (None when it is)."""
    from .pipeline import DEFAULT_STEPS, check_hires

    expected = {
        "prompt": prompt,
        "negative_prompt": settings.get("negative_prompt") or "",
        "steps": settings.get("steps"),
        # a variation batch keeps its seed (A1111's rule); any other image i has seed + i
        "seed": None
        if settings.get("seed") is None
        else settings["seed"] + (0 if settings.get("variation_strength") else pos),
        "width": settings.get("width"),
        "height": settings.get("height"),
        "scheduler": settings.get("scheduler"),
        "guidance": settings.get("guidance"),
        "guidance_end": settings.get("guidance_end"),
        "guidance_rescale": settings.get("guidance_rescale"),
        "batch_size": settings.get("num_images", 1),
        "normalize": settings.get("normalize"),
        "emphasis": settings.get("emphasis"),
        "variation_seed": (  # recorded only with a strength above 0; without a seed, a random one
            settings["variation_seed"] + pos
            if settings.get("variation_strength") and settings.get("variation_seed") is not None
            else None
        ),
        "variation_strength": settings.get("variation_strength", 0.0),
        "clip_skip": settings.get("clip_skip", 1),
    }  # not the model: one model has several spellings (a short name, a hub id, a folder)
    hires = check_hires(
        settings.get("hires_scale"), settings.get("hires_strength", 0.7), settings.get("hires_steps", 0),
        settings.get("hires_upscaler", "Latent"), steps=settings.get("steps") or DEFAULT_STEPS,
    )  # fmt: skip
    # None is "off" here, not "the default": a row drawn with a hires fix is not the same row drawn without one
    expected_hires = {"hires_scale": None if hires is None else hires.scale}
    if hires is not None:
        expected_hires.update(strength=hires.strength, hires_steps=hires.steps, hires_upscaler=hires.upscaler)
    for key, value in [*expected.items(), *expected_hires.items()]:
        if (value is not None or key in expected_hires) and getattr(params, key) != value:
            return f"its {key} is {getattr(params, key)!r}, not {value!r}"
    from .lora import HASHES_KEY, lora_extras

    ours = lora_extras(list(getattr(pipe, "loras", None) or [])).get(HASHES_KEY, "none")
    if params.extras.get(HASHES_KEY, "none") != ours:
        return f"its LoRAs are {params.extras.get(HASHES_KEY, 'none')}, not {ours}"
    return None


def _existing(pipe, index: int, prompt: str, settings: dict, paths: list[Path]) -> list | None:
    """The parameters of row ``index``'s pictures when all are there (None when some are missing).

    Raises:
        InvalidInputError: a file of the row is there but is not this row's picture (another job's folder, an
            edited prompts file, a file that is not taiyi's): nothing is skipped or overwritten on a guess.
    """
    from .metadata import read_parameters

    found = []
    for pos, path in enumerate(paths):
        if not path.exists():
            found.append(None)
            continue
        try:
            params = read_parameters(path)
            why = _differs(params, prompt, settings, pos, pipe)
        except InvalidInputError as exc:
            params, why = None, str(exc)
        if why is not None:
            raise InvalidInputError(
                f"{path} is already there but is not row {index}'s picture ({why}); give a new output folder, "
                "or --overwrite to draw the rows again"
            )
        found.append(params)
    return None if None in found else found


def _run_rows(pipe, rows, defaults, out_dir: Path, overwrite, on_row, rank, world_size, barrier) -> dict:
    from .io import atomic_write_bytes, save_png
    from .metadata import pnginfo, read_parameters

    counts = {"written": 0, "skipped": 0}
    params_of: dict[int, list] = {}
    mine = [index for index in range(len(rows)) if index % world_size == rank]
    # Every row is judged, and every file already there checked, before the first picture is drawn.
    for index in mine:
        settings = {**defaults, **rows[index]}
        prompt = settings.pop("prompt")
        paths = row_paths(out_dir, index, settings.get("num_images", 1))
        check_settings(settings, f"row {index} ({paths[0].name})")
        if not overwrite:
            found = _existing(pipe, index, prompt, settings, paths)
            if found is not None:
                params_of[index] = found
    for index in mine:
        kwargs = {**defaults, **rows[index]}
        prompt = kwargs.pop("prompt")
        paths = row_paths(out_dir, index, kwargs.get("num_images", 1))
        if index in params_of:
            counts["skipped"] += 1
        else:
            try:
                result = pipe.generate(prompt, **kwargs)
            except InvalidInputError as exc:
                raise InvalidInputError(f"row {index} ({paths[0].name}): {exc}") from None
            for image, p, path in zip(result.images, result.parameters, paths, strict=True):
                save_png(image, path, pnginfo=pnginfo(p), overwrite=True)
            counts["written"] += 1
            params_of[index] = result.parameters
        if on_row is not None:
            on_row(index)
    if barrier is not None:
        barrier()
    if rank == 0:
        manifest = []
        for index, row in enumerate(rows):
            paths = row_paths(out_dir, index, {**defaults, **row}.get("num_images", 1))
            params = params_of.get(index) or [read_parameters(p) for p in paths]
            manifest.append(
                {"row": index, "files": [p.name for p in paths], "parameters": [asdict(p) for p in params]}
            )
        lines = "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in manifest)
        atomic_write_bytes(out_dir / "manifest.jsonl", lines.encode("utf-8"), overwrite=True)
    return counts
