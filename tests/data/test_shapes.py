"""The shapes world: determinism, captions, exact masks, placement rules."""

import io
from dataclasses import replace

import numpy as np
import pytest

from brushnet.data.shapes import (
    BACKGROUND_KINDS,
    PALETTE,
    SHADE_BLEND,
    SHAPES,
    Background,
    Scene,
    caption_vocabulary,
    dilate_mask,
    object_mask,
    object_phrase,
    render_scene,
    sample_scene,
    scene_rng,
    visible_masks,
)

NUM_SCENES = 120


@pytest.fixture(scope="module")
def scenes():
    return [sample_scene(scene_rng("train", 0, i), size=128) for i in range(NUM_SCENES)]


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_same_scene_and_bytes():
    first = sample_scene(scene_rng("train", 5, 17))
    second = sample_scene(scene_rng("train", 5, 17))
    assert first == second
    (image_a, masks_a), (image_b, masks_b) = render_scene(first), render_scene(second)
    assert _png(image_a) == _png(image_b)
    assert all(np.array_equal(a, b) for a, b in zip(masks_a, masks_b, strict=True))
    assert sample_scene(scene_rng("train", 5, 18)) != first
    assert sample_scene(scene_rng("train", 6, 17)) != first


def test_splits_use_disjoint_streams():
    for index in range(20):
        assert sample_scene(scene_rng("train", 0, index)) != sample_scene(scene_rng("eval", 0, index))
    with pytest.raises(ValueError, match="split"):
        scene_rng("test", 0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        scene_rng("train", -1, 0)


def test_world_is_varied(scenes):
    assert {obj.shape for s in scenes for obj in s.objects} == set(SHAPES)
    assert {obj.colour for s in scenes for obj in s.objects} == set(PALETTE)
    assert {s.background.kind for s in scenes} == set(BACKGROUND_KINDS)
    assert {s.background.colour for s in scenes} == set(PALETTE)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert 4 <= len(SHAPES) <= 5 and 6 <= len(PALETTE) <= 8


def test_caption_names_every_object_and_background(scenes):
    vocabulary = set(caption_vocabulary())
    for scene in scenes:
        caption = scene.caption
        objects_part, background_part = caption.split(" on ")
        phrases = objects_part.replace(" and ", ", ").split(", ")
        assert phrases == [object_phrase(obj.shape, obj.colour) for obj in scene.objects]
        assert scene.background.colour in background_part.split()
        assert background_part.endswith("background")
        assert set(caption.replace(",", " , ").split()) <= vocabulary


def test_caption_wording():
    background = Background("stripes", "green", PALETTE["green"], PALETTE["green"])
    red = sample_scene(scene_rng("train", 0, 0)).objects[0]
    objects = (
        replace(red, shape="circle", colour="red"),
        replace(red, shape="triangle", colour="blue"),
        replace(red, shape="star", colour="orange"),
    )
    assert (
        Scene(128, background, objects[:2]).caption
        == "a red circle and a blue triangle on a striped green background"
    )
    assert (
        Scene(128, replace(background, kind="gradient", colour="orange"), objects).caption
        == "a red circle, a blue triangle and an orange star on an orange gradient background"
    )
    assert Scene(128, replace(background, kind="flat"), objects[2:]).caption == (
        "an orange star on a plain green background"
    )


def test_vocabulary_is_complete_and_unique():
    vocabulary = caption_vocabulary()
    assert len(vocabulary) == len(set(vocabulary))
    assert set(SHAPES) | set(PALETTE) | {"a", "an", "and", "on", "background"} <= set(vocabulary)


def test_masks_match_rendered_pixels(scenes):
    for scene in scenes:
        image, masks = render_scene(scene)
        pixels = np.asarray(image)
        assert pixels.shape == (128, 128, 3) and pixels.dtype == np.uint8
        assert len(masks) == len(scene.objects)
        empty, _ = render_scene(Scene(scene.size, scene.background, ()))
        outside = ~np.logical_or.reduce(masks)
        np.testing.assert_array_equal(pixels[outside], np.asarray(empty)[outside])
        for obj, mask in zip(scene.objects, masks, strict=True):
            assert mask.dtype == bool and mask.shape == (128, 128)
            assert mask.sum() >= 100  # non-trivial: objects are ~20-51 px wide at 128
            assert (pixels[mask] == obj.rgb).all()
            np.testing.assert_array_equal(mask, object_mask(obj, 128))  # nothing occluded


def test_objects_are_distinct_apart_and_inside(scenes):
    for scene in scenes:
        pairs = [(obj.shape, obj.colour) for obj in scene.objects]
        assert len(set(pairs)) == len(pairs)
        assert all(obj.colour != scene.background.colour for obj in scene.objects)
        _, masks = render_scene(scene)
        gap = round(0.06 * 128)
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                assert not (dilate_mask(masks[i], gap) & masks[j]).any()
        for obj, mask in zip(scene.objects, masks, strict=True):
            # Fully inside the frame: no mask pixel on the border.
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()), obj


def test_background_tones_stay_away_from_other_colours():
    """A background's second tone (and everything between) is far from every other palette colour.

    The metrics ignore hole pixels within 30 RGB units of the background; keeping background tones at
    least 60 away from the other object colours (jitter included) means a prompted object is never
    mistaken for background.
    """
    for name, rgb in PALETTE.items():
        base = np.asarray(rgb, dtype=float)
        target = 0.0 if base.mean() > 140 else 255.0
        tones = base + np.linspace(0, SHADE_BLEND, 31)[:, None] * (target - base)
        for other, other_rgb in PALETTE.items():
            if other != name:
                assert np.linalg.norm(tones - np.asarray(other_rgb), axis=1).min() > 60, (name, other)


def test_dilate_mask_is_a_disk():
    mask = np.zeros((9, 9), dtype=bool)
    mask[4, 4] = True
    assert dilate_mask(mask, 0).sum() == 1
    assert dilate_mask(mask, 1).sum() == 5
    assert dilate_mask(mask, 2).sum() == 13
    corner = np.zeros((5, 5), dtype=bool)
    corner[0, 0] = True
    np.testing.assert_array_equal(np.argwhere(dilate_mask(corner, 1)), [[0, 0], [0, 1], [1, 0]])


def test_dilate_mask_matches_the_disk_definition():
    """Row-interval dilation == the OR of the mask shifted by every offset with dy² + dx² <= r² (random masks,
    shapes and radii, including radii larger than the mask)."""
    rng = np.random.default_rng(0)
    for _ in range(150):
        height, width = (int(v) for v in rng.integers(1, 40, size=2))
        mask = rng.random((height, width)) < rng.choice([0.002, 0.03, 0.3])
        radius = int(rng.integers(0, 14))
        padded = np.pad(mask, radius)
        expected = np.zeros_like(mask)
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                if dy * dy + dx * dx <= radius * radius:
                    expected |= padded[radius + dy : radius + dy + height, radius + dx : radius + dx + width]
        np.testing.assert_array_equal(dilate_mask(mask, radius), expected, err_msg=f"{mask.shape} r={radius}")


def test_visible_masks_leave_out_what_later_objects_cover():
    """Masks without drawing: an object moved onto an earlier one hides part of it; the earlier object's
    visible mask is its shape minus the later one's, and the drawn pixels agree."""
    scene = next(
        s for s in (sample_scene(scene_rng("train", 0, i)) for i in range(50)) if len(s.objects) >= 2
    )
    first, second = scene.objects[:2]
    moved = replace(second, center=(first.center[0] + 4, first.center[1] + 3))
    overlapping = replace(scene, objects=(first, moved))
    visible = visible_masks(overlapping)
    np.testing.assert_array_equal(visible[1], object_mask(moved, 128))
    np.testing.assert_array_equal(visible[0], object_mask(first, 128) & ~object_mask(moved, 128))
    assert 0 < visible[0].sum() < object_mask(first, 128).sum()
    image, masks = render_scene(overlapping)
    pixels = np.asarray(image)
    for obj, mask, drawn in zip(overlapping.objects, visible, masks, strict=True):
        np.testing.assert_array_equal(mask, drawn)
        assert (pixels[mask] == obj.rgb).all()


@pytest.mark.parametrize("size", [64, 96, 256])
def test_other_sizes(size):
    scene = sample_scene(scene_rng("train", 1, 3), size=size)
    image, masks = render_scene(scene)
    assert image.size == (size, size) and all(m.shape == (size, size) and m.any() for m in masks)


def test_invalid_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="size"):
        sample_scene(rng, size=16)
    with pytest.raises(ValueError, match="max_objects"):
        sample_scene(rng, max_objects=0)
    with pytest.raises(ValueError, match="object_size"):
        sample_scene(rng, min_object_size=0.5, max_object_size=0.2)
