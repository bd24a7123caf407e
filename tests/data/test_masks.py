"""Mask generators: brush properties (determinism, bounds, the H/W fix, flips), opening, swap, config."""

import math

import numpy as np
import pytest
from pydantic import ValidationError

from brushnet.data.masks import (
    BrushConfig,
    MaskConfig,
    brush_stroke_width,
    make_training_mask,
    morphological_opening,
    pick_segmentation_mask,
    random_brush_mask,
    sample_brush_strokes,
)
from brushnet.data.rle import encode_brushdata_rle


def test_brush_is_deterministic_per_seed():
    a = random_brush_mask(96, 128, np.random.default_rng(7))
    b = random_brush_mask(96, 128, np.random.default_rng(7))
    c = random_brush_mask(96, 128, np.random.default_rng(8))
    assert a.dtype == bool and a.shape == (96, 128)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_brush_stroke_and_vertex_counts_and_bounds():
    brush = BrushConfig(min_strokes=1, max_strokes=3, min_vertices=2, max_vertices=7)
    counts, segments = set(), set()
    rng = np.random.default_rng(0)
    height, width = 80, 200
    radius = math.sqrt(height**2 + width**2) / 8
    for _ in range(300):
        strokes = sample_brush_strokes(height, width, rng, brush)
        counts.add(len(strokes))
        for vertices in strokes:
            segments.add(len(vertices) - 1)
            assert (vertices[:, 0] >= 0).all() and (vertices[:, 0] <= width - 1).all()
            assert (vertices[:, 1] >= 0).all() and (vertices[:, 1] <= height - 1).all()
            steps = np.linalg.norm(np.diff(vertices, axis=0), axis=1)
            assert (steps <= 2 * radius + 1e-9).all()  # clipping to the canvas only shortens a segment
    assert counts == {1, 2, 3}
    assert segments == set(range(2, 8))


def test_brush_turning_angles_alternate_around_mean():
    brush = BrushConfig(min_strokes=1, max_strokes=1, min_vertices=2, max_vertices=2)
    mean, spread = brush.mean_angle, brush.angle_range
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(200):
        (vertices,) = sample_brush_strokes(4000, 4000, rng, brush)  # huge canvas: clipping is rare
        steps = np.diff(vertices, axis=0)
        if (
            (np.linalg.norm(steps, axis=1) < 1).any()
            or (vertices[1:] <= 0).any()
            or (vertices[1:] >= 3999).any()
        ):
            continue
        first, second = (math.atan2(y, x) % (2 * math.pi) for x, y in steps)
        assert 2 * math.pi - mean - spread - 1e-9 <= first <= 2 * math.pi - mean + spread + 1e-9
        assert mean - spread - 1e-9 <= second <= mean + spread + 1e-9
        checked += 1
    assert checked > 50


def test_zero_strokes_gives_empty_mask_and_coverage_in_bounds():
    empty = random_brush_mask(64, 64, np.random.default_rng(0), BrushConfig(min_strokes=0, max_strokes=0))
    assert not empty.any()
    rng = np.random.default_rng(1)
    brush = BrushConfig(min_strokes=1, stroke_width=40)
    coverage = np.array([random_brush_mask(128, 128, rng, brush).mean() for _ in range(100)])
    assert (coverage > 0).all() and (coverage < 1).all()
    assert 0.05 < coverage.mean() < 0.7


def test_vertices_cover_the_long_side_of_a_non_square_canvas():
    """The original sampled x over the height and y over the width; on 64x512 strokes stayed left."""
    height, width = 64, 512
    rng = np.random.default_rng(0)
    starts = np.array([s[0] for _ in range(200) for s in sample_brush_strokes(height, width, rng)])
    assert starts[:, 0].max() > 0.9 * width and starts[:, 0].min() < 0.1 * width
    assert starts[:, 1].max() < height
    brush = BrushConfig(min_strokes=1, stroke_width=8, p_flip_horizontal=0, p_flip_vertical=0)
    union = np.zeros((height, width), bool)
    for _ in range(100):
        union |= random_brush_mask(height, width, rng, brush)
    columns = np.flatnonzero(union.any(axis=0))
    assert columns.max() > 0.9 * width  # with swapped sizes nothing would reach past column 64 + stroke
    assert union[:, 3 * width // 4 :].mean() > 0.1


def test_tall_canvas_too():
    rng = np.random.default_rng(1)
    starts = np.array([s[0] for _ in range(200) for s in sample_brush_strokes(512, 64, rng)])
    assert starts[:, 1].max() > 0.9 * 512 and starts[:, 0].max() < 64


def test_flips_are_exact_mirrors_and_do_not_change_the_stream():
    def mask(p_h, p_v, seed=5):
        brush = BrushConfig(min_strokes=2, stroke_width=12, p_flip_horizontal=p_h, p_flip_vertical=p_v)
        return random_brush_mask(48, 80, np.random.default_rng(seed), brush)

    plain = mask(0, 0)
    assert plain.any() and not np.array_equal(plain, plain[:, ::-1])
    np.testing.assert_array_equal(mask(1, 0), plain[:, ::-1])
    np.testing.assert_array_equal(mask(0, 1), plain[::-1, :])
    np.testing.assert_array_equal(mask(1, 1), plain[::-1, ::-1])


def test_flip_rates_with_default_probability():
    brush = BrushConfig(min_strokes=1, max_strokes=1, min_vertices=0, max_vertices=0, stroke_width=4)
    rng = np.random.default_rng(11)
    left = 0
    for _ in range(400):
        # One dot per mask: with p=0.5 flips its horizontal position is as often mirrored as not.
        columns = np.flatnonzero(random_brush_mask(8, 200, rng, brush).any(axis=0))
        left += columns.mean() < 100
    assert 160 < left < 240


def test_stroke_width_scales_with_short_side():
    brush = BrushConfig()
    assert brush_stroke_width(512, 512, brush) == 128
    assert brush_stroke_width(1024, 768, brush) == 192
    assert brush_stroke_width(64, 512, brush) == 16
    assert brush_stroke_width(64, 64, BrushConfig(stroke_width_reference=None)) == 128
    # A single dot has the stroke width as diameter.
    dot = BrushConfig(
        min_strokes=1, max_strokes=1, min_vertices=0, max_vertices=0, stroke_width_reference=None
    )
    dot = dot.model_copy(update={"stroke_width": 21.0})
    inside = 0
    for seed in range(20):
        mask = random_brush_mask(200, 200, np.random.default_rng(seed), dot)
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.min() == 0 or columns.min() == 0 or rows.max() == 199 or columns.max() == 199:
            continue  # the dot is cut by the canvas edge
        inside += 1
        assert 20 <= rows.size <= 22 and 20 <= columns.size <= 22
        assert abs(mask.sum() - math.pi * 10.5**2) < 0.15 * math.pi * 10.5**2
    assert inside > 10


def test_opening_removes_specks_and_keeps_big_blocks():
    mask = np.zeros((64, 64), bool)
    mask[10:20, 10:20] = True  # 10x10 block: survives an 8x8 opening exactly
    mask[40:47, 40:47] = True  # 7x7 speck: gone
    mask[30, :] = True  # 1-px line: gone
    mask[50:58, 2:60] = True  # 8-px band: survives
    opened = morphological_opening(mask, 8)
    expected = np.zeros_like(mask)
    expected[10:20, 10:20] = True
    expected[50:58, 2:60] = True
    np.testing.assert_array_equal(opened, expected)


def test_opening_is_anti_extensive_and_idempotent():
    rng = np.random.default_rng(0)
    mask = rng.random((50, 70)) < 0.8
    opened = morphological_opening(mask, 5)
    assert not (opened & ~mask).any()
    np.testing.assert_array_equal(morphological_opening(opened, 5), opened)
    np.testing.assert_array_equal(morphological_opening(mask, 1), mask)
    assert not morphological_opening(mask, 80).any()


def test_opening_matches_scipy_for_odd_sizes():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(1)
    for size in (3, 5):
        mask = rng.random((40, 45)) < 0.75
        expected = ndimage.binary_opening(mask, structure=np.ones((size, size)))
        np.testing.assert_array_equal(morphological_opening(mask, size), expected)


def test_pick_segmentation_mask():
    first = np.zeros((6, 5), bool)
    first[1:3, 1:4] = True
    second = np.zeros((6, 5), bool)
    second[4:, :] = True
    rng = np.random.default_rng(0)
    picks = [
        pick_segmentation_mask([first, encode_brushdata_rle(second)], rng, height=6, width=5)
        for _ in range(60)
    ]
    assert all(np.array_equal(p, first) or np.array_equal(p, second) for p in picks)
    assert 15 < sum(np.array_equal(p, first) for p in picks) < 45
    empty = pick_segmentation_mask([], rng, height=6, width=5)
    assert empty.shape == (6, 5) and not empty.any()
    with pytest.raises(ValueError):
        pick_segmentation_mask([np.zeros((5, 6), bool)], rng, height=6, width=5)


def test_swap_rate_matches_config():
    segment = np.zeros((8, 8), bool)
    segment[:4] = True
    config = MaskConfig(mode="segmentation", p_open=0.0, p_swap=0.3)
    rng = np.random.default_rng(0)
    swapped = sum(not make_training_mask([segment], 8, 8, rng, config)[0, 0] for _ in range(2000))
    assert abs(swapped / 2000 - 0.3) < 0.04
    never = MaskConfig(p_open=0.0, p_swap=0.0)
    assert all(make_training_mask([segment], 8, 8, rng, never)[0, 0] for _ in range(50))


def test_opening_rate_matches_config():
    speck = np.zeros((16, 16), bool)
    speck[5:8, 5:8] = True  # removed by any opening of size 8
    config = MaskConfig(p_open=0.3, p_swap=0.0)
    rng = np.random.default_rng(1)
    opened = sum(not make_training_mask([speck], 16, 16, rng, config).any() for _ in range(2000))
    assert abs(opened / 2000 - 0.3) < 0.04


def test_no_segmentation_hides_nothing_unless_swapped():
    config = MaskConfig(p_swap=0.0)
    assert not make_training_mask([], 10, 12, np.random.default_rng(0), config).any()
    assert make_training_mask([], 10, 12, np.random.default_rng(0), MaskConfig(p_swap=1.0)).all()


def test_mix_mode_rate_and_modes():
    segment = np.zeros((64, 64), bool)
    segment[0, 0] = True  # a single pixel: a brush mask is never exactly this
    config = MaskConfig(mode="mix", p_brush=0.25, p_open=0.0, p_swap=0.0)
    rng = np.random.default_rng(2)
    is_segment = [
        np.array_equal(make_training_mask([segment], 64, 64, rng, config), segment) for _ in range(800)
    ]
    assert abs(1 - np.mean(is_segment) - 0.25) < 0.05
    brush_only = MaskConfig(mode="brush", p_open=0.0, p_swap=0.0)
    expected = random_brush_mask(64, 64, np.random.default_rng(3))
    np.testing.assert_array_equal(
        make_training_mask([segment], 64, 64, np.random.default_rng(3), brush_only), expected
    )


def test_config_validation():
    with pytest.raises(ValidationError):
        MaskConfig(mode="random")
    with pytest.raises(ValidationError):
        MaskConfig(p_swap=1.5)
    with pytest.raises(ValidationError):
        MaskConfig(p_open_typo=0.1)
    with pytest.raises(ValidationError):
        BrushConfig(min_strokes=4, max_strokes=3)
    assert (
        MaskConfig.model_validate({"mode": "brush", "brush": {"stroke_width": 64}}).brush.stroke_width == 64
    )
