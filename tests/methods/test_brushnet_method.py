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
        "strength": 1.0,
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


def test_non_finite_output_is_an_error_not_a_black_image(load, scene, caplog):
    """NaN latents (fp16 overflow, a bad LoRA) came out as an all-black image and exit 0; the pipeline said
    nothing either (numpy's cast warning at most)."""
    from brushnet.errors import GenerationError

    method = load("brushnet")

    def poison(pipe, step, t, tensors):
        return {"latents": tensors["latents"] * float("nan")}

    with caplog.at_level("WARNING", logger="brushnet.pipelines.common"):
        out = method.pipeline(
            "a cat", image=scene[0], mask_image=scene[1], num_inference_steps=2, callback_on_step_end=poison
        ).images[0]
    assert np.asarray(out).max() == 0 and "NaN or infinite" in caplog.text

    generate = method.generate

    def nan_generate(task):
        output = generate(task)
        output.images[-1] = float("nan")
        return output

    method.generate = nan_generate
    try:
        with pytest.raises(GenerationError, match=r"NaN or infinite values in image\(s\) 1 \(float32\)"):
            inpaint(method, *scene, {**FAST, "num_images": 2})
    finally:
        del method.generate


def test_the_cli_reports_a_generation_error_in_one_line(monkeypatch, tiny_models, scene, tmp_path):
    from typer.testing import CliRunner

    from brushnet.cli import app
    from brushnet.errors import GenerationError
    from brushnet.methods import api

    def refuse(method, images):
        raise GenerationError("brushnet produced NaN or infinite values in image(s) 0 (float32)")

    monkeypatch.setattr(api, "_refuse_non_finite", refuse)
    scene[0].save(tmp_path / "in.png")
    scene[1].save(tmp_path / "mask.png")
    args = ["inpaint", "--base", tiny_models["base"], "--brushnet", tiny_models["brushnet"], "-i",
            str(tmp_path / "in.png"), "-m", str(tmp_path / "mask.png"), "-o", str(tmp_path / "out.png"),
            "-p", "a cat", "--steps", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: brushnet produced NaN or infinite values in image(s) 0 (float32)"
    )
    assert not (tmp_path / "out.png").exists()


def test_a_working_size_far_from_native_is_said(load, scene, caplog):
    """A photo run at its own size (16x the native area here) ran silently: slow, and content repeats."""
    method = load("brushnet")
    native = method.native_resolution
    big = (scene[0].resize((native * 4, native * 4)), scene[1].resize((native * 4, native * 4)))
    with caplog.at_level("WARNING", logger="brushnet.methods.api"):
        inpaint(method, *scene, {**FAST, "steps": 1})
        assert "native" not in caplog.text
        inpaint(method, *big, {**FAST, "steps": 1})
    assert f"16 times the area of its native {native}x{native}" in caplog.text
    assert "--resolution" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="brushnet.methods.api"):  # said once per method and size
        inpaint(method, *big, {**FAST, "steps": 1})
    assert "native" not in caplog.text
    with caplog.at_level("WARNING", logger="brushnet.methods.api"):
        inpaint(method, *big, {**FAST, "steps": 1, "resolution": native})
    assert "native" not in caplog.text


def test_a_stroke_thinner_than_a_latent_cell_is_said(load, scene, caplog):
    """The branch samples one pixel of each latent cell: a 1-px stroke between samples fell out silently and
    was painted back as the blacked-out stroke."""
    from PIL import Image

    method = load("brushnet")
    factor = method.size_multiple
    assert factor > 1
    stroke = np.zeros(scene[1].size[::-1], np.uint8)
    stroke[:, 2 * factor + 1] = 255  # between the sampled columns
    mask = Image.fromarray(stroke)
    with caplog.at_level("WARNING", logger="brushnet.methods.api"):
        inpaint(method, scene[0], mask, {**FAST, "steps": 1})
    assert "100% of the cells the hole touches fall out" in caplog.text
    assert f"--mask-grow {factor // 2}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="brushnet.methods.api"):
        inpaint(method, scene[0], mask, {**FAST, "steps": 1, "mask_grow": factor // 2})
        inpaint(method, *scene, {**FAST, "steps": 1})  # an ordinary mask
        inpaint(load("blended-latent-diffusion"), scene[0], mask, {**FAST, "steps": 1})  # covers cells
    assert "fall out" not in caplog.text
    # worked on at a quarter of the input's size: the suggestion is in the input's pixels
    from brushnet.methods.api import _warn_if_the_hole_falls_out

    working = torch.zeros(1, 1, 8 * factor, 8 * factor)
    working[..., 2 * factor + 1] = 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="brushnet.methods.api"):
        _warn_if_the_hole_falls_out(method, working, 0, scale=4.0)
    assert f"thinner than {4 * factor} px of the input" in caplog.text
    assert f"--mask-grow {2 * factor})" in caplog.text
