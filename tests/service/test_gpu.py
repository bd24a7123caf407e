"""The service on a CUDA device (run where a GPU is lent: ``python -m pytest -m gpu tests/service``).

Several methods share the device's one worker; in fp16 and fp32 each answer equals a direct library call.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet.methods import inpaint, load_method

from .conftest import make_client, png, scene_image, scene_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_methods_on_one_cuda_worker_match_direct_calls(tiny_models, dtype):
    from brushnet.random_models import build_inpaint_model

    paths = {
        "base": str(tiny_models["base"]),
        "brushnet": str(tiny_models["brushnet"]),
        "inpaint_model": str(build_inpaint_model(tiny_models["root"] / "inpaint", tiny_models["base"])),
    }
    methods = {n: load_method(n, paths, device="cuda", dtype=dtype) for n in ("brushnet", "sd-inpainting")}
    answers = {}
    with make_client(methods) as client:
        assert client.get("/api/v1/health").json()["workers"] == ["cuda"]
        for name in methods:
            r = client.post(
                "/api/v1/inpaint",
                files={"image": ("i.png", png(scene_image())), "mask": ("m.png", png(scene_mask()))},
                data={"method": name, "steps": "4", "seed": "3", "wait": "true"},
            )
            assert r.status_code == 200, r.text
            answers[name] = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    # the engine is closed: direct calls on the same pipelines are safe now
    for name, method in methods.items():
        direct = inpaint(method, scene_image(), scene_mask(), {"steps": 4, "seed": 3}).images[0]
        np.testing.assert_array_equal(answers[name], np.asarray(direct))
        hole = np.asarray(scene_mask()) > 0
        assert np.abs(answers[name].astype(int) - np.asarray(scene_image()))[hole].mean() > 5
