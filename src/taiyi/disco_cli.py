"""``taiyi disco PROMPT``: Chinese Disco Diffusion from the command line (see :mod:`taiyi.disco`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from .cli_options import AllowPickle, Device, Output, Overwrite

# Disco draws one picture: the shared --seed help ("image i uses seed+i") does not apply.
Seed = Annotated[
    int | None, typer.Option("--seed", "-s", help="Seed of the picture (default: a random one, recorded in it).")
]

DEFAULT_UNCOND = "taiyi-mini-uncond"
DEFAULT_CLIP = "taiyi-mini-clip"

# Disco Diffusion's defaults (those of DiscoSettings) suit its 512-px ADM models. The embedded model (a latent
# model of 64-px pictures steered by a small CLIP) needs a stronger pull and self-recurrence: each step retaken
# from re-noised samples, which keeps the picture a scene while the gradient moves it — and a share of the
# gradient for the picture's overall colour, without which it does not turn night (measured with
# `taiyi eval disco`, see the README).
MODEL_DISCO_DEFAULTS = {
    "taiyi-mini-uncond": {"clip_guidance_scale": 20000.0, "clamp_max": 0.3, "recurrence": 3, "color_guidance": 0.7}
}
_DEFAULTED = ("clip_guidance_scale", "clamp_max", "recurrence", "color_guidance")


def guidance_defaults(model: str, **given) -> dict:
    """``clip_guidance_scale``, ``clamp_max``, ``recurrence`` and ``color_guidance`` to use: those given (not None),
    else the model's, else Disco's (:class:`~taiyi.disco.DiscoSettings`)."""
    from .disco import DiscoSettings

    disco = DiscoSettings()
    chosen = {key: getattr(disco, key) for key in _DEFAULTED} | MODEL_DISCO_DEFAULTS.get(model, {})
    return chosen | {key: value for key, value in given.items() if key in chosen and value is not None}


def _parameters_text(
    prompt: str, settings: dict, clip: str, image_tower: str | None = None, init_image: Path | None = None
) -> str:
    """The ``parameters`` PNG text: the prompt, then ``Key: value`` pairs (the A1111 layout) — every setting that
    changes the picture; the image tower and the init image (its file name) only where given. Values are quoted as
    A1111 quotes them, so a folder or file name with ``,`` or ``:`` reads back whole."""
    from .metadata import _quote, _version

    clamp = settings["clamp_max"]
    pairs = {
        "Steps": settings["steps"],
        "Sampler": settings["sampler"].upper(),
        "Seed": settings["seed"],
        "Size": f"{settings['size']}x{settings['size']}",
        "Model": settings["model"],
        "CLIP": clip,
        **({"CLIP image tower": image_tower} if image_tower is not None else {}),
        "CLIP guidance scale": settings["clip_guidance_scale"],
        "Clamp max": "off" if clamp is None else clamp,
        "TV scale": settings["tv_scale"],
        "Range scale": settings["range_scale"],
        "Sat scale": settings["sat_scale"],
        "Cutn": settings["cutn"],
        "Cut pow": settings["cut_pow"],
        "Cut batches": settings["cut_batches"],
        "Eta": settings["eta"],
        **({"Init image": init_image.name} if init_image is not None else {}),
        "Skip steps": settings["skip_steps"],
        "Recurrence": settings["recurrence"],
        "Color guidance": settings["color_guidance"],
        "Version": _version(),
    }
    return prompt + "\n" + ", ".join(f"{k}: {_quote(str(v))}" for k, v in pairs.items())


def disco(
    prompt: Annotated[str, typer.Argument(help="Chinese prompt; weighted parts as 诗句:2|晚霞:1 (negative allowed).")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Unconditional model folder (DDPMPipeline or UNet2DModel).")
    ] = DEFAULT_UNCOND,
    clip: Annotated[str, typer.Option("--clip", help="Chinese CLIP (folder or short name).")] = DEFAULT_CLIP,
    image_tower: Annotated[
        str | None, typer.Option("--image-tower", help="CLIP image model for a bare Taiyi-CLIP text tower.")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps.")] = 50,
    sampler: Annotated[str, typer.Option("--sampler", help="ddim, plms or ddpm.")] = "ddim",
    eta: Annotated[float, typer.Option("--eta", help="DDIM noise, 0-1 (Disco: 0.8).")] = 0.8,
    clip_guidance_scale: Annotated[
        float | None,
        typer.Option("--clip-guidance-scale", help="Weight of the CLIP loss [the model's; Disco: 5000]."),
    ] = None,
    tv_scale: Annotated[float, typer.Option("--tv-scale", help="Smoothness (total variation) loss weight.")] = 0.0,
    range_scale: Annotated[float, typer.Option("--range-scale", help="Out-of-range pixel loss weight.")] = 150.0,
    sat_scale: Annotated[float, typer.Option("--sat-scale", help="Saturation loss weight.")] = 0.0,
    cutn: Annotated[int, typer.Option("--cutn", help="Cutouts per step.")] = 16,
    cut_batches: Annotated[int, typer.Option("--cut-batches", help="Split the cutouts into this many passes.")] = 1,
    cut_pow: Annotated[float, typer.Option("--cut-pow", help="Crop-size exponent (>1: smaller crops).")] = 1.0,
    clamp_max: Annotated[
        float | None, typer.Option("--clamp-max", help="Clamp the gradient's RMS to this [the model's; Disco: 0.05].")
    ] = None,
    init_image: Annotated[Path | None, typer.Option("--init-image", help="Start from this picture.")] = None,
    skip_steps: Annotated[int, typer.Option("--skip-steps", help="With --init-image: steps to skip.")] = 0,
    size: Annotated[int | None, typer.Option("--size", help="Picture side (default: the model's).")] = None,
    seed: Seed = None,
    save_every: Annotated[
        int, typer.Option("--save-every", help="Also save the predicted picture every N steps (OUTPUT-frames/).")
    ] = 0,
    recurrence: Annotated[
        int | None,
        typer.Option("--recurrence", help="Take each step this many times from re-noised samples [the model's; 1]."),
    ] = None,
    color_guidance: Annotated[
        float | None,
        typer.Option(
            "--color-guidance", help="Share of the CLIP gradient for overall colour/brightness, 0-1 [the model's; 0]."
        ),
    ] = None,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Less memory, more time (recompute UNet activations).")
    ] = False,
    device: Device = "auto",
    output: Output = None,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """CLIP-guided sampling of an unconditional diffusion model (Chinese Disco Diffusion)."""
    from .cli import _Progress, _quiet_libraries
    from .io import check_output_file, load_image, output_paths

    _quiet_libraries()
    from .disco import DiscoSettings, disco_sample, load_uncond, parse_prompts

    if seed is None:
        import secrets

        seed = secrets.randbelow(2**31)
    defaults = guidance_defaults(model, clip_guidance_scale=clip_guidance_scale, clamp_max=clamp_max,
                                 recurrence=recurrence, color_guidance=color_guidance)  # fmt: skip
    settings = DiscoSettings(
        steps=steps, sampler=sampler, eta=eta, tv_scale=tv_scale, range_scale=range_scale, sat_scale=sat_scale,
        cutn=cutn, cut_batches=cut_batches, cut_pow=cut_pow, skip_steps=skip_steps, seed=seed,
        gradient_checkpointing=gradient_checkpointing, save_every=save_every, **defaults,
    )  # fmt: skip
    settings.check()  # bad settings fail before anything loads
    parse_prompts(prompt)
    init = load_image(init_image, what="init image") if init_image is not None else None
    path = output_paths(output, [seed])[0]
    check_output_file(path, overwrite=overwrite)
    _check_frames(_frame_paths(path, settings.frame_count()), overwrite=overwrite)  # before anything is computed
    from .clip import load_clip
    from .loading import select_device

    dev = select_device(device)
    uncond = load_uncond(model, device=dev, allow_pickle=allow_pickle)
    chinese_clip = load_clip(clip, image_tower=image_tower, allow_pickle=allow_pickle, device=dev)
    with _Progress("disco") as bar:
        result = disco_sample(uncond, chinese_clip, prompt, settings, init_image=init, size=size, progress=bar)
    text = _parameters_text(prompt, result.settings, clip, image_tower, init_image)
    _save(result, path, text, overwrite)


def _frame_paths(path: Path, count: int) -> list[Path]:
    """Where the ``count`` frames of the picture ``path`` go: ``<stem>-frames/0000.png`` …"""
    return [path.with_name(f"{path.stem}-frames") / f"{i:04d}.png" for i in range(count)]


def _check_frames(frames: list[Path], *, overwrite: bool) -> None:
    """Refuse frame names that are taken (without ``overwrite``) or a frames folder that is a file."""
    from .errors import OutputError

    if not frames:
        return
    folder = frames[0].parent
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file, not the frames folder; remove it or choose another -o")
    if overwrite:
        return
    taken = next((frame for frame in frames if frame.exists() or frame.is_symlink()), None)
    if taken is not None:
        raise OutputError(f"{taken} already exists; pass --overwrite to replace it or choose another -o")


def _save(result, path: Path, parameters: str, overwrite: bool) -> None:
    from PIL.PngImagePlugin import PngInfo

    from .io import save_png

    info = PngInfo()
    info.add_text("parameters", parameters)
    written = save_png(result.image, path, pnginfo=info, overwrite=overwrite)
    frames = _frame_paths(path, len(result.frames))
    if frames:
        frames[0].parent.mkdir(exist_ok=True)
        for frame, image in zip(frames, result.frames, strict=True):
            save_png(image, frame, overwrite=overwrite)  # checked before sampling; a frame written since is refused
        if overwrite:  # the replaced run's later frames would pass for this picture's
            for stale in frames[0].parent.iterdir():
                if re.fullmatch(r"\d{4}\.png", stale.name) and int(stale.name[:4]) >= len(frames):
                    stale.unlink()
    typer.echo(str(written))
