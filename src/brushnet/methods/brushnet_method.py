"""BrushNet (Ju et al., ECCV 2024) behind the method interface."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..loading import load_base_components, load_brushnet, resolve_dtype
from ..schedulers import make_scheduler
from .base import GenerateOutput, InpaintMethod, InpaintRequest, ModelPaths, StepCallback
from .registry import register_method
from .sd_common import count_calls

__all__ = ["BrushNetMethod", "BrushNetOptions"]


class BrushNetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    conditioning_scale: float = Field(
        1.0, ge=0.0, le=2.0, description="Preservation scale (branch strength)."
    )
    control_guidance_start: float = Field(
        0.0, ge=0.0, le=1.0, description="Branch on from this step fraction."
    )
    control_guidance_end: float = Field(
        1.0, ge=0.0, le=1.0, description="Branch off after this step fraction."
    )
    guess_mode: bool = Field(False, description="Log-spaced residual scales; branch on the text half only.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.control_guidance_start >= self.control_guidance_end:
            raise ValueError("control_guidance_start must be below control_guidance_end")
        return self


@register_method
class BrushNetMethod(InpaintMethod):
    name = "brushnet"
    description = "BrushNet: a dual-branch model adding masked-image features into a frozen SD1.5 UNet."
    Options = BrushNetOptions

    def __init__(self, pipeline, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.pipeline = pipeline
        self.base_scheduler_config = dict(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def load(cls, models: ModelPaths, device: str = "cpu", dtype="fp32") -> BrushNetMethod:
        from ..pipelines.pipeline_brushnet import StableDiffusionBrushNetPipeline

        models.require(cls.name, "base", "brushnet")
        torch_dtype = resolve_dtype(dtype)
        components = load_base_components(
            models.base, dtype=torch_dtype, allow_pickle=models.allow_pickle, config=models.base_config
        )
        brushnet = load_brushnet(models.brushnet, dtype=torch_dtype, allow_pickle=models.allow_pickle)
        pipeline = StableDiffusionBrushNetPipeline(**components, brushnet=brushnet, safety_checker=None)
        return cls(pipeline.to(device), device=device, dtype=torch_dtype)

    def generate(
        self,
        image: torch.Tensor,
        hole: torch.Tensor,
        request: InpaintRequest,
        options: BrushNetOptions,
        generators: list[torch.Generator],
        on_step: StepCallback | None = None,
    ) -> GenerateOutput:
        pipe = self.pipeline
        pipe.scheduler = make_scheduler(request.scheduler, self.base_scheduler_config)

        def callback(_pipe, step, _t, kwargs):
            if on_step is not None:  # second-order schedulers take more than `steps` timesteps
                on_step(step + 1, len(_pipe.scheduler.timesteps))
            return kwargs

        # The one mask conversion happens in the pipeline: it takes the project's convention (white/1 = inpaint)
        # and feeds the branch the keep mask (1 − hole, nearest-downsampled to latent size) as the 5th channel of
        # `brushnet_cond`; nothing to flip here. tests/methods checks what reaches the branch.
        # The UNet is driven through its submodules (its `forward` never runs), so its calls are counted on
        # `conv_in`, which every evaluation passes through once.
        with count_calls(pipe.unet.conv_in) as unet_calls, count_calls(pipe.brushnet) as branch_calls:
            images = pipe(
                prompt=[request.prompt] * request.num_images,
                image=image,
                mask_image=hole,
                negative_prompt=[request.negative_prompt] * request.num_images,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                generator=generators,
                brushnet_conditioning_scale=options.conditioning_scale,
                control_guidance_start=options.control_guidance_start,
                control_guidance_end=options.control_guidance_end,
                guess_mode=options.guess_mode,
                output_type="pt",
                callback_on_step_end=callback,
            ).images
        n = request.num_images
        return GenerateOutput(
            images=images.float().cpu(),
            unet_calls=unet_calls.per_image(n),
            extra_calls={"brushnet": branch_calls.per_image(n)},
        )
