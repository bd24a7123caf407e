"""SD Inpainting: the 9-channel inpainting UNet (e.g. the SD1.5 inpainting checkpoint) through diffusers' own
``StableDiffusionInpaintPipeline`` at strength 1.0 (Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models", CVPR 2022, inpainting fine-tune)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from ..loading import CheckpointError, load_base_components, resolve_dtype
from ..schedulers import make_scheduler
from .base import GenerateOutput, InpaintMethod, InpaintRequest, ModelPaths, StepCallback
from .registry import register_method
from .sd_common import count_calls

__all__ = ["SDInpainting", "SDInpaintingOptions"]


class SDInpaintingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@register_method
class SDInpainting(InpaintMethod):
    name = "sd-inpainting"
    description = (
        "Stable Diffusion inpainting model (9-channel UNet) via diffusers' StableDiffusionInpaintPipeline."
    )
    Options = SDInpaintingOptions

    def __init__(self, pipeline, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.pipeline = pipeline
        self.base_scheduler_config = dict(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def load(cls, models: ModelPaths, device: str = "cpu", dtype="fp32") -> SDInpainting:
        from diffusers import StableDiffusionInpaintPipeline

        models.require(cls.name, "inpaint_model")
        torch_dtype = resolve_dtype(dtype)
        components = load_base_components(
            models.inpaint_model,
            dtype=torch_dtype,
            allow_pickle=models.allow_pickle,
            config=models.base_config,
        )
        channels = components["unet"].config.in_channels
        if channels != 9:
            raise CheckpointError(
                f"{models.inpaint_model} has a {channels}-channel UNet; sd-inpainting needs a 9-channel "
                "inpainting model (latent 4 + mask 1 + masked-image latent 4)"
            )
        pipeline = StableDiffusionInpaintPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        return cls(pipeline.to(device), device=device, dtype=torch_dtype)

    def generate(
        self,
        image: torch.Tensor,
        hole: torch.Tensor,
        request: InpaintRequest,
        options: SDInpaintingOptions,
        generators: list[torch.Generator],
        on_step: StepCallback | None = None,
    ) -> GenerateOutput:
        pipe = self.pipeline
        pipe.scheduler = make_scheduler(request.scheduler, self.base_scheduler_config)

        total, done = request.steps * len(generators), [0]

        def callback(_pipe, _step, _t, kwargs):
            done[0] += 1
            if on_step is not None:
                on_step(done[0], total)
            return kwargs

        # The one mask conversion: diffusers' inpainting pipelines take white / 1 = repaint (binarised at 0.5;
        # the pipeline blanks `image * (mask < 0.5)` and feeds the mask channel 1 = hole to the UNet), which is
        # the project's convention, so the hole passes through unchanged. tests/methods checks the UNet's mask
        # channel.
        mask_image = hole
        height, width = image.shape[-2:]
        with count_calls(pipe.unet) as calls:
            # One pipeline call per image with its own generator: diffusers draws the VAE-encoding samples of a
            # batch from the generators in an order that differs from a single-image run, so image i would
            # not equal a single run at seed + i otherwise.
            outputs = [
                pipe(
                    prompt=request.prompt,
                    image=image,
                    mask_image=mask_image,
                    negative_prompt=request.negative_prompt,
                    height=height,
                    width=width,
                    strength=1.0,
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance_scale,
                    generator=generator,
                    output_type="pt",
                    callback_on_step_end=callback,
                ).images
                for generator in generators
            ]
            images = torch.cat(outputs)
        return GenerateOutput(images=images.float().cpu(), unet_calls=calls.per_image(request.num_images))
