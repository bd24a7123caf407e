"""Stable Diffusion XL + BrushNet inpainting pipeline on upstream diffusers.

A drop-in for the original ``StableDiffusionXLBrushNetPipeline`` (same component names, same call
``pipe(prompt=..., image=..., mask=..., ...)``, same outputs to ~1e-6 on the reference goldens), with these
differences:

- the image may be passed whole or with the hole already blacked out: the pipeline blacks it out itself;
- with an fp16 VAE whose config sets ``force_upcast`` (the stock SDXL VAE), the VAE runs in float32 for the
  masked-image encoding as well as for decoding (the original upcast for decoding only, so its fp16
  conditioning could overflow; it advised the fp16-fix VAE instead, which also works here);
- ``guidance_rescale``, custom ``timesteps``/``sigmas`` and optional blurred-mask paste-back
  (``blending=True``; off by default for parity);
- negative size conditioning pairs with the right half of every batch (diffusers repeats the stacked
  ``[negative, positive]`` time ids, which mismatches them for batches of more than one image);
- unknown keyword arguments are an error; no invisible watermark;
- the VAE posterior sample of the masked image is drawn from ``generator`` (the original drew it from the
  global RNG).

The SDXL branch reads the pooled text through its ``add_embedding``, so with classifier-free guidance it runs
on the doubled batch (one pass per step, both halves), as the original does.

It composes with diffusers as the SD1.5 pipeline does (docs/composing.md): LoRA, textual inversion, IP-Adapter,
an optional SDXL ``controlnet``, offloading, ``torch.compile`` and ``pipe.compile()`` (docs/speed.md), ``strength``,
``padding_mask_crop``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionXLLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.models import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, StableDiffusionMixin
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ..loading import FAMILY_NAMES, CheckpointError, check_brushnet_fits_base, detect_family
from ..models.brushnet import BrushNetModel
from ..models.conditioning import from_model_latents, vae_in_float32
from .common import (
    BrushNetPipelineMixin,
    CheckedSourceMixin,
    check_branch_window,
    check_finite,
    check_pair,
    check_prompt,
    check_single_file_components,
    warn_unused_negative,
)

__all__ = ["StableDiffusionXLBrushNetPipeline"]


class StableDiffusionXLBrushNetPipeline(
    CheckedSourceMixin,
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
    IPAdapterMixin,
    FromSingleFileMixin,
    BrushNetPipelineMixin,
):
    r"""Text-guided inpainting with Stable Diffusion XL and a BrushNet branch.

    Args:
        vae: the base model's VAE. SDXL's VAE overflows in float16: with ``force_upcast`` in its config it runs
            in float32 inside an fp16 pipeline; an fp16-fixed VAE (``force_upcast`` False) runs in fp16.
        text_encoder: the first text encoder (``CLIPTextModel``, CLIP ViT-L).
        text_encoder_2: the second text encoder (``CLIPTextModelWithProjection``, OpenCLIP ViT-bigG); its
            projection gives the pooled text embedding.
        tokenizer, tokenizer_2: their tokenizers.
        unet: the frozen base ``UNet2DConditionModel`` (any SDXL community model); never modified.
        brushnet: an SDXL :class:`~brushnet.models.BrushNetModel` (``addition_embed_type="text_time"``).
        scheduler: any diffusers scheduler.
        image_encoder, feature_extractor: optional CLIP vision model and processor for IP-Adapter images.
        force_zeros_for_empty_prompt: without a negative prompt, the unconditional embeddings are zeros
            (SDXL's convention; the original built its pipeline with True).
        controlnet: optional SDXL ``ControlNetModel`` (or a list / ``MultiControlNetModel``) steering what fills
            the hole through ``control_image``.
    """

    # the branch and a ControlNet run every step: they stay out of the chain (see the SD1.5 pipeline)
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae"
    _optional_components = [
        "tokenizer",
        "tokenizer_2",
        "text_encoder",
        "text_encoder_2",
        "image_encoder",
        "feature_extractor",
        "controlnet",
    ]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]

    # Public helpers of diffusers' own SDXL pipeline, reused as they are (they only read the components).
    encode_prompt = StableDiffusionXLPipeline.encode_prompt
    prepare_extra_step_kwargs = StableDiffusionXLPipeline.prepare_extra_step_kwargs
    prepare_latents = StableDiffusionXLPipeline.prepare_latents
    _get_add_time_ids = StableDiffusionXLPipeline._get_add_time_ids
    get_guidance_scale_embedding = StableDiffusionXLPipeline.get_guidance_scale_embedding
    encode_image = StableDiffusionXLPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionXLPipeline.prepare_ip_adapter_image_embeds
    get_timesteps = StableDiffusionXLImg2ImgPipeline.get_timesteps

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        brushnet: BrushNetModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        force_zeros_for_empty_prompt: bool = True,
        controlnet: ControlNetModel | list[ControlNetModel] | MultiControlNetModel | None = None,
    ):
        super().__init__()
        if brushnet is not None and not isinstance(brushnet, BrushNetModel):
            raise TypeError(f"brushnet must be a BrushNetModel, got {type(brushnet).__name__}")
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        if unet is not None:
            if brushnet is not None:
                check_brushnet_fits_base(brushnet.config, unet.config)
            family = detect_family(unet.config)
            if family != "sdxl":
                raise CheckpointError(
                    f"StableDiffusionXLBrushNetPipeline needs an SDXL base; this one is {FAMILY_NAMES[family]} "
                    "(use StableDiffusionBrushNetPipeline)"
                )
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            brushnet=brushnet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            controlnet=controlnet,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self._make_image_processors(vae)

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, **kwargs):
        """diffusers' ``from_single_file`` (every argument the same). The checkpoint holds the base model only: pass
        ``brushnet=BrushNetModel.from_pretrained(...)`` (a one-line error without it)."""
        check_single_file_components(cls, kwargs)
        return super().from_single_file(pretrained_model_link_or_path, **kwargs)

    # -- properties beyond the shared ones -------------------------------------------------------------
    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def denoising_end(self) -> float | None:
        return self._denoising_end

    def _step_inputs(self, tensors):
        """The UNet's and branch's inputs per step: the text and SDXL's added conditions (pooled text, size ids)."""
        return {
            "prompt_embeds": tensors["prompt_embeds"],
            "added_cond_kwargs": {
                "text_embeds": tensors["add_text_embeds"],
                "time_ids": tensors["add_time_ids"],
            },
        }

    def _vae_in_float32(self):
        """:func:`~brushnet.models.conditioning.vae_in_float32` on this pipeline's VAE: float32 when it is float16
        and overflows there (``force_upcast``), as diffusers' SDXL pipelines do."""
        return vae_in_float32(self.vae, self._execution_device)

    def check_inputs(
        self,
        prompt,
        prompt_2,
        image,
        mask_image,
        height,
        width,
        negative_prompt,
        negative_prompt_2,
        prompt_embeds,
        negative_prompt_embeds,
        pooled_prompt_embeds,
        negative_pooled_prompt_embeds,
        brushnet_conditioning_scale,
        control_guidance_start,
        control_guidance_end,
        callback_on_step_end_tensor_inputs,
        output_type,
        blending,
        strength: float = 1.0,
        padding_mask_crop: int | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
        negative_original_size=None,
        negative_crops_coords_top_left=(0, 0),
        negative_target_size=None,
    ) -> None:
        # before the image check: `pipe(prompt, image, mask)` puts the image here (the original's positional order)
        items = prompt_2 if isinstance(prompt_2, list) else [prompt_2]
        images = [i for i in items if isinstance(i, (PIL.Image.Image, np.ndarray, torch.Tensor))]
        if images:
            raise ValueError(
                f"`prompt_2` got an image ({type(images[0]).__name__}): the positional order is (prompt, prompt_2, "
                "image, mask_image); pass image= and mask_image= by keyword"
            )
        check_prompt("prompt_2", prompt_2)
        self._check_brushnet_inputs(
            image, mask_image, height, width, brushnet_conditioning_scale, control_guidance_start,
            control_guidance_end, callback_on_step_end_tensor_inputs, output_type, blending, strength,
            padding_mask_crop, ip_adapter_image, ip_adapter_image_embeds,
        )  # fmt: skip
        if prompt_embeds is not None and (prompt is not None or prompt_2 is not None):
            raise ValueError("pass either `prompt`/`prompt_2` or `prompt_embeds`, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass `prompt` or `prompt_embeds`")
        check_prompt("prompt", prompt)
        batch_size = self._batch_size(prompt, prompt_embeds)
        for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
            if isinstance(value, list) and len(value) != batch_size:
                raise ValueError(
                    f"`{name}` has {len(value)} prompt(s) for a batch of {batch_size}: pass one per prompt (or a str)"
                )
        if negative_prompt_embeds is not None and (
            negative_prompt is not None or negative_prompt_2 is not None
        ):
            raise ValueError(
                "pass either `negative_prompt`/`negative_prompt_2` or `negative_prompt_embeds`, not both"
            )
        self._check_embeds_match(prompt_embeds, negative_prompt_embeds)
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError(
                "with `prompt_embeds`, pass `pooled_prompt_embeds` too (text_encoder_2's projection)"
            )
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("with `negative_prompt_embeds`, pass `negative_pooled_prompt_embeds` too")
        for name, value, what in (
            ("original_size", original_size, "(height, width)"),
            ("crops_coords_top_left", crops_coords_top_left, "(top, left)"),
            ("target_size", target_size, "(height, width)"),
            ("negative_original_size", negative_original_size, "(height, width)"),
            ("negative_crops_coords_top_left", negative_crops_coords_top_left, "(top, left)"),
            ("negative_target_size", negative_target_size, "(height, width)"),
        ):
            # the sizes default to the output size; the crops have no such default
            if value is not None or "crops" in name:
                check_pair(name, value, what)
        # the negative time ids are made only from both negative sizes (as diffusers does): one alone, or a negative
        # crop without them, was dropped without a word
        if (negative_original_size is None) != (negative_target_size is None):
            given = "negative_original_size" if negative_original_size is not None else "negative_target_size"
            raise ValueError(
                f"`{given}` alone has no effect: pass `negative_original_size` and `negative_target_size` together"
            )
        if negative_original_size is None and tuple(negative_crops_coords_top_left) != (0, 0):
            raise ValueError(
                "`negative_crops_coords_top_left` has no effect without `negative_original_size` and "
                "`negative_target_size`: pass both sizes too"
            )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        brushnet_conditioning_scale: float = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_rescale: float = 0.0,
        blending: bool = False,
        blending_kernel_size: int = 21,
        mask: PipelineImageInput = None,
        strength: float = 1.0,
        padding_mask_crop: int | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        control_image: PipelineImageInput | list[PipelineImageInput] | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        controlnet_guidance_start: float | list[float] = 0.0,
        controlnet_guidance_end: float | list[float] = 1.0,
        pag_scale: float = 0.0,
        pag_adaptive_scale: float = 0.0,
        callback: Callable | None = None,
        callback_steps: int = 1,
    ):
        r"""Inpaint ``image`` where ``mask_image`` is white.

        The positional order of the first arguments is the original pipeline's (``prompt, prompt_2, image,
        mask, ...``); its keyword ``mask`` is accepted as an alias of ``mask_image``.

        Args:
            prompt, prompt_2: what to paint in the hole; ``prompt_2`` goes to ``text_encoder_2`` (default:
                ``prompt``).
            image: the image in diffusers' formats (PIL; float numpy ``(H, W, 3)`` / ``(B, H, W, 3)`` in [0, 1];
                tensor ``(3, H, W)`` / ``(B, 3, H, W)`` in [0, 1] or [-1, 1]; a list of them); whole or with the
                hole blacked out.
            mask_image: the mask, **white = inpaint** (PIL of any mode, array or tensor in [0, 1]).
            height, width: output size, multiples of the VAE factor; default the image size rounded down.
            num_inference_steps, timesteps, sigmas: the denoising schedule (custom lists as in diffusers).
            denoising_end: stop after this fraction of the schedule (for an SDXL refiner), as in diffusers.
            guidance_scale: classifier-free guidance weight (off at ≤ 1; the original's default 5.0).
            negative_prompt, negative_prompt_2: what not to paint; without either, zeros when the pipeline's
                ``force_zeros_for_empty_prompt`` is set; ``negative_prompt_2`` alone is text_encoder_2's negative,
                with ``""`` for the first encoder (diffusers' SDXL pipelines drop it).
            prompt_embeds, negative_prompt_embeds: ``(B, 77, D₁ + D₂)`` concatenated penultimate hidden states
                of the two text encoders.
            pooled_prompt_embeds, negative_pooled_prompt_embeds: ``(B, D_proj)`` pooled text of
                ``text_encoder_2``.
            clip_skip: skip this many more final layers of both text encoders (SDXL already takes the
                penultimate one).
            num_images_per_prompt, eta, generator, latents: sampling (noise from a CPU generator is
                reproducible across devices).
            output_type: "pil", "np", "pt" or "latent".
            cross_attention_kwargs: passed to the attention processors (``{"scale": s}`` scales LoRA).
            brushnet_conditioning_scale: the preservation scale (strength of the branch).
            guess_mode: ControlNet-style guess mode: a log-spaced ramp of scales; with CFG the branch only
                conditions the text half.
            control_guidance_start, control_guidance_end: fractions of the steps during which the branch is on
                (a one-element list, diffusers' per-net form, counts as its number).
            original_size, crops_coords_top_left, target_size: SDXL's size and crop conditioning, ``(h, w)``
                and ``(top, left)``; sizes default to ``(height, width)``, the crop to ``(0, 0)``.
            negative_original_size, negative_crops_coords_top_left, negative_target_size: the same for the
                unconditional half (default: the positive ones; both sizes must be given to take effect).
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in diffusers.
            callback, callback_steps: the deprecated step callback, as
                :class:`~brushnet.pipelines.StableDiffusionBrushNetPipeline`.
            guidance_rescale: rescale the guided prediction (Lin et al. 2023, §3.4), as in diffusers.
            blending: paste the result back into the input through the reference's 21-px feathered mask,
                so pixels farther than 10 px from the hole are exactly the input's. Off by default (parity
                with the original).
            blending_kernel_size: Gaussian kernel of the feathering, odd (reference: 21; 1 or 0: a hard edge).
            mask: the original pipeline's keyword for ``mask_image`` (alias; passing both is an error).
            strength, padding_mask_crop, ip_adapter_image, ip_adapter_image_embeds, control_image,
                controlnet_conditioning_scale, controlnet_guidance_start, controlnet_guidance_end, pag_scale,
                pag_adaptive_scale: as :class:`~brushnet.pipelines.StableDiffusionBrushNetPipeline`.

        Returns:
            ``StableDiffusionXLPipelineOutput(images)`` or a one-element tuple.
        """
        mask_image, callback_on_step_end, callback_on_step_end_tensor_inputs = self._call_arguments(
            mask_image,
            mask,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            callback,
            callback_steps,
        )

        # 1. check inputs (a one-element list window, diffusers' per-net form, is read as its number)
        control_guidance_start, control_guidance_end = check_branch_window(
            control_guidance_start, control_guidance_end
        )
        self.check_inputs(
            prompt, prompt_2, image, mask_image, height, width, negative_prompt, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            brushnet_conditioning_scale, control_guidance_start, control_guidance_end,
            callback_on_step_end_tensor_inputs, output_type, blending, strength, padding_mask_crop,
            ip_adapter_image, ip_adapter_image_embeds, original_size, crops_coords_top_left, target_size,
            negative_original_size, negative_crops_coords_top_left, negative_target_size,
        )  # fmt: skip
        self._check_controlnet_inputs(
            control_image, controlnet_conditioning_scale, controlnet_guidance_start, controlnet_guidance_end
        )
        batch_size = self._batch_size(prompt, prompt_embeds)
        num_inference_steps = self._check_sampling_inputs(
            batch_size, num_inference_steps, num_images_per_prompt, generator, guidance_scale, clip_skip,
            blending, blending_kernel_size, timesteps, sigmas,
            scales={
                "eta": eta, "guidance_rescale": guidance_rescale,
                "controlnet_conditioning_scale": controlnet_conditioning_scale,
                "pag_scale": pag_scale, "pag_adaptive_scale": pag_adaptive_scale,
            },
        )  # fmt: skip
        warn_unused_negative(
            guidance_scale,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=None
            if tuple(negative_crops_coords_top_left) == (0, 0)
            else negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
        )
        if denoising_end is not None:  # diffusers ignores any value outside (0, 1) silently
            check_finite("denoising_end", denoising_end)
            if not 0 < denoising_end <= 1:
                raise ValueError(
                    f"`denoising_end` must be in (0, 1] (a fraction of the schedule), got {denoising_end}"
                )
        self._begin_call(guidance_scale, clip_skip, cross_attention_kwargs)
        self._guidance_rescale = guidance_rescale
        self._denoising_end = denoising_end
        device = self._execution_device
        total = batch_size * num_images_per_prompt

        # 2. encode prompt: both encoders' penultimate hidden states, and text_encoder_2's pooled projection.
        # negative_prompt_2 alone: diffusers' encode_prompt zeroes the negative when negative_prompt is None
        # (force_zeros_for_empty_prompt) and drops it; it is text_encoder_2's negative, with "" for the first
        if negative_prompt is None and negative_prompt_2 is not None:
            negative_prompt = ""
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt=prompt,
                prompt_2=prompt_2,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=self.do_classifier_free_guidance,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                lora_scale=self._text_lora_scale(),
                clip_skip=self.clip_skip,
            )
        )
        image_embeds = self._ip_adapter_embeds(ip_adapter_image, ip_adapter_image_embeds, device, total)

        # 3. image and mask (and control images), at height × width
        image_tensor, hole, height, width, crops_coords = self._prepare_image_and_mask(
            image, mask_image, height, width, batch_size, num_images_per_prompt, device, padding_mask_crop
        )
        control_images = self._prepare_control_images(
            control_image, height, width, batch_size, num_images_per_prompt, device, crops_coords
        )

        # 4. timesteps (strength < 1: only the last fraction of them)
        timesteps, num_inference_steps = self._schedule(
            num_inference_steps, device, timesteps, sigmas, strength
        )

        # 5. start latents, then the branch's conditioning: masked-image latent + keep-mask (1 = keep)
        with self._vae_in_float32():
            latents = self._start_latents(
                latents, image_tensor, timesteps, strength, prompt_embeds.dtype, generator
            )
        with self._vae_in_float32():
            brushnet_cond = self._branch_conditioning(image_tensor, hole, generator)

        # 6. SDXL's added conditions: pooled text and (original size, crop top-left, target size)
        if self.text_encoder_2 is None:
            text_encoder_projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            text_encoder_projection_dim = self.text_encoder_2.config.projection_dim
        add_time_ids = self._get_add_time_ids(
            tuple(original_size or (height, width)),
            tuple(crops_coords_top_left),
            tuple(target_size or (height, width)),
            dtype=torch.float32,  # pixel counts: bf16 would turn 1365 into 1368 (the UNet embeds them in float32)
            text_encoder_projection_dim=text_encoder_projection_dim,
        ).to(device)
        negative_add_time_ids = add_time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                tuple(negative_original_size),
                tuple(negative_crops_coords_top_left),
                tuple(negative_target_size),
                dtype=torch.float32,
                text_encoder_projection_dim=text_encoder_projection_dim,
            ).to(device)
        add_text_embeds = pooled_prompt_embeds.to(device)
        add_time_ids = add_time_ids.repeat(total, 1)
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds.to(device), add_text_embeds])
            add_time_ids = torch.cat([negative_add_time_ids.repeat(total, 1), add_time_ids])

        # on/off over the whole schedule, before any `denoising_end` cut (as the original)
        conditioning_scales = self._branch_step_scales(
            len(timesteps), brushnet_conditioning_scale, control_guidance_start, control_guidance_end
        )
        controlnet_scales = self._controlnet_step_scales(
            len(timesteps), controlnet_conditioning_scale, controlnet_guidance_start, controlnet_guidance_end
        )
        if self.denoising_end is not None and 0 < self.denoising_end < 1:
            cutoff = int(
                round(
                    self.scheduler.config.num_train_timesteps
                    - self.denoising_end * self.scheduler.config.num_train_timesteps
                )
            )
            num_inference_steps = len([t for t in timesteps if t >= cutoff])
            timesteps = timesteps[:num_inference_steps]
        self._num_timesteps = len(timesteps)

        # 7. denoising loop (the SDXL branch reads the pooled text: with CFG it runs on the doubled batch)
        latents, _ = self._denoise(
            latents,
            timesteps,
            num_inference_steps,
            {
                "prompt_embeds": prompt_embeds,
                "add_text_embeds": add_text_embeds,
                "add_time_ids": add_time_ids,
            },
            brushnet_cond,
            conditioning_scales,
            guess_mode,
            self.prepare_extra_step_kwargs(generator, eta),
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            image_embeds=image_embeds,
            control_images=control_images,
            controlnet_scales=controlnet_scales,
            pag_scale=pag_scale,
            pag_adaptive_scale=pag_adaptive_scale,
        )

        # 8. decode (in float32 if the fp16 VAE overflows), blend, post-process
        if output_type == "latent":
            images = latents
        else:
            with self._vae_in_float32():  # a VAE with latent statistics: from_model_latents undoes them
                vae_input = from_model_latents(self.vae, latents)
                decoded = self.vae.decode(vae_input, return_dict=False, generator=generator)[0]
            crop_blend = blending and crops_coords is not None  # blended on the full image, after pasting
            images = self._postprocess(
                decoded, image_tensor, hole, output_type, blending and not crop_blend, blending_kernel_size
            )
            images = self._paste_crops(
                images, image, mask_image, crops_coords, blending, blending_kernel_size
            )

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return StableDiffusionXLPipelineOutput(images=images)
