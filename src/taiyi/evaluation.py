"""Retrieval recall and zero-shot accuracy, as plain functions on embedding / probability tensors.

Figures are percentages (0–100), as the published Taiyi and Chinese-CLIP tables give them (TAIYI.md §4).
"Mean recall" is the mean of R@1, R@5 and R@10 for one direction; the overall ``mean_recall`` is the
mean of the six recalls of both directions. The CLIP score is 100 × the mean cosine of each text with its
own image (as ``taiyi eval disco`` reports it; torchmetrics' ``clip_score`` also clips each cosine at 0).

Ties count against the model: an item's rank is the number of *other* candidates scoring at least as
high as it, so a collapsed model that gives every candidate the same score gets 0 %, not 100 %.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from .errors import InvalidInputError

RECALL_KS: tuple[int, ...] = (1, 5, 10)


def _recalls(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """R@k (percent) for 0-based ranks (n,), plus their mean as ``mean_recall``."""
    out = {f"R@{k}": 100.0 * float((ranks < k).float().mean()) for k in ks}
    out["mean_recall"] = sum(out.values()) / len(ks)
    return out


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: Sequence[int],
    *,
    ks: Sequence[int] = RECALL_KS,
) -> dict:
    """Text→image and image→text recall at ``ks`` on an image-text set.

    Args:
        image_embeds: normalised image embeddings (N, D).
        text_embeds: normalised text embeddings (M, D); several texts may describe one image.
        text_to_image: for each text, the row of its image in ``image_embeds`` (length M).
        ks: the recall cut-offs.

    Returns:
        ``{"text_to_image": {"R@1", "R@5", "R@10", "mean_recall"}, "image_to_text": {...}, "mean_recall",
        "clip_score", "num_images", "num_texts"}``. Text→image: a text hits at k when its image is in its top k.
        Image→text: an image hits at k when any of its captions is in its top k; images without a
        caption take part only as text→image distractors.
    """
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise InvalidInputError(
            f"image embeddings {tuple(image_embeds.shape)} and text embeddings {tuple(text_embeds.shape)} "
            "must be (N, D) and (M, D) with the same D"
        )
    n_images, n_texts = image_embeds.shape[0], text_embeds.shape[0]
    if n_images == 0 or n_texts == 0:
        raise InvalidInputError("retrieval needs at least one image and one text")
    if len(text_to_image) != n_texts:
        raise InvalidInputError(f"text_to_image has {len(text_to_image)} entries for {n_texts} texts")
    target = torch.as_tensor(list(text_to_image), dtype=torch.long)
    if bool((target < 0).any()) or bool((target >= n_images).any()):
        raise InvalidInputError(f"text_to_image holds an image index outside 0..{n_images - 1}")
    if any(k < 1 for k in ks):
        raise InvalidInputError("recall cut-offs must be at least 1")

    sims = text_embeds.float() @ image_embeds.float().T  # (M, N)
    texts = torch.arange(n_texts)

    # Text→image: other images scoring at least as high as the right one.
    right = sims[texts, target]  # (M,)
    t2i_ranks = (sims >= right[:, None]).sum(1) - 1  # (M,)

    # Image→text: the best-placed caption of each image; other texts scoring at least as high as it.
    is_caption = torch.zeros(n_images, n_texts, dtype=torch.bool)  # (N, M)
    is_caption[target, texts] = True
    per_image = sims.T  # (N, M)
    best = per_image.masked_fill(~is_caption, float("-inf")).max(1).values  # (N,)
    captioned = is_caption.any(1)
    i2t_ranks = ((per_image >= best[:, None]) & ~is_caption).sum(1)[captioned]

    t2i, i2t = _recalls(t2i_ranks, ks), _recalls(i2t_ranks, ks)
    recalls = [t2i[f"R@{k}"] for k in ks] + [i2t[f"R@{k}"] for k in ks]
    return {
        "text_to_image": t2i,
        "image_to_text": i2t,
        "mean_recall": sum(recalls) / len(recalls),
        "clip_score": 100.0 * float(right.mean()),
        "num_images": n_images,
        "num_texts": n_texts,
    }


def zero_shot_accuracy(probs: torch.Tensor, targets: torch.Tensor | Sequence[int]) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of class scores against the true classes.

    Args:
        probs: class probabilities or logits (N, L); only their order matters.
        targets: the true class of each row (N,).

    Returns:
        ``{"top1": ..., "top5": ...}``. With fewer than 5 classes, top-5 counts every class (100 %).
        Ties count against the model, as in :func:`retrieval_metrics`.
    """
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise InvalidInputError(f"class scores must be a non-empty (N, L) tensor, not {tuple(probs.shape)}")
    target = torch.as_tensor(list(targets) if not isinstance(targets, torch.Tensor) else targets, dtype=torch.long)
    if target.shape != (probs.shape[0],):
        raise InvalidInputError(f"{target.numel()} targets for {probs.shape[0]} rows of class scores")
    if bool((target < 0).any()) or bool((target >= probs.shape[1]).any()):
        raise InvalidInputError(f"a target lies outside the {probs.shape[1]} classes")
    scores = probs.float()
    right = scores[torch.arange(len(target)), target]  # (N,)
    ranks = (scores >= right[:, None]).sum(1) - 1  # (N,)
    return {"top1": 100.0 * float((ranks < 1).float().mean()), "top5": 100.0 * float((ranks < 5).float().mean())}


# --- running a model over data sets --------------------------------------------------------------------
def embed_pairs(
    model, pairs: Iterable, *, batch_size: int = 32, progress: Callable[[int], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Embed an image-text set, grouping the captions of each image.

    Pairs with the same ``image_id`` (CSV/JSONL rows naming one image file) are one image with several
    captions; pairs without one are grouped by their pixels.

    Args:
        model: a :class:`taiyi.clip.ChineseCLIP`.
        pairs: objects with ``.image`` (PIL) and ``.caption`` (e.g. ``taiyi.data.open_pairs(...)``).
        batch_size: images per forward pass.
        progress: called with the number of pairs read so far, after each batch.

    Returns:
        ``(image_embeds (N, D), text_embeds (M, D), text_to_image)`` for :func:`retrieval_metrics`.
    """
    rows: dict[tuple[str, object], int] = {}
    pending: list = []
    image_chunks: list[torch.Tensor] = []
    captions: list[str] = []
    text_to_image: list[int] = []
    n_pairs = 0

    def flush() -> None:
        if pending:
            image_chunks.append(model.encode_image(pending, batch_size=batch_size))  # (B, D)
            pending.clear()

    for pair in pairs:
        image = pair.image
        image_id = getattr(pair, "image_id", "")
        if image_id:  # "./a.png" and "a.png" in a CSV are one image, not a copy competing with itself
            key = ("id", os.path.normpath(image_id))
        else:
            digest = hashlib.blake2b(image.tobytes(), digest_size=16)
            digest.update(f"{image.mode}{image.size}".encode())
            key = ("pixels", digest.digest())
        row = rows.get(key)
        if row is None:  # a new image: its row is the next one to be embedded
            row = rows[key] = len(rows)
            pending.append(image)
        captions.append(pair.caption)
        text_to_image.append(row)
        n_pairs += 1
        if len(pending) >= batch_size:
            flush()
            if progress is not None:
                progress(n_pairs)
    flush()
    if not captions:
        raise InvalidInputError("the image-text set holds no readable pair")
    text_embeds = model.encode_text(captions, batch_size=max(batch_size, 64), warn_long=False)  # (M, D)
    return torch.cat(image_chunks), text_embeds, text_to_image


def parse_class_labels(lines: Sequence[str], class_folders: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """Read an ImageFolder labels file: either ``folder<TAB>label`` on every line, or one label a line.

    With tabs, each class folder must be named and every line's label is a candidate (lines naming
    no folder are extra labels the images compete against). Without tabs, there must be exactly one label
    per class folder, in the folders' sorted order.

    Args:
        lines: the file's non-blank lines.
        class_folders: the class folder names, sorted.

    Returns:
        ``(labels, folder → index of its label)``.
    """
    tabbed = ["\t" in line for line in lines]
    if any(tabbed) and not all(tabbed):
        raise InvalidInputError("labels file mixes 'folder<TAB>label' lines with plain label lines; use one form")
    if all(tabbed) and lines:
        pairs = [tuple(part.strip() for part in line.split("\t", 1)) for line in lines]
        folders = [folder for folder, _ in pairs]
        labels = [label for _, label in pairs]
        repeated = next((f for f in folders if folders.count(f) > 1), None)
        if repeated is not None:
            raise InvalidInputError(f"labels file names folder {repeated!r} twice")
        missing = [f for f in class_folders if f not in folders]
        if missing:
            raise InvalidInputError(f"labels file has no label for class folder {missing[0]!r}")
    else:
        labels = [line.strip() for line in lines]
        if len(labels) != len(class_folders):
            raise InvalidInputError(
                f"labels file has {len(labels)} labels for {len(class_folders)} class folders; give one label a line "
                "in sorted folder order, or 'folder<TAB>label' lines"
            )
        folders = list(class_folders)
    check_labels(labels)
    return labels, {folder: folders.index(folder) for folder in class_folders}


def check_labels(labels: Sequence[str]) -> list[str]:
    """Zero-shot labels must be at least two, none empty, none repeated."""
    from .prompts import require_text

    labels = list(labels)
    for i, label in enumerate(labels, 1):
        require_text(label, f"label {i}")
    if any(not label.strip() for label in labels):
        raise InvalidInputError("a label is empty; give each class a Chinese name, e.g. 猫,狗")
    if len(labels) < 2:
        raise InvalidInputError(
            f"{len(labels)} label{'' if len(labels) == 1 else 's'} given; zero-shot classification needs at least two"
        )
    repeated = next((label for label in labels if labels.count(label) > 1), None)
    if repeated is not None:
        raise InvalidInputError(f"label {repeated!r} is given twice")
    return labels


def list_class_folders(root: str | os.PathLike) -> list[str]:
    """The class folders of an ImageFolder (sorted, hidden ones skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidInputError(
            f"ImageFolder {root} does not exist" if not root.exists() else f"{root} is not a folder"
        )
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise InvalidInputError(
            f"ImageFolder {root} has {len(folders)} class folders; it needs one per class, two or more"
        )
    return folders


def evaluate_zero_shot(
    model,
    root: str | os.PathLike,
    labels: Sequence[str],
    folder_to_label: dict[str, int],
    *,
    templates: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Zero-shot top-1/top-5 on an ImageFolder (one subfolder of images per class).

    Args:
        model: a :class:`taiyi.clip.ChineseCLIP`.
        root: the ImageFolder.
        labels, folder_to_label: from :func:`parse_class_labels`.
        templates: prompt templates (default: the model's own — Chinese, or English for a CLIP text tower).

    Returns:
        ``{"top1", "top5", "num_images", "num_classes", "skipped"}``; unreadable images are skipped and counted.
    """
    from .clip import ZH_TEMPLATES
    from .clip_index import find_images
    from .io import load_image

    root = Path(root)
    files = [
        (root / folder / rel, label) for folder, label in folder_to_label.items() for rel in find_images(root / folder)
    ]
    if not files:
        raise InvalidInputError(f"ImageFolder {root} holds no images in its class folders")
    default = getattr(model, "templates", ZH_TEMPLATES)
    class_embeds = model.label_embeddings(labels, templates or default)  # (L, D)
    chunks, targets, skipped = [], [], 0
    for start in range(0, len(files), batch_size):
        images = []
        for path, label in files[start : start + batch_size]:
            try:
                images.append(load_image(path))
            except InvalidInputError:
                skipped += 1
                continue
            targets.append(label)
        if images:
            chunks.append(model.encode_image(images, batch_size=batch_size) @ class_embeds.T)  # (B, L)
        if progress is not None:
            progress(min(start + batch_size, len(files)), len(files))
    if not chunks:
        raise InvalidInputError(f"ImageFolder {root} holds no readable image")
    accuracy = zero_shot_accuracy(torch.cat(chunks), targets)
    return {**accuracy, "num_images": len(targets), "num_classes": len(labels), "skipped": skipped}


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D): the FID formula
    ``|μa − μb|² + Tr(Σa + Σb − 2 (Σa Σb)^½)``, on whatever features are given (taiyi's ``eval fd`` gives CLIP
    image embeddings; FID proper uses Inception-v3 pool features, whose weights are a download).

    Raises:
        InvalidInputError: a set of fewer than two rows, or sets of different widths.
    """
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise InvalidInputError(
            f"features {tuple(features_a.shape)} and {tuple(features_b.shape)} must be (N, D) and (M, D)"
        )
    if min(features_a.shape[0], features_b.shape[0]) < 2:
        raise InvalidInputError("a Fréchet distance needs at least two pictures in each set")
    a, b = features_a.double(), features_b.double()
    return frechet_distance_from_stats(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def frechet_distance_from_stats(
    mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor, sigma_b: torch.Tensor
) -> float:
    """The Fréchet distance of N(μa, Σa) and N(μb, Σb).

    ``Tr((Σa Σb)^½)`` is taken as ``Tr((A Σb A)^½)`` with ``A = Σa^½``: the same eigenvalues, from symmetric
    matrices only (``eigh``), so no complex square root and no SciPy.
    """
    mu_a, mu_b, sigma_a, sigma_b = (t.double() for t in (mu_a, mu_b, sigma_a, sigma_b))
    values, vectors = torch.linalg.eigh(sigma_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T  # Σa^½
    middle = root_a @ sigma_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + sigma_a.trace() + sigma_b.trace() - 2 * cross
    return max(float(distance), 0.0)  # rounding can leave a set against itself a hair below 0
