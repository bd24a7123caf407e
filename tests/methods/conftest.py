"""Tiny random-weight components for the method tests, built once per session and loaded from disk."""

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """`ModelPaths` dict with every model the built-in methods need (tiny preset, fixed seeds)."""
    from brushnet.random_models import (
        build_base,
        build_brushnet,
        build_controlnet,
        build_inpaint_model,
        build_random_powerpaint,
    )

    root = tmp_path_factory.mktemp("tiny_models")
    base = build_base(root / "base", "tiny")
    return {
        "base": str(base),
        "brushnet": str(build_brushnet(root / "brushnet", base)),
        "inpaint_model": str(build_inpaint_model(root / "inpaint", base, "tiny")),
        "controlnet": str(build_controlnet(root / "controlnet", base)),
        "powerpaint": str(build_random_powerpaint(root / "powerpaint", base)),
    }


_LOADED = {}


@pytest.fixture(scope="session")
def load(tiny_models):
    """`load(name)` → the method loaded on the tiny models (cached: each method loads once per session)."""
    from brushnet.methods import load_method

    def _load(name):
        if name not in _LOADED:
            _LOADED[name] = load_method(name, tiny_models)
        return _LOADED[name]

    return _load


@pytest.fixture(scope="session")
def scene():
    """A 64×64 image (smooth gradient + a bright square in the known region) and a 16×16 centre hole."""
    y, x = np.mgrid[0:64, 0:64]
    arr = np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)
    arr[4:12, 4:12] = (250, 10, 10)
    mask = np.zeros((64, 64), np.uint8)
    mask[24:40, 24:40] = 255
    return Image.fromarray(arr), Image.fromarray(mask)
