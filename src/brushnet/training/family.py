"""The parts of training that depend on the base model family: loading the text side and encoding captions.

Everything else in the training loop (VAE latents, masks, noise, the branch, the UNet call, the loss) is
the same for every Stable Diffusion family. An SDXL family slots in as one more class with the same three
members: ``load`` (two tokenizers and text encoders), ``encode`` (penultimate hidden states of both
encoders concatenated, plus ``added_cond_kwargs={"text_embeds": pooled, "time_ids": ...}`` built from the
crop coordinates and resolution) and ``frozen_modules``; :func:`family_for_unet` picks it from the UNet
config (``addition_embed_type == "text_time"``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

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
        """Load ``tokenizer/`` and ``text_encoder/`` of a base folder or hub id.

        The classes are the ones the base's ``model_index.json`` names (as ``DiffusionPipeline.from_pretrained``
        does), so a base with its own tokenizer or a small text encoder trains as is; without a
        ``model_index.json`` they are ``CLIPTokenizer`` and ``CLIPTextModel``.
        """
        tokenizer_cls = _transformers_class(pretrained_model_name_or_path, "tokenizer", "CLIPTokenizer")
        text_encoder_cls = _transformers_class(pretrained_model_name_or_path, "text_encoder", "CLIPTextModel")
        tokenizer = tokenizer_cls.from_pretrained(
            pretrained_model_name_or_path, subfolder="tokenizer", revision=revision
        )
        text_encoder = text_encoder_cls.from_pretrained(
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


def _transformers_class(pretrained_model_name_or_path: str, component: str, default: str) -> type:
    """The ``transformers`` class ``model_index.json`` names for ``component`` (``default`` without one)."""
    import transformers

    index_file = Path(pretrained_model_name_or_path) / "model_index.json"
    name = default
    if index_file.is_file():
        entry = json.loads(index_file.read_text()).get(component)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" and entry[1]:
            name = entry[1]
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ValueError(f"{index_file} names {component} class {name!r}, which transformers does not have")
    return cls


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
