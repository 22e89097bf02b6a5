"""`taiyi train ...` commands (placeholder, being written)."""

from __future__ import annotations

import typer

train_app = typer.Typer(help="Training: Chinese CLIP (locked-image).", no_args_is_help=True)


@train_app.command()
def clip() -> None:
    """Not implemented yet."""
