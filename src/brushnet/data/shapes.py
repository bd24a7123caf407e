"""The procedural "shapes world": coloured shapes on patterned backgrounds, with exact masks and captions.

A scene holds 1–3 non-overlapping objects, each one of :data:`SHAPES` in one of the named colours of
:data:`PALETTE`, on a background of one of :data:`BACKGROUND_KINDS` with its own palette colour. Every
scene is a pure function of a ``numpy.random.Generator`` (:func:`sample_scene`) and renders to the same
pixels every time (:func:`render_scene`). Objects are filled polygons / ellipses drawn without
anti-aliasing, so each object's boolean mask is exactly the set of pixels painted in its colour.

Seed convention (see :func:`scene_rng`): scene ``index`` of a dataset built with ``seed`` for ``split``
is drawn from ``numpy.random.default_rng([SPLIT_IDS[split], seed, index])``. Training and evaluation
scenes therefore come from different seed sequences whatever the seeds, so they never coincide.

Geometry conventions: coordinates in pixels, ``x`` to the right, ``y`` down; masks are boolean
``(height, width)`` arrays, ``True`` on the object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUND_KINDS",
    "PALETTE",
    "SHAPES",
    "SPLIT_IDS",
    "Background",
    "Scene",
    "SceneObject",
    "caption_vocabulary",
    "dilate_mask",
    "object_mask",
    "object_phrase",
    "render_scene",
    "sample_scene",
    "scene_rng",
    "visible_masks",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
"""Shape names; all distinguishable from rotation-invariant geometry down to ~20 px."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 125, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
"""Named colours (sRGB 0–255) used for objects and backgrounds; pairwise at least ~95 apart in RGB."""

BACKGROUND_KINDS: tuple[str, ...] = ("flat", "gradient", "stripes", "checker", "noise")

# How each background kind is named in captions: (word before the colour, word after it).
_BACKGROUND_WORDS: dict[str, tuple[str | None, str | None]] = {
    "flat": ("plain", None),
    "gradient": (None, "gradient"),
    "stripes": ("striped", None),
    "checker": ("checkered", None),
    "noise": ("noisy", None),
}

SPLIT_IDS: dict[str, int] = {"train": 0, "eval": 1}
"""First word of every scene's seed sequence, one per split (see :func:`scene_rng`)."""

COLOUR_JITTER = 10
"""Objects and backgrounds get a per-channel offset uniform in ``[-COLOUR_JITTER, COLOUR_JITTER]``."""
SHADE_BLEND = 0.3
"""Patterned backgrounds alternate their colour with it blended this far toward white (dark colours) or black."""
NOISE_STD = 12.0
"""Standard deviation (0–255 scale) of the grey-level noise of ``noise`` backgrounds."""
MAX_ROTATION = 15.0
"""Objects are rotated uniformly in ``[-MAX_ROTATION, MAX_ROTATION]`` degrees from upright."""

# Circumradius of each shape relative to its nominal half-width, so shapes look about equally big.
_RADIUS_SCALE = {"circle": 1.0, "square": 1.2, "triangle": 1.2, "star": 1.2, "cross": 1.05}
_STAR_INNER_RATIO = 0.48
_CROSS_ARM_RATIO = 0.34  # half arm width / half span


def scene_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """The generator for scene ``index`` of a ``split`` (``"train"`` or ``"eval"``) dataset built with ``seed``.

    Returns ``numpy.random.default_rng([SPLIT_IDS[split], seed, index])``: each scene has its own
    stream (so datasets can be built in any order or in parallel) and the splits never share one.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([SPLIT_IDS[split], seed, index])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(shape: str, colour: str) -> str:
    """``"a red circle"``, ``"an orange star"``: how captions and prompts name one object."""
    return f"{_article(colour)} {colour} {shape}"


@dataclass(frozen=True)
class SceneObject:
    """One filled shape.

    Args:
        shape: one of :data:`SHAPES`.
        colour: a :data:`PALETTE` name; ``rgb`` is the (jittered) colour actually painted.
        center: ``(x, y)`` in pixels.
        radius: circumradius in pixels (the shape fits in the circle of this radius around ``center``).
        rotation: degrees, counter-clockwise on screen.
    """

    shape: str
    colour: str
    rgb: tuple[int, int, int]
    center: tuple[float, float]
    radius: float
    rotation: float

    @property
    def phrase(self) -> str:
        return object_phrase(self.shape, self.colour)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (what the data writers store next to each sample)."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "rgb": list(self.rgb),
            "center": [round(self.center[0], 3), round(self.center[1], 3)],
            "radius": round(self.radius, 3),
            "rotation": round(self.rotation, 3),
        }


@dataclass(frozen=True)
class Background:
    """The background pattern.

    Args:
        kind: one of :data:`BACKGROUND_KINDS`.
        colour: its :data:`PALETTE` name; ``rgb`` the painted (jittered) colour, ``shade_rgb`` the
            second tone of gradients, stripes and checkers.
        angle: direction of gradients and stripes, in degrees.
        period: stripe period / checker cell size, in pixels.
        noise_seed: seed of the per-pixel noise of ``noise`` backgrounds.
    """

    kind: str
    colour: str
    rgb: tuple[int, int, int]
    shade_rgb: tuple[int, int, int]
    angle: float = 0.0
    period: int = 16
    noise_seed: int = 0

    @property
    def phrase(self) -> str:
        before, after = _BACKGROUND_WORDS[self.kind]
        words = [w for w in (before, self.colour, after) if w]
        return f"{_article(words[0])} {' '.join(words)} background"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "colour": self.colour, "rgb": list(self.rgb)}


@dataclass(frozen=True)
class Scene:
    """A square ``size`` × ``size`` scene: a background and 1–3 objects drawn in order."""

    size: int
    background: Background
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    @property
    def caption(self) -> str:
        """E.g. ``"a red circle, a blue star and an orange cross on a striped green background"``."""
        phrases = [obj.phrase for obj in self.objects]
        if len(phrases) > 1:
            phrases = [", ".join(phrases[:-1]) + " and " + phrases[-1]]
        return f"{phrases[0]} on {self.background.phrase}" if phrases else self.background.phrase


def caption_vocabulary() -> list[str]:
    """Every token captions and prompts can contain: words plus the punctuation mark ``","``.

    Captions split into these tokens with ``caption.replace(",", " , ").split()``.
    """
    words = ["a", "an", "and", "on", "background", ","]
    for before, after in _BACKGROUND_WORDS.values():
        words += [w for w in (before, after) if w]
    return words + list(PALETTE) + list(SHAPES)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    offset = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + offset, 0, 255))


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    target = 0.0 if sum(rgb) / 3 > 140 else 255.0
    return tuple(int(round(c + SHADE_BLEND * (target - c))) for c in rgb)


def _polygon(obj: SceneObject) -> list[tuple[float, float]]:
    """Vertices of a non-circle shape, before rasterisation."""
    cx, cy = obj.center
    r = obj.radius
    if obj.shape == "square":
        polar = [(r, 45 + 90 * k) for k in range(4)]
    elif obj.shape == "triangle":
        polar = [(r, -90 + 120 * k) for k in range(3)]
    elif obj.shape == "star":
        polar = [(r if k % 2 == 0 else r * _STAR_INNER_RATIO, -90 + 36 * k) for k in range(10)]
    elif obj.shape == "cross":
        half_span = r / math.hypot(1.0, _CROSS_ARM_RATIO)
        a, b = half_span, half_span * _CROSS_ARM_RATIO
        corners = [(b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a)]
        corners += [(-x, -y) for x, y in corners]
        polar = [(math.hypot(x, y), math.degrees(math.atan2(y, x))) for x, y in corners]
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    # y points down on screen, so a counter-clockwise rotation subtracts from the screen angle.
    return [
        (
            cx + rho * math.cos(math.radians(t - obj.rotation)),
            cy + rho * math.sin(math.radians(t - obj.rotation)),
        )
        for rho, t in polar
    ]


def object_mask(obj: SceneObject, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of the pixels :func:`render_scene` paints for ``obj`` (before occlusion)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if obj.shape == "circle":
        cx, cy = obj.center
        draw.ellipse([cx - obj.radius, cy - obj.radius, cx + obj.radius, cy + obj.radius], fill=255)
    else:
        draw.polygon(_polygon(obj), fill=255)
    return np.asarray(canvas) > 0


def dilate_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a boolean ``(H, W)`` mask by a disk of ``radius`` pixels (Euclidean).

    The disk is the offsets ``(dy, dx)`` with ``dy² + dx² <= radius²``. Each of its rows is an interval
    ``|dx| <= isqrt(radius² - dy²)``, so the dilation is one horizontal interval test per row width (from
    cumulative sums along x), shifted by ``dy``: ``2 * radius + 1`` shifted ORs instead of one per offset.
    """
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return mask.copy()
    height, width = mask.shape
    padded = np.pad(mask, radius)
    # counts[:, j] = number of set pixels in padded[:, :j]
    counts = np.zeros((padded.shape[0], padded.shape[1] + 1), dtype=np.int32)
    np.cumsum(padded, axis=1, out=counts[:, 1:])
    rows: dict[int, np.ndarray] = {}  # half-width -> padded rows dilated along x, central columns only
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        half = math.isqrt(radius * radius - dy * dy)
        if half not in rows:
            rows[half] = (
                counts[:, radius + half + 1 : radius + half + 1 + width]
                > counts[:, radius - half : radius - half + width]
            )
        out |= rows[half][radius + dy : radius + dy + height]
    return out


def _render_background(background: Background, size: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    theta = math.radians(background.angle)
    along = xs * math.cos(theta) + ys * math.sin(theta)
    base = np.asarray(background.rgb, dtype=np.float64)
    shade = np.asarray(background.shade_rgb, dtype=np.float64)
    if background.kind == "flat":
        weight = np.zeros((size, size))
    elif background.kind == "gradient":
        weight = (along - along.min()) / max(along.max() - along.min(), 1e-9)
    elif background.kind == "stripes":
        weight = (np.floor(along / (background.period / 2)) % 2).astype(np.float64)
    elif background.kind == "checker":
        weight = ((np.floor(xs / background.period) + np.floor(ys / background.period)) % 2).astype(
            np.float64
        )
    elif background.kind == "noise":
        weight = np.zeros((size, size))
    else:
        raise ValueError(f"unknown background kind {background.kind!r}; expected one of {BACKGROUND_KINDS}")
    pixels = base + weight[..., None] * (shade - base)
    if background.kind == "noise":
        noise = np.random.default_rng(background.noise_seed).normal(0.0, NOISE_STD, size=(size, size, 1))
        pixels = pixels + noise
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def render_scene(scene: Scene) -> tuple[Image.Image, list[np.ndarray]]:
    """Draw a scene.

    Returns:
        ``(image, masks)``: the RGB ``PIL.Image`` of size ``(scene.size, scene.size)`` and one boolean
        ``(size, size)`` mask per object (same order as ``scene.objects``) of the pixels where that object
        is visible. Pixels under a mask have exactly the object's ``rgb``.
    """
    pixels = _render_background(scene.background, scene.size)
    masks = visible_masks(scene)
    for obj, mask in zip(scene.objects, masks):
        pixels[mask] = obj.rgb
    return Image.fromarray(pixels, mode="RGB"), masks


def visible_masks(scene: Scene) -> list[np.ndarray]:
    """The masks :func:`render_scene` returns, without drawing the image: one boolean ``(size, size)`` mask
    per object (same order as ``scene.objects``) of the pixels where it is visible."""
    masks: list[np.ndarray] = []
    for obj in scene.objects:
        mask = object_mask(obj, scene.size)
        masks = [m & ~mask for m in masks] + [mask]
    return masks


def sample_scene(
    rng: np.random.Generator,
    size: int = 128,
    max_objects: int = 3,
    min_object_size: float = 0.16,
    max_object_size: float = 0.40,
    min_gap: int | None = None,
) -> Scene:
    """Draw a random scene.

    Objects get distinct (shape, colour) pairs, colours different from the background's, and are
    placed fully inside the image with at least ``min_gap`` pixels between any two of them (so the
    visible mask of each object is its whole shape). When an object cannot be placed after a few
    tries the scene keeps fewer objects; it always has at least one.

    Args:
        rng: the generator; the scene is a pure function of its state (see :func:`scene_rng`).
        size: image side in pixels; the shape metrics are calibrated for ``size`` >= 64 (objects >= 10 px).
        max_objects: the number of objects is uniform in ``[1, max_objects]``.
        min_object_size, max_object_size: range of an object's nominal width as a fraction of ``size``
            (0.16–0.40 is ~20–51 px at 128).
        min_gap: minimum distance in pixels between objects; default ``max(3, round(0.06 * size))``.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be at least 1, got {max_objects}")
    if not 0 < min_object_size <= max_object_size < 0.8:
        raise ValueError(
            f"need 0 < min_object_size <= max_object_size < 0.8, got {min_object_size}, {max_object_size}"
        )
    gap = max(3, round(0.06 * size)) if min_gap is None else min_gap
    colours = list(PALETTE)

    bg_colour = colours[rng.integers(len(colours))]
    bg_rgb = _jitter(PALETTE[bg_colour], rng)
    background = Background(
        kind=BACKGROUND_KINDS[rng.integers(len(BACKGROUND_KINDS))],
        colour=bg_colour,
        rgb=bg_rgb,
        shade_rgb=_shade(bg_rgb),
        angle=float(rng.choice([0.0, 45.0, 90.0, 135.0])) + float(rng.uniform(-10, 10)),
        period=int(rng.integers(max(4, size // 10), max(6, size // 5) + 1)),
        noise_seed=int(rng.integers(2**31)),
    )

    num_objects = int(rng.integers(1, max_objects + 1))
    objects: list[SceneObject] = []
    occupied = np.zeros((size, size), dtype=bool)
    for _ in range(num_objects):
        taken = {(o.shape, o.colour) for o in objects}
        for _attempt in range(30):
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = colours[rng.integers(len(colours))]
            half_width = rng.uniform(min_object_size, max_object_size) * size / 2
            radius = half_width * _RADIUS_SCALE[shape]
            low, high = radius + 1, size - radius - 1
            center = (float(rng.uniform(low, high)), float(rng.uniform(low, high)))
            rotation = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
            if colour == bg_colour or (shape, colour) in taken or low >= high:
                continue
            obj = SceneObject(shape, colour, _jitter(PALETTE[colour], rng), center, float(radius), rotation)
            mask = object_mask(obj, size)
            if not (mask & occupied).any():
                objects.append(obj)
                occupied |= dilate_mask(mask, gap)
                break
        if not objects:  # the first object always fits an empty canvas; guard against odd arguments
            raise RuntimeError("could not place any object; loosen min_object_size / max_object_size")
    return Scene(size=size, background=background, objects=tuple(objects))
