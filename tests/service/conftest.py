"""Fixtures for the service tests: engines over the tiny random models and a test client."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from brushnet.methods.builtin.brushnet import BrushNetMethod

pytest.importorskip("fastapi")
pytest.importorskip("multipart")


class GatedBrushNet(BrushNetMethod):
    """The real tiny BrushNet, with two test hooks: ``gate`` (each job waits for it before denoising, so a
    test can hold the worker busy) and ``step_delay`` (seconds slept per step, so progress is observable).
    """

    def __init__(self, inner: BrushNetMethod):
        self.__dict__.update(inner.__dict__)
        self.gate = threading.Event()
        self.gate.set()
        self.step_delay = 0.0
        self.started = threading.Semaphore(0)  # released once per job that reaches generate()

    def generate(self, task):
        self.started.release()
        self.gate.wait(30)

        def slow_step(step, total):
            if self.step_delay:
                time.sleep(self.step_delay)
            task.step(step, total)

        return super().generate(dataclasses.replace(task, on_step=slow_step))


@pytest.fixture(scope="session")
def brushnet_method(tiny_models):
    from brushnet.methods import load_method

    return load_method(
        "brushnet", {"base": str(tiny_models["base"]), "brushnet": str(tiny_models["brushnet"])}
    )


@pytest.fixture(scope="session")
def blended_method(tiny_models):
    from brushnet.methods import load_method

    return load_method("blended-latent-diffusion", {"base": str(tiny_models["base"])})


@pytest.fixture
def gated(brushnet_method):
    """A fresh gated wrapper over the shared tiny BrushNet (the weights are shared, not copied)."""
    method = GatedBrushNet(brushnet_method)
    yield method
    method.gate.set()


@contextlib.contextmanager
def make_client(methods, **limits):
    """A TestClient over a fresh engine; the engine is closed on exit."""
    from fastapi.testclient import TestClient

    from brushnet.service.api import create_app
    from brushnet.service.engine import Engine, Limits

    engine = Engine(methods, Limits(**limits))
    try:
        with TestClient(create_app(engine), raise_server_exceptions=False) as client:
            client.engine = engine
            yield client
    finally:
        engine.close()


@pytest.fixture
def client(gated, blended_method):
    with make_client({"brushnet": gated, "blended-latent-diffusion": blended_method}) as c:
        yield c


def scene_image(size: int = 64) -> Image.Image:
    """A smooth gradient with a red square (kept region), deterministic."""
    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    arr[4:12, 4:12] = (250, 10, 10)
    return Image.fromarray(arr)


def scene_mask(size: int = 64, box=(24, 24, 40, 40)) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask)


def png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()
