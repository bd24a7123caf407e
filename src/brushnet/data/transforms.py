"""Training transforms: resize the short side, crop image and mask together, convert to tensors.

An image and its mask always go through the same geometry: the mask is resized to exactly the image's
resized size (nearest neighbour, so it stays binary) and cropped at the same offsets, so a mask pixel keeps
marking the image pixel it marked before.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["crop_offsets", "prepare_training_pair", "resized_size"]


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """Size ``(height, width)`` after resizing the short side to ``resolution`` (aspect ratio kept).

    The long side is rounded to the nearest pixel and never smaller than ``resolution``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1x1, got {height}x{width}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    scale = resolution / min(height, width)
    if height <= width:
        return resolution, max(resolution, round(width * scale))
    return max(resolution, round(height * scale)), resolution


def crop_offsets(
    height: int, width: int, resolution: int, rng: np.random.Generator | None = None
) -> tuple[int, int]:
    """Top-left corner ``(top, left)`` of a ``resolution × resolution`` crop of a ``height × width`` image.

    Uniform over all valid corners when ``rng`` is given (two integers are drawn, always), centred otherwise.
    """
    if height < resolution or width < resolution:
        raise ValueError(f"cannot crop {resolution}x{resolution} from {height}x{width}")
    if rng is None:
        return (height - resolution) // 2, (width - resolution) // 2
    top = int(rng.integers(0, height - resolution + 1))
    left = int(rng.integers(0, width - resolution + 1))
    return top, left


def prepare_training_pair(
    image: Image.Image, mask: np.ndarray, resolution: int, rng: np.random.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Resize the short side to ``resolution`` and crop a square, identically for the image and the mask.

    Args:
        image: the original image (any PIL mode; converted to RGB), size ``W × H``.
        mask: boolean ``(H, W)`` mask of the same original size, ``True`` = hole.
        resolution: side of the output square.
        rng: random crop when given; centre crop (evaluation) when ``None``.

    Returns:
        ``{"pixel_values": float32 (3, R, R) in [-1, 1], "mask": float32 (1, R, R) in {0, 1}, "original_size":
        int64 (2,), "crop_top_left": int64 (2,)}``, mask 1 = hole; ``original_size`` is the image's
        ``(height, width)`` before resizing and ``crop_top_left`` the crop's ``(top, left)`` in the resized
        image (SDXL's size and crop conditioning).
    """
    mask = np.asarray(mask)
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask has shape {mask.shape}, image is {image.height}x{image.width}")
    new_height, new_width = resized_size(image.height, image.width, resolution)
    image = image.convert("RGB")
    mask_image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    if (new_height, new_width) != (image.height, image.width):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
        mask_image = mask_image.resize((new_width, new_height), Image.Resampling.NEAREST)
    top, left = crop_offsets(new_height, new_width, resolution, rng)
    box = (left, top, left + resolution, top + resolution)
    pixels = np.asarray(image.crop(box), dtype=np.float32)
    hole = np.asarray(mask_image.crop(box)) > 127
    pixel_values = torch.from_numpy(pixels).permute(2, 0, 1).contiguous() / 127.5 - 1.0
    return {
        "pixel_values": pixel_values,
        "mask": torch.from_numpy(hole.astype(np.float32))[None],
        "original_size": torch.tensor([mask.shape[0], mask.shape[1]]),
        "crop_top_left": torch.tensor([top, left]),
    }
