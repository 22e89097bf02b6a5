"""`taiyi clip ...` commands (placeholder, being written)."""

from __future__ import annotations

import typer

clip_app = typer.Typer(help="Chinese CLIP: score, classify, index, search, eval.", no_args_is_help=True)


@clip_app.command()
def score() -> None:
    """Not implemented yet."""
