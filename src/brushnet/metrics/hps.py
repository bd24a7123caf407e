"""Human Preference Score v2.1 (Wu et al. 2023, "Human Preference Score v2"): OpenCLIP ViT-H/14
fine-tuned on HPD v2; the score is the cosine between the normalised image and text embeddings.

`hpsv2.score(..., hps_version="v2.1")` returns `diag(f_I · f_Tᵀ)` with `f = E / ||E||` and no logit
scale, i.e. a raw cosine (~0.2–0.35 for real images). BrushBench tables print it ×100 ("HPS 27.40").
`hps_score` returns the raw cosine, like the reference package.

The model below mirrors OpenCLIP's `CLIP` module layout so `HPS_v2.1_compressed.pt`
(`{"state_dict": …}`) loads strictly: `visual.conv1.weight`, `visual.class_embedding`,
`visual.positional_embedding`, `visual.ln_pre.*`, `visual.transformer.resblocks.N.{ln_1,attn,ln_2,
mlp.c_fc,mlp.c_proj}.*`, `visual.ln_post.*`, `visual.proj`, `token_embedding.weight`,
`positional_embedding`, `transformer.resblocks.N.*`, `ln_final.*`, `text_projection`, `logit_scale`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import load_into, load_state_dict_file, load_tokenizer
from .preprocess import captioned_clip_input

__all__ = ["OpenCLIPConfig", "VIT_H_14", "OpenCLIP", "hps_score", "load_hps", "tokenize_open_clip"]


@dataclass(frozen=True)
class OpenCLIPConfig:
    """Architecture of an OpenCLIP ViT model (defaults: ViT-H-14)."""

    embed_dim: int = 1024
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1280
    vision_layers: int = 32
    vision_heads: int = 16
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 1024
    text_layers: int = 24
    text_heads: int = 16
    mlp_ratio: float = 4.0


VIT_H_14 = OpenCLIPConfig()


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))` with exact GELU."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class VisionTransformer(nn.Module):
    """OpenCLIP vision tower: patch conv (no bias), class token, learned positions, ln_pre, blocks,
    ln_post on the class token, projection."""

    def __init__(self, config: OpenCLIPConfig):
        super().__init__()
        width = config.vision_width
        grid = config.image_size // config.patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.vision_layers, config.vision_heads, config.mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, config.embed_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values).flatten(2).transpose(1, 2)  # N×grid²×width
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenCLIP(nn.Module):
    """OpenCLIP `CLIP` (ViT image tower + causal text transformer) with OpenCLIP's state-dict keys."""

    def __init__(self, config: OpenCLIPConfig = VIT_H_14):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.randn(config.context_length, config.text_width) * 0.01)
        self.transformer = Transformer(
            config.text_width, config.text_layers, config.text_heads, config.mlp_ratio
        )
        self.ln_final = nn.LayerNorm(config.text_width)
        self.text_projection = nn.Parameter(
            torch.randn(config.text_width, config.embed_dim) * config.text_width**-0.5
        )
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))  # log(100); unused by the HPS score
        causal = torch.full((config.context_length, config.context_length), float("-inf")).triu(1)
        self.register_buffer("attn_mask", causal, persistent=False)
        self.eval()

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`N×3×S×S` normalised pixels → `N×embed_dim` (not normalised)."""
        return self.visual(pixel_values)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`N×context` token ids (EOT has the largest id) → `N×embed_dim`, pooled at the EOT token."""
        x = self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]
        length = input_ids.shape[1]
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:length, :length].to(x.dtype)))
        pooled = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]
        return pooled @ self.text_projection


def tokenize_open_clip(tokenizer, captions: Sequence[str], context_length: int = 77) -> torch.Tensor:
    """OpenCLIP tokenisation with a `transformers.CLIPTokenizer` (same BPE vocabulary).

    `<start_of_text> tokens <end_of_text>`, truncated to `context_length` with the last position
    forced to `<end_of_text>`, zero-padded (OpenCLIP pads with id 0).
    """
    ids = tokenizer(list(captions), add_special_tokens=False, verbose=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = torch.zeros(len(ids), context_length, dtype=torch.long)
    for row, tokens in enumerate(ids):
        tokens = [bos, *tokens, eos][:context_length]
        tokens[-1] = eos
        out[row, : len(tokens)] = torch.tensor(tokens)
    return out


@torch.no_grad()
def hps_score(model: OpenCLIP, tokenizer, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """Per-image HPS v2.1: `cos(E_I, E_T)` of the fine-tuned OpenCLIP model (no ×100, no logit scale).

    Args:
        model: `OpenCLIP` with HPS v2.1 weights (see `load_hps`).
        tokenizer: `transformers.CLIPTokenizer` (OpenAI CLIP BPE vocabulary).
        images: `N×3×H×W` in [0, 1]; as the `hpsv2` package does: the longest side resized (bicubic), padded to
            a square with black, centred, CLIP-normalised.
        captions: N strings.

    Returns:
        `N` cosines in [-1, 1] (multiply by 100 for the BrushBench table unit).
    """
    pixel_values = captioned_clip_input(model, images, captions, fit="pad")
    input_ids = tokenize_open_clip(tokenizer, captions, model.config.context_length).to(pixel_values.device)
    image_features = model.encode_image(pixel_values).float()
    text_features = model.encode_text(input_ids).float()
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return (image_features * text_features).sum(-1)


def load_hps(
    weights_path: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    config: OpenCLIPConfig = VIT_H_14,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Builds `OpenCLIP(config)` and loads `HPS_v2.1_compressed.pt` (or any OpenCLIP state dict).

    Args:
        weights_path: .pt/.pth (`{"state_dict": …}` or raw) or .safetensors, OpenCLIP key names.
        tokenizer_path: local folder with a `CLIPTokenizer` (`vocab.json`, `merges.txt`).
        config: architecture; ViT-H-14 for HPS v2 / v2.1.

    Returns:
        `(model, tokenizer)`, the model in eval mode.
    """
    from transformers import CLIPTokenizer

    model = OpenCLIP(config)
    state_dict = load_state_dict_file(weights_path)
    load_into(
        model, {key: value.float() for key, value in state_dict.items()}, source=os.fspath(weights_path)
    )
    tokenizer = load_tokenizer(CLIPTokenizer, tokenizer_path, ("vocab.json", "merges.txt"))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), tokenizer
