"""BrushNet's conditioning: the VAE latent of the masked image and the keep-mask at latent size.

One recipe, used by every pipeline (SD1.5, SDXL) and by the training loop (Ju et al., ECCV 2024, §3.2):

    x_m = x ⊙ (1 − m) − m          the image with the hole set to −1 (black in [−1, 1])
    z_m = E(x_m) · s                 a posterior sample (as the original), times the VAE scaling factor
    k   = 1 − resize_nearest(m)      the keep-mask at latent size (1 = keep: the branch's own convention)
    c   = [z_m, k]                   ``brushnet_cond``, 4 + 1 channels

``m`` is the project's mask convention (1 = hole); the inversion to the branch's keep-mask happens here and
nowhere else.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = [
    "mask_out",
    "encode_latents",
    "keep_mask_latent",
    "brushnet_conditioning",
    "vae_precision",
    "to_model_latents",
    "from_model_latents",
]


def mask_out(image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Set the hole of ``image`` (in [−1, 1]) to −1, whether or not the caller already blacked it out.

    Args:
        image: ``(B, 3, H, W)`` in [−1, 1].
        hole: ``(B or 1, 1, H, W)``, 1 = hole (values ≥ 0.5 count as hole).
    """
    return torch.where(hole > 0.5, torch.full_like(image, -1.0), image)


def vae_precision(vae, device: torch.device | str | None = None):
    """A context in which ``vae`` runs in its own dtype: a float32 VAE inside an autocast region (fp16 mixed
    precision training, a validation under ``accelerator.autocast()``) has autocast turned off, which would run its
    convolutions in float16 — and the SDXL VAE, kept in float32 because it overflows there, gave NaN latents.

    Args:
        device: where the VAE runs (default: its parameters' device; with sequential CPU offload those are on
            the meta device, so callers pass the inputs' device).
    """
    import contextlib

    device_type = torch.device(device).type if device is not None else next(vae.parameters()).device.type
    try:
        autocast = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): nothing to turn off
        return contextlib.nullcontext()
    if vae.dtype == torch.float32 and autocast:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def vae_in_float32(vae, device: torch.device | str | None = None):
    """Run ``vae`` in float32 when it is float16 and its config says it overflows there (``force_upcast``, SDXL's
    stock VAE), as diffusers' SDXL pipelines do, and in its own dtype under autocast (:func:`vae_precision`); its
    dtype is restored afterwards. An fp16-fixed VAE (``force_upcast`` false) stays in float16."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        with vae_precision(vae, device):
            yield
    finally:
        if upcast:
            vae.to(dtype=torch.float16)


def encode_latents(
    vae,
    pixels: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sample: bool = True,
) -> torch.Tensor:
    """VAE latents of ``pixels`` (in [−1, 1]) in the diffusion model's space (times the scaling factor, and
    normalised by the VAE's latent statistics where it has them: :func:`to_model_latents`), in the VAE's dtype.

    ``sample=True`` draws a posterior sample from ``generator`` (the original's choice); ``False`` takes the
    posterior mode. Works with any diffusers VAE (``AutoencoderKL``'s ``latent_dist`` or
    ``AutoencoderTiny``'s deterministic ``latents``), through diffusers' own ``retrieve_latents``.
    """
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    # a list of generators draws item i of the batch from generator i (diffusers' randn_tensor)
    with vae_precision(vae, pixels.device):
        output = vae.encode(pixels.to(vae.dtype))
    dist = getattr(output, "latent_dist", None)
    if sample and dist is not None and _on_cpu(generator):
        # diffusers' own draws (``latent_dist.sample``: on the CPU, then moved), but moved to a CUDA device without
        # making the host wait for it (:func:`brushnet.devices.to_device`)
        from diffusers.utils.torch_utils import randn_tensor

        from ..devices import to_device

        noise = randn_tensor(dist.mean.shape, generator, torch.device("cpu"), dist.parameters.dtype)
        latents = dist.mean + dist.std * to_device(noise, dist.parameters.device)
    else:
        latents = retrieve_latents(output, generator, "sample" if sample else "argmax")
    return to_model_latents(vae, latents)


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE's per-channel latent mean and std (``latents_mean``/``latents_std`` in its config: Playground
    v2.5's SDXL-layout VAE has them, Stable Diffusion's do not) as ``like``'s dtype and device, or None."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, -1) + (1,) * (like.dim() - 2)
    return (
        torch.tensor(mean).view(shape).to(device=like.device, dtype=like.dtype),
        torch.tensor(std).view(shape).to(device=like.device, dtype=like.dtype),
    )


def to_model_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (its posterior's space) → the diffusion model's: ``z · scaling_factor``, or ``(z − mean) ·
    scaling_factor / std`` for a VAE with latent statistics, as diffusers' SDXL pipelines encode."""
    stats = _latent_stats(vae, latents)
    if stats is None:
        return latents * vae.config.scaling_factor
    mean, std = stats
    return (latents - mean) * vae.config.scaling_factor / std


def from_model_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_model_latents`: what ``vae.decode`` takes, in the VAE's dtype."""
    stats = _latent_stats(vae, latents)
    if stats is None:
        latents = latents / vae.config.scaling_factor
    else:
        mean, std = stats
        latents = latents * std / vae.config.scaling_factor + mean
    return latents.to(vae.dtype)


def _on_cpu(generator) -> bool:
    """Whether ``generator`` (one or a list) is a CPU generator."""
    generators = generator if isinstance(generator, list) else [generator]
    return bool(generators) and all(g is not None and g.device.type == "cpu" for g in generators)


def keep_mask_latent(hole: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The branch's keep-mask (1 = keep, 0 = hole) at latent ``size``, nearest-downsampled as the original."""
    return 1.0 - F.interpolate(hole.float(), size=tuple(size), mode="nearest")


def brushnet_conditioning(
    vae,
    image: torch.Tensor,
    hole: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sample: bool = True,
) -> torch.Tensor:
    """``brushnet_cond`` for ``image`` with ``hole``: masked-image latent (4) and keep-mask (1).

    Args:
        vae: the base model's VAE.
        image: ``(B, 3, H, W)`` in [−1, 1], whole or with the hole already blacked out.
        hole: ``(B, 1, H, W)``, 1 = hole (the project's convention).
        generator: for the posterior sample (one per item, or one for the batch).
        sample: posterior sample (True, the original) or mode.

    Returns:
        ``(B, 5, H/f, W/f)`` in the VAE's dtype.
    """
    latents = encode_latents(vae, mask_out(image, hole), generator, sample)
    keep = keep_mask_latent(hole.to(latents.device), latents.shape[-2:])
    return torch.cat([latents, keep.to(latents.dtype)], dim=1)
