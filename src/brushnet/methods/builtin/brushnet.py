"""BrushNet (Ju et al., "BrushNet: A Plug-and-Play Image Inpainting Model with Decomposed Dual-Branch
Diffusion", ECCV 2024) behind the method interface."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field

from ...errors import InputError, RequestError
from ..base import BASE, BASE_CONFIG, GuidanceWindow, InpaintRequest, ModelSlot, StrengthOption, Task, given
from ..pipeline_method import PipelineMethod
from ..registry import register_method

__all__ = ["BrushNetMethod", "BrushNetOptions", "BRUSHNET", "GUIDE_CONTROLNET", "pag_layers"]

BRUSHNET = ModelSlot(
    "brushnet",
    "BrushNet checkpoint folder (or hub id) of the base's family.",
    folder="brushnet",
    families=("sd15", "sdxl"),
    random_builder="brushnet.random_models:build_random_brushnet",
)
GUIDE_CONTROLNET = ModelSlot(
    "guide_controlnet",
    "Optional ControlNet of the base's family (pose, depth, edges, ...) that steers what fills the hole; "
    "needs a control image (--control-image).",
    families=("sd15", "sdxl"),
)  # no random builder: random-weight model sets (serve --tiny, make-tiny-models) leave it out


class BrushNetOptions(GuidanceWindow, StrengthOption):
    conditioning_scale: float = Field(
        1.0, ge=0.0, le=2.0, description="Preservation scale (branch strength)."
    )
    guess_mode: bool = Field(False, description="Log-spaced residual scales; branch on the text half only.")
    controlnet_conditioning_scale: float = Field(
        1.0, ge=0.0, le=2.0, description="Guide ControlNet's residual scale (with --guide-controlnet)."
    )
    controlnet_guidance_start: float = Field(
        0.0, ge=0.0, le=1.0, description="Guide ControlNet on from here."
    )
    controlnet_guidance_end: float = Field(
        1.0, ge=0.0, le=1.0, description="Guide ControlNet off after here."
    )
    pag_scale: float = Field(
        0.0, ge=0.0, le=20.0, description="Perturbed-attention guidance weight on the base UNet (0: off)."
    )
    pag_adaptive_scale: float = Field(
        0.0, ge=0.0, le=1.0, description="PAG weight decrease per timestep towards t=0 (0: constant)."
    )
    pag_layers: str = Field(
        "mid",
        min_length=1,
        description="Comma-separated UNet layers whose self-attention PAG perturbs: names or regexes searched in "
        "the UNet's module names (e.g. mid, down_blocks.1, up_blocks.0.attentions.1).",
    )


def pag_layers(unet, value: str) -> list[str]:
    """The ``pag_layers`` option as the list ``set_pag_applied_layers`` takes, each entry checked against ``unet``:
    like diffusers, an entry is a regex searched in the names of the UNet's self-attention modules, and one that
    matches none raises a one-line :class:`InputError` naming the option and the blocks it could name (diffusers
    would only fail mid-call, without naming the option)."""
    from diffusers.models.attention_processor import Attention

    names = [
        name
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and not module.is_cross_attention
    ]
    layers = [layer.strip() for layer in value.split(",") if layer.strip()]
    if not layers:
        raise InputError("option pag_layers: no layer given (e.g. mid)")
    for layer in layers:
        try:
            found = any(re.search(layer, name) for name in names)
        except re.error as exc:
            raise InputError(f"option pag_layers: {layer!r} is not a valid pattern ({exc})") from None
        if not found:
            blocks = sorted(
                {".".join(n.split(".")[:2]) if n.startswith(("down", "up")) else "mid" for n in names}
            )
            raise InputError(
                f"option pag_layers: {layer!r} names no self-attention layer of this UNet; "
                f"its blocks with self-attention: {', '.join(blocks)}"
            )
    return layers


@register_method
class BrushNetMethod(PipelineMethod):
    name = "brushnet"
    description = (
        "BrushNet: a dual-branch model adding masked-image features into a frozen SD1.5 or SDXL UNet."
    )
    Options = BrushNetOptions
    models = (BASE, BRUSHNET)
    families = ("sd15", "sdxl")
    optional_models = (BASE_CONFIG, GUIDE_CONTROLNET)
    counted_components = ("brushnet",)

    @classmethod
    def check(cls, request: InpaintRequest, options: BrushNetOptions) -> InpaintRequest:
        """Also refuse PAG options given while PAG is off (``pag_scale`` 0)."""
        request = super().check(request, options)
        for name in ("pag_layers", "pag_adaptive_scale"):
            if given(options, name) and options.pag_scale == 0:
                raise RequestError(
                    f"option {name} has no effect with pag_scale 0 (perturbed-attention guidance is off): "
                    f"set pag_scale above 0 or drop {name}"
                )
        return request

    @classmethod
    def build_pipeline(cls, models, dtype):
        from ...loading import detect_family, load_brushnet
        from ...pipelines import StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline

        components = cls.load_base(models, dtype)
        unet_config = components["unet"].config
        # a branch of the other family is refused before its weights are read, naming both families
        brushnet = load_brushnet(
            models.brushnet, dtype=dtype, allow_pickle=models.allow_pickle, base_config=unet_config
        )
        controlnet = None
        if models.guide_controlnet is not None:
            from diffusers import ControlNetModel

            from ...errors import CheckpointError
            from ...loading import FAMILY_NAMES, load_model

            controlnet = load_model(
                ControlNetModel,
                models.guide_controlnet,
                "ControlNet",
                dtype=dtype,
                allow_pickle=models.allow_pickle,
            )
            family = detect_family(unet_config)
            if (
                detect_family(controlnet.config) != family
                or controlnet.config.cross_attention_dim != unet_config.cross_attention_dim
            ):
                raise CheckpointError(
                    f"this ControlNet ({models.guide_controlnet}) does not fit the {FAMILY_NAMES[family]} base "
                    f"({models.base})"
                )
        if detect_family(unet_config) == "sdxl":
            return StableDiffusionXLBrushNetPipeline(**components, brushnet=brushnet, controlnet=controlnet)
        return StableDiffusionBrushNetPipeline(
            **components, brushnet=brushnet, safety_checker=None, controlnet=controlnet
        )

    @property
    def accepts_control_image(self) -> bool:
        """A guide ControlNet was loaded (``--guide-controlnet``): every request needs a control image."""
        return getattr(self.pipeline, "controlnet", None) is not None

    def call_arguments(self, task: Task) -> dict[str, Any]:
        options: BrushNetOptions = task.options
        # The one mask conversion happens in the pipeline: it takes the project's convention (white/1 = inpaint)
        # and feeds the branch the keep mask (1 − hole, nearest-downsampled to latent size) as the 5th channel of
        # `brushnet_cond` (brushnet.models.conditioning); tests/methods checks what reaches the branch.
        arguments = dict(
            image=task.image,
            mask_image=task.hole,
            brushnet_conditioning_scale=options.conditioning_scale,
            control_guidance_start=options.control_guidance_start,
            control_guidance_end=options.control_guidance_end,
            guess_mode=options.guess_mode,
            strength=options.strength,
        )
        if options.pag_scale > 0:
            self.pipeline.set_pag_applied_layers(pag_layers(self.pipeline.unet, options.pag_layers))
            arguments.update(pag_scale=options.pag_scale, pag_adaptive_scale=options.pag_adaptive_scale)
        if self.pipeline.controlnet is None:
            if task.control_image is not None:
                raise InputError("a control image needs a guide ControlNet (--guide-controlnet)")
            for name in (
                "controlnet_conditioning_scale",
                "controlnet_guidance_start",
                "controlnet_guidance_end",
            ):
                if given(options, name):
                    raise RequestError(
                        f"option {name} sets the guide ControlNet, and none is loaded: load one "
                        f"(--guide-controlnet, with --control-image) or drop {name}"
                    )
            return arguments
        if task.control_image is None:
            raise InputError("the guide ControlNet needs a control image (--control-image)")
        return dict(
            arguments,
            control_image=task.control_image,
            controlnet_conditioning_scale=options.controlnet_conditioning_scale,
            controlnet_guidance_start=options.controlnet_guidance_start,
            controlnet_guidance_end=options.controlnet_guidance_end,
        )
