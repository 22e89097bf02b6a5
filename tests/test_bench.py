"""taiyi bench: each engine measured in its own process; the table and ratios are built from what ran."""

from __future__ import annotations

import json

import pytest

from taiyi.bench import bench, format_table
from taiyi.errors import InvalidInputError
from taiyi.schedulers import DEFAULT_SCHEDULER


def test_bench_measures_taiyi_and_stock_on_the_same_weights(tiny_zh):
    report = bench(str(tiny_zh), engines=("taiyi", "stock"), size=64, steps=3, runs=1, warmup=0, threads=1)
    taiyi, stock = report["results"]
    assert (taiyi["engine"], taiyi["steps"], taiyi["scheduler"]) == ("taiyi", 3, DEFAULT_SCHEDULER)
    assert (stock["engine"], stock["steps"]) == ("stock", 50)  # the model card's defaults, not ours
    assert stock["scheduler"] == "PNDMScheduler"
    # classifier-free guidance: one batched UNet call per step (PNDM's PLMS takes one extra warm-up call)
    assert taiyi["unet_calls_per_image"] == 3 and stock["unet_calls_per_image"] in (50, 51)
    for r in (taiyi, stock):
        assert r["image_s"] > 0 and r["unet_step_s"] > 0 and r["peak_rss_mb"] > 100
        assert r["image_s"] >= r["unet_step_s"] * r["unet_calls_per_image"]
    assert report["ratios"]["stock / taiyi, per image"] == pytest.approx(stock["image_s"] / taiyi["image_s"])
    table = format_table(report)
    assert "stock / taiyi, per image" in table and report["machine"]["usable_cores"] >= 1
    json.dumps(report)


def test_bench_bad_input():
    with pytest.raises(InvalidInputError, match="unknown engine"):
        bench("x", engines=("onnx",))
    with pytest.raises(InvalidInputError, match="multiple of 8"):
        bench("x", size=65)
    with pytest.raises(InvalidInputError, match="--steps must be between 1 and 1000, not 0"):
        bench("x", steps=0)  # was taken as "the default" and ran a full benchmark
    with pytest.raises(InvalidInputError, match="--threads must be at least 1, not 0"):
        bench("x", threads=0)


def test_bench_cli_one_line_for_missing_model(capsys, tmp_path):
    from taiyi.cli import main

    assert main(["bench", "--model", str(tmp_path / "none"), "--runs", "1"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bench_refuses_a_taken_output_before_timing(capsys, tmp_path):
    from taiyi.cli import main

    taken = tmp_path / "bench.json"
    taken.write_text("{}")
    assert main(["bench", "--model", str(tmp_path / "none"), "-o", str(taken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"taiyi: error: {taken} already exists; pass --overwrite to replace it"]  # not the missing model
    assert taken.read_text() == "{}"
