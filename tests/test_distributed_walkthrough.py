"""Training under ``accelerate launch``, as a user moving a run from one process to several (2 CPU processes, gloo).

What is proven here: with unreadable pictures (latents encoded every step, gradient accumulation), 2 processes
train the losses of 1 process and count the skipped samples of both, even when one process's whole share of a
micro-batch is unreadable; data with no readable picture ends both processes with the one line, no traceback;
DreamBooth with prior preservation trains as one process group (class images drawn by both, the same pictures
one process draws) instead of two runs racing on one folder; a launch this machine cannot give (FSDP without a
GPU, DeepSpeed not installed, fp16 asked for by the launcher on the CPU) is refused in one line, and
``accelerate launch --cpu --num_processes 2``, which starts one process, says so.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taiyi.cli import main
from taiyi.data.shanshui import write_folder
from taiyi.testing import make_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU does")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Taiyi pipeline with the text encoder's dropout off (dropout masks come from each process's own RNG,
    so only a dropout-free model can give 1 and 2 processes the same loss) and 8 pairs, two of them unreadable."""
    root = tmp_path_factory.mktemp("distributed")
    model = make_tiny_pipeline(root / "sd-zh", text_encoder="bert")
    path = model / "text_encoder" / "config.json"
    config = json.loads(path.read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path.write_text(json.dumps(config))
    data = write_folder(root / "pairs", 8, seed=0, size=32)
    (data / "000001.png").write_bytes(b"not a picture")
    (data / "000006.png").write_bytes(b"")
    return model, data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], output: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch`` with 2 CPU processes (configs/accelerate/cpu_2proc.yaml) of ``taiyi ARGS``."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(REPO / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launch, "-m", "taiyi.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if done.returncode != 0 and "address already in use" in done.stderr.lower():  # the port was taken meanwhile
        shutil.rmtree(output, ignore_errors=True)
        launch[launch.index("--main_process_port") + 1] = str(_free_port())
        done = subprocess.run(
            [*launch, "-m", "taiyi.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
        )
    return done


def _rows(output: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == kind]


def _sd_args(model: Path, data: Path, output: Path) -> list[str]:
    return [
        "train", "sd", "--model", str(model), "--data", str(data), "--output", str(output), "--resolution", "32",
        "--batch-size", "4", "--grad-accum", "2", "--max-steps", "2", "--lr", "1e-3", "--no-cache-latents",
        "--save-every", "0", "--val-every", "0", "--val-prompt", "山水", "--val-steps", "1", "--report-to", "none",
        "--log-every", "1",
    ]  # fmt: skip


def test_unreadable_samples_split_between_processes_train_as_one_process(setup, tmp_path, capsys):
    """Micro-batch 1 gives the second process two unreadable pictures: it used to raise alone (the other died
    with a traceback); now both train the loss one process trains, and both processes' skips are counted."""
    model, data = setup
    two = _launch(_sd_args(model, data, tmp_path / "two"), tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Traceback" not in two.stderr
    assert two.stdout.strip().splitlines() == [str(tmp_path / "two" / "final")]  # printed once, by rank 0
    assert main(_sd_args(model, data, tmp_path / "one")) == 0
    one_err = capsys.readouterr().err
    one_rows, two_rows = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["step"] for r in two_rows] == [1, 2]
    for a, b in zip(one_rows, two_rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    # 2 unreadable files met once per epoch, 2 epochs: 4 skips, counted over both processes, logged once
    states = [json.loads((tmp_path / r / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
              for r in ("one", "two")]  # fmt: skip
    assert [s["skipped"] for s in states] == [4, 4] and states[1]["num_processes"] == 2
    skipped = [line for line in two.stderr.splitlines() if "step 2/2" in line]
    assert len(skipped) == 1 and skipped[0].endswith("4 unreadable samples skipped")
    assert any(line.endswith("4 unreadable samples skipped") and "step 2/2" in line for line in one_err.splitlines())


def test_data_with_no_readable_picture_ends_both_processes_in_one_line(setup, tmp_path):
    """The latent cache is encoded by the main process: its refusal used to leave the other process in a barrier
    that died with a gloo traceback."""
    model, data = setup
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    for picture in bad.glob("*.png"):
        picture.write_bytes(b"broken")
    args = ["train", "sd", "--model", str(model), "--data", str(bad), "--output", str(tmp_path / "run")]
    args += ["--resolution", "32", "--batch-size", "4", "--max-steps", "1", "--report-to", "none"]
    done = _launch(args, tmp_path / "run")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("taiyi:")]
    assert lines == [f"taiyi: error: data source {bad} holds no readable image-text pair"] * 2, done.stderr[-3000:]
    assert "[rank" not in done.stderr  # no process's traceback (the launcher's own report of the exit is torch's)


def test_dreambooth_with_prior_preservation_trains_as_one_process_group(setup, tmp_path, capsys):
    """The class images' PartialState used to be made for a GPU, so each process trained alone into the same
    folder and the run crashed; now the two processes share the drawing and train the global batch together."""
    model, _ = setup
    photos = tmp_path / "dog"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(photos / f"{i}.jpg")

    def args(output: Path) -> list[str]:
        return [
            "train", "dreambooth", "--model", str(model), "--instance-data", str(photos), "--instance-prompt",
            "一张sks狗的照片", "--class-prompt", "一张狗的照片", "--num-class-images", "3", "--class-steps", "1",
            "--output", str(output), "--resolution", "32", "--batch-size", "2", "--max-steps", "2", "--lr", "1e-3",
            "--save-every", "0", "--val-every", "0", "--val-steps", "1", "--report-to", "none", "--log-every", "1",
        ]  # fmt: skip

    two = _launch(args(tmp_path / "two"), tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert len([line for line in two.stderr.splitlines() if "step 1/2" in line]) == 1  # one run, logged once
    assert len([line for line in two.stderr.splitlines() if "drawing 3 class images" in line]) == 1
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert main(args(tmp_path / "one")) == 0
    capsys.readouterr()
    classes = [sorted((tmp_path / r / "cache" / "class_images").glob("*/*.png")) for r in ("one", "two")]
    assert [p.name for p in classes[1]] == ["00000.png", "00001.png", "00002.png"]
    for a, b in zip(*classes, strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), b.name
    for a, b in zip(_rows(tmp_path / "one"), _rows(tmp_path / "two"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["prior_loss"] == pytest.approx(a["prior_loss"], abs=1e-5)


@NO_GPU
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ACCELERATE_USE_FSDP": "true"}, "taiyi: error: FSDP (accelerate's distributed_type FSDP) needs GPUs"),
        ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "taiyi: error: accelerate launch asks for fp16 mixed precision"),
    ],
)
@pytest.mark.parametrize("command", ["sd", "uncond", "clip"])
def test_a_launch_this_machine_cannot_give_is_refused_in_one_line(setup, tmp_path, capsys, monkeypatch, env, expected,
                                                                  command):  # fmt: skip
    """What `accelerate launch` sets for an FSDP config, or for --mixed_precision fp16 (on the CPU accelerate
    trained in float32 without a word; FSDP died in a traceback building the Accelerator)."""
    model, data = setup
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    output = tmp_path / "run"
    if command == "sd":
        args = ["train", "sd", "--model", str(model), "--data", str(data), "--output", str(output)]
    elif command == "uncond":
        args = ["train", "uncond", "--data", "synthetic:8", "--output", str(output)]
    else:
        args = ["train", "clip", "--new-clip", "--data", "synthetic:8", "--output", str(output)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err
    assert not output.exists()


@NO_GPU
def test_deepspeed_without_deepspeed_installed_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("accelerate")
    if __import__("importlib").util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert main(["train", "uncond", "--data", "synthetic:8", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["taiyi: error: DeepSpeed is not installed: pip install deepspeed, or launch with DDP "
                   "(configs/accelerate/ddp.yaml)"]  # fmt: skip


def test_accelerate_launch_cpu_with_two_processes_says_it_trains_one(tmp_path, capsys, monkeypatch):
    """`accelerate launch --cpu --num_processes 2` runs the command once, with only MASTER_ADDR/PORT set: the run
    trains in one process (correctly: the batch is global), and now says so instead of passing for 2."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    args = ["train", "uncond", "--data", "synthetic:8", "--output", str(tmp_path / "run"), "--resolution", "16"]
    args += ["--block-out-channels", "16,32", "--norm-num-groups", "8", "--batch-size", "4", "--max-steps", "1"]
    args += ["--val-images", "1", "--val-steps", "1", "--report-to", "none", "--no-ema"]
    assert main(args) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "--num_processes" in line]
    assert warned == [
        "taiyi: warning: accelerate launch --cpu starts one process whatever --num_processes says (its multi-CPU "
        "mode needs mpirun): this run trains in 1 process; for N processes on the CPU drop --cpu and pass "
        "--multi_gpu --num_processes N (or --config_file configs/accelerate/cpu_2proc.yaml)"
    ]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000001" / "trainer_state.json").read_text())
    assert state["num_processes"] == 1
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's processes know how many they are: no warning
    from taiyi.train.common import check_launch

    check_launch()
    assert "--num_processes" not in capsys.readouterr().err


def test_two_processes_of_an_image_trainer_end_cleanly(tmp_path):
    """train uncond and train vae share one loop, whose last validation met a barrier on the main process alone:
    every 2-process run saved final/ and then died with a gloo traceback, exit 1."""
    output = tmp_path / "uncond"
    args = ["train", "uncond", "--data", "synthetic:8", "--output", str(output), "--resolution", "16"]
    args += ["--block-out-channels", "16,32", "--norm-num-groups", "8", "--batch-size", "4", "--max-steps", "2"]
    args += ["--val-images", "1", "--val-steps", "1", "--report-to", "none", "--no-ema", "--save-every", "0"]
    done = _launch(args, output)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stdout.strip().splitlines() == [str(output / "final")]
    assert [row["step"] for row in _rows(output, "val")] == [2]  # the last validation, once
