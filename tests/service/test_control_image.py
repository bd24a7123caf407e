"""A brushnet served with a guide ControlNet takes a control image through the API (multipart and JSON) and the
page; a control image for a method without one, or none where one is needed, is a 400 with one line."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from .conftest import make_client, png, scene_image, scene_mask


@pytest.fixture(scope="module")
def guided_method(tiny_models):
    import torch

    from brushnet.methods import load_method
    from brushnet.random_models import build_controlnet

    controlnet = build_controlnet(tiny_models["root"] / "guide_controlnet", tiny_models["base"], seed=4)
    paths = {
        "base": str(tiny_models["base"]),
        "brushnet": str(tiny_models["brushnet"]),
        "guide_controlnet": str(controlnet),
    }
    method = load_method("brushnet", paths)
    with torch.no_grad():  # a random tiny ControlNet barely reads its image; scaled up it visibly does
        for param in method.pipeline.controlnet.controlnet_cond_embedding.parameters():
            param.mul_(6.0)
    return method


def _control(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


REQUEST = {"prompt": "x", "seed": 3, "steps": 2, "guidance_scale": 1.0}


def _post(client, control: Image.Image | None, method: str = "brushnet"):
    files = {
        "image": ("i.png", png(scene_image()), "image/png"),
        "mask": ("m.png", png(scene_mask()), "image/png"),
    }
    if control is not None:
        files["control_image"] = ("c.png", png(control), "image/png")
    return client.post(
        "/api/v1/inpaint?wait=true", files=files, data={"request": json.dumps({**REQUEST, "method": method})}
    )


def test_control_image_reaches_the_guide_controlnet(guided_method, blended_method):
    with make_client({"brushnet": guided_method, "blended-latent-diffusion": blended_method}) as client:
        listing = {m["name"]: m for m in client.get("/api/v1/methods").json()["methods"]}
        assert (
            listing["brushnet"]["control_image"] is True
            and listing["blended-latent-diffusion"]["control_image"] is False
        )
        dark, bright = _post(client, _control(0)), _post(client, _control(1))
        assert dark.status_code == bright.status_code == 200, dark.text
        a = np.asarray(Image.open(io.BytesIO(dark.content)), np.int16)
        b = np.asarray(Image.open(io.BytesIO(bright.content)), np.int16)
        assert np.abs(a - b).max() > 0  # the control image steers the result
        # the JSON body takes it as base64
        body = {
            **REQUEST,
            "method": "brushnet",
            "wait": True,
            "image": base64.b64encode(png(scene_image())).decode(),
            "mask": base64.b64encode(png(scene_mask())).decode(),
            "control_image": base64.b64encode(png(_control(0))).decode(),
        }
        r = client.post("/api/v1/inpaint", json=body)
        assert r.status_code == 200, r.text
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content)), np.int16), a)
        missing = _post(client, None)
        assert missing.status_code == 400 and "send a control_image" in missing.json()["error"]
        unexpected = _post(client, _control(0), method="blended-latent-diffusion")
        assert unexpected.status_code == 400 and "takes no control image" in unexpected.json()["error"]


def test_page_shows_the_control_image_input_when_the_method_takes_one():
    from pathlib import Path

    static = Path(__file__).parents[2] / "src" / "brushnet" / "service" / "static"
    html, js = (static / "index.html").read_text(), (static / "app.js").read_text()
    assert 'id="control-image-field" hidden' in html and 'id="control-image"' in html
    assert '$("control-image-field").hidden = !method.control_image' in js
    assert 'form.append("control_image"' in js
