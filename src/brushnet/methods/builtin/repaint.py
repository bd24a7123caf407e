"""RePaint (Lugmayr et al., "RePaint: Inpainting using Denoising Diffusion Probabilistic Models", CVPR 2022)
on an SD1.5 or SDXL latent base.

Each reverse step samples the unknown region from the model and takes the known region from the input
noised to the same level (paper eq. 8–10): ``x_{t−1} = m ⊙ x^known_{t−1} + (1 − m) ⊙ x^unknown_{t−1}`` with
**m = 1 on the known region** (RePaint's own convention). Resampling ("time travel", §4.2): after every
``jump_length`` steps down, the sample is re-noised ``jump_length`` steps back up with the forward process
``q(x_t | x_{t−1})`` (eq. 1) and denoised again, ``jump_n_sample − 1`` times.

Why our own loop: diffusers' ``RePaintScheduler`` is deprecated and built for the pixel-space RePaint
pipeline. Here the schedule is a plain list of moves (:func:`repaint_schedule`) over the levels of a DDIM
timestep grid (``request.steps`` levels; level 0 = clean), each down move a DDIM update (``eta`` = 1: the
DDPM-like ancestral sampling RePaint uses; ``eta`` = 0: deterministic DDIM) and each up move a forward
re-noising. The method therefore takes only the ``ddim`` scheduler name (its default); another name is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from ...errors import InputError, RequestError
from ...schedulers import original_and_noise
from ..base import GenerateOutput, InpaintRequest, Task, given
from ..counting import count_calls
from ..latent_method import LatentMethod, latent_hole
from ..registry import register_method

__all__ = ["RePaint", "RePaintOptions", "RePaintMove", "repaint_schedule"]


class RePaintOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    jump_length: int = Field(10, ge=1, le=1000, description="Steps per resampling jump (paper: j).")
    jump_n_sample: int = Field(10, ge=1, le=100, description="Times each jump segment is sampled (paper: r).")
    eta: float = Field(1.0, ge=0.0, le=1.0, description="Noise of each down step (1 = DDPM-like, 0 = DDIM).")
    mask_dilation: int = Field(0, ge=0, le=16, description="Grow the latent hole by this many latent cells.")


@dataclass(frozen=True)
class RePaintMove:
    """One move of the schedule between levels (``steps`` = pure noise, 0 = clean). A ``"down"`` move costs one
    UNet evaluation; an ``"up"`` move re-noises and costs none."""

    start: int
    end: int

    @property
    def direction(self) -> str:
        return "down" if self.end < self.start else "up"


def repaint_schedule(steps: int, jump_length: int, jump_n_sample: int) -> list[RePaintMove]:
    """The RePaint resampling schedule over ``steps`` levels.

    Starting at level ``steps``, go down one level at a time. On first arriving at each level
    ``steps − k·jump_length`` (k = 1, 2, …, level ≥ 0), go back up ``jump_length`` levels and down again,
    ``jump_n_sample − 1`` times. With ``jump_n_sample = 1`` this is the plain ``steps``-step sampler.
    Number of down moves: ``steps + ⌊steps / jump_length⌋ · (jump_n_sample − 1) · jump_length``.
    """
    if steps < 1 or jump_length < 1 or jump_n_sample < 1:
        raise ValueError("steps, jump_length and jump_n_sample must be ≥ 1")
    jump_points = set(range(steps - jump_length, -1, -jump_length))
    moves: list[RePaintMove] = []
    level = steps
    while level > 0:
        moves.append(RePaintMove(level, level - 1))
        level -= 1
        if level in jump_points:
            jump_points.discard(level)
            for _ in range(jump_n_sample - 1):
                moves.extend(RePaintMove(level + k, level + k + 1) for k in range(jump_length))
                moves.extend(RePaintMove(level + k, level + k - 1) for k in range(jump_length, 0, -1))
    return moves


@register_method
class RePaint(LatentMethod):
    name = "repaint"
    description = "RePaint: known region from the noised input at every step, with resampling jumps."
    Options = RePaintOptions
    default_scheduler = "ddim"
    schedulers = ("ddim",)

    @classmethod
    def check(cls, request: InpaintRequest, options: RePaintOptions) -> InpaintRequest:
        """Also refuse resampling asked for that no jump fits: a ``jump_length`` or ``jump_n_sample`` given while
        ``jump_length`` is more than the steps (no jump point: the plain sampler would run)."""
        request = super().check(request, options)
        asked = given(options, "jump_length") or given(options, "jump_n_sample")
        if asked and options.jump_n_sample > 1 and options.jump_length > request.steps:
            raise RequestError(
                f"option jump_length {options.jump_length} is more than the {request.steps} steps: no resampling "
                "jump fits, so none would be made; lower jump_length or raise steps"
            )
        return request

    def generate(self, task: Task) -> GenerateOutput:
        import torch
        from diffusers import DDIMScheduler
        from diffusers.utils.torch_utils import randn_tensor

        request, options, generators = task.request, task.options, task.generators
        n = task.num_images
        grid = DDIMScheduler.from_config(self.base_scheduler_config)
        grid.set_timesteps(request.steps)
        # level k ≥ 1 ↔ timesteps[steps − k] (level `steps` is the noisiest); level 0 is the clean latent
        timesteps = grid.timesteps.tolist()
        alphas = grid.alphas_cumprod.to(torch.float64)
        alpha_bar = [1.0] + [float(alphas[timesteps[request.steps - k]]) for k in range(1, request.steps + 1)]
        prediction_type = grid.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise InputError(f"repaint supports epsilon and v_prediction models, not {prediction_type!r}")

        text = self.encode_prompts(request, *task.image.shape[-2:])
        source = self.encode(task.image).expand(n, -1, -1, -1).float()
        # The one mask conversion: project convention (1 = generate) → RePaint's m (1 = known), at latent
        # resolution with the hole max-pooled so it never under-covers the pixel hole.
        known = latent_hole(task.hole, self.vae_scale_factor, options.mask_dilation).to(self.device) < 0.5

        def noise() -> torch.Tensor:
            return randn_tensor(source.shape, generator=generators, device=self.device, dtype=torch.float32)

        schedule = repaint_schedule(request.steps, options.jump_length, options.jump_n_sample)
        x = noise()  # level `steps` starts from pure noise, as diffusers' DDIM pipelines do
        with count_calls(self.unet.conv_in) as calls:
            for index, move in enumerate(schedule):
                a_start, a_end = alpha_bar[move.start], alpha_bar[move.end]
                if move.direction == "up":  # forward process q(x_end | x_start)
                    ratio = a_end / a_start
                    x = ratio**0.5 * x + (1 - ratio) ** 0.5 * noise()
                else:
                    t = torch.tensor(timesteps[request.steps - move.start], device=self.device)
                    out = self.predict(x, t, text, request.guidance_scale)
                    x0, eps = original_and_noise(out, x, a_start, prediction_type)
                    sigma = options.eta * ((1 - a_end) / (1 - a_start) * (1 - a_start / a_end)) ** 0.5
                    x_unknown = a_end**0.5 * x0 + max(0.0, 1 - a_end - sigma**2) ** 0.5 * eps
                    if sigma > 0:
                        x_unknown = x_unknown + sigma * noise()
                    if move.end == 0:
                        x_known = source
                    else:
                        x_known = a_end**0.5 * source + (1 - a_end) ** 0.5 * noise()
                    x = torch.where(known, x_known, x_unknown)
                task.step(index + 1, len(schedule))
        downs = sum(move.direction == "down" for move in schedule)
        return GenerateOutput(
            images=self.decode(x), unet_calls=calls.per_image(n), extra_calls={"schedule_down_moves": downs}
        )
