"""Command-line options shared by several ``taiyi`` commands: defined once, used everywhere."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import typer


def typed_options(ctx: typer.Context, names: Iterable[str]) -> list[str]:
    """The options among ``names`` (parameter names) typed on the command line, as their flags (``--steps``)."""
    try:  # typer >= 0.20 vendors click
        from typer._click.core import ParameterSource
    except ImportError:  # pragma: no cover
        from click.core import ParameterSource

    flags = {param.name: param.opts[0] for param in ctx.command.params}
    unset = (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    return [flags[name] for name in names if ctx.get_parameter_source(name) not in unset]


def refuse_given(ctx: typer.Context, names: Iterable[str], command: str) -> None:
    """With ``--from``, refuse every option among ``names`` (parameter names) typed on the command line — typed at all:
    ``--steps 9``, the default, would be ignored as silently as ``--steps 20``.

    Raises:
        InvalidInputError: naming the options as typed, and how to vary them (``command`` with the prompt).
    """
    from .errors import InvalidInputError

    if given := typed_options(ctx, names):
        raise InvalidInputError(
            f"--from redraws the picture with its own settings; {', '.join(given)} cannot change them (to vary "
            f"them, run {command} with its prompt instead)"
        )


Model = Annotated[str | None, typer.Option("--model", "-m", help="Short name, hub id or local folder.")]
Negative = Annotated[str | None, typer.Option("--negative-prompt", "-n", help="What to steer away from.")]
Steps = Annotated[int, typer.Option("--steps", help="Denoising steps (1-1000).")]
# A1111's name too (without it click suggests --guidance-rescale for --cfg-scale)
Guidance = Annotated[
    float | None, typer.Option("--guidance", "-g", "--cfg-scale", help="CFG scale (default: the model's).")
]
GuidanceEnd = Annotated[
    float | None,
    typer.Option("--guidance-end", help="Fraction of the steps that run CFG, (0, 1] (default: taiyi's)."),
]
GuidanceRescale = Annotated[
    float | None,
    typer.Option(
        "--guidance-rescale", help="CFG rescale φ in [0, 1] (default: 1 for zero-terminal-SNR models, else 0)."
    ),
]
Seed = Annotated[
    int | None,
    typer.Option(
        "--seed", "-s", help="Seed of the first image; image i uses seed+i (all use seed with --variation-strength)."
    ),
]
NumImages = Annotated[int, typer.Option("--num-images", "-k", help="Images per prompt.")]
Width = Annotated[int | None, typer.Option("--width", "-W", help="Multiple of 8, 64-2048.")]
Height = Annotated[int | None, typer.Option("--height", "-H", help="Multiple of 8, 64-2048.")]
Scheduler = Annotated[
    str,
    typer.Option(
        "--scheduler",
        "--sampler",
        help="dpm++-sde-ays (default), dpm++, dpm++-sde, deis, dpm++-karras, euler-a, euler, ddim, pndm, lms, unipc;"
        ' A1111\'s names ("DPM++ 2M Karras", "Euler a") and diffusers\' class names work too.',
    ),
]
Dtype = Annotated[str, typer.Option("--dtype", help="auto, float32, float16 or bfloat16.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
Output = Annotated[
    str | None, typer.Option("--output", "-o", help="A .png file or an existing folder (default outputs/).")
]
Grid = Annotated[bool, typer.Option("--grid", help="Also write all images as one grid.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
NoSafety = Annotated[bool, typer.Option("--no-safety-checker", help="Drop the checkpoint's safety checker.")]
NoNormalize = Annotated[bool, typer.Option("--no-normalize", help="Use the prompt exactly as typed.")]
VariationSeed = Annotated[
    int | None,
    typer.Option(
        "--variation-seed",
        help="A1111's variation seed: image i's noise moves toward this seed+i's by --variation-strength "
        "(default with a strength: a random one).",
    ),
]
VariationStrength = Annotated[
    float,
    typer.Option("--variation-strength", help="How far toward the variation seed's noise, 0–1 (0: off)."),
]
HiresScale = Annotated[
    float | None,
    typer.Option(
        "--hires-scale",
        help="A1111's hires fix: draw at the size, upscale by this (1–4) and redraw at --hires-strength.",
    ),
]
HiresStrength = Annotated[
    float, typer.Option("--hires-strength", help="The hires fix's denoising strength, in (0, 1].")
]
HiresSteps = Annotated[int, typer.Option("--hires-steps", help="The hires fix's steps (0: --steps).")]
HiresUpscaler = Annotated[
    str,
    typer.Option(
        "--hires-upscaler",
        help='A1111\'s names: "Latent" (and its antialiased/bicubic/nearest kinds), "Lanczos" or "Nearest".',
    ),
]
ClipSkip = Annotated[
    int,
    typer.Option("--clip-skip", help="A1111's Clip skip: 1 reads the text encoder's last layer, 2 the one before."),
]
Emphasis = Annotated[
    str,
    typer.Option(
        "--emphasis",
        help="How (words:1.3), (words), [words] and BREAK are read, as in A1111: original (weighted), no-norm, "
        "or none (as words).",
    ),
]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Accept pickled .bin weights (can run code).")]
Lora = Annotated[
    list[str] | None,
    typer.Option("--lora", help="LoRA file (.safetensors or a taiyi train lora folder), FILE:SCALE; repeatable."),
]
Memory = Annotated[
    str,
    typer.Option(
        "--memory", help="auto (tiled VAE beyond the native size), low (+ attention slicing, slower) or off."
    ),
]
Backend = Annotated[
    str,
    typer.Option(
        "--backend",
        help="Where the UNet runs: torch, openvino (CPU, converted once) or auto (openvino on CPUs with bf16"
        " instructions when installed, else torch).",
    ),
]
