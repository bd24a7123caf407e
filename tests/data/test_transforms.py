"""Paired transforms: image and mask stay aligned through resize and crop; output ranges and shapes."""

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet.data.transforms import crop_offsets, prepare_training_pair, resized_size


def coordinate_image(height, width):
    """Red = x, green = y, blue = 0: every pixel says where it came from."""
    y, x = np.mgrid[:height, :width]
    pixels = np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels), x, y


def pattern(x, y):
    return (x * 7 + y * 3) % 5 == 0


def to_uint8(pixel_values):
    return ((pixel_values.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.int64)


def test_resized_size():
    assert resized_size(480, 640, 512) == (512, 683)
    assert resized_size(640, 480, 512) == (683, 512)
    assert resized_size(512, 512, 512) == (512, 512)
    assert resized_size(100, 101, 64) == (64, 65)
    with pytest.raises(ValueError):
        resized_size(0, 10, 8)


def test_crop_offsets():
    assert crop_offsets(32, 100, 32) == (0, 34)
    rng = np.random.default_rng(0)
    offsets = {crop_offsets(40, 50, 32, rng) for _ in range(300)}
    assert {top for top, _ in offsets} == set(range(9))
    assert {left for _, left in offsets} == set(range(19))
    with pytest.raises(ValueError):
        crop_offsets(31, 100, 32)


@pytest.mark.parametrize("size", [(32, 100), (90, 32), (32, 45)])
def test_random_crop_uses_same_offsets_for_image_and_mask(size):
    image, x, y = coordinate_image(*size)
    mask = pattern(x, y)
    rng = np.random.default_rng(1)
    corners = set()
    for _ in range(20):
        out = prepare_training_pair(image, mask, 32, rng)
        pixels = to_uint8(out["pixel_values"])
        source_x, source_y = pixels[..., 0], pixels[..., 1]
        # A contiguous window of the original ...
        np.testing.assert_array_equal(source_x, source_x[0, 0] + np.arange(32)[None, :].repeat(32, 0))
        np.testing.assert_array_equal(source_y, source_y[0, 0] + np.arange(32)[:, None].repeat(32, 1))
        # ... and the mask marks exactly the pixels it marked there.
        np.testing.assert_array_equal(out["mask"][0].numpy() == 1, pattern(source_x, source_y))
        corners.add((source_y[0, 0], source_x[0, 0]))
        # no resize here (short side 32): the reported crop is where the window starts in the original
        assert out["original_size"].tolist() == list(size)
        assert out["crop_top_left"].tolist() == [source_y[0, 0], source_x[0, 0]]
    assert len(corners) > 5


def test_center_crop_is_centred_and_deterministic():
    image, x, y = coordinate_image(32, 100)
    out = prepare_training_pair(image, pattern(x, y), 32, None)
    pixels = to_uint8(out["pixel_values"])
    assert pixels[0, 0, 0] == 34 and pixels[0, 0, 1] == 0
    assert out["crop_top_left"].tolist() == [0, 34] and out["original_size"].tolist() == [32, 100]
    again = prepare_training_pair(image, pattern(x, y), 32, None)
    assert torch.equal(out["pixel_values"], again["pixel_values"]) and torch.equal(out["mask"], again["mask"])


def test_resize_keeps_mask_on_its_region():
    height, width = 64, 128
    hole = np.zeros((height, width), bool)
    hole[16:40, 48:80] = True
    hole[44:60, 100:124] = True
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[hole] = (255, 255, 255)
    rng = np.random.default_rng(2)
    for _ in range(5):
        out = prepare_training_pair(Image.fromarray(pixels), hole, 32, rng)
        # SDXL's conditioning: the size before resizing, the crop in the resized (32 × 64) image
        assert out["original_size"].tolist() == [64, 128] and out["crop_top_left"][0] == 0
        assert 0 <= out["crop_top_left"][1] <= 32
        bright = out["pixel_values"].mean(0).numpy() > 0
        mask = out["mask"][0].numpy() == 1
        assert mask.sum() > 0
        disagree = np.argwhere(bright != mask)
        # Bicubic only blurs the edges: disagreements lie next to the mask boundary.
        boundary = (
            mask ^ np.pad(mask, 1, mode="edge")[2:, 1:-1] | mask ^ np.pad(mask, 1, mode="edge")[1:-1, 2:]
        )
        for row, column in disagree:
            window = boundary[max(0, row - 1) : row + 2, max(0, column - 1) : column + 2]
            assert window.any()


def test_output_types_and_ranges():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    mask = rng.random((50, 70)) < 0.3
    out = prepare_training_pair(image, mask, 24, rng)
    assert out["pixel_values"].shape == (3, 24, 24) and out["pixel_values"].dtype == torch.float32
    assert out["mask"].shape == (1, 24, 24) and out["mask"].dtype == torch.float32
    assert out["pixel_values"].min() >= -1 and out["pixel_values"].max() <= 1
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    black = prepare_training_pair(Image.new("RGB", (24, 24)), np.zeros((24, 24), bool), 24)
    assert (black["pixel_values"] == -1).all() and (black["mask"] == 0).all()
    white = prepare_training_pair(Image.new("L", (24, 24), 255), np.ones((24, 24), bool), 24)
    assert (white["pixel_values"] == 1).all() and (white["mask"] == 1).all()


def test_size_mismatch_raises():
    with pytest.raises(ValueError, match="mask"):
        prepare_training_pair(Image.new("RGB", (40, 30)), np.zeros((40, 30), bool), 16)
