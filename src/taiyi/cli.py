"""The ``taiyi`` command line. Every command has a Python API twin with the same behaviour.

User mistakes end with one line on stderr (``taiyi: error: ...``) and exit status 2.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from .errors import InvalidInputError, ModelLoadError, StoppedError, TaiyiError

app = typer.Typer(
    name="taiyi",
    help="Chinese-native text-to-image: generate and edit images from Chinese prompts with Taiyi models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib import metadata

    from . import __version__

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("torch", "diffusers", "transformers", "accelerate"))
    typer.echo(f"taiyi {__version__} ({libraries}; Python {sys.version.split()[0]})")
    raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the versions and exit."),
    ] = False,
) -> None:
    """Chinese-native text-to-image: generate and edit images from Chinese prompts with Taiyi models."""


from .cli_options import (  # noqa: E402  (after the click import fallback)
    AllowPickle,
    Backend,
    ClipSkip,
    Device,
    Dtype,
    Emphasis,
    Grid,
    Guidance,
    GuidanceEnd,
    GuidanceRescale,
    Height,
    HiresScale,
    HiresSteps,
    HiresStrength,
    HiresUpscaler,
    Lora,
    Memory,
    Model,
    Negative,
    NoNormalize,
    NoSafety,
    NumImages,
    Output,
    Overwrite,
    Scheduler,
    Seed,
    Steps,
    VariationSeed,
    VariationStrength,
    Width,
    refuse_given,
    typed_options,
)

DEFAULT_STEPS = 9  # mirrors taiyi.pipeline.DEFAULT_STEPS without importing torch at start-up
DEFAULT_SCHEDULER = "dpm++-sde-ays"


def _quiet_libraries() -> None:
    """Silence the libraries' info chatter and their progress bars; taiyi draws its own."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class _Progress:
    """A rich progress bar on stderr (silent when stderr is not a terminal)."""

    def __init__(self, description: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.description = description
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task(self.description, total=total)
        self.progress.update(self.task, completed=done, total=total)


def _load(model, dtype, device, no_safety_checker, allow_pickle, lora=None, memory="auto", backend="auto"):
    _quiet_libraries()
    from .pipeline import load_pipeline

    return load_pipeline(
        model,
        device=device,
        dtype=dtype,
        safety_checker=not no_safety_checker,
        allow_pickle=allow_pickle,
        loras=lora,
        memory=memory,
        backend=backend,
    )


def _rerender_loras(params, lora: list[str] | None, image: Path) -> list:
    """The LoRAs to re-apply for ``--from``: those given, else the recorded ones found beside the image or here."""
    from .lora import find_recorded_loras, recorded_loras

    if lora:  # TaiyiPipeline.rerender warns when they are not the recorded ones
        return list(lora)
    if not recorded_loras(params.extras):
        return []
    return find_recorded_loras(params.extras, [image.parent, Path.cwd()])


def _share_cores(processes: int) -> None:
    """Several generating processes on one machine's CPU: split the cores between them."""
    import torch

    from .loading import cpu_count

    if not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
        torch.set_num_threads(max(1, cpu_count() // max(local, 1)))


def _precheck(output, overwrite, num_images, grid: bool = False, **settings) -> None:
    """Refuse bad settings and a bad --output (and --grid's file) before the model is loaded (a real checkpoint takes
    a minute) and the images are drawn."""
    from .io import check_output_file, output_paths
    from .pipeline import check_settings, grid_path

    check_settings(num_images=num_images, **settings)
    if output is not None:
        paths = output_paths(output, [0] * num_images)
        for path in [*paths, *([grid_path(output, paths)] if grid and num_images > 1 else [])]:
            check_output_file(path, overwrite=overwrite)


def _save(result, output, overwrite, grid) -> None:
    for path in result.save(output, overwrite=overwrite, grid=grid):
        typer.echo(str(path))


# generate's options whose value changes the picture: --from draws the picture's own, so giving one is refused.
_PICTURE_OPTIONS = (
    "negative_prompt", "steps", "guidance", "guidance_end", "guidance_rescale", "seed", "num_images", "width",
    "height", "scheduler", "grid", "no_normalize", "emphasis", "clip_skip", "variation_seed", "variation_strength",
    "hires_scale", "hires_strength", "hires_steps", "hires_upscaler",
)  # fmt: skip


# generate's options that only some other setting puts to use: (them, that setting, how to give it)
_NEEDS_ANOTHER = (
    (("hires_strength", "hires_steps", "hires_upscaler"), "hires_scale", "--hires-scale (its upscale factor, e.g. 2)"),
    (("variation_seed",), "variation_strength", "--variation-strength above 0 (e.g. 0.1)"),
)


def _refuse_unused(ctx: typer.Context, settings: dict, rows: list[dict]) -> None:
    """Refuse a typed option nothing would read (the hires fix's settings without its scale, a variation seed without
    a strength), unless a row of the prompts file gives what puts it to use."""
    for names, needed, how in _NEEDS_ANOTHER:
        if not any(row.get(needed) for row in (settings, *rows)) and (typed := typed_options(ctx, names)):
            raise InvalidInputError(f"{', '.join(typed)} would change nothing without {how}")


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Annotated[str | None, typer.Argument(help="Chinese, English or mixed description.")] = None,
    model: Model = None,
    negative_prompt: Negative = None,
    steps: Steps = DEFAULT_STEPS,
    guidance: Guidance = None,
    guidance_end: GuidanceEnd = None,
    guidance_rescale: GuidanceRescale = None,
    seed: Seed = None,
    num_images: NumImages = 1,
    width: Width = None,
    height: Height = None,
    scheduler: Scheduler = DEFAULT_SCHEDULER,
    dtype: Dtype = "auto",
    device: Device = "auto",
    output: Output = None,
    grid: Grid = False,
    overwrite: Overwrite = False,
    no_safety_checker: NoSafety = False,
    no_normalize: NoNormalize = False,
    emphasis: Emphasis = "original",
    clip_skip: ClipSkip = 1,
    variation_seed: VariationSeed = None,
    variation_strength: VariationStrength = 0.0,
    hires_scale: HiresScale = None,
    hires_strength: HiresStrength = 0.7,
    hires_steps: HiresSteps = 0,
    hires_upscaler: HiresUpscaler = "Latent",
    allow_pickle: AllowPickle = False,
    lora: Lora = None,
    memory: Memory = "auto",
    backend: Backend = "auto",
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts-file", help="txt / jsonl / csv of prompts; output is a folder.")
    ] = None,
    from_image: Annotated[
        Path | None, typer.Option("--from", help="Re-render the image whose parameters this PNG carries.")
    ] = None,
) -> None:
    """Text to image."""
    sources = [x is not None for x in (prompt, prompts_file, from_image)]
    if sum(sources) != 1:
        raise InvalidInputError("give exactly one of: a PROMPT, --prompts-file FILE, or --from IMAGE")
    if from_image is not None:
        from .metadata import read_parameters

        refuse_given(ctx, _PICTURE_OPTIONS, "taiyi generate")  # they would be silently ignored
        params = read_parameters(from_image)
        if "CLIP guidance scale" in params.extras:  # Disco's own keys: no text-to-image model drew it
            raise InvalidInputError(
                f"{from_image} was drawn by taiyi disco (CLIP guidance of an unconditional model), which --from "
                f"does not redraw; run taiyi disco with the settings taiyi info {from_image} prints"
            )
        _precheck(output, overwrite, 1)
        loras = _rerender_loras(params, lora, from_image)
        try:
            pipe = _load(
                model or params.model or None,
                params.dtype or dtype,
                device,
                no_safety_checker,
                allow_pickle,
                loras,
                memory,
                backend,
            )
        except ModelLoadError as exc:
            if model or not params.model:
                raise
            # another tool's picture names its checkpoint (A1111: "v1-5-pruned-emaonly"), not a folder here
            raise ModelLoadError(f"{exc}; the picture names model {params.model!r}: give it with --model") from None
        with _Progress("rendering") as bar:
            result = pipe.rerender(params, progress=bar)
        _save(result, output, overwrite, grid=False)
        return
    settings = dict(
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        guidance_end=guidance_end,
        guidance_rescale=guidance_rescale,
        seed=seed,
        num_images=num_images,
        width=width,
        height=height,
        scheduler=scheduler,
        normalize=not no_normalize,
        emphasis=emphasis,
        clip_skip=clip_skip,
        variation_seed=variation_seed,
        variation_strength=variation_strength,
        hires_scale=hires_scale,
        hires_strength=hires_strength,
        hires_steps=hires_steps,
        hires_upscaler=hires_upscaler,
    )
    if prompts_file is not None:
        from .batch import check_output_folder, process_group, read_prompts_file, run_batch

        rows = read_prompts_file(prompts_file)
        _refuse_unused(ctx, settings, rows)
        out_dir = Path(output or "outputs/batch")
        if output is None:
            Path("outputs").mkdir(exist_ok=True)  # the default home of pictures, as for one prompt
        check_output_folder(out_dir)
        rank, world, state = process_group()  # several processes under accelerate launch: rows are shared out
        if state is not None:
            device = str(state.device) if device == "auto" else device
            _share_cores(world)
        pipe = _load(model, dtype, device, no_safety_checker, allow_pickle, lora, memory, backend)
        mine = len(range(rank, len(rows), world))
        done = iter(range(1, mine + 1))
        with _Progress("prompts") as bar:
            counts = run_batch(
                pipe, rows, settings, out_dir, overwrite=overwrite, on_row=lambda i: bar(next(done), mine),
                rank=rank, world_size=world, barrier=state.wait_for_everyone if state is not None else None,
            )  # fmt: skip
        who = f" (process {rank} of {world})" if world > 1 else ""
        typer.echo(f"{out_dir}: {counts['written']} written, {counts['skipped']} already there{who}")
        return
    _refuse_unused(ctx, settings, [])
    model_free = {k: v for k, v in settings.items() if k != "num_images"}
    _precheck(output, overwrite, num_images, grid, prompt=prompt, **model_free)
    pipe = _load(model, dtype, device, no_safety_checker, allow_pickle, lora, memory, backend)
    with _Progress("generating") as bar:
        result = pipe.generate(prompt, progress=bar, **settings)
    _save(result, output, overwrite, grid)


@app.command()
def edit(
    image: Annotated[Path, typer.Argument(help="Image to edit.")],
    prompt: Annotated[str, typer.Argument(help="What the edited image should show.")],
    strength: Annotated[float, typer.Option("--strength", help="How much to redraw, in (0, 1].")] = 0.6,
    model: Model = None,
    negative_prompt: Negative = None,
    steps: Steps = DEFAULT_STEPS,
    guidance: Guidance = None,
    guidance_end: GuidanceEnd = None,
    seed: Seed = None,
    num_images: NumImages = 1,
    width: Width = None,
    height: Height = None,
    scheduler: Scheduler = DEFAULT_SCHEDULER,
    dtype: Dtype = "auto",
    device: Device = "auto",
    output: Output = None,
    grid: Grid = False,
    overwrite: Overwrite = False,
    no_safety_checker: NoSafety = False,
    no_normalize: NoNormalize = False,
    emphasis: Emphasis = "original",
    clip_skip: ClipSkip = 1,
    allow_pickle: AllowPickle = False,
    lora: Lora = None,
    memory: Memory = "auto",
    backend: Backend = "auto",
) -> None:
    """Image to image: redraw IMAGE following a Chinese PROMPT."""
    from .io import load_image
    from .pipeline import check_strength

    init = load_image(image)  # checked before the model is loaded: a typo fails fast
    check_strength(strength, steps)
    _precheck(
        output, overwrite, num_images, grid, steps=steps, guidance=guidance, guidance_end=guidance_end, seed=seed,
        scheduler=scheduler, width=width, height=height, prompt=prompt, negative_prompt=negative_prompt,
        normalize=not no_normalize, emphasis=emphasis, clip_skip=clip_skip,
    )  # fmt: skip
    pipe = _load(model, dtype, device, no_safety_checker, allow_pickle, lora, memory, backend)
    with _Progress("editing") as bar:
        result = pipe.edit(
            init,
            prompt,
            strength=strength,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance=guidance,
            guidance_end=guidance_end,
            seed=seed,
            num_images=num_images,
            width=width,
            height=height,
            scheduler=scheduler,
            normalize=not no_normalize,
            emphasis=emphasis,
            clip_skip=clip_skip,
            progress=bar,
        )
    _save(result, output, overwrite, grid)


@app.command()
def inpaint(
    image: Annotated[Path, typer.Argument(help="Image to edit.")],
    mask: Annotated[Path, typer.Argument(help="Same size as IMAGE; white = redraw, black (or transparent) = keep.")],
    prompt: Annotated[str, typer.Argument(help="What the masked area should show.")],
    strength: Annotated[float, typer.Option("--strength", help="How much to redraw, in (0, 1].")] = 1.0,
    feather: Annotated[float, typer.Option("--feather", help="Paste-back edge softness, pixels.")] = 4.0,
    only_masked: Annotated[
        bool,
        typer.Option(
            "--only-masked", help="A1111's 'Only masked': draw the mask's box (and padding) at the model's full size."
        ),
    ] = False,
    padding: Annotated[
        int, typer.Option("--padding", help="Pixels around the mask's box with --only-masked (0-256).")
    ] = 32,
    model: Model = None,
    negative_prompt: Negative = None,
    steps: Steps = DEFAULT_STEPS,
    guidance: Guidance = None,
    guidance_end: GuidanceEnd = None,
    seed: Seed = None,
    num_images: NumImages = 1,
    scheduler: Scheduler = DEFAULT_SCHEDULER,
    dtype: Dtype = "auto",
    device: Device = "auto",
    output: Output = None,
    grid: Grid = False,
    overwrite: Overwrite = False,
    no_safety_checker: NoSafety = False,
    no_normalize: NoNormalize = False,
    emphasis: Emphasis = "original",
    clip_skip: ClipSkip = 1,
    allow_pickle: AllowPickle = False,
    lora: Lora = None,
    memory: Memory = "auto",
    backend: Backend = "auto",
) -> None:
    """Inpainting: redraw the white part of MASK following a Chinese PROMPT; keep the rest."""
    from .io import load_image
    from .pipeline import check_strength

    # the mask as stored: its transparent pixels count as black (see TaiyiPipeline.inpaint)
    init, mask_image = load_image(image), load_image(mask, mode=None, what="mask")
    check_strength(strength, steps)
    if not 0 <= padding <= 256:
        raise InvalidInputError(f"--padding must be 0 to 256 pixels, not {padding}")
    if padding != 32 and not only_masked:
        raise InvalidInputError("--padding changes nothing without --only-masked")
    _precheck(
        output, overwrite, num_images, grid, steps=steps, guidance=guidance, guidance_end=guidance_end, seed=seed,
        scheduler=scheduler, prompt=prompt, negative_prompt=negative_prompt, normalize=not no_normalize,
        emphasis=emphasis, clip_skip=clip_skip,
    )  # fmt: skip
    pipe = _load(model, dtype, device, no_safety_checker, allow_pickle, lora, memory, backend)
    with _Progress("inpainting") as bar:
        result = pipe.inpaint(
            init,
            mask_image,
            prompt,
            strength=strength,
            feather=feather,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance=guidance,
            guidance_end=guidance_end,
            seed=seed,
            num_images=num_images,
            scheduler=scheduler,
            normalize=not no_normalize,
            emphasis=emphasis,
            clip_skip=clip_skip,
            only_masked=only_masked,
            padding=padding,
            progress=bar,
        )
    _save(result, output, overwrite, grid)


@app.command()
def outpaint(
    image: Annotated[Path, typer.Argument(help="Picture to grow.")],
    prompt: Annotated[str, typer.Argument(help="What the whole grown picture shows.")],
    left: Annotated[int | None, typer.Option("--left", help="Pixels to add on the left.")] = None,
    top: Annotated[int | None, typer.Option("--top", help="Pixels to add at the top.")] = None,
    right: Annotated[int | None, typer.Option("--right", help="Pixels to add on the right.")] = None,
    bottom: Annotated[int | None, typer.Option("--bottom", help="Pixels to add at the bottom.")] = None,
    extend: Annotated[int, typer.Option("--extend", help="Pixels to add on every side not given its own.")] = 0,
    strength: Annotated[float, typer.Option("--strength", help="How much to redraw the margin, in (0, 1].")] = 1.0,
    feather: Annotated[float, typer.Option("--feather", help="Seam softness, pixels into the margin.")] = 4.0,
    model: Model = None,
    negative_prompt: Negative = None,
    steps: Steps = DEFAULT_STEPS,
    guidance: Guidance = None,
    guidance_end: GuidanceEnd = None,
    seed: Seed = None,
    num_images: NumImages = 1,
    scheduler: Scheduler = DEFAULT_SCHEDULER,
    dtype: Dtype = "auto",
    device: Device = "auto",
    output: Output = None,
    grid: Grid = False,
    overwrite: Overwrite = False,
    no_safety_checker: NoSafety = False,
    no_normalize: NoNormalize = False,
    emphasis: Emphasis = "original",
    clip_skip: ClipSkip = 1,
    allow_pickle: AllowPickle = False,
    lora: Lora = None,
    memory: Memory = "auto",
    backend: Backend = "auto",
) -> None:
    """Outpainting (扩图): grow IMAGE by pixels on some sides and draw the new margin following PROMPT; the
    picture itself is kept pixel for pixel."""
    from .io import load_image
    from .outpaint import check_grown, check_margins
    from .pipeline import MAX_SIDE, check_strength

    margins = check_margins(*(extend if side is None else side for side in (left, top, right, bottom)))
    init = load_image(image)
    check_grown(init.width, init.height, margins, MAX_SIDE)
    check_strength(strength, steps)
    if feather < 0:
        raise InvalidInputError(f"--feather must be 0 or more pixels, not {feather:g}")
    _precheck(
        output, overwrite, num_images, grid, steps=steps, guidance=guidance, guidance_end=guidance_end, seed=seed,
        scheduler=scheduler, prompt=prompt, negative_prompt=negative_prompt, normalize=not no_normalize,
        emphasis=emphasis, clip_skip=clip_skip,
    )  # fmt: skip
    pipe = _load(model, dtype, device, no_safety_checker, allow_pickle, lora, memory, backend)
    with _Progress("outpainting") as bar:
        result = pipe.outpaint(
            init, prompt, left=margins[0], top=margins[1], right=margins[2], bottom=margins[3], strength=strength,
            feather=feather, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
            guidance_end=guidance_end, seed=seed, num_images=num_images, scheduler=scheduler,
            normalize=not no_normalize, emphasis=emphasis, clip_skip=clip_skip, progress=bar,
        )  # fmt: skip
    _save(result, output, overwrite, grid)


@app.command()
def info(
    image: Annotated[Path, typer.Argument(help="A PNG written by taiyi or another SD tool.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the parsed parameters as JSON.")] = False,
) -> None:
    """Print the generation parameters an image carries."""
    from dataclasses import asdict

    from .metadata import read_parameters, read_parameters_text

    if as_json:
        params = read_parameters(image)
        fields = {k: v for k, v in asdict(params).items() if k != "recorded"}  # the text's own keys
        if params.recorded is not None and "CFG scale" not in params.recorded:
            fields["guidance"] = None  # never recorded (a Disco picture has none): not the 7.5 default
        typer.echo(json.dumps(fields, ensure_ascii=False, indent=2))
    else:  # as stored: a re-rendered text would add defaults (CFG scale) to pictures that never had them
        typer.echo(read_parameters_text(image))


@app.command()
def models() -> None:
    """List the known short model names, their hub ids and whether each is available offline."""
    from .models import cached_revisions, list_models

    def where(info, path) -> str:
        if path:
            return str(path)
        if info.bundled:
            return "not installed"
        others = cached_revisions(info.repo_id)  # downloaded at another branch (revision="fp16") or commit
        if not others:
            return "not cached"
        return f"not cached (revision {', '.join(others)} is: --model {info.name}@{others[0]})"

    rows = [(info.name, info.repo_id or "(embedded)", info.kind, where(info, path)) for info, path in list_models()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3])


def _register_subcommands() -> None:
    from .assemble import assemble_command
    from .bench import bench_command
    from .cache_cli import cache_app
    from .clip_cli import clip_app
    from .convert_cli import convert_app
    from .data_cli import data_app
    from .disco_cli import disco
    from .eval_cli import eval_app
    from .recipe.cli import recipe_app
    from .serve_cli import serve
    from .train.cli import train_app

    app.add_typer(clip_app, name="clip")
    app.add_typer(train_app, name="train")
    app.command("serve")(serve)
    app.add_typer(convert_app, name="convert")
    app.command("assemble")(assemble_command)
    app.add_typer(recipe_app, name="recipe")
    app.add_typer(eval_app, name="eval")
    app.command("disco")(disco)
    app.command("bench")(bench_command)
    app.add_typer(data_app, name="data")
    app.add_typer(cache_app, name="cache")


_register_subcommands()


class _LineHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(f"taiyi: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the app and turns user errors into one line and exit status 2."""
    logger = logging.getLogger("taiyi")
    saved = (logger.level, logger.propagate)
    handler = _LineHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        return _run_app(argv)
    finally:  # leave logging as found: main() is also called in-process (tests, embedding apps)
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _run_app(argv: list[str] | None) -> int:
    try:
        code = app(args=argv, prog_name="taiyi", standalone_mode=False)
    except StoppedError as exc:  # a training run stopped on Ctrl-C or SIGTERM, its checkpoint saved
        sys.stderr.write(f"taiyi: {exc}\n")  # one write: the processes of a launch each say it, whole lines
        return _exit(exc.exit_code, argv)
    except TaiyiError as exc:
        print(f"taiyi: error: {exc}", file=sys.stderr)
        return _exit(2, argv)
    except click_exc.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else "", file=sys.stderr)
        return _exit(0, argv)
    except click_exc.UsageError as exc:
        print(f"taiyi: error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        return _exit(2, argv)
    except typer.Exit as exc:
        return _exit(exc.exit_code, argv)
    except (typer.Abort, KeyboardInterrupt):
        print("taiyi: interrupted", file=sys.stderr)
        return _exit(130, argv)
    except OSError as exc:  # a full disk or a read-only place anywhere (a log line, a cache): one line
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            where = f": {exc.filename}" if exc.filename else ""
            print(f"taiyi: error: {exc.strerror or exc}{where}; choose a place you can write to", file=sys.stderr)
            return _exit(2, argv)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"taiyi: error: no space left on device{where}; free space and run again (a training run goes on "
              "from its last checkpoint with --resume latest)", file=sys.stderr)  # fmt: skip
        return _exit(2, argv)
    if code == 130:  # typer turns Ctrl-C (and the recipe's SIGTERM) into this return value, not an exception
        print("taiyi: interrupted", file=sys.stderr)
        return _exit(130, argv)
    return _exit(code if isinstance(code, int) and not isinstance(code, bool) else 0, argv)


def _exit(code: int, argv: list[str] | None) -> int:
    if argv is None:  # called as the console script
        if code == 130 and threading.current_thread() is threading.main_thread():
            # interrupted and leaving: a second Ctrl-C while the process winds down (a pool's workers ending) would
            # kill it by the signal instead of this exit status
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
