"""The brushnet method with a guide ControlNet (issue 15): a control image steers what fills the hole, cropped
and resized with the image; without a ControlNet the method is unchanged; mismatches are one-line errors."""

import numpy as np
import pytest
from PIL import Image

from brushnet.errors import InputError
from brushnet.methods import inpaint, load_method, prepare, run

FAST = {"steps": 2, "guidance_scale": 2.0, "scheduler": "ddim", "seed": 3, "prompt": "a cat"}


@pytest.fixture(scope="module")
def guided(tiny_models, tmp_path_factory):
    import torch

    from brushnet.random_models import build_controlnet

    folder = build_controlnet(tmp_path_factory.mktemp("guide") / "controlnet", tiny_models["base"], seed=4)
    method = load_method("brushnet", {**tiny_models, "guide_controlnet": str(folder)})
    # the random tiny ControlNet barely reads its image (four random stride-2 layers); scaled up, two control
    # images give visibly different fills, as a trained one does
    with torch.no_grad():
        for param in method.pipeline.controlnet.controlnet_cond_embedding.parameters():
            param.mul_(6.0)
    return method


def _control(size=(64, 64), seed=0):
    return Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    )


def test_control_image_steers_the_fill(guided, load, scene):
    image, mask = scene
    plain = np.asarray(inpaint(load("brushnet"), image, mask, FAST).images[0], dtype=float)
    a = run(guided, prepare(guided, image, mask, FAST, control_image=_control()))
    b = run(guided, prepare(guided, image, mask, FAST, control_image=_control(seed=1)))
    a, b = np.asarray(a.images[0], dtype=float), np.asarray(b.images[0], dtype=float)
    hole = np.asarray(mask) > 0
    assert np.abs(a - b)[hole].max() > 1 and np.abs(a - plain)[hole].max() > 1
    off = run(
        guided,
        prepare(
            guided,
            image,
            mask,
            {**FAST, "options": {"controlnet_conditioning_scale": 0.0}},
            control_image=_control(),
        ),
    )
    assert np.array_equal(
        np.asarray(off.images[0]), np.asarray(inpaint(load("brushnet"), image, mask, FAST).images[0])
    )


def test_control_image_follows_crop_to_mask(guided, scene):
    image, mask = scene
    seen = []
    handle = guided.pipeline.controlnet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["controlnet_cond"].shape), with_kwargs=True
    )
    try:
        request = {**FAST, "crop_to_mask": True, "crop_padding": 8, "resolution": 64}
        run(guided, prepare(guided, image, mask, request, control_image=_control()))
    finally:
        handle.remove()
    assert seen and seen[0][-2:] == (64, 64)


def test_control_image_errors(guided, load, scene):
    image, mask = scene
    with pytest.raises(InputError, match="control image is 32x32"):
        prepare(guided, image, mask, FAST, control_image=_control((32, 32)))
    with pytest.raises(InputError, match="takes no control image"):
        prepare(load("sd-inpainting"), image, mask, FAST, control_image=_control())
    with pytest.raises(InputError, match="needs a control image"):
        inpaint(guided, image, mask, FAST)
    with pytest.raises(InputError, match="needs a guide ControlNet"):
        run(load("brushnet"), prepare(load("brushnet"), image, mask, FAST, control_image=_control()))


def test_cli_control_image(tiny_models, scene, tmp_path):
    import json

    from typer.testing import CliRunner

    from brushnet.cli import app
    from brushnet.random_models import build_controlnet

    image, mask = scene
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    _control().save(tmp_path / "pose.png")
    controlnet = build_controlnet(tmp_path / "controlnet", tiny_models["base"], seed=4)
    args = ["inpaint", "-i", str(tmp_path / "image.png"), "-m", str(tmp_path / "mask.png"), "-o", str(tmp_path / "out.png"),
            "--base", tiny_models["base"], "--brushnet", tiny_models["brushnet"], "--guide-controlnet", str(controlnet),
            "--control-image", str(tmp_path / "pose.png"), "--option", "controlnet_conditioning_scale=0.5",
            "--steps", "2", "--scheduler", "ddim", "--seed", "1", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["parameters"]["models"]["guide_controlnet"] == str(controlnet)
    assert record["parameters"]["options"]["controlnet_conditioning_scale"] == 0.5
    at = args.index("--control-image")
    missing = CliRunner().invoke(app, args[:at] + args[at + 2 :])
    assert missing.exit_code == 2 and "needs a control image" in missing.output
