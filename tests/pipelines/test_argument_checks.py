"""Bad call arguments are one-line errors naming the argument, raised by the pipelines' input checks before any
denoising step (the UNet never runs); valid calls keep their results.

Found by an audit on tiny random models: ``num_inference_steps=0`` was a ``ZeroDivisionError``, 2.5 an
``IndexError``, -1 ran; ``num_images_per_prompt=0`` a reshape error; a NaN ``brushnet_conditioning_scale`` an
all-NaN image; an even ``blending_kernel_size`` failed only after the whole run and decode; ``generator=1234``,
``prompt=[]`` and ``clip_skip=100`` failed deep inside; a uint8 numpy image gave a 2-px wide output, a
``(3, H, W)`` tensor an ``IndexError``, an image path an ``AttributeError``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet import StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline
from brushnet.loading import load_base_components
from brushnet.pipelines.pipeline_hd_painter import StableDiffusionHDPainterPipeline

from .conftest import POWERPAINT, refused, tiny_components, tiny_inputs

CLASSES = {"sd": StableDiffusionBrushNetPipeline, "xl": StableDiffusionXLBrushNetPipeline}
HD_PAINTER_MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "hd_painter" / "model"


def _pipe(kind: str):
    pipe = CLASSES[kind](**tiny_components(kind))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["sd", "xl"])
def tiny(request):
    """``(kind, pipeline)``: the SD1.5 and SDXL BrushNet pipelines on tiny components."""
    return request.param, _pipe(request.param)


def _run(pipe, **overrides):
    return pipe(**{**tiny_inputs(), **overrides}).images


# -- 1. num_inference_steps ------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [0, -1, -2, 2.5, float("nan"), float("inf")])
def test_a_step_count_that_is_not_a_positive_integer_isrefused(tiny, steps):
    _, pipe = tiny
    message = refused(
        pipe, ValueError, "`num_inference_steps` must be a positive integer",
        **{**tiny_inputs(), "num_inference_steps": steps},
    )  # fmt: skip
    assert repr(steps) in message


@pytest.mark.parametrize("steps", [True, "2", None])
def test_a_step_count_that_is_not_a_number_is_a_type_error(tiny, steps):
    _, pipe = tiny
    refused(pipe, TypeError, "`num_inference_steps`", **{**tiny_inputs(), "num_inference_steps": steps})


def test_whole_step_counts_of_other_types_run_as_the_int(tiny):
    """``2.0`` (an ``IndexError`` on DDIM before) and ``np.int64(2)`` give the result of ``2``."""
    _, pipe = tiny
    reference = _run(pipe)
    np.testing.assert_array_equal(_run(pipe, num_inference_steps=2.0), reference)
    np.testing.assert_array_equal(_run(pipe, num_inference_steps=np.int64(2)), reference)


def test_custom_timesteps_and_sigmas_set_the_schedule_without_a_step_count():
    """With ``timesteps`` or ``sigmas`` (diffusers' custom schedules) the step count is not read: ``None`` runs."""
    pipe = _pipe("xl")
    for schedule in ({"timesteps": [999, 499]}, {"sigmas": [14.6, 1.0]}):
        reference = _run(pipe, **schedule)
        np.testing.assert_array_equal(_run(pipe, **schedule, num_inference_steps=None), reference)


# -- 2. num_images_per_prompt ----------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [0, -1, 1.5])
def test_num_images_per_prompt_must_be_a_positive_integer(tiny, count):
    _, pipe = tiny
    refused(
        pipe, ValueError, f"`num_images_per_prompt` must be a positive integer, got {count!r}",
        **{**tiny_inputs(), "num_images_per_prompt": count},
    )  # fmt: skip


# -- 3. non-finite scales ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["brushnet_conditioning_scale", "guidance_scale", "eta", "pag_scale"])
def test_a_non_finite_scale_isrefused(tiny, name, value):
    _, pipe = tiny
    refused(
        pipe, ValueError, f"`{name}` must be a finite number, got {value!r}",
        **{**tiny_inputs(), name: value},
    )  # fmt: skip


def test_sdxl_guidance_rescale_must_be_finite():
    pipe = _pipe("xl")
    refused(
        pipe, ValueError, "`guidance_rescale` must be a finite number, got nan",
        **{**tiny_inputs(), "guidance_rescale": float("nan")},
    )  # fmt: skip


@pytest.mark.parametrize("value", [0.0, 1.5, -1.0])
def test_sdxl_denoising_end_must_be_a_fraction_of_the_schedule(value):
    """``denoising_end`` 0, 1.5 or -1 gave the same output as leaving it out (diffusers drops it silently)."""
    refused(
        _pipe("xl"), ValueError, rf"`denoising_end` must be in \(0, 1\] \(a fraction of the schedule\), got {value}",
        **{**tiny_inputs(), "denoising_end": value},
    )  # fmt: skip


def test_sdxl_denoising_end_of_one_runs_the_whole_schedule():
    pipe = _pipe("xl")
    full, cut = (
        _run(pipe, generator=torch.Generator().manual_seed(0)),
        _run(pipe, generator=torch.Generator().manual_seed(0), denoising_end=1.0),
    )
    assert np.array_equal(np.asarray(full[0]), np.asarray(cut[0]))


def test_a_list_of_controlnet_scales_is_checked_element_wise():
    pipe = StableDiffusionBrushNetPipeline(**tiny_components("sd+controlnet"))
    pipe.set_progress_bar_config(disable=True)
    inputs = {**tiny_inputs(), "control_image": tiny_inputs()["image"]}
    refused(
        pipe, ValueError, r"`controlnet_conditioning_scale\[0\]` must be a finite number, got nan",
        **inputs, controlnet_conditioning_scale=[float("nan")],
    )  # fmt: skip
    assert np.isfinite(pipe(**inputs, controlnet_conditioning_scale=[0.5]).images).all()


# -- 4. blending_kernel_size -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [20, 2, -3, -1, 21.0, True])
def test_a_bad_blending_kernel_is_refused_before_the_run(tiny, size):
    _, pipe = tiny
    refused(
        pipe, ValueError, "`blending_kernel_size` must be an odd positive integer",
        **{**tiny_inputs(), "blending": True, "blending_kernel_size": size},
    )  # fmt: skip


def test_blending_kernels_that_worked_still_work(tiny):
    """Odd sizes feather; 1 and 0 paste with a hard edge (the same image); a kernel without ``blending`` has no
    effect and is not checked (the pipelines have no "argument without effect" refusal)."""
    _, pipe = tiny
    hard = _run(pipe, blending=True, blending_kernel_size=1)
    np.testing.assert_array_equal(_run(pipe, blending=True, blending_kernel_size=0), hard)
    feathered = _run(pipe, blending=True, blending_kernel_size=np.int64(5))
    assert np.abs(feathered - hard).max() > 0
    np.testing.assert_array_equal(_run(pipe, blending_kernel_size=20), _run(pipe))


# -- 5. generator, prompt, clip_skip ---------------------------------------------------------------------------
@pytest.mark.parametrize("generator", [1234, "1234", [1234], (torch.Generator(),)])
def test_a_generator_that_is_not_a_torch_generator_isrefused(tiny, generator):
    _, pipe = tiny
    message = refused(
        pipe, TypeError, "`generator` must be a torch.Generator or a list of them",
        **{**tiny_inputs(), "generator": generator},
    )  # fmt: skip
    if generator == 1234:
        assert message.endswith("got int 1234")


def test_a_generator_list_needs_one_per_image(tiny):
    _, pipe = tiny
    generators = [torch.Generator().manual_seed(0) for _ in range(3)]
    refused(
        pipe, ValueError, "`generator` is a list of 3 generators for 4 image",
        **{**tiny_inputs(), "prompt": ["a", "b"], "num_images_per_prompt": 2, "generator": generators},
    )  # fmt: skip
    assert _run(pipe, generator=[torch.Generator().manual_seed(0)]).shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ([], "`prompt` is an empty list"),
        (["a ball", 3], "`prompt` must be a str or a list of str, got a list"),
    ],
)
def test_a_prompt_list_must_hold_strings(tiny, prompt, match):
    _, pipe = tiny
    refused(pipe, ValueError, match, **{**tiny_inputs(), "prompt": prompt})


def test_sdxl_prompt_2_list_must_not_be_empty():
    pipe = _pipe("xl")
    refused(pipe, ValueError, "`prompt_2` is an empty list", **tiny_inputs(), prompt_2=[])


def test_clip_skip_must_be_within_the_text_encoders_layers(tiny):
    """The tiny encoders have 2 layers: SD1.5 takes 0..2, SDXL (already at the penultimate layer) 0..1."""
    kind, pipe = tiny
    limit = 2 if kind == "sd" else 1
    message = refused(pipe, ValueError, f"`clip_skip` must be in 0..{limit}", **tiny_inputs(), clip_skip=100)
    assert message.endswith("got 100")
    refused(pipe, ValueError, "`clip_skip` must be >= 0, got -1", **tiny_inputs(), clip_skip=-1)
    refused(pipe, TypeError, "`clip_skip` must be an integer", **tiny_inputs(), clip_skip=1.5)
    assert _run(pipe, clip_skip=limit).shape == (1, 32, 32, 3)


# -- 6. image forms ---------------------------------------------------------------------------------------------
def _pil_as(image: Image.Image, form: str):
    array = np.asarray(image, np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    return {
        "np_hwc": array,
        "np_list_hwc": [array],
        "pt_chw": tensor,
        "pt_chw_signed": 2.0 * tensor - 1.0,
        "pt_list_chw": [tensor],
    }[form]


@pytest.mark.parametrize("form", ["np_hwc", "np_list_hwc", "pt_chw", "pt_chw_signed", "pt_list_chw"])
def test_single_image_arrays_and_tensors_give_the_pil_result(tiny, form):
    """Diffusers' one-image forms (an ``(H, W, 3)`` float array, a ``(3, H, W)`` tensor in [0, 1] or [-1, 1]) read
    as the same pixels as a PIL image (before: a 2-px wide output, an ``IndexError``), to float noise (a permuted
    tensor's memory layout: measured 1.3e-6)."""
    _, pipe = tiny
    image = tiny_inputs()["image"]
    np.testing.assert_allclose(_run(pipe, image=_pil_as(image, form)), _run(pipe), atol=1e-5)


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (
            np.zeros((32, 32, 3), np.uint8),
            ValueError,
            "`image` as a numpy array must be float in \\[0, 1\\], got dtype uint8",
        ),
        (np.zeros((1, 32, 32, 3), np.uint8), ValueError, "got dtype uint8"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ValueError, "`image` as a torch tensor must be float"),
        (
            np.zeros((32, 32), np.float32),
            ValueError,
            "must be \\(H, W, 3\\) or \\(B, H, W, 3\\), got shape \\(32, 32\\)",
        ),
        (
            torch.zeros(1, 4, 32, 32),
            ValueError,
            "must be \\(3, H, W\\) or \\(B, 3, H, W\\), got shape \\(1, 4, 32, 32\\)",
        ),
        ("image.png", TypeError, "`image` must be a PIL image, a float numpy array .*; got str"),
        ([], ValueError, "`image` is an empty list"),
        (np.full((32, 32, 3), 255.0, np.float32), ValueError, "`image` holds values up to 255: .* divide 0-255"),
        (torch.full((1, 3, 32, 32), 200.0), ValueError, "`image` holds values up to 200"),
    ],
    ids=[
        "uint8_hwc", "uint8_nhwc", "uint8_tensor", "grey_array", "four_channels", "path", "empty_list",
        "float_0_255_array", "float_0_255_tensor",
    ],
)  # fmt: skip
def test_other_image_forms_are_one_line_errors(tiny, image, error, match):
    _, pipe = tiny
    refused(pipe, error, match, **{**tiny_inputs(), "image": image})


def test_a_mask_path_is_a_type_error(tiny):
    _, pipe = tiny
    refused(
        pipe, TypeError, "`mask_image` must be a PIL image, a numpy array, a torch tensor or a list of them; "
        "got str", **{**tiny_inputs(), "mask_image": "mask.png"},
    )  # fmt: skip


# -- PowerPaint and HD-Painter: the same arguments, the same checks --------------------------------------------
def _powerpaint_arguments(version: str) -> dict:
    image = Image.open(POWERPAINT / "image.png").convert("RGB").resize((48, 48))
    mask = Image.new("L", (48, 48))
    mask.paste(255, (12, 12, 36, 36))
    return dict(
        prompt="a ball", image=image, mask_image=mask, height=48, width=48, num_inference_steps=2,
        generator=torch.Generator().manual_seed(0), output_type="np",
    )  # fmt: skip


POWERPAINT_CASES = [
    ({"num_inference_steps": 0}, ValueError, "`num_inference_steps` must be a positive integer, got 0"),
    ({"num_inference_steps": 2.5}, ValueError, "`num_inference_steps` must be a positive integer, got 2.5"),
    ({"num_images_per_prompt": 0}, ValueError, "`num_images_per_prompt` must be a positive integer, got 0"),
    ({"guidance_scale": float("nan")}, ValueError, "`guidance_scale` must be a finite number, got nan"),
    ({"generator": 1234}, TypeError, "`generator` must be a torch.Generator"),
    ({"prompt": []}, ValueError, "`prompt` is an empty list"),
    ({"image": np.zeros((48, 48, 3), np.uint8)}, ValueError, "got dtype uint8"),
]


@pytest.mark.parametrize(
    ("version", "change", "error", "match"),
    [("v1", *case) for case in POWERPAINT_CASES]
    + [("v2", *case) for case in POWERPAINT_CASES]
    + [
        (
            "v2",
            {"brushnet_conditioning_scale": float("nan")},
            ValueError,
            "`brushnet_conditioning_scale` must be",
        ),
        ("v2", {"blending": True, "blending_kernel_size": 20}, ValueError, "`blending_kernel_size` must be"),
        ("v2", {"clip_skip": 100}, ValueError, "`clip_skip` must be in 0..2"),
    ],
)
def test_powerpaint_checks_the_same_arguments(powerpaint_pipes, version, change, error, match):
    pipe = powerpaint_pipes[version]
    refused(pipe, error, match, **{**_powerpaint_arguments(version), **change})


def test_powerpaint_v1_whole_float_steps_run_as_the_int(powerpaint_pipes):
    """diffusers' inpaint pipeline under v1 raised on ``2.0`` (slice indices); it is passed on as ``2``."""
    pipe = powerpaint_pipes["v1"]
    arguments = _powerpaint_arguments("v1")
    reference = pipe(**arguments).images
    arguments["generator"] = torch.Generator().manual_seed(0)
    np.testing.assert_array_equal(pipe(**{**arguments, "num_inference_steps": 2.0}).images, reference)


@pytest.fixture(scope="module")
def hd_painter():
    pipe = StableDiffusionHDPainterPipeline(**load_base_components(HD_PAINTER_MODEL))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            {"num_inference_steps": 2.5},
            ValueError,
            "`num_inference_steps` must be a positive integer, got 2.5",
        ),
        (
            {"num_images_per_prompt": 0},
            ValueError,
            "`num_images_per_prompt` must be a positive integer, got 0",
        ),
        ({"guidance_scale": float("nan")}, ValueError, "`guidance_scale` must be a finite number, got nan"),
        ({"generator": 1234}, TypeError, "`generator` must be a torch.Generator"),
        ({"generator": [torch.Generator()] * 2}, ValueError, "a list of 2 generators for 1 image"),
        ({"prompt": []}, ValueError, "`prompt` is an empty list"),
    ],
)
def test_hd_painter_checks_the_same_arguments(hd_painter, change, error, match):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    arguments = dict(
        prompt="a ball", image=image, mask_image=mask, num_inference_steps=2, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    refused(hd_painter, error, match, **{**arguments, **change})


# -- negatives without guidance: diffusers drops them without a word; these pipelines say so --------------------
UNUSED = "has no effect at guidance_scale 1: classifier-free guidance is off at <= 1"


def test_a_negative_prompt_without_guidance_is_named_in_a_warning(tiny, logged):
    """The result is the one without it (it had no effect); an empty negative or guidance on says nothing."""
    kind, pipe = tiny
    with logged("brushnet.pipelines.common") as messages:
        ignored = _run(pipe, guidance_scale=1.0, negative_prompt="blurry")
    assert messages == [f"`negative_prompt` {UNUSED} (raise guidance_scale to use it)"]
    np.testing.assert_array_equal(ignored, _run(pipe, guidance_scale=1.0))
    with logged("brushnet.pipelines.common") as messages:
        _run(pipe, guidance_scale=1.0, negative_prompt="")
        _run(pipe, guidance_scale=1.0, negative_prompt=[""])
        _run(pipe, negative_prompt="blurry")
    assert messages == []
    if kind == "xl":
        with logged("brushnet.pipelines.common") as messages:
            sizes = {
                "negative_original_size": (32, 32),
                "negative_target_size": (32, 32),
            }  # one alone: refused
            _run(pipe, guidance_scale=0.0, negative_prompt_2="blurry", **sizes)
        assert messages == [
            "`negative_prompt_2` and `negative_original_size` and `negative_target_size` have no effect at "
            "guidance_scale 0: classifier-free guidance is off at <= 1 (raise guidance_scale to use it)"
        ]
        with logged("brushnet.pipelines.common") as messages:
            _run(pipe, guidance_scale=1.0, negative_crops_coords_top_left=(0, 0))  # the default: nothing said
            _run(pipe, guidance_scale=1.0, negative_crops_coords_top_left=(4, 4), **sizes)
        assert (
            len(messages) == 1
            and "`negative_crops_coords_top_left` and `negative_target_size` have no" in (messages[0])
        )


def test_powerpaint_and_hd_painter_name_an_unused_negative_too(powerpaint_pipes, hd_painter, logged):
    for version, pipe in powerpaint_pipes.items():
        arguments = {**_powerpaint_arguments(version), "guidance_scale": 1.0, "num_inference_steps": 1}
        with logged("brushnet.pipelines.common") as messages:
            pipe(**arguments, negative_prompt="blurry")
        assert messages and messages[0].startswith(f"`negative_prompt` {UNUSED}"), (version, messages)
    # v1 runs on diffusers' inpainting pipeline, which says nothing of its own
    v1 = powerpaint_pipes["v1"]
    embeds = torch.zeros(1, 77, v1.text_encoder.config.hidden_size)
    arguments = {
        **_powerpaint_arguments("v1"),
        "guidance_scale": 1.0,
        "num_inference_steps": 1,
        "prompt": None,
    }
    with logged("brushnet.pipelines.common") as messages:
        v1(**arguments, prompt_embeds=embeds, negative_prompt_embeds=embeds)
    assert messages == [f"`negative_prompt_embeds` {UNUSED} (raise guidance_scale to use it)"]
    image = Image.open(HD_PAINTER_MODEL.parent / "image.png").convert("RGB")
    mask = Image.open(HD_PAINTER_MODEL.parent / "mask.png").convert("L")
    with logged("brushnet.pipelines.common") as messages:
        hd_painter(
            "a ball", image, mask, num_inference_steps=1, guidance_scale=1.0, negative_prompt="blurry",
            output_type="pt",
        )  # fmt: skip
    assert messages == [f"`negative_prompt` {UNUSED} (raise guidance_scale to use it)"]
