"""ControlNet-inpaint: diffusers' ``StableDiffusionControlNetInpaintPipeline`` with the SD1.5 inpaint ControlNet
(lllyasviel/control_v11p_sd15_inpaint; Zhang et al., "Adding Conditional Control to Text-to-Image Diffusion
Models", ICCV 2023) on a plain SD1.5 base, at strength 1.0. With a 4-channel base UNet the pipeline also
replaces the known latent by the noised input at every step (its own latent blending)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..loading import CheckpointError, load_base_components, resolve_dtype
from ..schedulers import make_scheduler
from .base import GenerateOutput, InpaintMethod, InpaintRequest, ModelPaths, StepCallback
from .registry import register_method
from .sd_common import count_calls

__all__ = ["ControlNetInpaint", "ControlNetInpaintOptions", "inpaint_control_image"]


class ControlNetInpaintOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    conditioning_scale: float = Field(1.0, ge=0.0, le=2.0, description="ControlNet residual scale.")
    control_guidance_start: float = Field(
        0.0, ge=0.0, le=1.0, description="ControlNet on from this fraction."
    )
    control_guidance_end: float = Field(
        1.0, ge=0.0, le=1.0, description="ControlNet off after this fraction."
    )

    @model_validator(mode="after")
    def _ordered(self):
        if self.control_guidance_start >= self.control_guidance_end:
            raise ValueError("control_guidance_start must be below control_guidance_end")
        return self


def inpaint_control_image(image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """The control image control_v11p_sd15_inpaint expects: the RGB image in [0, 1] with hole pixels set to −1
    (diffusers' documented ``make_inpaint_condition``: ``image[mask > 0.5] = -1``).

    Args:
        image: ``(B, 3, h, w)`` in [0, 1]. hole: ``(B, 1, h, w)``, 1 = hole.
    """
    return torch.where(hole > 0.5, torch.full_like(image, -1.0), image)


@register_method
class ControlNetInpaint(InpaintMethod):
    name = "controlnet-inpaint"
    description = "SD1.5 base + inpaint ControlNet via diffusers' StableDiffusionControlNetInpaintPipeline."
    Options = ControlNetInpaintOptions

    def __init__(self, pipeline, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.pipeline = pipeline
        self.base_scheduler_config = dict(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def load(cls, models: ModelPaths, device: str = "cpu", dtype="fp32") -> ControlNetInpaint:
        from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline

        models.require(cls.name, "base", "controlnet")
        torch_dtype = resolve_dtype(dtype)
        components = load_base_components(
            models.base, dtype=torch_dtype, allow_pickle=models.allow_pickle, config=models.base_config
        )
        try:
            controlnet = ControlNetModel.from_pretrained(
                models.controlnet, torch_dtype=torch_dtype, use_safetensors=not models.allow_pickle
            )
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise CheckpointError(f"cannot load ControlNet {models.controlnet!r}: {first}") from None
        pipeline = StableDiffusionControlNetInpaintPipeline(
            **components,
            controlnet=controlnet,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        return cls(pipeline.to(device), device=device, dtype=torch_dtype)

    def generate(
        self,
        image: torch.Tensor,
        hole: torch.Tensor,
        request: InpaintRequest,
        options: ControlNetInpaintOptions,
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

        # The one mask conversion: the ControlNet reads the hole as −1 pixels in its control image; the
        # pipeline's own mask_image is white / 1 = repaint, the project's convention, so it passes unchanged.
        control_image = inpaint_control_image(image, hole)
        height, width = image.shape[-2:]
        with count_calls(pipe.unet) as unet_calls, count_calls(pipe.controlnet) as controlnet_calls:
            # One pipeline call per image with its own generator: diffusers draws the VAE-encoding samples of a
            # batch from the generators in an order that differs from a single-image run, so image i would
            # not equal a single run at seed + i otherwise.
            outputs = [
                pipe(
                    prompt=request.prompt,
                    image=image,
                    mask_image=hole,
                    control_image=control_image,
                    negative_prompt=request.negative_prompt,
                    height=height,
                    width=width,
                    strength=1.0,
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance_scale,
                    generator=generator,
                    controlnet_conditioning_scale=options.conditioning_scale,
                    control_guidance_start=options.control_guidance_start,
                    control_guidance_end=options.control_guidance_end,
                    output_type="pt",
                    callback_on_step_end=callback,
                ).images
                for generator in generators
            ]
            images = torch.cat(outputs)
        n = request.num_images
        return GenerateOutput(
            images=images.float().cpu(),
            unet_calls=unet_calls.per_image(n),
            extra_calls={"controlnet": controlnet_calls.per_image(n)},
        )
