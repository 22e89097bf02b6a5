"""Mistakes found by walking through data preparation and training as a user, each pinned by a tiny test.

What is proven here: resuming a checkpoint past the run's last step is refused in one line (it used to train
nothing and export the later weights as this run's); ``--resume`` naming another run's checkpoint must keep
that run's settings (a changed ``--lr`` or ``--data`` was recorded but not used); an empty ``--val-prompt`` is
refused before training (it failed after it, with no final/); DreamBooth with ``--output`` inside
``--instance-data`` does not take the run's own class images and plots for photos of the subject on resume; a
CSV row with more fields than its header (an unquoted comma) is skipped and counted, not read as half a caption.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taiyi.cli import main
from taiyi.data import IndexedPairs, open_pairs
from taiyi.data.shanshui import write_folder
from taiyi.errors import InvalidInputError
from taiyi.testing import make_tiny_pipeline
from taiyi.train.dreambooth import instance_manifest
from taiyi.train.sd import SDTrainConfig, train_sd
from taiyi.train.vae import VAETrainConfig, train_vae

FAST = dict(resolution=32, batch_size=2, lr=1e-3, val_prompts=[], save_every=0, report_to="none")
TINY_VAE = dict(
    resolution=32,
    block_out_channels=(8, 16),
    norm_num_groups=4,
    batch_size=2,
    save_every=0,
    val_every=0,
    report_to="none",
    scale_images=4,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("walk")
    base = make_tiny_pipeline(root / "sd-zh", text_encoder="bert")
    data = write_folder(root / "zh", 4, seed=0, size=32)
    return base, data


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # what earlier calls printed (progress bars)
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("taiyi: error: ") and "\n" not in err, err
    return err


def test_resume_past_the_last_step_is_refused(setup, tmp_path, capsys):
    base, data = setup
    out = tmp_path / "run"
    train_sd(SDTrainConfig(model=str(base), data=[str(data)], output=str(out), max_steps=3, **FAST))
    final = (out / "final" / "text_encoder" / "model.safetensors").read_bytes()
    with pytest.raises(InvalidInputError, match="at step 3, past this run's 2 steps; resume it with --max-steps 3"):
        train_sd(
            SDTrainConfig(model=str(base), data=[str(data)], output=str(out), max_steps=2, resume="latest", **FAST)
        )
    assert (out / "final" / "text_encoder" / "model.safetensors").read_bytes() == final  # not re-exported
    # the same checkpoint resumes when the run reaches it (a finished run, re-exported)
    again = train_sd(
        SDTrainConfig(model=str(base), data=[str(data)], output=str(out), max_steps=3, resume="latest", **FAST)
    )
    assert again["resumed_from"].name == "step-000003"

    vae_out = tmp_path / "vae"
    train_vae(VAETrainConfig(data=[str(data)], output=str(vae_out), max_steps=2, **TINY_VAE))
    argv = ["train", "vae", "--data", str(data), "--output", str(vae_out), "--max-steps", "1", "--resume", "latest"]
    argv += ["--resolution", "32", "--block-out-channels", "8,16", "--norm-num-groups", "4", "--batch-size", "2"]
    argv += ["--scale-images", "4", "--val-every", "0", "--report-to", "none"]
    assert "past this run's 1 steps" in _one_line_error(capsys, argv)


def test_resume_of_another_runs_checkpoint_keeps_its_settings(setup, tmp_path, capsys):
    base, data = setup
    first = tmp_path / "first"
    train_sd(SDTrainConfig(model=str(base), data=[str(data)], output=str(first), max_steps=2, **FAST))
    checkpoint = first / "checkpoints" / "step-000002"
    changed = {**FAST, "lr": 0.5}
    with pytest.raises(InvalidInputError, match=r"checkpoint of the run in .*first, which had other settings \(lr: "):
        train_sd(
            SDTrainConfig(
                model=str(base), data=[str(data)], output=str(tmp_path / "b"), max_steps=4, resume=str(checkpoint),
                **changed,
            )
        )  # fmt: skip
    assert not (tmp_path / "b").exists()  # refused before anything was written
    # the same settings continue it in a new folder (output, max_steps and the like may differ)
    forked = train_sd(
        SDTrainConfig(
            model=str(base), data=[str(data)], output=str(tmp_path / "c"), max_steps=4, resume=str(checkpoint), **FAST
        )
    )
    assert forked["resumed_from"] == checkpoint and sorted(forked["losses"]) == [3, 4]
    argv = ["train", "sd", "--model", str(base), "--data", str(data), "--output", str(tmp_path / "d")]
    argv += ["--resume", str(checkpoint), "--lr", "0.5", "--max-steps", "4", "--resolution", "32"]
    assert "which had other settings" in _one_line_error(capsys, argv + ["--batch-size", "2", "--report-to", "none"])


@pytest.mark.parametrize("prompt", ["", "  ", "，。"])
def test_an_empty_val_prompt_is_refused_before_training(setup, tmp_path, capsys, prompt):
    base, data = setup
    out = tmp_path / "run"
    argv = ["train", "sd", "--model", str(base), "--data", str(data), "--output", str(out), "--max-steps", "1"]
    argv += ["--resolution", "32", "--batch-size", "2", "--report-to", "none", "--val-prompt", prompt]
    assert "--val-prompt" in _one_line_error(capsys, argv)
    assert not out.exists()  # nothing trained, nothing written


def test_dreambooth_instance_images_leave_out_the_runs_own_files(tmp_path):
    photos = tmp_path / "dog"
    (photos / "run" / "cache" / "class_images" / "abc").mkdir(parents=True)
    (photos / "run" / "validation").mkdir()
    (photos / ".thumbnails").mkdir()
    (photos / "more").mkdir()
    picture = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    for name in ("a.jpg", "more/b.png", "run/cache/class_images/abc/00000.png", "run/validation/step-000002.png"):
        picture.save(photos / name)
    picture.save(photos / "run" / "loss.png")
    picture.save(photos / ".thumbnails" / "a.png")
    classes = tmp_path / "classes"
    own = (photos / "run", classes)
    manifest = instance_manifest(photos, "一张sks狗的照片", tmp_path / "instance.jsonl", exclude=own)
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert [Path(row["image"]).relative_to(photos.resolve()).as_posix() for row in rows] == ["a.jpg", "more/b.png"]
    # photos inside the output folder (or equal to a folder to leave out) are still read
    manifest = instance_manifest(photos / "more", "x", tmp_path / "more.jsonl", exclude=(photos,))
    assert len(manifest.read_text(encoding="utf-8").splitlines()) == 1


def test_a_csv_row_with_an_unquoted_comma_is_skipped_and_counted(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    table = tmp_path / "pairs.csv"
    # row 0: an unquoted comma cuts the caption; row 1: quoted, whole; row 2: a trailing empty field is harmless
    table.write_text('image,caption\na.png,小桥,流水\na.png,"小桥,流水"\na.png,人家,\n', encoding="utf-8")
    source = open_pairs(table)
    assert [(p.key, p.caption) for p in source] == [("1", "小桥,流水"), ("2", "人家")]
    assert source.skips.as_dict() == {"row with more fields than the header (unquoted comma?)": 1}
    indexed = IndexedPairs(table)
    assert indexed[0] is None and indexed.image_file(0) is None and indexed.caption(0) is None
    assert indexed.skips.total == 2  # [0] and caption(0); image_file counts nothing


def test_image_trainers_read_pictures_without_captions(tmp_path):
    """`train vae` / `train uncond` ignore captions, as their --help says: a folder of plain pictures and an
    image-only CSV train on every picture (they were refused: "no image-caption pairs", "no column caption"),
    and the same pictures with captions train the same weights."""
    from taiyi.train.uncond import UncondTrainConfig, train_uncond

    captioned = write_folder(tmp_path / "captioned", 4, seed=0, size=32)
    plain = tmp_path / "plain"
    plain.mkdir()
    for picture in sorted(captioned.glob("*.png")):
        (plain / picture.name).write_bytes(picture.read_bytes())  # the pictures alone, no .txt
    (tmp_path / "images.csv").write_text(
        "image\n" + "".join(f"plain/{p.name}\n" for p in sorted(plain.glob("*.png"))), encoding="utf-8"
    )
    runs = {}
    for name, source in (("captioned", captioned), ("plain", plain), ("csv", tmp_path / "images.csv")):
        runs[name] = train_vae(
            VAETrainConfig(data=[str(source)], output=str(tmp_path / f"vae-{name}"), max_steps=2, **TINY_VAE)
        )
    assert runs["plain"]["losses"] == runs["captioned"]["losses"] == runs["csv"]["losses"]
    settings = dict(resolution=32, block_out_channels=(8, 16), norm_num_groups=8, batch_size=2, save_every=0,
                    val_every=0, val_images=0, report_to="none", max_steps=2)  # fmt: skip
    for cache in (None, str(tmp_path / "cache")):  # the latent cache lines up with the pictures read
        result = train_uncond(
            UncondTrainConfig(
                data=[str(plain)],
                output=str(tmp_path / f"uncond-{cache is None}"),
                vae=str(runs["plain"]["final"]),
                cache_dir=cache,
                **settings,
            )  # fmt: skip
        )
        assert result["step"] == 2
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures")
    with pytest.raises(InvalidInputError, match="has no images: no .* files in it"):
        train_vae(VAETrainConfig(data=[str(tmp_path / "empty")], output=str(tmp_path / "e"), **TINY_VAE))


def test_train_sd_says_why_samples_were_skipped(setup, tmp_path, caplog):
    """As train clip and train vae do: the reasons, not only a count of unreadable samples."""
    import logging

    base, _ = setup
    data = write_folder(tmp_path / "data", 6, seed=1, size=32)
    pictures = sorted(data.glob("*.png"))
    pictures[0].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    pictures[1].write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="taiyi"):
        train_sd(SDTrainConfig(model=str(base), data=[str(data)], output=str(tmp_path / "run"), max_steps=1, **FAST))
    said = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert said == [f"{data}: skipped 2 samples: 1 corrupt image, 1 zero-byte image"], said
