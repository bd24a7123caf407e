"""The web page's method options for PowerPaint, without a browser: the page's own functions (app.js
``renderMethodOptions``, ``resolveSchema``, ``collectOptions``) run in Node on a minimal stand-in DOM, fed
the real ``GET /api/v1/methods`` listing; the options they collect are then posted as a job.
(tests/service/test_browser.py drives the whole page in Chromium where Playwright is installed.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import make_client, png, scene_image, scene_mask

APP_JS = Path(__file__).parents[2] / "src" / "brushnet" / "service" / "static" / "app.js"
NODE = shutil.which("node")

HARNESS = r"""
class El {
  constructor(tag) { this.tagName = tag.toUpperCase(); this.children = []; this.dataset = {}; this.value = ""; }
  append(...items) {
    for (const item of items) {
      this.children.push(item);
      if (this.tagName === "SELECT" && (item.selected || this.children.length === 1)) this.value = item.value;
    }
  }
  replaceChildren(...items) { this.children = []; this.value = ""; this.append(...items); }
  find(test) {
    const out = [];
    const walk = (el) => { for (const c of el.children || []) if (c instanceof El) { if (test(c)) out.push(c); walk(c); } };
    walk(this);
    return out;
  }
  querySelector(sel) { return this.find((c) => c.tagName === sel.toUpperCase())[0] || null; }
  querySelectorAll(sel) { return sel === "[data-option]" ? this.find((c) => "option" in c.dataset) : []; }
}
class Option { constructor(text, value, defaultSelected, selected) { Object.assign(this, { text, value, selected }); } }
const document = { createElement: (tag) => new El(tag) };
const elements = { "method": new El("select"), "scheduler": new El("select"), "method-options": new El("div"),
                   "method-description": new El("small"), "method-options-box": new El("details"),
                   "control-image-field": new El("label"), "guidance": new El("input"),
                   "guidance-value": new El("output") };
elements["method-options-box"].append(new El("summary"));
const $ = (id) => elements[id];
const state = { config: JSON.parse(require("fs").readFileSync(0, "utf8")) };
//FUNCTIONS//
const report = {};
for (const name of state.config.methods.map((m) => m.name)) {
  elements.method.value = name;
  renderMethodOptions();
  report[name] = elements["method-options"].querySelectorAll("[data-option]").map((i) => ({
    option: i.dataset.option, tag: i.tagName, type: i.type, kind: i.dataset.kind, min: i.min, max: i.max,
    value: i.value, choices: (i.children || []).map((o) => o.value),
  }));
}
elements.method.value = "powerpaint";
renderMethodOptions();
for (const input of elements["method-options"].querySelectorAll("[data-option]")) {
  if (input.dataset.option === "task") input.value = "shape-guided";
  if (input.dataset.option === "fitting_degree") input.value = "0.7";
}
report.collected = collectOptions();
console.log(JSON.stringify(report));
"""


def page_functions(*names: str) -> str:
    """The source of top-level functions of app.js (each ends at its closing brace in column 0)."""
    source = APP_JS.read_text()
    out = []
    for name in names:
        match = re.search(rf"^function {name}\(.*?^}}$", source, re.S | re.M)
        assert match, name
        out.append(match.group(0))
    return "\n".join(out)


@pytest.fixture(scope="module")
def powerpaint_method(tiny_models):
    from brushnet.methods import load_method
    from brushnet.random_models import build_random_powerpaint

    folder = build_random_powerpaint(tiny_models["root"] / "powerpaint", tiny_models["base"])
    return load_method("powerpaint", {"base": str(tiny_models["base"]), "powerpaint": str(folder)})


@pytest.mark.skipif(NODE is None, reason="needs node")
def test_page_shows_task_and_fitting_degree_for_powerpaint_and_posts_them(powerpaint_method, blended_method):
    with make_client({"powerpaint": powerpaint_method, "blended-latent-diffusion": blended_method}) as client:
        listing = client.get("/api/v1/methods").json()
        script = HARNESS.replace(
            "//FUNCTIONS//",
            page_functions("currentMethod", "renderMethodOptions", "resolveSchema", "collectOptions", "setRange"),
        )
        out = subprocess.run(
            [NODE, "-e", script],
            input=json.dumps(listing),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        report = json.loads(out.stdout)
        controls = {c["option"]: c for c in report["powerpaint"]}
        assert controls["task"]["tag"] == "SELECT" and controls["task"]["value"] == "text-guided"
        assert controls["task"]["choices"] == [
            "text-guided",
            "shape-guided",
            "object-removal",
            "context-aware",
            "outpainting",
        ]
        fitting = controls["fitting_degree"]
        assert (fitting["tag"], fitting["type"], fitting["min"], fitting["max"], fitting["value"]) == (
            "INPUT",
            "number",
            0,
            1,
            1,
        )
        # the controls exist only for PowerPaint
        assert not {"task", "fitting_degree"} & {c["option"] for c in report["blended-latent-diffusion"]}
        collected = report["collected"]
        assert collected["task"] == "shape-guided" and collected["fitting_degree"] == 0.7

        request = {"method": "powerpaint", "steps": 2, "seed": 3, "options": collected}
        files = {
            "image": ("i.png", png(scene_image()), "image/png"),
            "mask": ("m.png", png(scene_mask()), "image/png"),
        }
        response = client.post(
            "/api/v1/inpaint", files=files, data={"request": json.dumps(request), "wait": "1"}
        )
        assert response.status_code == 200, response.text
        parameters = json.loads(response.headers["x-brushnet-parameters"])["parameters"]
        assert (
            parameters["options"]["task"] == "shape-guided" and parameters["options"]["fitting_degree"] == 0.7
        )
        # the fitting degree moved, then another task chosen: refused in one line, not silently dropped
        request["options"] = {**collected, "task": "object-removal"}
        response = client.post(
            "/api/v1/inpaint", files=files, data={"request": json.dumps(request), "wait": "1"}
        )
        assert response.status_code == 422 and "fitting_degree" in response.json()["error"], response.text
