"""Stable Diffusion 1.5 + BrushNet inpainting pipeline on upstream diffusers.

A drop-in for the original ``StableDiffusionBrushNetPipeline`` (same component names, the same call
``pipe(prompt, image, mask_image, ...)`` with the rest by keyword — past the third argument the positional order is
diffusers 0.42's, ``sigmas`` before ``guidance_scale`` —, same outputs to ~1e-6 on the reference goldens), with
these differences, all documented in the README:

- the image may be passed whole or with the hole already blacked out: the pipeline blacks it out itself;
- the SD1.5 branch ignores the prompt, so with classifier-free guidance it runs once per step on the
  un-doubled batch (the original runs it on the doubled batch; the result is the same);
- optional blurred-mask paste-back (``blending=True``; off by default for parity);
- unknown keyword arguments are an error, not silently dropped;
- the VAE posterior sample of the masked image is drawn from ``generator`` (the original drew it from the
  global RNG, so its results were not reproducible with a real VAE).

It composes with the rest of diffusers (docs/composing.md): LoRA and textual inversion on the base, IP-Adapter
(``load_ip_adapter``), an optional ``controlnet`` (one or several) steering what fills the hole, model /
sequential / group offloading and ``torch.compile`` of the UNet (the injected forward honours the UNet's
hooks), or ``pipe.compile()``: the whole denoising step compiled, CUDA graphs on a GPU (docs/speed.md),
``strength`` and ``padding_mask_crop`` as in diffusers' inpaint pipelines, any VAE including ``AutoencoderTiny``,
FreeU, fused QKV projections, and few-step schedulers and LoRAs (LCM, TCD).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.models import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
    StableDiffusionImg2ImgPipeline,
)
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ..loading import FAMILY_NAMES, CheckpointError, check_brushnet_fits_base
from ..models.brushnet import BrushNetModel
from ..models.conditioning import from_model_latents
from .common import (  # noqa: F401
    BrushNetPipelineMixin,
    CheckedSourceMixin,
    brushnet_keep_schedule,
    check_branch_window,
    check_prompt,
    check_single_file_components,
    controlnet_keep_schedule,
    warn_unused_negative,
)

__all__ = ["StableDiffusionBrushNetPipeline"]


class StableDiffusionBrushNetPipeline(
    CheckedSourceMixin,
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    IPAdapterMixin,
    FromSingleFileMixin,
    BrushNetPipelineMixin,
):
    r"""Text-guided inpainting with Stable Diffusion 1.5 and a BrushNet branch.

    Args:
        vae: the base model's VAE (``AutoencoderKL``, or ``AutoencoderTiny`` set as ``pipe.vae``).
        text_encoder, tokenizer: the base model's CLIP text encoder and tokenizer.
        unet: the frozen base ``UNet2DConditionModel`` (any SD1.5 community model); never modified.
        brushnet: a :class:`~brushnet.models.BrushNetModel` (``None`` only to use ``encode_prompt`` alone).
        scheduler: any diffusers scheduler.
        safety_checker, feature_extractor: optional (pass ``None`` to disable; evaluation must disable it).
            ``feature_extractor`` also prepares IP-Adapter images.
        image_encoder: optional CLIP vision model for IP-Adapter images (``load_ip_adapter`` can load it).
        controlnet: optional ``ControlNetModel`` (or a list / ``MultiControlNetModel``) whose residuals are added
            to the UNet's skips next to the branch's, steered by ``control_image`` (e.g. a pose or depth map).
    """

    # the branch and a ControlNet run every step: kept out of the chain so they do not bounce (as diffusers
    # keeps its ControlNet out); they get their own hooks and stay on the device until the call ends
    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder", "controlnet"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    # Public helpers of diffusers' own SD pipeline, reused as they are (they only read the components).
    run_safety_checker = StableDiffusionPipeline.run_safety_checker
    prepare_extra_step_kwargs = StableDiffusionPipeline.prepare_extra_step_kwargs
    prepare_latents = StableDiffusionPipeline.prepare_latents
    get_guidance_scale_embedding = StableDiffusionPipeline.get_guidance_scale_embedding
    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds
    get_timesteps = StableDiffusionImg2ImgPipeline.get_timesteps

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ):
        """diffusers' SD ``encode_prompt``, with ``clip_skip`` working on transformers 4 and 5 alike.

        transformers 5 flattened ``CLIPTextModel`` (no ``.text_model``), which diffusers' clip-skip path
        reads; here the skipped hidden state is taken and normalised by whichever final layer norm exists.
        """
        if clip_skip is not None and prompt_embeds is None and prompt is not None:
            prompt_embeds = self._clip_skip_embeds(prompt, device, clip_skip, lora_scale)
        return StableDiffusionPipeline.encode_prompt(
            self,
            prompt,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
        )

    def _clip_skip_embeds(self, prompt, device, clip_skip: int, lora_scale: float | None) -> torch.Tensor:
        from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if hasattr(self, "maybe_convert_prompt"):  # textual-inversion tokens
            prompts = self.maybe_convert_prompt(prompts, self.tokenizer)
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        scaled = lora_scale is not None and USE_PEFT_BACKEND
        if scaled:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
            tower = getattr(self.text_encoder, "text_model", self.text_encoder)
            embeds = tower.final_layer_norm(hidden)
        finally:
            if scaled:
                unscale_lora_layers(self.text_encoder, lora_scale)
        return embeds.to(dtype=self.text_encoder.dtype, device=device)

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        brushnet: BrushNetModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: Any = None,
        feature_extractor: CLIPImageProcessor | None = None,
        requires_safety_checker: bool = False,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        controlnet: ControlNetModel | list[ControlNetModel] | MultiControlNetModel | None = None,
    ):
        super().__init__()
        if brushnet is not None and not isinstance(brushnet, BrushNetModel):
            raise TypeError(f"brushnet must be a BrushNetModel, got {type(brushnet).__name__}")
        if unet is not None and unet.config.get("addition_embed_type") == "text_time":
            raise CheckpointError(
                f"{type(self).__name__} needs an SD1.5 base; this one is {FAMILY_NAMES['sdxl']} "
                "(use StableDiffusionXLBrushNetPipeline)"
            )
        if unet is not None and brushnet is not None:
            check_brushnet_fits_base(brushnet.config, unet.config)
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            brushnet=brushnet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            controlnet=controlnet,
        )
        self._make_image_processors(vae)
        self.register_to_config(requires_safety_checker=requires_safety_checker)

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, **kwargs):
        """diffusers' ``from_single_file`` (every argument the same). The checkpoint holds the base model only: pass
        ``brushnet=BrushNetModel.from_pretrained(...)`` (a one-line error without it)."""
        check_single_file_components(cls, kwargs)
        return super().from_single_file(pretrained_model_link_or_path, **kwargs)

    # -------------------------------------------------------------------------------------------------
    def check_inputs(
        self,
        prompt,
        image,
        mask_image,
        height,
        width,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
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
    ) -> None:
        self._check_brushnet_inputs(
            image, mask_image, height, width, brushnet_conditioning_scale, control_guidance_start,
            control_guidance_end, callback_on_step_end_tensor_inputs, output_type, blending, strength,
            padding_mask_crop, ip_adapter_image, ip_adapter_image_embeds,
        )  # fmt: skip
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass `prompt` or `prompt_embeds`")
        check_prompt("prompt", prompt)
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
        self._check_embeds_match(prompt_embeds, negative_prompt_embeds)

    def _encode_guided_prompt(
        self,
        prompt,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        device,
        num_images_per_prompt: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`encode_prompt` with the call's LoRA scale and ``clip_skip``.

        Returns:
            ``(prompt_embeds, negative_prompt_embeds)``, each ``num_images_per_prompt`` per prompt; under
            classifier-free guidance ``prompt_embeds`` is the ``[negative, positive]`` batch the UNet reads.
        """
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=self._text_lora_scale(),
            clip_skip=self.clip_skip,
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        return prompt_embeds, negative_prompt_embeds

    def _decode(
        self,
        latents,
        output_type,
        image_tensor,
        hole,
        blending,
        blending_kernel_size,
        generator,
        device,
        dtype,
    ):
        """Latents → the requested output: VAE decode, safety check (flagged images black), optional blending.

        Returns:
            ``(images, has_nsfw or None)``; ``output_type="latent"`` returns the latents.
        """
        if output_type == "latent":
            return latents, None
        decoded = self.vae.decode(
            from_model_latents(self.vae, latents), return_dict=False, generator=generator
        )[0]
        decoded, has_nsfw = self.run_safety_checker(decoded, device, dtype)
        images = self._postprocess(
            decoded, image_tensor, hole, output_type, blending, blending_kernel_size, has_nsfw
        )
        return images, has_nsfw

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        brushnet_conditioning_scale: float = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
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

        Args:
            prompt: what to paint in the hole.
            image: the image in diffusers' formats (PIL; float numpy ``(H, W, 3)`` / ``(B, H, W, 3)`` in [0, 1];
                tensor ``(3, H, W)`` / ``(B, 3, H, W)`` in [0, 1] or [-1, 1]; a list of them); whole or with the
                hole blacked out.
            mask_image: the mask, **white = inpaint** (PIL of any mode, array or tensor in [0, 1]).
            height, width: output size, multiples of the VAE factor; default the image size rounded down.
            num_inference_steps, timesteps, sigmas: the denoising schedule (custom lists as in diffusers).
            guidance_scale: classifier-free guidance weight (off at ≤ 1).
            negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip: text conditioning.
            num_images_per_prompt, eta, generator, latents: sampling (noise from a CPU generator is
                reproducible across devices).
            output_type: "pil", "np", "pt" or "latent".
            brushnet_conditioning_scale: the preservation scale (strength of the branch).
            guess_mode: ControlNet-style guess mode: a log-spaced ramp of scales; with CFG the branch only
                conditions the text half.
            control_guidance_start, control_guidance_end: fractions of the steps during which the branch is on
                (a one-element list, diffusers' per-net form, counts as its number).
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in diffusers.
            callback, callback_steps: the original pipelines' deprecated step callback, ``callback(step, timestep,
                latents)`` every ``callback_steps`` steps; it works, with a ``FutureWarning`` (not with
                ``callback_on_step_end``).
            blending: paste the result back into the input through the reference's 21-px feathered mask,
                so pixels farther than 10 px from the hole are exactly the input's. Off by default (parity
                with the original); the CLI and :mod:`brushnet.methods` turn it on.
            blending_kernel_size: Gaussian kernel of the feathering, odd (reference: 21; 1 or 0: a hard edge).
            mask: the original pipeline's keyword for ``mask_image`` (alias; passing both is an error).
            strength: below 1, the hole starts from the input noised to that fraction of the schedule and only
                that fraction of the steps runs (diffusers' inpaint ``strength``); 1 starts from pure noise.
            padding_mask_crop: work on the mask's bounding box grown by this many pixels, resized to the output
                size, and paste the result into the input (diffusers' inpaint option; PIL image and mask,
                ``output_type="pil"``).
            ip_adapter_image, ip_adapter_image_embeds: IP-Adapter image prompt (after ``load_ip_adapter``), as in
                diffusers; its scale is ``set_ip_adapter_scale``, its masks
                ``cross_attention_kwargs={"ip_adapter_masks": ...}``.
            control_image: with a ``controlnet``: its conditioning image (a list, one per net, with several).
            controlnet_conditioning_scale, controlnet_guidance_start, controlnet_guidance_end: the ControlNet's
                residual scale and the fractions of the steps it acts in (lists with several nets).
                ``guess_mode`` applies to it as to the branch.
            pag_scale, pag_adaptive_scale: perturbed-attention guidance (Ahn et al. 2024), as diffusers' PAG
                pipelines: its weight (0 = off) and the decrease of the weight per timestep towards t = 0; the
                layers are ``set_pag_applied_layers(...)`` (default ``"mid"``). The branch is unaffected; its
                residuals reach the perturbed pass as they reach the conditional one.

        Returns:
            ``StableDiffusionPipelineOutput(images, nsfw_content_detected)`` or a tuple.
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
            prompt, image, mask_image, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
            brushnet_conditioning_scale, control_guidance_start, control_guidance_end,
            callback_on_step_end_tensor_inputs, output_type, blending, strength, padding_mask_crop,
            ip_adapter_image, ip_adapter_image_embeds,
        )  # fmt: skip
        self._check_controlnet_inputs(
            control_image, controlnet_conditioning_scale, controlnet_guidance_start, controlnet_guidance_end
        )
        batch_size = self._batch_size(prompt, prompt_embeds)
        num_inference_steps = self._check_sampling_inputs(
            batch_size, num_inference_steps, num_images_per_prompt, generator, guidance_scale, clip_skip,
            blending, blending_kernel_size, timesteps, sigmas,
            scales={
                "eta": eta, "controlnet_conditioning_scale": controlnet_conditioning_scale,
                "pag_scale": pag_scale, "pag_adaptive_scale": pag_adaptive_scale,
            },
        )  # fmt: skip
        warn_unused_negative(
            guidance_scale, negative_prompt=negative_prompt, negative_prompt_embeds=negative_prompt_embeds
        )
        self._begin_call(guidance_scale, clip_skip, cross_attention_kwargs)
        device = self._execution_device

        # 2. encode prompt
        prompt_embeds, negative_prompt_embeds = self._encode_guided_prompt(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, device, num_images_per_prompt
        )
        image_embeds = self._ip_adapter_embeds(
            ip_adapter_image, ip_adapter_image_embeds, device, batch_size * num_images_per_prompt
        )

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
        self._num_timesteps = len(timesteps)

        # 5. start latents, then the branch's conditioning: masked-image latent + keep-mask (1 = keep)
        latents = self._start_latents(
            latents, image_tensor, timesteps, strength, prompt_embeds.dtype, generator
        )
        brushnet_cond = self._branch_conditioning(image_tensor, hole, generator)

        # 6. denoising loop (the SD1.5 branch never reads text: one branch pass per step serves both CFG halves)
        latents, tensors = self._denoise(
            latents,
            timesteps,
            num_inference_steps,
            {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds},
            brushnet_cond,
            self._branch_step_scales(
                len(timesteps), brushnet_conditioning_scale, control_guidance_start, control_guidance_end
            ),
            guess_mode,
            self.prepare_extra_step_kwargs(generator, eta),
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            image_embeds=image_embeds,
            control_images=control_images,
            controlnet_scales=self._controlnet_step_scales(
                len(timesteps),
                controlnet_conditioning_scale,
                controlnet_guidance_start,
                controlnet_guidance_end,
            ),
            pag_scale=pag_scale,
            pag_adaptive_scale=pag_adaptive_scale,
        )

        # 7. decode, safety check, blend, post-process
        images, has_nsfw = self._decode(
            latents, output_type, image_tensor, hole, blending and crops_coords is None, blending_kernel_size,
            generator, device, tensors["prompt_embeds"].dtype,
        )  # fmt: skip
        images = self._paste_crops(
            images, image, mask_image, crops_coords, blending, blending_kernel_size, has_nsfw
        )

        self.maybe_free_model_hooks()
        if not return_dict:
            return images, has_nsfw
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=has_nsfw)
