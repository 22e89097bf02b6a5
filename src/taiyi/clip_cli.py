"""`taiyi clip ...`: score, classify, index, search and eval with a Chinese CLIP.

Every command loads its model with :func:`taiyi.clip.load_clip` (``--model``: a Taiyi-CLIP text tower by
short name, hub id or folder, a folder saved by ``ChineseCLIP.save_pretrained``, or a standard CLIP folder
such as ``taiyi train clip --new-clip``'s English CLIP, which takes English texts; ``--image-tower``:
the CLIP image model for a Taiyi text tower). Arguments are checked before the model is loaded, so a
typo fails at once with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .cli_options import AllowPickle, Device, Overwrite
from .errors import InvalidInputError, OutputError

clip_app = typer.Typer(help="Chinese CLIP: score, classify, index, search, eval.", no_args_is_help=True)

DEFAULT_CLIP_MODEL = "taiyi-mini-clip"

# Options shared by every `taiyi clip` command (one definition each).
Model = Annotated[
    str, typer.Option("--model", "-m", help="Taiyi-CLIP short name, hub id, text-tower folder or taiyi CLIP folder.")
]
ImageTower = Annotated[
    str | None,
    typer.Option("--image-tower", help="CLIP image model (hub id or folder); default: the text tower's own."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the results as JSON.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
TemplatesFile = Annotated[
    Path | None,
    typer.Option("--templates-file", help="Zero-shot prompt templates, one a line, each with {} for the label."),
]


def _load(model: str, image_tower: str | None, device: str, allow_pickle: bool):
    from .cli import _quiet_libraries
    from .clip import load_clip

    _quiet_libraries()
    return load_clip(model, image_tower=image_tower, allow_pickle=allow_pickle, device=device)


def _progress(description: str):
    from .cli import _Progress

    return _Progress(description)


def _read_lines(path: Path, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file (one item a line)."""
    if not path.is_file():
        raise InvalidInputError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{what} {path} is not UTF-8 text") from exc
    lines = [line.rstrip("\r\n") for line in text.splitlines() if line.strip()]
    if not lines:
        raise InvalidInputError(f"{what} {path} is empty")
    return lines


def _read_templates(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    templates = [line.strip() for line in _read_lines(path, "templates file")]
    bad = next((t for t in templates if "{}" not in t), None)
    if bad is not None:
        raise InvalidInputError(f"template {bad!r} has no {{}}; mark where the label goes, e.g. 一张{{}}的照片。")
    return templates


def _check_text(text: str, what: str) -> str:
    """Refuse a text that says nothing (empty, or only spaces and punctuation)."""
    from .prompts import check_prompt, require_text

    require_text(text, what)
    try:
        return check_prompt(text)
    except InvalidInputError:
        raise InvalidInputError(f"{what} is empty; give a Chinese description, e.g. 一只猫") from None


def _check_output(path: Path | None, overwrite: bool, suffix: str | None = None) -> None:
    from .io import check_output_file

    if path is None:
        return
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name")
    if suffix is not None and path.suffix.lower() != suffix:
        raise OutputError(f"{path} must end in {suffix}")
    check_output_file(path, overwrite=overwrite)


def _echo_json(data) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))


@clip_app.command()
def score(
    image: Annotated[Path, typer.Argument(help="The image.")],
    texts: Annotated[list[str], typer.Argument(help="One or more Chinese texts.")],
    model: Model = DEFAULT_CLIP_MODEL,
    image_tower: ImageTower = None,
    device: Device = "auto",
    allow_pickle: AllowPickle = False,
    as_json: AsJson = False,
) -> None:
    """Score IMAGE against each TEXT: one line per text with the similarity (cosine x the model's logit
    scale, as the Taiyi-CLIP model cards compute it), the cosine, and the text."""
    from .io import load_image

    picture = load_image(image)
    for i, text in enumerate(texts, 1):
        _check_text(text, f"text {i}")
    clip = _load(model, image_tower, device, allow_pickle)
    cosines = (clip.encode_image([picture]) @ clip.encode_text(texts).T)[0]  # (T,)
    scale = clip.scale()
    rows = [
        {"text": text, "similarity": scale * float(c), "cosine": float(c)}
        for text, c in zip(texts, cosines, strict=True)
    ]
    if as_json:
        _echo_json(rows)
        return
    for row in rows:
        typer.echo(f"{row['similarity']:.4f}  {row['cosine']:.4f}  {row['text']}")


@clip_app.command()
def interrogate(
    images: Annotated[list[Path], typer.Argument(help="Pictures to read.")],
    vocabulary: Annotated[
        str | None,
        typer.Option(
            "--vocabulary",
            help='general, shanshui (the embedded CLIP\'s default), or a JSON file {"category": ["word", ...]}.',
        ),
    ] = None,
    min_probability: Annotated[
        float | None, typer.Option("--min-probability", help="A category's word joins at this probability.")
    ] = None,
    model: Model = DEFAULT_CLIP_MODEL,
    image_tower: ImageTower = None,
    device: Device = "auto",
    allow_pickle: AllowPickle = False,
    as_json: AsJson = False,
) -> None:
    """Prompt interrogation (提示词反推): a Chinese prompt for each picture, one word a category of the vocabulary
    that the CLIP is sure of (A1111's "Interrogate CLIP", in Chinese)."""
    from .interrogate import interrogate as read
    from .interrogate import load_vocabulary, vocabulary_for
    from .io import load_image

    vocabulary = vocabulary or vocabulary_for(model)
    load_vocabulary(vocabulary)  # a bad file is said before any picture or model is read
    if min_probability is not None and not 0 < min_probability <= 1:
        raise InvalidInputError(f"--min-probability must be in (0, 1], not {min_probability}")
    pictures = [load_image(path) for path in images]
    clip = _load(model, image_tower, device, allow_pickle)
    readings = read(clip, pictures, vocabulary, min_probability=min_probability)
    if as_json:
        _echo_json(
            [{"image": str(p), "prompt": r.prompt, "picks": r.picks} for p, r in zip(images, readings, strict=True)]
        )
        return
    for path, reading in zip(images, readings, strict=True):
        typer.echo(f"{path}\t{reading.prompt}")


def _labels(labels: str | None, labels_file: Path | None) -> list[str]:
    from .evaluation import check_labels

    if (labels is None) == (labels_file is None):
        raise InvalidInputError("give the classes with exactly one of --labels 猫,狗,... or --labels-file FILE")
    if labels_file is not None:
        items = [line.strip() for line in _read_lines(labels_file, "labels file")]
    else:
        items = [item.strip() for item in labels.replace("，", ",").split(",")]
    return check_labels(items)


@clip_app.command()
def classify(
    images: Annotated[list[Path], typer.Argument(help="Images to classify.")],
    labels: Annotated[str | None, typer.Option("--labels", "-l", help="Comma-separated Chinese labels.")] = None,
    labels_file: Annotated[Path | None, typer.Option("--labels-file", help="Labels, one a line.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Labels to show per image.")] = 5,
    templates_file: TemplatesFile = None,
    model: Model = DEFAULT_CLIP_MODEL,
    image_tower: ImageTower = None,
    device: Device = "auto",
    allow_pickle: AllowPickle = False,
    as_json: AsJson = False,
) -> None:
    """Zero-shot classification with Chinese labels (English for an English CLIP): the top-k labels of each image
    with their probabilities."""
    from .io import load_image

    classes = _labels(labels, labels_file)
    if top_k < 1:
        raise InvalidInputError("--top-k must be at least 1")
    templates = _read_templates(templates_file)
    pictures = [load_image(path) for path in images]
    clip = _load(model, image_tower, device, allow_pickle)
    templates = templates or clip.templates  # the model's language: Chinese, or English for a CLIP text tower
    probs = clip.zero_shot(pictures, classes, templates=templates)  # (N, L)
    top = probs.topk(min(top_k, len(classes)), dim=-1)
    results = [
        {
            "image": str(path),
            "labels": [{"label": classes[j], "probability": float(p)} for p, j in zip(values, indices, strict=True)],
        }
        for path, values, indices in zip(images, top.values.tolist(), top.indices.tolist(), strict=True)
    ]
    if as_json:
        _echo_json(results)
        return
    for result in results:
        typer.echo(result["image"])
        for row in result["labels"]:
            typer.echo(f"  {row['probability']:.4f}  {row['label']}")


@clip_app.command()
def index(
    folder: Annotated[Path, typer.Argument(help="Photo folder to index (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder to create or update.")],
    batch_size: BatchSize = 32,
    model: Model = DEFAULT_CLIP_MODEL,
    image_tower: ImageTower = None,
    device: Device = "auto",
    allow_pickle: AllowPickle = False,
) -> None:
    """Index the images of FOLDER (jpg, jpeg, png, webp, bmp, gif) for `taiyi clip search`. Re-running
    updates the index: only new or changed files are embedded, deleted ones are dropped."""
    from .clip_index import build_index, open_for_update

    if batch_size < 1:
        raise InvalidInputError("--batch-size must be at least 1")
    previous = open_for_update(folder, out)
    clip = _load(model, image_tower, device, allow_pickle)
    with _progress("embedding") as bar:
        report = build_index(
            clip,
            folder,
            out,
            model_name=model,
            image_tower=image_tower,
            previous=previous,
            batch_size=batch_size,
            progress=bar,
        )
    typer.echo(report.summary(out))


@clip_app.command()
def search(
    index: Annotated[Path, typer.Argument(help="Index folder written by `taiyi clip index`.")],
    query: Annotated[str, typer.Argument(help="Chinese text, or the path of an image to find similar ones.")],
    k: Annotated[int, typer.Option("-k", "--top-k", help="Number of results.")] = 10,
    html_out: Annotated[Path | None, typer.Option("--html", help="Also write an HTML preview page.")] = None,
    grid_out: Annotated[Path | None, typer.Option("--grid", help="Also write a PNG contact sheet.")] = None,
    overwrite: Overwrite = False,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="CLIP to search with [default: the one that built the index]."),
    ] = None,
    image_tower: ImageTower = None,
    device: Device = "auto",
    allow_pickle: AllowPickle = False,
) -> None:
    """Search an index: prints "cosine path" lines, best first. A QUERY naming an image file searches
    by image."""
    from .clip_index import check_same_image_tower, load_index, read_query, render_grid, render_html, search_index
    from .io import atomic_write_bytes, save_png

    found = load_index(index)
    if k < 1:
        raise InvalidInputError("-k must be at least 1")
    target = read_query(query)
    if isinstance(target, str):
        _check_text(target, "query")
    _check_output(html_out, overwrite)
    _check_output(grid_out, overwrite, ".png")
    if model is None:  # the model (and image tower) index.json names, as `taiyi clip index` was given them
        built_by = found.model.get("name")
        model = built_by if isinstance(built_by, str) and built_by else DEFAULT_CLIP_MODEL
        if image_tower is None and isinstance(found.model.get("image_tower"), str):
            image_tower = found.model["image_tower"]
    clip = _load(model, image_tower, device, allow_pickle)
    check_same_image_tower(found, clip, model)
    hits = search_index(clip, found, target, k)
    for hit in hits:
        typer.echo(f"{hit.score:.4f} {hit.path}")
    gone = [hit.path for hit in hits if not hit.path.is_file()]
    if gone:  # the index is older than the folder: say so rather than hand out paths that do not open
        import logging

        logging.getLogger("taiyi").warning(
            "%d of these files no longer exist (e.g. %s); update the index: taiyi clip index %s --out %s",
            len(gone), gone[0], found.root, index,
        )  # fmt: skip
    if html_out is not None:
        atomic_write_bytes(html_out, render_html(query, hits).encode("utf-8"), overwrite=overwrite)
    if grid_out is not None:
        save_png(render_grid(hits), grid_out, overwrite=overwrite)


@clip_app.command("eval")
def evaluate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Metrics JSON file to write.")],
    pairs: Annotated[
        str | None,
        typer.Option("--pairs", help="Image-text set: folder of x.jpg + x.txt, .csv, .jsonl or WebDataset tars."),
    ] = None,
    image_column: Annotated[str, typer.Option("--image-column", help="CSV/JSONL image path column.")] = "image",
    caption_column: Annotated[str, typer.Option("--caption-column", help="CSV/JSONL caption column.")] = "caption",
    imagefolder: Annotated[
        Path | None, typer.Option("--imagefolder", help="Zero-shot set: one subfolder of images per class.")
    ] = None,
    labels_file: Annotated[
        Path | None,
        typer.Option(
            "--labels-file",
            help="Labels for --imagefolder: 'folder<TAB>label' lines, or one label a line in sorted folder order.",
        ),
    ] = None,
    templates_file: TemplatesFile = None,
    batch_size: BatchSize = 32,
    overwrite: Overwrite = False,
    model: Model = DEFAULT_CLIP_MODEL,
    image_tower: ImageTower = None,
    device: Device = "auto",
    allow_pickle: AllowPickle = False,
) -> None:
    """Retrieval R@1/5/10, mean recall and CLIP score (100 × the mean cosine of each caption with its image) on an
    image-text set (--pairs) and/or zero-shot top-1/top-5 on an ImageFolder (--imagefolder + --labels-file), written
    to --out as JSON. Recalls and accuracies are percentages."""
    from .evaluation import embed_pairs, evaluate_zero_shot, list_class_folders, parse_class_labels, retrieval_metrics
    from .io import atomic_write_bytes

    if pairs is None and imagefolder is None:
        raise InvalidInputError(
            "give --pairs DATA (retrieval), --imagefolder DIR --labels-file FILE (zero-shot), or both"
        )
    if (imagefolder is None) != (labels_file is None):
        raise InvalidInputError("--imagefolder and --labels-file go together: one labels the other's class folders")
    if batch_size < 1:
        raise InvalidInputError("--batch-size must be at least 1")
    _check_output(out, overwrite)
    templates = _read_templates(templates_file)
    source = None
    if pairs is not None:
        from .data import open_pairs

        source = open_pairs(pairs, image_column=image_column, caption_column=caption_column)
    if imagefolder is not None:
        folders = list_class_folders(imagefolder)
        labels, folder_to_label = parse_class_labels(_read_lines(labels_file, "labels file"), folders)

    clip = _load(model, image_tower, device, allow_pickle)
    metrics: dict = {"model": {"name": model, "config": clip.config_dict()}}
    if source is not None:
        with _progress("retrieval") as bar:
            image_embeds, text_embeds, text_to_image = embed_pairs(
                clip, source, batch_size=batch_size, progress=lambda n: bar(n, max(n, _length(source)))
            )
        retrieval = retrieval_metrics(image_embeds, text_embeds, text_to_image)
        metrics["retrieval"] = {"source": str(pairs), **retrieval, "skipped": source.skips.total}
        t2i, i2t = retrieval["text_to_image"], retrieval["image_to_text"]
        typer.echo(
            f"retrieval ({retrieval['num_images']} images, {retrieval['num_texts']} texts): "
            f"text→image R@1/5/10 {t2i['R@1']:.1f}/{t2i['R@5']:.1f}/{t2i['R@10']:.1f}, "
            f"image→text {i2t['R@1']:.1f}/{i2t['R@5']:.1f}/{i2t['R@10']:.1f}, "
            f"mean recall {retrieval['mean_recall']:.1f}, CLIP score {retrieval['clip_score']:.1f}"
        )
    if imagefolder is not None:
        with _progress("zero-shot") as bar:
            zero_shot = evaluate_zero_shot(
                clip,
                imagefolder,
                labels,
                folder_to_label,
                templates=templates or clip.templates,
                batch_size=batch_size,
                progress=bar,
            )
        metrics["zero_shot"] = {"source": str(imagefolder), **zero_shot}
        typer.echo(
            f"zero-shot ({zero_shot['num_images']} images, {zero_shot['num_classes']} classes): "
            f"top-1 {zero_shot['top1']:.1f}, top-5 {zero_shot['top5']:.1f}"
            + (f"; {zero_shot['skipped']} unreadable skipped" if zero_shot["skipped"] else "")
        )
    atomic_write_bytes(out, (json.dumps(metrics, ensure_ascii=False, indent=2) + "\n").encode(), overwrite=overwrite)
    typer.echo(f"metrics written to {out}")


def _length(source) -> int:
    try:
        return len(source)
    except TypeError:  # streamed tar shards: unknown until read
        return 0
