"""`hd-painter` in the service: its options are listed in a form the web page builds controls from (checkboxes,
numbers with bounds, a select, text fields), and a request with options set from those controls runs. The page
itself is driven in Chromium where one is installed (.ci/run installs it)."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from .conftest import make_client, png

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hd_painter"
RENDERED = {"boolean": "checkbox", "integer": "number", "number": "number", "string": "text"}


@pytest.fixture(scope="module")
def hd_painter():
    from brushnet.methods import load_method

    return load_method("hd-painter", {"inpaint_model": str(FIXTURE / "model")})


def _resolve(spec: dict, root: dict) -> dict:
    """The page's `resolveSchema` (static/app.js): follow `$ref`, take the non-null branch of `anyOf`."""
    if "$ref" in spec:
        return {
            **root["$defs"][spec["$ref"].split("/")[-1]],
            **{k: v for k, v in spec.items() if k != "$ref"},
        }
    if "anyOf" in spec:
        real = next(s for s in spec["anyOf"] if s.get("type") != "null")
        return {**_resolve(real, root), **{k: v for k, v in spec.items() if k != "anyOf"}}
    return spec


def test_options_are_listed_as_controls_the_page_renders(hd_painter):
    with make_client({"hd-painter": hd_painter}) as client:
        listed = client.get("/api/v1/methods").json()
    (method,) = listed["methods"]
    assert method["name"] == "hd-painter" and method["schedulers"] == ["ddim"]
    schema = method["options_schema"]
    controls = {}
    for name, spec in schema["properties"].items():
        spec = _resolve(spec, schema)
        controls[name] = "select" if "enum" in spec else RENDERED[spec["type"]]
        assert name in method["options_defaults"]
    assert controls == {
        "painta": "checkbox",
        "rasg": "checkbox",
        "rasg_eta": "number",
        "painta_end_timestep": "number",
        "positive_prompt": "text",
        "default_negative_prompt": "text",
        "timestep_spacing": "select",
    }
    eta = schema["properties"]["rasg_eta"]
    assert (eta["minimum"], eta["maximum"], method["options_defaults"]["rasg_eta"]) == (0.0, 1.0, 0.1)
    assert _resolve(schema["properties"]["timestep_spacing"], schema)["enum"] == ["original", "trailing"]


def test_a_request_with_the_pages_option_values_runs(hd_painter):
    image = Image.open(FIXTURE / "image.png").convert("RGB")
    mask = Image.open(FIXTURE / "mask.png")
    # what the page's collectOptions sends: booleans from checkboxes, numbers, strings from text and select
    options = {
        "painta": True,
        "rasg": True,
        "rasg_eta": 0.5,
        "painta_end_timestep": 500,
        "positive_prompt": "",
        "default_negative_prompt": "",
        "timestep_spacing": "trailing",
    }
    request = {"prompt": "a yellow teapot", "steps": 3, "seed": 1, "options": options}
    with make_client({"hd-painter": hd_painter}) as client:
        files = {"image": ("i.png", png(image), "image/png"), "mask": ("m.png", png(mask), "image/png")}
        r = client.post("/api/v1/inpaint", files=files, data={"request": json.dumps(request), "wait": "1"})
    assert r.status_code == 200, r.text
    meta = json.loads(Image.open(io.BytesIO(r.content)).info["brushnet"])
    assert meta["parameters"]["options"] == options
    assert meta["unet_calls"] == 6 and meta["extra_calls"] == {"rasg_backward": 4}


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no chromium: install Debian's 'chromium' package")
def test_page_builds_the_option_controls(hd_painter, blended_method):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    from brushnet.service.api import create_app
    from brushnet.service.engine import Engine, Limits
    from brushnet.service.server import BackgroundServer

    engine = Engine({"blended-latent-diffusion": blended_method, "hd-painter": hd_painter}, Limits())
    try:
        with BackgroundServer(create_app(engine)) as live, sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(live.url + "/")
            page.wait_for_function("document.querySelectorAll('#method option').length === 2")
            page.select_option("#method", "hd-painter")
            option = "#method-options [data-option='{}']".format
            page.wait_for_selector(option("rasg_eta"), state="attached")
            assert page.locator(option("painta")).get_attribute("type") == "checkbox"
            assert page.locator(option("painta")).is_checked() and page.locator(option("rasg")).is_checked()
            assert float(page.locator(option("rasg_eta")).input_value()) == 0.1
            assert page.locator(option("rasg_eta")).get_attribute("max") == "1"
            assert page.locator(option("painta_end_timestep")).input_value() == "500"
            assert page.locator(option("timestep_spacing")).evaluate("el => el.tagName") == "SELECT"
            assert page.locator(option("timestep_spacing")).input_value() == "original"
            assert page.locator(option("positive_prompt")).input_value().startswith("Full HD")
            # the scheduler list follows the method: hd-painter takes ddim only (unipc would be refused)
            # (option values, not innerText: the select sits in a closed <details>, whose content renders no text)
            schedulers = 'els => els.map((e) => e.value)'
            assert page.eval_on_selector_all("#scheduler option", schedulers) == ["ddim"]
            page.select_option("#method", "blended-latent-diffusion")
            assert len(page.eval_on_selector_all("#scheduler option", schedulers)) > 1
            assert page.locator("#scheduler").input_value() == "ddim"  # kept where the method allows it
            assert not errors, errors
            browser.close()
    finally:
        engine.close()
