"""The web page end to end, in real headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (Playwright's own browser download,
``playwright install``, is never used). Skipped, with the reason, when either is missing; select or deselect
these tests with ``-m browser`` / ``-m "not browser"``.
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install -y chromium)"),
]
pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def site(pipe_zh):
    from taiyi.serve import ServeConfig, create_app
    from taiyi.serve.testing import running_server

    with running_server(create_app(ServeConfig(), pipeline=pipe_zh)) as live:
        yield live.url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 1100, "height": 1200})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.goto(site + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    yield page
    context.close()
    assert not problems, problems  # no script error, no CSP violation, no failed load


def data_url_image(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def generate(page, prompt: str, *, seed: int, preset: str | None = None) -> None:
    page.fill("#prompt", prompt)
    if preset:
        page.click(f"#presets button:text-is('{preset}')")
    page.fill("#seed", str(seed))
    page.fill("#steps", "3")
    before = page.locator("#gallery figure").count()
    page.click("#generate")
    page.locator("#gallery figure").nth(before).wait_for(timeout=60_000)


def test_chinese_prompt_generate_shows_an_image_with_its_parameters(page):
    generate(page, "小桥流水人家", seed=42, preset="水墨")
    image = page.locator("#gallery figure img").first
    width, height = image.evaluate("img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])")
    assert (width, height) == (64, 64)
    parameters = page.locator("#gallery figure pre").first.inner_text()
    assert parameters.startswith("小桥流水人家，水墨画，国画\n")  # the style preset is appended to the prompt
    assert "Seed: 42," in parameters and "Steps: 3," in parameters
    assert page.locator("#status").inner_text().startswith("完成")
    png = data_url_image(image.get_attribute("src"))
    assert png.text["parameters"] == parameters  # the download carries the same parameters chunk
    page.click("#tab-btn-search")
    assert page.locator("#search-off").is_visible()  # no CLIP index on this server: the page says how


def test_draw_a_mask_and_inpaint_changes_only_the_painted_area(page):
    generate(page, "江南水乡", seed=7)
    source = data_url_image(page.locator("#gallery figure img").first.get_attribute("src")).convert("RGB")
    page.click("#gallery figure:first-child button:text-is('编辑')")
    page.locator("#canvas-wrap").wait_for(state="visible")
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5, steps=6)
    page.mouse.up()
    page.fill("#edit-prompt", "一轮明月")
    page.fill("#edit-steps", "3")
    page.click("#edit-run")
    page.locator("#gallery figure").nth(1).wait_for(timeout=60_000)
    assert "局部重绘" in page.locator("#gallery figure").first.inner_text()
    assert "Denoising strength: 1," in page.locator("#gallery figure pre").first.inner_text()
    edited = data_url_image(page.locator("#gallery figure img").first.get_attribute("src")).convert("RGB")
    changed = np.any(np.asarray(edited) != np.asarray(source), axis=-1)  # (64, 64)
    assert changed.any(), "nothing was redrawn"
    assert not changed[:16].any() and not changed[-16:].any(), "pixels far from the stroke changed"


def test_interrogate_fills_the_edit_prompt_with_what_the_clip_reads(browser, pipe_zh):
    from taiyi.clip import load_clip
    from taiyi.data import shanshui
    from taiyi.interrogate import interrogate
    from taiyi.serve import ServeConfig, create_app
    from taiyi.serve.testing import running_server

    clip = load_clip("taiyi-mini-clip", device="cpu")
    scene = shanshui.sample_scene(np.random.default_rng(3), "heldout")
    picture = shanshui.render(scene, 64, [3, 0])
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"taiyi-interrogate-{os.getpid()}.png")
    picture.save(path)
    app = create_app(ServeConfig(clip_model="taiyi-mini-clip"), pipeline=pipe_zh, clip=clip)
    with running_server(app) as live:
        context = browser.new_context(viewport={"width": 1100, "height": 1200})
        page = context.new_page()
        page.goto(live.url + "/")
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        page.click("#tab-btn-edit")
        page.set_input_files("#edit-file", path)
        page.locator("#canvas-wrap").wait_for(state="visible")
        page.click("#interrogate-run")
        page.locator("#status").filter(has_text="完成").wait_for(timeout=30_000)  # the page's CSP forbids eval
        prompt = page.input_value("#edit-prompt")
        context.close()
    os.remove(path)
    assert prompt == interrogate(clip, [picture], "shanshui")[0].prompt  # the canvas holds the picture unchanged
    assert scene.time in prompt.split("，")


def test_without_a_clip_the_interrogate_button_is_hidden(page):
    page.click("#tab-btn-edit")
    assert not page.locator("#interrogate-run").is_visible()


def test_outpaint_grows_the_picture_and_keeps_it(page):
    generate(page, "江南水乡", seed=9)
    source = data_url_image(page.locator("#gallery figure img").first.get_attribute("src")).convert("RGB")
    page.click("#gallery figure:first-child button:text-is('编辑')")
    page.locator("#canvas-wrap").wait_for(state="visible")
    page.fill("#edit-prompt", "江南水乡")
    page.fill("#edit-steps", "3")
    page.fill("#out-right", "16")
    page.click("#outpaint-run")
    page.locator("#gallery figure").nth(1).wait_for(timeout=60_000)
    assert "扩图" in page.locator("#gallery figure").first.inner_text()
    grown = data_url_image(page.locator("#gallery figure img").first.get_attribute("src")).convert("RGB")
    assert grown.size == (source.width + 16, source.height)
    assert np.array_equal(np.asarray(grown)[:, : source.width], np.asarray(source))


def test_outpaint_past_the_servers_side_limit_is_said_before_sending(page):
    generate(page, "江南水乡", seed=9)
    page.click("#gallery figure:first-child button:text-is('编辑')")
    page.locator("#canvas-wrap").wait_for(state="visible")
    page.fill("#edit-prompt", "江南水乡")
    page.fill("#out-left", "1024")
    page.click("#outpaint-run")
    assert "超出服务器上限 1024 像素" in page.locator("#status").inner_text()
    assert page.locator("#gallery figure").count() == 1  # nothing was drawn


def test_the_hires_fix_box_draws_a_larger_picture_recording_it(page):
    page.check("#hires")
    page.fill("#hires-scale", "1.5")
    generate(page, "小桥流水人家", seed=5)
    image = page.locator("#gallery figure img").first
    assert data_url_image(image.get_attribute("src")).size == (96, 96)
    parameters = page.locator("#gallery figure pre").first.inner_text()
    assert "Hires upscale: 1.5" in parameters and "Size: 64x64" in parameters  # A1111 records the first pass's


def test_only_masked_box_inpaints_the_painted_area_at_full_size(page):
    generate(page, "江南水乡", seed=11)
    page.click("#gallery figure:first-child button:text-is('编辑')")
    page.locator("#canvas-wrap").wait_for(state="visible")
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.4)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5, steps=4)
    page.mouse.up()
    page.check("#only-masked")
    page.fill("#edit-prompt", "一轮明月")
    page.fill("#edit-steps", "3")
    page.click("#edit-run")
    page.locator("#gallery figure").nth(1).wait_for(timeout=60_000)
    assert "Inpaint area: Only masked" in page.locator("#gallery figure pre").first.inner_text()
