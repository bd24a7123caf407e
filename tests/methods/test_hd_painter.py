"""The `hd-painter` method: through the shared `prepare`/`run` it reproduces the original's returned images (the
fixture's 9-channel model, tests/fixtures/hd_painter), reports its UNet and RASG backward passes, sees the hole
as the project's mask says, leaves the UNet as it was, and keeps every method's guarantees (seeds, batches)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from brushnet.errors import InputError, RequestError
from brushnet.methods import get_method_class, inpaint, load_method
from brushnet.methods.builtin.hd_painter import ORIGINAL_NEGATIVE_PROMPT, ORIGINAL_POSITIVE_PROMPT

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hd_painter"
INFO = json.loads((FIXTURE / "reference.json").read_text())
RUNS = {run["name"]: run for run in INFO["runs"]}
FAST = {"prompt": "a yellow teapot", "seed": 1234, "steps": 5}


@pytest.fixture(scope="module")
def method():
    return load_method("hd-painter", {"inpaint_model": str(FIXTURE / "model")})


@pytest.fixture(scope="module")
def scene():
    return Image.open(FIXTURE / "image.png").convert("RGB"), Image.open(FIXTURE / "mask.png")


def test_the_originals_defaults_are_the_methods():
    assert (ORIGINAL_POSITIVE_PROMPT, ORIGINAL_NEGATIVE_PROMPT) == (
        INFO["prompts"]["positive_prompt_addition"],
        INFO["prompts"]["negative_prompt"],
    )
    defaults = INFO["original"]["cli_defaults"]
    options = get_method_class("hd-painter").Options()
    assert options.painta and options.rasg and defaults["method"] == "painta+rasg"
    assert options.rasg_eta == defaults["rasg_eta"] == 0.1


@pytest.mark.parametrize("name", ["painta_rasg", "painta_rasg_padded", "baseline", "painta_rasg_guidance1"])
def test_returns_the_originals_image(method, scene, name):
    """Whole image, no paste-back: the result is the original's returned uint8 image within one level (the
    original truncates, the project rounds; both from floats within 1e-4). The padded run is a 184×120 crop."""
    spec = RUNS[name]
    image, mask = (im.crop((0, 0, *spec["input_size_wh"])) for im in scene)
    options = {"painta": spec["use_painta"], "rasg": spec["use_rasg"], "rasg_eta": spec["eta"]}
    result = inpaint(
        method, image, mask, FAST, blend=False, guidance_scale=spec["guidance_scale"], options=options
    )
    reference = load_file(str(FIXTURE / "reference.safetensors"))[f"{name}.output_final_uint8"][0].numpy()
    ours = np.asarray(result.images[0])
    assert ours.shape == reference.shape
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1
    # the defaults added the original's prompt additions (the request itself stays as given)
    assert result.parameters["negative_prompt"] == ""
    assert result.parameters["options"]["positive_prompt"] == ORIGINAL_POSITIVE_PROMPT


@pytest.mark.parametrize(
    "request_update, unet_calls, backward",
    [
        ({}, 5 * 2, 4 * 2),  # CFG pair counts 2; RASG on every step but the last
        ({"guidance_scale": 1.0}, 5, 4),  # conditional half only
        ({"options": {"rasg": False}}, 5 * 2, 0),
        ({"options": {"rasg_eta": 0.0}}, 5 * 2, 0),  # a gradient multiplied by 0 is not computed
        ({"steps": 7}, 8 * 2, 7 * 2),  # the original's grid: 7 requested, 8 run (and reported)
        ({"steps": 7, "options": {"timestep_spacing": "trailing"}}, 7 * 2, 6 * 2),
    ],
)
def test_call_counts(method, scene, request_update, unet_calls, backward):
    image, mask = (im.resize((128, 64)) for im in scene)
    steps = []
    result = inpaint(
        method, image, mask, {**FAST, **request_update}, on_step=lambda i, n: steps.append((i, n))
    )
    assert result.unet_calls == unet_calls
    assert result.extra_calls == {"rasg_backward": backward}
    assert steps[-1][0] == steps[-1][1] == unet_calls // (1 if request_update.get("guidance_scale") else 2)


def test_fixture_counts_are_per_image_as_reported(method, scene):
    """The original's counts: 5 UNet calls of batch 2 and 5 backward passes per image; the 5th backward pass is
    the one it throws away, so the method reports 4 (× 2 for the CFG pair, as unet_calls)."""
    spec = RUNS["painta_rasg"]
    assert spec["unet_forward_calls"] == 5 and spec["unet_batch_per_call"] == [2] * 5
    assert spec["rasg_backward_passes"] == 5
    result = inpaint(method, *scene, FAST)
    assert result.unet_calls == spec["unet_forward_calls"] * 2
    assert result.extra_calls["rasg_backward"] == (spec["rasg_backward_passes"] - 1) * 2


@pytest.mark.parametrize("invert", [False, True])
def test_unet_sees_the_hole_as_one(method, scene, invert):
    """The UNet's mask channel and PAIntA's masks are 1 on the region to generate: the hole, or with
    `invert_mask` the rest (an inverted conversion would swap them)."""
    image, mask = scene
    seen = []
    unet = method.pipeline.unet
    handle = unet.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0, 4].clone()))
    try:
        inpaint(method, image, mask, FAST, invert_mask=invert, options={"rasg": False})
    finally:
        handle.remove()
    hole = torch.from_numpy(np.asarray(mask) > 127)
    cells = torch.nn.functional.avg_pool2d(hole.float()[None, None], 8)[
        0, 0
    ]  # fraction of hole per latent cell
    target = cells > 0 if not invert else cells < 1
    assert torch.all(seen[0][target] == 1)  # every cell the region touches is marked to generate
    far = torch.nn.functional.max_pool2d(target.float()[None, None], 5, 1, 2)[0, 0] == 0
    assert far.any() and torch.all(seen[0][far] == 0)  # and cells away from it are kept


def test_batch_image_equals_single_run(method, scene):
    image, mask = (im.resize((128, 64)) for im in scene)
    batch = inpaint(method, image, mask, FAST, num_images=2)
    single = inpaint(method, image, mask, dict(FAST, seed=FAST["seed"] + 1))
    diff = np.abs(np.asarray(batch.images[1], np.int16) - np.asarray(single.images[0], np.int16))
    assert diff.max() <= 1
    assert batch.unet_calls == single.unet_calls == 10 and batch.extra_calls == single.extra_calls


def test_unet_is_unchanged_after_calls(method, scene):
    unet = method.pipeline.unet
    processors = dict(unet.attn_processors)
    parameters = {name: p.detach().clone() for name, p in unet.named_parameters()}
    image, mask = (im.resize((128, 64)) for im in scene)
    inpaint(method, image, mask, FAST)
    with pytest.raises(RuntimeError, match="stop"):

        def stop(done, total):
            raise RuntimeError("stop")

        inpaint(method, image, mask, FAST, on_step=stop)
    assert all(unet.attn_processors[name] is processor for name, processor in processors.items())
    assert all(torch.equal(p, parameters[name]) and p.grad is None for name, p in unet.named_parameters())
    assert not any(m._forward_pre_hooks or m._backward_pre_hooks for m in unet.modules())


def test_negative_prompt_default_and_override(method, scene, monkeypatch):
    seen = []
    original = method.pipeline.encode_prompt

    def spy(prompt, device, num, cfg, negative_prompt=None, **kwargs):
        seen.append((list(prompt), negative_prompt))
        return original(prompt, device, num, cfg, negative_prompt, **kwargs)

    monkeypatch.setattr(method.pipeline, "encode_prompt", spy)
    image, mask = (im.resize((128, 64)) for im in scene)
    inpaint(method, image, mask, dict(FAST, steps=1))
    inpaint(
        method, image, mask, dict(FAST, steps=1, negative_prompt="blurry"), options={"positive_prompt": ""}
    )
    assert seen[0] == ([f"a yellow teapot, {ORIGINAL_POSITIVE_PROMPT}"], [ORIGINAL_NEGATIVE_PROMPT])
    assert seen[1] == (["a yellow teapot"], ["blurry"])


def test_without_guidance_the_default_negative_is_not_passed(method, scene, logged):
    """It acts only under guidance; passed at guidance 1, the pipeline warned about a negative prompt the user
    never gave."""
    image, mask = (im.resize((128, 64)) for im in scene)
    with logged("brushnet.pipelines.common") as messages:
        inpaint(method, image, mask, dict(FAST, steps=1, guidance_scale=1.0))
    assert messages == []


def test_refusals(method, scene):
    with pytest.raises(RequestError, match="does not use scheduler 'unipc'"):
        inpaint(method, *scene, FAST, scheduler="unipc")
    with pytest.raises(RequestError, match="rasg_eta"):
        inpaint(method, *scene, FAST, options={"rasg_eta": 2})
    with pytest.raises(RequestError, match="timestep_spacing"):
        inpaint(method, *scene, FAST, options={"timestep_spacing": "leading"})


def test_tiny_preset_model_is_refused_in_one_line(load, scene):
    """The shared tiny inpainting model has no cross-attention at 1/4 of the latent size (RASG's layers)."""
    method = load("hd-painter")
    image, mask = (im.resize((128, 64)) for im in scene)
    with pytest.raises(InputError, match="RASG found no cross-attention layer at 1/4 of the latent size"):
        inpaint(method, image, mask, FAST)
    result = inpaint(method, image, mask, FAST, options={"rasg": False})
    assert result.unet_calls == 10 and result.extra_calls == {"rasg_backward": 0}


def test_on_the_shipped_demo_model():
    """The demo's 9-channel model (v-prediction; 3 levels, so its mid block is at 1/4 of the latent size): PAIntA
    and RASG find their layers and move the result; the kept pixels stay exact after the blend."""
    from brushnet.demo.assets import method_models
    from brushnet.demo.run import DEMO_REQUEST, DEMO_SCENES, METHOD_OPTIONS, demo_scene
    from brushnet.pipelines.hd_painter_attention import HDPainterAttentionState, hd_painter_attention

    method = load_method("hd-painter", method_models("hd-painter"))
    assert method.pipeline.scheduler.config.prediction_type == "v_prediction"
    scene = demo_scene(DEMO_SCENES[0])
    request = dict(DEMO_REQUEST, steps=2, prompt=scene.prompt)
    options = METHOD_OPTIONS["hd-painter"]
    on = inpaint(method, scene.image, scene.hole, request, options=options)
    off = inpaint(method, scene.image, scene.hole, request, options=dict(options, painta=False, rasg=False))
    assert on.extra_calls == {"rasg_backward": 2} and off.extra_calls == {"rasg_backward": 0}
    assert np.abs(np.asarray(on.images[0], int) - np.asarray(off.images[0], int)).max() > 0
    far = ~torch.nn.functional.max_pool2d(torch.from_numpy(scene.hole).float()[None, None], 7, 1, 3)[
        0, 0
    ].bool()
    assert np.array_equal(np.asarray(on.images[0])[far.numpy()], np.asarray(scene.image)[far.numpy()])

    # which layers act at 128 px (latent 16×16): self-attention at 8×8 and 4×4, cross-attention at 4×4
    unet = method.pipeline.unet
    state = HDPainterAttentionState(
        (16, 16), {2: torch.zeros(1, 64), 4: torch.zeros(1, 16)}, torch.ones(1, 32), False
    )
    sample = torch.randn(1, 9, 16, 16)
    context = torch.randn(1, 32, unet.config.cross_attention_dim)
    with hd_painter_attention(unet, state), torch.no_grad():
        state.start_call(painta=True, rasg=True)
        unet(sample, torch.tensor([999]), encoder_hidden_states=context)
    assert state.painta_layers == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "down_blocks.2.attentions.0.transformer_blocks.0.attn1",
        "mid_block.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
    ]
    assert [name.split(".attentions")[0] for name in state.rasg_layers] == [
        "down_blocks.2",
        "mid_block",
        "up_blocks.0",
        "up_blocks.0",
    ]


def test_an_sdxl_model_is_refused_before_loading(tmp_path, tiny_xl_models):
    from brushnet.errors import CheckpointError
    from brushnet.random_models import build_inpaint_model

    folder = build_inpaint_model(tmp_path / "inpaint", tiny_xl_models["base"], "tiny-xl")
    with pytest.raises(CheckpointError, match="'hd-painter' has no SDXL form"):
        load_method("hd-painter", {"inpaint_model": str(folder)})
