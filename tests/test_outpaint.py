"""Outpainting (扩图): the grown canvas and its mask, the picture kept pixel for pixel, the margin drawn, and the
command line's one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from taiyi.errors import InvalidInputError
from taiyi.metadata import read_parameters
from taiyi.outpaint import fill_masked, outpaint_canvas
from taiyi.testing import assert_user_error
from taiyi.testing import run_cli as run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def halves(width: int = 64, height: int = 64) -> Image.Image:
    image = Image.new("RGB", (width, height), (220, 30, 30))
    image.paste((30, 30, 220), (width // 2, 0, width, height))  # red left half, blue right half
    return image


def test_the_canvas_grows_by_the_margins_and_its_margin_takes_the_nearest_colours():
    picture = halves()
    canvas, mask = outpaint_canvas(picture, 16, 8, 24, 0)
    assert canvas.size == mask.size == (104, 72)
    inside = np.zeros((72, 104), bool)
    inside[8:72, 16:80] = True
    assert np.array_equal(np.asarray(mask) == 0, inside)  # white exactly on the margin
    assert np.array_equal(np.asarray(canvas)[8:, 16:80], np.asarray(picture))
    left, right = np.asarray(canvas)[40, 2], np.asarray(canvas)[40, 100]
    assert left[0] > left[2] + 100 and right[2] > right[0] + 100  # red grows out of the left, blue out of the right


def test_fill_changes_only_the_masked_pixels():
    picture = halves()
    mask = Image.new("L", picture.size, 0)
    mask.paste(255, (24, 24, 40, 40))
    filled = np.asarray(fill_masked(picture, mask))
    keep = np.asarray(mask) == 0
    assert np.array_equal(filled[keep], np.asarray(picture)[keep])
    middle = filled[32, 26:38]
    assert middle[0, 0] > middle[-1, 0] and middle[-1, 2] > middle[0, 2]  # a blend from red to blue across the hole


@pytest.mark.parametrize(
    ("margins", "words"),
    [((0, 0, 0, 0), "grow at least one side"), ((-1, 0, 8, 0), "left margin must be 0 to 1024"),
     ((0, 2.5, 0, 0), "whole number"), ((0, 0, 0, 5000), "bottom margin")],
)  # fmt: skip
def test_margins_are_whole_pixels_and_at_least_one(margins, words):
    with pytest.raises(InvalidInputError, match=words):
        outpaint_canvas(halves(), *margins)


def test_outpaint_keeps_the_picture_and_is_an_inpaint_of_the_grown_canvas(pipe_zh):
    picture = pipe_zh.generate("小桥流水人家", seed=1, steps=2).images[0]
    result = pipe_zh.outpaint(picture, "小桥流水人家", left=16, right=8, bottom=8, seed=4, steps=3, num_images=2)
    grown = result.images[0]
    assert grown.size == (picture.width + 24, picture.height + 8)
    assert np.array_equal(np.asarray(grown)[: picture.height, 16 : 16 + picture.width], np.asarray(picture))
    canvas, mask = outpaint_canvas(picture, 16, 0, 8, 8)
    want = pipe_zh.inpaint(canvas, mask, "小桥流水人家", seed=4, steps=3, num_images=2)
    for a, b in zip(result.images, want.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(grown, np.int16)[:, :16] - np.asarray(canvas, np.int16)[:, :16]).mean() > 5  # drawn
    params = result.parameters[1]
    assert params.extras["Outpaint"] == "left 16 top 0 right 8 bottom 8" and params.seed == 5
    assert (params.width, params.height, params.strength) == (grown.width, grown.height, 1.0)


def test_outpaint_command_writes_the_grown_picture_and_refuses_bad_margins(capsys, tmp_path, tiny_zh):
    source = tmp_path / "in.png"
    halves().save(source)
    out = tmp_path / "out.png"
    code, stdout, _ = run(capsys, "outpaint", source, "山水", "-m", tiny_zh, "--extend", 8, "--right", 16,
                          "--seed", 2, "--steps", 3, "-o", out)  # fmt: skip
    assert code == 0 and stdout.strip() == str(out)
    assert Image.open(out).size == (64 + 8 + 16, 64 + 16)
    assert read_parameters(out).extras["Outpaint"] == "left 8 top 8 right 16 bottom 8"
    for args, words in [
        ([], "grow at least one side"),
        (["--left", -4], "left margin must be 0 to 1024"),
        (["--extend", 1000, "--right", 1000], "sides are at most 2048"),
        (["--extend", 8, "--strength", 0], "strength"),
    ]:
        code, _, err = run(capsys, "outpaint", source, "山", "-m", tiny_zh, *args)
        assert_user_error(code, err, words)


def test_the_server_outpaints_and_refuses_margins_in_one_line(pipe_zh):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    pytest.importorskip("httpx2", reason="httpx2 (FastAPI's TestClient transport) is not installed")
    import base64
    import io

    from fastapi.testclient import TestClient

    from taiyi.serve import ServeConfig, create_app

    picture = pipe_zh.generate("小桥流水人家", seed=1, steps=2).images[0]
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    encoded = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with TestClient(create_app(ServeConfig(max_side=128), pipeline=pipe_zh)) as c:
        body = {"image": encoded, "prompt": "小桥流水人家", "right": 16, "top": 8, "seed": 3, "steps": 3, "n": 2}
        response = c.post("/v1/images/outpaint", json=body)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        want = pipe_zh.outpaint(picture, "小桥流水人家", right=16, top=8, seed=3, steps=3, num_images=2)
        for item, image in zip(data, want.images, strict=True):
            got = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
            assert np.array_equal(np.asarray(got), np.asarray(image))
            assert "Outpaint: left 0 top 8 right 16 bottom 0" in item["parameters"]
        assert [item["seed"] for item in data] == [3, 4]
        for extra, param in [({"right": 0}, "left"), ({"bottom": -8}, "bottom"), ({"right": 72}, "image"),
                             ({"strength": 0}, "strength"), ({"image": "bm90"}, "image")]:  # fmt: skip
            failure = c.post("/v1/images/outpaint", json={**body, "top": 0, **extra})
            assert failure.status_code in (400, 415) and failure.json()["error"]["param"] == param, failure.text
