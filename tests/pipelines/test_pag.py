"""Perturbed-attention guidance (PAG) with BrushNet (issue 15): diffusers' ``PAGMixin`` on the BrushNet pipelines.

With the branch at scale 0 a BrushNet pipeline is its base's text-to-image pipeline, so PAG must give exactly what
diffusers' own PAG pipelines give on the same components; with the branch on, PAG changes the hole and the UNet's
attention processors are its own again after every call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

from .conftest import tiny_components, tiny_inputs
from .test_composing import diff, make, run

SIZE = 32


def _reference(kind: str, components: dict, layers="mid"):
    if kind == "xl":
        names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
        pipe = StableDiffusionXLPAGPipeline(**{k: components[k] for k in names}, pag_applied_layers=layers)
    else:
        names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
        pipe = StableDiffusionPAGPipeline(
            **{k: components[k] for k in names},
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            pag_applied_layers=layers,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["sd", "xl"])
@pytest.mark.parametrize("guidance_scale", [6.0, 1.0])
def test_pag_equals_diffusers_pag_pipeline_with_the_branch_at_zero(kind, guidance_scale):
    """Branch scale 0: the BrushNet pipeline with ``pag_scale`` equals diffusers' PAG pipeline on the same UNet,
    with and without classifier-free guidance (``[u, c, perturbed]`` and ``[c, perturbed]`` batches)."""
    components = tiny_components(kind)
    pipe = make(kind, **components)
    reference = _reference(kind, components)
    side = SIZE // pipe.vae_scale_factor
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(3))
    common = dict(num_inference_steps=2, guidance_scale=guidance_scale, output_type="np", latents=latents)
    outputs = {}
    for pag_scale in (0.0, 3.0):
        ours = run(pipe, brushnet_conditioning_scale=0.0, pag_scale=pag_scale, **common)
        theirs = reference(
            "a red ball", height=SIZE, width=SIZE, pag_scale=pag_scale, generator=torch.Generator(), **common
        ).images
        assert diff(ours, theirs) < 1e-5, (pag_scale, diff(ours, theirs))
        outputs[pag_scale] = ours
    assert diff(outputs[0.0], outputs[3.0]) > 1e-2  # PAG is applied, not ignored


def _processors(pipe) -> dict:
    return dict(pipe.unet.attn_processors)


@pytest.mark.parametrize("kind", ["sd", "xl"])
def test_pag_changes_the_hole_and_leaves_the_unet_as_it_was(kind):
    pipe = make(kind)
    before = _processors(pipe)
    plain = run(pipe)
    guided = run(pipe, pag_scale=3.0)
    assert diff(plain, guided) > 1e-2
    assert _processors(pipe) == before  # the same processor objects, restored
    assert diff(run(pipe), plain) == 0  # and the next call without PAG is the plain one
    adaptive = run(pipe, pag_scale=3.0, pag_adaptive_scale=0.002)
    assert diff(adaptive, guided) > 1e-4 and diff(adaptive, plain) > 1e-4


def test_pag_layers_are_chosen_and_a_wrong_one_is_one_line():
    pipe = make("sd")
    before = _processors(pipe)
    mid = run(pipe, pag_scale=3.0)
    pipe.set_pag_applied_layers(["down"])
    down = run(pipe, pag_scale=3.0)
    assert diff(mid, down) > 1e-3
    pipe.set_pag_applied_layers(["no_such_block"])
    with pytest.raises(
        ValueError, match="Cannot find PAG layer to set attention processor for: no_such_block"
    ):
        run(pipe, pag_scale=3.0)
    assert _processors(pipe) == before
    with pytest.raises(ValueError, match="pag_scale and pag_adaptive_scale must be >= 0"):
        run(pipe, pag_scale=-1.0)


def test_pag_with_a_cfg_cutoff_callback_switches_its_processors():
    """diffusers' ``SDCFGCutoffCallback`` turns guidance off mid-loop: the batch becomes ``[c, perturbed]`` and the
    PAG processors follow (a ``[u, c, perturbed]`` processor on a two-copy batch would fail)."""
    from diffusers.callbacks import SDCFGCutoffCallback

    pipe = make("sd")
    full = run(pipe, pag_scale=3.0, num_inference_steps=4)
    cut = run(
        pipe,
        pag_scale=3.0,
        num_inference_steps=4,
        callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5),
    )
    assert np.isfinite(cut).all() and diff(full, cut) > 1e-4


def test_pag_with_guess_mode_and_a_guide_controlnet():
    """The branch's and a ControlNet's residuals reach the perturbed copy as the conditional one (guess mode: the
    unconditional copy gets none): runs, and PAG still changes the result."""
    from PIL import Image

    pipe = make("sd+controlnet")
    control = Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    plain = run(pipe, control_image=control, guess_mode=True)
    guided = run(pipe, control_image=control, guess_mode=True, pag_scale=3.0)
    assert np.isfinite(guided).all() and diff(plain, guided) > 1e-3


def test_compiled_step_takes_pag():
    """``pipe.compile()`` (traced with the eager backend here): the PAG prediction equals the eager one."""
    pipe = make("sd")
    eager = run(pipe, pag_scale=3.0)
    pipe.compile(backend="eager")
    try:
        compiled = run(pipe, pag_scale=3.0)
    finally:
        pipe.uncompile()
    assert diff(eager, compiled) < 1e-5


def test_method_option_pag(tmp_path):
    """``--option pag_scale=3`` on the brushnet method reaches the pipeline (the result changes) and the layers
    option picks where."""
    from brushnet.errors import InputError
    from brushnet.methods import inpaint, load_method
    from brushnet.methods.builtin.brushnet import pag_layers
    from brushnet.random_models import build_model_set

    paths = build_model_set(tmp_path / "models", ["base", "brushnet"], preset="tiny")
    method = load_method("brushnet", paths)
    inputs = tiny_inputs(size=64)
    common = dict(prompt="a red ball", seed=1, steps=2, blend=False)
    plain = inpaint(method, inputs["image"], inputs["mask_image"], **common).images[0]
    guided = inpaint(
        method, inputs["image"], inputs["mask_image"], options={"pag_scale": 3.0}, **common
    ).images[0]
    assert diff(plain, guided) > 1
    # the option is checked against the loaded UNet, with one line naming it and the blocks it could name
    for layers, message in (
        (
            "nowhere",
            r"option pag_layers: 'nowhere' names no self-attention layer of this UNet; its blocks .*mid",
        ),
        ("mid,(", r"option pag_layers: '\(' is not a valid pattern"),
        (" , ", "option pag_layers: no layer given"),
    ):
        with pytest.raises(InputError, match=message):
            inpaint(
                method,
                inputs["image"],
                inputs["mask_image"],
                options={"pag_scale": 3.0, "pag_layers": layers},
                **common,
            )
    # a block by its module name, as the option's description says, perturbs other layers than the default
    unet = method.pipeline.unet
    block = next(
        ".".join(name.split(".")[:2])
        for name, module in unet.named_modules()
        if name.startswith("up_blocks.") and name.endswith("attn1")
    )
    assert pag_layers(unet, f" {block} ,mid") == [block, "mid"]
    other = inpaint(
        method,
        inputs["image"],
        inputs["mask_image"],
        options={"pag_scale": 3.0, "pag_layers": block},
        **common,
    ).images[0]
    assert diff(other, guided) > 1
