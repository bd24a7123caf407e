"""Pieces shared by the methods that drive a plain SD1.5 base with their own denoising loop (Blended Latent
Diffusion, RePaint): loading, prompt encoding, VAE encode/decode, the latent-resolution hole, a guided UNet
evaluation, and a counter of UNet evaluations for every method."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..loading import load_base_components, resolve_dtype
from .base import InpaintMethod, InpaintRequest, ModelPaths

__all__ = ["CallCounter", "count_calls", "latent_hole", "LatentSDMethod"]


class CallCounter:
    """Counts single-sample forward passes of a module (a CFG-doubled batch of 2 counts 2)."""

    def __init__(self) -> None:
        self.samples = 0

    def per_image(self, num_images: int) -> int:
        return self.samples // max(1, num_images)


@contextlib.contextmanager
def count_calls(module: torch.nn.Module) -> Iterator[CallCounter]:
    """Count the samples that go through ``module.forward`` inside the ``with`` block (a forward pre-hook reads
    the batch size of the first tensor argument, positional or ``sample=``)."""
    counter = CallCounter()

    def hook(_module, args, kwargs):
        first = args[0] if args else kwargs.get("sample")
        counter.samples += int(first.shape[0]) if isinstance(first, torch.Tensor) else 1

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def latent_hole(hole: torch.Tensor, factor: int, dilation: int = 0) -> torch.Tensor:
    """The hole at latent resolution, never smaller than the pixel hole.

    A latent cell is hole if **any** pixel of its ``factor × factor`` patch is hole (max-pool), then the result
    is dilated by ``dilation`` cells. stable-diffusion.cpp (leejet/stable-diffusion.cpp PR #1357) observed that
    sampling one pixel per 8×8 patch to downsample the mask under-covers the hole's edge, and that taking the
    maximum over the patch (plus inflating by one latent cell for inpainting models) removes the edge artifacts.

    Args:
        hole: ``(B, 1, H, W)`` in {0, 1}, 1 = hole; ``H`` and ``W`` multiples of ``factor``.
        factor: the VAE's downsampling factor (8 for SD).
        dilation: extra latent cells of hole around it (≥ 0).
    Returns:
        ``(B, 1, H/factor, W/factor)`` in {0, 1}, 1 = hole.
    """
    if hole.shape[-1] % factor or hole.shape[-2] % factor:
        raise ValueError(f"hole size {tuple(hole.shape[-2:])} is not a multiple of {factor}")
    cells = F.max_pool2d((hole > 0.5).float(), kernel_size=factor, stride=factor)
    if dilation > 0:
        cells = F.max_pool2d(cells, kernel_size=2 * dilation + 1, stride=1, padding=dilation)
    return cells


class LatentSDMethod(InpaintMethod):
    """A method that runs its own loop on a plain SD1.5 base (``ModelPaths.base``) with diffusers components."""

    def __init__(self, pipeline, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        # A StableDiffusionPipeline holds the components and gives us diffusers' own encode_prompt.
        self.pipeline = pipeline
        self.base_scheduler_config = dict(pipeline.scheduler.config)
        self.vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)

    @classmethod
    def load(cls, models: ModelPaths, device: str = "cpu", dtype="fp32") -> LatentSDMethod:
        from diffusers import StableDiffusionPipeline

        models.require(cls.name, "base")
        torch_dtype = resolve_dtype(dtype)
        components = load_base_components(
            models.base, dtype=torch_dtype, allow_pickle=models.allow_pickle, config=models.base_config
        )
        if components["unet"].config.in_channels != 4:
            from ..loading import CheckpointError

            raise CheckpointError(
                f"method {cls.name!r} needs a plain 4-channel SD base, got a "
                f"{components['unet'].config.in_channels}-channel UNet in {models.base}"
            )
        pipeline = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline.to(device), device=device, dtype=torch_dtype)

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def vae(self):
        return self.pipeline.vae

    def encode_prompts(self, request: InpaintRequest) -> torch.Tensor:
        """Text embeddings for the batch: ``[negative; positive]`` (each ``num_images`` long) with CFG, else
        the positive ones only."""
        cfg = request.guidance_scale > 1
        positive, negative = self.pipeline.encode_prompt(
            request.prompt,
            self.device,
            request.num_images,
            cfg,
            negative_prompt=request.negative_prompt if cfg else None,
        )
        return torch.cat([negative, positive]) if cfg else positive

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image ``(B, 3, h, w)`` in [0, 1] → latent ``(B, 4, h/8, w/8)``: the posterior mean (deterministic, so
        the kept region is reproducible) times the VAE scaling factor."""
        pixels = (image * 2 - 1).to(self.device, self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.mode() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent → image ``(B, 3, h, w)`` in [0, 1] (float32, CPU)."""
        pixels = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((pixels.float() + 1) / 2).clamp(0, 1).cpu()

    @torch.no_grad()
    def predict(
        self, model_input: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """The UNet's guided prediction for ``model_input`` at timestep ``t`` (CFG when ``guidance_scale > 1``,
        running the unconditional and conditional halves as one batch)."""
        cfg = guidance_scale > 1
        batch = torch.cat([model_input] * 2) if cfg else model_input
        out = self.unet(batch.to(self.unet.dtype), t, encoder_hidden_states=embeddings).sample
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out.to(model_input.dtype)
