"""What the SD1.5 and SDXL BrushNet pipelines share, written once.

- :func:`brushnet_keep_schedule`: the per-step on/off of the branch (``control_guidance_start/end``);
- :class:`BrushNetPipelineMixin`: the guidance properties, the input checks both pipelines make, image and
  mask preparation (the project's mask convention, 1 = hole), one denoising prediction (branch, then the
  stock UNet through :func:`~brushnet.models.unet_injection.unet_forward_with_brushnet`, with the
  classifier-free-guidance routing of the branch) and the final blending / post-processing.

The conditioning recipe itself lives in :mod:`brushnet.models.conditioning` and the blending in
:func:`brushnet.image.blend`; the pipelines only call them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..image import blend, mask_to_array
from ..models.unet_injection import unet_forward_with_brushnet

__all__ = ["BrushNetPipelineMixin", "brushnet_keep_schedule"]


def brushnet_keep_schedule(num_steps: int, start: float, end: float) -> list[float]:
    """Per-step multiplier of the conditioning scale: 0 where ``i/N < start`` or ``(i+1)/N > end``, else 1."""
    return [0.0 if (i / num_steps < start or (i + 1) / num_steps > end) else 1.0 for i in range(num_steps)]


class BrushNetPipelineMixin:
    """Parts of a BrushNet pipeline that do not depend on the base model family.

    The pipeline provides ``self.unet``, ``self.brushnet``, ``self.image_processor``, ``self.vae_scale_factor``
    and ``self._callback_tensor_inputs``, and sets ``self._guidance_scale`` etc. at the start of ``__call__``.
    """

    # -- properties, as in diffusers' pipelines ------------------------------------------------------
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # -------------------------------------------------------------------------------------------------
    def _check_brushnet_inputs(
        self,
        image,
        mask_image,
        height,
        width,
        brushnet_conditioning_scale,
        control_guidance_start,
        control_guidance_end,
        callback_on_step_end_tensor_inputs,
        output_type,
        blending,
    ) -> None:
        """The checks every BrushNet pipeline makes besides its own text checks."""
        if image is None or mask_image is None:
            raise ValueError("both `image` and `mask_image` are required")
        if height is not None and height % self.vae_scale_factor != 0:
            raise ValueError(f"`height` must be a multiple of {self.vae_scale_factor}, got {height}")
        if width is not None and width % self.vae_scale_factor != 0:
            raise ValueError(f"`width` must be a multiple of {self.vae_scale_factor}, got {width}")
        if not isinstance(brushnet_conditioning_scale, (int, float)):
            raise TypeError("`brushnet_conditioning_scale` must be a number")
        if not 0.0 <= control_guidance_start < control_guidance_end <= 1.0:
            raise ValueError(
                "need 0 <= control_guidance_start < control_guidance_end <= 1, got "
                f"{control_guidance_start} and {control_guidance_end}"
            )
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"callback tensor inputs {unknown} are not among {self._callback_tensor_inputs}"
                )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if blending and output_type == "latent":
            raise ValueError(
                "`blending` works on decoded images; it cannot be used with output_type='latent'"
            )

    def _prepare_mask(
        self, mask_image, batch_size: int, height: int, width: int, device, dtype
    ) -> torch.Tensor:
        """Masks (white = inpaint) → float ``(B, 1, height, width)``, 1 = hole."""
        masks = mask_image if isinstance(mask_image, list) else [mask_image]
        if isinstance(mask_image, torch.Tensor) and mask_image.ndim == 4 and mask_image.shape[0] > 1:
            masks = list(mask_image)
        tensors = []
        for mask in masks:
            hole = torch.from_numpy(mask_to_array(mask).astype("float32"))[None, None]
            if hole.shape[-2:] != (height, width):
                hole = F.interpolate(hole, size=(height, width), mode="bilinear", align_corners=False) >= 0.5
                hole = hole.float()
            tensors.append(hole)
        hole = torch.cat(tensors)
        if hole.shape[0] == 1:
            hole = hole.expand(batch_size, -1, -1, -1)
        elif hole.shape[0] != batch_size:
            raise ValueError(f"got {hole.shape[0]} masks for a batch of {batch_size} prompts")
        return hole.to(device=device, dtype=dtype)

    def _prepare_image_and_mask(
        self, image, mask_image, height, width, batch_size: int, num_images_per_prompt: int, device
    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The image in [-1, 1] and the hole (1 = hole) at ``height × width``, one per generated image.

        ``height``/``width`` default to the image size rounded down to a multiple of the VAE factor.

        Returns:
            ``(image (B·n, 3, H, W) float32, hole (B·n, 1, H, W) float32, height, width)``.
        """
        total = batch_size * num_images_per_prompt
        height, width = self.image_processor.get_default_height_width(
            image[0] if isinstance(image, list) else image, height, width
        )
        image_tensor = self.image_processor.preprocess(image, height=height, width=width)
        image_tensor = image_tensor.to(device=device, dtype=torch.float32)
        if image_tensor.shape[0] == 1:
            image_tensor = image_tensor.expand(total, -1, -1, -1)
        elif image_tensor.shape[0] == batch_size:
            image_tensor = image_tensor.repeat_interleave(num_images_per_prompt, dim=0)
        else:
            raise ValueError(f"got {image_tensor.shape[0]} images for a batch of {batch_size} prompts")
        hole = self._prepare_mask(mask_image, batch_size, height, width, device, torch.float32)
        hole = hole.repeat_interleave(num_images_per_prompt, dim=0) if hole.shape[0] != total else hole
        return image_tensor, hole, height, width

    def _predict_noise(
        self,
        latent_model_input: torch.Tensor,
        t,
        prompt_embeds: torch.Tensor,
        brushnet_cond: torch.Tensor,
        conditioning_scale: float,
        guess_mode: bool,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        timestep_cond: torch.Tensor | None = None,
        brushnet_prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One UNet prediction with the branch's residuals added in-line.

        With classifier-free guidance (inputs are the doubled batch, unconditional half first) the branch runs:

        - on the doubled batch when its residuals depend on the text (``brushnet.uses_text``: the SDXL branch
          reads the pooled text through its ``add_embedding``, PowerPaint's through cross-attention), as the
          originals do;
        - once, on the conditional half, when they do not (SD1.5): both halves would get identical
          residuals, so they are computed once and repeated;
        - once, on the conditional half, with ``guess_mode``; the unconditional half then gets no residuals.

        Args:
            latent_model_input: the scheduler-scaled latents, ``(B, 4, h, w)`` or ``(2B, 4, h, w)`` with CFG.
            t: the timestep.
            prompt_embeds: text embeddings matching ``latent_model_input``'s batch.
            brushnet_cond: ``(B, 5, h, w)`` (un-doubled).
            conditioning_scale: the branch's scale at this step.
            guess_mode: ControlNet-style guess mode.
            added_cond_kwargs: SDXL's ``{"text_embeds", "time_ids"}`` matching ``latent_model_input``'s batch.
            timestep_cond: the UNet's guidance embedding, if any.
            brushnet_prompt_embeds: the branch's own text embeddings (PowerPaint: its own text encoder),
                batched like ``prompt_embeds``; ``None``: the branch reads ``prompt_embeds``.

        Returns:
            The UNet's prediction for ``latent_model_input`` (guidance not yet applied).
        """
        cfg = self.do_classifier_free_guidance
        on_doubled_batch = cfg and self.brushnet.uses_text and not guess_mode
        branch_text = prompt_embeds if brushnet_prompt_embeds is None else brushnet_prompt_embeds
        if cfg and not on_doubled_batch:  # the conditional half only
            branch_input = latent_model_input.chunk(2)[1]
            branch_text = branch_text.chunk(2)[1]
            branch_added = (
                {k: v.chunk(2)[1] for k, v in added_cond_kwargs.items()} if added_cond_kwargs else None
            )
        else:
            branch_input, branch_added = latent_model_input, added_cond_kwargs
        branch_cond = torch.cat([brushnet_cond] * 2) if on_doubled_batch else brushnet_cond

        dtype = self.brushnet.dtype
        down, mid, up = self.brushnet(
            branch_input.to(dtype),
            t,
            encoder_hidden_states=branch_text.to(dtype),
            brushnet_cond=branch_cond.to(dtype),
            conditioning_scale=conditioning_scale,
            guess_mode=guess_mode,
            added_cond_kwargs={k: v.to(dtype) for k, v in branch_added.items()} if branch_added else None,
            return_dict=False,
        )
        if cfg and not on_doubled_batch:
            # both halves get the same residuals; in guess mode the unconditional half gets none

            def expand(r):
                return torch.cat([torch.zeros_like(r) if guess_mode else r, r])

            down, mid, up = [expand(r) for r in down], expand(mid), [expand(r) for r in up]

        unet_dtype = self.unet.dtype
        return unet_forward_with_brushnet(
            self.unet,
            latent_model_input.to(unet_dtype),
            t,
            prompt_embeds.to(unet_dtype),
            [r.to(unet_dtype) for r in down],
            mid.to(unet_dtype),
            [r.to(unet_dtype) for r in up],
            timestep_cond=timestep_cond,
            cross_attention_kwargs=self.cross_attention_kwargs,
            added_cond_kwargs=(
                {k: v.to(unet_dtype) for k, v in added_cond_kwargs.items()} if added_cond_kwargs else None
            ),
        )

    def _postprocess(
        self,
        decoded: torch.Tensor,
        image_tensor: torch.Tensor,
        hole: torch.Tensor,
        output_type: str,
        blending: bool,
        blending_kernel_size: int,
    ):
        """Decoded images in [-1, 1] → the requested output type, blended into the input if asked.

        Args:
            decoded: the VAE's output ``(B, 3, H, W)`` in [-1, 1].
            image_tensor: the preprocessed input ``(B, 3, H, W)`` in [-1, 1].
            hole: ``(B, 1, H, W)``, 1 = hole.
        """
        images = (decoded.float() / 2 + 0.5).clamp(0, 1)
        if blending:
            original = (image_tensor.float() / 2 + 0.5).clamp(0, 1)
            images = blend(original, images, hole, kernel_size=blending_kernel_size)
        return self.image_processor.postprocess(
            images, output_type=output_type, do_denormalize=[False] * images.shape[0]
        )
