"""Prompt interrogation (提示词反推): the embedded CLIP reads rendered 山水 scenes back into their words, the
vocabularies are checked, and the command line says what it read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from taiyi.data import shanshui
from taiyi.errors import InvalidInputError
from taiyi.interrogate import VOCABULARIES, default_threshold, interrogate, load_vocabulary, vocabulary_for
from taiyi.testing import assert_user_error
from taiyi.testing import run_cli as run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mini_clip():
    from taiyi.clip import load_clip

    return load_clip("taiyi-mini-clip", device="cpu")


def scenes(n: int = 8):
    g = np.random.default_rng(5)
    drawn = [shanshui.sample_scene(g, "heldout") for _ in range(n)]
    return drawn, [shanshui.render(s, 64, [5, i]) for i, s in enumerate(drawn)]


def test_the_embedded_clip_reads_held_out_scenes_back_into_the_worlds_words(mini_clip):
    drawn, images = scenes()
    readings = interrogate(mini_clip, images, "shanshui")
    for scene, reading in zip(drawn, readings, strict=True):
        words = reading.prompt.split("，")
        assert scene.time in words and scene.style in words  # 100 % and 94 % over 200 held-out scenes
        assert [p["category"] for p in reading.picks] == list(VOCABULARIES["shanshui"])
        assert words == [p["word"] for p in reading.picks if p["kept"]]
        for pick in reading.picks:
            assert pick["kept"] == (
                pick["probability"] >= default_threshold(len(VOCABULARIES["shanshui"][pick["category"]]))
            )
    strict = interrogate(mini_clip, images[:2], {"时间": ["清晨", "正午", "黄昏", "夜晚"]}, min_probability=1.0)
    assert [r.prompt for r in strict] == ["", ""] and len(strict[0].picks) == 1  # read, not sure enough to keep


@pytest.mark.parametrize(
    ("vocabulary", "words"),
    [
        ({}, "JSON object of categories"),
        ({"时间": ["清晨"]}, "at least two words"),
        ({"时间": ["清晨", "清晨"]}, "repeats a word"),
        ({"时间": ["清晨", ""]}, "empty or non-text"),
        ({"a": [str(i) for i in range(201)]}, "at most 200"),
        ("painterly", "neither one of shanshui, general"),
    ],
)
def test_vocabularies_are_checked(vocabulary, words):
    with pytest.raises(InvalidInputError, match=words):
        load_vocabulary(vocabulary)


def test_the_embedded_clip_reads_its_own_world_and_others_general_words():
    assert vocabulary_for("taiyi-mini-clip") == "shanshui" and vocabulary_for("IDEA-CCNL/Taiyi-CLIP") == "general"
    assert load_vocabulary("general")[1] is None  # read in the CLIP's own templates


def test_interrogate_command_prints_each_pictures_prompt(capsys, tmp_path, mini_clip):
    drawn, images = scenes(2)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    code, out, _ = run(capsys, "clip", "interrogate", *paths)
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
    assert drawn[0].time in lines[0].split("\t")[1]
    vocabulary = tmp_path / "v.json"
    vocabulary.write_text(json.dumps({"画风": ["写实", "水墨", "水彩", "油画"]}, ensure_ascii=False), encoding="utf-8")
    code, out, _ = run(capsys, "clip", "interrogate", paths[0], "--vocabulary", vocabulary, "--json")
    result = json.loads(out)[0]
    assert code == 0 and result["prompt"] == drawn[0].style and result["picks"][0]["category"] == "画风"
    vocabulary.write_text("{broken", encoding="utf-8")
    for args, words in [
        (["--vocabulary", vocabulary], "cannot read the vocabulary"),
        (["--vocabulary", "painterly"], "neither one of shanshui"),
        (["--min-probability", 0], "in (0, 1]"),
    ]:
        code, _, err = run(capsys, "clip", "interrogate", paths[0], *args)
        assert_user_error(code, err, words)


def test_the_server_interrogates_with_the_clips_own_vocabulary_or_one_sent_never_a_server_file(pipe_zh, mini_clip):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    pytest.importorskip("httpx2", reason="httpx2 (FastAPI's TestClient transport) is not installed")
    import base64
    import io

    from fastapi.testclient import TestClient

    from taiyi.serve import ServeConfig, create_app

    drawn, images = scenes(2)
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    app = create_app(ServeConfig(clip_model="taiyi-mini-clip"), pipeline=pipe_zh, clip=mini_clip)
    with TestClient(app) as c:
        body = c.post("/v1/clip/interrogate", json={"images": encoded}).json()
        assert body["vocabulary"] == "shanshui" and body["model"] == "taiyi-mini-clip"
        assert [d["prompt"] for d in body["data"]] == [r.prompt for r in interrogate(mini_clip, images, "shanshui")]
        own = c.post("/v1/clip/interrogate", json={"images": encoded[:1], "vocabulary": {"画风": ["水墨", "油画"]}})
        assert own.json()["vocabulary"] == "custom" and len(own.json()["data"][0]["picks"]) == 1
        for vocabulary in ["/etc/passwd", {"画风": ["水墨"]}]:
            refused = c.post("/v1/clip/interrogate", json={"images": encoded[:1], "vocabulary": vocabulary})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "vocabulary"
        refused = c.post("/v1/clip/interrogate", json={"images": encoded[:1], "min_probability": 2})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "min_probability"
