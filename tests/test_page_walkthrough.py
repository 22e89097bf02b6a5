"""Walk-through of what is new in taiyi serve: the page's 高清修复 box, 反推提示词 and 扩图, and taiyi's A1111 fields
(variation seed, hires fix, clip skip) on ``POST /v1/images/generations``.

The API checks run through FastAPI's TestClient; the page checks in headless Chromium as tests/test_serve_browser.py
(skipped when /usr/bin/chromium or playwright is absent).
"""

from __future__ import annotations

import base64
import io
import os
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("httpx2", reason="httpx2 (FastAPI's TestClient transport) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from taiyi.serve import ServeConfig, create_app  # noqa: E402
from taiyi.serve.testing import running_server  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "小桥流水人家"
GENERATIONS = "/v1/images/generations"
KEY = "sk-test-0123456789abcdef"


# --- the OpenAI endpoint with taiyi's A1111 fields ------------------------------------------------------------
@pytest.fixture(scope="module")
def client(pipe_zh):
    with TestClient(create_app(ServeConfig(max_n=6, max_batch=2, max_steps=20), pipeline=pipe_zh)) as c:
        yield c


def refusal(client, **fields) -> dict:
    response = client.post(GENERATIONS, json={"prompt": PROMPT, "steps": 2, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "\n" not in error["message"]
    return error


def test_hires_refusals_name_the_field_at_fault(client):
    for fields, param, words in [
        ({"hires_steps": -1}, "hires_steps", "hires_steps must be between 0 and 20 on this server"),
        ({"hires_steps": 500}, "hires_steps", "hires_steps must be between 0 and 20 on this server"),  # --max-steps
        ({"hires_strength": 1.5}, "hires_strength", "hires_strength: strength must be in (0, 1]"),
        ({"hires_strength": 0.1}, "hires_strength", "hires_strength: strength 0.1 × 2 steps leaves no denoising"),
        ({"hires_upscaler": "ESRGAN"}, "hires_upscaler", "hires upscaler must be one of Latent,"),
        ({"hires_scale": 0.5}, "hires_scale", "hires scale must be between 1 and 4"),
    ]:
        error = refusal(client, hires_scale=fields.pop("hires_scale", 2), **fields)
        assert (error["param"], error["message"][: len(words)]) == (param, words), error


def test_variation_seed_refusals_name_variation_seed(client):
    for seed in (-1, 2**63):  # A1111's -1 for a random one; past the largest seed
        error = refusal(client, variation_seed=seed, variation_strength=0.3)
        assert error["param"] == "variation_seed"
        assert error["message"].startswith("variation_seed must be between 0 and ")
        assert "(leave it out for a random one)" in error["message"]


def test_clip_skip_past_the_text_encoders_layers_is_refused_as_clip_skip(client, pipe_zh):
    assert pipe_zh.sd.text_encoder.config.num_hidden_layers == 2
    error = refusal(client, clip_skip=3)
    assert error["param"] == "clip_skip" and error["message"] == "clip_skip: clip skip must be between 1 and 2, not 3"
    assert client.post(GENERATIONS, json={"prompt": PROMPT, "steps": 2, "clip_skip": 2}).status_code == 200


def test_a_variation_request_in_chunks_redraws_as_the_librarys_batch(client, pipe_zh):
    # max_batch 2: five images are drawn as 2 + 2 + 1, the variation seeds counting on across the calls
    body = {"prompt": PROMPT, "n": 5, "seed": 11, "steps": 3, "variation_seed": 100, "variation_strength": 0.4}
    response = client.post(GENERATIONS, json=body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    want = pipe_zh.generate(PROMPT, seed=11, steps=3, num_images=5, variation_seed=100, variation_strength=0.4)
    assert [item["seed"] for item in data] == [11] * 5
    assert [f"Variation seed: {100 + i}," in item["parameters"] for i, item in enumerate(data)] == [True] * 5
    for item, image in zip(data, want.images, strict=True):
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"), dtype=np.int16)
        assert np.abs(got - np.asarray(image.convert("RGB"), dtype=np.int16)).max() <= 1  # batch rounding only


# --- the web page ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    # pytest's default import mode puts this folder on sys.path; the import skips when playwright is absent
    from test_serve_browser import CHROMIUM, CHROMIUM_ARGS, sync_api

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def site(pipe_zh):
    with running_server(create_app(ServeConfig(), pipeline=pipe_zh)) as live:
        yield live.url


@contextmanager
def open_page(browser, url: str):
    context = browser.new_context(viewport={"width": 1100, "height": 1200})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    try:
        yield page
    finally:
        context.close()
    assert not problems, problems  # no script error, no CSP violation, no refused request


def picture(page, index: int = 0) -> Image.Image:
    src = page.locator("#gallery figure img").nth(index).get_attribute("src")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")


def press_and_wait(page, button: str, count: int) -> None:
    page.click(button)
    page.locator("#gallery figure").nth(count).wait_for(timeout=60_000)


@pytest.mark.browser
def test_hires_values_the_server_would_refuse_are_said_in_chinese_before_sending(browser, site):
    with open_page(browser, site) as page:
        page.fill("#prompt", PROMPT)
        page.fill("#steps", "3")
        page.fill("#seed", "5")
        page.check("#hires")
        page.fill("#hires-strength", "0.1")
        page.click("#generate")
        assert page.locator("#status").inner_text() == "高清修复的重绘强度 0.1 × 步数 3 不足一步：请提高重绘强度或步数"
        page.fill("#hires-strength", "0.5")
        page.select_option("#size", "1024x1024")
        page.click("#generate")
        assert page.locator("#status").inner_text() == (
            "高清修复后为 2048 × 2048，超出服务器上限 1024 像素：请减小放大倍数或尺寸"
        )
        assert page.locator("#gallery figure").count() == 0  # nothing was sent


@pytest.mark.browser
def test_a_hires_scale_off_quarter_steps_and_an_unticked_box_block_nothing(browser, site):
    with open_page(browser, site) as page:
        page.fill("#prompt", PROMPT)
        page.fill("#steps", "3")
        page.check("#hires")
        page.fill("#hires-scale", "1.3")  # A1111's 0.05 steps: 64 × 1.3 = 83, down to 80
        press_and_wait(page, "#generate", 0)
        assert picture(page).size == (80, 80)
        page.fill("#hires-scale", "9")  # out of range, then not wanted: it must not stop 生成
        page.uncheck("#hires")
        press_and_wait(page, "#generate", 1)
        assert picture(page).size == (64, 64) and page.locator("#status").inner_text().startswith("完成")


@pytest.mark.browser
def test_edit_tab_numbers_out_of_range_are_refused_in_chinese_not_replaced(browser, site):
    with open_page(browser, site) as page:
        page.fill("#prompt", PROMPT)
        page.fill("#steps", "2")
        press_and_wait(page, "#generate", 0)
        page.click("#gallery figure:first-child button:text-is('编辑')")
        page.locator("#canvas-wrap").wait_for(state="visible")
        page.fill("#edit-steps", "2")
        page.fill("#out-right", "8")
        for field, value, words in [
            ("#out-top", "-8", "扩图的「上」须为 0 到 1024 之间的整数，不是「-8」"),  # was taken for 0
            ("#out-left", "8.5", "扩图的「左」须为 0 到 1024 之间的整数，不是「8.5」"),
            ("#edit-steps", "-3", "步数须为 1 到 150 之间的整数，不是「-3」"),  # was the server's 9 steps
            ("#edit-n", "0", "数量须为 1 到 10 之间的整数，不是「0」"),  # was 1
            ("#edit-n", "1.5", "数量须为 1 到 10 之间的整数，不是「1.5」"),  # was the server's English
        ]:
            saved = page.input_value(field)
            page.fill(field, value)
            for button in ("#outpaint-run", "#edit-run") if field.startswith("#edit") else ("#outpaint-run",):
                page.click(button)
                assert page.locator("#status").inner_text() == words
            page.fill(field, saved)
        assert page.locator("#gallery figure").count() == 1  # nothing was sent


@pytest.mark.browser
def test_hires_picture_edited_interrogated_and_outpainted_on_a_server_with_a_key(browser, pipe_zh):
    from taiyi.clip import load_clip

    clip = load_clip("taiyi-mini-clip", device="cpu")
    app = create_app(ServeConfig(api_key=KEY, clip_model="taiyi-mini-clip"), pipeline=pipe_zh, clip=clip)
    with running_server(app) as live, open_page(browser, live.url) as page:
        page.fill("#api-key", KEY)
        page.fill("#prompt", PROMPT)
        page.fill("#steps", "3")
        page.check("#hires")
        press_and_wait(page, "#generate", 0)
        hires = picture(page)
        assert hires.size == (128, 128)
        page.click("#tab-btn-edit")
        page.click("#interrogate-run")
        assert page.locator("#status").inner_text() == "请先上传图片，或在画廊中点「编辑」"
        page.click("#tab-btn-generate")
        page.click("#gallery figure:first-child button:text-is('编辑')")
        page.locator("#canvas-wrap").wait_for(state="visible")
        page.fill("#edit-prompt", "")
        page.click("#interrogate-run")
        page.locator("#status").filter(has_text="完成").wait_for(timeout=30_000)
        assert page.input_value("#edit-prompt") != ""
        page.fill("#edit-steps", "2")
        page.fill("#out-bottom", "16")
        press_and_wait(page, "#outpaint-run", 1)
        grown = picture(page)
        assert grown.size == (128, 144)
        assert np.array_equal(np.asarray(grown)[:128], np.asarray(hires))  # the picture itself is kept
