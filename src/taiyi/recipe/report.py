"""The last stage of ``taiyi recipe mini``: judge every model, check stage 1 froze what it should, write
``report.json`` + ``report.md`` (tables, image grids, loss plots) and export the models under ``models/``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from ..errors import InvalidInputError
from ..train.common import seed_check, write_json_atomic

__all__ = ["frozen_check", "targets", "write_report", "EXPORTS"]

# exported name → run subfolder
EXPORTS: dict[str, str] = {
    "taiyi-mini-zh": "sd-zh/final",
    "taiyi-mini-zh-en": "sd-zh-en/final",
    "taiyi-mini-clip": "clip-zh/final",
    "taiyi-mini-uncond": "uncond/final",
    "taiyi-mini-probe": "probe",
}

# model, its run folder, the prompt languages it is judged in
_JUDGED_MODELS = (
    ("English SD", "sd-en/final", ("en",)),
    ("Taiyi SD Chinese", "sd-zh/final", ("zh",)),
    ("Taiyi SD bilingual", "sd-zh-en/final", ("zh", "en", "mixed")),
)
_ATTRS = ("time", "sky", "land", "water", "style", "things")

_ENGLISH = "English SD / en"
_CHINESE = "Taiyi SD Chinese / zh"
# the recipe's quality targets: the Chinese model's floors on Chinese prompts (seen combinations), and the
# largest shortfalls allowed against the English SD (paired over the same scenes) and of held-out
# combinations against seen ones
_FLOORS = {"time": 90.0, "land": 85.0, "water": 80.0, "style": 80.0}
_BEHIND_ENGLISH = -3.0
_HELD_OUT_BEHIND = -15.0
BUDGET_MINUTES = 60.0  # the whole recipe on 2 CPU cores


def _bound_of(bound: float | dict[str, float], name: str) -> float:
    """A target's bound for one attribute (one bound for all, or one per attribute)."""
    return bound[name] if isinstance(bound, dict) else bound


def _verdict(cells: dict[str, dict], bound: float | dict[str, float]) -> str:
    """ "met", or which attributes fall below their bound and by how many standard errors."""
    misses = []
    for name, cell in cells.items():
        low = _bound_of(bound, name)
        if cell["value"] < low:
            se = cell.get("se")
            misses.append(f"{name} ({(low - cell['value']) / se:.1f} SE)" if se else name)
    return "met" if not misses else "missed: " + ", ".join(misses)


def targets(faithfulness: dict) -> list[dict]:
    """The recipe's quality targets judged on a report's faithfulness results, each with its figures, their
    standard errors (the prompt is the unit of sampling) and a verdict that says how many standard errors a
    miss is — a miss of one or two standard errors is within what another set of prompts could show.

    Rows: the Chinese model's floors (seen combinations); its held-out minus seen combinations; the Chinese
    model and the bilingual one (Chinese and English prompts) each minus the English SD, paired over the same
    scenes, seen and held-out combinations. Rows whose results are missing are left out.
    """
    from .faithfulness import by_value, compare

    rows: list[dict] = []
    zh = faithfulness.get(_CHINESE)
    if zh is not None:
        se = zh.get("stderr", {}).get("seen", {})
        cells = {a: {"value": zh["seen"][a], "se": se.get(a)} for a in _FLOORS if a in zh["seen"]}
        try:
            where = _misses_by_value(cells, _FLOORS, by_value(zh), "seen")
        except InvalidInputError:
            where = {}  # a result without per-prompt rows: no breakdown
        rows.append({"target": f"{_CHINESE}, seen", "bound": dict(_FLOORS), "cells": cells,
                     "verdict": _verdict(cells, _FLOORS), "by_value": where})  # fmt: skip
        ses = zh.get("stderr", {})
        cells = {}
        for a in _ATTRS:
            if a in zh["seen"] and a in zh["held_out"]:
                s1, s2 = ses.get("seen", {}).get(a), ses.get("held_out", {}).get(a)
                se = (s1**2 + s2**2) ** 0.5 if s1 is not None and s2 is not None else None
                cells[a] = {"value": zh["held_out"][a] - zh["seen"][a], "se": se}
        rows.append({"target": f"{_CHINESE}: held-out − seen", "bound": _HELD_OUT_BEHIND, "cells": cells,
                     "verdict": _verdict(cells, _HELD_OUT_BEHIND), "by_value": {}})  # fmt: skip
    en = faithfulness.get(_ENGLISH)
    if en is not None:
        for name in (_CHINESE, "Taiyi SD bilingual / zh", "Taiyi SD bilingual / en"):
            if name not in faithfulness:
                continue
            try:
                paired = compare(faithfulness[name], en)
            except InvalidInputError:
                continue  # judged on other scenes (or before rows had them): no paired figure
            per_value = by_value(faithfulness[name], en)  # the same rows compare accepted
            for group in ("seen", "held_out"):
                cells = {a: {"value": d["diff"], "se": d["se"]} for a, d in paired[group].items()}
                where = _misses_by_value(cells, _BEHIND_ENGLISH, per_value, group)
                verdict = _verdict(cells, _BEHIND_ENGLISH)
                rows.append({"target": f"{name} − {_ENGLISH}, {group.replace('_', '-')}", "bound": _BEHIND_ENGLISH,
                             "cells": cells, "verdict": verdict, "by_value": where})  # fmt: skip
    return rows


def _misses_by_value(cells: dict, bound, table: dict, group: str) -> dict:
    """For each attribute a target misses, its figure per prompted value (``{attr: {value: {"value", "se"}}}``)
    from ``table`` (:func:`~taiyi.recipe.faithfulness.by_value`): which river, moon or time of day the miss is."""
    missed = [a for a in cells if a in table and cells[a]["value"] < _bound_of(bound, a)]
    return {
        a: {
            str(v): {"value": c[group].get("pct", c[group].get("diff")), "se": c[group]["se"]}
            for v, c in table[a].items()
            if group in c
        }
        for a in missed
    }


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if ".fp16." not in f.name]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def frozen_check(base: Path, trained: Path, components=("unet", "vae")) -> dict[str, bool]:
    """Whether every tensor of each component is bit-identical between two pipeline folders."""
    result = {}
    for name in components:
        a, b = _tensors(base / name), _tensors(trained / name)
        result[name] = bool(a) and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return result


def _grid(pipe, prompts, path: Path, *, steps: int | None, seed: int, per_prompt: int = 4) -> None:
    from ..pipeline import make_grid

    images = []
    sampling = {} if steps is None else {"steps": steps}  # None: the pipeline's defaults
    for j, prompt in enumerate(prompts):
        images += pipe.generate(
            prompt, num_images=per_prompt, seed=seed + 100 * j, width=64, height=64, **sampling
        ).images
    grid = make_grid(images, cols=per_prompt)
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)


def _half_safetensors(folder: Path) -> None:
    """Rewrite every ``*.safetensors`` under ``folder`` with its float32 tensors stored as float16.

    Halves what the package carries; loaders read them back in the dtype they are asked for (float32
    on CPU), so a picture differs only by float16 rounding of the weights. Integer tensors and the
    header metadata are kept as they are.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not any(t.dtype == torch.float32 for t in tensors.values()):
            continue
        tensors = {k: t.half() if t.dtype == torch.float32 else t for k, t in tensors.items()}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)


def _copy_export(src: Path, dst: Path) -> int:
    """Copy one model folder to ``dst`` atomically, weights in float16; returns its size in bytes."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoints", "cache", "logs", "*.tmp"))
    _half_safetensors(tmp)
    for config in tmp.rglob("config.json"):  # _name_or_path: the run folder it was loaded from (a local path)
        values = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(values, dict) and values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)  # package data: readable by every user
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())


def _share_vae(root: Path, latent: str, owner: str) -> dict[str, int]:
    """If the latent model ``root/latent`` carries a VAE bit-identical to ``root/owner/vae``, drop the copy and
    point ``model_index.json``'s ``_vae_path`` at the owner's (the package carries it once); returns the new size."""
    copy, original = root / latent / "vae", root / owner / "vae"
    if not (copy / "config.json").is_file() or not (original / "config.json").is_file():
        return {}
    a, b = _tensors(copy), _tensors(original)
    config_a, config_b = (
        {k: v for k, v in json.loads((f / "config.json").read_text(encoding="utf-8")).items() if not k.startswith("_")}
        for f in (copy, original)
    )  # keys such as _name_or_path say where a copy came from, not what it is
    same_config = config_a == config_b
    if not (same_config and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)):
        return {}
    index_path = root / latent / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index.pop("vae", None)
    index["_vae_path"] = f"../{owner}/vae"
    write_json_atomic(index_path, index)
    shutil.rmtree(copy)
    return {latent: sum(f.stat().st_size for f in (root / latent).rglob("*") if f.is_file())}


def _judge(probe: Path) -> dict:
    """Which attribute probe judged: the embedded ``taiyi-mini-probe`` (the same file) or the run's own
    (``--train-probe``); with the SHA-256 of its weights."""
    import hashlib

    from ..models import bundled_model
    from .build import EMBEDDED_PROBE

    def digest(folder: Path) -> str:
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    mine, embedded = digest(probe), bundled_model(EMBEDDED_PROBE)
    same = embedded is not None and (embedded / "model.safetensors").is_file() and digest(embedded) == mine
    return {"probe": f"the embedded {EMBEDDED_PROBE}" if same else "the run's own", "sha256": mine}


STAGE_STARTED = "TAIYI_RECIPE_STAGE_STARTED"  # set by taiyi recipe mini: when the report's stage began (epoch s)


def stage_seconds(t0: float) -> float:
    """How long the report's stage has taken: since ``taiyi recipe mini`` started it (its process start and imports
    included, as the recipe's record counts them), else since ``t0`` (``time.monotonic()``, a report run alone)."""
    try:
        started = float(os.environ.get(STAGE_STARTED, ""))
    except ValueError:
        started = None
    if started is not None and 0 <= time.time() - started < 86400 * 7:
        return time.time() - started
    return time.monotonic() - t0


def write_report(run: str | os.PathLike, *, preset_name: str | None = None, seed: int | None = None) -> dict:
    """Evaluate a finished recipe run in ``run`` and write its report and exports (see the module doc).

    Args:
        run: a ``taiyi recipe mini`` run folder.
        preset_name: the run's preset; None: the one its ``recipe.json`` records (``full`` without one).
        seed: seed of the evaluation pictures; None: the run's seed (0 without a ``recipe.json``).

    Raises:
        InvalidInputError: an unknown preset, one other than the run's, or a run without its models.
    """
    from ..clip import load_clip
    from ..pipeline import DEFAULT_GUIDANCE_END, DEFAULT_SCHEDULER, DEFAULT_STEPS, load_pipeline
    from .faithfulness import eval_prompts, evaluate_clip, evaluate_pipeline
    from .mini import PRESETS, recorded_config
    from .probe import AttributeProbe

    run = Path(run)
    recorded = recorded_config(run / "recipe.json")
    if preset_name is not None and recorded.get("preset", preset_name) != preset_name:
        # another preset's evaluation (the full one: 288 prompts per model) would judge the run's models with it
        raise InvalidInputError(f"{run} is a run of --preset {recorded['preset']}, not {preset_name}")
    preset_name = preset_name or recorded.get("preset", "full")
    seed = recorded.get("seed", 0) if seed is None else seed
    if preset_name not in PRESETS:
        raise InvalidInputError(f"unknown preset {preset_name!r}; use one of {', '.join(PRESETS)}")
    ok, message = seed_check(seed)  # the recipe's seeds; refused here, not by a sampler after the models load
    if not ok:
        raise InvalidInputError(message)
    preset = PRESETS[preset_name]
    for sub in ("probe", "sd-en/final", "sd-zh/final", "sd-zh-en/final", "clip-en/final", "clip-zh/final"):
        if not (run / sub).exists():
            raise InvalidInputError(f"{run} has no {sub}; run taiyi recipe mini --out {run} first")
    t0 = time.monotonic()
    probe = AttributeProbe.from_pretrained(run / "probe")
    n_seen, n_held = preset.eval_prompts
    report: dict = {"preset": preset_name, "seed": seed, "judge": _judge(run / "probe"), "faithfulness": {},
                    "clip": {}, "grids": {}}  # fmt: skip
    steps = DEFAULT_STEPS if preset.eval_steps is None else preset.eval_steps
    report["sampling"] = {"scheduler": DEFAULT_SCHEDULER, "steps": steps, "guidance_end": DEFAULT_GUIDANCE_END}
    (run / "grids").mkdir(exist_ok=True)
    for title, sub, langs in _JUDGED_MODELS:
        # PyTorch float32 on every machine: OpenVINO's bf16 (auto's choice on CPUs with bf16 instructions)
        # would make the figures depend on the host
        pipe = load_pipeline(run / sub, device="cpu", backend="torch")
        report["sampling"]["guidance_rescale"] = pipe.default_guidance_rescale  # the same for every model of a run
        for lang in langs:
            result = evaluate_pipeline(
                pipe, probe, lang, n_seen=n_seen, n_held_out=n_held, images_per_prompt=preset.eval_images,
                steps=preset.eval_steps, size=preset.size, seed=seed,
            )  # fmt: skip
            report["faithfulness"][f"{title} / {lang}"] = result
        grid = run / "grids" / f"{sub.split('/')[0]}.png"
        prompts = [p.text for p in eval_prompts(langs[0], n_seen=4, n_held_out=0, seed=99)]
        _grid(pipe, prompts, grid, steps=preset.eval_steps, seed=seed)
        report["grids"][title] = {"file": str(grid.relative_to(run)), "prompts": prompts}
        del pipe
    report["targets"] = targets(report["faithfulness"])
    report["clip"]["Taiyi-CLIP (Chinese)"] = evaluate_clip(load_clip(run / "clip-zh" / "final", device="cpu"), "zh")
    report["clip"]["English CLIP"] = evaluate_clip(load_clip(run / "clip-en" / "final", device="cpu"), "en")
    report["stage1_frozen"] = {
        "Taiyi SD Chinese vs English SD": frozen_check(run / "sd-en" / "final", run / "sd-zh" / "final"),
    }
    exports = run / "models"
    exports.mkdir(exist_ok=True)
    sizes = {}
    for name, sub in EXPORTS.items():
        if (run / sub).exists():
            sizes[name] = _copy_export(run / sub, exports / name)
    report["exports"] = {name: {"bytes": size} for name, size in sizes.items()}
    report["exports_total_mb"] = round(sum(sizes.values()) / 2**20, 2)
    recipe_json = run / "recipe.json"
    if recipe_json.is_file():
        recorded = json.loads(recipe_json.read_text(encoding="utf-8"))
        report["stages"] = recorded.get("stages", {})
        report["calibrations"] = recorded.get("calibrations", [])
    report["report_seconds"] = round(stage_seconds(t0), 1)
    if "stages" in report:  # every stage's time but an earlier report's, and this report's own
        seconds = sum(st.get("seconds", 0) for name, st in report["stages"].items() if name != "report")
        minutes = round((seconds + report["report_seconds"]) / 60, 1)
        report["budget"] = {"minutes": minutes, "bound": BUDGET_MINUTES,
                            "verdict": "met" if minutes <= BUDGET_MINUTES else "missed"}  # fmt: skip
    _write_markdown(run, report)
    write_json_atomic(run / "report.json", report)
    return report


def _row(values: dict, stderr: dict | None = None, attrs=_ATTRS) -> str:
    stderr = stderr or {}
    return " | ".join(
        (f"{values[a]:.0f}" + (f" ± {stderr[a]:.0f}" if stderr.get(a) is not None else "")) if a in values else "–"
        for a in attrs
    )


def _signed(value: float) -> str:
    """A whole-point difference with its sign (``+4``, ``−8``, ``0``)."""
    whole = round(value)
    return "0" if whole == 0 else f"{whole:+d}".replace("-", "−")


def _target_lines(rows: list[dict]) -> list[str]:
    lines = ["| target | bound | " + " | ".join(_ATTRS) + " | verdict |", "|---|---|" + "---|" * (len(_ATTRS) + 1)]
    for row in rows:
        bound = row["bound"]
        if isinstance(bound, dict):
            bound_text = ", ".join(f"{a} ≥ {v:.0f}" for a, v in bound.items())
        else:
            bound_text = f"≥ {_signed(bound)} each"
        cells = []
        for a in _ATTRS:
            cell = row["cells"].get(a)
            if cell is None:
                cells.append("–")
                continue
            text = f"{cell['value']:.0f}" if isinstance(bound, dict) else _signed(cell["value"])
            cells.append(text + (f" ± {cell['se']:.0f}" if cell.get("se") is not None else ""))
        lines.append(f"| {row['target']} | {bound_text} | " + " | ".join(cells) + f" | {row['verdict']} |")
    return lines


def _write_markdown(run: Path, report: dict) -> None:
    lines = ["# taiyi recipe mini — report", "", f"Preset `{report['preset']}`, seed {report['seed']}.", ""]
    lines += ["## Faithfulness (attribute probe, % of pictures showing what the prompt asked)", ""]
    if "judge" in report:
        lines += [f"Judged by the attribute probe in `probe/`: {report['judge']['probe']} (weights SHA-256 "
                  f"{report['judge']['sha256'][:16]}…).", ""]  # fmt: skip
    if "sampling" in report:
        lines += [f"Sampling: {', '.join(f'{k} {v}' for k, v in report['sampling'].items())}.", ""]
    lines += ["| model / prompts | combos | " + " | ".join(_ATTRS) + " |", "|---|---|" + "---|" * len(_ATTRS)]
    for name, result in report["faithfulness"].items():
        for group in ("seen", "held_out"):
            lines.append(f"| {name} | {group} | {_row(result[group], result.get('stderr', {}).get(group))} |")
    if report.get("targets"):
        lines += ["", "± one standard error, the prompt the unit of sampling (the pictures of one prompt are alike).",
                  "", "## Targets", "",
                  "Differences are paired over the same scenes; a miss of one or two standard errors (SE) is within",
                  "what another set of evaluation prompts could show.", ""]  # fmt: skip
        lines += _target_lines(report["targets"])
        where = [
            (row["target"], a, values) for row in report["targets"] for a, values in row.get("by_value", {}).items()
        ]
        if where:
            lines += [
                "",
                "Where the misses lie: each missed attribute per prompted value (the prompts that name it).",
                "",
            ]
            for target, a, values in where:
                signed = " − " in target  # a paired difference, not a score
                parts = [
                    f"{v} {_signed(c['value']) if signed else format(c['value'], '.0f')}"
                    + (f" ± {c['se']:.0f}" if c.get("se") is not None else "")
                    for v, c in values.items()
                ]
                lines.append(f"- {target}: {a} — " + ", ".join(parts))
        frozen = all(all(check.values()) for check in report.get("stage1_frozen", {}).values())
        lines += ["", f"- Stage 1 left every UNet and VAE tensor bit-identical: {'met' if frozen else 'missed'}"]
        if "budget" in report:
            b = report["budget"]
            lines.append(f"- The whole recipe in ≤ {b['bound']:.0f} minutes: {b['minutes']} minutes over all stages, "
                         f"this report's included — {b['verdict']} (host speed: see Stages)")  # fmt: skip
    clip_attrs = ("time", "sky", "land", "water", "style")
    header = "| model | " + " | ".join(clip_attrs) + " | text→image R@1 |"
    lines += ["", "## CLIP on held-out scenes (zero-shot %; sky and water among scenes that have one)", "",
              header, "|---|" + "---|" * (len(clip_attrs) + 1)]  # fmt: skip
    for name, result in report["clip"].items():
        zs = result["zero_shot"]
        cells = " | ".join(f"{zs[a]:.0f}" if a in zs else "–" for a in clip_attrs)
        lines.append(f"| {name} | {cells} | {result['text_to_image']['R@1']:.1f} |")
    lines += ["", "## Stage 1 froze the UNet and VAE (every tensor bit-identical)", ""]
    for name, check in report["stage1_frozen"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {'identical' if v else 'CHANGED'}" for k, v in check.items()))
    lines += ["", "## Pictures", ""]
    for name, grid in report["grids"].items():
        lines += [f"**{name}** — rows: " + " / ".join(grid["prompts"]), "", f"![{name}]({grid['file']})", ""]
    lines += ["## Loss curves", ""]
    for sub in ("clip-en", "clip-zh", "vae-base", "vae", "sd-en", "sd-zh", "sd-zh-en", "uncond"):
        if (run / sub / "loss.png").is_file():
            lines.append(f"![{sub}]({sub}/loss.png)")
    if "stages" in report:
        lines += ["", "## Stages", "", "| stage | status | minutes |", "|---|---|---|"]
        for name, st in report["stages"].items():
            minutes = f"{st['seconds'] / 60:.1f}" if "seconds" in st else "–"
            lines.append(f"| {name} | {st['status']} | {minutes} |")
        for c in report.get("calibrations", []):
            lines.append(
                f"\nHost calibration {c.get('at', '')}: {c.get('seconds_median')} s median, "
                f"{c.get('seconds_best')} s best ({c.get('workload', '')}, {c.get('threads')} threads)"
                + (f" on {c['processor']}, {c.get('usable_cores')} usable cores" if c.get("processor") else "")
            )
    lines += ["", f"Exports under `models/`: {report['exports_total_mb']} MB in all."]
    path = run / "report.md"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _check_ship_target(run: Path, preset: str | None, target: Path) -> None:
    """Refuse to install where it would replace what is not a recipe's models, or a full run's models with toys."""
    if target.exists() and not target.is_dir():
        raise InvalidInputError(f"cannot install into {target}: it is a file; choose another --into")
    if not target.is_dir() or not any(target.iterdir()):
        return
    try:
        source = json.loads((target / "SOURCE.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        source = {} if any((target / name).is_dir() for name in EXPORTS) else None
    except (OSError, ValueError):
        source = None
    if not isinstance(source, dict) or (source and "run" not in source):
        # the folder is someone's own: its SOURCE.json and taiyi-mini-* folders would be replaced
        raise InvalidInputError(f"{target} holds no embedded models of a recipe run; choose another --into")
    if source.get("preset") == "full" and preset != "full":
        raise InvalidInputError(
            f"{run} is a --preset {preset} run: its toy models would replace the {source.get('run')} models in "
            f"{target}; install it with --into another folder"
        )


def ship(run: str | os.PathLike, into: str | os.PathLike | None = None, *, max_mb: float = 40.0) -> dict:
    """Install a finished run's exported models as the embedded ones (``taiyi-mini-*`` short names).

    Args:
        run: a ``taiyi recipe mini`` folder with ``report.json`` and ``models/``.
        into: the weights folder (default: :func:`taiyi.models.bundled_dir`, the package's ``weights/``).
        max_mb: refuse to install more than this (the package's budget for embedded weights).

    Returns:
        ``{name: bytes}`` of what was installed; ``weights/SOURCE.json`` records the run and its report figures.

    Raises:
        InvalidInputError: ``run`` is unfinished, its models are over budget, ``into`` cannot be written or holds
            something other than a recipe's models, or a run of another preset than ``full`` would replace the
            models of a ``full`` one.
    """
    from ..models import bundled_dir

    run = Path(run)
    report_path, models = run / "report.json", run / "models"
    if not report_path.is_file() or not models.is_dir():
        raise InvalidInputError(f"{run} holds no finished recipe run (report.json and models/); run taiyi recipe mini")
    missing = sorted(name for name in EXPORTS if not (models / name).is_dir())
    if missing:
        raise InvalidInputError(f"{run}/models lacks {', '.join(missing)}; rerun taiyi recipe mini --out {run}")
    target = Path(into) if into is not None else bundled_dir()
    report = json.loads(report_path.read_text(encoding="utf-8"))
    _check_ship_target(run, report.get("preset"), target)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file, a folder inside one, a place that cannot be written
        raise InvalidInputError(
            f"cannot install into {target}: {exc.strerror or exc}; choose another --into"
        ) from None
    staging = target / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        sizes = {name: _copy_export(models / name, staging / name) for name in EXPORTS}
        sizes.update(_share_vae(staging, "taiyi-mini-uncond", "taiyi-mini-zh"))
        total_mb = sum(sizes.values()) / 2**20
        if total_mb > max_mb:
            raise InvalidInputError(f"the models of {run} take {total_mb:.1f} MB, over the {max_mb:g} MB budget")
        for name in EXPORTS:
            shutil.rmtree(target / name, ignore_errors=True)
            os.replace(staging / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    recipe = json.loads((run / "recipe.json").read_text(encoding="utf-8")) if (run / "recipe.json").is_file() else {}
    source = {"run": run.resolve().name, "preset": report.get("preset"), "seed": report.get("seed"), "bytes": sizes,
              "preset_values": recipe.get("preset_values"), "stages": recipe.get("stages"),
              "wall_seconds": recipe.get("wall_seconds"), "stage_seconds": recipe.get("stage_seconds"),
              "calibrations": recipe.get("calibrations"),
              "faithfulness": {k: {g: v[g] for g in ("seen", "held_out", "stderr") if g in v}
                               for k, v in report["faithfulness"].items()},
              "targets": report.get("targets"), "budget": report.get("budget"),
              "sampling": report.get("sampling"), "clip": report.get("clip"),
              "stage1_frozen": report.get("stage1_frozen")}  # fmt: skip
    write_json_atomic(target / "SOURCE.json", source)
    return sizes
