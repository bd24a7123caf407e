"""The base of methods that run their own denoising loop on a plain (4-channel) Stable Diffusion 1.5 or SDXL base:
Blended Latent Diffusion, RePaint. It owns loading, prompt encoding (SDXL: both text encoders, pooled text, time
ids), VAE encode/decode, the latent-resolution hole and a guided UNet evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import BASE, BASE_CONFIG, InpaintMethod, InpaintRequest, ModelPaths
from .pipeline_method import pipeline_to

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["LatentMethod", "TextConditioning", "latent_hole"]


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


@dataclass
class TextConditioning:
    """What the UNet reads besides the latent: the text embeddings and, for SDXL, ``added_cond_kwargs``
    (pooled text and size/crop time ids); each ``[negative; positive]`` with classifier-free guidance."""

    embeddings: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None


class LatentMethod(InpaintMethod):
    """A method with its own loop on a plain SD1.5 or SDXL base (``--base``), using diffusers components."""

    models = (BASE,)
    optional_models = (BASE_CONFIG,)
    latent_mask = "cover"  # latent_hole: any hole pixel makes its cell hole
    families = ("sd15", "sdxl")

    def __init__(self, pipeline: Any, device: Any = "cpu", dtype: Any = None):
        from ..loading import detect_family

        super().__init__(device, dtype)
        # a StableDiffusion(XL)Pipeline holds the components and gives us diffusers' own encode_prompt
        self.pipeline = pipeline
        self.family = detect_family(pipeline.unet.config)
        self.base_scheduler_config = dict(pipeline.scheduler.config)
        self.size_multiple = self.vae_scale_factor = int(pipeline.vae_scale_factor)
        self.native_resolution = int(pipeline.unet.config.sample_size) * self.vae_scale_factor

    @classmethod
    def load(cls, models: ModelPaths, device: str = "cpu", dtype: Any = "fp32") -> LatentMethod:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        from ..loading import detect_family, resolve_dtype

        models.require(cls)
        torch_dtype = resolve_dtype(dtype)
        components = cls.load_base(models, torch_dtype, in_channels=4)
        if detect_family(components["unet"].config) == "sdxl":
            pipeline = StableDiffusionXLPipeline(**components)
        else:
            pipeline = StableDiffusionPipeline(
                **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline_to(pipeline, device), device=device, dtype=torch_dtype)

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def vae(self):
        return self.pipeline.vae

    def encode_prompts(self, request: InpaintRequest, height: int, width: int) -> TextConditioning:
        """The text conditioning of the batch (``num_images`` each half), through diffusers' own
        ``encode_prompt``; SDXL adds the pooled text and the time ids of an uncropped ``height × width`` image."""
        import torch

        cfg = request.guidance_scale > 1
        negative = (request.negative_prompt or None) if cfg else None  # None: SDXL's zeros, as its pipeline
        if self.family != "sdxl":
            positive, negative_embeds = self.pipeline.encode_prompt(
                request.prompt, self.device, request.num_images, cfg, negative_prompt=negative
            )
            return TextConditioning(torch.cat([negative_embeds, positive]) if cfg else positive)
        pipe = self.pipeline
        positive, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            request.prompt,
            device=self.device,
            num_images_per_prompt=request.num_images,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative,
        )
        time_ids = pipe._get_add_time_ids(
            (height, width),
            (0, 0),
            (height, width),
            dtype=torch.float32,  # pixel counts, embedded in float32 by the UNet (bf16 rounds above 256)
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        ).to(self.device)
        time_ids = time_ids.repeat(request.num_images * (2 if cfg else 1), 1)
        if cfg:
            positive, pooled = torch.cat([negative_embeds, positive]), torch.cat([negative_pooled, pooled])
        return TextConditioning(positive, {"text_embeds": pooled, "time_ids": time_ids})

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image ``(B, 3, h, w)`` in [0, 1] → latent ``(B, 4, h/8, w/8)``: the posterior mode (deterministic, so
        the kept region is reproducible) times the VAE scaling factor."""
        import torch

        from ..models.conditioning import encode_latents

        with torch.no_grad(), self._vae_precision():
            pixels = (image * 2 - 1).to(self.device)
            return encode_latents(self.vae, pixels, sample=False).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent → image ``(B, 3, h, w)`` in [0, 1] (float32, CPU)."""
        import torch

        from ..models.conditioning import from_model_latents

        with torch.no_grad(), self._vae_precision():
            pixels = self.vae.decode(from_model_latents(self.vae, latents).to(self.vae.dtype)).sample
        return ((pixels.float() + 1) / 2).clamp(0, 1).cpu()

    def _vae_precision(self):
        """SDXL's stock VAE overflows in float16 (``force_upcast``): float32 there, as the SDXL pipelines run it
        (:func:`~brushnet.models.conditioning.vae_in_float32`). An SD1.5 VAE runs in the method's dtype, as the SD1.5
        pipelines run it (diffusers' ``force_upcast`` defaults to true in every VAE config, SD1.5's too)."""
        import contextlib

        from ..models.conditioning import vae_in_float32

        return vae_in_float32(self.vae, self.device) if self.family == "sdxl" else contextlib.nullcontext()

    def predict(
        self, model_input: torch.Tensor, t: torch.Tensor, text: TextConditioning, guidance_scale: float
    ) -> torch.Tensor:
        """The UNet's guided prediction for ``model_input`` at timestep ``t`` (CFG when ``guidance_scale > 1``,
        running the unconditional and conditional halves as one batch)."""
        import torch

        cfg = guidance_scale > 1
        batch = torch.cat([model_input] * 2) if cfg else model_input
        with torch.no_grad():
            out = self.unet(
                batch.to(self.unet.dtype),
                t,
                encoder_hidden_states=text.embeddings,
                added_cond_kwargs=text.added_cond_kwargs,
            ).sample
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out.to(model_input.dtype)
