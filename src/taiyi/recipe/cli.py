"""``taiyi recipe ...``: the Taiyi recipe reproduced in miniature (``mini``), and its parts (``probe``, ``report``)."""

from __future__ import annotations

from typing import Annotated

import typer

recipe_app = typer.Typer(
    help="The Taiyi recipe in miniature on the 山水 world: CLIP, SD, bilingual SD, Disco model.", no_args_is_help=True
)


@recipe_app.command()
def mini(
    out: Annotated[str, typer.Option("--out", "-o", help="Run folder; run again to continue an interrupted run.")],
    preset: Annotated[str, typer.Option("--preset", help="full (the shipped models) or tiny (a toy run).")] = "full",
    jobs: Annotated[int, typer.Option("--jobs", help="Stages run side by side.")] = 1,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads per stage.")] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of data, initialisation and training.")] = 0,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Run only this stage (repeatable); see the stage list.")
    ] = None,
    progress_every: Annotated[
        float, typer.Option("--progress-every", help="Seconds between the running stages' step lines (0: none).")
    ] = 60.0,
    train_probe: Annotated[
        bool,
        typer.Option(
            "--train-probe", help="Train the attribute probe that judges the models [judge with taiyi-mini-probe]."
        ),
    ] = False,
) -> None:
    """Train every model of the Taiyi recipe in miniature and write OUT/report.md + OUT/models/.

    Stages: data, probe, clip-en, vae, clip-zh, sd-en, sd-zh, sd-zh-en, uncond, report.
    """
    from ..cli import _quiet_libraries

    _quiet_libraries()
    from .mini import RecipeConfig, run_recipe

    status = run_recipe(RecipeConfig(out=out, preset=preset, jobs=jobs, threads=threads, seed=seed, only=only,
                                     progress_every=progress_every, train_probe=train_probe),
                        echo=typer.echo)  # fmt: skip
    if status.get("report", {}).get("status") in ("done", "done before"):  # name the report only when there is one
        typer.echo(f"{out}/report.md")


@recipe_app.command()
def probe(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the probe (config.json + model.safetensors).")],
    steps: Annotated[int | None, typer.Option("--steps", help="Training steps [1000].")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Scenes per step [64].")] = None,
    size: Annotated[int | None, typer.Option("--size", help="Picture side in pixels, 32 to 256 [64].")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of scenes and initialisation [0].")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads [1].")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace an existing probe.")] = None,
) -> None:
    """Train the attribute probe: a small classifier of 山水 attributes, trained on rendered scenes only."""
    given = {k: v for k, v in locals().items() if v is not None and k != "out"}
    from .probe import ProbeConfig, train_probe

    typer.echo(str(train_probe(ProbeConfig(output=out, **given))))


@recipe_app.command()
def report(
    run: Annotated[str, typer.Argument(help="A taiyi recipe mini run folder.")],
    preset: Annotated[
        str | None, typer.Option("--preset", help="The run's preset [the one its recipe.json records, else full].")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the evaluation pictures [the run's seed, else 0].")
    ] = None,
) -> None:
    """Judge a finished run's models, check stage 1 froze the UNet/VAE, write report.json/.md and models/."""
    from ..cli import _quiet_libraries

    _quiet_libraries()
    from .report import write_report

    write_report(run, preset_name=preset, seed=seed)
    typer.echo(f"{run}/report.md")


@recipe_app.command()
def ship(
    run: Annotated[str, typer.Argument(help="A finished taiyi recipe mini run folder.")],
    into: Annotated[
        str | None, typer.Option("--into", help="Weights folder [the package's weights/, or $TAIYI_WEIGHTS].")
    ] = None,
) -> None:
    """Install a run's models as the embedded taiyi-mini-* models (checks the 40 MB budget)."""
    from ..models import bundled_dir
    from .report import ship as install

    sizes = install(run, into)
    where = into if into is not None else bundled_dir()  # say where: the default is the package's own models
    typer.echo(f"installed {', '.join(sizes)} into {where}: {sum(sizes.values()) / 2**20:.1f} MB")
