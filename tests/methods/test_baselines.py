"""The four baseline methods on tiny random components: end to end, mask conventions, call counts."""

import numpy as np
import pytest
import torch

from brushnet.image import feather_mask, pil_to_tensor
from brushnet.methods import available_methods, inpaint
from brushnet.methods.builtin.controlnet_inpaint import inpaint_control_image
from brushnet.methods.builtin.repaint import repaint_schedule
from brushnet.methods.latent_method import latent_hole

FAST = {"steps": 3, "guidance_scale": 2.0, "scheduler": "ddim", "seed": 7, "prompt": "a cat"}
BASELINES = ["sd-inpainting", "blended-latent-diffusion", "repaint", "controlnet-inpaint"]


def test_every_baseline_is_registered():
    assert set(BASELINES) <= set(available_methods())


@pytest.mark.parametrize(
    ("name", "slot", "given", "needs"),
    [
        (
            "sd-inpainting",
            "inpaint_model",
            "base",
            "4-channel UNet; sd-inpainting needs a 9-channel inpainting",
        ),
        ("hd-painter", "inpaint_model", "base", "4-channel UNet; hd-painter needs a 9-channel inpainting"),
        ("repaint", "base", "inpaint_model", "9-channel UNet; repaint needs a plain 4-channel SD base"),
        (
            "blended-latent-diffusion",
            "base",
            "inpaint_model",
            "9-channel UNet; blended-latent-diffusion needs a",
        ),
    ],
)
def test_a_unet_of_the_wrong_input_width_is_one_line(tiny_models, name, slot, given, needs):
    from brushnet.errors import CheckpointError
    from brushnet.methods import load_method

    with pytest.raises(CheckpointError, match=needs) as caught:
        load_method(name, {slot: str(tiny_models[given])})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", BASELINES)
def test_end_to_end_size_calls_and_reproducible(load, scene, name):
    image, mask = scene
    method = load(name)
    steps_seen = []
    request = dict(
        FAST, num_images=2, options={"jump_length": 1, "jump_n_sample": 2} if name == "repaint" else {}
    )
    result = inpaint(method, image, mask, request, on_step=lambda i, n: steps_seen.append((i, n)))
    assert [im.size for im in result.images] == [(64, 64)] * 2
    if name == "repaint":
        downs = sum(m.direction == "down" for m in repaint_schedule(3, 1, 2))
        assert result.unet_calls == downs * 2 == 12
    else:
        assert result.unet_calls == FAST["steps"] * 2  # CFG pair counts 2
    if name == "controlnet-inpaint":
        assert result.extra_calls["controlnet"] == FAST["steps"] * 2
    assert steps_seen and steps_seen[-1][0] == steps_seen[-1][1]
    again = inpaint(method, image, mask, request)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.images, again.images))
    # image i uses seed + i: the second image of the batch equals a single run at seed + 1
    single = inpaint(method, image, mask, dict(request, num_images=1, seed=FAST["seed"] + 1))
    diff = np.abs(np.asarray(single.images[0], np.int16) - np.asarray(result.images[1], np.int16))
    assert diff.max() <= 1


def test_unknown_option_is_an_error(load, scene):
    from brushnet.errors import InputError

    with pytest.raises(InputError, match="jump_lenght"):
        inpaint(load("repaint"), *scene, dict(FAST, options={"jump_lenght": 2}))


# ---- latent-resolution mask ---------------------------------------------------------------------------------


def test_latent_hole_never_under_covers():
    hole = torch.zeros(1, 1, 32, 32)
    hole[0, 0, 9, 17] = 1  # one pixel in latent cell (1, 2)
    cells = latent_hole(hole, 8)
    assert cells.sum() == 1 and cells[0, 0, 1, 2] == 1
    # every hole pixel lies in a hole cell, for a random mask
    rng = np.random.default_rng(0)
    hole = torch.from_numpy(rng.random((1, 1, 64, 48)) > 0.97).float()
    up = latent_hole(hole, 8).repeat_interleave(8, -1).repeat_interleave(8, -2)
    assert torch.all(up >= hole)
    dilated = latent_hole(hole, 8, dilation=1)
    assert torch.all(dilated >= latent_hole(hole, 8)) and dilated.sum() > latent_hole(hole, 8).sum()


# ---- pre-decode latent probes (BLD, RePaint): catch an inverted mask -------------------------------------------


def _capture_decode(method, monkeypatch):
    captured = {}
    original = method.decode

    def decode(latents):
        captured["latents"] = latents.clone()
        return original(latents)

    monkeypatch.setattr(method, "decode", decode)
    return captured


@pytest.mark.parametrize(
    "name,options",
    [
        ("blended-latent-diffusion", {}),
        ("blended-latent-diffusion", {"blend_start": 0.5, "mask_dilation": 1}),
        ("repaint", {"jump_length": 1, "jump_n_sample": 2}),
    ],
)
def test_known_latent_is_input_latent_exactly(load, scene, monkeypatch, name, options):
    image, mask = scene
    method = load(name)
    captured = _capture_decode(method, monkeypatch)
    inpaint(method, image, mask, dict(FAST, options=options))
    source = method.encode(pil_to_tensor(image))
    hole = torch.from_numpy(np.asarray(mask) > 127).float()[None, None]
    cells = latent_hole(hole, 8, options.get("mask_dilation", 0))[0, 0] > 0.5
    latents = captured["latents"][0]
    assert torch.equal(
        latents[:, ~cells], source[0][:, ~cells]
    )  # kept cells: the clean input latent, exactly
    # the hole is generated (an inverted mask would keep the hole and regenerate the rest)
    assert (latents[:, cells] - source[0][:, cells]).abs().mean() > 0.05


@pytest.mark.parametrize("name", ["blended-latent-diffusion", "repaint"])
def test_inverted_mask_is_caught(load, scene, monkeypatch, name):
    """With `invert_mask` the roles swap: the centre cells now keep the input latent and the border is new."""
    image, mask = scene
    method = load(name)
    captured = _capture_decode(method, monkeypatch)
    options = {"jump_length": 1, "jump_n_sample": 1} if name == "repaint" else {}
    inpaint(method, image, mask, dict(FAST, options=options, invert_mask=True))
    source = method.encode(pil_to_tensor(image))[0]
    latents = captured["latents"][0]
    centre = (slice(None), slice(3, 5), slice(3, 5))
    corner = (slice(None), slice(0, 2), slice(0, 2))
    assert torch.equal(latents[centre], source[centre])
    assert not torch.equal(latents[corner], source[corner])


def test_repaint_schedule_structure():
    assert [(m.start, m.end) for m in repaint_schedule(3, 10, 5)] == [(3, 2), (2, 1), (1, 0)]  # no jump fits
    moves = repaint_schedule(4, 2, 3)
    path = [moves[0].start] + [m.end for m in moves]
    # down 2, (up 2, down 2) × 2, then down 2 more, (up 2, down 2) × 2 at level 0
    assert path == [4, 3, 2, 3, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0]
    assert all(abs(m.start - m.end) == 1 for m in moves)
    for steps, j, r in [(10, 3, 2), (50, 10, 10), (7, 7, 4)]:
        downs = sum(m.direction == "down" for m in repaint_schedule(steps, j, r))
        assert downs == steps + (steps // j) * (r - 1) * j


def test_repaint_unet_calls_follow_schedule(load, scene):
    result = inpaint(
        load("repaint"),
        *scene,
        dict(FAST, guidance_scale=1.0, options={"jump_length": 2, "jump_n_sample": 3}),
    )
    assert result.unet_calls == sum(m.direction == "down" for m in repaint_schedule(3, 2, 3)) == 7


# ---- pipeline-backed methods: what reaches the models ----------------------------------------------------------


def test_sd_inpainting_unet_sees_hole_as_one(load, scene):
    image, mask = scene
    method = load("sd-inpainting")
    seen = []
    handle = method.pipeline.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        inpaint(method, image, mask, dict(FAST, guidance_scale=1.0))
    finally:
        handle.remove()
    model_input = seen[0][0]
    assert model_input.shape[0] == 9
    expected = latent_hole(torch.from_numpy(np.asarray(mask) > 127).float()[None, None], 8)[0, 0]
    assert torch.equal(model_input[4], expected)  # the UNet's mask channel: 1 = repaint, on the hole only


def test_controlnet_control_image_marks_hole_minus_one(load, scene):
    image, mask = scene
    method = load("controlnet-inpaint")
    seen = []
    handle = method.pipeline.controlnet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["controlnet_cond"].clone()), with_kwargs=True
    )
    try:
        inpaint(method, image, mask, dict(FAST, guidance_scale=1.0))
        inpaint(method, image, mask, dict(FAST, guidance_scale=1.0, options={"hole_value": 0.0}))
    finally:
        handle.remove()
    cond = seen[0][0]
    hole = torch.from_numpy(np.asarray(mask) > 127)
    assert torch.all(cond[:, hole] == -1)
    assert torch.allclose(cond[:, ~hole], pil_to_tensor(image)[0][:, ~hole])
    direct = inpaint_control_image(pil_to_tensor(image), hole.float()[None, None])
    assert torch.equal(direct[0], cond)
    # hole_value: black holes, for the ControlNets trained on those (several SDXL ones)
    black = seen[-1][0]
    assert torch.all(black[:, hole] == 0) and torch.equal(black[:, ~hole], cond[:, ~hole])


def test_controlnet_pipeline_mask_is_one_on_the_hole(load, scene, monkeypatch):
    """The pipeline's own mask (its latent blending keeps the input where it is 0) must be 1 on the hole."""
    image, mask = scene
    method = load("controlnet-inpaint")
    seen = []
    original = method.pipeline.prepare_mask_latents

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out[0].clone())
        return out

    monkeypatch.setattr(method.pipeline, "prepare_mask_latents", spy)
    inpaint(method, image, mask, dict(FAST, guidance_scale=1.0))
    expected = latent_hole(torch.from_numpy(np.asarray(mask) > 127).float()[None, None], 8)[0, 0]
    assert torch.equal(seen[0][0, 0], expected)


def test_control_guidance_window_is_validated(load, scene):
    from brushnet.errors import InputError

    with pytest.raises(InputError):
        inpaint(
            load("controlnet-inpaint"),
            *scene,
            dict(FAST, options={"control_guidance_start": 0.8, "control_guidance_end": 0.2}),
        )


# ---- shared guarantee: kept pixels byte-identical with blend=True, for every registered method --------------


@pytest.mark.parametrize("name", sorted(set(available_methods())))
def test_blend_keeps_pixels_exactly(load, scene, name):
    image, mask = scene
    # hd-painter: the tiny UNet has no cross-attention at 1/4 of the latent size, RASG's layers (PAIntA stays on)
    options = {"repaint": {"jump_length": 1, "jump_n_sample": 1}, "hd-painter": {"rasg": False}}.get(name, {})
    result = inpaint(load(name), image, mask, dict(FAST, options=options, blend=True))
    hole = torch.from_numpy(np.asarray(mask) > 127).float()[None, None]
    outside = (feather_mask(hole, 21)[0, 0] == 0).numpy()
    assert outside.sum() > 2000  # the band leaves most of the 64×64 image outside
    out, original = np.asarray(result.images[0]), np.asarray(image)
    assert np.array_equal(out[outside], original[outside])
    assert not np.array_equal(out[~outside], original[~outside])  # and the hole was actually regenerated


def test_sd15_latent_methods_keep_their_vae_in_the_methods_dtype(tiny_models, scene):
    """Only SDXL's VAE is upcast (it overflows in float16): diffusers writes ``force_upcast`` true into every VAE
    config, SD1.5's too, and the SD1.5 pipelines (BrushNet's among them) run their VAE in the model's dtype; the
    latent-loop methods do the same, so a comparison runs every method's VAE alike."""
    import torch

    from brushnet.methods import inpaint, load_method

    for name in ("blended-latent-diffusion", "repaint"):
        method = load_method(name, {"base": tiny_models["base"]}, dtype="fp16")
        assert method.family == "sd15" and method.vae.config.force_upcast
        dtypes = []
        hook = method.vae.decoder.conv_in.register_forward_hook(
            lambda m, i, o, seen=dtypes: seen.append(o.dtype)
        )
        try:
            inpaint(method, *scene, {"steps": 1, "seed": 0, "prompt": "x"})
        finally:
            hook.remove()
        assert dtypes and set(dtypes) == {torch.float16}, name
