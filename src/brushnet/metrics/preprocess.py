"""CLIP-style image preprocessing in plain torch (no torchvision, no PIL round trip).

The reference evaluators torchmetrics' `CLIPScore`, ImageReward and the LAION aesthetic predictor
resize the shortest side to the model's input size with bicubic interpolation, centre-crop a square,
and normalise with the OpenAI CLIP mean/std (``fit="crop"``). The `hpsv2` package's scorer instead
resizes the *longest* side to the input size and pads the rest with black, centred (OpenCLIP's
``resize_longest_max`` transform; ``fit="pad"``); on square images the two are the same. They do it on
PIL uint8 images; doing it here on float tensors with antialiased bicubic resampling agrees to within
a few 1e-3 per pixel, not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "clip_preprocess", "captioned_clip_input"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    std: tuple[float, float, float] = OPENAI_CLIP_STD,
    fit: str = "crop",
) -> torch.Tensor:
    """Resize to `size` (bicubic, antialiased) and normalise: ``fit="crop"`` resizes the shortest side and
    centre-crops `size×size`; ``fit="pad"`` resizes the longest side and pads to `size×size` with black, centred
    (the left/top pad the smaller half).

    Args:
        images: `N×3×H×W` float in [0, 1].
        size: model input resolution.
        mean, std: per-channel normalisation.
        fit: "crop" or "pad".

    Returns:
        `N×3×size×size` float tensor, same dtype/device as `images`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be N×3×H×W, got {tuple(images.shape)}")
    if fit not in ("crop", "pad"):
        raise ValueError(f"fit must be 'crop' or 'pad', got {fit!r}")
    height, width = images.shape[-2:]
    if fit == "pad":
        scale = size / max(height, width)
        new_height, new_width = round(height * scale), round(width * scale)
        if (new_height, new_width) != (height, width):
            images = F.interpolate(
                images, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True
            ).clamp(0.0, 1.0)
        pad_h, pad_w = size - new_height, size - new_width
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return _normalise(images, mean, std)
    if height <= width:
        new_height, new_width = size, int(size * width / height)
    else:
        new_height, new_width = int(size * height / width), size
    if (new_height, new_width) != (height, width):
        images = F.interpolate(
            images, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True
        ).clamp(0.0, 1.0)
    top = (new_height - size) // 2
    left = (new_width - size) // 2
    images = images[..., top : top + size, left : left + size]
    return _normalise(images, mean, std)


def _normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def captioned_clip_input(
    model: torch.nn.Module, images: torch.Tensor, captions, fit: str = "crop"
) -> torch.Tensor:
    """The image input of a CLIP-style scorer with a caption per image (HPS, ImageReward): checks there is one
    caption per image, then :func:`clip_preprocess` at the model's ``config.image_size`` with ``fit``, in the
    model's dtype on its device.

    Args:
        model: the scorer (its ``config.image_size`` and first parameter are read).
        images: `N×3×H×W` in [0, 1].
        captions: N strings.
        fit: see :func:`clip_preprocess` (HPS: "pad").
    """
    if len(captions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    parameter = next(model.parameters())
    return clip_preprocess(images.float(), size=model.config.image_size, fit=fit).to(parameter)
