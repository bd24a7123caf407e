"""Training-mask generators: segmentation picks, free-form brush strokes, opening and hole/kept swap.

Everything here is a pure function of its arguments and a ``numpy.random.Generator``: the same generator
state gives the same mask. Masks are boolean ``(height, width)`` arrays with the project's convention,
``True`` = hole = the region to generate, ``False`` = keep.

The recipe follows the BrushNet paper's training data (reference README, section 5): per sample either one
segmentation mask picked at random or a free-form brush mask (the algorithm of Yu et al., "Free-Form Image
Inpainting with Gated Convolution", ICCV 2019, with BrushNet's parameters), then with probability
``p_open`` a morphological opening and with probability ``p_swap`` a swap of hole and kept region.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .rle import decode_brushdata_rle

__all__ = [
    "BrushConfig",
    "MaskConfig",
    "brush_stroke_width",
    "make_training_mask",
    "morphological_opening",
    "pick_segmentation_mask",
    "random_brush_mask",
    "sample_brush_strokes",
]


class BrushConfig(BaseModel):
    """Parameters of the free-form brush (defaults: BrushNet's random-mask training).

    The segment length of each stroke is drawn from N(r, r/2) clipped to [0, 2r] with r = √(H² + W²)/8, so it
    scales with the canvas. The stroke width is ``stroke_width`` pixels on a canvas whose short side is
    ``stroke_width_reference`` and scales in proportion to the short side elsewhere (a 1024×768 image gets
    1.5× the width of a 512×512 one); ``stroke_width_reference=None`` means ``stroke_width`` absolute pixels.
    """

    model_config = ConfigDict(extra="forbid")

    min_strokes: int = Field(0, ge=0, description="Fewest strokes per mask.")
    max_strokes: int = Field(3, ge=0, description="Most strokes per mask.")
    min_vertices: int = Field(0, ge=0, description="Fewest segments per stroke (a stroke of 0 is a dot).")
    max_vertices: int = Field(7, ge=0, description="Most segments per stroke.")
    mean_angle: float = Field(2 * math.pi / 5, description="Mean turning angle between segments (radians).")
    angle_range: float = Field(2 * math.pi / 15, ge=0, description="Spread of the turning angle (radians).")
    stroke_width: float = Field(
        128.0, gt=0, description="Stroke width in pixels at the reference short side."
    )
    stroke_width_reference: int | None = Field(
        512, gt=0, description="Short side at which `stroke_width` holds; None = absolute pixels."
    )
    p_flip_horizontal: float = Field(0.5, ge=0, le=1, description="Probability of a left-right flip.")
    p_flip_vertical: float = Field(0.5, ge=0, le=1, description="Probability of a top-bottom flip.")

    @model_validator(mode="after")
    def _check_ranges(self) -> BrushConfig:
        if self.min_strokes > self.max_strokes:
            raise ValueError(f"min_strokes ({self.min_strokes}) > max_strokes ({self.max_strokes})")
        if self.min_vertices > self.max_vertices:
            raise ValueError(f"min_vertices ({self.min_vertices}) > max_vertices ({self.max_vertices})")
        return self


class MaskConfig(BaseModel):
    """How a training mask is made (defaults: the BrushNet paper's segmentation-mask model).

    ``mode``: ``"segmentation"`` picks one of the sample's segmentation masks, ``"brush"`` draws a free-form
    brush mask, ``"mix"`` draws a brush mask with probability ``p_brush`` and a segmentation mask otherwise.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["segmentation", "brush", "mix"] = Field("segmentation", description="Mask source.")
    p_brush: float = Field(0.5, ge=0, le=1, description='In "mix" mode, probability of a brush mask.')
    p_open: float = Field(0.3, ge=0, le=1, description="Probability of a morphological opening.")
    open_size: int = Field(8, ge=1, description="Side of the square structuring element of the opening.")
    p_swap: float = Field(0.5, ge=0, le=1, description="Probability of swapping hole and kept region.")
    brush: BrushConfig = Field(default_factory=BrushConfig, description="Free-form brush parameters.")


def brush_stroke_width(height: int, width: int, brush: BrushConfig) -> int:
    """Stroke width in pixels of the brush on a ``height × width`` canvas (at least 1)."""
    if brush.stroke_width_reference is None:
        return max(1, round(brush.stroke_width))
    return max(1, round(brush.stroke_width * min(height, width) / brush.stroke_width_reference))


def sample_brush_strokes(
    height: int, width: int, rng: np.random.Generator, brush: BrushConfig | None = None
) -> list[np.ndarray]:
    """Sample the polylines of a free-form brush mask (no drawing).

    Each stroke starts at a uniform point of the canvas, ``x`` in ``[0, width - 1]``, ``y`` in ``[0, height - 1]``
    (the original code swapped height and width here, which confined strokes to a square on non-square
    canvases), then takes ``n`` segments, ``n`` uniform in ``[min_vertices, max_vertices]``. The turning
    angles alternate direction: even segments turn by ``2π - a``, odd ones by ``a``, with ``a`` uniform in
    ``[mean - u₁, mean + u₂]`` (``u₁, u₂`` uniform in ``[0, angle_range]``, drawn per stroke). Segment
    lengths are N(r, r/2) clipped to [0, 2r], r = √(H² + W²)/8; vertices are clipped to the canvas.

    Args:
        height, width: canvas size in pixels.
        rng: source of randomness.
        brush: brush parameters; default :class:`BrushConfig`.

    Returns:
        One ``(n + 1, 2)`` float array of ``(x, y)`` vertices per stroke.
    """
    brush = brush or BrushConfig()
    if height < 1 or width < 1:
        raise ValueError(f"canvas must be at least 1x1, got {height}x{width}")
    radius = math.sqrt(height * height + width * width) / 8
    strokes = []
    for _ in range(int(rng.integers(brush.min_strokes, brush.max_strokes + 1))):
        num_segments = int(rng.integers(brush.min_vertices, brush.max_vertices + 1))
        angle_min = brush.mean_angle - rng.uniform(0, brush.angle_range)
        angle_max = brush.mean_angle + rng.uniform(0, brush.angle_range)
        turns = rng.uniform(angle_min, angle_max, size=num_segments)
        turns[0::2] = 2 * math.pi - turns[0::2]
        vertices = np.empty((num_segments + 1, 2), dtype=np.float64)
        vertices[0] = (rng.uniform(0, width - 1), rng.uniform(0, height - 1))
        lengths = np.clip(rng.normal(radius, radius / 2, size=num_segments), 0, 2 * radius)
        for i in range(num_segments):
            x = vertices[i, 0] + lengths[i] * math.cos(turns[i])
            y = vertices[i, 1] + lengths[i] * math.sin(turns[i])
            vertices[i + 1] = (min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0))
        strokes.append(vertices)
    return strokes


def random_brush_mask(
    height: int, width: int, rng: np.random.Generator, brush: BrushConfig | None = None
) -> np.ndarray:
    """Draw a free-form brush mask: thick polylines with round joints, then random flips.

    The strokes come from :func:`sample_brush_strokes`; each is drawn as lines of width
    :func:`brush_stroke_width` between its vertices plus a disc of the same diameter at every vertex (round
    joints and caps). The two flips are decided by two uniforms that are always drawn, so the generator
    advances the same way whatever the flip probabilities.

    Args:
        height, width: mask size in pixels.
        rng: source of randomness.
        brush: brush parameters; default :class:`BrushConfig`.

    Returns:
        Boolean ``(height, width)`` mask, ``True`` = hole.
    """
    brush = brush or BrushConfig()
    strokes = sample_brush_strokes(height, width, rng, brush)
    stroke_width = brush_stroke_width(height, width, brush)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    half = stroke_width / 2
    for vertices in strokes:
        points = [(float(x), float(y)) for x, y in vertices]
        if len(points) > 1:
            draw.line(points, fill=255, width=stroke_width)
        for x, y in points:
            draw.ellipse((x - half, y - half, x + half, y + half), fill=255)
    mask = np.asarray(canvas) > 127
    flip_horizontal, flip_vertical = rng.random(2)
    if flip_horizontal < brush.p_flip_horizontal:
        mask = mask[:, ::-1]
    if flip_vertical < brush.p_flip_vertical:
        mask = mask[::-1, :]
    return np.ascontiguousarray(mask)


def pick_segmentation_mask(
    masks: Sequence[np.ndarray | Sequence[int]], rng: np.random.Generator, *, height: int, width: int
) -> np.ndarray:
    """Pick one segmentation mask uniformly at random.

    Args:
        masks: decoded boolean ``(height, width)`` numpy arrays, or BrushData run-length lists (column-major,
            1-based, over ``height × width``); a run-length list is decoded only if it is picked.
        rng: source of randomness (one integer is drawn when ``masks`` is not empty).
        height, width: mask size; also the size of the empty mask returned when ``masks`` is empty.

    Returns:
        Boolean ``(height, width)`` mask, ``True`` = hole. No masks → all ``False`` (nothing hidden).
    """
    if len(masks) == 0:
        return np.zeros((height, width), dtype=bool)
    picked = masks[int(rng.integers(len(masks)))]
    if isinstance(picked, np.ndarray) and picked.ndim == 2:
        if picked.shape != (height, width):
            raise ValueError(f"segmentation mask has shape {picked.shape}, expected {(height, width)}")
        return picked.astype(bool, copy=True)
    return decode_brushdata_rle(picked, height, width)


def _window_sums(values: np.ndarray, size: int) -> np.ndarray:
    """Sums over every ``size × size`` window lying inside ``values`` (shape ``(H - size + 1, W - size + 1)``)."""
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(values, axis=0, dtype=np.int64), axis=1, out=table[1:, 1:])
    return table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]


def morphological_opening(mask: np.ndarray, size: int = 8) -> np.ndarray:
    """Binary opening of a mask by a ``size × size`` square (erosion, then dilation by the same square).

    The result is the union of all ``size × size`` squares that fit inside the mask (and inside the image),
    so hole parts narrower than ``size`` in either direction — specks, thin lines — disappear and everything
    else is kept exactly. Computed with summed-area tables, any ``size`` (even ones included), no scipy.

    Args:
        mask: boolean (or 0/1) ``(H, W)`` array.
        size: side of the square structuring element, ≥ 1.

    Returns:
        Boolean ``(H, W)`` array, a subset of ``mask``.
    """
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    height, width = mask.shape
    if size > height or size > width:
        return np.zeros_like(mask)
    # fits[i, j]: the square with top-left corner (i, j) lies inside the mask.
    fits = _window_sums(mask, size) == size * size
    # A pixel survives when some fitting square covers it: pad so every window of `fits` ending at the
    # pixel is counted.
    padded = np.pad(fits, size - 1)
    return _window_sums(padded, size) > 0


def make_training_mask(
    segmentations: Sequence[np.ndarray | Sequence[int]],
    height: int,
    width: int,
    rng: np.random.Generator,
    config: MaskConfig | None = None,
) -> np.ndarray:
    """Make one training mask following ``config``: pick or draw, maybe open, maybe swap.

    The steps, in order: choose the source (``"mix"`` draws one uniform against ``p_brush``), make the mask
    (:func:`pick_segmentation_mask` or :func:`random_brush_mask`), with probability ``p_open`` apply
    :func:`morphological_opening` with ``open_size``, with probability ``p_swap`` invert the mask. Made at
    the sample's original size; resizing and cropping come after (:mod:`brushnet.data.transforms`).

    Args:
        segmentations: the sample's segmentation masks (see :func:`pick_segmentation_mask`); ignored in
            ``"brush"`` mode. Empty → nothing hidden (before the swap).
        height, width: mask size in pixels (the original image size).
        rng: source of randomness.
        config: mask recipe; default :class:`MaskConfig` (segmentation mode).

    Returns:
        Boolean ``(height, width)`` mask, ``True`` = hole.
    """
    config = config or MaskConfig()
    use_brush = config.mode == "brush" or (config.mode == "mix" and rng.random() < config.p_brush)
    if use_brush:
        mask = random_brush_mask(height, width, rng, config.brush)
    else:
        mask = pick_segmentation_mask(segmentations, rng, height=height, width=width)
    if rng.random() < config.p_open:
        mask = morphological_opening(mask, config.open_size)
    if rng.random() < config.p_swap:
        mask = ~mask
    return mask
