"""A base of the wrong family, a single file without its branch, and SDXL call arguments of the wrong shape are
one-line errors naming the argument, raised before the UNet runs; the numpy and list forms users bring from
diffusers are accepted and give the plain call's image.

Found by an audit on tiny random models: the SD1.5 pipeline built on an SDXL base and failed in the branch at the
first call; ``from_single_file`` without ``brushnet=`` was diffusers' ``TypeError: unsupported operand type(s) for
-: 'set' and 'list'``; ``original_size=1024`` was ``'int' object is not iterable``, ``target_size=(64, 64, 3)`` a
time-embedding length error; ``control_guidance_start=[0.0]`` a comparison ``TypeError``;
``brushnet_conditioning_scale=np.float32(0.5)`` was refused; a short ``prompt_2`` list was a tensor size error;
``pipe(prompt, image, mask)`` on SDXL said only that ``mask_image`` was missing.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from brushnet import BrushNetModel, StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline
from brushnet.errors import CheckpointError

from .conftest import refused, tiny_components, tiny_inputs

CLASSES = {"sd": StableDiffusionBrushNetPipeline, "xl": StableDiffusionXLBrushNetPipeline}


def _pipe(kind: str):
    pipe = CLASSES[kind](**tiny_components(kind))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def xl():
    return _pipe("xl")


@pytest.fixture(scope="module", params=["sd", "xl"])
def tiny(request):
    return request.param, _pipe(request.param)


def _run(pipe, **overrides):
    return pipe(**{**tiny_inputs(), **overrides}).images


# -- the base family and single files ---------------------------------------------------------------------------
def test_the_sd15_pipeline_refuses_an_sdxl_base_and_branch(tiny_xl_models):
    branch = BrushNetModel.from_pretrained(tiny_xl_models["brushnet"])
    with pytest.raises(CheckpointError) as raised:
        StableDiffusionBrushNetPipeline.from_pretrained(tiny_xl_models["base"], brushnet=branch)
    assert str(raised.value) == (
        "StableDiffusionBrushNetPipeline needs an SD1.5 base; this one is SDXL (use StableDiffusionXLBrushNetPipeline)"
    )


@pytest.mark.parametrize("kind", ["sd", "xl"])
def test_from_single_file_without_a_branch_says_to_pass_one(kind, tiny_models, tiny_xl_models, tmp_path):
    from brushnet.convert import save_single_file

    models = tiny_xl_models if kind == "xl" else tiny_models
    path = save_single_file(models["base"], tmp_path / "base.safetensors")
    cls = CLASSES[kind]
    with pytest.raises(CheckpointError) as raised:
        cls.from_single_file(str(path), config=str(models["base"]))
    assert str(raised.value) == (
        f"{cls.__name__}.from_single_file loads the base model only: pass brushnet=BrushNetModel.from_pretrained(...)"
    )


def test_sdxl_from_single_file_with_a_branch_loads(tiny_xl_models, tmp_path):
    from brushnet.convert import save_single_file

    path = save_single_file(tiny_xl_models["base"], tmp_path / "base.safetensors")
    branch = BrushNetModel.from_pretrained(tiny_xl_models["brushnet"])
    pipe = StableDiffusionXLBrushNetPipeline.from_single_file(
        str(path), config=str(tiny_xl_models["base"]), brushnet=branch
    )
    assert pipe.brushnet is branch and pipe.unet.config.addition_embed_type == "text_time"


# -- SDXL's size and crop conditioning ----------------------------------------------------------------------------
PAIRS = "(height, width)"


@pytest.mark.parametrize(
    "arguments, name, what",
    [
        ({"original_size": 1024}, "original_size", PAIRS),
        ({"original_size": (1024,)}, "original_size", PAIRS),
        ({"target_size": (64, 64, 3)}, "target_size", PAIRS),
        ({"target_size": "64x64"}, "target_size", PAIRS),
        ({"original_size": (64, float("nan"))}, "original_size", PAIRS),
        ({"crops_coords_top_left": None}, "crops_coords_top_left", "(top, left)"),
        ({"crops_coords_top_left": (0, 0, 0)}, "crops_coords_top_left", "(top, left)"),
        ({"negative_original_size": 64, "negative_target_size": (64, 64)}, "negative_original_size", PAIRS),
        ({"negative_original_size": (64, 64), "negative_target_size": (64,)}, "negative_target_size", PAIRS),
        ({"negative_crops_coords_top_left": None}, "negative_crops_coords_top_left", "(top, left)"),
    ],
)
def test_sdxl_size_conditioning_must_be_pairs(xl, arguments, name, what):
    message = refused(xl, ValueError, "^" + re.escape(f"`{name}` must be a {what} pair of numbers, got "),
                       **tiny_inputs(), **arguments)  # fmt: skip
    assert message.endswith(repr(arguments[name]))


def test_sdxl_size_conditioning_as_lists_runs_as_tuples(xl):
    lists = _run(xl, original_size=[64, 64], crops_coords_top_left=[4, 0], target_size=[32, 32])
    tuples = _run(xl, original_size=(64, 64), crops_coords_top_left=(4, 0), target_size=(32, 32))
    np.testing.assert_array_equal(lists, tuples)


# -- SDXL prompts --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["prompt_2", "negative_prompt_2"])
def test_sdxl_prompt_2_lists_need_one_per_prompt(xl, name):
    arguments = {**tiny_inputs(), "prompt": ["a", "b"], name: ["x"]}
    if name == "negative_prompt_2":
        arguments["negative_prompt"] = ["y", "z"]
    refused(xl, ValueError, f"^`{name}` has 1 prompt\\(s\\) for a batch of 2", **arguments)


def test_sdxl_positional_image_lands_in_prompt_2_and_says_so(xl):
    inputs = tiny_inputs()
    with pytest.raises(ValueError) as raised:
        xl(inputs["prompt"], inputs["image"], inputs["mask_image"], num_inference_steps=2)
    message = str(raised.value)
    assert message.startswith("`prompt_2` got an image (")
    assert "pass image= and mask_image= by keyword" in message and "\n" not in message


def test_sdxl_prompt_2_of_another_type_is_still_named(xl):
    refused(
        xl, ValueError, "^`prompt_2` must be a str or a list of str, got int", **tiny_inputs(), prompt_2=3
    )


# -- the branch's scale and window, in both pipelines ---------------------------------------------------------
def test_a_numpy_conditioning_scale_gives_the_float_result(tiny):
    _, pipe = tiny
    np.testing.assert_array_equal(
        _run(pipe, brushnet_conditioning_scale=np.float32(0.5)), _run(pipe, brushnet_conditioning_scale=0.5)
    )


@pytest.mark.parametrize(
    "value, error", [(torch.tensor(0.5), TypeError), ("0.5", TypeError), (True, TypeError)]
)
def test_a_conditioning_scale_that_is_not_a_real_number_is_named(tiny, value, error):
    _, pipe = tiny
    refused(pipe, error, "^`brushnet_conditioning_scale` must be a number", **tiny_inputs(),
             brushnet_conditioning_scale=value)  # fmt: skip


@pytest.mark.parametrize(
    "window",
    [
        {"control_guidance_start": [0.5]},
        {"control_guidance_start": (0.5,), "control_guidance_end": [1.0]},
        {"control_guidance_start": np.float64(0.5), "control_guidance_end": [1.0]},
    ],
)
def test_diffusers_one_element_list_window_is_the_number(tiny, window):
    _, pipe = tiny
    np.testing.assert_array_equal(_run(pipe, **window), _run(pipe, control_guidance_start=0.5))


@pytest.mark.parametrize(
    "window, error, match",
    [
        ({"control_guidance_start": [0.0, 0.0]}, ValueError,
         r"^`control_guidance_start` has 2 entries: .*`controlnet_guidance_start`"),
        ({"control_guidance_end": []}, ValueError, r"^`control_guidance_end` has 0 entries"),
        ({"control_guidance_start": "0"}, TypeError, r"^`control_guidance_start` must be a number"),
        ({"control_guidance_end": float("nan")}, ValueError, r"^`control_guidance_end` must be a finite number"),
        ({"control_guidance_start": [0.9], "control_guidance_end": 0.1}, ValueError,
         r"^need 0 <= control_guidance_start < control_guidance_end <= 1, got 0.9 and 0.1"),
    ],
)  # fmt: skip
def test_a_bad_window_is_one_line_naming_it(tiny, window, error, match):
    _, pipe = tiny
    refused(pipe, error, match, **tiny_inputs(), **window)


# -- the other scalar checks of common.py --------------------------------------------------------------------------
def test_strength_that_is_not_a_number_is_named(tiny):
    _, pipe = tiny
    refused(pipe, TypeError, "^`strength` must be a number, got str", **tiny_inputs(), strength="0.5")


def test_a_numpy_callback_steps_works_as_the_int():
    pipe = _pipe("sd")
    steps = []
    with pytest.warns(FutureWarning):
        _run(pipe, num_inference_steps=4, callback=lambda i, t, latents: steps.append(i),
             callback_steps=np.int64(2))  # fmt: skip
    assert steps == [0, 2]


def test_a_controlnet_window_that_is_not_a_number_is_named():
    pipe = StableDiffusionBrushNetPipeline(**tiny_components("sd+controlnet"))
    pipe.set_progress_bar_config(disable=True)
    inputs = {**tiny_inputs(), "control_image": tiny_inputs()["image"]}
    refused(pipe, TypeError, "^`controlnet_guidance_start` must be a number, got str", **inputs,
             controlnet_guidance_start="0")  # fmt: skip
