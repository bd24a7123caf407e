"""The base of methods that run their own denoising loop on a plain (4-channel) Stable Diffusion base: Blended
Latent Diffusion, RePaint. It owns loading, prompt encoding, VAE encode/decode, the latent-resolution hole and a
guided UNet evaluation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import BASE, BASE_CONFIG, InpaintMethod, InpaintRequest, ModelPaths

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["LatentMethod", "latent_hole"]


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
    import torch.nn.functional as F

    if hole.shape[-1] % factor or hole.shape[-2] % factor:
        raise ValueError(f"hole size {tuple(hole.shape[-2:])} is not a multiple of {factor}")
    cells = F.max_pool2d((hole > 0.5).float(), kernel_size=factor, stride=factor)
    if dilation > 0:
        cells = F.max_pool2d(cells, kernel_size=2 * dilation + 1, stride=1, padding=dilation)
    return cells


class LatentMethod(InpaintMethod):
    """A method with its own loop on a plain SD base (``--base``), using diffusers components."""

    models = (BASE,)
    optional_models = (BASE_CONFIG,)

    def __init__(self, pipeline: Any, device: Any = "cpu", dtype: Any = None):
        super().__init__(device, dtype)
        # a StableDiffusionPipeline holds the components and gives us diffusers' own encode_prompt
        self.pipeline = pipeline
        self.base_scheduler_config = dict(pipeline.scheduler.config)
        self.size_multiple = self.vae_scale_factor = int(pipeline.vae_scale_factor)
        self.native_resolution = int(pipeline.unet.config.sample_size) * self.vae_scale_factor

    @classmethod
    def load(cls, models: ModelPaths, device: str = "cpu", dtype: Any = "fp32") -> LatentMethod:
        from diffusers import StableDiffusionPipeline

        from ..errors import CheckpointError
        from ..loading import load_base_components, resolve_dtype

        models.require(cls)
        torch_dtype = resolve_dtype(dtype)
        components = load_base_components(
            models.base, dtype=torch_dtype, allow_pickle=models.allow_pickle, config=models.base_config
        )
        channels = components["unet"].config.in_channels
        if channels != 4:
            raise CheckpointError(
                f"method {cls.name!r} needs a plain 4-channel SD base, got a {channels}-channel UNet in {models.base}"
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
        import torch

        cfg = request.guidance_scale > 1
        positive, negative = self.pipeline.encode_prompt(
            request.prompt,
            self.device,
            request.num_images,
            cfg,
            negative_prompt=request.negative_prompt if cfg else None,
        )
        return torch.cat([negative, positive]) if cfg else positive

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image ``(B, 3, h, w)`` in [0, 1] → latent ``(B, 4, h/8, w/8)``: the posterior mode (deterministic, so
        the kept region is reproducible) times the VAE scaling factor."""
        import torch

        from ..models.conditioning import encode_latents

        with torch.no_grad():
            return encode_latents(self.vae, (image * 2 - 1).to(self.device), sample=False)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent → image ``(B, 3, h, w)`` in [0, 1] (float32, CPU)."""
        import torch

        with torch.no_grad():
            pixels = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((pixels.float() + 1) / 2).clamp(0, 1).cpu()

    def predict(
        self, model_input: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """The UNet's guided prediction for ``model_input`` at timestep ``t`` (CFG when ``guidance_scale > 1``,
        running the unconditional and conditional halves as one batch)."""
        import torch

        cfg = guidance_scale > 1
        batch = torch.cat([model_input] * 2) if cfg else model_input
        with torch.no_grad():
            out = self.unet(batch.to(self.unet.dtype), t, encoder_hidden_states=embeddings).sample
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out.to(model_input.dtype)
