"""``--compile``'s switch on the method interface (issue 14): :meth:`InpaintMethod.compile` takes a BrushNet
pipeline's fast path, wraps other methods' UNet / ControlNet in ``torch.compile``, leaves HD-Painter eager; the CLI's
runtime loads methods through it. Checked with the ``eager`` backend (dynamo traces, no kernels generated)."""

import logging

import numpy as np
import pytest
import torch._dynamo

from brushnet.cli.common import Runtime
from brushnet.methods import inpaint, load_method

FAST = {"steps": 2, "guidance_scale": 2.0, "scheduler": "ddim", "seed": 3, "prompt": "a cat"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


@pytest.mark.parametrize(
    "name, compiled",
    [
        ("sd-inpainting", ["unet"]),
        ("controlnet-inpaint", ["unet", "controlnet"]),
    ],
)
def test_compile_gives_the_eager_images(tiny_models, scene, name, compiled):
    """BrushNet's compiled step is the pipeline's fast path, whose images tests/pipelines/test_fast_path.py
    compares with the eager ones; its switch here: test_brushnet_compiles_its_denoising_step."""
    image, mask = scene
    method = load_method(name, tiny_models)  # its own copy: compiling changes the loaded method
    eager = _pixels(inpaint(method, image, mask, FAST))
    assert method.compile(backend="eager") == compiled
    assert all(hasattr(getattr(method.pipeline, part), "_orig_mod") for part in compiled)
    fast = _pixels(inpaint(method, image, mask, FAST))
    assert np.abs(fast - eager).max() <= 1  # same images, up to one 8-bit step of rounding


def test_brushnet_compiles_its_denoising_step(tiny_models):
    method = load_method("brushnet", tiny_models)
    assert not method.pipeline.is_compiled
    assert method.compile(backend="eager") == ["denoising step"]
    assert method.pipeline.is_compiled and not hasattr(method.pipeline.unet, "_orig_mod")


def test_hd_painter_stays_eager(tiny_models, caplog):
    method = load_method("hd-painter", tiny_models)
    with caplog.at_level(logging.WARNING):
        assert method.compile(backend="eager") == []
    assert "hd-painter has no compiled path" in caplog.text
    assert not hasattr(method.pipeline.unet, "_orig_mod")


def test_runtime_loads_compiled_methods_with_the_flag(tiny_models):
    assert Runtime(compile=True).load_method("brushnet", tiny_models).pipeline.is_compiled
    assert not Runtime().load_method("brushnet", tiny_models).pipeline.is_compiled
