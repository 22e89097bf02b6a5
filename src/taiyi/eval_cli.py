"""``taiyi eval ...``: does a model draw what the prompt says? Judged on the 山水 world by the attribute probe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .cli_options import AllowPickle, Overwrite
from .clip_cli import ImageTower

eval_app = typer.Typer(
    help="Faithfulness of text-to-image models and CLIPs on the 山水 world; the Fréchet distance of two picture sets.",
    no_args_is_help=True,
)


def _check_json(path: str | None, overwrite: bool) -> None:
    """Refuse a taken -o (or one in a missing folder) before anything is computed."""
    if path is not None:
        from pathlib import Path

        from .errors import OutputError
        from .io import check_output_file

        if Path(path).is_dir():  # check_output_file's words are a picture's
            raise OutputError(f"{path} is a folder; give a file name ending in .json")
        check_output_file(Path(path), overwrite=overwrite)


def _write_json(path: str | None, data: dict, overwrite: bool) -> None:
    if path is None:
        return
    from .io import atomic_write_bytes

    text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def _check_sampling(
    lang: str, seen: int, held_out: int, prompt_seed: int, images_per_prompt: int, settings: dict
) -> None:
    """Judge the prompts and sampling settings before the probe and the pipeline load, so a typo fails at once."""
    from .batch import check_settings
    from .errors import InvalidInputError
    from .pipeline import MAX_IMAGES
    from .recipe.faithfulness import eval_prompts

    eval_prompts(lang, n_seen=seen, n_held_out=held_out, seed=prompt_seed)  # language, counts, prompt seed
    if not 1 <= images_per_prompt <= MAX_IMAGES:  # each prompt's pictures are drawn in one call
        raise InvalidInputError(f"--images-per-prompt must be between 1 and {MAX_IMAGES}, not {images_per_prompt}")
    check_settings(settings, "sampling settings")


def _probe(name: str):
    from .models import resolve_model
    from .recipe.probe import AttributeProbe

    return AttributeProbe.from_pretrained(resolve_model(name)[0])


_ATTRS = ("time", "sky", "land", "water", "style", "things")


def _cell(value: float | None, se: float | None, *, sign: bool = False) -> str:
    if value is None:
        return f"{'–':>14}"
    text = f"{value:+.1f}" if sign else f"{value:.1f}"
    return f"{text + (f' ± {se:.1f}' if se is not None else ''):>14}"


def _table(rows: dict[str, dict[str, float]], stderr: dict[str, dict[str, float]] | None = None) -> None:
    """Per-attribute percentages, each with its standard error where one is known."""
    stderr = stderr or {}
    typer.echo("combos     " + "".join(f"{a:>14}" for a in _ATTRS))
    for name, values in rows.items():
        se = stderr.get(name, {})
        typer.echo(f"{name:<11}" + "".join(_cell(values.get(a), se.get(a)) for a in _ATTRS))


def _pad(text: str, width: int) -> str:
    """``text`` left-aligned in ``width`` terminal columns (a Chinese character takes two)."""
    import unicodedata

    used = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
    return text + " " * max(0, width - used)


def _by_value_table(table: dict, *, sign: bool = False) -> None:
    """Per attribute and prompted value: seen / held-out / all, ± standard error, and the pictures judged."""
    key = "diff" if sign else "pct"
    typer.echo(_pad("attribute", 10) + _pad("value", 8) + "".join(f"{g:>14}" for g in ("seen", "held-out", "all"))
               + f"{'pictures':>10}")  # fmt: skip
    for name, values in table.items():
        for value, cells in values.items():
            row = "".join(
                _cell(c[key], c["se"], sign=sign) if (c := cells.get(g)) else _cell(None, None)
                for g in ("seen", "held_out", "all")
            )
            images = cells.get("all", {}).get("images", 0)
            typer.echo(_pad(name, 10) + _pad(str(value), 8) + row + f"{images:>10}")


def _read_result(path: str, entry: str | None = None) -> dict:
    from pathlib import Path

    from .errors import InvalidInputError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path} is not a faithfulness result (JSON): {exc}") from None
    if entry is not None:  # a recipe report holds one result per model and prompt language
        results = data.get("faithfulness") if isinstance(data, dict) else None
        if not isinstance(results, dict):
            raise InvalidInputError(f"{path} is not a recipe report (report.json): it has no faithfulness results")
        if entry not in results:
            raise InvalidInputError(f"{path} has no result {entry!r}; it has: {', '.join(results)}")
        data = results[entry]
    if not isinstance(data, dict) or "seen" not in data:
        hint = "; a recipe report needs --entry" if isinstance(data, dict) and "faithfulness" in data else ""
        raise InvalidInputError(f"{path} is not a faithfulness result (taiyi eval faithfulness -o writes one){hint}")
    return data


@eval_app.command()
def faithfulness(
    probe: Annotated[
        str, typer.Option("--probe", help="Attribute probe (folder or short name).")
    ] = "taiyi-mini-probe",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Pipeline (default: the embedded one).")] = None,
    allow_pickle: AllowPickle = False,
    lang: Annotated[str, typer.Option("--lang", help="Prompt language: zh, en or mixed.")] = "zh",
    seen: Annotated[int, typer.Option("--seen", help="Prompts from combinations seen in training.")] = 192,
    held_out: Annotated[int, typer.Option("--held-out", help="Prompts from held-out combinations.")] = 96,
    images_per_prompt: Annotated[int, typer.Option("--images-per-prompt", help="Pictures per prompt.")] = 2,
    steps: Annotated[int | None, typer.Option("--steps", help="Denoising steps [the pipeline's default].")] = None,
    guidance: Annotated[float | None, typer.Option("--guidance", help="CFG scale [the model's default].")] = None,
    guidance_rescale: Annotated[
        float | None, typer.Option("--guidance-rescale", help="CFG rescale φ [the model's default].")
    ] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="Sampler [the pipeline's default].")] = None,
    size: Annotated[int, typer.Option("--size", help="Picture side in pixels.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first picture.")] = 0,
    prompt_seed: Annotated[int, typer.Option("--prompt-seed", help="Which evaluation scenes and prompts.")] = 1234,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write the full result as JSON.")] = None,
    overwrite: Overwrite = False,
    per_value: Annotated[
        bool, typer.Option("--by-value", help="Also each attribute per prompted value (river, lake, …).")
    ] = False,
) -> None:
    """Per-attribute accuracy of a text-to-image model on evaluation prompts (never training captions),
    seen and held-out attribute combinations separately."""
    _check_json(output, overwrite)
    _check_sampling(lang, seen, held_out, prompt_seed, images_per_prompt,
                    {"steps": steps, "guidance": guidance, "guidance_rescale": guidance_rescale,
                     "scheduler": scheduler, "width": size, "seed": seed})  # fmt: skip
    from .cli import _quiet_libraries

    _quiet_libraries()
    from .cli import _Progress
    from .pipeline import load_pipeline
    from .recipe.faithfulness import evaluate_pipeline

    judge = _probe(probe)
    # torch: the same figures on every CPU (auto may pick OpenVINO bf16)
    pipe = load_pipeline(model, backend="torch", allow_pickle=allow_pickle)
    with _Progress("prompts judged") as bar:
        result = evaluate_pipeline(
            pipe, judge, lang, n_seen=seen, n_held_out=held_out, images_per_prompt=images_per_prompt, steps=steps,
            guidance=guidance, guidance_rescale=guidance_rescale, scheduler=scheduler, size=size, seed=seed,
            prompt_seed=prompt_seed, progress=bar,
        )  # fmt: skip
    result["model"] = str(model or "default")
    se = result["stderr"]
    _table({"seen": result["seen"], "held-out": result["held_out"], "all": result["all"]},
           {"seen": se["seen"], "held-out": se["held_out"], "all": se["all"]})  # fmt: skip
    typer.echo("(% of pictures the probe reads as prompted, ± one standard error over prompts)")
    if per_value:
        from .recipe.faithfulness import by_value

        typer.echo("")
        _by_value_table(by_value(result))
    _write_json(output, result, overwrite)


@eval_app.command()
def compare(
    a: Annotated[str, typer.Argument(help="Faithfulness result (JSON from taiyi eval faithfulness -o).")],
    b: Annotated[str, typer.Argument(help="The result to subtract, judged on the same scenes.")],
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write the differences as JSON.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Paired difference A − B of two faithfulness results on the same evaluation scenes (any prompt languages),
    per attribute, with its standard error over prompts."""
    _check_json(output, overwrite)
    from .recipe.faithfulness import compare as paired

    result = paired(_read_result(a), _read_result(b))
    typer.echo(f"A − B in points, paired over {result['prompts']} prompts (± one standard error)")
    groups = {"seen": "seen", "held-out": "held_out", "all": "all"}
    typer.echo("combos     " + "".join(f"{x:>14}" for x in _ATTRS))
    for label, group in groups.items():
        row = result[group]
        cells = (_cell(row[x]["diff"], row[x]["se"], sign=True) if x in row else _cell(None, None) for x in _ATTRS)
        typer.echo(f"{label:<11}" + "".join(cells))
    _write_json(output, result, overwrite)


@eval_app.command()
def breakdown(
    result: Annotated[str, typer.Argument(help="Faithfulness result (JSON from taiyi eval faithfulness -o).")],
    baseline: Annotated[
        str | None, typer.Argument(help="Optional: a result judged on the same scenes, to subtract.")
    ] = None,
    entry: Annotated[
        str | None,
        typer.Option("--entry", help="Read RESULT (and BASELINE) from a recipe report.json, e.g. 'English SD / en'."),
    ] = None,
    baseline_entry: Annotated[
        str | None, typer.Option("--baseline-entry", help="BASELINE's entry when it differs from --entry.")
    ] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write the breakdown as JSON.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Each attribute per prompted value (which waters, times, skies … a model misses) of a saved result;
    with BASELINE, the paired difference RESULT − BASELINE per value."""
    _check_json(output, overwrite)
    from .recipe.faithfulness import by_value

    mine = _read_result(result, entry)
    theirs = None if baseline is None else _read_result(baseline, baseline_entry or entry)
    table = by_value(mine, theirs)
    if theirs is None:
        typer.echo("% of pictures the probe reads as prompted, per prompted value (± one standard error over prompts)")
    else:
        typer.echo("RESULT − BASELINE in points per prompted value, paired on the same scenes (± one standard error)")
    _by_value_table(table, sign=theirs is not None)
    _write_json(output, table, overwrite)


def _embed_folder(clip, folder: Path, what: str, batch: int = 32):
    """CLIP image embeddings (N, D) of every readable picture in ``folder`` (unreadable ones skipped, said)."""
    import logging

    import torch

    from .data import IndexedPairs, SkipCounter

    skips = SkipCounter()
    pictures, chunks = [], []
    indexed = IndexedPairs(folder, caption_column=None, skips=skips)
    for i in range(len(indexed)):
        pair = indexed[i]
        if pair is None:
            continue
        pictures.append(pair.image)
        if len(pictures) == batch:
            chunks.append(clip.encode_image(pictures, batch_size=batch))
            pictures = []
    if pictures:
        chunks.append(clip.encode_image(pictures, batch_size=batch))
    if not chunks:
        from .errors import InvalidInputError

        raise InvalidInputError(f"{what} folder {folder} has no readable picture ({skips.summary()})")
    if skips.total:
        logging.getLogger("taiyi").warning("%s %s: %s", what, folder, skips.summary())
    return torch.cat(chunks)


@eval_app.command("fd")
def frechet(
    reference: Annotated[Path, typer.Argument(help="Folder of reference pictures (real ones).")],
    generated: Annotated[Path, typer.Argument(help="Folder of generated pictures.")],
    clip: Annotated[str, typer.Option("--clip", help="CLIP whose image features are compared.")] = "taiyi-mini-clip",
    image_tower: ImageTower = None,
    allow_pickle: AllowPickle = False,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write the result as JSON.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Fréchet distance between two picture sets in a CLIP's image-feature space (FID's formula on CLIP features;
    lower is closer). Figures compare only with others of the same CLIP."""
    from .errors import InvalidInputError

    _check_json(output, overwrite)
    for what, folder in (("reference", reference), ("generated", generated)):
        if not folder.is_dir():
            raise InvalidInputError(f"{what} folder {folder} does not exist or is not a folder")
    from .cli import _quiet_libraries

    _quiet_libraries()
    from .clip import load_clip
    from .evaluation import frechet_distance

    model = load_clip(clip, image_tower=image_tower, allow_pickle=allow_pickle)
    real = _embed_folder(model, reference, "reference")
    fake = _embed_folder(model, generated, "generated")
    distance = frechet_distance(real, fake)
    typer.echo(f"Fréchet distance (CLIP image features, {clip}): {distance:.4f}  ({len(real)} vs {len(fake)})")
    result = {"fd_clip": distance, "clip": clip, "reference": len(real), "generated": len(fake)}
    _write_json(output, result, overwrite)


@eval_app.command("clip-world")
def clip_world(
    clip: Annotated[str, typer.Option("--clip", help="CLIP to judge (folder or short name).")] = "taiyi-mini-clip",
    image_tower: ImageTower = None,
    allow_pickle: AllowPickle = False,
    lang: Annotated[str, typer.Option("--lang", help="Labels and prompts in zh or en.")] = "zh",
    n: Annotated[int, typer.Option("--n", help="Held-out scenes.")] = 200,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write the result as JSON.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Zero-shot accuracy per attribute and text→image R@1 of a CLIP on rendered held-out scenes."""
    _check_json(output, overwrite)
    from .recipe.faithfulness import check_clip_eval

    check_clip_eval(lang, n)  # before the CLIP loads
    from .cli import _quiet_libraries

    _quiet_libraries()
    from .clip import load_clip
    from .recipe.faithfulness import evaluate_clip

    result = evaluate_clip(load_clip(clip, image_tower=image_tower, allow_pickle=allow_pickle), lang, n=n)
    zs = result["zero_shot"]
    cells = "  ".join(f"{name} {value:.1f}" for name, value in zs.items())
    typer.echo(f"zero-shot {cells}  text→image R@1 {result['text_to_image']['R@1']:.1f}  ({result['scenes']} scenes)")
    _write_json(output, result, overwrite)


@eval_app.command()
def disco(
    probe: Annotated[
        str, typer.Option("--probe", help="Attribute probe (folder or short name).")
    ] = "taiyi-mini-probe",
    model: Annotated[str, typer.Option("--model", "-m", help="Unconditional model.")] = "taiyi-mini-uncond",
    clip: Annotated[str, typer.Option("--clip", help="Chinese CLIP.")] = "taiyi-mini-clip",
    time: Annotated[list[str] | None, typer.Option("--time", help="Prompted time of day (repeatable).")] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Pictures per prompt and mode.")] = 20,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps.")] = 50,
    clip_guidance_scale: Annotated[
        float | None, typer.Option("--clip-guidance-scale", help="CLIP loss weight [as taiyi disco].")
    ] = None,
    clamp_max: Annotated[
        float | None, typer.Option("--clamp-max", help="Gradient RMS clamp [as taiyi disco].")
    ] = None,
    recurrence: Annotated[
        int | None, typer.Option("--recurrence", help="Times each step is taken [as taiyi disco].")
    ] = None,
    color_guidance: Annotated[
        float | None, typer.Option("--color-guidance", help="Share of the gradient for colour [as taiyi disco].")
    ] = None,
    cutn: Annotated[int, typer.Option("--cutn", help="Cutouts per step.")] = 16,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write the result as JSON.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Disco Diffusion steering: the probe's accuracy for the prompted time, with and without CLIP guidance."""
    _check_json(output, overwrite)
    from .cli import _quiet_libraries

    _quiet_libraries()
    from .clip import load_clip
    from .disco import DiscoSettings, load_uncond
    from .disco_cli import guidance_defaults
    from .recipe.faithfulness import check_disco_eval, evaluate_disco

    defaults = guidance_defaults(model, clip_guidance_scale=clip_guidance_scale, clamp_max=clamp_max,
                                 recurrence=recurrence, color_guidance=color_guidance)  # fmt: skip
    settings = DiscoSettings(steps=steps, cutn=cutn, **defaults)
    settings.check()
    times = tuple(time or ("夜晚", "黄昏"))
    check_disco_eval(times, seeds)  # before any model loads
    result = evaluate_disco(load_uncond(model), load_clip(clip), _probe(probe), times, seeds=seeds, settings=settings)
    for t, row in result["results"].items():
        g, u = row["guided"], row["unguided"]
        typer.echo(
            f"{t}: probe accuracy {g['accuracy']:.0f} % guided vs {u['accuracy']:.0f} % unguided; "
            f"CLIP score {g['clip_score']:.1f} vs {u['clip_score']:.1f}"
        )
        styles = "  ".join(f"{v} {g['styles_read'][v]}/{u['styles_read'][v]}" for v in g["styles_read"])
        typer.echo(f"  styles read, guided/unguided: {styles}; greyscale {g['greyscale']}/{u['greyscale']}")
    _write_json(output, result, overwrite)
