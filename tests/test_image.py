import numpy as np
import pytest
import torch
from PIL import Image

from brushnet.image import (
    InputError,
    blend,
    blend_pil,
    feather_mask,
    gaussian_kernel_1d,
    load_image,
    load_mask,
    mask_to_array,
)


def test_mask_modes_white_is_hole():
    arr = np.zeros((6, 8), np.uint8)
    arr[2:4, 3:6] = 255
    expected = arr > 0
    assert np.array_equal(mask_to_array(Image.fromarray(arr)), expected)  # L
    assert np.array_equal(mask_to_array(Image.fromarray(arr).convert("RGB")), expected)
    assert np.array_equal(mask_to_array(Image.fromarray(arr).convert("1")), expected)
    # RGBA strokes: blank colour, alpha carries the mask (what a canvas painter exports)
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 3] = arr
    assert np.array_equal(mask_to_array(Image.fromarray(rgba, "RGBA")), expected)
    # RGBA with real colour: colour is the mask
    rgba2 = np.dstack([arr, arr, arr, np.full_like(arr, 255)])
    assert np.array_equal(mask_to_array(Image.fromarray(rgba2, "RGBA")), expected)
    assert np.array_equal(mask_to_array(expected), expected)
    assert np.array_equal(mask_to_array(expected.astype(np.float32)), expected)
    assert np.array_equal(mask_to_array(torch.from_numpy(expected).float()[None, None]), expected)
    assert np.array_equal(mask_to_array(arr, invert=True), ~expected)


def test_binarised_at_half():
    arr = np.array([[0, 127, 128, 255]], np.uint8)
    assert mask_to_array(arr).tolist() == [[False, False, True, True]]
    assert mask_to_array(np.array([[0.49, 0.5]], np.float32)).tolist() == [[False, True]]


def test_array_masks_of_a_batch_of_one_or_with_channels_last_keep_their_layout():
    arr = np.zeros((6, 8), np.float32)
    arr[2:4, 3:6] = 1
    expected = arr > 0
    for mask in (arr[None], arr[None, :, :, None], arr[:, :, None], np.repeat(arr[:, :, None], 3, -1)):
        assert np.array_equal(mask_to_array(mask), expected), mask.shape
    tensor = torch.from_numpy(arr)
    for mask in (tensor[:, :, None], tensor[None].repeat(3, 1, 1), tensor[None, None]):
        assert np.array_equal(mask_to_array(mask), expected), tuple(mask.shape)
    # whole numbers 0-255 of any type are 8-bit steps
    assert np.array_equal(mask_to_array(arr.astype(np.int64) * 255), expected)
    assert np.array_equal(mask_to_array(arr * 255.0), expected)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (
            np.array([[0, 1.5]], np.float32),
            r"mask values must be in \[0, 1\] \(or whole numbers 0-255\), got 0..1.5",
        ),
        (np.array([[-1, 0.5]], np.float32), r"got -1..0.5"),
        (np.array([[0, 300]], np.int32), r"got 0..300"),
        (np.array([[0, np.nan]], np.float32), "mask holds NaN or infinite values"),
        (None, r"mask is missing \(None\)"),
        (np.array([["a", "b"]]), "mask must hold numbers"),
        (torch.empty(4, 4, device="meta"), "mask is a meta tensor"),
    ],
)
def test_mask_values_that_cannot_be_read_as_a_mask_are_one_line_errors(mask, message):
    with pytest.raises(InputError, match=message):
        mask_to_array(mask)


def test_an_explicit_pixel_limit_applies_to_in_memory_images_and_masks_too():
    for image in (Image.new("RGB", (20, 10)), np.zeros((10, 20, 3), np.uint8), torch.zeros(3, 10, 20)):
        with pytest.raises(
            InputError, match=r"^image is 20x10 = 200 pixels; the limit is 100 \(--max-pixels\)$"
        ):
            load_image(image, max_pixels=100)
        with pytest.raises(InputError, match="--max-pixels must be at least 1, got 0"):
            load_image(image, max_pixels=0)
        assert load_image(image, max_pixels=200).size == (20, 10)
        assert load_image(image).size == (20, 10)  # no limit given: nothing is decoded, none applies
    for mask in (Image.new("L", (20, 10), 255), np.ones((10, 20), bool)):
        with pytest.raises(InputError, match=r"^mask is 20x10 = 200 pixels; the limit is 100"):
            load_mask(mask, max_pixels=100)
        assert load_mask(mask, max_pixels=200).all()


def test_load_mask_errors(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "full.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="empty"):
        load_mask(tmp_path / "empty.png")
    with pytest.raises(InputError, match="must match"):
        load_mask(tmp_path / "full.png", size=(5, 4))
    with pytest.raises(InputError, match="not a readable image"):
        load_mask(tmp_path / "bad.png")
    with pytest.raises(InputError, match="not found"):
        load_mask(tmp_path / "missing.png")
    assert load_mask(tmp_path / "full.png").all()
    with pytest.raises(InputError, match="whole image"):
        load_mask(tmp_path / "full.png", allow_full=False)
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.jpg")


def test_gaussian_kernel_matches_opencv_rule():
    k = gaussian_kernel_1d(21)
    sigma = 0.3 * ((21 - 1) * 0.5 - 1) + 0.8
    assert sigma == pytest.approx(3.5)
    x = np.arange(21) - 10
    ref = np.exp(-(x**2) / (2 * 3.5**2))
    np.testing.assert_allclose(k.numpy(), ref / ref.sum(), atol=1e-12)


def test_feather_mask_formula_and_extent():
    hole = np.zeros((40, 50))
    hole[15:25, 20:30] = 1
    m = feather_mask(torch.from_numpy(hole)[None, None])[0, 0].numpy()
    # reference formula computed independently with a dense 2-D kernel (zero border far from the hole)
    k = gaussian_kernel_1d(21).numpy()
    k2 = np.outer(k, k)
    padded = np.pad(hole, 10)
    blurred = np.array([[np.sum(padded[i : i + 21, j : j + 21] * k2) for j in range(50)] for i in range(40)])
    np.testing.assert_allclose(m, 1 - (1 - hole) * (1 - blurred), atol=1e-12)
    assert (m[hole == 1] == 1).all()
    dist_y = np.maximum(np.maximum(15 - np.arange(40), np.arange(40) - 24), 0)[:, None]
    dist_x = np.maximum(np.maximum(20 - np.arange(50), np.arange(50) - 29), 0)[None, :]
    far = np.maximum(dist_y, dist_x) > 10
    assert (m[far] == 0).all() and (m[~far] > 0).all()


def test_blend_pil_byte_identical_outside_band():
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    generated = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    hole = np.zeros((48, 64), bool)
    hole[20:30, 30:40] = True
    out = np.asarray(blend_pil(original, generated, hole))
    band = feather_mask(torch.from_numpy(hole.astype(float))[None, None])[0, 0].numpy() > 0
    assert np.array_equal(out[~band], np.asarray(original)[~band])
    assert np.array_equal(out[hole], np.asarray(generated)[hole])


def test_blend_tensor_matches_formula():
    original, generated = torch.rand(1, 3, 16, 16), torch.rand(2, 3, 16, 16)
    hole = torch.zeros(1, 1, 16, 16)
    hole[..., 4:8, 4:8] = 1
    w = feather_mask(hole).float()
    expected = original * (1 - w) + generated * w
    torch.testing.assert_close(blend(original, generated, hole), expected)


def _strokes() -> np.ndarray:
    hole = np.zeros((6, 8), bool)
    hole[1:4, 2:6] = True
    hole[5, 0] = True
    return hole


def test_coloured_strokes_on_a_transparent_layer_are_the_hole():
    """The alpha of a stroke layer is the mask whatever colour was painted, and whatever colour the transparent
    pixels store (red strokes said "mask is empty"; black strokes over a white matte were read inverted)."""
    hole = _strokes()
    red = np.zeros((6, 8, 4), np.uint8)
    red[hole] = (255, 0, 0, 255)
    assert np.array_equal(load_mask(Image.fromarray(red, "RGBA")), hole)
    matte = np.zeros((6, 8, 4), np.uint8)
    matte[...] = (255, 255, 255, 0)
    matte[hole] = (0, 0, 0, 255)
    assert np.array_equal(load_mask(Image.fromarray(matte, "RGBA")), hole)
    grey_alpha = np.dstack([np.full(hole.shape, 40, np.uint8), hole.astype(np.uint8) * 255])
    assert np.array_equal(mask_to_array(Image.fromarray(grey_alpha, "LA")), hole)
    assert np.array_equal(mask_to_array(Image.fromarray(matte, "RGBA"), invert=True), ~hole)


def test_opaque_rgba_masks_are_read_by_their_colour():
    hole = _strokes()
    grey = np.where(hole, 255, 0).astype(np.uint8)
    for alpha in (255, 128):  # opaque, or uniformly translucent: the alpha says nothing
        rgba = np.dstack([grey, grey, grey, np.full_like(grey, alpha)])
        assert np.array_equal(mask_to_array(Image.fromarray(rgba, "RGBA")), hole)


def test_rgba_array_and_tensor_masks_are_read_as_the_same_pil_image():
    """A stroke layer as a numpy array or a torch tensor had its alpha averaged in as a fourth colour: white
    stored under transparent pixels made the whole image the hole (24 pixels for a 4-pixel stroke)."""
    hole = _strokes()
    layer = np.zeros((6, 8, 4), np.uint8)
    layer[...] = (255, 255, 255, 0)
    layer[hole] = (255, 255, 255, 255)
    opaque_grey = np.dstack([np.full(hole.shape, 100, np.uint8)] * 3 + [np.full(hole.shape, 255, np.uint8)])
    opaque_grey[hole, :3] = 255
    for data in (layer, opaque_grey):
        expected = mask_to_array(Image.fromarray(data, "RGBA"))
        assert np.array_equal(expected, hole)
        tensor = torch.from_numpy(data.astype(np.float32) / 255)
        for form in (data, data.astype(np.float32) / 255, tensor, tensor.permute(2, 0, 1), tensor[None]):
            assert np.array_equal(mask_to_array(form), expected), type(form)


def test_the_empty_mask_message_names_the_cause(tmp_path):
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "white.png")
    with pytest.raises(InputError) as info:
        load_mask(tmp_path / "white.png", invert=True)
    assert str(info.value) == (
        "mask is empty after --invert-mask (invert_mask): the mask is all white (white = keep when inverted), so "
        "nothing is left to inpaint"
    )
    grey = np.full((4, 4), 100, np.uint8)
    grey[0, 0] = 20
    Image.fromarray(grey).save(tmp_path / "grey.png")
    with pytest.raises(InputError) as info:
        load_mask(tmp_path / "grey.png")
    assert str(info.value) == (
        "mask is empty: no pixel is >= 128 (values 20..100); masks are binarised at 50 % (white = inpaint)"
    )
    with pytest.raises(
        InputError, match=r"no value is >= 0.5 \(values 0.1..0.3\); masks are binarised at 50 %"
    ):
        load_mask(np.array([[0.1, 0.3]], np.float32))
    with pytest.raises(InputError) as info:  # all black: the message as before
        load_mask(np.zeros((4, 4), np.uint8))
    assert str(info.value) == "mask is empty: no white pixel marks a region to inpaint (white = inpaint)"
