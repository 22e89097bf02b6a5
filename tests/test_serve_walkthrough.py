"""taiyi serve as a user and an API client meet it: OpenAI's client shapes, odd uploads, clients that leave, and the
web page's edit, error and seed handling (in headless Chromium; skipped when it is absent, as in test_serve_browser).
"""

from __future__ import annotations

import io
import json
import os
import socket
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("httpx2", reason="httpx2 (FastAPI's TestClient transport) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from taiyi.serve import ServeConfig, create_app  # noqa: E402
from taiyi.serve.limits import decode_image  # noqa: E402
from taiyi.serve.testing import running_server  # noqa: E402

EDITS = "/v1/images/edits"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def error_of(response) -> dict:
    payload = response.json()
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}, payload
    return payload["error"]


def metric(app, name: str, **labels) -> float:
    return app.state.taiyi.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def client(pipe_zh):
    with TestClient(create_app(ServeConfig(), pipeline=pipe_zh)) as client:
        yield client


# --- the API, as OpenAI's client and odd files meet it -----------------------------------------------------------
def test_edit_takes_openai_clients_image_list_field_and_refuses_unknown_fields(client):
    png = encoded(Image.new("RGB", (64, 64), (120, 160, 200)))
    form = {"prompt": "一轮明月", "steps": "2", "seed": "3", "n": "1", "size": "64x64", "response_format": "b64_json"}
    # openai-python sends images.edit(image=[file]) as "image[]", and gpt-image's options beside it
    listed = client.post(EDITS, files=[("image[]", ("a.png", png, "image/png"))], data={**form, "quality": "high"})
    assert listed.status_code == 200, listed.text
    assert listed.json()["data"][0]["seed"] == 3
    pair = [("image[]", ("a.png", png, "image/png")), ("image[]", ("b.png", png, "image/png"))]
    two = client.post(EDITS, files=pair, data=form)
    assert two.status_code == 400 and error_of(two)["param"] == "image"
    assert "one image per request" in error_of(two)["message"]
    typo = client.post(EDITS, files={"image": ("a.png", png, "image/png")}, data={**form, "strenght": "0.3"})
    assert typo.status_code == 400
    assert (error_of(typo)["code"], error_of(typo)["param"]) == ("unknown_parameter", "strenght")
    as_text = client.post(EDITS, data={**form, "image": "a.png"})
    assert as_text.status_code == 400
    assert error_of(as_text)["message"] == "image must be a file upload (a multipart file field), not text"


def test_models_retrieve_answers_the_served_model_and_404_for_others(client):
    served = client.get("/v1/models").json()["data"][0]["id"]
    one = client.get(f"/v1/models/{served}")
    assert one.status_code == 200 and one.json() == client.get("/v1/models").json()["data"][0]
    other = client.get("/v1/models/dall-e-3")
    assert other.status_code == 404 and error_of(other)["code"] == "model_not_found"


def test_uploads_are_read_upright_and_16_bit_grey_is_scaled_not_white(client):
    grey = decode_image(encoded(Image.new("I;16", (64, 64), 32896)), param="image")  # 0x8080: mid-grey
    assert grey.convert("RGB").getpixel((0, 0)) == (128, 128, 128)
    # A phone photo: stored 80 wide, 64 high, EXIF orientation 6 (shown rotated: 64 wide, 80 high)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = encoded(Image.new("RGB", (80, 64), (90, 140, 60)), "JPEG", exif=exif)
    assert decode_image(photo, param="image").size == (64, 80)
    mask = Image.new("L", (64, 80), 0)
    mask.paste(255, (0, 0, 32, 40))  # drawn on the picture as shown
    response = client.post(
        EDITS,
        files={"image": ("photo.jpg", photo, "image/jpeg"), "mask": ("mask.png", encoded(mask), "image/png")},
        data={"prompt": "一轮明月", "steps": "2", "seed": "1"},
    )
    assert response.status_code == 200, response.text
    assert "Size: 64x80" in response.json()["data"][0]["parameters"]


def test_a_truncated_upload_is_named_in_pillows_words_not_its_exception_class(client):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = encoded(Image.fromarray(noise), "JPEG")
    cut = whole[: len(whole) // 2]  # its header whole: the damage is met while decoding
    response = client.post(EDITS, files={"image": ("cut.jpg", cut, "image/jpeg")}, data={"prompt": "山"})
    assert response.status_code == 400
    message = error_of(response)["message"]
    assert message.startswith("image is damaged: image file is truncated") and "OSError" not in message


def test_a_refused_cors_preflight_answers_in_the_apis_json_error_shape(pipe_zh):
    config = ServeConfig(cors_origins=("https://app.example",))
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(config, pipeline=pipe_zh)) as client:
        refused = client.options("/v1/images/generations", headers=preflight)
        allowed = client.options("/v1/images/generations", headers={**preflight, "Origin": "https://app.example"})
    assert refused.status_code == 400 and refused.headers["content-type"] == "application/json"
    error = error_of(refused)
    assert error["code"] == "cors_not_allowed" and "(origin)" in error["message"]
    assert "access-control-allow-origin" not in refused.headers
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"


def test_client_leaving_mid_body_is_counted_as_gone_not_as_a_bad_request(pipe_zh):
    app = create_app(ServeConfig(), pipeline=pipe_zh)
    with running_server(app) as live:
        with socket.create_connection(("127.0.0.1", live.port)) as sock:
            sock.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"prompt":'
            )
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        route = "/v1/images/generations"
        while not metric(app, "taiyi_requests_total", route=route, status="499"):
            assert time.monotonic() < deadline, "the cut-off request was never counted"
            time.sleep(0.02)
    assert metric(app, "taiyi_requests_total", route=route, status="400") == 0
    assert metric(app, "taiyi_errors_total", code="invalid_request") == 0
    assert metric(app, "taiyi_errors_total", code="client_disconnected") == 1


# --- the web page ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def site(pipe_zh):
    app = create_app(ServeConfig(), pipeline=pipe_zh)
    with running_server(app) as live:
        yield live.url, app


@pytest.fixture
def page(chromium, site):
    context = chromium.new_context(viewport={"width": 1100, "height": 1200})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.goto(site[0] + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    yield page
    context.close()
    assert not problems, problems


def _fulfil_with(answer: dict):
    return lambda route: route.fulfill(**answer)


def finish(page, button: str) -> str:
    page.click(button)
    page.locator(f"{button}:enabled").wait_for(timeout=60_000)  # busy() disables it while the request runs
    return page.locator("#status").inner_text()


@pytest.mark.browser
def test_transparent_upload_without_a_painted_mask_is_redrawn_whole(page, site, tmp_path):
    logo = Image.new("RGBA", (64, 64), (200, 80, 40, 255))
    logo.paste((0, 0, 0, 0), (16, 16, 48, 48))  # a transparent hole, as in a logo
    logo.save(tmp_path / "logo.png")
    page.click("#tab-btn-edit")
    page.set_input_files("#edit-file", str(tmp_path / "logo.png"))
    page.locator("#canvas-wrap").wait_for(state="visible")
    page.fill("#edit-prompt", "一轮明月")
    page.fill("#edit-steps", "2")
    assert finish(page, "#edit-run").startswith("完成")
    assert page.locator("#gallery figure div").first.inner_text().startswith("图生图")
    app = site[1]
    assert metric(app, "taiyi_batch_rows_count", kind="edit") == 1  # not the hole inpainted as a mask
    assert metric(app, "taiyi_batch_rows_count", kind="inpaint") == 0


@pytest.mark.browser
def test_a_thin_brush_stroke_inpaints(page, site, tmp_path):
    Image.new("RGB", (64, 64), (90, 140, 60)).save(tmp_path / "field.png")
    page.click("#tab-btn-edit")
    page.set_input_files("#edit-file", str(tmp_path / "field.png"))
    page.locator("#canvas-wrap").wait_for(state="visible")
    page.evaluate("document.getElementById('brush').value = '2'")  # the slider's least: 0.5 px of a 64 px image
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    page.fill("#edit-prompt", "一轮明月")
    page.fill("#edit-steps", "2")
    status = finish(page, "#edit-run")
    assert status.startswith("完成"), status
    assert page.locator("#gallery figure div").first.inner_text().startswith("局部重绘")
    assert metric(site[1], "taiyi_batch_rows_count", kind="inpaint") == 1


@pytest.mark.browser
def test_seed_in_exponent_form_is_kept_and_errors_lead_with_chinese(page):
    page.fill("#prompt", "小桥流水")
    page.fill("#steps", "2")
    page.fill("#seed", "1e5")  # a number field takes it; it is 100000, not "random"
    assert finish(page, "#generate").startswith("完成")
    assert "Seed: 100000," in page.locator("#gallery figure pre").first.inner_text()
    answers = {
        "出错了（500 服务器内部错误）：internal server error": dict(
            status=500,
            content_type="application/json",
            body=json.dumps({"error": {"message": "internal server error", "type": "server_error"}}),
        ),
        "出错了（502 服务器暂不可用）：": dict(status=502, content_type="text/html", body="<html>proxy</html>"),
        "服务器的回答无法读取（不是 JSON）": dict(status=200, content_type="application/json", body="oops"),
        "服务器的回答缺少 data 列表": dict(status=200, content_type="application/json", body="{}"),
    }
    for expected, answer in answers.items():
        page.route("**/v1/images/generations", _fulfil_with(answer))
        status = finish(page, "#generate")
        page.unroute("**/v1/images/generations")
        assert status.startswith(expected), status
        assert page.locator("#status").get_attribute("class") == "error"
    assert page.locator("#gallery figure").count() == 1  # nothing the user made was lost


@pytest.mark.browser
def test_leaving_a_page_with_pictures_asks_first_and_a_broken_health_answer_is_said_plainly(page, site):
    page.fill("#prompt", "小桥流水")
    page.fill("#steps", "2")
    assert finish(page, "#generate").startswith("完成")
    with page.expect_event("dialog", timeout=10_000) as asked:
        page.close(run_before_unload=True)  # as closing the tab or reloading: the gallery lives only in the page
    assert asked.value.type == "beforeunload"
    asked.value.dismiss()
    fresh = page.context.new_page()
    fresh.route("**/healthz", _fulfil_with(dict(status=503, content_type="application/json", body='{"status": "x"}')))
    fresh.goto(site[0] + "/")
    fresh.locator("#status.error").wait_for(timeout=10_000)
    assert fresh.locator("#status").inner_text() == "无法读取服务器状态：服务器没有给出状态（503）"


@pytest.mark.browser
def test_pictures_of_one_seed_download_under_different_names(page, tmp_path):
    page.fill("#prompt", "小桥流水")
    page.fill("#steps", "2")
    page.fill("#seed", "5")
    assert finish(page, "#generate").startswith("完成")
    page.click("#gallery figure:first-child button:text-is('编辑')")  # an edit that keeps the same seed
    page.locator("#canvas-wrap").wait_for(state="visible")
    page.fill("#edit-prompt", "一轮明月")
    page.fill("#edit-steps", "2")
    page.fill("#edit-seed", "5")
    assert finish(page, "#edit-run").startswith("完成")
    names = page.locator("#gallery figure a").evaluate_all("links => links.map((a) => a.download)")
    assert names == ["taiyi-002-edit-seed5.png", "taiyi-001-generate-seed5.png"]
