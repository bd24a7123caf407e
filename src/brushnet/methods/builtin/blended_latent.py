"""Blended Latent Diffusion (Avrahami, Fried, Lischinski, "Blended Latent Diffusion", SIGGRAPH 2023, §3)
on any plain SD1.5 or SDXL base.

At every step, after the scheduler's update ``z_{t-1} ~ p(z_{t-1} | z_t)``, the known region is replaced by the
input's latent noised to the same level: ``z_{t-1} ← m ⊙ z_{t-1} + (1 − m) ⊙ noise(z_init, t−1)``, with ``m``
the hole at latent resolution (1 = generate). At the last step the clean ``z_init`` is used, so before decoding
the kept latent cells equal the input's latent exactly.
"""

from __future__ import annotations

import math
from inspect import signature

from pydantic import BaseModel, ConfigDict, Field

from ..base import GenerateOutput, Task
from ..counting import count_calls
from ..latent_method import LatentMethod, latent_hole
from ..registry import register_method

__all__ = ["BlendedLatentDiffusion", "BlendedLatentOptions"]


class BlendedLatentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    blend_start: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of the steps after which blending begins (0 = from the first step). The final "
        "replacement by the clean latent always happens.",
    )
    mask_dilation: int = Field(0, ge=0, le=16, description="Grow the latent hole by this many latent cells.")


@register_method
class BlendedLatentDiffusion(LatentMethod):
    name = "blended-latent-diffusion"
    description = (
        "Blended Latent Diffusion: a plain SD1.5 base; the known latent region is replaced each step."
    )
    Options = BlendedLatentOptions

    def generate(self, task: Task) -> GenerateOutput:
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        from ...schedulers import make_scheduler

        request, options, generators = task.request, task.options, task.generators
        n = task.num_images
        scheduler = make_scheduler(request.scheduler, self.base_scheduler_config, request.steps)
        scheduler.set_timesteps(request.steps, device=self.device)
        # a stochastic scheduler (lcm, tcd, euler-a, ddpm) draws its step noise from the request's generators
        step_kwargs = {"generator": generators} if "generator" in signature(scheduler.step).parameters else {}
        timesteps = scheduler.timesteps
        text = self.encode_prompts(request, *task.image.shape[-2:])

        source = self.encode(task.image).expand(n, -1, -1, -1).float()
        # The one mask conversion: project convention (1 = generate) → latent-resolution hole, max-pooled so it
        # never under-covers the pixel hole; everywhere else the input's latent is pasted.
        in_hole = latent_hole(task.hole, self.vae_scale_factor, options.mask_dilation).to(self.device) > 0.5

        latents = randn_tensor(source.shape, generator=generators, device=self.device, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma
        first_blend = math.ceil(options.blend_start * len(timesteps))

        with count_calls(self.unet.conv_in) as calls:
            for i, t in enumerate(timesteps):
                model_input = scheduler.scale_model_input(latents, t)
                noise_pred = self.predict(model_input, t, text, request.guidance_scale)
                latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample.float()
                if i == len(timesteps) - 1:  # the clean input latent, exactly
                    latents = torch.where(in_hole, latents, source)
                elif i >= first_blend:  # the input noised to the level of the next timestep
                    noise = randn_tensor(
                        source.shape, generator=generators, device=self.device, dtype=source.dtype
                    )
                    noised_source = scheduler.add_noise(source, noise, timesteps[i + 1 : i + 2])
                    latents = torch.where(in_hole, latents, noised_source)
                task.step(i + 1, len(timesteps))
        return GenerateOutput(images=self.decode(latents), unet_calls=calls.per_image(n))
