"""`taiyi clip score | classify | index | search` end to end on tiny random models, and every bad input."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from taiyi.testing import assert_user_error, make_tiny_clip_image_tower, make_tiny_taiyi_clip_text, run_cli


def run(capsys, *argv) -> tuple[int, str, str]:
    return run_cli(capsys, *argv, device="cpu")  # the reference numbers are CPU ones


def noise(seed: int, size=(40, 48)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("clip-cli-towers")
    return {
        "text": make_tiny_taiyi_clip_text(root / "text", head="logits", dim=16),
        "image": make_tiny_clip_image_tower(root / "image", dim=16),
        "other_image": make_tiny_clip_image_tower(root / "other_image", dim=16, seed=1),
        "image24": make_tiny_clip_image_tower(root / "image24", dim=24),
        "root": root,
    }


@pytest.fixture(scope="module")
def clip(towers):
    from taiyi.clip import load_clip

    return load_clip(towers["text"], image_tower=towers["image"], device="cpu")


@pytest.fixture(scope="module")
def model_dir(clip, towers) -> Path:
    """The same model in taiyi's own folder format: `-m DIR` with no other flag."""
    return clip.save_pretrained(towers["root"] / "own")


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    noise(0).save(path)
    return path


# --- score ---------------------------------------------------------------------------------------------
def test_score(capsys, photo, towers, clip, model_dir):
    texts = ["一只猫", "小桥流水人家，水墨"]
    code, out, err = run(
        capsys, "clip", "score", photo, *texts, "-m", towers["text"], "--image-tower", towers["image"]
    )
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    expected = clip.similarity(Image.open(photo), texts)[0]
    for line, text, sim in zip(lines, texts, expected, strict=True):
        similarity, cosine, shown = line.split(maxsplit=2)
        assert shown == text
        assert float(similarity) == pytest.approx(float(sim), abs=1e-4)
        assert float(cosine) == pytest.approx(float(sim) / clip.scale(), abs=1e-4)
    code, out, _ = run(capsys, "clip", "score", photo, *texts, "-m", model_dir, "--json")
    rows = json.loads(out)
    assert [r["text"] for r in rows] == texts
    assert [r["similarity"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-5)


def test_score_warns_about_a_text_longer_than_the_tower_reads(capsys, photo, model_dir, clip):
    long = "小桥流水人家" * 20  # 120 tokens; the tiny tower reads max_length - 2
    code, out, err = run(capsys, "clip", "score", photo, long, "短", "-m", model_dir)
    assert code == 0 and len(out.splitlines()) == 2
    warnings = [line for line in err.splitlines() if "were dropped" in line]
    window = clip.max_length - 2
    assert warnings == [
        f"taiyi: warning: prompt is 120 tokens but the text encoder reads {window}; the last {120 - window} "
        f"were dropped: '{long[window : window + 40]}…'"  # the dropped end itself (one token per character)
    ]


# --- classify ------------------------------------------------------------------------------------------
def test_classify(capsys, tmp_path, photo, clip, model_dir):
    second = tmp_path / "second.jpg"
    noise(1).save(second)
    labels = ["猫", "狗", "鸟"]
    code, out, err = run(
        capsys, "clip", "classify", photo, second, "--labels", "猫，狗, 鸟", "--top-k", 2, "-m", model_dir
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == str(photo) and lines[3] == str(second) and len(lines) == 6
    probs = clip.zero_shot([Image.open(photo), Image.open(second)], labels)
    for block, row in ((lines[1:3], probs[0]), (lines[4:6], probs[1])):
        top = row.topk(2)
        for line, p, j in zip(block, top.values, top.indices, strict=True):
            assert line.split() == [f"{p:.4f}", labels[j]]

    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("猫\n\n狗\n鸟\n", encoding="utf-8")
    templates = tmp_path / "templates.txt"
    templates.write_text("一张{}的照片。\n", encoding="utf-8")
    argv = ["clip", "classify", photo, "--labels-file", labels_file, "--templates-file", templates, "-m", model_dir]
    code, out, err = run(capsys, *argv, "--top-k", 10, "--json")
    assert code == 0, err
    (result,) = json.loads(out)
    assert result["image"] == str(photo) and len(result["labels"]) == 3  # top-k past the labels: all of them
    assert sum(r["probability"] for r in result["labels"]) == pytest.approx(1.0, abs=1e-5)
    expected = clip.zero_shot(Image.open(photo), labels, templates=["一张{}的照片。"])[0]
    assert {r["label"]: r["probability"] for r in result["labels"]} == pytest.approx(
        dict(zip(labels, expected.tolist(), strict=True))
    )
    probabilities = [r["probability"] for r in result["labels"]]
    assert probabilities == sorted(probabilities, reverse=True)


# --- index and search ------------------------------------------------------------------------------------
@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    noise(1).save(root / "a.png")
    noise(2, (64, 32)).save(root / "b.jpg")
    noise(3).save(root / "sub" / "c.webp")
    noise(4).convert("P").save(root / "sub" / "d.gif")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    noise(5).save(root / ".hidden" / "e.png")
    return root


def read_index(folder: Path) -> tuple[dict, torch.Tensor]:
    return json.loads((folder / "index.json").read_text(encoding="utf-8")), load_file(
        folder / "embeddings.safetensors"
    )["embeddings"]


def test_index_incremental(capsys, tmp_path, photos, clip, model_dir):
    index = tmp_path / "index"
    code, out, err = run(capsys, "clip", "index", photos, "--out", index, "-m", model_dir, "--batch-size", 3)
    assert code == 0, err
    assert (
        out.strip()
        == f"{index}: 4 images (4 embedded, 0 unchanged, 0 removed); 1 unreadable skipped (e.g. broken.jpg)"
    )
    meta, embeds = read_index(index)
    paths = ["a.png", "b.jpg", "sub/c.webp", "sub/d.gif"]
    assert [f["path"] for f in meta["files"]] == paths
    assert [f["size"] for f in meta["files"]] == [(photos / p).stat().st_size for p in paths]
    assert [f["mtime_ns"] for f in meta["files"]] == [(photos / p).stat().st_mtime_ns for p in paths]
    assert meta["root"] == str(photos.resolve()) and meta["dim"] == 16 and embeds.dtype == torch.float32
    assert meta["model"]["name"] == str(model_dir) and meta["model"]["config"] == clip.config_dict()
    expected = clip.encode_image([Image.open(photos / p) for p in paths])
    torch.testing.assert_close(embeds, expected, atol=1e-5, rtol=0)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(index.stat().st_mode) == 0o777 & ~umask  # not a temporary folder's private 0700
    assert {stat.S_IMODE(f.stat().st_mode) for f in index.iterdir()} == {0o666 & ~umask}

    # Nothing changed: nothing embedded.
    code, out, _ = run(capsys, "clip", "index", photos, "--out", index, "-m", model_dir)
    assert code == 0 and "(0 embedded, 4 unchanged, 0 removed)" in out
    # Add one, modify one, delete one, and rewrite one with its size and mtime kept (looks unchanged).
    noise(6).save(photos / "sub" / "new.png")
    noise(7, (64, 32)).save(photos / "b.jpg")
    os.utime(photos / "b.jpg", ns=(1, 10**18))
    (photos / "sub" / "c.webp").unlink()
    before = (photos / "a.png").stat()
    noise(8).save(photos / "a.png")
    assert (photos / "a.png").stat().st_size == before.st_size
    os.utime(photos / "a.png", ns=(before.st_atime_ns, before.st_mtime_ns))
    code, out, _ = run(capsys, "clip", "index", photos, "--out", index, "-m", model_dir)
    assert code == 0 and "4 images (2 embedded, 2 unchanged, 1 removed)" in out
    meta2, embeds2 = read_index(index)
    assert [f["path"] for f in meta2["files"]] == ["a.png", "b.jpg", "sub/d.gif", "sub/new.png"]
    torch.testing.assert_close(embeds2[0], embeds[0], atol=0, rtol=0)  # a.png kept: not re-read
    torch.testing.assert_close(embeds2[2], embeds[3], atol=0, rtol=0)  # d.gif kept
    fresh = clip.encode_image([Image.open(photos / "b.jpg"), Image.open(photos / "sub" / "new.png")])
    torch.testing.assert_close(embeds2[[1, 3]], fresh, atol=1e-5, rtol=0)
    assert meta2["files"][1]["mtime_ns"] == 10**18
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".index")]  # no temporary folders left


def test_search(capsys, tmp_path, photos, clip, model_dir):
    weird = photos / 'x<b>&"y.png'
    noise(9).save(weird)
    index = tmp_path / "index"
    assert run(capsys, "clip", "index", photos, "--out", index, "-m", model_dir)[0] == 0
    meta, embeds = read_index(index)

    code, out, err = run(capsys, "clip", "search", index, "海边的日落", "-k", 3, "-m", model_dir)
    assert code == 0, err
    lines = out.splitlines()
    rows, scores = clip.retrieve("海边的日落", embeds, k=3)
    assert len(lines) == 3
    for line, row, score in zip(lines, rows, scores, strict=True):
        shown, path = line.split(" ", 1)
        assert float(shown) == pytest.approx(score, abs=1e-4)
        assert Path(path) == photos.resolve() / meta["files"][row]["path"] and Path(path).is_file()

    # Image query: an indexed image finds itself first.
    code, out, _ = run(capsys, "clip", "search", index, photos / "b.jpg", "-m", model_dir)
    assert code == 0 and len(out.splitlines()) == 5
    assert out.splitlines()[0] == f"1.0000 {photos.resolve() / 'b.jpg'}"

    # HTML preview: self-contained, paths and query escaped; PNG contact sheet.
    page, grid = tmp_path / "out.html", tmp_path / "grid.png"
    query = "<script>猫</script>"
    code, out, err = run(
        capsys, "clip", "search", index, query, "-k", 5, "--html", page, "--grid", grid, "-m", model_dir
    )
    assert code == 0, err
    assert str(weird.resolve()) in out  # 5 of 5 images: all of them
    text = page.read_text(encoding="utf-8")
    thumbs = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(thumbs) == 5 and all(Image.open(io.BytesIO(base64.b64decode(t))).format == "JPEG" for t in thumbs)
    assert "<script>" not in text and html.escape(query) in text
    assert html.escape(str(weird.resolve())) in text and str(weird.resolve()) not in text
    assert len(re.findall(r'src="', text)) == 5 and "http" not in text
    sheet = Image.open(grid)
    assert sheet.format == "PNG" and sheet.size == (5 * 192, 192 + 18)
    # A file deleted since indexing is still listed; its preview shows a gap instead of failing.
    weird.unlink()
    code, _, err = run(capsys, "clip", "search", index, query, "-k", 5, "--html", page, "--overwrite", "-m", model_dir)
    assert code == 0, err
    assert page.read_text(encoding="utf-8").count("image unavailable") == 1
    # The outputs exist now: refused without --overwrite, replaced with it.
    code, _, err = run(capsys, "clip", "search", index, "猫", "--html", page, "-m", model_dir)
    assert_user_error(code, err, "already exists", "--overwrite")
    code, _, err = run(capsys, "clip", "search", index, "猫", "-k", 1, "--grid", grid, "--overwrite", "-m", model_dir)
    assert code == 0, err
    assert Image.open(grid).size == (192, 192 + 18)


def test_index_refuses_another_image_tower(capsys, tmp_path, photos, towers, model_dir):
    index = tmp_path / "index"
    assert run(capsys, "clip", "index", photos, "--out", index, "-m", model_dir)[0] == 0
    before = (index / "index.json").read_bytes()
    other = ["-m", towers["text"], "--image-tower", towers["other_image"]]
    code, _, err = run(capsys, "clip", "search", index, "猫", *other)
    assert_user_error(code, err, "another image tower", str(model_dir))
    code, _, err = run(capsys, "clip", "index", photos, "--out", index, *other)
    assert_user_error(code, err, "another image tower")
    assert (index / "index.json").read_bytes() == before
    # The same towers loaded from the Taiyi layout are the same model: accepted.
    same = ["-m", towers["text"], "--image-tower", towers["image"]]
    code, out, err = run(capsys, "clip", "search", index, "猫", "-k", 1, *same)
    assert code == 0 and len(out.splitlines()) == 1, err


def test_index_and_search_bad_input(capsys, tmp_path, photos, model_dir):
    index = tmp_path / "index"
    m = ["-m", model_dir]
    # Index: missing folder, --out a file, a non-index folder, no images, only unreadable images.
    a_file = tmp_path / "file"
    a_file.write_text("x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    (broken / "x.png").write_bytes(b"nope")
    for folder, out, needle in [
        (tmp_path / "nope", index, "does not exist"),
        (photos, a_file, "is a file"),
        (photos, busy, "holds no taiyi clip index"),
        (photos, tmp_path / "no" / "index", "does not exist"),
        (empty, index, "no images found"),
        (broken, index, "no readable image"),
        (photos, Path("/sys/index"), "cannot write in /sys"),  # before the pictures are embedded
    ]:
        code, _, err = run(capsys, "clip", "index", folder, "--out", out, *m)
        assert_user_error(code, err, needle)
        assert not index.exists()
    assert (busy / "keep.txt").read_text() == "mine" and a_file.read_text() == "x"
    code, _, err = run(capsys, "clip", "index", photos, "--out", index, "--batch-size", 0, *m)
    assert_user_error(code, err, "--batch-size")

    assert run(capsys, "clip", "index", photos, "--out", index, *m)[0] == 0
    # Another folder into the same index is refused.
    code, _, err = run(capsys, "clip", "index", broken, "--out", index, *m)
    assert_user_error(code, err, "indexes", "choose another --out")

    # Search: k < 1, empty query, missing query image, a query file that is not an image, bad outputs.
    not_image = tmp_path / "fake.jpg"
    not_image.write_text("text")
    for args, needle in [
        (["猫", "-k", 0], "-k must be at least 1"),
        (["  "], "query is empty"),
        (["，。"], "query is empty"),
        ([tmp_path / "gone.png"], "does not exist"),
        ([not_image], "not a readable image"),
        (["猫", "--grid", tmp_path / "grid.jpg"], "must end in .png"),
        (["猫", "--html", tmp_path / "no" / "x.html"], "does not exist"),
    ]:
        code, _, err = run(capsys, "clip", "search", index, *args, *m)
        assert_user_error(code, err, needle)
    assert not (tmp_path / "grid.jpg").exists()

    # Search: a missing index, a folder that is not one, and corrupt ones.
    code, _, err = run(capsys, "clip", "search", tmp_path / "none", "猫", *m)
    assert_user_error(code, err, "does not exist", "taiyi clip index")
    code, _, err = run(capsys, "clip", "search", busy, "猫", *m)
    assert_user_error(code, err, "not a taiyi clip index")
    breakages = {
        "garbled json": lambda d: (d / "index.json").write_text("{not json"),
        "no files key": lambda d: (d / "index.json").write_text(
            json.dumps({k: v for k, v in json.loads((d / "index.json").read_text()).items() if k != "files"})
        ),
        "truncated embeddings": lambda d: (d / "embeddings.safetensors").write_bytes(
            (d / "embeddings.safetensors").read_bytes()[:-10]
        ),
        "missing embeddings": lambda d: (d / "embeddings.safetensors").unlink(),
        "rows mismatch": lambda d: (d / "index.json").write_text(
            json.dumps({**(meta := json.loads((d / "index.json").read_text())), "files": meta["files"][:-1]})
        ),
    }
    for name, breakage in breakages.items():
        copy = shutil.copytree(index, tmp_path / name.replace(" ", "-"))
        breakage(copy)
        code, _, err = run(capsys, "clip", "search", copy, "猫", *m)
        assert_user_error(code, err, "corrupt", "rebuild")
        code, _, err = run(capsys, "clip", "index", photos, "--out", copy, *m)  # index will not overwrite it either
        assert_user_error(code, err, "corrupt")


def test_score_and_classify_bad_input(capsys, tmp_path, photo, towers, model_dir):
    m = ["-m", model_dir]
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    one_line = tmp_path / "one.txt"
    one_line.write_text("猫\n", encoding="utf-8")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n", encoding="utf-8")
    cases = [
        (["score", tmp_path / "missing.png", "猫"], "does not exist"),
        (["score", not_image, "猫"], "not a readable image"),
        (["score", photo, "猫", " "], "text 2 is empty"),
        (["score", photo], "Missing argument"),
        (["score", photo, "猫", "--image-tower", towers["image"]], "drop --image-tower"),
        (["classify", tmp_path / "missing.png", "--labels", "猫,狗"], "does not exist"),
        (["classify", not_image, "--labels", "猫,狗"], "not a readable image"),
        (["classify", photo, "--labels", ""], "empty"),
        (["classify", photo, "--labels", ",，"], "empty"),
        (["classify", photo, "--labels", "猫,,狗"], "empty"),
        (["classify", photo, "--labels", "猫"], "at least two"),
        (["classify", photo, "--labels-file", one_line], "at least two"),
        (["classify", photo, "--labels-file", blank], "is empty"),
        (["classify", photo, "--labels", "猫,猫"], "given twice"),
        (["classify", photo], "exactly one of"),
        (["classify", photo, "--labels", "猫,狗", "--labels-file", one_line], "exactly one of"),
        (["classify", photo, "--labels", "猫,狗", "--top-k", 0], "--top-k must be at least 1"),
        (["classify", photo, "--labels", "猫,狗", "--templates-file", one_line], "has no {}"),
        (["classify", photo, "--labels", "猫,狗", "--device", "warp"], "unknown device"),
    ]
    for args, needle in cases:
        code, _, err = run(capsys, "clip", *args, *m)
        assert_user_error(code, err, needle)
    # Text tower dim 16 with image tower dim 24: one line, before anything is scored.
    mismatched = ["-m", towers["text"], "--image-tower", towers["image24"]]
    for args in (["score", photo, "猫"], ["classify", photo, "--labels", "猫,狗"]):
        code, out, err = run(capsys, "clip", *args, *mismatched)
        assert_user_error(code, err, "16-d features but the image tower 24-d")
        assert out == ""
    code, _, err = run(capsys, "clip", "index", tmp_path, "--out", tmp_path / "i", *mismatched)
    assert_user_error(code, err, "24-d")
    assert not (tmp_path / "i").exists()


# --- an English CLIP (taiyi train clip --new-clip's final/) ---------------------------------------------
@pytest.fixture(scope="module")
def english_dir(tmp_path_factory):
    """A tiny random CLIP with a learned BPE tokenizer, saved as a standard CLIP folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from taiyi.clip import ChineseCLIP
    from taiyi.recipe.tokenizer import train_clip_tokenizer

    root = tmp_path_factory.mktemp("english-clip")
    words = "a photo of a cat dog bird at dawn dusk noon night river lake".split()
    tokenizer = train_clip_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))], root / "tok")
    torch.manual_seed(0)
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    ids = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id, "pad_token_id": 0}
    config = CLIPConfig(
        text_config={**tower, **ids, "vocab_size": len(tokenizer)},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    clip = ChineseCLIP.from_clip_model(CLIPModel(config).eval(), tokenizer, processor)
    return clip.save_pretrained(root / "clip")


def test_score_and_classify_with_an_english_clip(capsys, photo, english_dir):
    from taiyi.clip import load_clip

    clip = load_clip(english_dir, device="cpu")
    texts = ["a cat at dawn", "A dog by the river"]
    code, out, err = run(capsys, "clip", "score", photo, *texts, "-m", english_dir, "--json")
    assert code == 0, err
    expected = clip.similarity(Image.open(photo), texts)[0]
    assert [r["similarity"] for r in json.loads(out)] == pytest.approx(expected.tolist(), abs=1e-5)
    labels = ["cat", "dog", "bird"]
    code, out, err = run(capsys, "clip", "classify", photo, "--labels", "cat, dog, bird", "-m", english_dir, "--json")
    assert code == 0, err
    (result,) = json.loads(out)
    probs = clip.zero_shot(Image.open(photo), labels)[0]  # English templates by default
    assert {r["label"]: r["probability"] for r in result["labels"]} == pytest.approx(
        dict(zip(labels, probs.tolist(), strict=True))
    )
    code, _, err = run(capsys, "clip", "score", photo, "x", "-m", english_dir, "--image-tower", english_dir)
    assert_user_error(code, err, "drop --image-tower")
