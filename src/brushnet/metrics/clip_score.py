"""CLIP score (Hessel et al. 2021, "CLIPScore", Eq. 1 with w = 100) with CLIP ViT-L/14.

`CLIPScore(I, C) = 100 · max(cos(E_I, E_C), 0)`, the definition of torchmetrics' `CLIPScore`, which
BrushBench calls with `model_name_or_path="openai/clip-vit-large-patch14"` on the whole generated
image. (torchmetrics clamps the *mean* over a batch at 0; per image, as here, that is the same as
clamping each value since BrushBench scores one image per call.)

The model is a `transformers.CLIPModel` loaded from a local folder (the Hugging Face layout of
`openai/clip-vit-large-patch14`); images are preprocessed in torch (`clip_preprocess`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .preprocess import clip_preprocess

__all__ = ["clip_image_embeddings", "clip_text_embeddings", "clip_score", "load_clip"]


def clip_image_embeddings(model, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised CLIP image embeddings.

    Args:
        model: `transformers.CLIPModel`.
        images: `N×3×H×W` in [0, 1]; resized/cropped to the model's input size here.

    Returns:
        `N×D` unit vectors (float32).
    """
    parameter = next(model.parameters())
    pixel_values = clip_preprocess(images.float(), size=model.config.vision_config.image_size)
    pooled = model.vision_model(pixel_values=pixel_values.to(parameter)).pooler_output
    embeddings = model.visual_projection(pooled).float()
    return embeddings / embeddings.norm(dim=-1, keepdim=True)


def clip_text_embeddings(model, tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """L2-normalised CLIP text embeddings, tokenised as torchmetrics does.

    Captions are padded to the longest in the batch and, if longer than the model's context
    (77 tokens), cut to it after tokenisation (torchmetrics' behaviour; it warns).

    Returns:
        `N×D` unit vectors (float32).
    """
    device = next(model.parameters()).device
    tokens = tokenizer(list(captions), padding=True, return_tensors="pt")
    context = model.config.text_config.max_position_embeddings
    input_ids = tokens["input_ids"][:, :context].to(device)
    attention_mask = tokens["attention_mask"][:, :context].to(device)
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    embeddings = model.text_projection(pooled).float()
    return embeddings / embeddings.norm(dim=-1, keepdim=True)


@torch.no_grad()
def clip_score(model, tokenizer, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """Per-image CLIP score `100 · max(cos(image, caption), 0)`.

    Args:
        model: `transformers.CLIPModel` (see `load_clip`).
        tokenizer: its `CLIPTokenizer`.
        images: `N×3×H×W` in [0, 1] (the whole generated images).
        captions: N strings.

    Returns:
        `N` scores in [0, 100]. BrushBench tables print this value as is.
    """
    if len(captions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    cosine = (clip_image_embeddings(model, images) * clip_text_embeddings(model, tokenizer, captions)).sum(-1)
    return 100.0 * cosine.clamp_min(0.0)


def load_clip(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """Loads `CLIPModel` and `CLIPTokenizer` from a local folder (no download is attempted).

    Args:
        path: folder in the Hugging Face layout (`config.json`, weights, `vocab.json`, `merges.txt`).

    Returns:
        `(model, tokenizer)`, the model in eval mode.
    """
    import json

    from transformers import CLIPModel, CLIPTokenizer

    from .checkpoint import load_tokenizer

    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: not a CLIP model folder (config.json: {exc})") from None
    if model_type != "clip":
        raise ValueError(
            f"{path}: a {model_type!r} model, not CLIP (CLIPModel, config model_type 'clip': both towers, e.g. "
            "openai/clip-vit-large-patch14)"
        )
    tokenizer = load_tokenizer(CLIPTokenizer, path, ("vocab.json", "merges.txt"))
    model, info = CLIPModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
    # older checkpoints store position_ids, which recent transformers keep as a buffer outside the state dict
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
    unexpected = [k for k in info.get("unexpected_keys", ()) if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match CLIPModel ({len(missing)} missing, e.g. {sorted(missing)[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {sorted(unexpected)[:3]})"
        )
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), tokenizer
