"""`taiyi data ...`: prepare training data — filter pairs by Chinese-CLIP score, write the synthetic 山水 set.

Arguments are checked before any model is loaded or any file written, so a typo fails at once with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli_options import AllowPickle, Device, Overwrite
from .clip_cli import DEFAULT_CLIP_MODEL, BatchSize, ImageTower

data_app = typer.Typer(help="Training data: filter pairs by CLIP score, write the 山水 set.", no_args_is_help=True)


@data_app.command("filter")
def filter_command(
    data: Annotated[
        str, typer.Option("--data", help="Pairs to filter: a folder of x.jpg + x.txt, a .csv or a .jsonl file.")
    ],
    threshold: Annotated[
        float, typer.Option("--threshold", "-t", help="Keep pairs whose CLIP cosine is at least this (Taiyi: 0.2).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The manifest of kept pairs to write (.jsonl).")],
    clip: Annotated[
        str,
        typer.Option("--clip", "-m", help="Taiyi-CLIP short name, hub id, text-tower folder or taiyi CLIP folder."),
    ] = DEFAULT_CLIP_MODEL,
    image_tower: ImageTower = None,
    histogram: Annotated[
        Path | None, typer.Option("--histogram", help="Also draw the score histogram with the threshold (.png).")
    ] = None,
    batch_size: BatchSize = 32,
    image_column: Annotated[str, typer.Option("--image-column", help="CSV/JSONL image path column.")] = "image",
    caption_column: Annotated[str, typer.Option("--caption-column", help="CSV/JSONL caption column.")] = "caption",
    overwrite: Overwrite = False,
    device: Device = "auto",
    allow_pickle: AllowPickle = False,
) -> None:
    """Score every pair with a Chinese CLIP and keep those scoring at least --threshold (the Taiyi data
    recipe): writes a JSONL manifest (image path relative to it, caption, score) that `taiyi train` reads,
    and prints kept / dropped / unreadable counts. Unreadable samples are skipped and counted."""
    from .clip_cli import _load, _progress
    from .data.filter import check_filter_outputs, check_threshold, filter_pairs, open_filter_source
    from .errors import InvalidInputError

    check_threshold(threshold)
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, not {batch_size}")
    check_filter_outputs(out, histogram, overwrite=overwrite)
    open_filter_source(data, image_column=image_column, caption_column=caption_column)  # fails before loading
    model = _load(clip, image_tower, device, allow_pickle)
    with _progress("scoring") as bar:
        report = filter_pairs(
            model,
            data,
            out,
            threshold=threshold,
            histogram=histogram,
            batch_size=batch_size,
            image_column=image_column,
            caption_column=caption_column,
            overwrite=overwrite,
            progress=bar,
        )
    typer.echo(report.summary())
    if report.kept == 0:
        typer.echo(
            f"taiyi: warning: no pair reached {threshold:g} (best {max(report.scores):.4f}); "
            "the manifest is empty — lower --threshold",
            err=True,
        )


@data_app.command("shanshui")
def shanshui_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write x.png + x.txt + x.json pairs into.")],
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 100,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 64,
    captions: Annotated[
        str, typer.Option("--captions", help="zh, en, mixed or all (one of the three per sample).")
    ] = ("zh"),
    split: Annotated[
        str, typer.Option("--split", help="train, heldout (the held-out combinations only) or all.")
    ] = "train",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the scenes (the same seed gives the same set).")] = 0,
    full: Annotated[bool, typer.Option("--full", help="Captions name every attribute of the scene.")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Write the synthetic 山水 landscape set: procedural Chinese landscapes with Chinese, English or mixed
    captions, in the folder layout `taiyi train` and `taiyi data filter` read."""
    from .data.shanshui import MAX_SIZE, MIN_SIZE, write_folder
    from .errors import InvalidInputError

    if n < 1:
        raise InvalidInputError(f"--n must be at least 1, not {n}")
    if not MIN_SIZE <= size <= MAX_SIZE:  # the library's words name its arguments (size=5), not the options
        raise InvalidInputError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels, not {size}")
    if seed < 0:
        raise InvalidInputError(f"--seed must be 0 or more, not {seed}")
    folder = write_folder(out, n, seed, size, split, captions, full=full, overwrite=overwrite)
    typer.echo(f"wrote {n} samples to {folder}")
