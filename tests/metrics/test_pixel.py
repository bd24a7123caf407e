import math

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d

from brushnet.metrics.pixel import (
    gaussian_window,
    keep_masked,
    mse,
    mse_brushbench,
    psnr,
    psnr_brushbench,
    ssim,
)


def _half_hole_mask(n, h, w):
    mask = torch.zeros(n, 1, h, w)
    mask[..., : h // 2, :] = 1.0  # top half is the hole
    return mask


def test_identical_images_are_perfect(images):
    _, original = images
    assert torch.equal(mse(original, original), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(mse_brushbench(original, original), torch.zeros(2, dtype=torch.float64))
    assert torch.isinf(psnr(original, original)).all()
    assert torch.equal(psnr_brushbench(original, original), torch.full((2,), 1000.0, dtype=torch.float64))
    torch.testing.assert_close(ssim(original, original), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("delta", [0.1, 0.25])
def test_constant_shift_all_kept(delta):
    original = torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64)
    generated = original + delta
    for mask in (None, torch.zeros(1, 1, 16, 16)):
        torch.testing.assert_close(mse(generated, original, mask).item(), delta**2)
        torch.testing.assert_close(mse(generated, original, mask, region="kept").item(), delta**2)
        torch.testing.assert_close(mse_brushbench(generated, original, mask).item(), 3 * delta**2)
        torch.testing.assert_close(psnr(generated, original, mask).item(), -10 * math.log10(delta**2))
        torch.testing.assert_close(
            psnr_brushbench(generated, original, mask).item(), -10 * math.log10(3 * delta**2)
        )


def test_differences_inside_the_hole_do_not_count(images):
    generated, original = images
    mask = _half_hole_mask(2, 40, 48)
    pasted = original * (1 - mask) + generated * mask  # kept region identical, hole differs
    assert torch.equal(mse(pasted, original, mask), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(mse_brushbench(pasted, original, mask), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(ssim(pasted, original, mask), torch.ones(2, dtype=torch.float64))
    assert (mse(pasted, original) > 0).all()  # without the mask the hole counts


def test_masked_denominators():
    # Error 0.2 everywhere; the hole is half the image.
    original = torch.zeros(1, 3, 4, 4)
    generated = torch.full((1, 3, 4, 4), 0.2)
    mask = _half_hole_mask(1, 4, 4)
    # kept entries: 8 pixels × 3 channels, each squared error 0.04 → sum 0.96
    torch.testing.assert_close(mse_brushbench(generated, original, mask).item(), 0.96 / 8)  # / kept pixels
    torch.testing.assert_close(mse(generated, original, mask).item(), 0.96 / 48)  # / all 3·H·W entries
    torch.testing.assert_close(mse(generated, original, mask, region="kept").item(), 0.96 / 24)
    torch.testing.assert_close(
        psnr_brushbench(generated, original, mask).item(), 20 * math.log10(1 / math.sqrt(0.96 / 8))
    )


def test_hand_computed_small_image():
    original = torch.zeros(1, 3, 1, 2)
    generated = torch.tensor([[[[0.1, 0.5]], [[0.2, 0.0]], [[0.3, 0.4]]]])
    mask = torch.tensor([[[[0.0, 1.0]]]])  # second pixel is hole
    # kept pixel errors: 0.1, 0.2, 0.3 → 0.01 + 0.04 + 0.09 = 0.14
    torch.testing.assert_close(mse_brushbench(generated, original, mask).item(), 0.14)
    torch.testing.assert_close(mse(generated, original, mask).item(), 0.14 / 6)
    torch.testing.assert_close(mse(generated, original, mask, region="kept").item(), 0.14 / 3)
    torch.testing.assert_close(mse(generated, original).item(), (0.14 + 0.25 + 0.16) / 6)


def test_brushbench_definition_is_three_times_kept_mean(images):
    generated, original = images
    mask = _half_hole_mask(2, 40, 48)
    torch.testing.assert_close(
        mse_brushbench(generated, original, mask), 3 * mse(generated, original, mask, region="kept")
    )
    torch.testing.assert_close(
        psnr(generated, original, mask, region="kept") - psnr_brushbench(generated, original, mask),
        torch.full((2,), 10 * math.log10(3), dtype=torch.float64),
    )


def test_batch_equals_single_and_mask_broadcast(images):
    generated, original = images
    mask = _half_hole_mask(2, 40, 48)
    for fn in (mse, mse_brushbench, psnr, psnr_brushbench, ssim):
        batch = fn(generated, original, mask)
        singles = torch.cat(
            [fn(generated[i : i + 1], original[i : i + 1], mask[i : i + 1]) for i in range(2)]
        )
        torch.testing.assert_close(batch, singles)
    torch.testing.assert_close(mse(generated, original, mask[:1]), mse(generated, original, mask))


def test_keep_masked_zeroes_the_hole(images):
    _, original = images
    mask = _half_hole_mask(2, 40, 48)
    masked = keep_masked(original, mask)
    assert torch.equal(masked[..., :20, :], torch.zeros_like(masked[..., :20, :]))
    assert torch.equal(masked[..., 20:, :], original[..., 20:, :])
    assert keep_masked(original, None) is original


def test_ssim_of_constant_images_matches_formula():
    a, b = 0.3, 0.7
    c1 = 0.01**2
    value = ssim(
        torch.full((1, 3, 16, 16), a, dtype=torch.float64), torch.full((1, 3, 16, 16), b, dtype=torch.float64)
    ).item()
    assert value == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_ssim_symmetric_and_below_one_for_noise(images):
    generated, original = images
    forward, backward = ssim(generated, original), ssim(original, generated)
    torch.testing.assert_close(forward, backward)
    assert ((forward < 1.0) & (forward > -1.0)).all()
    noise = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(5))
    assert (ssim(noise, original) < forward).all()  # unrelated noise is less similar than a perturbation


def test_ssim_matches_independent_numpy_reference(images):
    generated, original = images
    window_1d = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window_1d /= window_1d.sum()
    window = np.outer(window_1d, window_1d)
    c1, c2 = 0.01**2, 0.03**2
    expected = []
    for x_img, y_img in zip(generated.double().numpy(), original.double().numpy()):
        maps = []
        for x, y in zip(x_img, y_img):

            def filt(t):
                return correlate2d(t, window, mode="valid")

            mx, my = filt(x), filt(y)
            sxx, syy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
            maps.append((2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sxx + syy + c2)))
        expected.append(np.mean(maps))
    torch.testing.assert_close(
        ssim(generated, original, padding="valid"), torch.tensor(expected, dtype=torch.float64)
    )


def test_gaussian_window():
    window = gaussian_window(11, 1.5)
    assert window.shape == (11,)
    torch.testing.assert_close(window.sum().item(), 1.0)
    torch.testing.assert_close(window, window.flip(0))
    assert window.argmax().item() == 5


def test_shape_errors(images):
    generated, original = images
    with pytest.raises(ValueError, match="same shape"):
        mse(generated, original[..., :-1])
    with pytest.raises(ValueError, match="mask"):
        mse(generated, original, torch.zeros(2, 3, 40, 48))
    with pytest.raises(ValueError, match="region"):
        mse(generated, original, region="hole")
    with pytest.raises(ValueError, match="at least"):
        ssim(generated[..., :8, :8], original[..., :8, :8], padding="valid")
    with pytest.raises(ValueError, match="padding"):
        ssim(generated, original, padding="zeros")
