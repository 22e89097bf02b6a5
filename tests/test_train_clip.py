"""taiyi train clip: locked-image training, end to end on tiny random towers and synthetic pairs.

What is proven here: the frozen image tower gets no gradient and is bit-identical after training;
N processes give the loss of one process with the global batch; a killed run resumes with the same
loss curve; cached image features give the loss of recomputed ones; training raises retrieval recall;
the exports load back; the CLI maps flags to the same function and refuses bad input in one line.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from taiyi.cli import main
from taiyi.clip import ChineseCLIP, load_clip
from taiyi.errors import InvalidInputError, StoppedError
from taiyi.testing import make_tiny_clip_image_tower, make_tiny_taiyi_clip_text
from taiyi.train.clip import (
    ClipTrainConfig,
    _param_groups,
    _Trainable,
    contrastive_loss,
    image_tower_fingerprint,
    train_clip,
)
from taiyi.train.common import CRASH_ENV, list_checkpoints

REPO = Path(__file__).resolve().parents[1]
DIM = 32
# Fast settings shared by most runs: 64 synthetic pairs, 16 held out, batch 8 (6 batches an epoch).
BASE = dict(
    data="synthetic:64",
    batch_size=8,
    lr=1e-3,
    warmup_steps=0,
    val_fraction=0.25,
    val_every=0,
    save_every=0,
    report_to="none",
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """Tiny random towers: a CLIP image model (32 px, 32-d) and Taiyi-CLIP text towers with and without dropout.

    A tiny random ViT maps every image to nearly the same feature (mean cosine 0.996), which no text
    tower can tell apart; scaling its encoder's matrices ×10 spreads the features (mean cosine ≈ 0.6)
    the way a trained tower's are spread.
    """
    from transformers import CLIPModel

    root = tmp_path_factory.mktemp("towers")
    image = make_tiny_clip_image_tower(root / "image", dim=DIM, image_size=32)
    model = CLIPModel.from_pretrained(image)
    with torch.no_grad():
        for name, weight in model.vision_model.named_parameters():
            if weight.ndim == 2 and "encoder" in name:
                weight.mul_(10)
    model.save_pretrained(image)
    text = make_tiny_taiyi_clip_text(root / "text", dim=DIM)
    # Dropout masks come from each process's RNG: 1 process and 2 processes can only agree without it.
    no_dropout = Path(shutil.copytree(text, root / "text-no-dropout"))
    config = json.loads((no_dropout / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (no_dropout / "config.json").write_text(json.dumps(config))
    return {"image": image, "text": text, "text_no_dropout": no_dropout}


def train(towers, output, *, text: str = "text", **overrides) -> dict:
    settings = {**BASE, "text_tower": str(towers[text]), "image_tower": str(towers["image"]), **overrides}
    return train_clip(ClipTrainConfig(output=str(output), **settings))


def train_losses(output) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if row["kind"] == "train"}


def cli_args(towers, output, *, text: str = "text", **overrides) -> list[str]:
    settings = {**BASE, "text_tower": towers[text], "image_tower": towers["image"], "output": output, **overrides}
    args = ["train", "clip"]
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def run_subprocess(args: list[str], *, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})}
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_weight_difference(a: Path, b: Path) -> float:
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


# ---------------------------------------------------------------------------------------------------- the loss


def test_contrastive_loss_is_symmetric_infonce_with_clamped_scale():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, DIM, generator=g), torch.randn(6, DIM, generator=g)
    scale = torch.tensor(math.log(20.0), requires_grad=True)
    loss = contrastive_loss(image, text, scale)
    logits = 20.0 * torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    labels = torch.arange(6)
    expected = (
        torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
    ) / 2
    assert torch.allclose(loss, expected, atol=1e-6)
    # exp(logit_scale) is clamped to 100: above it, the loss stops changing and the scale gets no gradient.
    high = torch.tensor(math.log(400.0), requires_grad=True)
    clamped = contrastive_loss(image, text, high)
    clamped.backward()
    assert torch.allclose(clamped, contrastive_loss(image, text, torch.tensor(math.log(100.0))), atol=1e-6)
    assert float(high.grad) == 0.0


def test_hard_negatives_are_scored_against_every_image_and_only_image_to_text():
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(6, DIM, generator=g), torch.randn(6, DIM, generator=g)
    scale = torch.tensor(math.log(20.0))
    plain = contrastive_loss(image, text, scale)
    # Negatives that repeat the batch's texts double every image→text column, the positive's too: that
    # term rises by exactly log 2, the text→image term not at all.
    doubled = contrastive_loss(image, text, scale, text.clone())
    assert torch.allclose(doubled, plain + math.log(2.0) / 2, atol=1e-6)
    # With captions that match their images, negatives close to the captions cost far more than unrelated ones.
    text = image + 0.2 * torch.randn(6, DIM, generator=g)
    plain = contrastive_loss(image, text, scale)
    negative = (text + 0.2 * torch.randn(6, DIM, generator=g)).requires_grad_(True)
    hard = contrastive_loss(image, text, scale, negative)
    unrelated = contrastive_loss(image, text, scale, torch.randn(6, DIM, generator=g))
    assert float(hard.detach()) > 5 * float(unrelated - plain) > 0
    hard.backward()
    assert negative.grad is not None and float(negative.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------------- frozen tower


def test_frozen_image_tower_gets_no_gradient_and_stays_bit_identical(towers, tmp_path, monkeypatch):
    # Without the cache the frozen tower runs at every step: record whether its output could carry a gradient.
    outputs_needing_grad = []
    original = ChineseCLIP.image_features

    def recording(self, pixel_values):
        out = original(self, pixel_values)
        outputs_needing_grad.append(out.requires_grad)
        return out

    monkeypatch.setattr(ChineseCLIP, "image_features", recording)
    result = train(towers, tmp_path / "run", max_steps=3, cache_image_features=False, report_to="auto")

    assert result["step"] == 3 and result["cache"] is None
    assert len(outputs_needing_grad) >= 3 and not any(outputs_needing_grad)
    clip = result["model"]
    assert all(not p.requires_grad and p.grad is None for p in clip.vision_model.parameters())
    assert not clip.vision_model.training
    # The optimizer holds the text tower and the logit scale, never the image tower.
    optimised = {
        id(p) for group in _param_groups(_Trainable(clip, train_image_tower=False), 0.1) for p in group["params"]
    }
    assert optimised.isdisjoint(id(p) for p in clip.vision_model.parameters())
    assert id(clip.logit_scale) in optimised

    # Image tower weights: bit-identical to the CLIP model it came from.
    source = load_file(towers["image"] / "model.safetensors")
    trained = load_file(result["final"] / "image_encoder" / "model.safetensors")
    assert trained and all(torch.equal(trained[k], source[k]) for k in trained)
    # Text tower weights: changed.
    before = load_file(towers["text"] / "model.safetensors")
    after = load_file(result["final"] / "text_encoder" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2

    # final/ loads with load_clip, no flags, and embeds as the trained model does.
    loaded = load_clip(result["final"], device="cpu")
    captions = ["一个大的红色圆形在左边", "一个小的蓝色方块在右边"]
    assert torch.allclose(loaded.encode_text(captions), clip.encode_text(captions), atol=1e-6)
    assert loaded.scale() == pytest.approx(clip.scale(), rel=1e-6)
    # taiyi-text-tower/ is the published Taiyi-CLIP layout: from_taiyi with the image tower loads it.
    taiyi = ChineseCLIP.from_taiyi(result["text_tower"], towers["image"], device="cpu")
    assert torch.allclose(taiyi.encode_text(captions), clip.encode_text(captions), atol=1e-6)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert Image.open(tmp_path / "run" / "loss.png").size == (640, 400)  # the loss curve, as train sd/vae draw
    assert all({"loss", "lr", "logit_scale", "epoch"} <= r.keys() for r in rows if r["kind"] == "train")
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in val] == [0, 3] and "R@1" in val[-1]["text_to_image"]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000003"]  # the end is always saved
    if importlib.util.find_spec("tensorboard") is not None:  # the default tracker when installed
        assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))


def test_unfreezing_the_image_tower_trains_it(towers, tmp_path):
    result = train(towers, tmp_path / "run", max_steps=2, unfreeze_image_tower=True)
    assert result["cache"] is None
    source = load_file(towers["image"] / "model.safetensors")
    trained = load_file(result["final"] / "image_encoder" / "model.safetensors")
    assert any(not torch.equal(trained[k], source[k]) for k in trained)
    with pytest.raises(InvalidInputError, match="frozen image tower"):
        train(towers, tmp_path / "bad", max_steps=2, unfreeze_image_tower=True, cache_image_features=True)


# ---------------------------------------------------------------------------------------------------- cache


def test_cached_features_give_the_loss_of_recomputed_ones_and_are_reused(towers, tmp_path):
    cache_dir = tmp_path / "shared-cache"
    uncached = train(towers, tmp_path / "uncached", max_steps=2, cache_image_features=False)
    cached = train(towers, tmp_path / "cached", max_steps=2, cache_dir=str(cache_dir))
    assert cached["cache"].parent == cache_dir and cached["cache"].suffix == ".safetensors"
    for step in (1, 2):
        assert cached["losses"][step] == pytest.approx(uncached["losses"][step], abs=1e-5)
    written = cached["cache"].stat().st_mtime_ns
    again = train(towers, tmp_path / "again", max_steps=2, cache_dir=str(cache_dir))
    assert again["cache"] == cached["cache"] and again["cache"].stat().st_mtime_ns == written  # read, not rewritten
    assert again["losses"] == cached["losses"]


def test_gradient_checkpointing_gives_the_same_losses(towers, tmp_path):
    plain = train(towers, tmp_path / "plain", max_steps=2)
    checkpointed = train(towers, tmp_path / "gc", max_steps=2, gradient_checkpointing=True)
    for step in (1, 2):
        assert checkpointed["losses"][step] == pytest.approx(plain["losses"][step], abs=1e-6)


# ---------------------------------------------------------------------------------------------------- processes


def test_two_processes_give_the_loss_of_one_process_with_the_global_batch(towers, tmp_path):
    """accelerate launch, 2 CPU processes (gloo) with 4 pairs each, against 1 process with all 8."""
    settings = dict(max_steps=3, text="text_no_dropout")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(REPO / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(free_port())]
    launch += ["-m", "taiyi.cli", *cli_args(towers, tmp_path / "two", **settings)]
    done = run_subprocess(launch)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr
    one = train(towers, tmp_path / "one", **settings)

    two_losses, one_losses = train_losses(tmp_path / "two"), train_losses(tmp_path / "one")
    assert sorted(two_losses) == [1, 2, 3]
    for step in (1, 2, 3):
        assert two_losses[step] == pytest.approx(one_losses[step], abs=1e-5)
    # The updated weights after three steps agree too.
    text = "text_encoder/model.safetensors"
    assert max_weight_difference(tmp_path / "two" / "final" / text, one["final"] / text) < 1e-5


# ---------------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def straight_run(towers, tmp_path_factory):
    """6 uninterrupted steps (dropout on, so the RNG state matters) to compare resumed runs against."""
    output = tmp_path_factory.mktemp("straight") / "run"
    result = train(towers, output, max_steps=6, save_every=3)
    return output, result


def test_resume_in_a_new_process_continues_the_loss_curve(towers, tmp_path, straight_run):
    straight, _ = straight_run
    output = tmp_path / "run"
    # Steps 1-3 in a process that is then killed (right after step 3 and its checkpoint) ...
    done = run_subprocess(
        [sys.executable, "-m", "taiyi.cli", *cli_args(towers, output, max_steps=6, save_every=3)],
        env={CRASH_ENV: "step:3"},
    )
    assert done.returncode == 137, done.stderr[-3000:]
    assert [p.name for p in list_checkpoints(output)] == ["step-000003"]
    assert not (output / "final").exists()
    # ... and steps 4-6 in this one.
    resumed = train(towers, output, max_steps=6, save_every=3, resume="latest")
    assert resumed["resumed_from"].name == "step-000003" and resumed["step"] == 6
    assert sorted(resumed["losses"]) == [4, 5, 6]
    expected, got = train_losses(straight), train_losses(output)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    text = "text_encoder/model.safetensors"
    assert max_weight_difference(output / "final" / text, straight / "final" / text) < 1e-6


def test_run_killed_while_checkpointing_resumes_from_the_last_complete_checkpoint(towers, tmp_path, straight_run):
    straight, _ = straight_run
    output = tmp_path / "run"
    done = run_subprocess(
        [sys.executable, "-m", "taiyi.cli", *cli_args(towers, output, max_steps=6, save_every=2)],
        env={CRASH_ENV: "checkpoint:4"},
    )
    assert done.returncode == 137, done.stderr[-3000:]
    checkpoints = output / "checkpoints"
    assert [p.name for p in list_checkpoints(output)] == ["step-000002"]
    assert (checkpoints / "step-000004.tmp").is_dir() and not (checkpoints / "step-000004").exists()
    assert max(train_losses(output)) == 4  # the dead run got to step 4

    resumed = train(towers, output, max_steps=6, save_every=2, resume="latest")
    assert resumed["resumed_from"].name == "step-000002" and resumed["step"] == 6
    assert not (checkpoints / "step-000004.tmp").exists()
    expected, got = train_losses(straight), train_losses(output)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # the dead run's rows after step 2 were replaced
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def test_sigterm_saves_the_step_and_the_run_resumes_on_it(towers, tmp_path, straight_run, monkeypatch):
    """SIGTERM after step 2 of 6 (the next --save-every checkpoint is at 3): saved at 2, resumed exactly."""
    straight, _ = straight_run
    output = tmp_path / "run"
    monkeypatch.setenv(CRASH_ENV, "sigterm:2")
    with pytest.raises(StoppedError, match="stopped by SIGTERM after step 2 of 6") as stopped:
        train(towers, output, max_steps=6, save_every=3)
    assert stopped.value.exit_code == 143
    assert [p.name for p in list_checkpoints(output)] == ["step-000002"] and not (output / "final").exists()
    monkeypatch.delenv(CRASH_ENV)
    resumed = train(towers, output, max_steps=6, save_every=3, resume="latest")
    assert resumed["resumed_from"].name == "step-000002" and sorted(resumed["losses"]) == [3, 4, 5, 6]
    expected, got = train_losses(straight), train_losses(output)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    text = "text_encoder/model.safetensors"
    assert max_weight_difference(output / "final" / text, straight / "final" / text) < 1e-6


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(towers, tmp_path):
    """accelerate launch, 2 processes: only rank 0 is signalled; both save step 2 and end, none waits forever."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(REPO / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(free_port())]
    output = tmp_path / "two"
    args = cli_args(towers, output, max_steps=4, save_every=0, text="text_no_dropout")
    done = run_subprocess([*launch, "-m", "taiyi.cli", *args], env={CRASH_ENV: "sigterm:2"}, timeout=180)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("taiyi: stopped")]
    assert len(lines) == 2, done.stderr[-3000:]  # each process says it
    assert all(line.startswith("taiyi: stopped by SIGTERM after step 2 of 4; saved") for line in lines)
    saved = list_checkpoints(output)
    assert [p.name for p in saved] == ["step-000002"] and not (output / "final").exists()
    assert {p.name for p in saved[0].glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    resumed = run_subprocess([*launch, "-m", "taiyi.cli", *args, "--resume", "latest"], timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(train_losses(output)) == [1, 2, 3, 4] and (output / "final").is_dir()


# ---------------------------------------------------------------------------------------------------- learning


def test_training_on_synthetic_pairs_raises_retrieval_recall(towers, tmp_path):
    """1024 pairs (each of the 400 captions 2-3 times), 100 held out; 300 steps of batch 64."""
    result = train(
        towers,
        tmp_path / "run",
        data="synthetic:1024",
        batch_size=64,
        max_steps=300,
        lr=1e-2,
        weight_decay=0.0,
        val_fraction=0.1,
        val_max=100,
    )
    before, after = result["val_initial"]["text_to_image"], result["val"]["text_to_image"]
    print(f"text→image R@1 {before['R@1']:.1f} → {after['R@1']:.1f}, R@5 {before['R@5']:.1f} → {after['R@5']:.1f}")
    assert result["val"]["num_texts"] == 100
    assert after["R@1"] >= max(3 * before["R@1"], 5.0)
    assert after["R@5"] >= before["R@5"] + 15.0
    assert result["val"]["mean_recall"] > result["val_initial"]["mean_recall"] + 10.0


# ---------------------------------------------------------------------------------------------------- data


def test_unreadable_samples_are_skipped_and_counted(towers, tmp_path):
    from taiyi.train.synthetic import SyntheticPairs

    folder = tmp_path / "pairs"
    folder.mkdir()
    pairs = SyntheticPairs(20, image_size=32)
    for i in range(20):
        pairs[i].image.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(pairs[i].caption, encoding="utf-8")
    (folder / "03.png").write_bytes(b"not an image")
    (folder / "07.png").write_bytes(b"")
    cached = train(towers, tmp_path / "cached", data=str(folder), batch_size=4, max_steps=2, val_fraction=0.2)
    assert cached["skipped"] == 2 and cached["step"] == 2
    uncached = train(
        towers,
        tmp_path / "uncached",
        data=str(folder),
        batch_size=4,
        max_steps=4,
        val_fraction=0.2,
        cache_image_features=False,
    )
    assert uncached["step"] == 4 and uncached["skipped"] >= 1


def test_a_batch_left_with_one_readable_sample_makes_no_update(towers, tmp_path, caplog):
    """One sample is its own only candidate: loss 0 and no gradient, but AdamW's decay would still move every
    weight. Such a step is logged and leaves the towers as they were."""
    from taiyi.train.synthetic import SyntheticPairs

    def folder(name: str, corrupt: bool) -> Path:
        path = tmp_path / name
        path.mkdir()
        pairs = SyntheticPairs(2, image_size=32)
        for i in range(2):
            pairs[i].image.save(path / f"{i}.png")
            (path / f"{i}.txt").write_text(pairs[i].caption, encoding="utf-8")
        if corrupt:
            (path / "1.png").write_bytes(b"not an image")
        return path

    settings = dict(batch_size=2, max_steps=2, val_fraction=0, cache_image_features=False, weight_decay=0.1)
    with caplog.at_level("WARNING", logger="taiyi"):
        one = train(towers, tmp_path / "one", data=str(folder("one-left", corrupt=True)), **settings)
    assert one["step"] == 2 and one["skipped"] == 2
    assert sum("one readable sample" in r.getMessage() for r in caplog.records) == 2
    before = load_file(towers["text"] / "model.safetensors")
    after = load_file(one["final"] / "text_encoder" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    two = train(towers, tmp_path / "two", data=str(folder("both", corrupt=False)), **settings)
    moved = load_file(two["final"] / "text_encoder" / "model.safetensors")
    assert not all(torch.equal(before[k], moved[k]) for k in before)  # two samples do train


def _jsonl_with_negatives(folder: Path, n: int, *, without: set[int] = frozenset()) -> tuple[Path, dict[str, str]]:
    from taiyi.train.synthetic import SyntheticPairs

    folder.mkdir()
    pairs = SyntheticPairs(n, image_size=32)
    rows, negatives = [], {}
    for i in range(n):
        pairs[i].image.save(folder / f"{i:02d}.png")
        row = {"image": f"{i:02d}.png", "caption": pairs[i].caption}
        if i not in without:
            row["negative"] = negatives[pairs[i].caption] = pairs[(i + 1) % n].caption + " (not this)"
        rows.append(json.dumps(row))
    (folder / "pairs.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder / "pairs.jsonl", negatives


@pytest.mark.parametrize("cached", [True, False])
def test_negative_column_adds_each_rows_own_negative_and_leaves_out_rows_without_one(
    towers, tmp_path, monkeypatch, cached
):
    manifest, negatives = _jsonl_with_negatives(tmp_path / "pairs", 24, without={3, 11})
    texts_of_steps = []
    original = ChineseCLIP.tokenize

    def recording(self, texts):
        texts_of_steps.append(list(texts))
        return original(self, texts)

    monkeypatch.setattr(ChineseCLIP, "tokenize", recording)
    result = train(
        towers,
        tmp_path / "run",
        data=str(manifest),
        negative_column="negative",
        batch_size=4,
        max_steps=4,
        val_fraction=0.0,
        cache_image_features=cached,
    )
    assert result["step"] == 4
    steps = [texts for texts in texts_of_steps if len(texts) == 8]  # the training batches: 4 captions + 4 negatives
    assert len(steps) == 4
    for texts in steps:
        captions, hard = texts[:4], texts[4:]
        assert hard == [negatives[c] for c in captions]  # row for row; rows 3 and 11 have none and never train
    plain = train(towers, tmp_path / "plain", data=str(manifest), batch_size=4, max_steps=1, val_fraction=0.0)
    assert train_losses(tmp_path / "run")[1] != pytest.approx(plain["losses"][1])


def test_negative_column_needs_a_manifest_that_has_it(towers, tmp_path):
    manifest, _ = _jsonl_with_negatives(tmp_path / "pairs", 12, without=set(range(12)))
    with pytest.raises(InvalidInputError, match="no 'negative' column"):
        train(towers, tmp_path / "a", data=str(manifest), negative_column="negative", batch_size=4, max_steps=1)
    with pytest.raises(InvalidInputError, match="needs a CSV or JSONL"):
        train(towers, tmp_path / "b", negative_column="negative", max_steps=1)  # synthetic:64
    assert not (tmp_path / "a" / "run_config.json").exists() and not (tmp_path / "b" / "run_config.json").exists()


def test_tar_shards_train_through_the_feature_cache(towers, tmp_path):
    import io
    import tarfile

    from taiyi.train.synthetic import SyntheticPairs

    pairs = SyntheticPairs(40, image_size=32)
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        with tarfile.open(shards / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * 20, shard * 20 + 20):
                png = io.BytesIO()
                pairs[i].image.save(png, "PNG")
                for name, payload in ((f"{i:05d}.png", png.getvalue()), (f"{i:05d}.txt", pairs[i].caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    result = train(towers, tmp_path / "run", data=str(shards), val_data="synthetic:16", max_steps=2)
    assert result["step"] == 2 and result["val"]["num_texts"] == 16 and result["cache"] is not None
    with pytest.raises(InvalidInputError, match="streamed"):
        train(towers, tmp_path / "uncached", data=str(shards), max_steps=2, cache_image_features=False)


def test_cache_key_follows_the_image_tower_weights(towers):
    clip = ChineseCLIP.from_taiyi(towers["text"], towers["image"], device="cpu")
    before = image_tower_fingerprint(clip)
    assert image_tower_fingerprint(clip) == before
    with torch.no_grad():
        next(clip.vision_model.parameters()).view(-1)[0] += 1e-3
    assert image_tower_fingerprint(clip) != before


# ---------------------------------------------------------------------------------------------------- CLI


def run_cli(capsys, args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trains_on_synthetic_data_and_refuses_to_clobber_a_run(towers, tmp_path, capsys):
    output = tmp_path / "run"
    code, out, err = run_cli(capsys, cli_args(towers, output, max_steps=2, data="synthetic:64"))
    assert code == 0, err
    assert out.strip() == str(output / "final")
    assert load_clip(output / "final", device="cpu").text_dim == DIM
    assert json.loads((output / "run_config.json").read_text())["max_steps"] == 2

    code, _, err = run_cli(capsys, cli_args(towers, output, max_steps=2, data="synthetic:64"))
    assert code == 2 and err.count("\n") == 1 and "--resume latest" in err
    code, _, err = run_cli(capsys, cli_args(towers, output, max_steps=2, data="synthetic:64", lr=0.5))
    assert code == 2 and err.count("\n") == 1 and "different run" in err and "lr" in err
    code, _, err = run_cli(capsys, [*cli_args(towers, output, max_steps=2, lr=0.5), "--resume", "latest"])
    assert code == 2 and err.count("\n") == 1 and "cannot resume" in err
    # Resuming a finished run is a no-op that re-exports; --overwrite starts afresh.
    code, _, err = run_cli(capsys, [*cli_args(towers, output, max_steps=2), "--resume", "latest"])
    assert code == 0, err
    code, _, err = run_cli(capsys, [*cli_args(towers, output, max_steps=1), "--overwrite"])
    assert code == 0, err
    assert sorted(train_losses(output)) == [1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"data": "synthetic:0"}, "synthetic:256"),
        ({"data": "EMPTY"}, "no image-caption pairs"),
        ({"data": "MISSING"}, "does not exist"),
        ({"batch_size": 1}, "at least 2"),
        ({"batch_size": 4096}, "fewer than --batch-size"),
        ({"mixed_precision": "fp8"}, "--mixed-precision"),
        ({"resume": "NOWHERE"}, "no complete checkpoint"),
        ({"init_from": "somewhere"}, "exactly one of"),
        ({"val_fraction": 1.5}, "--val-fraction"),
        ({"seed": -1}, "--seed must be between 0 and 4294967295, not -1"),
        ({"negative_column": "negative"}, "needs a CSV or JSONL"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(towers, tmp_path, capsys, extra, message):
    (tmp_path / "empty").mkdir()
    replace = {"EMPTY": tmp_path / "empty", "MISSING": tmp_path / "missing", "NOWHERE": tmp_path / "nowhere"}
    extra = {k: replace.get(v, v) if isinstance(v, str) else v for k, v in extra.items()}
    code, _, err = run_cli(capsys, cli_args(towers, tmp_path / "run", max_steps=1, **extra))
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("taiyi: error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "run" / "run_config.json").exists()  # fixing the typo and running again just works


def test_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {
        "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2),
        "ddp.yaml": (DistributedType.MULTI_GPU, None),
        "multi_node.yaml": (DistributedType.MULTI_GPU, None),
        "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, None),
        "fsdp.yaml": (DistributedType.FSDP, None),
    }
    folder = REPO / "configs" / "accelerate"
    assert set(expected) <= {p.name for p in folder.glob("*.yaml")}
    for name, (kind, processes) in expected.items():
        config = load_config_from_file(str(folder / name))
        assert config.distributed_type == kind, name
        assert processes is None or config.num_processes == processes
    assert load_config_from_file(str(folder / "deepspeed_zero2.yaml")).deepspeed_config["zero_stage"] == 2
    assert load_config_from_file(str(folder / "multi_node.yaml")).num_machines > 1


# ---------------------------------------------------------------------------------------------------- from scratch
# Recipe stage (a): an English CLIP, both towers and the tokenizer learned from the captions.

TINY_CLIP = {
    "projection_dim": 16,
    "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
    "vision_config": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
}
NEW = dict(batch_size=8, lr=1e-3, warmup_steps=0, val_fraction=0.25, val_every=0, report_to="none", vocab_size=600)


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    """48 山水 pairs with English captions at 32 px, and the tiny CLIP config file."""
    from taiyi.data.shanshui import write_folder

    root = tmp_path_factory.mktemp("english")
    write_folder(root / "data", 48, size=32, captions="en")
    (root / "tiny.json").write_text(json.dumps(TINY_CLIP))
    return {"data": root / "data", "config": root / "tiny.json"}


def train_new(english, output, **overrides) -> dict:
    settings = {**NEW, "data": str(english["data"]), "from_config": str(english["config"]), **overrides}
    return train_clip(ClipTrainConfig(output=str(output), **settings))


@pytest.fixture(scope="module")
def english_run(english, tmp_path_factory):
    """4 steps from scratch with a checkpoint at step 2: the reference for resuming and the loading tests."""
    output = tmp_path_factory.mktemp("new") / "run"
    torch.manual_seed(123)  # the run seeds itself: what the caller did before must not matter
    # one thread, as the tests that resume it: a module fixture is set up before the autouse one_thread
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_new(english, output, max_steps=4, save_every=2, keep_checkpoints=5)
    finally:
        torch.set_num_threads(saved)


def test_new_clip_trains_both_towers_and_learns_the_tokenizer(english, english_run, tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    final = english_run["final"]
    assert english_run["step"] == 4 and english_run["text_tower"] is None and english_run["cache"] is None
    # The same seed gives the same initial weights: a 1-step run with lr 0 keeps them.
    initial = train_new(english, tmp_path / "init", max_steps=1, lr=1e-30)["final"]
    before, after = load_file(initial / "model.safetensors"), load_file(final / "model.safetensors")
    for prefix in ("text_model.", "vision_model.", "text_projection", "visual_projection"):
        changed = [k for k in after if k.startswith(prefix) and not torch.equal(after[k], before[k])]
        assert changed, prefix
    assert not torch.equal(after["logit_scale"], before["logit_scale"])
    model = CLIPModel.from_pretrained(final)
    tokenizer = CLIPTokenizer.from_pretrained(english_run["output"] / "tokenizer")
    assert model.config.text_config.vocab_size == len(tokenizer) <= 600
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id == len(tokenizer) - 1
    assert tokenizer.get_vocab() == CLIPTokenizer.from_pretrained(final).get_vocab()
    caption = (english["data"] / "000000.txt").read_text().strip()
    assert tokenizer.unk_token_id not in tokenizer(caption)["input_ids"][:-1]  # the captions' words are known


def test_new_clip_resumes_exactly(english, english_run, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(english_run["output"], output)
    shutil.rmtree(output / "final")
    shutil.rmtree(output / "checkpoints" / "step-000004")
    import taiyi.recipe.tokenizer as tokenizer_module

    def no_training(*args, **kwargs):
        raise AssertionError("a resumed run reuses OUTPUT/tokenizer")

    original = tokenizer_module.train_clip_tokenizer
    tokenizer_module.train_clip_tokenizer = no_training
    try:
        resumed = train_new(english, output, max_steps=4, save_every=2, keep_checkpoints=5, resume="latest")
    finally:
        tokenizer_module.train_clip_tokenizer = original
    assert resumed["resumed_from"].name == "step-000002" and sorted(resumed["losses"]) == [3, 4]
    expected = train_losses(english_run["output"])
    for step, loss in train_losses(output).items():
        assert loss == pytest.approx(expected[step], abs=1e-6), step
    weights = "model.safetensors"
    assert max_weight_difference(output / "final" / weights, english_run["final"] / weights) < 1e-6


def test_new_clip_final_loads_four_ways(english, english_run, tmp_path):
    from PIL import Image
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    final = english_run["final"]
    trained: ChineseCLIP = english_run["model"]
    caption = (english["data"] / "000001.txt").read_text().strip()
    image = Image.open(english["data"] / "000001.png")
    # (i) a transformers CLIPModel, giving the trained model's similarity.
    model = CLIPModel.from_pretrained(final).eval()
    tokens = trained.tokenize([caption])
    with torch.no_grad():
        text = model.get_text_features(**tokens)
        text = text.pooler_output if hasattr(text, "pooler_output") else text
    assert torch.allclose(torch.nn.functional.normalize(text, dim=-1), trained.encode_text(caption), atol=1e-5)
    # (iii) the text tower as a Stable Diffusion v1 text encoder: root and text_encoder/ both hold the trained weights.
    reference = trained.text_model.text_model(**tokens).last_hidden_state
    for folder, tokenizer_folder in ((final, final), (final / "text_encoder", final / "tokenizer")):
        encoder = CLIPTextModel.from_pretrained(folder).eval()
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
        assert tokenizer.model_max_length == encoder.config.max_position_embeddings == 77
        ids = tokenizer([caption], padding="max_length", max_length=77, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(ids["input_ids"]).last_hidden_state  # (1, 77, 16)
        assert hidden.shape == (1, 77, 16)
        n = int(tokens["attention_mask"].sum())
        assert torch.allclose(hidden[:, :n], reference[:, :n], atol=1e-5), folder
    # (iv) load_clip: scores, zero-shot with English templates, retrieval.
    clip = load_clip(final, device="cpu")
    assert clip.text_head == "projection" and clip.templates[1] == "a photo of {}."
    assert torch.allclose(clip.encode_text(caption), trained.encode_text(caption), atol=1e-6)
    assert torch.allclose(clip.encode_image(image), trained.encode_image(image), atol=1e-5)
    probs = clip.zero_shot([image], ["dawn", "noon", "dusk", "night"])
    assert probs.shape == (1, 4) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(InvalidInputError, match="drop --image-tower"):
        load_clip(final, image_tower=final)
    # (ii) the image tower of a Chinese (locked-image) run: its 16-d features meet a 16-d Chinese text tower.
    text_tower = make_tiny_taiyi_clip_text(tmp_path / "zh", dim=16)
    result = train_clip(
        ClipTrainConfig(
            data="synthetic:16",
            output=str(tmp_path / "zh-run"),
            text_tower=str(text_tower),
            image_tower=str(final),
            batch_size=4,
            max_steps=1,
            val_fraction=0,
            save_every=0,
            report_to="none",
        )
    )
    zh = load_clip(result["final"], device="cpu")
    expected = load_file(final / "model.safetensors")
    got = zh.vision_model.state_dict()
    assert torch.equal(
        got["vision_model.embeddings.patch_embedding.weight"],
        expected["vision_model.embeddings.patch_embedding.weight"],
    )
    assert torch.equal(got["visual_projection.weight"], expected["visual_projection.weight"])


def test_new_clip_separates_synthetic_captions(tmp_path):
    config = {
        "projection_dim": 32,
        "text_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
    }
    (tmp_path / "small.json").write_text(json.dumps(config))
    result = train_clip(
        ClipTrainConfig(
            data="synthetic:256",
            output=str(tmp_path / "run"),
            from_config=str(tmp_path / "small.json"),
            batch_size=32,
            max_steps=60,
            lr=5e-4,
            warmup_steps=2,
            val_fraction=0.25,
            val_every=0,
            save_every=0,
            report_to="none",
            vocab_size=600,
        )
    )
    chance = (1 + 5 + 10) / 3 / 64 * 100  # mean recall of a random ranking of 64 validation pairs
    assert result["val"]["num_texts"] == 64
    assert result["val"]["mean_recall"] > 2 * chance > result["val_initial"]["mean_recall"]
    losses = result["losses"]
    assert sum(list(losses.values())[-5:]) / 5 < math.log(32) - 0.2


def new_clip_cli_args(english, output, **overrides) -> list[str]:
    settings = {**NEW, "data": english["data"], "output": output, **overrides}
    args = ["train", "clip"]
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_cli_new_clip_trains_and_prints_the_final_folder(english, tmp_path, capsys):
    output = tmp_path / "run"
    code, out, err = run_cli(
        capsys, [*new_clip_cli_args(english, output, max_steps=1), "--from-config", english["config"]]
    )
    assert code == 0, err
    assert out.strip() == str(output / "final")
    assert json.loads((output / "final" / "config.json").read_text())["model_type"] == "clip"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--from-config", "MISSING"], "does not exist"),
        (["--from-config", "BADJSON"], "not readable JSON"),
        (["--from-config", "BADSIZE"], "multiple of patch_size"),
        (["--new-clip", "--vocab-size", "100"], "at least 514"),
        (["--new-clip", "--image-tower", "somewhere"], "drop --image-tower"),
        (["--new-clip", "--text-tower", "somewhere"], "exactly one of"),
        (["--new-clip", "--cache-image-features"], "cannot be cached"),
    ],
)
def test_cli_new_clip_bad_input_is_one_line_and_exit_2(english, tmp_path, capsys, extra, message):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "size.json").write_text(json.dumps({"vision_config": {"image_size": 30}}))
    replace = {
        "MISSING": tmp_path / "missing.json",
        "BADJSON": tmp_path / "bad.json",
        "BADSIZE": tmp_path / "size.json",
    }
    extra = [str(replace.get(a, a)) for a in extra]
    code, _, err = run_cli(capsys, [*new_clip_cli_args(english, tmp_path / "run", max_steps=1), *extra])
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("taiyi: error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
