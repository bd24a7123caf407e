"""ControlNet-inpaint: diffusers' ``StableDiffusionControlNetInpaintPipeline`` with the SD1.5 inpaint ControlNet
(lllyasviel/control_v11p_sd15_inpaint; Zhang et al., "Adding Conditional Control to Text-to-Image Diffusion
Models", ICCV 2023) on a plain SD1.5 base, at strength 1.0 (the ``strength`` option). With a 4-channel base UNet the pipeline also
replaces the known latent by the noised input at every step (its own latent blending)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import Field

from ..base import BASE, BASE_CONFIG, GuidanceWindow, ModelSlot, StrengthOption, Task
from ..pipeline_method import PipelineMethod
from ..registry import register_method

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["ControlNetInpaint", "ControlNetInpaintOptions", "inpaint_control_image", "CONTROLNET"]

CONTROLNET = ModelSlot(
    "controlnet",
    "Inpaint ControlNet folder (or hub id), e.g. control_v11p_sd15_inpaint.",
    folder="controlnet",
    random_builder="brushnet.random_models:build_random_controlnet",
)


class ControlNetInpaintOptions(GuidanceWindow, StrengthOption):
    """The ControlNet's residual scale and guidance window, and how the hole looks in its control image."""

    hole_value: float = Field(
        -1.0,
        ge=-1.0,
        le=1.0,
        description="Value of the hole's pixels in the control image (pixels in [0, 1]): -1 for "
        "control_v11p_sd15_inpaint (its training convention), 0 (black) for ControlNets trained on blacked-out "
        "holes, such as several SDXL inpaint/union ControlNets.",
    )


def inpaint_control_image(image: torch.Tensor, hole: torch.Tensor, hole_value: float = -1.0) -> torch.Tensor:
    """The control image of an inpaint ControlNet: the RGB image in [0, 1] with the hole's pixels set to
    ``hole_value``; −1 is what control_v11p_sd15_inpaint expects (diffusers' documented
    ``make_inpaint_condition``: ``image[mask > 0.5] = -1``).

    Args:
        image: ``(B, 3, h, w)`` in [0, 1]. hole: ``(B, 1, h, w)``, 1 = hole.
    """
    import torch

    return torch.where(hole > 0.5, torch.full_like(image, hole_value), image)


@register_method
class ControlNetInpaint(PipelineMethod):
    name = "controlnet-inpaint"
    description = (
        "Plain base + inpaint ControlNet via diffusers' StableDiffusion(XL)ControlNetInpaintPipeline (SDXL needs "
        "an SDXL inpaint ControlNet)."
    )
    Options = ControlNetInpaintOptions
    models = (BASE, CONTROLNET)
    families = ("sd15", "sdxl")
    optional_models = (BASE_CONFIG,)
    per_image_calls = True
    counted_components = ("controlnet",)

    def __init__(self, pipeline: Any, device: Any = "cpu", dtype: Any = None):
        super().__init__(pipeline, device, dtype)
        # diffusers' ControlNet inpaint pipeline wants sides that are multiples of 8, whatever the VAE's factor
        self.size_multiple = math.lcm(self.size_multiple, 8)

    @classmethod
    def build_pipeline(cls, models, dtype):
        from diffusers import (
            ControlNetModel,
            StableDiffusionControlNetInpaintPipeline,
            StableDiffusionXLControlNetInpaintPipeline,
        )

        from ...errors import CheckpointError
        from ...loading import FAMILY_NAMES, detect_family, load_model

        components = cls.load_base(models, dtype)
        controlnet = load_model(
            ControlNetModel, models.controlnet, "ControlNet", dtype=dtype, allow_pickle=models.allow_pickle
        )
        unet_config = components["unet"].config
        base_family, controlnet_family = detect_family(unet_config), detect_family(controlnet.config)
        if (
            base_family != controlnet_family
            or controlnet.config.cross_attention_dim != unet_config.cross_attention_dim
        ):
            raise CheckpointError(
                f"this {FAMILY_NAMES[controlnet_family]} ControlNet ({models.controlnet}) does not fit the "
                f"{FAMILY_NAMES[base_family]} base ({models.base}); controlnet-inpaint on "
                f"{FAMILY_NAMES[base_family]} needs an inpaint ControlNet made for it"
            )
        if base_family == "sdxl":
            return StableDiffusionXLControlNetInpaintPipeline(**components, controlnet=controlnet)
        return StableDiffusionControlNetInpaintPipeline(
            **components,
            controlnet=controlnet,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def call_arguments(self, task: Task) -> dict[str, Any]:
        options: ControlNetInpaintOptions = task.options
        # The one mask conversion: the ControlNet reads the hole as −1 pixels in its control image; the pipeline's
        # own mask_image is white / 1 = repaint, the project's convention, so it passes unchanged.
        height, width = task.image.shape[-2:]
        return dict(
            image=task.image,
            mask_image=task.hole,
            control_image=inpaint_control_image(task.image, task.hole, options.hole_value),
            height=height,
            width=width,
            strength=options.strength,
            controlnet_conditioning_scale=options.conditioning_scale,
            control_guidance_start=options.control_guidance_start,
            control_guidance_end=options.control_guidance_end,
        )
