"""taiyi train sd: Taiyi SD stages 1 and 2, end to end on a tiny random pipeline and synthetic pairs.

What is proven here: stage 1 leaves every UNet and VAE tensor bit-identical while the text encoder
changes; stage 2 changes the UNet (and leaves a frozen text encoder alone); a run stopped at step 3 and
resumed to 6 has the per-step losses of a straight 6-step run; cached latents give the loss of latents
encoded every step; final/ loads and generates; two sources mix; long captions are truncated and
counted; the CLI maps flags to the same function and refuses bad input in one line (exit 2).
"""

from __future__ import annotations

import errno
import json
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
from taiyi.data.shanshui import write_folder
from taiyi.errors import InvalidInputError
from taiyi.pipeline import load_pipeline
from taiyi.testing import make_tiny_pipeline
from taiyi.train.sd import SDTrainConfig, plot_losses, train_sd

REPO = Path(__file__).resolve().parents[1]
FAST = dict(resolution=32, batch_size=2, lr=1e-3, val_prompts=[], save_every=0, report_to="none")
UNET = Path("unet") / "diffusion_pytorch_model.safetensors"
VAE = Path("vae") / "diffusion_pytorch_model.safetensors"
TEXT = Path("text_encoder") / "model.safetensors"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-sd")
    base = make_tiny_pipeline(root / "sd-zh", text_encoder="bert")  # Taiyi layout: BertModel 32 = cross-attention 32
    zh = write_folder(root / "zh", 6, seed=0, size=32)
    en = write_folder(root / "en", 4, seed=1, size=32, captions="en")
    return base, zh, en


def _changed(a: Path, b: Path) -> set[str]:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    return {k for k in ta if not torch.equal(ta[k], tb[k])}


def test_stage1_freezes_unet_and_vae_and_final_generates(setup, tmp_path):
    base, zh, _ = setup
    result = train_sd(
        SDTrainConfig(
            model=str(base),
            data=[str(zh)],
            output=str(tmp_path / "run"),
            stage=1,
            max_steps=2,
            **{**FAST, "val_prompts": ["小桥流水人家", "山水"]},
            val_steps=1,
        )
    )
    final = result["final"]
    assert _changed(base / UNET, final / UNET) == set()
    assert _changed(base / VAE, final / VAE) == set()
    changed = _changed(base / TEXT, final / TEXT)
    assert len(changed) > 10  # the text encoder trained ...
    assert not [k for k in changed if k.startswith("pooler")]  # ... but not its pooler: prompts use hidden states
    index = json.loads((final / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "BertModel"] and index["tokenizer"][1] == "BertTokenizer"
    assert sorted(result["losses"]) == [1, 2] and all(v > 0 for v in result["losses"].values())
    grid = Image.open(result["validation"][-1])
    assert grid.size == (128, 64)  # two prompts at the pipeline's smallest size, side by side
    assert Image.open(result["loss_plot"]).size == (640, 400)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    image = load_pipeline(final).generate("小桥流水人家", steps=2, seed=0, width=64, height=64).images[0]
    assert image.size == (64, 64)


def test_stage2_trains_the_unet_with_a_frozen_text_encoder_and_ema(setup, tmp_path):
    base, zh, _ = setup
    result = train_sd(
        SDTrainConfig(
            model=str(base),
            data=[str(zh)],
            output=str(tmp_path / "run"),
            stage=2,
            train_text_encoder=False,
            ema=True,
            prediction_type="v_prediction",
            snr_gamma=5.0,
            gradient_checkpointing=True,
            max_steps=2,
            **FAST,
        )
    )
    final = result["final"]
    assert result["prediction_type"] == "v_prediction"
    assert len(_changed(base / UNET, final / UNET)) > 10
    assert _changed(base / VAE, final / VAE) == set()
    assert _changed(base / TEXT, final / TEXT) == set()


def test_text_encoder_lr_sets_the_text_encoders_own_rate(setup, tmp_path):
    base, zh, _ = setup
    settings = dict(model=str(base), data=[str(zh)], stage=2, max_steps=2, **FAST)
    # A vanishing rate for the text encoder (AdamW steps are about lr in size) while the UNet trains at --lr.
    still = train_sd(SDTrainConfig(output=str(tmp_path / "still"), text_encoder_lr=1e-30, **settings))["final"]
    before, after = load_file(base / TEXT), load_file(still / TEXT)
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-25
    rows = [json.loads(x) for x in (tmp_path / "still" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["lr"], r["text_encoder_lr"]) for r in rows if r["kind"] == "train"] == [(FAST["lr"], 1e-30)] * 2
    assert len(_changed(base / UNET, still / UNET)) > 10
    # Unset, the text encoder trains at --lr with the UNet; set equal to --lr, the run is the same run.
    plain = train_sd(SDTrainConfig(output=str(tmp_path / "plain"), **settings))
    same = train_sd(SDTrainConfig(output=str(tmp_path / "same"), text_encoder_lr=FAST["lr"], **settings))
    assert len(_changed(base / TEXT, plain["final"] / TEXT)) > 10
    assert same["losses"] == plain["losses"]
    assert _changed(plain["final"] / TEXT, same["final"] / TEXT) == set()
    assert _changed(plain["final"] / UNET, same["final"] / UNET) == set()


def test_resume_continues_with_the_same_losses(setup, tmp_path):
    base, zh, _ = setup
    settings = dict(model=str(base), data=[str(zh)], caption_dropout=0.5, snr_gamma=5.0, **FAST)
    straight = train_sd(SDTrainConfig(output=str(tmp_path / "a"), max_steps=6, **settings))["losses"]
    first = train_sd(SDTrainConfig(output=str(tmp_path / "b"), max_steps=3, **settings))["losses"]
    second = train_sd(SDTrainConfig(output=str(tmp_path / "b"), max_steps=6, resume="latest", **settings))
    assert second["resumed_from"].name == "step-000003"
    resumed = {**first, **second["losses"]}
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    assert _changed(tmp_path / "a" / "final" / TEXT, tmp_path / "b" / "final" / TEXT) == set()


@pytest.mark.parametrize(
    ("schedule", "factors"), [("cosine", [0.0, 1.0, 0.75, 0.25]), ("linear", [0.0, 1.0, 2 / 3, 1 / 3])]
)
def test_lr_scheduler_decays_to_zero_and_a_killed_run_resumes_on_it(setup, tmp_path, schedule, factors):
    base, zh, _ = setup
    settings = dict(model=str(base), data=[str(zh)], lr_scheduler=schedule, warmup_steps=1, max_steps=4, **FAST)
    straight = train_sd(SDTrainConfig(output=str(tmp_path / "a"), **{**settings, "save_every": 2}, keep_checkpoints=2))
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["kind"] == "train"] == pytest.approx([1e-3 * f for f in factors])
    # killed after its step-2 checkpoint: the resumed run continues the same decay, with the same losses
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000004")
    shutil.rmtree(tmp_path / "b" / "final")
    resumed = train_sd(SDTrainConfig(output=str(tmp_path / "b"), resume="latest", **settings))
    assert resumed["resumed_from"].name == "step-000002"
    assert resumed["losses"] == pytest.approx({3: straight["losses"][3], 4: straight["losses"][4]}, abs=1e-6)
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["kind"] == "train"] == pytest.approx([1e-3 * f for f in factors])


def test_cached_latents_give_the_loss_of_encoding_every_step(setup, tmp_path):
    base, zh, _ = setup
    settings = dict(model=str(base), data=[str(zh)], max_steps=1, **FAST)
    cached = train_sd(SDTrainConfig(output=str(tmp_path / "c"), cache_latents=True, **settings))
    fresh = train_sd(SDTrainConfig(output=str(tmp_path / "f"), cache_latents=False, **settings))
    assert cached["cache"] and not fresh["cache"]
    assert cached["losses"][1] == pytest.approx(fresh["losses"][1], abs=1e-5)


def test_manifests_of_the_same_images_share_one_latent_cache_and_keep_their_captions(tmp_path):
    from accelerate import Accelerator
    from diffusers import AutoencoderKL

    from taiyi.train.clip import open_training_data
    from taiyi.train.sd import cached_latents

    folder = write_folder(tmp_path / "scenes", 3, seed=0, size=32)
    images = sorted(p.name for p in folder.glob("*.png"))
    zh, en = tmp_path / "zh.jsonl", tmp_path / "en.jsonl"
    zh.write_text(
        "".join(json.dumps({"image": f"scenes/{n}", "caption": f"山水{i}"}) + "\n" for i, n in enumerate(images))
    )
    rows = [{"image": f"scenes/{n}", "caption": f"landscape {i}"} for i, n in enumerate(images)]
    rows[1]["caption"] = ""  # a row without a usable caption: left out of this source only
    en.write_text("".join(json.dumps(r) + "\n" for r in rows))
    vae = AutoencoderKL.from_pretrained(make_tiny_pipeline(tmp_path / "sd", text_encoder="bert") / "vae")
    config, accelerator, cache = SDTrainConfig(model="", data=[], output=""), Accelerator(cpu=True), tmp_path / "cache"
    a, path_a, computed_a = cached_latents(open_training_data(str(zh), config, 32), vae, accelerator, 32, cache)
    b, path_b, computed_b = cached_latents(open_training_data(str(en), config, 32), vae, accelerator, 32, cache)
    assert path_a == path_b and computed_a and not computed_b
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    assert a.captions == ["山水0", "山水1", "山水2"]
    assert b.captions[0] == "landscape 0" and b.valid.tolist() == [True, False, True]
    (folder / images[2]).write_bytes(b"not a picture")  # another image file: another key, computed again
    c, path_c, computed_c = cached_latents(open_training_data(str(zh), config, 32), vae, accelerator, 32, cache)
    assert path_c != path_a and computed_c and c.valid.tolist() == [True, True, False]


def test_two_sources_mix_and_long_captions_are_truncated(setup, tmp_path):
    base, zh, en = setup
    long = tmp_path / "long"
    long.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 32), (30 * i, 90, 160)).save(long / f"{i}.png")
        (long / f"{i}.txt").write_text("山" * (600 if i == 0 else 5), encoding="utf-8")
    result = train_sd(
        SDTrainConfig(
            model=str(base),
            data=[str(long), str(en)],
            mix_ratio=0.8,
            gradient_checkpointing=True,
            output=str(tmp_path / "m"),
            max_steps=3,
            **FAST,
        )
    )
    assert sorted(result["losses"]) == [1, 2, 3]
    assert result["truncated"] >= 1


def test_plot_losses_draws_a_png(tmp_path):
    rows = [{"step": s, "kind": "train", "loss": 1.0 / s} for s in range(1, 30)] + [{"step": 5, "kind": "val"}]
    path = plot_losses(rows, tmp_path / "loss.png")
    image = Image.open(path).convert("RGB")
    assert image.size == (640, 400)
    assert len(image.getcolors(maxcolors=1 << 16)) > 2  # axes and the curve were drawn
    assert plot_losses([], tmp_path / "none.png") is None


def test_cli_trains_and_refuses_bad_input_in_one_line(setup, tmp_path, capsys):
    base, zh, _ = setup
    out = tmp_path / "cli"
    args = ["train", "sd", "--model", str(base), "--data", str(zh), "--output", str(out), "--max-steps", "1"]
    fast = [
        "--resolution",
        "32",
        "--batch-size",
        "2",
        "--report-to",
        "none",
        "--val-steps",
        "1",
        "--val-prompt",
        "山水",
    ]
    assert main(args + fast) == 0
    assert capsys.readouterr().out.strip() == str(out / "final")
    assert load_pipeline(out / "final").generate("山水", steps=1, seed=0, width=64, height=64).images

    empty = tmp_path / "empty"
    empty.mkdir()
    narrow = tmp_path / "narrow"
    _narrow_pipeline(base, narrow)
    cases = [
        (args + fast, "holds this run already"),  # output exists
        (["train", "sd", "--model", str(base), "--data", str(empty), "--output", str(tmp_path / "e")] + fast, ""),
        (["train", "sd", "--model", str(narrow), "--data", str(zh), "--output", str(tmp_path / "n")] + fast, "wide"),
        (args[:-2] + ["--stage", "3"] + fast, "--stage"),
        (args + fast + ["--mix-ratio", "0.5"], "--mix-ratio"),
        (args + fast + ["--lr-scheduler", "exponential"], "--lr-scheduler"),
        (args + fast + ["--text-encoder-lr", "0"], "--text-encoder-lr must be positive"),
        (args + fast + ["--seed", "-1"], "--seed must be between 0 and 4294967295, not -1"),  # numpy's traceback
        (args + fast + ["--val-prompt", "山\udcff"], "--val-prompt is not valid text: character 2"),
        (args + fast + ["--teacher", str(base)], "--teacher-data"),
        (args + fast + ["--teacher", str(base), "--teacher-data", str(zh), "--teacher-weight", "0"], "(0, 1]"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("taiyi: error:") and "\n" not in err and message in err, err
    with pytest.raises(InvalidInputError, match="fp16 needs a CUDA GPU"):
        train_sd(
            SDTrainConfig(
                model=str(base), data=[str(zh)], output=str(tmp_path / "h"), mixed_precision="fp16", cpu=True
            )
        )


@pytest.mark.parametrize("failure", ["disk full", "read-only"])
def test_a_write_failure_mid_run_is_one_line_and_the_checkpoint_resumes(setup, tmp_path, capsys, monkeypatch, failure):
    from taiyi.train import common

    base, zh, _ = setup
    out = tmp_path / "run"
    args = ["train", "sd", "--model", str(base), "--data", str(zh), "--output", str(out), "--max-steps", "3",
            "--save-every", "1", "--resolution", "32", "--batch-size", "2", "--report-to", "none", "--val-every", "0",
            "--resume", "latest"]  # fmt: skip
    append = common.MetricsLog.append

    def fail_from_step_2(self, row):
        if row.get("step", 0) >= 2:
            if failure == "read-only":  # the file system is remounted read-only during the run
                raise OSError(errno.EROFS, "Read-only file system", str(self.path))
            with self.path.open("a", encoding="utf-8") as f:  # the disk fills halfway through the line
                f.write('{"step": 2, "kind": "tr')
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        append(self, row)

    monkeypatch.setattr(common.MetricsLog, "append", fail_from_step_2)
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert not any(line.startswith(("Traceback", "  File")) for line in err)
    if failure == "read-only":
        assert (
            err[-1] == f"taiyi: error: Read-only file system: {out / 'metrics.jsonl'}; choose a place you can write to"
        )
    else:
        assert err[-1].startswith("taiyi: error: no space left on device writing") and "--resume latest" in err[-1]
    assert [c.name for c in common.list_checkpoints(out)] == ["step-000001"]
    monkeypatch.setattr(common.MetricsLog, "append", append)
    assert main(args) == 0  # space freed, or writable again: the run goes on from its checkpoint (past a torn line)
    assert (out / "final").is_dir()
    rows = common.MetricsLog(out / "metrics.jsonl").read()
    assert [row["step"] for row in rows if row.get("kind") == "train"] == [1, 2, 3]


@pytest.mark.parametrize(("hook", "name", "code"), [("sigterm", "SIGTERM", 143), ("sigint", "Ctrl-C", 130)])
def test_a_signal_ends_the_step_saves_a_checkpoint_and_the_run_resumes_on_it(
    setup, tmp_path, capsys, monkeypatch, hook, name, code
):
    """SIGTERM (a scheduler's preemption) or Ctrl-C after step 2 of 4, with no --save-every checkpoint due."""
    import signal

    from taiyi.train import common

    base, zh, _ = setup
    settings = dict(model=str(base), data=[str(zh)], caption_dropout=0.5, max_steps=4, **FAST)
    straight = train_sd(SDTrainConfig(output=str(tmp_path / "a"), **settings))
    out = tmp_path / "b"
    args = ["train", "sd", "--model", str(base), "--data", str(zh), "--output", str(out), "--max-steps", "4",
            "--caption-dropout", "0.5", "--save-every", "0", "--resolution", "32", "--batch-size", "2",
            "--lr", "1e-3", "--report-to", "none", "--resume", "latest"]  # fmt: skip
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setenv(common.CRASH_ENV, f"{hook}:2")
    assert main(args) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert not any(line.startswith(("Traceback", "  File")) for line in err)
    saved = out / "checkpoints" / "step-000002"
    assert err[-1] == f"taiyi: stopped by {name} after step 2 of 4; saved {saved}: continue with --resume latest"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert [c.name for c in common.list_checkpoints(out)] == ["step-000002"] and not (out / "final").exists()

    monkeypatch.delenv(common.CRASH_ENV)
    assert main(args) == 0
    rows = common.MetricsLog(out / "metrics.jsonl").read()
    losses = {row["step"]: row["loss"] for row in rows if row.get("kind") == "train"}
    assert losses == pytest.approx(straight["losses"], abs=1e-6)
    for part in (TEXT, UNET):
        assert _changed(straight["final"] / part, out / "final" / part) == set()


def _narrow_pipeline(base: Path, out: Path) -> None:
    """``base`` with a 16-wide text encoder: incompatible with its 32-wide cross-attention."""
    from transformers import BertConfig, BertModel

    from taiyi.assemble import write_pipeline_folder
    from taiyi.tokenization import load_chinese_tokenizer

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(vocab_size=21128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)
    )
    write_pipeline_folder(
        out,
        unet=base / "unet",
        vae=base / "vae",
        scheduler=base / "scheduler",
        text_encoder=bert,
        tokenizer=load_chinese_tokenizer(base / "tokenizer"),
    )


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(setup, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of writing checkpoint 4 (after a partial file): one line, exit 2, step 2 kept."""
    import errno

    import accelerate.checkpointing

    from taiyi.train.common import list_checkpoints

    base, zh, _ = setup
    settings = dict(model=str(base), data=[str(zh)], **{**FAST, "save_every": 2})
    straight = train_sd(SDTrainConfig(output=str(tmp_path / "straight"), max_steps=6, **settings))["losses"]
    real_save = accelerate.checkpointing.save

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        if "step-000004" in str(f):
            Path(f).write_bytes(b"\0" * 100)  # what a full disk leaves: the start of a file
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save_until_the_disk_fills)
    out = tmp_path / "run"
    args = ["train", "sd", "--model", str(base), "--data", str(zh), "--output", str(out), "--max-steps", "6"]
    args += ["--resolution", "32", "--batch-size", "2", "--lr", "1e-3", "--report-to", "none", "--save-every", "2"]
    args += ["--val-every", "0"]  # the run dies before its end-of-run validation
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("taiyi: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "no space left on device" in errors[0] and "step-000004" in errors[0], errors[0]
    assert "step-000002 is kept" in errors[0] and "--resume latest" in errors[0], errors[0]
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # no .tmp left behind

    monkeypatch.setattr(accelerate.checkpointing, "save", real_save)  # space freed
    resumed = train_sd(SDTrainConfig(output=str(out), max_steps=6, resume="latest", **settings))
    assert resumed["resumed_from"].name == "step-000002" and sorted(resumed["losses"]) == [3, 4, 5, 6]
    for step in (3, 4, 5, 6):
        assert resumed["losses"][step] == pytest.approx(straight[step], abs=1e-6), step
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004", "step-000006"]


def _without_dropout(base: Path, out: Path) -> Path:
    """``base`` with the text encoder's dropout off: dropout masks come from each process's own RNG, so only
    a dropout-free model can give 1 and 2 processes the same loss."""
    shutil.copytree(base, out)
    path = out / "text_encoder" / "config.json"
    config = json.loads(path.read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path.write_text(json.dumps(config))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_losses(output: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if row["kind"] == "train"}


@pytest.mark.parametrize("stage", [1, 2])
def test_two_processes_give_the_loss_of_one_process_with_the_global_batch(setup, tmp_path, stage):
    """accelerate launch, 2 CPU processes (gloo) with 2 samples each, against 1 process with all 4: the same
    samples, caption dropout, latent draws, noise and timesteps, so the same loss at every step and the same
    weights after three steps."""
    base, zh, _ = setup
    calm = _without_dropout(base, tmp_path / "calm")
    settings = dict(stage=stage, max_steps=3, batch_size=4, caption_dropout=0.5, snr_gamma=5.0)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(REPO / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(_free_port())]
    args = [
        "-m",
        "taiyi.cli",
        "train",
        "sd",
        "--model",
        str(calm),
        "--data",
        str(zh),
        "--output",
        str(tmp_path / "two"),
    ]
    args += ["--resolution", "32", "--lr", "1e-3", "--report-to", "none", "--save-every", "0", "--val-every", "0"]
    args += ["--stage", str(stage), "--max-steps", "3", "--batch-size", "4", "--caption-dropout", "0.5"]
    args += ["--snr-gamma", "5", "--val-prompt", "山水", "--val-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch + args, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    if done.returncode != 0 and "address already in use" in done.stderr.lower():  # the port was taken meanwhile
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
        launch[launch.index("--main_process_port") + 1] = str(_free_port())
        done = subprocess.run(launch + args, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "two" / "final")  # printed once, by rank 0
    one = train_sd(
        SDTrainConfig(
            model=str(calm), data=[str(zh)], output=str(tmp_path / "one"), **{**FAST, **settings, "lr": 1e-3}
        )
    )
    two_losses, one_losses = _train_losses(tmp_path / "two"), _train_losses(tmp_path / "one")
    assert sorted(two_losses) == [1, 2, 3]
    for step in (1, 2, 3):
        assert two_losses[step] == pytest.approx(one_losses[step], abs=1e-5), step
    # The weights agree too: to float round-off relative to how far three steps moved them. (Adam divides by
    # the root of the squared gradient, so a parameter whose gradient is ~1e-9 moves by ~lr either way and
    # the reduction order of the two processes' gradients shows there: an absolute bound would be arbitrary.)
    for part in (TEXT, UNET) if stage == 2 else (TEXT,):
        start, left, right = (
            load_file(p) for p in (calm / part, tmp_path / "two" / "final" / part, one["final"] / part)
        )
        moved = sum(float((right[k] - start[k]).square().sum()) for k in start) ** 0.5
        apart = sum(float((left[k] - right[k]).square().sum()) for k in start) ** 0.5
        assert moved > 1e-3 and apart < 1e-3 * moved, (part, apart, moved)


def test_sd_accelerate_configs_parse_and_name_the_sd_layers():
    """The FSDP config for stage 2 wraps the UNet's transformer blocks and the BERT layers, which exist in the
    trained modules (accelerate refuses a class it cannot find); every config documents `train sd`."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from taiyi.testing import tiny_components
    from taiyi.train.sd import _Denoiser

    folder = REPO / "configs" / "accelerate"
    config = load_config_from_file(str(folder / "fsdp_sd.yaml"))
    assert config.distributed_type == DistributedType.FSDP
    wrapped = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    components = tiny_components(text_encoder="bert")
    trained = _Denoiser(components["text_encoder"], components["unet"], train_text=True, train_unet=True)
    present = {type(m).__name__ for m in trained.modules()}
    assert set(wrapped) == {"BasicTransformerBlock", "BertLayer"} <= present
    for path in folder.glob("*.yaml"):
        load_config_from_file(str(path))
        assert "train sd" in path.read_text(), path.name


def test_bad_data_is_refused_in_one_line_and_long_captions_are_counted_in_a_warning(setup, tmp_path, caplog):
    """Issue #4 part 6: a folder with no pairs, one whose every image is corrupt, captions longer than the
    encoder window (trained truncated, counted, one warning with the count). The incompatible text encoder
    is refused in test_cli_trains_and_refuses_bad_input_in_one_line."""
    import logging

    base, _, _ = setup
    settings = dict(model=str(base), max_steps=2, **FAST)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("没有图片", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="no image") as info:
        train_sd(SDTrainConfig(data=[str(empty)], output=str(tmp_path / "e"), **settings))
    assert "\n" not in str(info.value) and not (tmp_path / "e" / "run_config.json").exists()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(2):
        (corrupt / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        (corrupt / f"{i}.txt").write_text("山水", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="no readable image-text pair"):
        train_sd(SDTrainConfig(data=[str(corrupt)], output=str(tmp_path / "c"), **settings))

    long = tmp_path / "long"
    long.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(long / f"{i}.png")
        (long / f"{i}.txt").write_text("山" * (600 if i == 0 else 5), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="taiyi"):
        result = train_sd(SDTrainConfig(data=[str(long)], output=str(tmp_path / "l"), **settings))
    assert result["truncated"] == 2  # the long caption, once in each of the two steps
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("2 training captions were longer than") and "512 tokens" in w for w in warnings), warnings


def _manifest(folder: Path, path: Path, caption) -> Path:
    """A JSONL of ``folder``'s pictures in name order, captioned by ``caption(i, own caption)``."""
    names = sorted(p.name for p in folder.glob("*.png"))
    rows = [
        {"image": f"{folder.name}/{n}", "caption": caption(i, (folder / n).with_suffix(".txt").read_text("utf-8"))}
        for i, n in enumerate(names)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_teacher_replaces_the_target_by_its_prediction(setup, tmp_path):
    """--teacher: the target is the teacher's prediction for the same noisy latent and timestep, on the
    teacher data's caption of the same picture. A teacher equal to the student (no dropout) on the same
    captions predicts exactly what the student does: the loss is 0 and nothing moves. On other captions
    the loss is positive and stage 1 still trains only the text encoder."""
    base, zh, _ = setup
    quiet = _without_dropout(base, tmp_path / "quiet")
    shutil.copytree(zh, tmp_path / "zh")
    data = _manifest(tmp_path / "zh", tmp_path / "zh.jsonl", lambda i, c: c)
    same = _manifest(tmp_path / "zh", tmp_path / "same.jsonl", lambda i, c: c)
    other = _manifest(tmp_path / "zh", tmp_path / "other.jsonl", lambda i, c: f"夜晚的高山，第{i}幅")
    settings = dict(model=str(quiet), data=[str(data)], stage=1, max_steps=2, snr_gamma=5.0, **FAST)
    settings["weight_decay"] = 0.0
    alike = train_sd(SDTrainConfig(output=str(tmp_path / "a"), teacher=str(quiet), teacher_data=str(same), **settings))
    assert alike["losses"] == {1: 0.0, 2: 0.0}
    assert _changed(quiet / TEXT, alike["final"] / TEXT) == set()
    taught = train_sd(
        SDTrainConfig(output=str(tmp_path / "t"), teacher=str(quiet), teacher_data=str(other), **settings)
    )
    plain = train_sd(SDTrainConfig(output=str(tmp_path / "p"), **settings))
    assert all(v > 0 for v in taught["losses"].values()) and taught["losses"] != plain["losses"]
    assert _changed(quiet / UNET, taught["final"] / UNET) == set()
    assert len(_changed(quiet / TEXT, taught["final"] / TEXT)) > 10
    half = train_sd(
        SDTrainConfig(
            output=str(tmp_path / "h"), teacher=str(quiet), teacher_data=str(same), teacher_weight=0.5, **settings
        )
    )
    assert half["losses"][1] == pytest.approx(0.5 * plain["losses"][1], rel=1e-5)  # the teacher's share is 0
    mixed = train_sd(
        SDTrainConfig(
            **{**settings, "data": [str(data), str(other)]},
            output=str(tmp_path / "m"),
            teacher=str(quiet),
            teacher_data=[str(same), str(other)],  # each source in the teacher's words: its own captions here
        )
    )
    assert mixed["losses"] == {1: 0.0, 2: 0.0}


def test_a_teacher_must_share_the_pictures_and_the_latent_space(setup, tmp_path):
    base, zh, _ = setup
    shutil.copytree(zh, tmp_path / "zh")
    data = _manifest(tmp_path / "zh", tmp_path / "zh.jsonl", lambda i, c: c)
    settings = dict(model=str(base), data=[str(data)], max_steps=1, **FAST)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(reversed(data.read_text(encoding="utf-8").splitlines(keepends=True))), "utf-8")
    with pytest.raises(InvalidInputError, match="row for row"):
        train_sd(SDTrainConfig(output=str(tmp_path / "r"), teacher=str(base), teacher_data=str(shuffled), **settings))
    other_vae = shutil.copytree(base, tmp_path / "other-vae")
    tensors = load_file(other_vae / VAE)
    tensors = {k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}
    from safetensors.torch import save_file

    save_file(tensors, str(other_vae / VAE))
    with pytest.raises(InvalidInputError, match="another VAE"):
        train_sd(SDTrainConfig(output=str(tmp_path / "v"), teacher=str(other_vae), teacher_data=str(data), **settings))
    with pytest.raises(InvalidInputError, match="once per --data"):
        train_sd(
            SDTrainConfig(output=str(tmp_path / "o"), teacher=str(base), teacher_data=[str(data)] * 2, **settings)
        )
    with pytest.raises(InvalidInputError, match="go together"):
        train_sd(SDTrainConfig(output=str(tmp_path / "g"), teacher=str(base), **settings))
    assert not any((tmp_path / d / "run_config.json").exists() for d in "rvog")
