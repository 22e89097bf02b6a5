"""A user making generation faster or lighter on a laptop CPU: TAIYI_BACKEND, the OpenVINO cache, --memory, bench.

Loads OpenVINO's runtime: run this file in its own process, like tests/test_backends.py (see the Makefile).
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from taiyi import backends, bench
from taiyi.errors import InvalidInputError
from taiyi.pipeline import load_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_openvino = pytest.mark.skipif(backends._openvino() is None, reason="openvino is not installed")


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("TAIYI_CACHE", str(folder))
    return folder / "openvino"


@needs_openvino
def test_taiyi_backend_openvino_keeps_a_lora_in_the_picture(tiny_zh, tmp_path, cache, monkeypatch):
    """TAIYI_BACKEND=openvino and --lora: the converted UNet has no LoRA in it, so it ran without the LoRA's UNet
    half (only the text encoder's), silently; as for auto, LoRAs now keep PyTorch."""
    from test_lora import random_lora  # pytest's default import mode puts this folder on sys.path

    lora = random_lora(tiny_zh, tmp_path / "lora", seed=3)
    torch_pipe = load_pipeline(tiny_zh, safety_checker=False, backend="torch", loras=[lora])
    want = torch_pipe.generate("山水", steps=2, seed=1)
    monkeypatch.setenv(backends.BACKEND_ENV, "openvino")
    pipe = load_pipeline(tiny_zh, safety_checker=False, loras=[lora])
    assert pipe.backend == "torch" and not cache.exists()  # nothing converted
    assert np.array_equal(_pixels(pipe.generate("山水", steps=2, seed=1)), _pixels(want))
    assert backends.resolve_backend("auto", torch.device("cpu"), torch.float32, memory="low") == "torch"  # as auto


def test_taiyi_backend_errors_name_the_variable_not_a_flag_never_given(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, "openvino")
    with pytest.raises(InvalidInputError, match=r"^TAIYI_BACKEND=openvino runs on the CPU in float32 \(here cpu, bf"):
        backends.resolve_backend("auto", torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(backends, "_openvino", lambda: None)  # not installed
    with pytest.raises(InvalidInputError, match="TAIYI_BACKEND=openvino needs the openvino package.*unset TAIYI_BACK"):
        backends.resolve_backend("auto", torch.device("cpu"), torch.float32)
    with pytest.raises(InvalidInputError, match="^the openvino backend needs the openvino package"):  # asked by name
        backends.resolve_backend("openvino", torch.device("cpu"), torch.float32)


@needs_openvino
def test_openvino_with_memory_low_says_the_unet_is_not_sliced(log_warnings):
    assert backends.resolve_backend("openvino", torch.device("cpu"), torch.float32, memory="low") == "openvino"
    assert "--memory low slices attention in PyTorch's UNet only" in log_warnings.text


@needs_openvino
def test_a_cache_entry_missing_its_xml_is_rebuilt(tiny_zh, cache):
    """Its unet.xml deleted by hand: every load failed with 'cannot write the OpenVINO cache …: Directory not
    empty', for good."""
    a = load_pipeline(tiny_zh, safety_checker=False, backend="openvino").generate("山水", steps=2, seed=4)
    (entry,) = cache.iterdir()
    (entry / "unet.xml").unlink()
    pipe = load_pipeline(tiny_zh, safety_checker=False, backend="openvino")
    assert (entry / "unet.xml").is_file() and [p.name for p in cache.iterdir()] == [entry.name]
    assert np.array_equal(_pixels(pipe.generate("山水", steps=2, seed=4)), _pixels(a))


@needs_openvino
@pytest.mark.parametrize("failure", ["read-only", "disk full"])
def test_an_unwritable_cache_runs_the_conversion_from_memory(tiny_zh, cache, monkeypatch, log_warnings, failure):
    """An unwritable cache (a read-only home in a container) refused the backend, and a full disk (OpenVINO's
    writer raises RuntimeError) ended in a traceback; it now runs, and says the conversion is paid at every load."""
    if failure == "read-only":

        def fail(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(cache))

        monkeypatch.setattr(backends.tempfile, "mkdtemp", fail)
    else:

        def fail(*args, **kwargs):
            raise RuntimeError("Exception from src/core/src/pass/serialize.cpp: Permission denied\nmore")

        monkeypatch.setattr(backends._openvino(), "save_model", fail)
    want = load_pipeline(tiny_zh, safety_checker=False, backend="torch").generate("山水", steps=3, seed=2)
    pipe = load_pipeline(tiny_zh, safety_checker=False, backend="openvino")
    got = pipe.generate("山水", steps=3, seed=2)
    assert pipe.sd.unet._taiyi_openvino_calls == 3
    assert np.abs(_pixels(got) - _pixels(want)).max() <= (2 if pipe.sd.unet._taiyi_openvino_precision == "f32" else 24)
    assert "cannot write the OpenVINO cache" in log_warnings.text and "Permission denied" in log_warnings.text
    assert not [p for p in cache.rglob("*") if p.is_file()]  # nothing half-written


@needs_openvino
def test_a_moved_checkpoint_reuses_its_conversion(tiny_zh, tmp_path, cache, monkeypatch):
    """The fingerprint held the folder the UNet was loaded from: the same weights copied elsewhere (another hub
    snapshot, a moved folder) were converted again, one more full-size entry in the cache each time."""
    moved = shutil.copytree(tiny_zh, tmp_path / "moved")
    load_pipeline(tiny_zh, safety_checker=False, backend="openvino")
    converted = []
    real_convert = backends._convert
    monkeypatch.setattr(backends, "_convert", lambda unet, to: converted.append(to) or real_convert(unet, to))
    load_pipeline(moved, safety_checker=False, backend="openvino")
    assert converted == [] and len(list(cache.iterdir())) == 1


def test_the_fingerprint_changes_with_the_diffusers_that_is_traced(pipe_zh, monkeypatch):
    """diffusers' UNet forward is what the IR holds: an upgrade must not reuse IR traced from the old code."""
    import diffusers

    key = backends.unet_fingerprint(pipe_zh.sd.unet)
    monkeypatch.setattr(diffusers, "__version__", "0.0.1")
    assert backends.unet_fingerprint(pipe_zh.sd.unet) != key


def test_taiyi_cache_with_a_tilde_is_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TAIYI_CACHE", "~/taiyi-cache")  # as a .env file or a systemd unit passes it
    assert backends.cache_dir() == tmp_path / "taiyi-cache"


def _fake_result(engine: str, image_s: float, unet_step_s: float) -> dict:
    return {"engine": engine, "scheduler": "x", "steps": 2, "guidance_end": 1.0, "dtype": "float32", "size": 64,
            "image_s": image_s, "unet_step_s": unet_step_s, "unet_calls_per_image": 2, "text_encode_s": 0.0,
            "vae_decode_s": 0.0, "peak_rss_mb": 400.0}  # fmt: skip


def test_bench_checks_the_openvino_engine_before_timing_anything(monkeypatch):
    """It failed in its child, after the engines before it had run, saying '--backend torch' (no such option)."""
    ran = []
    monkeypatch.setattr(bench, "run_engine", lambda config: ran.append(config.engine) or _fake_result("taiyi", 1, 1))
    with pytest.raises(InvalidInputError, match=r"^--engine taiyi-openvino runs on the CPU in float32 \(here cpu, bf"):
        bench.bench("m", engines=("taiyi", "taiyi-openvino"), size=64, dtype="bfloat16")
    monkeypatch.setattr(backends, "_openvino", lambda: None)
    with pytest.raises(InvalidInputError, match="^--engine taiyi-openvino needs the openvino package"):
        bench.bench("m", engines=("taiyi", "taiyi-openvino"), size=64)
    assert ran == []


def test_bench_ratios_without_taiyi_are_against_the_first_engine(monkeypatch):
    """Without the taiyi engine the report had no ratios at all; and 0.5× read as a speed-up of 0.5."""
    times = {"taiyi-openvino": (2.0, 0.2), "stock-matched": (1.0, 0.1)}
    monkeypatch.setattr(bench, "run_engine", lambda config: _fake_result(config.engine, *times[config.engine]))
    report = bench.bench("m", engines=("taiyi-openvino", "stock-matched"), size=64)
    assert report["ratios"] == {"stock-matched / taiyi-openvino, per image": 0.5,
                                "stock-matched / taiyi-openvino, per UNet call": 0.5}  # fmt: skip
    assert "stock-matched / taiyi-openvino, per image: 0.50× the time" in bench.format_table(report)


def test_bench_output_that_is_a_folder_is_refused_in_its_own_words(tmp_path, capsys):
    from taiyi.cli import main

    assert main(["bench", "--model", str(tmp_path / "none"), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"taiyi: error: {tmp_path} is a folder; give a file name for the JSON report"]  # not ".png"


def test_sd_memory_compares_the_modes_on_one_backend(monkeypatch, tmp_path, tiny_zh, capsys):
    """Under the default auto a CPU with bf16 instructions ran off and auto in OpenVINO and low in PyTorch."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import sd_memory

    children = []

    class Done:
        returncode, stderr = 0, ""
        stdout = json.dumps({"peak_rss_mb": 1.0})

    def run(cmd, **kwargs):
        if cmd[:2] != [sys.executable, "-c"]:  # platform's own (uname)
            return real_run(cmd, **kwargs)
        children.append(cmd[2])
        return Done()

    real_run = sd_memory.subprocess.run
    monkeypatch.setattr(sd_memory.subprocess, "run", run)
    out = tmp_path / "m.json"
    assert sd_memory.main(["--model", str(tiny_zh), "--modes", "off,low", "--json", str(out)]) == 0
    assert len(children) == 2 and all("backend='torch'" in code for code in children)
    assert json.loads(out.read_text())["backend"] == "torch"
    with pytest.raises(SystemExit) as stop:  # a typo fails before the first child's minutes
        sd_memory.main(["--model", str(tiny_zh), "--modes", "off,tiny"])
    assert stop.value.code == 2 and "unknown memory mode 'tiny'" in capsys.readouterr().err


def test_bench_gives_every_engine_the_same_threads(tiny_zh):
    """--threads beyond the usable cores was capped for taiyi (load_pipeline) but not for stock, which then ran
    oversubscribed and slower: a ratio in taiyi's favour that was not taiyi's."""
    from taiyi.loading import cpu_count

    config = bench.BenchConfig(
        "stock-matched", str(tiny_zh), size=64, steps=1, runs=1, warmup=0, threads=cpu_count() + 3
    )
    result = bench.measure(config)
    assert result["threads"] == cpu_count() == torch.get_num_threads()
    report = {"results": [result], "ratios": {}, "machine": bench.machine()}
    assert f"torch threads {cpu_count()}," in bench.format_table(report)


def test_a_mistyped_allocator_setting_is_said(monkeypatch, log_warnings):
    monkeypatch.setattr(backends, "_allocator_tuned", None)
    monkeypatch.setenv(backends.CPU_ALLOCATOR_ENV, "sytem")
    tuned = backends.tune_cpu_allocator()
    assert "TAIYI_CPU_ALLOCATOR=sytem is not 'system'" in log_warnings.text
    assert tuned == backends.tune_cpu_allocator()  # once per process
    monkeypatch.setattr(backends, "_allocator_tuned", None)
    monkeypatch.setenv(backends.CPU_ALLOCATOR_ENV, " System ")
    assert backends.tune_cpu_allocator() is False


def test_a_bench_child_killed_for_memory_is_said(monkeypatch):
    """A 1024² run on a laptop: the OOM killer's SIGKILL left 'failed: no output'."""
    import subprocess

    from taiyi.errors import TaiyiError

    killed = subprocess.CompletedProcess([], -9, stdout="", stderr="")
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: killed)
    with pytest.raises(TaiyiError, match="^benchmark of stock failed: killed by signal 9 \\(out of memory\\?"):
        bench.run_engine(bench.BenchConfig("stock", "m"))
