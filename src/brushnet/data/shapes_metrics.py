"""Text-alignment metrics for the shapes world: which colour and which shape ended up in the hole.

Because the world is known (:mod:`brushnet.data.shapes`), "does the inpainted region show *a red
circle*?" can be answered from geometry instead of a learned model:

- :func:`dominant_colour` estimates the surrounding background from a thin ring of kept pixels just
  outside the hole, drops hole pixels that look like that background, snaps the rest to the nearest
  :data:`~brushnet.data.shapes.PALETTE` colour (RGB distance) and returns the most frequent name;
- :func:`classify_shape` takes the largest 8-connected blob of a given colour inside the hole and names
  its shape from rotation-invariant numbers. The *symmetry* comes from the blob's outline: its radius from
  the centroid as a function of angle, whose Fourier amplitudes at 3, 4 and 5 turns (relative to the mean
  radius, :func:`shape_harmonics`) single out a triangle, a four-fold shape and a star, and are all small for a
  circle. *Solidity* (area / convex-hull area, :func:`shape_features`) tells a square (0.94 as rendered) from a
  cross (0.71). The amplitudes survive the blur of a VAE round trip and a few pixels of dilation, which the
  earlier (solidity, fill) prototypes did not: they read a decoded star as a cross (a round trip through the
  demo world's VAE kept 15 % of stars and 86 % of triangles recognisable; the harmonics keep 93 % and 99 %,
  ``tests/data/test_shapes_metrics.py``).

All functions are pure numpy. Images are ``(H, W, 3)`` arrays, ``uint8`` in 0–255 or float in [0, 1]
(or PIL images); region masks are boolean ``(H, W)``, ``True`` = the generated region.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .shapes import PALETTE, dilate_mask

__all__ = [
    "classify_shape",
    "colour_accuracy",
    "dominant_colour",
    "largest_component",
    "object_fraction",
    "prompted_scores",
    "removal",
    "REMOVAL_MAX_OBJECT_FRACTION",
    "shape_accuracy",
    "shape_features",
    "shape_harmonics",
    "text_alignment",
]

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.asarray([PALETTE[name] for name in _PALETTE_NAMES], dtype=np.float64)


def _as_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    """Image → float64 ``(H, W, 3)`` array in 0–255."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    return np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0


def _as_mask(region_mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(region_mask).astype(bool)
    if mask.shape != shape[:2]:
        raise ValueError(f"region_mask shape {mask.shape} does not match image shape {shape[:2]}")
    return mask


def _ring_colours(rgb: np.ndarray, mask: np.ndarray, ring_width: int) -> np.ndarray | None:
    """The distinct colours of the ring of kept pixels ``ring_width`` wide around ``mask`` (quantised to 4 levels
    per step), ``(K, 3)`` float; ``None`` without a ring."""
    ring = dilate_mask(mask, ring_width) & ~mask
    if not ring.any():
        return None
    return np.unique(np.rint(rgb[ring] / 4.0), axis=0) * 4.0


def _nearest_ring_colour_sq(pixels: np.ndarray, ring_colours: np.ndarray) -> np.ndarray:
    """Squared RGB distance from each of ``pixels`` to the nearest of ``ring_colours``."""
    ring_sq = (ring_colours**2).sum(axis=1)
    nearest_sq = np.empty(len(pixels))
    for start in range(0, len(pixels), 2048):  # chunks keep the distance matrix small
        chunk = pixels[start : start + 2048]
        dist_sq = (chunk**2).sum(axis=1)[:, None] + ring_sq[None, :] - 2.0 * chunk @ ring_colours.T
        nearest_sq[start : start + 2048] = dist_sq.min(axis=1)
    return nearest_sq


def _colour_pixels(
    rgb: np.ndarray,
    mask: np.ndarray,
    ring_width: int,
    background_tolerance: float,
    max_palette_distance: float,
) -> np.ndarray:
    """Palette index per pixel of ``rgb`` (``-1`` outside ``mask``, on background-like or off-palette pixels)."""
    labels = np.full(mask.shape, -1, dtype=np.int64)
    if not mask.any():
        return labels
    pixels = rgb[mask]
    keep = np.ones(len(pixels), dtype=bool)
    ring_colours = _ring_colours(rgb, mask, ring_width)
    if ring_colours is not None:
        keep &= _nearest_ring_colour_sq(pixels, ring_colours) > background_tolerance**2
    palette_dist = np.linalg.norm(pixels[:, None, :] - _PALETTE_RGB[None, :, :], axis=-1)
    nearest = palette_dist.argmin(axis=1)
    keep &= palette_dist.min(axis=1) <= max_palette_distance
    labels[mask] = np.where(keep, nearest, -1)
    return labels


def dominant_colour(
    image: np.ndarray | Image.Image,
    region_mask: np.ndarray,
    ring_width: int = 2,
    background_tolerance: float = 30.0,
    max_palette_distance: float = 120.0,
    min_fraction: float = 0.02,
) -> str | None:
    """The palette colour that dominates the non-background pixels of a region.

    Args:
        image: ``(H, W, 3)`` image (uint8 0–255, float in [0, 1], or PIL).
        region_mask: boolean ``(H, W)``, ``True`` = the generated region (the hole).
        ring_width: width in pixels of the ring of kept pixels around the hole used to estimate the
            background colours.
        background_tolerance: a hole pixel within this RGB distance (0–255 scale) of any ring colour
            counts as background and is ignored.
        max_palette_distance: pixels farther than this from every palette colour do not vote.
        min_fraction: return ``None`` when fewer than this fraction of the hole's pixels vote.

    Returns:
        The :data:`~brushnet.data.shapes.PALETTE` name with the most votes, or ``None`` when the hole
        holds (almost) nothing but background.
    """
    rgb = _as_rgb(image)
    mask = _as_mask(region_mask, rgb.shape)
    labels = _colour_pixels(rgb, mask, ring_width, background_tolerance, max_palette_distance)
    votes = np.bincount(labels[labels >= 0], minlength=len(_PALETTE_NAMES))
    if votes.sum() == 0 or votes.sum() < min_fraction * mask.sum():
        return None
    return _PALETTE_NAMES[int(votes.argmax())]


def colour_accuracy(
    image: np.ndarray | Image.Image, region_mask: np.ndarray, colour: str, **kwargs: float
) -> bool:
    """Whether the prompted ``colour`` is the :func:`dominant_colour` of the region (keywords go to it)."""
    if colour not in PALETTE:
        raise ValueError(f"unknown colour {colour!r}; expected one of {_PALETTE_NAMES}")
    return dominant_colour(image, region_mask, **kwargs) == colour


BACKGROUND_PALETTE_DISTANCE = 40.0
"""A palette colour this near (RGB, 0–255) a colour of the ring around a hole is the background's own, for
:func:`object_fraction` (the world jitters painted colours by at most about 17; palette colours are ~95 apart)."""

REMOVAL_MAX_OBJECT_FRACTION = 0.02
"""A hole counts as emptied when under this share of its pixels show an object colour (as :func:`dominant_colour`
finds no colour under its ``min_fraction``)."""


def object_fraction(
    image: np.ndarray | Image.Image,
    region_mask: np.ndarray,
    ring_width: int = 2,
    max_palette_distance: float = 120.0,
) -> float:
    """The share of a region's pixels that show an object colour: nearer to a
    :data:`~brushnet.data.shapes.PALETTE` colour (and within ``max_palette_distance`` of it) than to every colour
    of the ring of kept pixels around the region, and that palette colour is not the background's (within
    ``BACKGROUND_PALETTE_DISTANCE`` of a colour of the ring: the world paints a background in a jittered palette
    colour, and never an object in its background's colour).

    Unlike :func:`dominant_colour`'s fixed tolerance, the comparison is relative, so background regenerated a
    little off (a VAE round trip moves colours by tens of levels here and there, and blending puts exact pixels in
    the ring) still counts as background, while an object (a palette colour, never its background's) counts. The
    background's own palette colour is left out because a VAE that smooths a noise or checker texture gives
    in-between tones, which can lie nearer that palette colour than to any single tone of the ring.
    """
    rgb = _as_rgb(image)
    mask = _as_mask(region_mask, rgb.shape)
    if not mask.any():
        return 0.0
    pixels = rgb[mask]
    distances = np.linalg.norm(pixels[:, None, :] - _PALETTE_RGB[None, :, :], axis=-1)
    palette = distances.min(axis=1)
    shows = palette <= max_palette_distance
    ring_colours = _ring_colours(rgb, mask, ring_width)
    if ring_colours is not None:
        shows &= palette < np.sqrt(np.maximum(_nearest_ring_colour_sq(pixels, ring_colours), 0.0))
        to_ring = np.linalg.norm(_PALETTE_RGB[:, None, :] - ring_colours[None, :, :], axis=-1).min(axis=1)
        shows &= to_ring[distances.argmin(axis=1)] >= BACKGROUND_PALETTE_DISTANCE
    return float(shows.sum() / mask.sum())


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean ``(H, W)`` mask (empty mask → empty mask)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = mask[top:bottom, left:right]
    height, width = crop.shape
    # Label propagation: every pixel starts with its own id and takes the largest id among its
    # 8 neighbours until nothing changes; each component ends up labelled by its largest id.
    labels = np.where(crop, np.arange(1, crop.size + 1).reshape(crop.shape), 0)
    while True:
        padded = np.pad(labels, 1)
        best = labels.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    np.maximum(best, padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width], out=best)
        best[~crop] = 0
        if np.array_equal(best, labels):
            break
        labels = best
    ids, counts = np.unique(labels[crop], return_counts=True)
    out = np.zeros_like(mask)
    out[top:bottom, left:right] = labels == ids[counts.argmax()]
    return out


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (counter-clockwise, Andrew's monotone chain) of ``(N, 2)`` points."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return np.asarray(pts, dtype=np.float64)

    def half(sequence: list[tuple[float, float]]) -> list[tuple[float, float]]:
        chain: list[tuple[float, float]] = []
        for p in sequence:
            while len(chain) >= 2:
                (ax, ay), (bx, by) = chain[-2], chain[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain[:-1]

    return np.asarray(half(pts) + half(pts[::-1]), dtype=np.float64)


def shape_features(blob: np.ndarray) -> tuple[float, float]:
    """``(solidity, fill)`` of a boolean blob mask (see the module docstring); pixels are unit squares."""
    blob = np.asarray(blob, dtype=bool)
    area = float(blob.sum())
    if area == 0:
        raise ValueError("empty blob")
    ys, xs = np.nonzero(blob)
    # The hull of the pixel squares is the hull of the outer corners of each row's end pixels.
    rows = np.unique(ys)
    x_min = np.full(blob.shape[0], blob.shape[1])
    x_max = np.full(blob.shape[0], -1)
    np.minimum.at(x_min, ys, xs)
    np.maximum.at(x_max, ys, xs)
    corners = np.concatenate(
        [np.stack([x_min[rows], rows + dy], axis=1) for dy in (0, 1)]
        + [np.stack([x_max[rows] + 1, rows + dy], axis=1) for dy in (0, 1)]
    )
    hull = _convex_hull(corners)
    hx, hy = hull[:, 0], hull[:, 1]
    hull_area = 0.5 * abs(float(np.dot(hx, np.roll(hy, -1)) - np.dot(hy, np.roll(hx, -1))))
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    radius = float(np.hypot(hx - cx, hy - cy).max())
    return area / hull_area, area / (math.pi * radius * radius)


HARMONIC_BINS = 90
"""Angular bins of the outline profile :func:`shape_harmonics` transforms."""

LOBE_MIN_HARMONIC = 0.06
"""A 3- or 5-turn amplitude at least this large, and :data:`DOMINANCE` times every other of the 2- to 5-turn
amplitudes, makes a triangle or a star (as rendered: 0.16 and 0.17; decoded by the demo world's VAE: 0.13 and
0.10 and more; squares and crosses stay below 0.05 there); a 2-turn one makes the blob elongated, not a shape."""

DOMINANCE = 1.5
"""How many times the next 2- to 5-turn amplitude the one that names a lobed shape must be."""

SQUARE_MIN_SOLIDITY = 0.885
"""A blob without lobes this solid is a square or a circle; a less solid one with 4 turns strongest and at least
:data:`LOBE_MIN_HARMONIC` a cross (squares, rendered or decoded: 0.91 and more; crosses at most 0.84, 0.88 dilated
by 3 px)."""

CIRCLE_MIN_FILL = 0.75
"""A solid blob filling at least this share of its circumscribed circle (:func:`shape_features`; circles: 0.92
as rendered, 0.78 and more decoded; squares at most 0.70) is a circle if all its 2- to 5-turn amplitudes stay
below :data:`CIRCLE_MAX_HARMONIC`; one filling less is a square if 4 turns are its strongest or all stay below
it (a square with rounded corners has small amplitudes too)."""

CIRCLE_MAX_HARMONIC = 0.05
"""See :data:`CIRCLE_MIN_FILL` (rendered circles: at most 0.03; rendered squares: 0.06 and more)."""


def shape_harmonics(blob: np.ndarray, bins: int = HARMONIC_BINS) -> np.ndarray:
    """Fourier amplitudes of a boolean blob's outline: the largest distance from the blob's centroid to a corner
    of its pixels in each of ``bins`` angular bins (bins no corner falls in are interpolated from their
    neighbours), transformed over the angle. Entry ``k`` is the amplitude of ``k`` turns divided by ``bins`` times
    the mean radius (half the relative depth of a ``k``-fold ripple: about 0.16 for a rendered triangle at 3, a
    cross at 4 and a star at 5); entry 0 is 1."""
    blob = np.asarray(blob, dtype=bool)
    if not blob.any():
        raise ValueError("empty blob")
    ys, xs = np.nonzero(blob)
    cy, cx = ys.mean(), xs.mean()
    corner_y = (ys[:, None] + np.array([-0.5, -0.5, 0.5, 0.5]) - cy).ravel()
    corner_x = (xs[:, None] + np.array([-0.5, 0.5, -0.5, 0.5]) - cx).ravel()
    angle = np.arctan2(corner_y, corner_x)
    index = ((angle + np.pi) / (2 * np.pi) * bins).astype(np.int64) % bins
    profile = np.zeros(bins)
    np.maximum.at(profile, index, np.hypot(corner_y, corner_x))
    filled = profile > 0
    if not filled.all():  # a small blob leaves some bins without a corner
        where = np.flatnonzero(filled)
        profile = np.interp(np.arange(bins), where, profile[where], period=bins)
    return np.abs(np.fft.rfft(profile)) / (profile.mean() * bins)


def _shape_of_blob(blob: np.ndarray) -> str | None:
    """The shape name of a (non-empty) blob, or ``None`` when it is elongated or matches no shape (see the
    constants above)."""
    harmonics = shape_harmonics(blob)
    solidity, fill = shape_features(blob)
    amplitudes = {turns: float(harmonics[turns]) for turns in (2, 3, 4, 5)}
    ranked = sorted(amplitudes, key=amplitudes.get, reverse=True)
    strongest, value = ranked[0], amplitudes[ranked[0]]
    if strongest != 4 and value >= LOBE_MIN_HARMONIC and value >= DOMINANCE * amplitudes[ranked[1]]:
        return {2: None, 3: "triangle", 5: "star"}[strongest]
    if solidity < SQUARE_MIN_SOLIDITY:
        return "cross" if strongest == 4 and value >= LOBE_MIN_HARMONIC else None
    if fill >= CIRCLE_MIN_FILL:
        return "circle" if value < CIRCLE_MAX_HARMONIC else None
    return "square" if strongest == 4 or value < CIRCLE_MAX_HARMONIC else None


def classify_shape(
    image: np.ndarray | Image.Image,
    region_mask: np.ndarray,
    colour: str,
    min_area: int = 16,
    **colour_kwargs: float,
) -> str | None:
    """Name the shape of the largest blob of ``colour`` inside a region.

    Hole pixels are assigned to palette colours as in :func:`dominant_colour` (background-like pixels
    dropped); the largest 8-connected blob of ``colour`` is named by its symmetry (:func:`shape_harmonics`: 3
    turns a triangle, 5 a star; without those lobes a cross if 4 turns are strongest and it is not solid,
    otherwise a circle or a square by how much of its circumscribed circle it fills).

    Args:
        image: ``(H, W, 3)`` image (uint8 0–255, float in [0, 1], or PIL).
        region_mask: boolean ``(H, W)``, ``True`` = the generated region.
        colour: the :data:`~brushnet.data.shapes.PALETTE` name whose blob to classify (the prompted or
            the :func:`dominant_colour`).
        min_area: blobs smaller than this many pixels are not classified.
        colour_kwargs: ``ring_width``, ``background_tolerance``, ``max_palette_distance`` as in
            :func:`dominant_colour`.

    Returns:
        One of :data:`~brushnet.data.shapes.SHAPES`, or ``None`` when there is no blob of at least ``min_area``
        pixels, or it is elongated or has no clear symmetry.
    """
    if colour not in PALETTE:
        raise ValueError(f"unknown colour {colour!r}; expected one of {_PALETTE_NAMES}")
    rgb = _as_rgb(image)
    mask = _as_mask(region_mask, rgb.shape)
    labels = _colour_pixels(
        rgb,
        mask,
        int(colour_kwargs.get("ring_width", 2)),
        float(colour_kwargs.get("background_tolerance", 30.0)),
        float(colour_kwargs.get("max_palette_distance", 120.0)),
    )
    blob = largest_component(labels == _PALETTE_NAMES.index(colour))
    if blob.sum() < min_area:
        return None
    return _shape_of_blob(blob)


def shape_accuracy(
    image: np.ndarray | Image.Image, region_mask: np.ndarray, shape: str, colour: str, **kwargs: float
) -> bool:
    """Whether the largest ``colour`` blob in the region is classified as the prompted ``shape``."""
    return classify_shape(image, region_mask, colour, **kwargs) == shape


def prompted_scores(
    output: np.ndarray | Image.Image,
    original: np.ndarray | Image.Image,
    hole: np.ndarray,
    colour: str | None,
    shape: str | None,
) -> dict[str, bool | None]:
    """Whether the hole of ``output`` has the prompted ``colour`` / ``shape``: ``colour_ok`` / ``shape_ok`` with
    the background read from the output's own ring around the hole, ``colour_hole_ok`` / ``shape_hole_ok`` on
    the hole's content pasted into ``original`` (see :func:`text_alignment`); ``None`` where the prompt names no
    colour (or shape)."""
    rgb = _as_rgb(output).round().astype(np.uint8)  # uint8: the scorers read floats as 0-1
    hole = _as_mask(hole, rgb.shape)
    pasted = _as_rgb(original).round().astype(np.uint8)
    pasted[hole] = rgb[hole]
    scores = {}
    for suffix, pixels in (("", rgb), ("_hole", pasted)):
        scores[f"colour{suffix}_ok"] = None if colour is None else dominant_colour(pixels, hole) == colour
        scores[f"shape{suffix}_ok"] = (
            None if shape is None or colour is None else classify_shape(pixels, hole, colour) == shape
        )
    return scores


def text_alignment(image, item, mask_kind: str) -> dict[str, bool | None]:
    """The shapes world's text-alignment scores of a benchmark output (``brushnet bench run --score shapes``):
    ``colour_ok`` — the prompted colour dominates the hole; ``shape_ok`` — its blob has the prompted shape;
    ``colour_hole_ok`` / ``shape_hole_ok`` — the same on the hole's content pasted into the original image.

    The first pair takes the background colours from the ring of pixels around the hole in the output. On an
    output that was not pasted back, an object painted a little over the hole's edge puts its own colour in
    that ring and is then counted as background; the ``_hole`` pair reads the ring from the original, so it
    scores only what the method put in the hole (how well the rest was kept is the kept PSNR's job). On a
    pasted-back output the two agree up to the feathered edge.

    Scored for inside-inpainting only, on items whose metadata has a ``target`` (``{"colour", "shape"}``, as
    :func:`brushnet.data.shapes_writers.write_eval_set` writes it); otherwise no columns.
    """
    target = item.metadata.get("target")
    if mask_kind != "inside" or not isinstance(target, dict):
        return {}
    return prompted_scores(image, item.image, item.mask, target.get("colour"), target.get("shape"))


def removal(image, item, mask_kind: str) -> dict[str, bool | float]:
    """The shapes world's object-removal score of a benchmark output (``brushnet bench run --score removal``):
    ``object_fraction`` — the share of hole pixels with an object colour (:func:`object_fraction`), and
    ``removed`` — that share is under :data:`REMOVAL_MAX_OBJECT_FRACTION` (the hole holds background only).

    Scored for inside-inpainting only; meaningful on sets whose prompts ask for the object to go
    (:func:`brushnet.data.shapes_writers.write_eval_set` with ``removal=True``).
    """
    if mask_kind != "inside":
        return {}
    rgb = np.asarray(image.convert("RGB"))
    share = object_fraction(rgb, item.mask)
    return {"removed": share < REMOVAL_MAX_OBJECT_FRACTION, "object_fraction": share}
