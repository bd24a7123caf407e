"""The powerpaint method behind the shared interface: v2 on the tiny random model set and v1 on the original's
tiny v1 weights (tests/fixtures/powerpaint); what reaches each model (mask convention, task text), options,
call counts, batch image i == a single run at seed + i, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from brushnet.errors import InputError, RequestError
from brushnet.image import pil_to_tensor
from brushnet.methods import get_method_class, inpaint, load_method, prepare
from brushnet.pipelines.powerpaint_prompts import encode_task_prompts, task_prompts

FAST = {"steps": 3, "guidance_scale": 2.0, "scheduler": "ddim", "seed": 7, "prompt": "a cat"}
POWERPAINT = Path(__file__).parents[1] / "fixtures" / "powerpaint"


@pytest.fixture(scope="module")
def v1_method():
    """PowerPaint v1 from the released-layout fixture (the original's tiny v1 weights) on the fixture's v2 base
    folder: v1 takes only the VAE, tokenizer, scheduler and UNet config from its base."""
    return load_method(
        "powerpaint",
        {
            "base": str(POWERPAINT / "v2" / "ppt-v2" / "realisticVisionV60B1_v51VAE"),
            "powerpaint": str(POWERPAINT / "v1" / "ppt-v1"),
        },
    )


def _scene_48(scene):
    image, mask = scene
    return image.resize((48, 48)), mask.resize((48, 48), Image.Resampling.NEAREST)


@pytest.mark.parametrize("invert", [False, True])
def test_v2_branch_sees_keep_mask_blacked_out_hole_and_task_text(load, scene, invert):
    """The branch's 5th channel is the keep mask (1 = known), the VAE encodes the image with the hole at −1, and
    the branch reads the task text, not the user's (object-removal vs text-guided give other embeddings)."""
    image, mask = scene
    method = load("powerpaint")
    assert method.version == "v2"
    conds, texts, encoded = [], [], []

    def on_branch(module, args, kwargs):
        conds.append(kwargs["brushnet_cond"].clone())
        texts.append(kwargs["encoder_hidden_states"].clone())

    handles = [
        method.pipeline.brushnet.register_forward_pre_hook(on_branch, with_kwargs=True),
        method.pipeline.vae.encoder.register_forward_pre_hook(lambda m, a: encoded.append(a[0].clone())),
    ]
    try:
        request = dict(FAST, guidance_scale=1.0, invert_mask=invert)
        inpaint(method, image, mask, request)
        inpaint(method, image, mask, dict(request, options={"task": "object-removal"}))
    finally:
        for handle in handles:
            handle.remove()
    cond = conds[0][0]
    assert cond.shape == (5, 8, 8)
    cells = torch.zeros(8, 8, dtype=torch.bool)
    cells[3:5, 3:5] = True  # the 16×16 hole at (24, 24) covers latent cells 3..4
    assert torch.equal(cond[4], (cells if invert else ~cells).float())
    hole = torch.from_numpy(np.asarray(mask) > 127)
    hole = ~hole if invert else hole
    source = pil_to_tensor(image)[0] * 2 - 1
    assert torch.all(encoded[0][0][:, hole] == -1)
    assert torch.allclose(encoded[0][0][:, ~hole], source[:, ~hole], atol=1e-6)
    task_text, _ = method.pipeline.encode_task_prompt(
        [task_prompts("text-guided", "a cat")], 1.0, 1.0, "cpu", 1, False
    )
    assert torch.equal(texts[0], task_text)
    assert (texts[0] - texts[-1]).abs().max() > 0.1


def test_v2_calls_options_and_models_recorded(load, scene, tiny_models):
    method = load("powerpaint")
    result = inpaint(method, *scene, dict(FAST, options={"task": "shape-guided", "fitting_degree": 0.5}))
    # the branch reads text: under guidance it runs on both halves, like the UNet
    assert result.unet_calls == FAST["steps"] * 2 and result.extra_calls == {"brushnet": FAST["steps"] * 2}
    assert result.parameters["options"] == {
        "conditioning_scale": 1.0,
        "control_guidance_start": 0.0,
        "control_guidance_end": 1.0,
        "task": "shape-guided",
        "fitting_degree": 0.5,
    }
    assert result.parameters["models"] == {
        "base": tiny_models["base"],
        "powerpaint": tiny_models["powerpaint"],
        "allow_pickle": False,
    }
    outputs = {
        task: np.asarray(
            inpaint(method, *scene, dict(FAST, blend=False, options={"task": task})).images[0], np.int16
        )
        for task in ("text-guided", "object-removal")
    }
    assert np.abs(outputs["text-guided"] - outputs["object-removal"]).max() > 0


def test_batch_image_i_equals_single_run_at_seed_plus_i(load, scene, v1_method):
    for method, (image, mask) in ((load("powerpaint"), scene), (v1_method, _scene_48(scene))):
        request = dict(FAST, options={"task": "object-removal"})
        batch = inpaint(method, image, mask, dict(request, num_images=2))
        single = inpaint(method, image, mask, dict(request, seed=FAST["seed"] + 1))
        diff = np.abs(np.asarray(single.images[0], np.int16) - np.asarray(batch.images[1], np.int16))
        assert diff.max() <= 1, method.version
        assert not np.array_equal(np.asarray(batch.images[0]), np.asarray(batch.images[1]))


def test_v1_unet_sees_the_hole_as_one_and_the_task_prompt(v1_method, scene):
    image, mask = _scene_48(scene)
    assert v1_method.version == "v1" and v1_method.per_image_calls
    seen = []
    handle = v1_method.pipeline.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].clone(), kwargs["encoder_hidden_states"].clone())),
        with_kwargs=True,
    )
    try:
        result = inpaint(
            v1_method, image, mask, dict(FAST, options={"task": "shape-guided", "fitting_degree": 0.5})
        )
    finally:
        handle.remove()
    assert result.unet_calls == FAST["steps"] * 2 and result.extra_calls == {}
    sample, text = seen[0]
    hole = torch.from_numpy(np.asarray(mask) > 127)
    cells = hole.reshape(24, 2, 24, 2).any(3).any(1)  # the fixture VAE downsamples by 2
    assert torch.equal(sample[1, 4] > 0.5, cells)  # channel 4 = mask, 1 on the hole
    built = task_prompts("shape-guided", "a cat", "", "v1")
    pipe = v1_method.pipeline
    expected = encode_task_prompts(pipe.text_encoder, pipe.tokenizer, [built.prompt_a], [built.prompt_b], 0.5)
    torch.testing.assert_close(text[1:], expected)


def test_options_are_checked_before_any_model_loads(scene, v1_method):
    cls = get_method_class("powerpaint")
    with pytest.raises(RequestError, match="bad option for method 'powerpaint': task: Input should be"):
        prepare(cls, *scene, dict(FAST, options={"task": "image-outpainting"}))
    with pytest.raises(RequestError, match="fitting_degree"):
        prepare(cls, *scene, dict(FAST, options={"fitting_degree": 1.5}))
    schema = cls.describe()["options_schema"]["properties"]
    assert schema["task"]["enum"] == [
        "text-guided",
        "shape-guided",
        "object-removal",
        "context-aware",
        "outpainting",
    ]
    assert (schema["fitting_degree"]["minimum"], schema["fitting_degree"]["maximum"]) == (0.0, 1.0)
    with pytest.raises(InputError, match="PowerPaint v1 has none"):
        inpaint(v1_method, *_scene_48(scene), dict(FAST, options={"conditioning_scale": 0.5}))


def test_cli_option_task(tiny_models, scene, tmp_path):
    from brushnet.cli import app

    image, mask = scene
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    args = ["inpaint", "--method", "powerpaint", "--base", tiny_models["base"], "--powerpaint"]
    args += [tiny_models["powerpaint"], "-i", str(tmp_path / "in.png"), "-m", str(tmp_path / "mask.png")]
    args += [
        "-o",
        str(tmp_path / "out.png"),
        "--steps",
        "2",
        "--seed",
        "1",
        "--option",
        "task=object-removal",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["parameters"]["options"]["task"] == "object-removal"
    bad = CliRunner().invoke(app, [*args[:-1], "task=remove"])
    assert bad.exit_code == 2 and "task" in bad.output


def test_outpainting_defaults_to_the_outpainting_task(scene):
    """`brushnet outpaint --method powerpaint` ran the object-insertion prompts (task text-guided) unless
    --option task=outpainting was given; a task the request gives is kept."""
    from brushnet.methods import prepare_outpaint

    cls = get_method_class("powerpaint")
    image = scene[0]
    job = prepare_outpaint(cls, image, right=16, request=FAST)
    assert job.options.task == "outpainting"
    job = prepare_outpaint(cls, image, right=16, request=dict(FAST, options={"task": "context-aware"}))
    assert job.options.task == "context-aware"
    assert prepare(cls, *scene, FAST).options.task == "text-guided"  # inpainting keeps its default
