"""PowerPaint v2 / v2-1 (Zhuang et al., "A Task is Worth One Word: Learning with Task Prompts for High-Quality
Versatile Image Inpainting", ECCV 2024) on upstream diffusers.

PowerPaint v2 is a BrushNet branch that keeps its cross-attention layers and reads text from **its own text
encoder**, which holds the learned task words ``P_ctxt``, ``P_shape``, ``P_obj``
(:mod:`brushnet.models.task_tokens`). The frozen base UNet reads the user's prompt through the base text
encoder, the branch only task words; the task decides both texts (:mod:`.powerpaint_prompts`).

Reproduces the original ``StableDiffusionPowerPaintBrushNetPipeline`` (open-mmlab/PowerPaint 5b4c3d5) to
~1e-6 on its recorded outputs (``tests/fixtures/powerpaint``), given the same task, prompts, image and mask.
Differences, all deliberate:

- the call takes ``task`` and ``fitting_degree`` and builds the task prompts itself, exactly as the original's
  app does before calling its pipeline (which takes the eight prompt strings ``promptA``, ``promptB``,
  ``promptU``, ...); precomputed embeddings can be passed instead;
- guidance off (``guidance_scale ≤ 1``) works (the original raises a ``TypeError``);
- the image may be whole: the hole is blacked out here (the original's app does it before the call);
- the masked image's VAE sample comes from ``generator`` (the original draws it from the global RNG);
- optional feathered paste-back (``blending=True``); unknown keyword arguments are an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

from ..models.brushnet import BrushNetModel
from ..models.task_tokens import task_token_ids
from .common import check_branch_window, warn_unused_negative
from .pipeline_brushnet import StableDiffusionBrushNetPipeline
from .powerpaint_prompts import TaskPrompts, check_task_arguments, encode_task_prompt_pair, task_prompts

__all__ = ["StableDiffusionPowerPaintBrushNetPipeline"]


class StableDiffusionPowerPaintBrushNetPipeline(StableDiffusionBrushNetPipeline):
    r"""Task-prompted inpainting with Stable Diffusion 1.5 and a PowerPaint v2 branch.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler: the base model's (the UNet is frozen and never modified).
        brushnet: a :class:`~brushnet.models.BrushNetModel` with cross-attention blocks.
        text_encoder_brushnet: the branch's ``CLIPTextModel``, its vocabulary extended by the 30 task rows.
        tokenizer_brushnet: the base tokenizer with the task placeholders added
            (:func:`~brushnet.models.task_tokens.add_task_tokens`); ids must match the encoder's rows.
        safety_checker, feature_extractor: optional (``None`` to disable; the original v2 disables it).
        image_encoder, controlnet: accepted so the pipeline shares the BrushNet pipeline's components
            (``from_pipe``); PowerPaint's call takes neither an IP-Adapter image nor a ControlNet yet and
            refuses a ``controlnet``.
    """

    # the branch runs every step: kept out of the chain so it does not bounce (as diffusers' ControlNet)
    model_cpu_offload_seq = "text_encoder->text_encoder_brushnet->unet->vae"
    _callback_tensor_inputs = [
        "latents",
        "prompt_embeds",
        "negative_prompt_embeds",
        "brushnet_prompt_embeds",
        "negative_brushnet_prompt_embeds",
    ]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        brushnet: BrushNetModel,
        text_encoder_brushnet: CLIPTextModel,
        tokenizer_brushnet: CLIPTokenizer,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: Any = None,
        feature_extractor: CLIPImageProcessor | None = None,
        requires_safety_checker: bool = False,
        image_encoder: Any = None,
        controlnet: Any = None,
    ):
        super().__init__(
            vae, text_encoder, tokenizer, unet, brushnet, scheduler, safety_checker, feature_extractor,
            requires_safety_checker, image_encoder=image_encoder, controlnet=controlnet,
        )  # fmt: skip
        if not brushnet.uses_text:
            raise ValueError("a PowerPaint branch has cross-attention; this BrushNet reads no text")
        ids = task_token_ids(tokenizer_brushnet)
        last = max(i for row in ids.values() for i in row)
        if last >= text_encoder_brushnet.config.vocab_size:
            raise ValueError(
                f"tokenizer_brushnet gives task ids up to {last}, but text_encoder_brushnet has only "
                f"{text_encoder_brushnet.config.vocab_size} rows"
            )
        self.register_modules(
            text_encoder_brushnet=text_encoder_brushnet, tokenizer_brushnet=tokenizer_brushnet
        )

    def encode_task_prompt(
        self,
        prompts: list[TaskPrompts],
        fitting_degree: float,
        negative_fitting_degree: float,
        device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The branch's text embeddings: the interpolated task prompts through ``text_encoder_brushnet``.

        Returns:
            ``(embeddings, negative embeddings or None without guidance)``, each repeated
            ``num_images_per_prompt`` times per prompt.
        """
        positive, negative = encode_task_prompt_pair(
            self.text_encoder_brushnet, self.tokenizer_brushnet, prompts, fitting_degree, negative_fitting_degree,
            device, do_classifier_free_guidance,
        )  # fmt: skip
        if negative is not None:
            negative = negative.repeat_interleave(num_images_per_prompt, dim=0)
        return positive.repeat_interleave(num_images_per_prompt, dim=0), negative

    def _step_inputs(self, tensors):
        """Per step: the UNet's text, and the branch's own (task words; ``[negative, positive]`` under guidance).

        A step callback may replace either; ``brushnet_prompt_embeds`` / ``negative_brushnet_prompt_embeds`` are the
        halves."""
        branch = tensors["brushnet_prompt_embeds"]
        negative = tensors["negative_brushnet_prompt_embeds"]
        if negative is not None and self.do_classifier_free_guidance:
            branch = torch.cat([negative, branch])
        return {"prompt_embeds": tensors["prompt_embeds"], "brushnet_prompt_embeds": branch}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        task: str = "text-guided",
        fitting_degree: float = 1.0,
        negative_fitting_degree: float | None = None,
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
        brushnet_prompt_embeds: torch.Tensor | None = None,
        negative_brushnet_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        brushnet_conditioning_scale: float = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        blending: bool = False,
        blending_kernel_size: int = 21,
        pag_scale: float = 0.0,
        pag_adaptive_scale: float = 0.0,
        callback: Callable | None = None,
        callback_steps: int = 1,
    ):
        r"""Inpaint ``image`` where ``mask_image`` is white, doing PowerPaint ``task``.

        Args:
            prompt: the user's text (may be empty); the UNet reads it, with "empty scene blur" appended for
                object-removal and "empty scene" for outpainting, as the original.
            image: the image (whole, or with the hole blacked out as the original's app passes it).
            mask_image: **white = inpaint** (PIL of any mode, array or tensor in [0, 1]; binarised at 0.5).
            task: one of ``text-guided``, ``shape-guided``, ``object-removal``, ``context-aware``,
                ``outpainting`` (:data:`~brushnet.pipelines.powerpaint_prompts.TASKS`): picks the task words
                the branch reads.
            fitting_degree: the original's ``tradoff``: ``t`` in ``t · E(A) + (1 − t) · E(B)`` for the branch's
                text; only shape-guided has A ≠ B (1: fill the mask's shape; 0.5–0.6: an object not bound to
                it, the original's advice).
            negative_fitting_degree: the same for the negative task prompts (``tradoff_nag``); default
                ``fitting_degree``, as the original app.
            height, width, num_inference_steps, timesteps, sigmas, guidance_scale, negative_prompt,
                num_images_per_prompt, eta, generator, latents, prompt_embeds, negative_prompt_embeds,
                output_type, return_dict, cross_attention_kwargs, clip_skip, callback_on_step_end,
                callback_on_step_end_tensor_inputs, blending, blending_kernel_size: as
                :class:`~brushnet.pipelines.StableDiffusionBrushNetPipeline` (``prompt_embeds`` are the UNet's;
                with them no task suffix is added).
            brushnet_prompt_embeds, negative_brushnet_prompt_embeds: the branch's text embeddings, one row per
                prompt (repeated for ``num_images_per_prompt``), instead of building them from ``task``: both, the
                positive one without guidance, or the negative one alone (the positive built from ``task``).
            brushnet_conditioning_scale: the branch's residual scale.
            guess_mode, control_guidance_start, control_guidance_end, pag_scale, pag_adaptive_scale: as for
                BrushNet.

        Returns:
            ``StableDiffusionPipelineOutput(images, nsfw_content_detected)`` or a tuple.
        """
        mask_image, callback_on_step_end, callback_on_step_end_tensor_inputs = self._call_arguments(
            mask_image,
            None,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            callback,
            callback_steps,
        )

        # 1. check inputs
        if self.controlnet is not None:
            raise ValueError(
                "the PowerPaint pipeline does not run a ControlNet; build it with controlnet=None"
            )
        given_negative_degree = negative_fitting_degree  # None: fitting_degree's (warned about only if given)
        negative_fitting_degree = check_task_arguments(task, fitting_degree, negative_fitting_degree)
        control_guidance_start, control_guidance_end = check_branch_window(
            control_guidance_start, control_guidance_end
        )
        if prompt is None and prompt_embeds is None:
            prompt = ""  # an empty prompt is common here (removal, outpainting)
        self.check_inputs(
            prompt, image, mask_image, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
            brushnet_conditioning_scale, control_guidance_start, control_guidance_end,
            callback_on_step_end_tensor_inputs, output_type, blending,
        )  # fmt: skip
        if (
            brushnet_prompt_embeds is not None
            and guidance_scale > 1
            and negative_brushnet_prompt_embeds is None
        ):
            raise ValueError(
                "with guidance, pass negative_brushnet_prompt_embeds along with brushnet_prompt_embeds"
            )
        num_inference_steps = self._check_sampling_inputs(
            self._batch_size(prompt, prompt_embeds), num_inference_steps, num_images_per_prompt, generator,
            guidance_scale, clip_skip, blending, blending_kernel_size, timesteps, sigmas,
            scales={"eta": eta, "pag_scale": pag_scale, "pag_adaptive_scale": pag_adaptive_scale},
        )  # fmt: skip
        warn_unused_negative(
            guidance_scale,
            negative_prompt=negative_prompt,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_brushnet_prompt_embeds=negative_brushnet_prompt_embeds,
            negative_fitting_degree=given_negative_degree,
        )
        self._begin_call(guidance_scale, clip_skip, cross_attention_kwargs)

        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        else:
            prompts = [""] * prompt_embeds.shape[0]
        batch_size = len(prompts)
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * batch_size if isinstance(negatives, str) else list(negatives)
        if len(negatives) != batch_size:
            raise ValueError(f"{len(negatives)} negative prompts for {batch_size} prompts")
        device = self._execution_device

        # 2. encode prompts: the branch reads task words through its own encoder, the UNet the user's words
        built = [task_prompts(task, p, n, version="v2") for p, n in zip(prompts, negatives)]
        # given branch embeddings are per prompt, repeated for num_images_per_prompt as diffusers repeats
        # prompt_embeds; a half not given (the negative alone, or the positive alone) is built from the task
        cfg = self.do_classifier_free_guidance
        branch_embeds = negative_branch_embeds = None
        if brushnet_prompt_embeds is None or (cfg and negative_brushnet_prompt_embeds is None):
            branch_embeds, negative_branch_embeds = self.encode_task_prompt(
                built, fitting_degree, negative_fitting_degree, device, num_images_per_prompt, cfg,
            )  # fmt: skip
        if brushnet_prompt_embeds is not None:
            branch_embeds = brushnet_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if negative_brushnet_prompt_embeds is not None:
            negative_branch_embeds = negative_brushnet_prompt_embeds.repeat_interleave(
                num_images_per_prompt, dim=0
            )
        unet_prompts = [b.unet_prompt for b in built]
        unet_negatives = [b.unet_negative for b in built]
        prompt_embeds, negative_prompt_embeds = self._encode_guided_prompt(
            unet_prompts if prompt_embeds is None else None,
            unet_negatives if negative_prompt_embeds is None else None,
            prompt_embeds,
            negative_prompt_embeds,
            device,
            num_images_per_prompt,
        )
        branch_dtype = self.brushnet.dtype
        branch_embeds = branch_embeds.to(device=device, dtype=branch_dtype)
        if self.do_classifier_free_guidance:
            negative_branch_embeds = negative_branch_embeds.to(device=device, dtype=branch_dtype)
        else:
            negative_branch_embeds = None

        # 3. image and mask, at height × width
        image_tensor, hole, height, width, _ = self._prepare_image_and_mask(
            image, mask_image, height, width, batch_size, num_images_per_prompt, device
        )

        # 4. timesteps
        timesteps, num_inference_steps = self._schedule(num_inference_steps, device, timesteps, sigmas)
        self._num_timesteps = len(timesteps)

        # 5. start latents, then the branch's conditioning: masked-image latent + keep-mask (1 = keep)
        latents = self._start_latents(latents, image_tensor, timesteps, 1.0, prompt_embeds.dtype, generator)
        brushnet_cond = self._branch_conditioning(image_tensor, hole, generator)

        # 6. denoising loop: the branch reads text, so under guidance it runs on the doubled batch
        tensors = {
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "brushnet_prompt_embeds": branch_embeds,
            "negative_brushnet_prompt_embeds": negative_branch_embeds,
        }
        latents, tensors = self._denoise(
            latents,
            timesteps,
            num_inference_steps,
            tensors,
            brushnet_cond,
            self._branch_step_scales(
                len(timesteps), brushnet_conditioning_scale, control_guidance_start, control_guidance_end
            ),
            guess_mode,
            self.prepare_extra_step_kwargs(generator, eta),
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            pag_scale=pag_scale,
            pag_adaptive_scale=pag_adaptive_scale,
        )

        # 7. decode, safety check, blend, post-process
        images, has_nsfw = self._decode(
            latents, output_type, image_tensor, hole, blending, blending_kernel_size, generator, device,
            tensors["prompt_embeds"].dtype,
        )  # fmt: skip

        self.maybe_free_model_hooks()
        if not return_dict:
            return images, has_nsfw
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=has_nsfw)
