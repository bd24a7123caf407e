"""PowerPaint v1 (Zhuang et al., ECCV 2024): a fine-tuned 9-channel SD1.5 inpainting UNet whose one text
encoder holds the learned task words ``P_ctxt``, ``P_shape``, ``P_obj``.

The original v1 pipeline is a copy of diffusers' ``StableDiffusionInpaintPipeline`` whose only change is the
prompt: it takes two prompts A and B and feeds the UNet ``t · E(A) + (1 − t) · E(B)``. Given those
embeddings, diffusers' own pipeline produces the original's outputs bit for bit (checked on the recorded
references), so this class *is* diffusers' pipeline plus the task prompts: it builds them from ``task``
(:mod:`.powerpaint_prompts`, the original app's v1 rules) and passes ``prompt_embeds``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import StableDiffusionInpaintPipeline

from ..models.task_tokens import task_token_ids
from .common import (
    CheckedSourceMixin,
    check_finite,
    check_generator,
    check_image_dtype,
    check_positive_int,
    check_prompt,
    warn_unused_negative,
)
from .powerpaint_prompts import check_task_arguments, encode_task_prompt_pair, task_prompts

__all__ = ["StableDiffusionPowerPaintInpaintPipeline"]

_PARENT_ARGUMENTS = set(inspect.signature(StableDiffusionInpaintPipeline.__call__).parameters) - {
    "self",
    "kwargs",
}


class StableDiffusionPowerPaintInpaintPipeline(CheckedSourceMixin, StableDiffusionInpaintPipeline):
    r"""PowerPaint v1: diffusers' ``StableDiffusionInpaintPipeline`` with task prompts.

    Components as diffusers' inpainting pipeline, with ``unet`` the PowerPaint v1 UNet (9 input channels),
    ``text_encoder`` its text encoder (vocabulary extended by the 30 task rows) and ``tokenizer`` the base
    tokenizer with the task placeholders added (:func:`~brushnet.models.task_tokens.add_task_tokens`).
    """

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
    ):
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder,
            requires_safety_checker,
        )  # fmt: skip
        ids = task_token_ids(self.tokenizer)
        last = max(i for row in ids.values() for i in row)
        if last >= self.text_encoder.config.vocab_size:
            raise ValueError(
                f"the tokenizer gives task ids up to {last}, but the text encoder has only "
                f"{self.text_encoder.config.vocab_size} rows"
            )

    def encode_task_prompt(
        self,
        task: str,
        prompt: list[str],
        negative_prompt: list[str],
        fitting_degree: float,
        negative_fitting_degree: float,
        do_classifier_free_guidance: bool,
        clip_skip: int | None = None,
        lora_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prompt_embeds, negative_prompt_embeds or None)`` for ``task``: the interpolated v1 task prompts.
        ``clip_skip`` and ``lora_scale`` (a text-encoder LoRA's weight) act as in diffusers' ``encode_prompt``."""
        from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

        # a multi-vector textual inversion token expands to its vectors' tokens, as diffusers' encode_prompt does
        prompt = self.maybe_convert_prompt(list(prompt), self.tokenizer)
        negative_prompt = self.maybe_convert_prompt(list(negative_prompt), self.tokenizer)
        built = [task_prompts(task, p, n, version="v1") for p, n in zip(prompt, negative_prompt)]
        scaled = lora_scale is not None and USE_PEFT_BACKEND
        if scaled:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            return encode_task_prompt_pair(
                self.text_encoder, self.tokenizer, built, fitting_degree, negative_fitting_degree,
                self._execution_device, do_classifier_free_guidance, clip_skip,
            )  # fmt: skip
        finally:
            if scaled:
                unscale_lora_layers(self.text_encoder, lora_scale)

    @staticmethod
    def _check_sampling_arguments(prompt, prompt_embeds, guidance_scale, kwargs: dict[str, Any]) -> None:
        """The checks the BrushNet pipelines make (:mod:`.common`), before anything is encoded: a non-empty
        prompt list, a positive integer step count (unless ``timesteps``/``sigmas`` set the schedule) and
        ``num_images_per_prompt``, finite ``guidance_scale`` and ``eta``, one generator per image. Whole numbers
        given as floats (``2.0``) are passed on as ``int`` (in ``kwargs``)."""
        check_prompt("prompt", prompt)
        names = ["num_images_per_prompt"]
        if kwargs.get("timesteps") is None and kwargs.get("sigmas") is None:
            names.append("num_inference_steps")
        for name in names:
            if name in kwargs:
                kwargs[name] = check_positive_int(name, kwargs[name])
        check_finite("guidance_scale", guidance_scale)
        check_finite("eta", kwargs.get("eta", 0.0))
        if prompt_embeds is not None:
            batch_size = prompt_embeds.shape[0]
        else:
            batch_size = 1 if prompt is None or isinstance(prompt, str) else len(prompt)
        check_generator(kwargs.get("generator"), batch_size * kwargs.get("num_images_per_prompt", 1))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        task: str = "text-guided",
        fitting_degree: float = 1.0,
        negative_fitting_degree: float | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float = 7.5,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        r"""Inpaint ``image`` where ``mask_image`` is white, doing PowerPaint ``task``.

        Args:
            prompt: the user's text (may be empty); for the object tasks it is followed by the task word, for
                removal and outpainting preceded by "empty scene blur", as in the original.
            task, fitting_degree, negative_fitting_degree: as
                :class:`~brushnet.pipelines.StableDiffusionPowerPaintBrushNetPipeline` (here the interpolated
                embeddings go to the UNet).
            negative_prompt: the user's negative text; the object tasks append the original's quality suffix
                and task word.
            prompt_embeds, negative_prompt_embeds: use these instead of building them from ``task``.
            kwargs: every other argument of diffusers' ``StableDiffusionInpaintPipeline.__call__``
                (``num_inference_steps``, ``generator``, ``height``, ``width``, ``strength``, ``output_type``,
                …); an unknown name is a ``TypeError`` there.
        """
        unknown = sorted(set(kwargs) - _PARENT_ARGUMENTS)
        if unknown:  # diffusers' __call__ takes **kwargs for deprecated names and would drop a misspelling
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
        given_negative_degree = negative_fitting_degree  # None: fitting_degree's (warned about only if given)
        negative_fitting_degree = check_task_arguments(task, fitting_degree, negative_fitting_degree)
        self._check_sampling_arguments(prompt, prompt_embeds, guidance_scale, kwargs)
        warn_unused_negative(
            guidance_scale,
            negative_prompt=negative_prompt,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_fitting_degree=given_negative_degree,
        )
        check_image_dtype("image", image)
        if prompt_embeds is None:
            prompts = [prompt or ""] if prompt is None or isinstance(prompt, str) else list(prompt)
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
            cfg = guidance_scale > 1 and negative_prompt_embeds is None
            prompt_embeds, negative = self.encode_task_prompt(
                task, prompts, negatives, fitting_degree, negative_fitting_degree, cfg, kwargs.get("clip_skip"),
                (kwargs.get("cross_attention_kwargs") or {}).get("scale"),
            )  # fmt: skip
            negative_prompt_embeds = negative_prompt_embeds if negative is None else negative
        elif prompt is not None or negative_prompt is not None:
            raise ValueError("pass either prompts or prompt_embeds, not both")
        return super().__call__(
            image=image,
            mask_image=mask_image,
            guidance_scale=guidance_scale,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            **kwargs,
        )
