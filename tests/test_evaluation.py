"""Retrieval recall and zero-shot accuracy against hand-computed cases, and `taiyi clip eval` end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from taiyi.errors import InvalidInputError
from taiyi.evaluation import (
    check_labels,
    embed_pairs,
    parse_class_labels,
    retrieval_metrics,
    zero_shot_accuracy,
)
from taiyi.testing import assert_user_error, make_tiny_clip_image_tower, make_tiny_taiyi_clip_text, run_cli

# --- retrieval_metrics ---------------------------------------------------------------------------------
# Images are the identity basis, so each text's row below *is* its similarity to images 0, 1, 2.
SIMS = torch.tensor(
    [
        [0.9, 0.1, 0.2],  # text 0, of image 0: rank 0
        [0.1, 0.5, 0.3],  # text 1, of image 0: rank 2
        [0.2, 0.4, 0.6],  # text 2, of image 1: rank 1
        [0.3, 0.2, 0.1],  # text 3, of image 2: rank 2
    ]
)
TEXT_TO_IMAGE = [0, 0, 1, 2]


def run(capsys, *argv) -> tuple[int, str, str]:
    return run_cli(capsys, *argv, device="cpu")  # the reference numbers are CPU ones


def test_retrieval_hand_computed():
    m = retrieval_metrics(torch.eye(3), SIMS, TEXT_TO_IMAGE, ks=(1, 2, 3))
    # text→image ranks 0, 2, 1, 2
    assert m["text_to_image"] == pytest.approx({"R@1": 25.0, "R@2": 50.0, "R@3": 100.0, "mean_recall": 175 / 3})
    # image→text: image 0's best caption (text 0, 0.9) is first; image 1's only caption (0.4) is beaten by
    # text 1 (0.5); image 2's caption (0.1) by texts 0, 1, 2 — ranks 0, 1, 3.
    i2t = m["image_to_text"]
    assert i2t == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 200 / 3, "mean_recall": 500 / 9})
    assert m["mean_recall"] == pytest.approx((25 + 50 + 100 + 100 / 3 + 200 / 3 + 200 / 3) / 6)
    assert (m["num_images"], m["num_texts"]) == (3, 4)
    default = retrieval_metrics(torch.eye(3), SIMS, TEXT_TO_IMAGE)
    assert set(default["text_to_image"]) == {"R@1", "R@5", "R@10", "mean_recall"}
    assert default["text_to_image"]["R@1"] == 25.0 and default["text_to_image"]["R@5"] == 100.0


def _reference(image_embeds, text_embeds, text_to_image, k):
    """Sort-based recall, the way open_clip computes it (no ties in random data)."""
    sims = text_embeds @ image_embeds.T
    t2i = np.mean([t in sims[j].argsort(descending=True)[:k].tolist() for j, t in enumerate(text_to_image)])
    hits = []
    for i in range(image_embeds.shape[0]):
        captions = {j for j, t in enumerate(text_to_image) if t == i}
        if captions:
            hits.append(bool(captions & set(sims[:, i].argsort(descending=True)[:k].tolist())))
    return 100 * t2i, 100 * np.mean(hits)


def test_retrieval_matches_a_sort_based_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    text_to_image = [i // 2 for i in range(50)] + [27, 3, 3]  # images 25..29 mostly uncaptioned: distractors
    texts = torch.nn.functional.normalize(images[text_to_image] + 0.8 * torch.randn(53, 8, generator=g), dim=-1)
    m = retrieval_metrics(images, texts, text_to_image)
    for k in (1, 5, 10):
        t2i, i2t = _reference(images, texts, text_to_image, k)
        assert m["text_to_image"][f"R@{k}"] == pytest.approx(t2i)
        assert m["image_to_text"][f"R@{k}"] == pytest.approx(i2t)
    assert 0 < m["text_to_image"]["R@1"] < m["text_to_image"]["R@10"] < 100


def test_ties_count_against_the_model():
    m = retrieval_metrics(torch.ones(4, 2), torch.ones(4, 2), [0, 1, 2, 3])
    assert m["text_to_image"]["R@1"] == 0 and m["image_to_text"]["R@1"] == 0
    assert m["text_to_image"]["R@5"] == 100  # 3 others tie: rank 3 < 5
    assert zero_shot_accuracy(torch.full((2, 3), 1 / 3), [0, 2])["top1"] == 0


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.eye(3), torch.ones(4, 2), TEXT_TO_IMAGE), "same D"),
        ((torch.eye(3), SIMS, [0, 0, 1]), "3 entries for 4 texts"),
        ((torch.eye(3), SIMS, [0, 0, 1, 3]), "outside 0..2"),
        ((torch.eye(3)[:0], SIMS[:0], []), "at least one image"),
    ],
)
def test_retrieval_bad_input(args, match):
    with pytest.raises(InvalidInputError, match=match):
        retrieval_metrics(*args)


def test_zero_shot_accuracy_hand_computed():
    probs = torch.tensor(
        [
            [0.50, 0.10, 0.10, 0.10, 0.10, 0.10],  # target 0: first
            [0.30, 0.35, 0.05, 0.10, 0.10, 0.10],  # target 0: second
            [0.30, 0.25, 0.20, 0.15, 0.09, 0.01],  # target 5: last
        ]
    )
    assert zero_shot_accuracy(probs, [0, 0, 5]) == pytest.approx({"top1": 100 / 3, "top5": 200 / 3})
    assert zero_shot_accuracy(probs, torch.tensor([0, 1, 0])) == pytest.approx({"top1": 100.0, "top5": 100.0})
    with pytest.raises(InvalidInputError, match="2 targets for 3 rows"):
        zero_shot_accuracy(probs, [0, 1])
    with pytest.raises(InvalidInputError, match="outside the 6 classes"):
        zero_shot_accuracy(probs, [0, 1, 6])


def test_class_labels_files():
    folders = ["cat", "dog"]
    assert parse_class_labels(["猫", "狗"], folders) == (["猫", "狗"], {"cat": 0, "dog": 1})
    # Tab form: any order; a line without a folder is an extra candidate label.
    labels, mapping = parse_class_labels(["dog\t狗", "bird\t鸟", "cat\t猫"], folders)
    assert labels == ["狗", "鸟", "猫"] and mapping == {"cat": 2, "dog": 0}
    for lines, match in [
        (["猫"], "1 labels for 2 class folders"),
        (["cat\t猫", "狗"], "mixes"),
        (["cat\t猫", "bird\t鸟"], "no label for class folder 'dog'"),
        (["cat\t猫", "cat\t狗", "dog\t狗"], "names folder 'cat' twice"),
        (["猫", "猫"], "given twice"),
    ]:
        with pytest.raises(InvalidInputError, match=match):
            parse_class_labels(lines, folders)
    with pytest.raises(InvalidInputError, match="at least two"):
        check_labels(["猫"])
    with pytest.raises(InvalidInputError, match="empty"):
        check_labels(["猫", " "])


# --- with a model ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    from taiyi.clip import load_clip

    root = tmp_path_factory.mktemp("eval-model")
    text = make_tiny_taiyi_clip_text(root / "text", head="pooler", dim=16)
    image = make_tiny_clip_image_tower(root / "image", dim=16)
    return load_clip(text, image_tower=image, device="cpu").save_pretrained(root / "clip")


@pytest.fixture(scope="module")
def clip(clip_folder):
    from taiyi.clip import load_clip

    return load_clip(clip_folder, device="cpu")


def noise(seed: int, size=(40, 40)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))


def test_embed_pairs_groups_captions_by_image(clip):
    a, b = noise(1), noise(2)
    pairs = [
        SimpleNamespace(key="0", image=a, caption="一只猫"),
        SimpleNamespace(key="1", image=b, caption="一只狗"),
        SimpleNamespace(key="2", image=a.copy(), caption="睡觉的猫"),  # CSV rows repeat an image: new key
    ]
    image_embeds, text_embeds, text_to_image = embed_pairs(clip, pairs, batch_size=1)
    assert image_embeds.shape == (2, 16) and text_embeds.shape == (3, 16) and text_to_image == [0, 1, 0]
    torch.testing.assert_close(image_embeds, clip.encode_image([a, b]), atol=1e-6, rtol=0)
    torch.testing.assert_close(text_embeds, clip.encode_text(["一只猫", "一只狗", "睡觉的猫"]), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval-data")
    # Image-text set: a CSV with two captions for one image, a corrupt image row, and a folder layout.
    (root / "img").mkdir()
    captions = {"a.png": ["一只猫", "睡觉的猫"], "b.png": ["一只狗"], "c.png": ["海边的日落"], "d.png": ["山水画"]}
    for i, name in enumerate(captions):
        noise(10 + i).save(root / "img" / name)
    (root / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [(name, c) for name, caps in captions.items() for c in caps] + [("broken.png", "坏图")]
    (root / "pairs.csv").write_text("image,caption\n" + "".join(f"img/{n},{c}\n" for n, c in rows), encoding="utf-8")
    # ImageFolder: 3 classes, 2 images each, one unreadable file.
    for c, cls in enumerate(["bird", "cat", "dog"]):
        (root / "zs" / cls).mkdir(parents=True)
        for j in range(2):
            noise(100 + 10 * c + j, (32, 48)).save(root / "zs" / cls / f"{j}.jpg")
    (root / "zs" / "dog" / "bad.jpg").write_bytes(b"")
    (root / "labels.txt").write_text("鸟\n猫\n狗\n", encoding="utf-8")
    (root / "labels_tab.txt").write_text("cat\t猫\ndog\t狗\nbird\t鸟\n", encoding="utf-8")
    return {"root": root, "captions": captions}


def test_eval_cli_retrieval_and_zero_shot(capsys, tmp_path, clip_folder, clip, eval_data):
    root = eval_data["root"]
    out = tmp_path / "metrics.json"
    code, stdout, err = run(
        capsys,
        "clip", "eval", "-m", clip_folder, "--pairs", root / "pairs.csv",
        "--imagefolder", root / "zs", "--labels-file", root / "labels.txt", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads(out.read_text(encoding="utf-8"))
    assert metrics["model"]["name"] == str(clip_folder) and metrics["model"]["config"]["text_head"] == "pooler"

    # Retrieval equals retrieval_metrics on the model's own embeddings, captions grouped per image.
    retrieval = metrics["retrieval"]
    names = list(eval_data["captions"])
    images = [Image.open(root / "img" / n).convert("RGB") for n in names]
    texts = [c for n in names for c in eval_data["captions"][n]]
    expected = retrieval_metrics(clip.encode_image(images), clip.encode_text(texts), [0, 0, 1, 2, 3])
    assert (retrieval["num_images"], retrieval["num_texts"], retrieval["skipped"]) == (4, 5, 1)
    for direction in ("text_to_image", "image_to_text"):
        assert retrieval[direction] == pytest.approx(expected[direction])
    assert retrieval["mean_recall"] == pytest.approx(expected["mean_recall"])

    # Zero-shot equals zero_shot_accuracy on the model's probabilities; the empty file is skipped.
    zs = metrics["zero_shot"]
    assert (zs["num_images"], zs["num_classes"], zs["skipped"]) == (6, 3, 1)
    files = sorted((root / "zs").glob("*/[01].jpg"))
    probs = clip.zero_shot([Image.open(f) for f in files], ["鸟", "猫", "狗"])
    assert {k: zs[k] for k in ("top1", "top5")} == pytest.approx(zero_shot_accuracy(probs, [0, 0, 1, 1, 2, 2]))
    assert zs["top5"] == 100.0
    assert "retrieval (4 images, 5 texts)" in stdout and "zero-shot (6 images, 3 classes)" in stdout

    # The tab form of the labels file, a custom template, zero-shot only; --overwrite replaces.
    templates = tmp_path / "templates.txt"
    templates.write_text("一张{}的照片。\n\n{}的图片\n", encoding="utf-8")
    argv = ["clip", "eval", "-m", clip_folder, "--imagefolder", root / "zs", "--labels-file", root / "labels_tab.txt"]
    argv += ["--templates-file", templates, "--out", out, "--overwrite"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    again = json.loads(out.read_text(encoding="utf-8"))
    assert "retrieval" not in again
    probs = clip.zero_shot(
        [Image.open(f) for f in files], ["猫", "狗", "鸟"], templates=["一张{}的照片。", "{}的图片"]
    )
    expected = zero_shot_accuracy(probs, [2, 2, 0, 0, 1, 1])
    assert {k: again["zero_shot"][k] for k in ("top1", "top5")} == pytest.approx(expected)


def test_eval_cli_folder_pairs(capsys, tmp_path, clip_folder):
    data = tmp_path / "pairs"
    data.mkdir()
    for i, caption in enumerate(["一只猫", "一只狗", "一只鸟"]):
        noise(200 + i).save(data / f"{i}.jpg")
        (data / f"{i}.txt").write_text(caption, encoding="utf-8")
    out = tmp_path / "m.json"
    code, stdout, err = run(capsys, "clip", "eval", "-m", clip_folder, "--pairs", data, "--out", out)
    assert code == 0, err
    retrieval = json.loads(out.read_text())["retrieval"]
    assert (retrieval["num_images"], retrieval["num_texts"]) == (3, 3)
    assert retrieval["text_to_image"]["R@5"] == 100.0  # 3 images: everything is in the top 5
    assert stdout.strip().endswith(f"metrics written to {out}")


def test_eval_cli_bad_input(capsys, tmp_path, clip_folder, eval_data):
    root = eval_data["root"]
    out = tmp_path / "m.json"
    base = ["clip", "eval", "-m", clip_folder]
    zs = ["--imagefolder", root / "zs"]
    one_label = tmp_path / "one.txt"
    one_label.write_text("猫\n", encoding="utf-8")
    no_braces = tmp_path / "t.txt"
    no_braces.write_text("一张照片\n", encoding="utf-8")
    cases = [
        (["--out", out], "give --pairs"),
        ([*zs, "--out", out], "go together"),
        (["--pairs", root / "pairs.csv", "--labels-file", root / "labels.txt", "--out", out], "go together"),
        ([*zs, "--labels-file", one_label, "--out", out], "1 labels for 3 class folders"),
        ([*zs, "--labels-file", tmp_path / "nope.txt", "--out", out], "does not exist"),
        ([*zs, "--labels-file", root / "labels.txt", "--templates-file", no_braces, "--out", out], "has no {}"),
        (["--pairs", tmp_path / "missing.csv", "--out", out], "does not exist"),
        (["--pairs", root / "pairs.csv", "--caption-column", "text", "--out", out], "text"),
        (["--imagefolder", root / "img", "--labels-file", root / "labels.txt", "--out", out], "class folders"),
        (["--pairs", root / "pairs.csv", "--out", tmp_path / "no-dir" / "m.json"], "does not exist"),
        (["--pairs", root / "pairs.csv", "--out", tmp_path], "is a folder"),
        (["--pairs", root / "pairs.csv", "--out", "/sys/m.json"], "cannot write in /sys"),  # not after the eval
        (["--pairs", root / "pairs.csv", "--batch-size", "0", "--out", out], "--batch-size"),
    ]
    for args, needle in cases:
        code, _, err = run(capsys, *base, *args)
        assert_user_error(code, err, needle)
        assert not out.exists()
    out.write_text("{}")
    code, _, err = run(capsys, *base, "--pairs", root / "pairs.csv", "--out", out)
    assert_user_error(code, err, "already exists", "--overwrite")
    assert out.read_text() == "{}"
