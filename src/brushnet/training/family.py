"""The parts of training that depend on the base model family: loading the text side and encoding captions.

Everything else in the training loop (VAE latents, masks, noise, the branch, the UNet call, the loss) is
the same for every Stable Diffusion family. An SDXL family slots in as one more class with the same three
members: ``load`` (two tokenizers and text encoders), ``encode`` (penultimate hidden states of both
encoders concatenated, plus ``added_cond_kwargs={"text_embeds": pooled, "time_ids": ...}`` built from the
crop coordinates and resolution) and ``frozen_modules``; :func:`family_for_unet` picks it from the UNet
config (``addition_embed_type == "text_time"``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["SD15Family", "family_for_unet"]

logger = logging.getLogger(__name__)


class SD15Family:
    """Stable Diffusion 1.x/2.x: one CLIP tokenizer + text encoder, last hidden state, no added conditions."""

    name = "sd15"

    def __init__(self, tokenizer, text_encoder: nn.Module):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    @classmethod
    def load(cls, pretrained_model_name_or_path: str, revision: str | None = None) -> SD15Family:
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(
            pretrained_model_name_or_path, subfolder="tokenizer", revision=revision
        )
        text_encoder = CLIPTextModel.from_pretrained(
            pretrained_model_name_or_path, subfolder="text_encoder", revision=revision
        )
        return cls(tokenizer, text_encoder)

    @property
    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder}

    @property
    def pipeline_components(self) -> dict:
        """Components the family contributes to the validation pipeline."""
        return {"tokenizer": self.tokenizer, "text_encoder": self.text_encoder}

    @torch.no_grad()
    def encode(
        self, captions: list[str], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Captions → ``(encoder_hidden_states (B, L, D), added_cond_kwargs)``; SD1.5 has no added conditions."""
        tokens = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        hidden_states = self.text_encoder(tokens, return_dict=False)[0]
        return hidden_states.to(dtype), None


def family_for_unet(unet) -> type[SD15Family]:
    """The family class for a base UNet, from its config."""
    if unet.config.addition_embed_type == "text_time":
        raise NotImplementedError(
            "SDXL BrushNet training is not implemented yet: add an SDXL family in brushnet/training/family.py "
            "(see docs/training.md)"
        )
    if unet.config.addition_embed_type is not None or unet.config.class_embed_type is not None:
        raise NotImplementedError(
            f"unsupported base UNet (addition_embed_type={unet.config.addition_embed_type!r}, "
            f"class_embed_type={unet.config.class_embed_type!r})"
        )
    return SD15Family
