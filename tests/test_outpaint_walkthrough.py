"""Walk-through of 扩图 (outpainting) and 提示词反推 (prompt interrogation) as a user meets them: wide margins,
vocabulary files saved by Windows Notepad or in GB18030, a category typed twice, a pasted essay for a word, one
picture given by its path; and what needed a change outside these modules (the command and the server)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from taiyi.errors import InvalidInputError
from taiyi.interrogate import interrogate, load_vocabulary
from taiyi.outpaint import fill_masked, outpaint_canvas
from taiyi.testing import assert_user_error
from taiyi.testing import run_cli as run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OWN = {"画风": ["水墨", "油画", "水彩"], "时间": ["清晨", "黄昏"]}


@pytest.fixture(scope="module")
def mini_clip():
    from taiyi.clip import load_clip

    return load_clip("taiyi-mini-clip", device="cpu")


@pytest.fixture(scope="module")
def scene():
    from taiyi.data import shanshui

    return shanshui.render(shanshui.sample_scene(np.random.default_rng(3), "heldout"), 64, [3, 0])


# ------------------------------------------------------------------------------------------------------- 扩图


def test_a_wide_margin_starts_from_the_pictures_colours_everywhere_not_black():
    # beyond the widest blur's reach (a few hundred pixels) the fill was black, which shows below strength 1
    picture = Image.new("RGB", (32, 32), (200, 180, 40))
    canvas, mask = outpaint_canvas(picture, 1024, 0, 0, 16)
    pixels = np.asarray(canvas, dtype=np.int16)  # (48, 1056, 3)
    assert np.abs(pixels - np.array([200, 180, 40])).max() <= 12  # was 200 (black); 8-bit blurs round, as in A1111
    assert np.asarray(mask)[:, :1024].min() == 255 and np.asarray(mask)[:32, 1024:].max() == 0


def test_the_fill_keeps_a_two_coloured_pictures_sides_and_its_mean_far_away():
    picture = Image.new("RGB", (32, 32), (220, 30, 30))
    picture.paste((30, 30, 220), (0, 16, 32, 32))  # red top half, blue bottom half
    canvas, mask = outpaint_canvas(picture, 0, 0, 1000, 0)
    pixels = np.asarray(canvas, dtype=np.int16)
    assert np.array_equal(pixels[:, :32], np.asarray(picture))
    near_top, near_bottom = pixels[2, 34], pixels[29, 34]
    assert near_top[0] > near_top[2] + 100 and near_bottom[2] > near_bottom[0] + 100
    assert np.abs(pixels[:, -1] - np.array([125, 30, 125])).max() <= 8  # far away: the two colours' mean
    assert np.array_equal(np.asarray(fill_masked(picture, Image.new("L", (32, 32), 0))), np.asarray(picture))


# -------------------------------------------------------------------------------------------------- 提示词反推


@pytest.mark.parametrize("encoding", ["utf-8-sig", "gb18030", "utf-16"])
def test_a_vocabulary_saved_by_notepad_or_in_gb18030_is_read(tmp_path, encoding):
    path = tmp_path / "v.json"
    path.write_text(json.dumps(OWN, ensure_ascii=False), encoding=encoding)
    categories, templates = load_vocabulary(path)
    assert categories == {k: tuple(v) for k, v in OWN.items()} and templates is None


def test_a_category_named_twice_is_refused_not_half_dropped(tmp_path):
    path = tmp_path / "v.json"
    path.write_text('{"画风": ["水墨", "油画"], "画风": ["水彩", "素描"]}', encoding="utf-8")
    with pytest.raises(InvalidInputError, match="'画风' is named twice"):
        load_vocabulary(path)


def test_an_overlong_word_or_file_is_refused_before_the_text_tower_reads_it(tmp_path):
    # a 50 MB "word" passed every check and held the text tower for over ten minutes
    with pytest.raises(InvalidInputError, match="a word of 101 characters; at most 100"):
        load_vocabulary({"画风": ["水" * 101, "油画"]})
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"画风": ["x" * (1 << 20), "油画"]}), encoding="utf-8")
    with pytest.raises(InvalidInputError, match="over 1 MB"):
        load_vocabulary(path)


def test_one_picture_given_by_its_path_is_one_picture(mini_clip, scene, tmp_path):
    path = tmp_path / "scene.png"
    scene.save(path)
    want = interrogate(mini_clip, [scene], OWN)
    for one in (str(path), path):  # a path string was read as one file per character
        got = interrogate(mini_clip, one, OWN)
        assert len(got) == 1 and got[0].prompt == want[0].prompt and got[0].picks == want[0].picks


def test_a_word_two_categories_share_is_said_once(mini_clip, scene):
    shared = {"时间": ["黄昏", "正午"], "光线": ["黄昏", "正午"], "画风": ["水墨", "油画"]}
    reading = interrogate(mini_clip, [scene], shared, min_probability=1e-6)[0]
    first, second, style = (p["word"] for p in reading.picks)
    assert first == second and reading.prompt == f"{first}，{style}"


def test_an_english_clip_is_refused_in_one_line():
    with pytest.raises(InvalidInputError, match="text tower is English"):
        interrogate(SimpleNamespace(text_head="projection"), [Image.new("RGB", (8, 8))], "general")


def test_interrogate_command_reads_a_gb18030_vocabulary(capsys, tmp_path, scene, mini_clip):
    picture, vocabulary = tmp_path / "a.png", tmp_path / "v.json"
    scene.save(picture)
    vocabulary.write_bytes(json.dumps(OWN, ensure_ascii=False).encode("gb18030"))
    code, out, _ = run(capsys, "clip", "interrogate", picture, "--vocabulary", vocabulary, "--json")
    assert code == 0
    assert json.loads(out)[0]["prompt"] == interrogate(mini_clip, [scene], OWN)[0].prompt
    vocabulary.write_text(json.dumps({"画风": ["水" * 500, "油画"]}, ensure_ascii=False), encoding="utf-8")
    code, _, err = run(capsys, "clip", "interrogate", picture, "--vocabulary", vocabulary)
    assert_user_error(code, err, "at most 100")


# ------------------------------------------------------------------------ fixed outside these modules


def test_from_on_an_outpainted_picture_says_to_outpaint_again(capsys, tmp_path, tiny_zh):
    source, grown = tmp_path / "in.png", tmp_path / "grown.png"
    Image.new("RGB", (64, 64), (90, 120, 200)).save(source)
    code, _, _ = run(capsys, "outpaint", source, "山水", "-m", tiny_zh, "--right", 16, "--steps", 2, "-o", grown)
    assert code == 0
    code, _, err = run(capsys, "generate", "--from", grown, "-m", tiny_zh)
    assert_user_error(code, err, "taiyi outpaint")  # was: "re-run taiyi edit/inpaint with the source image"


def test_the_server_says_what_is_wrong_with_a_nested_vocabulary(pipe_zh, mini_clip, scene):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    pytest.importorskip("httpx2", reason="httpx2 (FastAPI's TestClient transport) is not installed")
    import base64
    import io

    from fastapi.testclient import TestClient

    from taiyi.serve import ServeConfig, create_app

    buffer = io.BytesIO()
    scene.save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    app = create_app(ServeConfig(clip_model="taiyi-mini-clip"), pipeline=pipe_zh, clip=mini_clip)
    with TestClient(app) as c:
        body = {"images": [image], "vocabulary": {"画": {"风格": ["水墨", "油画"]}}}
        refused = c.post("/v1/clip/interrogate", json=body)
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["param"] == "vocabulary", refused.text
        assert "category '画' needs a list of at least two words" in error["message"]
