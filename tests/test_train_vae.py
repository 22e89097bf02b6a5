"""taiyi train vae: an AutoencoderKL from scratch on 山水 folders, end to end at 32×32 with tiny widths.

What is proven here: final/ loads with stock ``AutoencoderKL.from_pretrained`` and carries the measured
``scaling_factor`` (1 / latent std), latents are 4× smaller per side; a run stopped at step 2 and resumed to
4 has the per-step losses and the final weights of a straight 4-step run; the validation row reports
PSNR and grey/ink chroma; the CLI maps flags to the same function and refuses bad input in one line.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from taiyi.cli import main
from taiyi.data.shanshui import write_folder
from taiyi.errors import InvalidInputError
from taiyi.train.vae import VAETrainConfig, chroma, psnr, train_vae

TINY = dict(
    resolution=32,
    block_out_channels=(8, 16, 16),
    norm_num_groups=8,
    batch_size=4,
    save_every=0,
    val_every=0,
    report_to="none",
    scale_images=16,
)
WEIGHTS = "diffusion_pytorch_model.safetensors"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("vae") / "shanshui", 12, seed=0, size=32)


def test_final_loads_with_stock_diffusers_and_carries_the_measured_scaling_factor(folder, tmp_path):
    from diffusers import AutoencoderKL

    result = train_vae(VAETrainConfig(data=[str(folder)], output=str(tmp_path / "run"), max_steps=2, **TINY))
    vae = AutoencoderKL.from_pretrained(result["final"])
    info = result["export"]
    assert vae.config.scaling_factor == pytest.approx(1.0 / info["latent_std"]) != pytest.approx(0.18215)
    assert info["latent_shape"] == [4, 8, 8]
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
        assert latents.shape == (1, 4, 8, 8) and vae.decode(latents).sample.shape == (1, 3, 32, 32)
    val = result["val"][-1]
    assert {"psnr", "grey_chroma", "ink_chroma", "ink_input_chroma"} <= set(val)
    assert val["ink_input_chroma"] < 0.05  # rendered ink pictures are grey; the check is on reconstructions
    report = json.loads((tmp_path / "run" / "vae_report.json").read_text())
    assert report["scaling_factor"] == pytest.approx(info["scaling_factor"]) and "psnr" in report
    assert (tmp_path / "run" / "loss.png").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2] and {"l1", "kl", "edge", "chroma"} <= set(
        rows[0]
    )


def test_resume_continues_with_the_same_losses(folder, tmp_path):
    settings = dict(data=[str(folder)], hflip=True, ema=True, **TINY)
    straight = train_vae(VAETrainConfig(output=str(tmp_path / "a"), max_steps=4, **settings))
    first = train_vae(VAETrainConfig(output=str(tmp_path / "b"), max_steps=2, **settings))["losses"]
    second = train_vae(VAETrainConfig(output=str(tmp_path / "b"), max_steps=4, resume="latest", **settings))
    assert second["resumed_from"].name == "step-000002"
    resumed = {**first, **second["losses"]}
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert resumed[step] == pytest.approx(straight["losses"][step], abs=1e-6), step
    a, b = load_file(tmp_path / "a" / "final" / WEIGHTS), load_file(tmp_path / "b" / "final" / WEIGHTS)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_sigterm_stops_after_the_step_with_a_checkpoint_the_run_resumes_on(folder, tmp_path, monkeypatch):
    from taiyi.errors import StoppedError
    from taiyi.train.common import CRASH_ENV, list_checkpoints

    settings = dict(data=[str(folder)], hflip=True, ema=True, max_steps=4, **TINY)
    straight = train_vae(VAETrainConfig(output=str(tmp_path / "a"), **settings))
    monkeypatch.setenv(CRASH_ENV, "sigterm:3")
    with pytest.raises(StoppedError, match="stopped by SIGTERM after step 3 of 4") as stopped:
        train_vae(VAETrainConfig(output=str(tmp_path / "b"), **settings))
    assert stopped.value.exit_code == 143
    assert [c.name for c in list_checkpoints(tmp_path / "b")] == ["step-000003"]
    monkeypatch.delenv(CRASH_ENV)
    resumed = train_vae(VAETrainConfig(output=str(tmp_path / "b"), resume="latest", **settings))
    assert resumed["resumed_from"].name == "step-000003"
    assert resumed["losses"] == pytest.approx({4: straight["losses"][4]}, abs=1e-6)
    a, b = load_file(tmp_path / "a" / "final" / WEIGHTS), load_file(tmp_path / "b" / "final" / WEIGHTS)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_overwrite_removes_the_previous_run_and_nothing_else(tmp_path):
    """--overwrite in a folder that also holds the user's files (here: the training data itself)."""
    data = write_folder(tmp_path / "data", 8, seed=0, size=32)
    (data / "notes.txt").write_text("mine", encoding="utf-8")
    before = sorted(p.name for p in data.iterdir())
    settings = dict(data=[str(data)], output=str(data), max_steps=1, **TINY)
    with pytest.raises(InvalidInputError, match="not empty and holds no taiyi training run"):
        train_vae(VAETrainConfig(**settings))
    train_vae(VAETrainConfig(**settings, overwrite=True))
    train_vae(VAETrainConfig(**{**settings, "max_steps": 2}, overwrite=True))
    after = sorted(p.name for p in data.iterdir())
    assert set(before) <= set(after)
    assert set(after) - set(before) <= {"checkpoints", "final", "loss.png", "metrics.jsonl", "run_config.json",
                                        "vae_report.json"}  # fmt: skip
    assert (data / "notes.txt").read_text(encoding="utf-8") == "mine"
    rows = [json.loads(line) for line in (data / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]  # the first run's rows went with it


def test_a_checkpoint_that_does_not_fit_the_run_is_one_line(folder, tmp_path):
    """--resume naming another kind of run's checkpoint, or a damaged one."""
    from taiyi.train.uncond import UncondTrainConfig, train_uncond

    other = train_uncond(
        UncondTrainConfig(data=[str(folder)], output=str(tmp_path / "u"), max_steps=1, resolution=32,
                          block_out_channels=(8, 16), norm_num_groups=8, batch_size=2, save_every=0, val_images=0,
                          report_to="none")
    )  # fmt: skip
    foreign = tmp_path / "u" / "checkpoints" / "step-000001"
    assert other["step"] == 1 and foreign.is_dir()
    settings = dict(data=[str(folder)], output=str(tmp_path / "v"), max_steps=2, **TINY)
    with pytest.raises(InvalidInputError, match=f"checkpoint {foreign} does not load into this run"):
        train_vae(VAETrainConfig(**settings, resume=str(foreign)))
    own = train_vae(VAETrainConfig(**{**settings, "output": str(tmp_path / "w"), "max_steps": 1}))
    weights = own["output"] / "checkpoints" / "step-000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short
    with pytest.raises(InvalidInputError, match="does not load into this run"):
        train_vae(VAETrainConfig(**{**settings, "output": str(tmp_path / "w")}, resume="latest"))


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    import logging

    data = write_folder(tmp_path / "data", 10, seed=0, size=32)
    pictures = sorted(data.glob("*.png"))
    pictures[0].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    pictures[1].write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="taiyi"):
        result = train_vae(VAETrainConfig(data=[str(data)], output=str(tmp_path / "run"), max_steps=1, **TINY))
    assert result["step"] == 1
    said = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{data}: skipped 2 samples"), said


def test_the_same_signal_twice_stops_at_once():
    """The first Ctrl-C or SIGTERM is a request; the second Ctrl-C raises, the second SIGTERM goes to the handler
    found before; another signal does not count as a second; the handlers are put back."""
    import os
    import signal

    from taiyi.train.common import StopOnSignal

    seen = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGINT
            os.kill(os.getpid(), signal.SIGTERM)  # torchrun's SIGTERM after the terminal's Ctrl-C: still a request
            assert stop.signum == signal.SIGINT and seen == []
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM and seen == []
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == [signal.SIGTERM]
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_cosine_schedule_decays_to_zero_and_resumes_on_it(folder, tmp_path):
    settings = dict(data=[str(folder)], lr=1e-3, lr_scheduler="cosine", warmup_steps=1, **TINY)
    straight = train_vae(VAETrainConfig(output=str(tmp_path / "a"), max_steps=5, **settings))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["kind"] == "train"]
    cosine = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]  # warm-up step, then 4 decaying steps
    assert lrs == pytest.approx([0.0] + [1e-3 * f for f in cosine])
    first = train_vae(VAETrainConfig(output=str(tmp_path / "b"), max_steps=5, **{**settings, "save_every": 2}))
    shutil.rmtree(tmp_path / "b" / "final")
    for later in ("step-000004", "step-000005"):
        shutil.rmtree(tmp_path / "b" / "checkpoints" / later, ignore_errors=True)
    resumed = train_vae(
        VAETrainConfig(output=str(tmp_path / "b"), max_steps=5, resume="latest", **{**settings, "save_every": 2})
    )
    assert resumed["resumed_from"].name == "step-000002"
    assert first["losses"] == pytest.approx(straight["losses"], abs=1e-6)
    assert resumed["losses"] == pytest.approx({k: straight["losses"][k] for k in (3, 4, 5)}, abs=1e-6)


def test_a_run_recorded_before_lr_scheduler_existed_still_resumes(folder, tmp_path):
    settings = dict(data=[str(folder)], **{**TINY, "save_every": 1})
    train_vae(VAETrainConfig(output=str(tmp_path / "r"), max_steps=1, **settings))
    recorded = tmp_path / "r" / "run_config.json"
    old = {k: v for k, v in json.loads(recorded.read_text()).items() if k != "lr_scheduler"}
    recorded.write_text(json.dumps(old))
    resumed = train_vae(VAETrainConfig(output=str(tmp_path / "r"), max_steps=2, resume="latest", **settings))
    assert resumed["resumed_from"].name == "step-000001" and sorted(resumed["losses"]) == [2]
    with pytest.raises(InvalidInputError, match="lr_scheduler"):  # a different schedule is another run
        train_vae(
            VAETrainConfig(output=str(tmp_path / "r"), max_steps=3, resume="latest", lr_scheduler="cosine", **settings)
        )


def test_metrics_helpers():
    grey = torch.zeros(1, 3, 4, 4)
    assert chroma(grey) == 0.0 and chroma(torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)) == 1.0
    assert psnr(grey + 0.2, grey) == pytest.approx(20.0, abs=1e-4)  # error 0.1 on the 0–1 scale


def test_cli_trains_and_refuses_bad_input_in_one_line(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "vae", "--data", str(folder), "--output", str(out), "--max-steps", "1"]
    fast = ["--resolution", "32", "--block-out-channels", "8,16,16", "--norm-num-groups", "8", "--batch-size", "4"]
    fast += ["--report-to", "none", "--scale-images", "8"]
    assert main(args + fast) == 0
    assert capsys.readouterr().out.strip() == str(out / "final")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["train", "vae", "--data", str(empty), "--output", str(tmp_path / "e")] + fast, "no image"),
        (args + fast + ["--lr", "-1"], "--lr must be positive"),
        (args + fast + ["--seed", "-1"], "--seed must be between 0 and 4294967295, not -1"),
        (args + fast + ["--lr-scheduler", "step"], "--lr-scheduler must be one of constant, linear, cosine"),
        (args + fast, "holds this run already"),
        (args + fast[:4] + ["--norm-num-groups", "3"], "--norm-num-groups"),
        (args + ["--block-out-channels", "8,x"], "comma-separated"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("taiyi: error:") and "\n" not in err and message in err, err
    with pytest.raises(InvalidInputError, match="--kl-weight"):
        train_vae(VAETrainConfig(data=[str(folder)], output=str(tmp_path / "k"), kl_weight=-1.0))


def test_decoder_only_fine_tune_keeps_encoder_latents_and_scaling_factor(folder, tmp_path):
    """--init + --decoder-only (Stable Diffusion's ft-MSE VAE): only the decoder moves, so a UNet trained on the
    init's latents stays valid; the init's architecture is taken whatever the size settings say."""
    from diffusers import AutoencoderKL

    base = train_vae(VAETrainConfig(data=[str(folder)], output=str(tmp_path / "base"), max_steps=2, **TINY))["final"]
    pipeline = tmp_path / "pipe"  # a pipeline folder with vae/ is accepted too
    shutil.copytree(base, pipeline / "vae")
    settings = {**TINY, "block_out_channels": (16, 16), "lr": 1e-2}  # overridden by the init's (8, 16, 16)
    tuned = train_vae(
        VAETrainConfig(
            data=[str(folder)],
            output=str(tmp_path / "ft"),
            max_steps=3,
            init=str(pipeline),
            decoder_only=True,
            **settings,
        )
    )
    before, after = load_file(base / WEIGHTS), load_file(tuned["final"] / WEIGHTS)
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    moved = [
        k for k in before if k.startswith(("decoder.", "post_quant_conv.")) and not torch.equal(before[k], after[k])
    ]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert len(moved) > 10
    a, b = AutoencoderKL.from_pretrained(base), AutoencoderKL.from_pretrained(tuned["final"])
    assert b.config.block_out_channels == [8, 16, 16] and b.config.scaling_factor == a.config.scaling_factor
    recorded = json.loads((tmp_path / "ft" / "run_config.json").read_text())
    assert recorded["block_out_channels"] == [8, 16, 16] and recorded["decoder_only"] is True
    # without --decoder-only the whole autoencoder goes on training and the scale is measured again
    whole = train_vae(
        VAETrainConfig(data=[str(folder)], output=str(tmp_path / "all"), max_steps=1, init=str(base), **TINY)
    )
    encoder = [k for k in frozen if not torch.equal(before[k], load_file(whole["final"] / WEIGHTS)[k])]
    assert encoder and whole["export"]["scaling_factor"] != pytest.approx(a.config.scaling_factor, rel=1e-9)


def test_decode_padding_trains_the_decoder_on_padded_latents_and_is_written_into_its_config(folder, tmp_path):
    """--decode-padding N: the decoder trains on latents padded by N cells (edge values repeated) with the margin
    cropped off, and the exported config says so (``_taiyi_decode_padding``), so taiyi decodes it padded ever
    after; a later fine-tune of that VAE keeps its padding unless told otherwise."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    from taiyi.loading import DECODE_PADDING_KEY
    from taiyi.train.uncond import load_vae

    base = train_vae(VAETrainConfig(data=[str(folder)], output=str(tmp_path / "base"), max_steps=1, **TINY))["final"]
    assert DECODE_PADDING_KEY not in json.loads((base / "config.json").read_text())
    tuned = train_vae(
        VAETrainConfig(
            data=[str(folder)], output=str(tmp_path / "ft"), max_steps=2, init=str(base), decoder_only=True,
            decode_padding=2, **TINY,
        )
    )  # fmt: skip
    assert json.loads((tuned["final"] / "config.json").read_text())[DECODE_PADDING_KEY] == 2
    stock, ours = AutoencoderKL.from_pretrained(tuned["final"]).eval(), load_vae(tuned["final"])
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = stock.decode(F.pad(z, (2, 2, 2, 2), mode="replicate")).sample[..., 8:-8, 8:-8]  # factor 4
        assert torch.allclose(ours.decode(z).sample, expected, atol=1e-5)
    again = train_vae(
        VAETrainConfig(
            data=[str(folder)], output=str(tmp_path / "ft2"), max_steps=1, init=str(tuned["final"]),
            decoder_only=True, **TINY,
        )
    )  # fmt: skip
    assert json.loads((again["final"] / "config.json").read_text())[DECODE_PADDING_KEY] == 2


def test_decoder_only_refuses_bad_input_in_one_line(folder, tmp_path, capsys):
    bad = tmp_path / "notvae"
    bad.mkdir()
    (bad / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    base = ["train", "vae", "--data", str(folder), "--output", str(tmp_path / "o"), "--report-to", "none"]
    cases = [
        (base + ["--decoder-only"], "--decoder-only needs --init"),
        (base + ["--init", str(bad)], "is not an AutoencoderKL folder"),
        (base + ["--init", str(pickled)], "pickle"),
        (base + ["--init", str(bad), "--block-out-channels", "8,16"], "--init sets the architecture"),
        (base + ["--decode-padding", "-1"], "--decode-padding must be 0 or more"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("taiyi: error:") and "\n" not in err and message in err, err
    assert not (tmp_path / "o").exists()
