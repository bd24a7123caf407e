"""The web page in a real Chromium (Debian's package, driven by Playwright): open an image, paint a stroke
with the mouse, generate, watch the progress, and check the result; screenshots on a laptop and a phone.

Screenshots go to ``$BRUSHNET_TEST_ARTIFACTS`` (default ``test-artifacts/`` in the repository, ignored by git).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from brushnet.service.server import BackgroundServer

from .conftest import png

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("no chromium: install Debian's 'chromium' package (.ci/run does)", allow_module_level=True)

ARTIFACTS = Path(os.environ.get("BRUSHNET_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
WIDTH, HEIGHT = 192, 128


def photo() -> Image.Image:
    """A small synthetic 'photo': sky gradient, ground, a sun; deterministic."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    sky = np.stack([90 + y, 140 + y // 2, 235 - y // 3], -1)
    ground = np.stack([60 + x // 8, 120 + (x + y) % 24, 50 + 0 * x], -1)
    arr = np.where((y > 80)[..., None], ground, sky).astype(np.uint8)
    arr[((x - 150) ** 2 + (y - 30) ** 2) < 15**2] = (255, 214, 90)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        except Exception as exc:  # noqa: BLE001 - a broken chromium install is a skip, with the reason
            pytest.skip(f"chromium at {CHROMIUM} does not start: {str(exc).splitlines()[0]}")
        yield browser
        browser.close()


@pytest.fixture
def server(gated, blended_method):
    from brushnet.service.api import create_app
    from brushnet.service.engine import Engine, Limits

    gated.step_delay = 0.04  # so that progress events are seen on the page
    engine = Engine({"brushnet": gated, "blended-latent-diffusion": blended_method}, Limits())
    try:
        with BackgroundServer(create_app(engine)) as live:
            live.engine = engine
            yield live
    finally:
        engine.close()


def _open(page, server, tmp_path):
    image_path = tmp_path / "photo.png"
    photo().save(image_path)
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#method option').length === 2")
    assert page.locator("#server-status").inner_text() in ("ready", "connecting…")
    page.set_input_files("#image-input", str(image_path))
    page.wait_for_selector("#mask-canvas", state="visible")
    assert page.locator("#image-info").inner_text() == f"{WIDTH}×{HEIGHT}"


def _stroke(page, points):
    """Drag the mouse through ``points`` given in image pixels; return the canvas scale (css px / px)."""
    box = page.locator("#mask-canvas").bounding_box()
    scale = box["width"] / WIDTH
    page.mouse.move(box["x"] + points[0][0] * scale, box["y"] + points[0][1] * scale)
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x * scale, box["y"] + y * scale, steps=8)
    page.mouse.up()
    return scale


def _mask_alpha(page) -> np.ndarray:
    data = page.evaluate(
        """() => { const c = document.getElementById('mask-canvas');
                   return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }"""
    )
    return np.asarray(data, np.uint8).reshape(HEIGHT, WIDTH, 4)[..., 3] >= 128


def _set_range(page, selector, value):
    page.eval_on_selector(
        selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }", value
    )


def test_paint_generate_progress_result(browser, server, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1366, "height": 860})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    _open(page, server, tmp_path)
    assert page.locator("#generate").is_disabled()  # nothing painted yet

    # paint a horizontal stroke through the middle; brush 24 css px
    _set_range(page, "#brush-size", 24)
    _stroke(page, [(40, 64), (100, 64), (130, 70)])
    hole = _mask_alpha(page)
    assert hole[64, 40:100].all() and not hole[:30].any() and not hole[110:].any()
    assert page.locator("#generate").is_enabled()

    # invert, undo, eraser, clear, undo: the mask follows
    page.click("#invert-mask")
    assert (_mask_alpha(page) == ~hole).all()
    page.click("#undo")
    assert (_mask_alpha(page) == hole).all()
    page.click("#tool-eraser")
    _stroke(page, [(125, 50), (125, 90)])
    erased = _mask_alpha(page)
    assert not erased[64, 122:128].any() and erased[64, 40:100].all()
    page.click("#undo")
    page.click("#tool-brush")
    page.click("#clear-mask")
    assert not _mask_alpha(page).any() and page.locator("#generate").is_disabled()
    page.click("#undo")
    assert (_mask_alpha(page) == hole).all()

    # a mask of the wrong size is refused with a clear message
    bad_mask = tmp_path / "bad_mask.png"
    Image.new("L", (50, 50), 255).save(bad_mask)
    page.set_input_files("#mask-input", str(bad_mask))
    page.wait_for_selector("#error", state="visible")
    assert "mask is 50×50 but the image is 192×128" in page.locator("#error").inner_text()

    # settings; method options are built from /api/v1/methods (guidance: the method's family value)
    assert page.locator("#guidance").input_value() == "7.5"
    assert page.locator("#guidance-value").inner_text() == "7.5"
    page.fill("#prompt", "a wooden bench")
    page.fill("#seed", "1234")
    _set_range(page, "#steps", 8)
    assert float(page.locator("#method-options [data-option='conditioning_scale']").input_value()) == 1.0
    page.click("#method-options-box summary")  # the options fold open
    page.fill("#method-options [data-option='conditioning_scale']", "0.8")
    page.evaluate(
        """() => { window.__labels = [];
                   new MutationObserver(() => window.__labels.push(
                       document.getElementById('progress-label').textContent))
                     .observe(document.getElementById('progress-label'), {childList: true}); }"""
    )
    page.click("#generate")
    page.wait_for_function(
        "document.getElementById('progress-label').textContent.startsWith('Done')", timeout=30000
    )
    assert page.locator("#error").is_hidden()
    labels = page.evaluate("window.__labels")
    assert any(label.startswith("Step ") and not label.startswith("Step 8") for label in labels), labels
    assert page.locator("#compare-after").is_visible() and page.locator("#download").is_visible()
    assert page.locator("#history button").count() == 1
    assert page.locator("#history-count").inner_text() == "1"
    assert "seed 1234 · 8 steps" in page.locator("#result-info").inner_text()

    # the downloaded PNG: parameters embedded, changed inside the stroke, exact far from it
    data = page.evaluate(
        """async () => { const r = await fetch(document.getElementById('download').href);
                         const b = new Uint8Array(await r.arrayBuffer()); let s = '';
                         for (const x of b) s += String.fromCharCode(x); return btoa(s); }"""
    )
    result_png = Image.open(io.BytesIO(base64.b64decode(data)))
    meta = json.loads(result_png.info["brushnet"])
    assert meta["seed"] == 1234 and meta["parameters"]["prompt"] == "a wooden bench"
    assert meta["parameters"]["options"]["conditioning_scale"] == 0.8
    assert page.locator("#download").get_attribute("download") == "brushnet-brushnet-1234.png"
    out = np.asarray(result_png.convert("RGB")).astype(int)
    src = np.asarray(photo()).astype(int)
    diff = np.abs(out - src).sum(-1)
    assert diff[hole].mean() > 10, diff[hole].mean()
    far = ~np.asarray(Image.fromarray(hole).filter(ImageFilter.MaxFilter(41)))
    assert far.any() and (diff[far] == 0).all()

    # slider: before/after clip follows it
    _set_range(page, "#compare-slider", 30)
    assert "70%" in page.eval_on_selector("#compare-after", "el => el.style.clipPath")
    _set_range(page, "#compare-slider", 50)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "page_desktop.png"), full_page=True)
    assert not errors, errors
    page.close()


def test_phone_layout(browser, server, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    page = context.new_page()
    _open(page, server, tmp_path)
    # nothing overflows sideways on a phone
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#mask-canvas").bounding_box()
    assert box["width"] <= 390 and box["width"] > 300
    page.touchscreen.tap(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    assert _mask_alpha(page).any()  # a tap paints a dot
    _set_range(page, "#steps", 4)
    page.click("#generate")
    page.wait_for_function(
        "document.getElementById('progress-label').textContent.startsWith('Done')", timeout=30000
    )
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "page_phone_top.png"))
    page.locator("#prompt").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "page_phone_settings.png"))
    page.evaluate("document.getElementById('compare').scrollIntoView()")
    compare = page.locator("#compare").bounding_box()
    assert compare["x"] >= 0 and compare["x"] + compare["width"] <= 390
    context.close()


def test_live_server_round_trip(server):
    """The same app behind a real uvicorn socket (what `brushnet serve` runs) answers a multipart request."""
    import httpx

    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[50:70, 50:90] = 255
    r = httpx.post(
        server.url + "/api/v1/inpaint",
        files={"image": ("p.png", png(photo())), "mask": ("m.png", png(Image.fromarray(mask)))},
        data={"steps": "2", "seed": "1", "wait": "true"},
        timeout=30,
    )
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (WIDTH, HEIGHT)


def test_cancel_during_the_upload_and_a_double_click(browser, server, tmp_path, gated):
    """A Cancel while the upload was in flight finished the page's job but not the server's, and the answer that
    came back then took over the next Generate (its result shown for the new seed); a double-click on Generate
    sent two jobs."""
    page = browser.new_page(viewport={"width": 1366, "height": 860})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    posts = []

    def slow_upload(route):
        posts.append(route.request.post_data_buffer)
        page.wait_for_timeout(600 if len(posts) == 1 else 0)  # the first upload takes a while
        route.continue_()

    page.route("**/api/v1/inpaint", slow_upload)
    _open(page, server, tmp_path)
    _set_range(page, "#brush-size", 24)
    _stroke(page, [(40, 64), (100, 64)])
    _set_range(page, "#steps", 4)
    page.fill("#seed", "111")
    page.click("#generate")
    page.wait_for_timeout(150)
    page.click("#cancel")
    assert "Cancelled" in page.locator("#error").inner_text()
    page.fill("#seed", "222")
    page.dblclick("#generate")
    page.wait_for_function(
        "document.getElementById('progress-label').textContent.startsWith('Done')", timeout=30000
    )
    assert "seed 222" in page.locator("#result-info").inner_text()
    assert len(posts) == 2  # the cancelled one and one for the double-click
    page.wait_for_timeout(500)
    states = {job.request.seed: job.state for job in server.engine._jobs.values()}
    assert states == {111: "cancelled", 222: "done"}, states  # the first was cancelled on the server too
    assert not errors, errors
    page.close()
