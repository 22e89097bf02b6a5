"""A1111's "Inpaint area: Only masked": the mask's padded box drawn at the model's full size and pasted back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from taiyi.errors import InvalidInputError
from taiyi.metadata import read_parameters
from taiyi.testing import assert_user_error
from taiyi.testing import run_cli as run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def picture_and_mask():
    rng = np.random.RandomState(0)
    picture = Image.fromarray(rng.randint(0, 256, (128, 160, 3), dtype=np.uint8))
    mask = Image.new("L", picture.size, 0)
    mask.paste(255, (100, 40, 116, 56))  # a 16-px square: small in the picture
    return picture, mask


def test_only_masked_draws_the_box_at_full_size_and_keeps_the_rest(pipe_zh):
    picture, mask = picture_and_mask()
    result = pipe_zh.inpaint(picture, mask, "湖泊", seed=2, steps=3, only_masked=True, padding=8, num_images=2)
    out, before = np.asarray(result.images[0], np.int16), np.asarray(picture, np.int16)
    keep = np.asarray(mask) == 0
    assert result.images[0].size == picture.size
    assert np.array_equal(out[keep], before[keep])
    assert np.abs(out[~keep] - before[~keep]).mean() > 5
    params = result.parameters[1]
    assert (params.width, params.height) == (pipe_zh.default_size,) * 2  # A1111 records the drawing size
    assert params.extras["Inpaint area"] == "Only masked" and params.extras["Masked area padding"] == "8"
    whole = pipe_zh.inpaint(picture, mask, "湖泊", seed=2, steps=3)
    assert not np.array_equal(np.asarray(whole.images[0]), np.asarray(result.images[0]))  # another drawing
    assert "Inpaint area" not in whole.parameters[0].extras


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"width": 64}, "only_masked"), ({"only_masked": True, "padding": 300}, "padding"),
     ({"only_masked": True, "width": 100}, "multiple of 8")],
)  # fmt: skip
def test_only_masked_settings_are_checked(pipe_zh, kwargs, words):
    picture, mask = picture_and_mask()
    with pytest.raises(InvalidInputError, match=words):
        pipe_zh.inpaint(picture, mask, "湖泊", steps=2, **kwargs)


def test_inpaint_command_only_masked(capsys, tmp_path, tiny_zh):
    picture, mask = picture_and_mask()
    picture.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = ["inpaint", tmp_path / "in.png", tmp_path / "mask.png", "湖泊", "-m", tiny_zh, "--steps", 2]
    code, _, _ = run(capsys, *args, "--only-masked", "--padding", 4, "--seed", 1, "-o", out)
    assert code == 0 and read_parameters(out).extras["Masked area padding"] == "4"
    keep = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(Image.open(out))[keep], np.asarray(picture)[keep])
    code, _, err = run(capsys, *args, "--padding", 4)
    assert_user_error(code, err, "--padding changes nothing without --only-masked")


def test_the_edits_endpoint_inpaints_only_the_masked_area_when_asked(pipe_zh):
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    pytest.importorskip("httpx2", reason="httpx2 (FastAPI's TestClient transport) is not installed")
    import base64
    import io

    from fastapi.testclient import TestClient

    from taiyi.serve import ServeConfig, create_app

    picture, mask = picture_and_mask()

    def png(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    files = {"image": ("in.png", png(picture), "image/png"), "mask": ("m.png", png(mask), "image/png")}
    with TestClient(create_app(ServeConfig(), pipeline=pipe_zh)) as c:
        fields = {"prompt": "湖泊", "steps": "3", "seed": "2", "only_masked": "true", "padding": "8"}
        response = c.post("/v1/images/edits", data=fields, files=files)
        assert response.status_code == 200, response.text
        item = response.json()["data"][0]
        got = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        want = pipe_zh.inpaint(picture, mask, "湖泊", seed=2, steps=3, only_masked=True, padding=8)
        assert np.array_equal(np.asarray(got), np.asarray(want.images[0]))
        assert "Inpaint area: Only masked" in item["parameters"]
        refused = c.post("/v1/images/edits", data={"prompt": "湖泊", "padding": "8"}, files=files)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "padding"
        alone = {"image": files["image"]}
        refused = c.post("/v1/images/edits", data={"prompt": "湖泊", "only_masked": "true"}, files=alone)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "only_masked"
