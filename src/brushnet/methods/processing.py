"""Pre- and post-processing shared by every method: mask grow/shrink, crop-to-mask, sizes, paste-back,
and the outpainting canvas helper. Pure functions on PIL images and boolean masks (True = hole)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import InputError
from ..image import blend_pil

__all__ = [
    "grow_mask",
    "mask_bbox",
    "crop_box",
    "processing_size",
    "Plan",
    "plan_region",
    "paste_back",
    "keep_alpha",
    "crop_padding_for",
    "outpaint_canvas",
]


def _any_within(mask: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """``out[i] = any(mask[i - radius : i + radius + 1])`` along ``axis`` (outside the image counts as False),
    from a running count: the same cost whatever the radius."""
    counts = np.cumsum(mask, axis=axis, dtype=np.int32)
    pad = [(0, 0)] * mask.ndim
    pad[axis] = (radius + 1, radius)
    counts = np.pad(counts, pad, mode="edge")
    zero = [slice(None)] * mask.ndim
    zero[axis] = slice(0, radius + 1)
    counts[tuple(zero)] = 0  # nothing counted before the first pixel
    size = mask.shape[axis]
    upper = [slice(None)] * mask.ndim
    lower = [slice(None)] * mask.ndim
    upper[axis] = slice(2 * radius + 1, 2 * radius + 1 + size)
    lower[axis] = slice(0, size)
    return counts[tuple(upper)] > counts[tuple(lower)]


def grow_mask(hole: np.ndarray, pixels: int) -> np.ndarray:
    """Dilate (``pixels > 0``) or erode (``pixels < 0``) a boolean mask by a square of radius ``|pixels|``.

    A square's dilation is separable (rows, then columns), and each pass counts the hole's pixels in a sliding
    window with a cumulative sum, so the cost is linear in the image's pixels and independent of the radius.
    Erosion is the dilation of the complement; pixels outside the image count as hole for it (a hole touching
    the border is not eaten from the border).
    """
    if pixels == 0:
        return hole
    radius = abs(pixels)
    mask = np.asarray(hole, dtype=bool)
    if pixels < 0:
        mask = ~mask
    grown = _any_within(_any_within(mask, radius, axis=1), radius, axis=0)
    return ~grown if pixels < 0 else grown


def mask_bbox(hole: np.ndarray) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the hole's pixels (right/bottom exclusive)."""
    ys, xs = np.nonzero(hole)
    if ys.size == 0:
        raise InputError("mask is empty: no white pixel marks a region to inpaint (white = inpaint)")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def crop_box(hole: np.ndarray, padding: int) -> tuple[int, int, int, int]:
    """The hole's bounding box grown by ``padding`` on each side, clipped to the image."""
    height, width = hole.shape
    left, top, right, bottom = mask_bbox(hole)
    return (
        max(0, left - padding),
        max(0, top - padding),
        min(width, right + padding),
        min(height, bottom + padding),
    )


def processing_size(width: int, height: int, resolution: int | None, multiple: int = 8) -> tuple[int, int]:
    """Size the model works at for a ``width × height`` region.

    ``resolution=None`` keeps the size, rounded to the nearest multiple of ``multiple``; otherwise the region
    is scaled so its area is about ``resolution²`` (aspect kept), each side a multiple of ``multiple``.
    """
    if resolution is not None:
        scale = resolution / math.sqrt(width * height)
        width, height = width * scale, height * scale
    w = max(multiple, int(round(width / multiple)) * multiple)
    h = max(multiple, int(round(height / multiple)) * multiple)
    return w, h


@dataclass(frozen=True)
class Plan:
    """Where and at what size a method works: ``box`` of the original image, resized to ``size``."""

    box: tuple[int, int, int, int]
    size: tuple[int, int]
    whole_image: bool

    @property
    def resized(self) -> bool:
        """Whether the model works at a size other than the box's own (the region is resampled both ways)."""
        return self.size != (self.box[2] - self.box[0], self.box[3] - self.box[1])

    def as_dict(self) -> dict:
        return {
            "box": list(self.box),
            "size": list(self.size),
            "whole_image": self.whole_image,
            "resized": self.resized,
        }


def plan_region(
    hole: np.ndarray,
    crop_to_mask: bool,
    padding: int,
    resolution: int | None,
    native_resolution: int,
    multiple: int = 8,
) -> Plan:
    """Choose the region and working size: the whole image, or a padded box around the hole at the model's
    native resolution (AUTOMATIC1111's "only masked"); sides are multiples of ``multiple`` (the VAE factor)."""
    height, width = hole.shape
    if crop_to_mask:
        box = crop_box(hole, padding)
        bw, bh = box[2] - box[0], box[3] - box[1]
        return Plan(
            box, processing_size(bw, bh, resolution or native_resolution, multiple), whole_image=False
        )
    return Plan((0, 0, width, height), processing_size(width, height, resolution, multiple), whole_image=True)


def paste_back(
    original: Image.Image,
    generated: Image.Image,
    hole: np.ndarray,
    plan: Plan,
    blend: bool,
    blend_kernel_size: int = 21,
) -> Image.Image:
    """Put a result made at ``plan.size`` back into the original image at its original size.

    With ``blend``, the reference's feathered paste-back: pixels farther than ``blend_kernel_size // 2`` from
    the hole are byte-identical to the original. Without it: the whole-image result as is (resized back if the
    working size differed), or the crop box pasted in (pixels outside the box untouched).
    """
    left, top, right, bottom = plan.box
    box_size = (right - left, bottom - top)
    region = generated if generated.size == box_size else generated.resize(box_size, Image.Resampling.LANCZOS)
    if plan.whole_image:
        full = region
    else:
        full = original.copy()
        full.paste(region, (left, top))
    if blend:
        return blend_pil(original, full, hole, kernel_size=blend_kernel_size)
    return full


def crop_padding_for(request) -> int:
    """The padding of the crop box around the hole: ``crop_padding``, widened to ``blend_kernel_size // 2``
    when the result is blended, so that the feathered edge lies inside the box (a narrower box cut the feather
    off at its edge: a hard seam where the generated region met the untouched input)."""
    if request.blend:
        return max(request.crop_padding, request.blend_kernel_size // 2)
    return request.crop_padding


def keep_alpha(
    result: Image.Image, alpha: Image.Image, hole: np.ndarray, blend: bool, blend_kernel_size: int = 21
) -> Image.Image:
    """``result`` (RGB, pasted back) as RGBA with the input's ``alpha`` (mode L) where the result keeps the
    input, opaque in the hole (generated pixels are opaque), and between the two in the feathered band with the
    same weights as the colours (with ``blend``; without it the hole's edge is sharp)."""
    opaque = Image.new("RGB", alpha.size, (255, 255, 255))
    mixed = blend_pil(alpha.convert("RGB"), opaque, hole, kernel_size=blend_kernel_size if blend else 1)
    out = result.convert("RGBA")
    out.putalpha(mixed.getchannel("R"))
    return out


def outpaint_canvas(
    image: Image.Image,
    left: int = 0,
    top: int = 0,
    right: int = 0,
    bottom: int = 0,
    overlap: int = 0,
    fill: str = "edge",
) -> tuple[Image.Image, np.ndarray]:
    """Extend the canvas by the given pixels per side; return the new image and its mask (True = to generate).

    Args:
        left, top, right, bottom: pixels added on each side (≥ 0).
        overlap: also regenerate this many pixels of the original along each extended side, so the seam is
            painted over.
        fill: how the new area is pre-filled: "edge" (replicate border pixels, a neutral start for the VAE
            latent) or "black".
    """
    if fill not in ("edge", "black"):
        raise InputError(f"outpainting fill must be 'edge' or 'black', got {fill!r}")
    if min(left, top, right, bottom, overlap) < 0:
        raise InputError("outpainting extents must be ≥ 0")
    if left + top + right + bottom == 0:
        raise InputError("outpainting needs at least one side to extend")
    width, height = image.size
    for size, sides, axis in (
        (width, (left > 0) + (right > 0), "width"),
        (height, (top > 0) + (bottom > 0), "height"),
    ):
        if sides and overlap * sides >= size:
            raise InputError(
                f"outpainting overlap {overlap} reaches across the original's {axis} of {size} px from "
                f"{'both extended sides' if sides == 2 else 'the extended side'}, so none of it would be kept; "
                f"use an overlap below {(size + sides - 1) // sides}"
            )
    arr = np.asarray(image.convert("RGB"))
    pad = ((top, bottom), (left, right), (0, 0))
    canvas = np.pad(arr, pad, mode="edge") if fill == "edge" else np.pad(arr, pad, mode="constant")
    hole = np.ones(canvas.shape[:2], dtype=bool)
    h, w = arr.shape[:2]
    y0 = top + (overlap if top else 0)
    y1 = top + h - (overlap if bottom else 0)
    x0 = left + (overlap if left else 0)
    x1 = left + w - (overlap if right else 0)
    hole[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = False
    return Image.fromarray(canvas), hole
