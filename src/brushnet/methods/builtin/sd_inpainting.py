"""SD Inpainting: the 9-channel inpainting UNet (e.g. the SD1.5 inpainting checkpoint) through diffusers' own
``StableDiffusionInpaintPipeline`` (Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models",
CVPR 2022, inpainting fine-tune); strength 1.0 unless the ``strength`` option says otherwise."""

from __future__ import annotations

import math
from typing import Any

from ..base import BASE_CONFIG, ModelSlot, StrengthOption, Task
from ..pipeline_method import PipelineMethod
from ..registry import register_method

__all__ = ["SDInpainting", "INPAINT_MODEL"]

INPAINT_MODEL = ModelSlot(
    "inpaint_model",
    "9-channel inpainting model folder (or hub id / single file), e.g. SD1.5 or SDXL inpainting.",
    folder="inpaint",
    families=("sd15", "sdxl"),
    random_builder="brushnet.random_models:build_random_inpaint_model",
)


@register_method
class SDInpainting(PipelineMethod):
    name = "sd-inpainting"
    description = (
        "Stable Diffusion inpainting model (9-channel UNet) via diffusers' StableDiffusionInpaintPipeline."
    )
    Options = StrengthOption
    models = (INPAINT_MODEL,)
    families = ("sd15", "sdxl")
    optional_models = (BASE_CONFIG,)
    per_image_calls = True

    def __init__(self, pipeline: Any, device: Any = "cpu", dtype: Any = None):
        super().__init__(pipeline, device, dtype)
        if (
            self.family == "sdxl"
        ):  # diffusers' SDXL inpaint pipeline wants multiples of 8, whatever the VAE's factor
            self.size_multiple = math.lcm(self.size_multiple, 8)

    @classmethod
    def build_pipeline(cls, models, dtype):
        from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

        from ...loading import detect_family

        components = cls.load_base(models, dtype, "inpaint_model", in_channels=9)
        if detect_family(components["unet"].config) == "sdxl":
            return StableDiffusionXLInpaintPipeline(**components, requires_aesthetics_score=False)
        return StableDiffusionInpaintPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )

    def call_arguments(self, task: Task) -> dict[str, Any]:
        # The one mask conversion: diffusers' inpainting pipelines take white / 1 = repaint (binarised at 0.5; the
        # pipeline blanks `image * (mask < 0.5)` and feeds the mask channel 1 = hole to the UNet), which is the
        # project's convention, so the hole passes through unchanged. tests/methods checks the UNet's mask channel.
        height, width = task.image.shape[-2:]
        return dict(
            image=task.image, mask_image=task.hole, height=height, width=width, strength=task.options.strength
        )
