"""The parts of training that depend on the base model family: the text side and the UNet's added conditions.

Everything else in the training loop (VAE latents, masks, noise, the branch, the UNet call, the loss) is
the same for every Stable Diffusion family. A family is built from the components
:func:`brushnet.loading.load_base_components` returns and has four members: ``frozen_modules`` (its text
encoders), ``encode`` (captions → ``encoder_hidden_states`` and the UNet's ``added_cond_kwargs``),
``pipeline`` (the inference pipeline used for validation images) and ``name``. :func:`family_for_unet` picks
the class from the UNet config (:func:`brushnet.loading.detect_family`). What a caption dropped by
``--caption_dropout`` becomes follows the family's and the base's convention unless set
(:func:`dropped_caption_default`, :func:`zero_dropped_captions`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..devices import to_device
from ..loading import detect_family

__all__ = ["SD15Family", "SDXLFamily", "family_for_unet", "dropped_caption_default", "zero_dropped_captions"]

logger = logging.getLogger(__name__)


def _token_ids(tokenizer, captions: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return to_device(ids, device)


class SD15Family:
    """Stable Diffusion 1.x/2.x: one text encoder (CLIP, or whatever ``model_index.json`` names), its last hidden
    state, no added conditions."""

    name = "sd15"

    def __init__(self, tokenizer, text_encoder: nn.Module):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    @classmethod
    def from_components(cls, components: dict) -> SD15Family:
        """The family of a base loaded by :func:`brushnet.loading.load_base_components`."""
        return cls(components["tokenizer"], components["text_encoder"])

    @property
    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder}

    def pipeline(self, vae, unet, brushnet, scheduler):
        """The inference pipeline on these components (validation images)."""
        from ..pipelines.pipeline_brushnet import StableDiffusionBrushNetPipeline

        return StableDiffusionBrushNetPipeline(
            vae=vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=unet,
            brushnet=brushnet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
        )

    @torch.no_grad()
    def encode(
        self, captions: list[str], device: torch.device, dtype: torch.dtype, batch: dict | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Captions → ``(encoder_hidden_states (B, L, D), added_cond_kwargs)``; SD1.5 has no added conditions.

        Args:
            captions: one per sample (after caption dropout).
            device, dtype: of the result.
            batch: the training batch (unused here).
        """
        hidden_states = self.text_encoder(_token_ids(self.tokenizer, captions, device), return_dict=False)[0]
        return hidden_states.to(dtype), None

    dropped_caption = "encoded"  # what the SD1.5 pipelines send as the unconditional text

    def unconditional(
        self,
        count: int,
        device: torch.device,
        dtype: torch.dtype,
        batch: dict | None = None,
        embeds: str = "encoded",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The unconditional half of classifier-free guidance: the empty caption, encoded, as the SD1.5 pipeline
        builds it (``embeds="encoded"``), or zeros (``"zeros"``: what ``--caption_dropout_embeds zeros`` trains a
        dropped caption as; no encoder pass)."""
        if embeds == "zeros":
            shape = (count, self.tokenizer.model_max_length, self.text_encoder.config.hidden_size)
            return torch.zeros(shape, device=device, dtype=dtype), None
        return self.encode([""] * count, device, dtype, batch)


class SDXLFamily:
    """Stable Diffusion XL: two tokenizers and text encoders, and the ``text_time`` added conditions.

    As SDXL (and the original BrushNet SDXL training script) encodes a caption:
    ``encoder_hidden_states`` is the concatenation of both encoders' penultimate hidden states,
    ``text_embeds`` the pooled projection of ``text_encoder_2``, and ``time_ids`` each sample's
    ``(original height, original width, crop top, crop left, target height, target width)``.

    The time ids stay float32 whatever the mixed-precision dtype: they are pixel counts that the UNet and the
    branch turn into sinusoidal embeddings (in float32) with frequencies up to 1 per pixel, and bfloat16 keeps 8
    significant bits (1365 → 1368, a crop at 683 → 684), which scrambles those components; float16 does the same
    above 2048. The original script cast them to the mixed-precision dtype.
    """

    name = "sdxl"

    def __init__(self, tokenizer, text_encoder: nn.Module, tokenizer_2, text_encoder_2: nn.Module):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2

    @classmethod
    def from_components(cls, components: dict) -> SDXLFamily:
        """The family of a base loaded by :func:`brushnet.loading.load_base_components`."""
        return cls(
            components["tokenizer"],
            components["text_encoder"],
            components["tokenizer_2"],
            components["text_encoder_2"],
        )

    @property
    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def pipeline(self, vae, unet, brushnet, scheduler):
        """The inference pipeline on these components (validation images)."""
        from ..pipelines.pipeline_brushnet_sdxl import StableDiffusionXLBrushNetPipeline

        return StableDiffusionXLBrushNetPipeline(
            vae=vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=unet,
            brushnet=brushnet,
            scheduler=scheduler,
        )

    @staticmethod
    def time_ids(batch: dict) -> torch.Tensor:
        """``(B, 6)`` SDXL time ids of a training batch: original size and crop top-left as the data pipeline
        reports them (``original_size``, ``crop_top_left``: the image's size before resizing and where the
        crop starts in the resized image), target size = the crop's size.

        A batch without them (a custom dataset) counts as uncropped images of the crop's size: the original
        size is the target size and the crop is (0, 0), the values SDXL inference uses by default.
        """
        pixel_values = batch["pixel_values"]
        batch_size, (height, width) = pixel_values.shape[0], pixel_values.shape[-2:]
        target = torch.tensor([[height, width]]).expand(batch_size, 2)
        original = batch.get("original_size")
        crop = batch.get("crop_top_left")
        original = target if original is None else torch.as_tensor(original).reshape(batch_size, 2)
        crop = torch.zeros(batch_size, 2, dtype=torch.long) if crop is None else torch.as_tensor(crop)
        return torch.cat([original, crop.reshape(batch_size, 2), target], dim=1)

    @torch.no_grad()
    def encode(
        self, captions: list[str], device: torch.device, dtype: torch.dtype, batch: dict | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Captions → ``(encoder_hidden_states (B, 77, D₁ + D₂), {"text_embeds": (B, D_proj), "time_ids": (B, 6)})``.

        Args:
            captions: one per sample (after caption dropout; an empty caption is encoded, as the original does:
                :func:`zero_dropped_captions` zeros the dropped ones under ``--caption_dropout_embeds zeros``).
            device, dtype: of the result; the time ids are float32 whatever ``dtype`` (class docstring).
            batch: the training batch, for the time ids (see :meth:`time_ids`); required.
        """
        if batch is None:
            raise ValueError("SDXL needs the batch (image sizes and crops) for its time ids")
        hidden_states = []
        for tokenizer, text_encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            output = text_encoder(_token_ids(tokenizer, captions, device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
        pooled = output[0]  # text_encoder_2's projection (CLIPTextModelWithProjection.text_embeds)
        added_cond_kwargs = {
            "text_embeds": pooled.to(dtype),
            "time_ids": to_device(self.time_ids(batch), device, torch.float32),  # exact (class docstring)
        }
        return torch.cat(hidden_states, dim=-1).to(dtype), added_cond_kwargs

    dropped_caption = "zeros"  # force_zeros_for_empty_prompt, the SDXL pipelines' default

    @torch.no_grad()
    def unconditional(
        self,
        count: int,
        device: torch.device,
        dtype: torch.dtype,
        batch: dict | None = None,
        embeds: str = "zeros",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The unconditional half of classifier-free guidance as the SDXL pipeline builds it for an empty negative
        prompt: zeros for both text embeddings (``embeds="zeros"``: ``force_zeros_for_empty_prompt``, SDXL's
        default), or ``""`` through both encoders (``"encoded"``: a base whose ``model_index.json`` sets it false,
        or ``--caption_dropout_embeds encoded``); the same time ids as the caption's."""
        if batch is None:
            raise ValueError("SDXL needs the batch (image sizes and crops) for its time ids")
        if embeds == "encoded":
            return self.encode([""] * count, device, dtype, batch)
        length = self.tokenizer.model_max_length
        width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        projection = self.text_encoder_2.config.projection_dim
        return torch.zeros(count, length, width, device=device, dtype=dtype), {
            "text_embeds": torch.zeros(count, projection, device=device, dtype=dtype),
            "time_ids": to_device(self.time_ids(batch), device, torch.float32),
        }


def family_for_unet(unet) -> type[SD15Family] | type[SDXLFamily]:
    """The family class for a base UNet, from its config (``addition_embed_type == "text_time"``: SDXL)."""
    return {"sd15": SD15Family, "sdxl": SDXLFamily}[detect_family(unet.config)]


def dropped_caption_default(
    family: str, pretrained_model_name_or_path: str, revision: str | None = None
) -> str:
    """What a dropped caption becomes when ``--caption_dropout_embeds`` is unset: the base's own convention for its
    unconditional text, ``"zeros"`` or ``"encoded"``.

    SD1.5: ``"encoded"`` (its pipelines encode ``""``). SDXL: ``"zeros"`` unless the base's ``model_index.json``
    sets ``force_zeros_for_empty_prompt`` false (diffusers' SDXL pipelines then encode ``""``); a base without that
    file (a folder of components, a single file, a hub id not in the local cache) or without that key counts as
    true, the SDXL pipelines' default and SDXL base 1.0's setting.

    Args:
        family: ``"sd15"`` or ``"sdxl"`` (:func:`brushnet.loading.detect_family`).
        pretrained_model_name_or_path: the base: a local folder or file, or a hub id (read from the local cache
            only; nothing is fetched).
        revision: the hub revision of the base.
    """
    from ..loading import force_zeros_for_empty_prompt

    if family != "sdxl":
        return "encoded"
    return (
        "zeros"
        if force_zeros_for_empty_prompt(pretrained_model_name_or_path, revision=revision)
        else "encoded"
    )


def zero_dropped_captions(
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
    dropped: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """The text conditions with the dropped captions' rows set to exact zeros: the prompt embeds and, for SDXL, the
    pooled text embeds (``text_embeds``), as SDXL inference builds its unconditional half
    (``force_zeros_for_empty_prompt``); the time ids are the sample's, untouched.

    Args:
        encoder_hidden_states: ``(B, L, D)``.
        added_cond_kwargs: SDXL's ``{"text_embeds": (B, D_proj), "time_ids": (B, 6)}``, or None (SD1.5).
        dropped: ``(B,)`` bool, True for a dropped caption.
    """
    dropped = dropped.to(encoder_hidden_states.device)
    encoder_hidden_states = encoder_hidden_states.masked_fill(dropped.view(-1, 1, 1), 0)
    if added_cond_kwargs is not None:
        text_embeds = added_cond_kwargs["text_embeds"]
        added_cond_kwargs = {
            **added_cond_kwargs,
            "text_embeds": text_embeds.masked_fill(dropped.to(text_embeds.device).view(-1, 1), 0),
        }
    return encoder_hidden_states, added_cond_kwargs
