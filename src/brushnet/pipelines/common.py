"""What the SD1.5 and SDXL BrushNet pipelines share, written once.

- :func:`brushnet_keep_schedule`: the per-step on/off of the branch (``control_guidance_start/end``);
- :class:`BrushNetPipelineMixin`: the guidance properties, the input checks both pipelines make, image and
  mask preparation (the project's mask convention, 1 = hole; every batch format diffusers documents;
  ``padding_mask_crop``), the control images of an optional ControlNet, the start latents for ``strength``,
  one denoising prediction (branch, optional ControlNet, then the stock UNet through
  :func:`~brushnet.models.unet_injection.run_unet_with_brushnet`, so offload hooks and ``torch.compile``
  apply; IP-Adapter image embeddings reach the UNet), and the final blending / post-processing.

The conditioning recipe itself lives in :mod:`brushnet.models.conditioning` and the blending in
:func:`brushnet.image.blend`; the pipelines only call them.
"""

from __future__ import annotations

import PIL.Image
import torch
import torch.nn.functional as F

from ..image import blend, mask_batch, mask_to_array
from ..models.unet_injection import run_unet_with_brushnet

__all__ = ["BrushNetPipelineMixin", "brushnet_keep_schedule", "controlnet_keep_schedule"]


def brushnet_keep_schedule(num_steps: int, start: float, end: float) -> list[float]:
    """Per-step multiplier of the conditioning scale: 0 where ``i/N < start`` or ``(i+1)/N > end``, else 1."""
    return [0.0 if (i / num_steps < start or (i + 1) / num_steps > end) else 1.0 for i in range(num_steps)]


def controlnet_keep_schedule(
    num_steps: int, start: float | list[float], end: float | list[float]
) -> list[float | list[float]]:
    """:func:`brushnet_keep_schedule` for one ControlNet (floats) or several (lists, one entry per net)."""
    if isinstance(start, (list, tuple)):
        per_net = [brushnet_keep_schedule(num_steps, s, e) for s, e in zip(start, end)]
        return [[keep[i] for keep in per_net] for i in range(num_steps)]
    return brushnet_keep_schedule(num_steps, start, end)


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

    def _make_image_processors(self, vae) -> None:
        """``vae_scale_factor`` and the image, mask and control-image processors (as diffusers' inpaint
        pipelines: masks binarised at 0.5, control images in [0, 1])."""
        from diffusers.image_processor import VaeImageProcessor

        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )

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
        strength: float = 1.0,
        padding_mask_crop: int | None = None,
    ) -> None:
        """The checks every BrushNet pipeline makes besides its own text checks."""
        if image is None or mask_image is None:
            raise ValueError("both `image` and `mask_image` are required")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"`strength` must be in (0, 1], got {strength}")
        if padding_mask_crop is not None:
            if not isinstance(image, PIL.Image.Image):
                raise ValueError(f"`padding_mask_crop` needs one PIL image, got {type(image).__name__}")
            if len(mask_batch(mask_image)) != 1:
                raise ValueError("`padding_mask_crop` needs one mask")
            if output_type != "pil":
                raise ValueError(
                    f"`padding_mask_crop` pastes into the input: output_type must be 'pil', got {output_type!r}"
                )
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
        self, mask_image, batch_size: int, height: int, width: int, device, dtype, crops_coords=None
    ) -> torch.Tensor:
        """Masks (white = inpaint; any of :func:`~brushnet.image.mask_batch`'s formats, one per item or one for
        all) → float ``(B, 1, height, width)``, 1 = hole. With ``crops_coords`` (``padding_mask_crop``) the one
        mask is cropped and resized as diffusers' inpaint pipelines do with the image."""
        if crops_coords is not None:
            mask = PIL.Image.fromarray(mask_to_array(mask_batch(mask_image)[0]).astype("uint8") * 255)
            hole = self.mask_processor.preprocess(
                mask, height=height, width=width, resize_mode="fill", crops_coords=crops_coords
            )
            return hole.expand(batch_size, -1, -1, -1).to(device=device, dtype=dtype)
        tensors = []
        for mask in mask_batch(mask_image):
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
        self,
        image,
        mask_image,
        height,
        width,
        batch_size: int,
        num_images_per_prompt: int,
        device,
        padding_mask_crop: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int, int, tuple[int, int, int, int] | None]:
        """The image in [-1, 1] and the hole (1 = hole) at ``height × width``, one per generated image.

        ``height``/``width`` default to the image size rounded down to a multiple of the VAE factor. With
        ``padding_mask_crop`` the model sees the mask's bounding box grown by that many pixels (and widened to
        the output's aspect ratio), resized to ``height × width``, as in diffusers' inpaint pipelines.

        Returns:
            ``(image (B·n, 3, H, W) float32, hole (B·n, 1, H, W) float32, height, width, crop box or None)``.
        """
        total = batch_size * num_images_per_prompt
        height, width = self.image_processor.get_default_height_width(
            image[0] if isinstance(image, list) else image, height, width
        )
        crops_coords, resize_mode = None, "default"
        if padding_mask_crop is not None:
            mask = PIL.Image.fromarray(mask_to_array(mask_batch(mask_image)[0]).astype("uint8") * 255)
            crops_coords = self.mask_processor.get_crop_region(mask, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        image_tensor = self.image_processor.preprocess(
            image, height=height, width=width, crops_coords=crops_coords, resize_mode=resize_mode
        )
        image_tensor = image_tensor.to(device=device, dtype=torch.float32)
        if image_tensor.shape[0] == 1:
            image_tensor = image_tensor.expand(total, -1, -1, -1)
        elif image_tensor.shape[0] == batch_size:
            image_tensor = image_tensor.repeat_interleave(num_images_per_prompt, dim=0)
        else:
            raise ValueError(f"got {image_tensor.shape[0]} images for a batch of {batch_size} prompts")
        hole = self._prepare_mask(
            mask_image, batch_size, height, width, device, torch.float32, crops_coords=crops_coords
        )
        hole = hole.repeat_interleave(num_images_per_prompt, dim=0) if hole.shape[0] != total else hole
        return image_tensor, hole, height, width, crops_coords

    def _prepare_control_images(
        self, control_image, height: int, width: int, batch_size: int, num_images_per_prompt: int, device
    ) -> list[torch.Tensor]:
        """The ControlNet conditioning images in [0, 1], ``(B·n, 3, H, W)`` each, one per ControlNet.

        With several ControlNets, ``control_image`` is a list with one entry per net (each an image or a batch);
        with one, it is an image or a batch (one for all prompts or one per prompt).
        """
        nets = self._controlnets()
        if control_image is None:
            raise ValueError("this pipeline has a ControlNet: pass `control_image`")
        images = control_image if len(nets) > 1 else [control_image]
        if len(nets) > 1 and (not isinstance(control_image, (list, tuple)) or len(images) != len(nets)):
            raise ValueError(f"with {len(nets)} ControlNets pass a list of {len(nets)} control images")
        total = batch_size * num_images_per_prompt
        prepared = []
        for image, net in zip(images, nets):
            tensor = self.control_image_processor.preprocess(image, height=height, width=width)
            tensor = tensor.to(device=device, dtype=net.dtype)
            if tensor.shape[0] == 1:
                tensor = tensor.expand(total, -1, -1, -1)
            elif tensor.shape[0] == batch_size:
                tensor = tensor.repeat_interleave(num_images_per_prompt, dim=0)
            elif tensor.shape[0] != total:
                raise ValueError(f"got {tensor.shape[0]} control images for a batch of {batch_size} prompts")
            prepared.append(tensor)
        return prepared

    def _controlnets(self) -> list:
        """The ControlNets steering the UNet (none, one, or the members of a ``MultiControlNetModel``)."""
        controlnet = getattr(self, "controlnet", None)
        if controlnet is None:
            return []
        return list(getattr(controlnet, "nets", [controlnet]))

    def _check_controlnet_inputs(
        self, control_image, controlnet_conditioning_scale, controlnet_guidance_start, controlnet_guidance_end
    ) -> None:
        """``control_image`` and the ControlNet scale and window: one value per net, windows ordered."""
        nets = self._controlnets()
        if not nets:
            if control_image is not None:
                raise ValueError("`control_image` given but the pipeline has no `controlnet`")
            return
        if control_image is None:
            raise ValueError("this pipeline has a ControlNet: pass `control_image`")
        for name, value in (
            ("controlnet_conditioning_scale", controlnet_conditioning_scale),
            ("controlnet_guidance_start", controlnet_guidance_start),
            ("controlnet_guidance_end", controlnet_guidance_end),
        ):
            if isinstance(value, (list, tuple)) and len(value) != len(nets):
                raise ValueError(f"`{name}` has {len(value)} entries for {len(nets)} ControlNets")
        starts = (
            controlnet_guidance_start
            if isinstance(controlnet_guidance_start, (list, tuple))
            else [controlnet_guidance_start]
        )
        ends = (
            controlnet_guidance_end
            if isinstance(controlnet_guidance_end, (list, tuple))
            else [controlnet_guidance_end]
        )
        for start, end in zip(starts, ends):
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(
                    f"need 0 <= controlnet_guidance_start < controlnet_guidance_end <= 1, got {start} and {end}"
                )

    def _controlnet_step_scales(
        self,
        num_steps: int,
        controlnet_conditioning_scale,
        controlnet_guidance_start,
        controlnet_guidance_end,
    ) -> list:
        """Per step: the ControlNet scale (a float with one net, a list with several), 0 outside its window."""
        n = len(self._controlnets())
        if n == 0:
            return [None] * num_steps
        if n > 1:
            scales = _per_net(controlnet_conditioning_scale, n)
            keep = controlnet_keep_schedule(
                num_steps, _per_net(controlnet_guidance_start, n), _per_net(controlnet_guidance_end, n)
            )
            return [[s * k for s, k in zip(scales, step)] for step in keep]
        keep = brushnet_keep_schedule(
            num_steps, _first(controlnet_guidance_start), _first(controlnet_guidance_end)
        )
        return [_first(controlnet_conditioning_scale) * k for k in keep]

    def _start_latents(
        self, latents, image_tensor, timestep, strength: float, shape, dtype, device, generator
    ) -> torch.Tensor:
        """Start latents: pure noise at ``strength == 1`` (``prepare_latents``, the goldens' path); below it the
        input's VAE latents noised to the first kept timestep, so the hole starts from the input (diffusers'
        inpaint ``strength``). Given ``latents`` are the noise."""
        if strength >= 1.0:
            return self.prepare_latents(*shape, dtype, device, generator, latents)
        from diffusers.utils.torch_utils import randn_tensor

        from ..models.conditioning import encode_latents

        batch, channels, height, width = shape
        latent_shape = (batch, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = (
            latents
            if latents is not None
            else randn_tensor(latent_shape, generator, device=device, dtype=dtype)
        )
        image_latents = encode_latents(self.vae, image_tensor, generator).to(device=device, dtype=dtype)
        return self.scheduler.add_noise(
            image_latents, noise.to(device=device, dtype=dtype), timestep.repeat(batch)
        )

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
        image_embeds: list[torch.Tensor] | None = None,
        control_images: list[torch.Tensor] | None = None,
        controlnet_scale: float | list[float] | None = None,
    ) -> torch.Tensor:
        """One UNet prediction with the branch's residuals added in-line (and a ControlNet's on the skips).

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
            image_embeds: IP-Adapter image embeddings (one tensor per adapter, batched like
                ``prompt_embeds``); the UNet reads them through its ``encoder_hid_proj``, the branch does not.
            control_images: the ControlNets' conditioning images ``(B, 3, H, W)`` (un-doubled), one per net.
            controlnet_scale: the ControlNets' scale at this step (a list with several nets); 0 skips them.

        Returns:
            The UNet's prediction for ``latent_model_input`` (guidance not yet applied).
        """
        cfg = self.do_classifier_free_guidance
        on_doubled_batch = cfg and self.brushnet.uses_text and not guess_mode
        if not cfg and prompt_embeds.shape[0] == 2 * latent_model_input.shape[0]:
            # guidance was switched off mid-loop (CFG-cutoff callbacks): keep the conditional halves
            prompt_embeds = prompt_embeds.chunk(2)[1]
        branch_text = prompt_embeds if brushnet_prompt_embeds is None else brushnet_prompt_embeds
        if not cfg and branch_text.shape[0] == 2 * latent_model_input.shape[0]:
            branch_text = branch_text.chunk(2)[1]
        if (
            image_embeds is not None
            and not cfg
            and image_embeds[0].shape[0] == 2 * latent_model_input.shape[0]
        ):
            image_embeds = [e.chunk(2)[1] for e in image_embeds]
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
        control_down = control_mid = None
        if control_images is not None and any(s != 0 for s in _as_list(controlnet_scale)):
            control_down, control_mid = self._controlnet_residuals(
                latent_model_input,
                t,
                prompt_embeds,
                control_images,
                controlnet_scale,
                guess_mode,
                added_cond_kwargs,
            )
            control_down = [r.to(unet_dtype) for r in control_down]
            control_mid = control_mid.to(unet_dtype)
        unet_added = {k: v.to(unet_dtype) for k, v in added_cond_kwargs.items()} if added_cond_kwargs else {}
        if image_embeds is not None:
            unet_added["image_embeds"] = [e.to(unet_dtype) for e in image_embeds]
        return run_unet_with_brushnet(
            self.unet,
            latent_model_input.to(unet_dtype),
            t,
            prompt_embeds.to(unet_dtype),
            [r.to(unet_dtype) for r in down],
            mid.to(unet_dtype),
            [r.to(unet_dtype) for r in up],
            timestep_cond=timestep_cond,
            cross_attention_kwargs=self.cross_attention_kwargs,
            added_cond_kwargs=unet_added or None,
            down_block_additional_residuals=control_down,
            mid_block_additional_residual=control_mid,
        )

    def _controlnet_residuals(
        self, latent_model_input, t, prompt_embeds, control_images, scale, guess_mode, added_cond_kwargs
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The ControlNets' skip and mid residuals, summed over nets, batched like ``latent_model_input``.

        Under classifier-free guidance they run on the doubled batch (they read the text), or, in guess mode,
        on the conditional half only, the unconditional half getting none (as diffusers' ControlNet pipelines).
        """
        cfg = self.do_classifier_free_guidance
        conditional_only = cfg and guess_mode
        net_input, net_text, net_added = latent_model_input, prompt_embeds, added_cond_kwargs
        if conditional_only:
            net_input, net_text = latent_model_input.chunk(2)[1], prompt_embeds.chunk(2)[1]
            net_added = (
                {k: v.chunk(2)[1] for k, v in added_cond_kwargs.items()} if added_cond_kwargs else None
            )
        batch = net_input.shape[0]
        dtype = self.controlnet.dtype
        images = [
            img if img.shape[0] == batch else torch.cat([img] * (batch // img.shape[0]))
            for img in control_images
        ]
        controlnet_kwargs = dict(
            encoder_hidden_states=net_text.to(dtype),
            guess_mode=guess_mode,
            added_cond_kwargs={k: v.to(dtype) for k, v in net_added.items()} if net_added else None,
            return_dict=False,
        )
        if len(images) == 1 and not isinstance(scale, (list, tuple)):
            down, mid = self.controlnet(
                net_input.to(dtype),
                t,
                controlnet_cond=images[0],
                conditioning_scale=scale,
                **controlnet_kwargs,
            )
        else:
            down, mid = self.controlnet(
                net_input.to(dtype),
                t,
                controlnet_cond=images,
                conditioning_scale=list(scale),
                **controlnet_kwargs,
            )
        if conditional_only:
            down = [torch.cat([torch.zeros_like(r), r]) for r in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return list(down), mid

    def _postprocess(
        self,
        decoded: torch.Tensor,
        image_tensor: torch.Tensor,
        hole: torch.Tensor,
        output_type: str,
        blending: bool,
        blending_kernel_size: int,
        has_nsfw: list[bool] | None = None,
    ):
        """Decoded images in [-1, 1] → the requested output type, blended into the input if asked.

        Args:
            decoded: the VAE's output ``(B, 3, H, W)`` in [-1, 1].
            image_tensor: the preprocessed input ``(B, 3, H, W)`` in [-1, 1].
            hole: ``(B, 1, H, W)``, 1 = hole.
            has_nsfw: the safety checker's flags; a flagged image comes out black (as in diffusers), unblended.
        """
        images = (decoded.float() / 2 + 0.5).clamp(0, 1)
        if blending:
            original = (image_tensor.float() / 2 + 0.5).clamp(0, 1)
            images = blend(original, images, hole, kernel_size=blending_kernel_size)
        if has_nsfw is not None and any(has_nsfw):
            flagged = torch.tensor(has_nsfw, device=images.device).view(-1, 1, 1, 1)
            images = torch.where(flagged, torch.zeros_like(images), images)
        return self.image_processor.postprocess(
            images, output_type=output_type, do_denormalize=[False] * images.shape[0]
        )

    def _paste_crops(self, images, image, mask_image, crops_coords):
        """``padding_mask_crop``: paste each generated crop back into the full input (diffusers' overlay)."""
        if crops_coords is None:
            return images
        mask = PIL.Image.fromarray(mask_to_array(mask_batch(mask_image)[0]).astype("uint8") * 255)
        return [
            self.image_processor.apply_overlay(mask, image, generated, crops_coords) for generated in images
        ]


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _per_net(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
