"""`taiyi data filter` and `taiyi data shanshui` on tiny random models and the synthetic 山水 set.

What is proven here: a threshold keeps exactly the pairs whose CLIP cosine reaches it (checked against
scores computed pair by pair), the manifest reloads with open_pairs from any folder (image paths are
relative to it), corrupt images are skipped and counted, the histogram marks the threshold, and bad
input (threshold, empty data, existing output) is one line and exit 2 with nothing written.
"""

from __future__ import annotations

import csv
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taiyi.data import open_pairs
from taiyi.data.filter import filter_pairs
from taiyi.data.shanshui import write_folder
from taiyi.errors import InvalidInputError, OutputError
from taiyi.testing import make_tiny_clip_image_tower, make_tiny_taiyi_clip_text
from taiyi.testing import run_cli as run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("filter-towers")
    return {
        "text": make_tiny_taiyi_clip_text(root / "text", head="logits", dim=16),
        "image": make_tiny_clip_image_tower(root / "image", dim=16),
    }


@pytest.fixture(scope="module")
def clip(towers):
    from taiyi.clip import load_clip

    return load_clip(towers["text"], image_tower=towers["image"], device="cpu")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """10 山水 pairs (mixed captions) and one whose image is corrupt."""
    folder = write_folder(tmp_path_factory.mktemp("filter-data") / "pairs", 10, seed=3, size=32, captions="all")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (folder / "broken.txt").write_text("坏掉的图片", encoding="utf-8")
    return folder


def expected_scores(clip, folder: Path) -> dict[str, float]:
    """Each readable pair's cosine, computed one pair at a time: {caption: score}."""
    out = {}
    for pair in open_pairs(folder):
        out[pair.caption] = float(clip.encode_image(pair.image)[0] @ clip.encode_text(pair.caption)[0])
    return out


def test_threshold_keeps_exactly_the_pairs_at_or_above_it(clip, pairs, tmp_path):
    scores = expected_scores(clip, pairs)
    assert len(scores) == 10 and len(set(np.round(list(scores.values()), 4))) > 5  # the scores really differ
    threshold = float(np.median(list(scores.values())))
    out = tmp_path / "elsewhere" / "kept.jsonl"
    out.parent.mkdir()
    report = filter_pairs(
        clip, pairs, out, threshold=threshold, histogram=tmp_path / "hist.png", batch_size=3
    )  # batches of 3: one batch is split by the corrupt sample
    wanted = {c for c, s in scores.items() if s >= threshold}
    assert report.kept == len(wanted) and report.dropped == 10 - len(wanted)
    assert report.skipped == {"corrupt image": 1}
    assert sorted(report.scores) == pytest.approx(sorted(scores.values()), abs=1e-5)

    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert {r["caption"] for r in rows} == wanted
    for row in rows:
        assert row["score"] >= threshold and row["score"] == pytest.approx(scores[row["caption"]], abs=1e-5)
        assert not Path(row["image"]).is_absolute()
    # The manifest is a data source as it stands: same captions, same pixels.
    reread = {p.caption: p for p in open_pairs(out)}
    assert set(reread) == wanted
    originals = {p.caption: p for p in open_pairs(pairs)}
    for caption, pair in reread.items():
        assert np.array_equal(np.asarray(pair.image), np.asarray(originals[caption].image))

    hist = Image.open(tmp_path / "hist.png").convert("RGB")
    assert hist.size == (640, 400)
    colours = {c for _, c in hist.getcolors(maxcolors=1 << 16)}
    assert (220, 30, 30) in colours and (70, 160, 90) in colours and (170, 170, 170) in colours


def test_csv_source_paths_resolve_from_the_manifest_folder(clip, pairs, tmp_path):
    table = tmp_path / "table"
    table.mkdir()
    images = sorted(p for p in pairs.glob("0*.png"))[:4]
    with (table / "pairs.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "text"])
        for image in images:
            shutil.copy(image, table / image.name)
            writer.writerow([image.name, image.with_suffix(".txt").read_text(encoding="utf-8")])
    out = tmp_path / "deep" / "er" / "all.jsonl"
    out.parent.mkdir(parents=True)
    report = filter_pairs(clip, table / "pairs.csv", out, threshold=-1.0, image_column="name", caption_column="text")
    assert report.kept == 4 and report.dropped == 0 and report.skipped == {}
    assert [p.image.size for p in open_pairs(out)] == [(32, 32)] * 4
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[0])["image"] == "../../table/" + images[0].name


def test_filter_refuses_bad_input_before_writing(clip, pairs, tmp_path):
    out = tmp_path / "kept.jsonl"
    for threshold in (1.5, float("nan"), -2):
        with pytest.raises(InvalidInputError, match="--threshold"):
            filter_pairs(clip, pairs, out, threshold=threshold)
    with pytest.raises(OutputError, match=".jsonl"):
        filter_pairs(clip, pairs, tmp_path / "kept.csv", threshold=0.1)
    corrupt_only = tmp_path / "corrupt"
    corrupt_only.mkdir()
    shutil.copy(pairs / "broken.png", corrupt_only), shutil.copy(pairs / "broken.txt", corrupt_only)
    with pytest.raises(InvalidInputError, match="no readable image-text pair.*corrupt image"):
        filter_pairs(clip, corrupt_only, out, threshold=0.1)
    assert list(tmp_path.glob("*.jsonl")) == [] and list(tmp_path.glob(".*")) == []


def test_cli_filters_and_prints_a_summary(towers, pairs, tmp_path, capsys):
    out, hist = tmp_path / "kept.jsonl", tmp_path / "hist.png"
    base = ["data", "filter", "--data", pairs, "--clip", towers["text"], "--image-tower", towers["image"]]
    base += ["--device", "cpu"]
    code, stdout, err = run(capsys, *base, "--threshold", "-1", "--out", out, "--histogram", hist)
    assert code == 0, err
    assert "kept 10 of 10 scored pairs" in stdout and "dropped 0" in stdout and "1 corrupt image" in stdout
    assert len(out.read_text(encoding="utf-8").splitlines()) == 10 and hist.is_file()
    # A threshold nothing reaches: an empty manifest and a warning saying what to do.
    code, stdout, err = run(capsys, *base, "--threshold", "1", "--out", tmp_path / "none.jsonl")
    assert code == 0 and "kept 0 of 10" in stdout and "lower --threshold" in err
    assert (tmp_path / "none.jsonl").read_text() == ""


def test_cli_bad_input_is_one_line_and_exit_2(towers, pairs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "exists.jsonl").write_text("keep me\n")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        tar.add(pairs / "000000.png", arcname="000000.png"), tar.add(pairs / "000000.txt", arcname="000000.txt")
    base = ["data", "filter", "--clip", towers["text"], "--image-tower", towers["image"], "--device", "cpu"]
    cases = [
        (["--data", pairs, "--threshold", "2", "--out", tmp_path / "a.jsonl"], "--threshold"),
        (["--data", tmp_path / "empty", "--threshold", "0.2", "--out", tmp_path / "a.jsonl"], "no image"),
        (["--data", tmp_path / "missing", "--threshold", "0.2", "--out", tmp_path / "a.jsonl"], "does not exist"),
        (["--data", pairs, "--threshold", "0.2", "--out", tmp_path / "exists.jsonl"], "--overwrite"),
        (["--data", pairs, "--threshold", "0.2", "--out", tmp_path / "a.jsonl", "--batch-size", "0"], "--batch-size"),
        (["--data", pairs, "--threshold", "0.2", "--out", tmp_path / "a.jsonl", "--histogram", "h.jpg"], ".png"),
        (["--data", tmp_path / "shard.tar", "--threshold", "0.2", "--out", tmp_path / "a.jsonl"], "tar shards"),
    ]
    for extra, needle in cases:
        code, _, err = run(capsys, *base, *extra)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("taiyi: error: "), (extra, err)
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "a.jsonl").exists() and (tmp_path / "exists.jsonl").read_text() == "keep me\n"


def test_cli_shanshui_writes_the_set_write_folder_writes(tmp_path, capsys):
    out = tmp_path / "ss"
    code, stdout, err = run(capsys, "data", "shanshui", "--out", out, "--n", "3", "--size", "32", "--captions", "en")
    assert code == 0, err
    assert stdout.strip() == f"wrote 3 samples to {out}"
    reference = write_folder(tmp_path / "ref", 3, seed=0, size=32, captions="en")
    for name in sorted(p.name for p in reference.iterdir()):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert [p.caption for p in open_pairs(out)] == [p.caption for p in open_pairs(reference)]
    for extra, needle in [
        (["--n", "0"], "--n"),
        (["--n", "3", "--size", "5"], "--size must be between 32 and 1024 pixels, not 5"),  # not "size=5"
        (["--n", "3", "--seed", "-1"], "--seed must be 0 or more, not -1"),
        (["--captions", "fr"], "captions"),
        (["--split", "eval"], "split"),
        ([], "already holds samples"),
    ]:
        code, _, err = run(capsys, "data", "shanshui", "--out", out, "--size", "32", *(extra or ["--n", "3"]))
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (extra, err)
