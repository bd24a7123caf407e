"""The ``strength`` option of the methods whose pipelines start the hole from the noised input (it was fixed at
1.0: ``--option strength=0.99`` was an unknown option, and SDXL users of diffusers' inpaint pipeline are used to
0.9999 or lower)."""

from __future__ import annotations

import numpy as np
import pytest

from brushnet.errors import RequestError
from brushnet.methods import inpaint

FAST = {"steps": 4, "guidance_scale": 2.0, "scheduler": "ddim", "seed": 7, "prompt": "a cat", "blend": False}


@pytest.mark.parametrize("name", ["brushnet", "sd-inpainting", "controlnet-inpaint"])
def test_strength_runs_that_fraction_of_the_steps_from_the_input(load, scene, name):
    method = load(name)
    steps_seen = []
    full = inpaint(method, *scene, FAST)
    half = inpaint(
        method, *scene, {**FAST, "options": {"strength": 0.5}}, on_step=lambda d, t: steps_seen.append(t)
    )
    assert full.unet_calls == 2 * 4 and half.unet_calls == 2 * 2  # a CFG pair per step
    assert steps_seen and steps_seen[-1] == 2  # the progress total is the steps that run
    assert half.parameters["options"]["strength"] == 0.5
    a, b = (np.asarray(r.images[0], np.int16) for r in (full, half))
    assert np.abs(a - b).max() > 0


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_a_strength_out_of_range_is_refused_before_loading(scene, value):
    from brushnet.methods import get_method_class, prepare

    with pytest.raises(RequestError, match="strength"):
        prepare(get_method_class("brushnet"), *scene, {**FAST, "options": {"strength": value}})


def test_methods_without_it_refuse_it(scene):
    from brushnet.methods import get_method_class, prepare

    for name in ("blended-latent-diffusion", "repaint", "hd-painter", "powerpaint"):
        with pytest.raises(RequestError, match="strength"):
            prepare(get_method_class(name), *scene, {**FAST, "options": {"strength": 0.5}})


@pytest.mark.parametrize("name", ["brushnet", "sd-inpainting", "controlnet-inpaint"])
def test_a_strength_that_leaves_no_step_is_refused_before_loading(scene, name):
    """strength 0.2 of 2 steps failed in the pipeline after loading (the service answered 500)."""
    from brushnet.methods import get_method_class, prepare

    with pytest.raises(RequestError, match=r"strength 0.2 of 2 steps runs no step .*--steps"):
        prepare(get_method_class(name), *scene, {**FAST, "steps": 2, "options": {"strength": 0.2}})
    prepare(get_method_class(name), *scene, {**FAST, "steps": 5, "options": {"strength": 0.2}})  # one step
