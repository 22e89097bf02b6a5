"""`taiyi convert ...`: other checkpoint formats to the diffusers layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .cli_options import Overwrite
from .errors import InvalidInputError

convert_app = typer.Typer(help="Convert checkpoints to the diffusers layout.", no_args_is_help=True)


@convert_app.command("guided-diffusion")
def guided_diffusion(
    checkpoint: Annotated[Path, typer.Argument(help="guided-diffusion UNet weights (.safetensors, .pt, .pth).")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the diffusers model into.")],
    config: Annotated[
        Path | None,
        typer.Option("--config", help="JSON of guided-diffusion settings (e.g. Disco's model_config) to override."),
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Read a pickled .pt/.pth checkpoint (can run code).")
    ] = False,
    overwrite: Overwrite = False,
) -> None:
    """Convert an OpenAI guided-diffusion checkpoint (Disco, Taiyi-Diffusion-532M-Nature) to a diffusers folder."""
    from .guided_diffusion import convert_guided_diffusion  # torch + diffusers: only when converting

    # --out=~/x and quoted paths reach here with the ~ unexpanded
    checkpoint, out = checkpoint.expanduser(), out.expanduser()
    config = config.expanduser() if config is not None else None
    if checkpoint.is_dir():
        raise InvalidInputError(
            f"checkpoint {checkpoint} is a folder; give the guided-diffusion weights file (.pt, .pth or .safetensors)"
        )
    settings = None
    if config is not None:
        try:
            settings = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"config {config} is not a readable JSON file ({exc})") from exc
        if not isinstance(settings, dict):
            raise InvalidInputError(f"config {config} must be a JSON object of guided-diffusion settings")
    path = convert_guided_diffusion(checkpoint, out, config=settings, allow_pickle=allow_pickle, overwrite=overwrite)
    typer.echo(str(path))
