"""ImageReward v1.0 (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation"): a BLIP ViT-L/16 image encoder, a BERT-base text encoder whose layers
cross-attend to the image tokens (BLIP's "med" BERT), and a linear stack on the [CLS] output.

`reward = (MLP(h_[CLS]) − μ) / σ` with μ = 0.16717362830052426, σ = 1.0333394966054072. BrushBench
tables print reward ×10.

Facts taken from the released `ImageReward` package: `BLIP_Pretrain(image_size=224, vit="large")`
(so the ViT runs at 224 px, 14×14 patches of 16 — not BLIP's usual 384), preprocessing = bicubic resize
of the shortest side to 224, centre crop, OpenAI CLIP mean/std; captions tokenised by BLIP's
`bert-base-uncased` tokenizer (+ `[DEC]`, `[ENC]`; vocab 30524) padded/truncated to 35 tokens; the
[CLS] id is *not* replaced by `[ENC]` when scoring; MLP 768→1024→128→64→16→1 with no activations.

Key layout of `ImageReward.pt` reproduced here: `blip.visual_encoder.{cls_token,pos_embed,
patch_embed.proj.*,blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*,norm.*}`,
`blip.text_encoder.embeddings.{word_embeddings,position_embeddings,LayerNorm}.*`,
`blip.text_encoder.encoder.layer.N.{attention,crossattention}.{self.{query,key,value},output.{dense,
LayerNorm}}.*`, `…layer.N.intermediate.dense.*`, `…layer.N.output.{dense,LayerNorm}.*`,
`blip.vision_proj.*`, `blip.text_proj.*` (present in the file, unused by the score) and
`mlp.layers.{0,2,4,6,7}.*`. `blip.text_encoder.embeddings.position_ids` (a buffer) is accepted and
ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .aesthetic import PreferenceMLP
from .checkpoint import load_into, load_state_dict_file, load_tokenizer
from .preprocess import captioned_clip_input

__all__ = ["ImageRewardConfig", "IMAGE_REWARD_V1", "ImageReward", "image_reward_score", "load_image_reward"]

IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072


@dataclass(frozen=True)
class ImageRewardConfig:
    """Architecture; defaults are ImageReward v1.0 (BLIP ViT-L/16 at 224 px + BLIP med BERT-base)."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vocab_size: int = 30524
    max_position_embeddings: int = 512
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    embed_dim: int = 256
    mlp_hidden: tuple[int, int, int, int] = (1024, 128, 64, 16)
    max_text_length: int = 35


IMAGE_REWARD_V1 = ImageRewardConfig()


# ----------------------------------------------------------------------------- BLIP ViT (timm layout)
class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, width))


class ViTMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = ViTMlp(width, 4 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipVisionTransformer(nn.Module):
    """BLIP's ViT: patch conv (with bias), class token, learned positions, pre-LN blocks (LN eps 1e-6),
    final LayerNorm; returns every token (`N×(1+grid²)×width`)."""

    def __init__(self, config: ImageRewardConfig):
        super().__init__()
        grid = config.image_size // config.patch_size
        width = config.vision_width
        self.patch_embed = PatchEmbed(config.patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, width) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(width, config.vision_heads) for _ in range(config.vision_layers))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ----------------------------------------------------------------------------- BLIP "med" BERT
class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm (no token-type embeddings in BLIP's med BERT)."""

    def __init__(self, config: ImageRewardConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.text_width, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.text_width)
        self.LayerNorm = nn.LayerNorm(config.text_width, eps=1e-12)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions)[None])


class BertSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, key_value_width: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(key_value_width, width)
        self.value = nn.Linear(key_value_width, width)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, additive_mask: torch.Tensor | None
    ) -> torch.Tensor:
        n, length, width = x.shape
        head_dim = width // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, -1, self.heads, head_dim).transpose(1, 2)

        scores = split(self.query(x)) @ split(self.key(context)).transpose(-1, -2) / math.sqrt(head_dim)
        if additive_mask is not None:
            scores = scores + additive_mask
        out = scores.softmax(dim=-1) @ split(self.value(context))
        return out.transpose(1, 2).reshape(n, length, width)


class BertSelfOutput(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertAttention(nn.Module):
    def __init__(self, width: int, heads: int, key_value_width: int):
        super().__init__()
        self.self = BertSelfAttention(width, heads, key_value_width)
        self.output = BertSelfOutput(width)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, additive_mask: torch.Tensor | None
    ) -> torch.Tensor:
        return self.output(self.self(x, context, additive_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.dense = nn.Linear(hidden, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertLayer(nn.Module):
    """Post-LN BERT layer: self-attention, cross-attention to image tokens, feed-forward."""

    def __init__(self, config: ImageRewardConfig):
        super().__init__()
        width = config.text_width
        self.attention = BertAttention(width, config.text_heads, width)
        self.crossattention = BertAttention(width, config.text_heads, config.vision_width)
        self.intermediate = BertIntermediate(width, config.text_intermediate)
        self.output = BertOutput(config.text_intermediate, width)

    def forward(self, x: torch.Tensor, text_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, text_mask)
        x = self.crossattention(x, image_embeds, None)  # every image token is attended (all-ones mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: ImageRewardConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.text_layers))


class BlipTextEncoder(nn.Module):
    """BLIP med `BertModel(add_pooling_layer=False)` in multimodal mode."""

    def __init__(self, config: ImageRewardConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        x = self.embeddings(input_ids)
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0  # BERT's padding bias
        for layer in self.encoder.layer:
            x = layer(x, additive, image_embeds)
        return x


class Blip(nn.Module):
    def __init__(self, config: ImageRewardConfig):
        super().__init__()
        self.visual_encoder = BlipVisionTransformer(config)
        self.text_encoder = BlipTextEncoder(config)
        # In the published checkpoint (BLIP pre-training projections); not used by the reward.
        self.vision_proj = nn.Linear(config.vision_width, config.embed_dim)
        self.text_proj = nn.Linear(config.text_width, config.embed_dim)


class ImageReward(nn.Module):
    """ImageReward: `blip.*` + `mlp.layers.*`; `forward` returns normalised rewards `N`."""

    def __init__(self, config: ImageRewardConfig = IMAGE_REWARD_V1):
        super().__init__()
        self.config = config
        self.blip = Blip(config)
        self.mlp = PreferenceMLP(config.text_width, config.mlp_hidden)
        self.eval()

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image_embeds = self.blip.visual_encoder(pixel_values)
        hidden = self.blip.text_encoder(input_ids, attention_mask, image_embeds)
        head = next(self.mlp.parameters())
        reward = self.mlp(hidden[:, 0].to(head.dtype)).float().squeeze(-1)
        return (reward - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


@torch.no_grad()
def image_reward_score(
    model: ImageReward, tokenizer, images: torch.Tensor, captions: Sequence[str]
) -> torch.Tensor:
    """Per-image ImageReward v1.0 score.

    Args:
        model: `ImageReward` (see `load_image_reward`).
        tokenizer: BLIP's BERT tokenizer (`bert-base-uncased` vocabulary).
        images: `N×3×H×W` in [0, 1].
        captions: N strings.

    Returns:
        `N` normalised rewards (≈ zero mean, unit variance over the ImageReward data; ×10 in tables).
    """
    pixel_values = captioned_clip_input(model, images, captions)
    tokens = tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=model.config.max_text_length,
        return_tensors="pt",
    )
    return model(
        pixel_values,
        tokens["input_ids"].to(pixel_values.device),
        tokens["attention_mask"].to(pixel_values.device),
    ).float()


def load_image_reward(
    weights_path: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    config: ImageRewardConfig = IMAGE_REWARD_V1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Builds `ImageReward(config)` and loads `ImageReward.pt` (or a .safetensors with its keys).

    Args:
        weights_path: local checkpoint with the published key layout (see module docstring).
        tokenizer_path: local folder with a BERT tokenizer (`vocab.txt`; `bert-base-uncased`).
        config: architecture (ImageReward v1.0 by default).

    Returns:
        `(model, tokenizer)`, the model in eval mode.
    """
    from transformers import BertTokenizer

    model = ImageReward(config)
    state_dict = load_state_dict_file(weights_path)
    load_into(
        model,
        {key: value.float() for key, value in state_dict.items()},
        ignore=("blip.text_encoder.embeddings.position_ids",),
        source=os.fspath(weights_path),
    )
    tokenizer = load_tokenizer(BertTokenizer, tokenizer_path, ("vocab.txt",))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), tokenizer
