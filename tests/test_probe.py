"""The attribute probe: deterministic training, save → load → the same readings, a trivially separable case
learned in a few steps, and accuracy counting only what a target names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from taiyi.data import shanshui
from taiyi.data.shanshui import Scene
from taiyi.errors import InvalidInputError, ModelLoadError, OutputError
from taiyi.recipe.probe import AttributeProbe, ProbeConfig, attribute_accuracy, train_probe

TINY = dict(size=32, width=4, batch_size=8, steps=3, eval_scenes=0, threads=1)


def _scenes(n: int, seed: int, only_times=None) -> list[Scene]:
    g = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        scene = shanshui.sample_scene(g, "all")
        if only_times is None or scene.time in only_times:
            out.append(scene)
    return out


def test_train_save_load_gives_the_same_readings_and_is_deterministic(tmp_path):
    saved = torch.get_num_threads()
    a = train_probe(ProbeConfig(output=str(tmp_path / "a"), **TINY))
    b = train_probe(ProbeConfig(output=str(tmp_path / "b"), **TINY))
    assert torch.get_num_threads() == saved  # the thread setting is restored
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert sorted(p.name for p in a.iterdir()) == ["config.json", "model.safetensors"]
    record = json.loads((a / "config.json").read_text(encoding="utf-8"))
    assert record["heads"]["time"] == list(shanshui.TIMES) and record["things"] == list(shanshui.THINGS)

    images = [shanshui.render(s, 32, i) for i, s in enumerate(_scenes(6, 1))]
    first = AttributeProbe.from_pretrained(a).predict(images)
    again = AttributeProbe.from_pretrained(a).predict(images)
    assert first == again
    assert AttributeProbe.from_pretrained(a).predict(images[:1]) == first[:1]  # a batch equals its singles
    for reading in first:
        assert set(reading) == {"time", "sky", "land", "water", "style", "things"}
        assert reading["time"] in shanshui.TIMES and reading["water"] in shanshui.WATERS
        assert set(reading["things"]) <= set(shanshui.THINGS)

    with pytest.raises(OutputError, match="exists"):
        train_probe(ProbeConfig(output=str(a), **TINY))
    with pytest.raises(InvalidInputError, match="lr must be positive"):
        train_probe(ProbeConfig(output=str(tmp_path / "c"), **{**TINY, "lr": -1.0}))
    with pytest.raises(InvalidInputError, match="seed must be between 0 and 4294967295, not -1"):
        train_probe(ProbeConfig(output=str(tmp_path / "c"), **{**TINY, "seed": -1}))  # numpy's ValueError before
    with pytest.raises(ModelLoadError, match="not an attribute probe"):
        AttributeProbe.from_pretrained(tmp_path)


def test_a_short_run_tells_night_from_noon(tmp_path):
    only = {"time": ["正午", "夜晚"]}
    config = ProbeConfig(
        output=str(tmp_path / "p"), size=32, width=8, batch_size=16, steps=25, lr=3e-3, only=only, eval_scenes=0
    )
    probe = AttributeProbe.from_pretrained(train_probe(config))
    scenes = _scenes(60, 7, only_times=only["time"])
    images = [shanshui.render(s, 32, [7, i]) for i, s in enumerate(scenes)]
    accuracy = attribute_accuracy(probe.predict(images), [{"time": s.time} for s in scenes])
    assert list(accuracy) == ["time"]  # only what the targets name is judged
    assert accuracy["time"] >= 0.9, accuracy


def test_accuracy_counts_what_each_target_names():
    scene = Scene("夜晚", "月亮", "高山", "江河", {"小桥"}, "水墨")
    right = {"time": "夜晚", "sky": "月亮", "land": "高山", "water": "江河", "style": "水墨", "things": ["小桥"]}
    wrong = {**right, "time": "正午", "things": ["小桥", "松树"]}
    full = attribute_accuracy([right, wrong], [scene, scene])
    assert full["time"] == 0.5 and full["land"] == 1.0
    assert full["things"] == pytest.approx(5 / 6) and full["things/松树"] == 0.5 and full["things/小桥"] == 1.0
    named = attribute_accuracy([wrong], [{"time": "夜晚", "things": ["小桥"]}])
    assert named == {"time": 0.0, "things": 1.0, "things/小桥": 1.0}  # an extra thing seen is not judged
    with pytest.raises(InvalidInputError, match="one target each"):
        attribute_accuracy([right], [])
    with pytest.raises(InvalidInputError, match="unknown attribute"):
        attribute_accuracy([right], [{"colour": "red"}])
