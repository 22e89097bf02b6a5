"""``taiyi disco PROMPT``: Chinese Disco Diffusion from the command line (see :mod:`taiyi.disco`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from .cli_options import AllowPickle, Device, Output, Overwrite, refuse_given

# Disco's own --seed help: the pictures of -k are drawn one after another, each the picture of its own seed.
Seed = Annotated[
    int | None,
    typer.Option(
        "--seed",
        "-s",
        help="Seed of the picture; with -k, of the first: picture i uses seed + i, as a run with that seed would"
        " (default: a random one, recorded in each picture).",
    ),
]
NumImages = Annotated[
    int,
    typer.Option(
        "--num-images", "-k", help="Pictures to draw, one after another (Disco's n_batches), each written when done."
    ),
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
    ctx: typer.Context,
    prompt: Annotated[
        str | None, typer.Argument(help="Chinese prompt; weighted parts as 诗句:2|晚霞:1 (negative allowed).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help=f"Unconditional model folder (DDPMPipeline or UNet2DModel) [default: {DEFAULT_UNCOND}].",
        ),
    ] = None,
    clip: Annotated[
        str | None, typer.Option("--clip", help=f"Chinese CLIP (folder or short name) [default: {DEFAULT_CLIP}].")
    ] = None,
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
    init_image: Annotated[
        Path | None,
        typer.Option("--init-image", help="Start from this picture (with --from: the picture's own, if moved)."),
    ] = None,
    skip_steps: Annotated[int, typer.Option("--skip-steps", help="With --init-image: steps to skip.")] = 0,
    size: Annotated[int | None, typer.Option("--size", help="Picture side (default: the model's).")] = None,
    seed: Seed = None,
    num_images: NumImages = 1,
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
    from_image: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Redraw a picture taiyi disco wrote, with the settings it records (no PROMPT). Its init image is "
            "looked for beside it, then here (else give --init-image); --model, --clip and --image-tower name its "
            "models where they are not found under the names it records.",
        ),
    ] = None,
) -> None:
    """CLIP-guided sampling of an unconditional diffusion model (Chinese Disco Diffusion).

    -k N draws N pictures one after another, their seeds counting up from --seed, each written as soon as it is
    done; --from redraws a picture taiyi disco wrote.
    """
    from .cli import _Progress, _quiet_libraries
    from .errors import InvalidInputError
    from .io import check_output_file, load_image, output_paths

    if prompt is None and from_image is None:
        raise InvalidInputError("give a PROMPT (or --from IMAGE to redraw a picture taiyi disco wrote)")
    if prompt is not None and from_image is not None:
        raise InvalidInputError("give a PROMPT or --from IMAGE, not both: --from redraws the picture's own prompt")
    _quiet_libraries()
    from .disco import DiscoSettings, disco_samples, disco_seeds, load_uncond, parse_prompts

    if from_image is not None:
        refuse_given(ctx, _PICTURE_OPTIONS, "taiyi disco")
        run = _recorded_run(from_image, init_image)
        prompt, settings, size = run["prompt"], run["settings"], run["size"]
        init_image = init_image or run["init_image"]
        hints = _hints(run, model, clip, image_tower)
        model, clip, image_tower = model or run["model"], clip or run["clip"], image_tower or run["image_tower"]
        settings.gradient_checkpointing, settings.save_every = gradient_checkpointing, save_every  # the same picture
    else:
        hints = {}
        model, clip = model or DEFAULT_UNCOND, clip or DEFAULT_CLIP
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
    # picture i is the one a run with seed+i draws, under the names taiyi generate gives its images
    paths = output_paths(output, disco_seeds(settings.seed, num_images))
    for path in paths:  # every name before anything is computed: a run of N is never stopped halfway by a name
        check_output_file(path, overwrite=overwrite)
        _check_frames(_frame_paths(path, settings.frame_count()), overwrite=overwrite)
    from .clip import load_clip
    from .loading import select_device

    dev = select_device(device)
    uncond = _load_named(
        model, hints.get("model"), lambda name: load_uncond(name, device=dev, allow_pickle=allow_pickle)
    )
    chinese_clip = _load_named(
        clip, hints.get("clip"),
        lambda name: load_clip(name, image_tower=image_tower, allow_pickle=allow_pickle, device=dev),
    )  # fmt: skip
    with _Progress("disco") as bar:
        pictures = disco_samples(
            uncond, chinese_clip, prompt, settings, num_images=num_images, init_image=init, size=size, progress=bar
        )
        for path, result in zip(paths, pictures, strict=True):  # each written as soon as it is drawn
            text = _parameters_text(prompt, result.settings, clip, image_tower, init_image)
            _save(result, path, text, overwrite)


# Options whose value changes the picture: --from draws the picture's own, so giving one is refused.
_PICTURE_OPTIONS = (
    "steps", "sampler", "eta", "clip_guidance_scale", "tv_scale", "range_scale", "sat_scale", "cutn", "cut_batches",
    "cut_pow", "clamp_max", "skip_steps", "size", "seed", "num_images", "recurrence", "color_guidance",
)  # fmt: skip


# The keys of _parameters_text that every picture of taiyi disco records (the CLIP image tower and the init image
# only where given).
_RECORDED = ("Steps", "Sampler", "Seed", "Size", "Model", "CLIP", "CLIP guidance scale", "Clamp max", "TV scale",
             "Range scale", "Sat scale", "Cutn", "Cut pow", "Cut batches", "Eta", "Skip steps", "Recurrence",
             "Color guidance")  # fmt: skip


def _recorded_run(picture: Path, init_image: Path | None) -> dict:
    """What drew ``picture``, read back from its ``parameters`` text (see :func:`_parameters_text`): the prompt,
    the :class:`~taiyi.disco.DiscoSettings`, the size, the models as recorded and the init image found.

    Raises:
        InvalidInputError: no parameters, not a Disco picture, a setting missing or unreadable, or its init image
            not found (nor given) — or given to a picture drawn without one.
    """
    from .disco import SAMPLERS, DiscoSettings
    from .errors import InvalidInputError
    from .metadata import _parse_float, _parse_int, read_parameters
    from .schedulers import scheduler_spec

    params = read_parameters(picture)
    extras = params.extras
    if "CLIP guidance scale" not in extras:  # taiyi generate's (or A1111's) picture: a text-to-image model drew it
        raise InvalidInputError(
            f"{picture} was not drawn by taiyi disco (its parameters have no CLIP guidance scale); redraw it with "
            f"taiyi generate --from {picture}"
        )
    missing = [key for key in _RECORDED if key not in (params.recorded or ()) and key not in extras]
    if missing:  # a default would draw some other picture, said to be this one
        raise InvalidInputError(
            f"{picture}'s parameters do not record {', '.join(missing)} (an older taiyi drew it), so it cannot be "
            f"drawn again; run taiyi disco with the settings taiyi info {picture} prints"
        )
    # "DDIM" and "PLMS" are A1111 names too, read into the scheduler; "DDPM" is not, and stays in the extras
    sampler = (extras.get("Sampler") or scheduler_spec(params.scheduler).a1111_sampler).strip().lower()
    if sampler not in SAMPLERS:
        raise InvalidInputError(f"{picture}: sampler {sampler!r} is not one taiyi disco runs ({', '.join(SAMPLERS)})")
    if params.width != params.height:
        raise InvalidInputError(f"{picture}: taiyi disco draws squares, not {params.width}x{params.height} pictures")

    def number(key: str) -> float:
        return _parse_float(key, extras[key])

    def whole(key: str) -> int:
        return _parse_int(key, extras[key])

    clamp = extras["Clamp max"].strip()
    settings = DiscoSettings(
        steps=params.steps, sampler=sampler, eta=number("Eta"), clip_guidance_scale=number("CLIP guidance scale"),
        tv_scale=number("TV scale"), range_scale=number("Range scale"), sat_scale=number("Sat scale"),
        cutn=whole("Cutn"), cut_batches=whole("Cut batches"), cut_pow=number("Cut pow"),
        clamp_max=None if clamp == "off" else number("Clamp max"), skip_steps=whole("Skip steps"), seed=params.seed,
        recurrence=whole("Recurrence"), color_guidance=number("Color guidance"),
    )  # fmt: skip
    init_name = extras.get("Init image")
    if init_name is None and init_image is not None:
        raise InvalidInputError(f"{picture} was drawn without an init image; --init-image would change it")
    found = None
    if init_name is not None and init_image is None:
        found = next((place / init_name for place in (picture.parent, Path.cwd()) if (place / init_name).is_file()),
                     None)  # fmt: skip
        if found is None:
            raise InvalidInputError(
                f"{picture} was drawn from the init image {init_name}, found neither beside it nor in the current "
                "folder; give it with --init-image"
            )
    prompt = params.prompt
    if params.negative_prompt:  # A1111's layout reads a prompt line starting "Negative prompt:" as one; Disco has none
        prompt = "\n".join([*([prompt] if prompt else []), f"Negative prompt: {params.negative_prompt}"])
    return {
        "prompt": prompt, "settings": settings, "size": params.width, "model": params.model, "clip": extras["CLIP"],
        "image_tower": extras.get("CLIP image tower"), "init_image": found,
    }  # fmt: skip


def _hints(run: dict, model: str | None, clip: str | None, image_tower: str | None) -> dict[str, str]:
    """For --from: what to add to the error when a model the picture records (not one given) is not found here."""
    hints = {}
    if model is None:
        hints["model"] = f"the picture names model {run['model']!r}: give it with --model"
    if clip is None and image_tower is None:
        tower = run["image_tower"]
        hints["clip"] = f"the picture names CLIP {run['clip']!r}" + (
            f" with the image tower {tower!r}: give them with --clip and --image-tower" if tower else
            ": give it with --clip"
        )  # fmt: skip
    return hints


def _load_named(name: str, hint: str | None, load):
    """``load(name)``; a :class:`~taiyi.errors.ModelLoadError` gets ``hint`` added (a name that a picture records
    and that is not found here, another machine's folder say: which option gives it)."""
    from .errors import ModelLoadError

    try:
        return load(name)
    except ModelLoadError as exc:
        if hint is None:
            raise
        raise ModelLoadError(f"{exc}; {hint}") from None


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
