"""The brushnet method behind the shared interface: what reaches the branch (mask convention), counted calls,
batch image i == a single run at seed + i, and the model paths recorded in the result."""

import numpy as np
import pytest
import torch

from brushnet.image import pil_to_tensor
from brushnet.methods import inpaint
from brushnet.schedulers import make_scheduler

FAST = {"steps": 3, "guidance_scale": 2.0, "scheduler": "ddim", "seed": 7, "prompt": "a cat"}


def _capture_branch(method):
    seen = []
    handle = method.pipeline.brushnet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["brushnet_cond"].clone()), with_kwargs=True
    )
    return seen, handle


@pytest.mark.parametrize("invert", [False, True])
def test_branch_sees_keep_mask_and_blacked_out_hole(load, scene, invert):
    """The branch's 5th channel is the keep mask (1 = known): 0 on the hole cells. An inverted conversion (or
    ``invert_mask``) swaps it, and the masked-image latent then hides the other region."""
    image, mask = scene
    method = load("brushnet")
    seen, handle = _capture_branch(method)
    encoded = []
    vae_handle = method.pipeline.vae.encoder.register_forward_pre_hook(
        lambda m, a: encoded.append(a[0].clone())
    )
    try:
        inpaint(method, image, mask, dict(FAST, guidance_scale=1.0, invert_mask=invert))
    finally:
        handle.remove()
        vae_handle.remove()
    cond = seen[0][0]
    assert cond.shape == (5, 8, 8)
    hole = torch.from_numpy(np.asarray(mask) > 127)
    if invert:
        hole = ~hole
    cells = torch.zeros(8, 8, dtype=torch.bool)
    cells[3:5, 3:5] = True  # the 16×16 hole at (24, 24) covers latent cells 3..4
    expected_keep = (~cells if not invert else cells).float()
    assert torch.equal(cond[4], expected_keep)
    # the VAE encodes the image with the hole blacked out (−1) and the known pixels as they are
    masked = encoded[0][0]
    source = pil_to_tensor(image)[0] * 2 - 1
    assert torch.all(masked[:, hole] == -1)
    assert torch.allclose(masked[:, ~hole], source[:, ~hole], atol=1e-6)


def test_calls_counted_and_models_recorded(load, scene, tiny_models):
    method = load("brushnet")
    result = inpaint(method, *scene, FAST)
    assert result.unet_calls == FAST["steps"] * 2  # CFG: one UNet evaluation per half
    branch_per_step = 2 if method.pipeline.brushnet.uses_text else 1  # a text-free branch runs once per step
    assert result.extra_calls == {"brushnet": FAST["steps"] * branch_per_step}
    without_cfg = inpaint(method, *scene, dict(FAST, guidance_scale=1.0))
    assert without_cfg.unet_calls == FAST["steps"] and without_cfg.extra_calls == {"brushnet": FAST["steps"]}
    assert result.parameters["models"] == {  # the models it read, not every path it was given
        "base": tiny_models["base"],
        "brushnet": tiny_models["brushnet"],
        "allow_pickle": False,
    }
    assert result.parameters["options"] == {
        "conditioning_scale": 1.0,
        "control_guidance_start": 0.0,
        "control_guidance_end": 1.0,
        "guess_mode": False,
        "controlnet_conditioning_scale": 1.0,
        "controlnet_guidance_start": 0.0,
        "controlnet_guidance_end": 1.0,
        "pag_scale": 0.0,
        "pag_adaptive_scale": 0.0,
        "pag_layers": "mid",
    }
    # perturbed-attention guidance adds a third UNet evaluation per step; the branch's count does not change
    pag = inpaint(method, *scene, dict(FAST, options={"pag_scale": 2.0}))
    assert pag.unet_calls == FAST["steps"] * 3
    assert pag.extra_calls == {"brushnet": FAST["steps"] * branch_per_step}


def test_progress_counts_scheduler_timesteps_not_steps(load, scene):
    method = load("brushnet")
    steps_seen = []
    # PNDM (PLMS) evaluates the model twice at its second timestep: 5 evaluations for 4 steps
    request = dict(FAST, scheduler="pndm", steps=4)
    result = inpaint(method, *scene, request, on_step=lambda i, n: steps_seen.append((i, n)))
    pndm = make_scheduler("pndm", method.base_scheduler_config)
    pndm.set_timesteps(4)
    total = len(pndm.timesteps)
    assert total > 4
    assert steps_seen[-1] == (total, total) and len(steps_seen) == total
    assert result.unet_calls == total * 2


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_pndm_runs_with_fewer_than_four_steps_on_a_base_whose_scheduler_is_not_pndm(load, scene, steps):
    """``pndm`` is PLMS (``skip_prk_steps``, as Stable Diffusion's own PNDM configs): built from the tiny base's
    DDIM config, diffusers' default Runge-Kutta warm-up failed below 4 steps (a numpy broadcast error after
    loading) and spent 13 model evaluations on 4 steps."""
    method = load("brushnet")
    assert method.base_scheduler_config["_class_name"] != "PNDMScheduler"
    result = inpaint(method, *scene, dict(FAST, scheduler="pndm", steps=steps))
    assert result.unet_calls == (steps + (steps > 1)) * 2  # with guidance: two evaluations per timestep


def test_batch_image_i_equals_single_run_at_seed_plus_i(load, scene):
    method = load("brushnet")
    batch = inpaint(method, *scene, dict(FAST, num_images=2))
    single = inpaint(method, *scene, dict(FAST, seed=FAST["seed"] + 1))
    assert batch.parameters["seeds"] == [7, 8]
    diff = np.abs(np.asarray(single.images[0], np.int16) - np.asarray(batch.images[1], np.int16))
    assert diff.max() <= 1
    assert not np.array_equal(np.asarray(batch.images[0]), np.asarray(batch.images[1]))


def test_options_change_the_output(load, scene):
    method = load("brushnet")
    base = np.asarray(inpaint(method, *scene, dict(FAST, blend=False)).images[0], np.int16)
    off = inpaint(method, *scene, dict(FAST, blend=False, options={"conditioning_scale": 0.0}))
    assert np.abs(np.asarray(off.images[0], np.int16) - base).max() > 0
    assert off.parameters["options"]["conditioning_scale"] == 0.0
