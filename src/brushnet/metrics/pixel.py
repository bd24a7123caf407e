"""Pixel metrics on the kept region: MSE, PSNR (two definitions each) and SSIM.

Conventions (shared by all of `brushnet.metrics`): images are float tensors `N×3×H×W` in [0, 1];
masks are `N×1×H×W` floats with 1 = hole (generated region) and 0 = kept. "Kept-region" metrics
multiply both images by the keep mask `1 - mask` before comparing them, as BrushBench does
(BrushNet, Ju et al. 2024, Sec. 4 and the released `evaluate_brushnet.py`).

Two MSE/PSNR definitions exist because the published BrushBench numbers use one that is not the usual
per-channel mean:

* `mse_brushbench` / `psnr_brushbench` reproduce the original script. With keep mask `k = 1 - mask`
  and error `e = k * (x - y)`::

      MSE_bb  = sum_{c,h,w} e[c,h,w]**2 / sum_{h,w} k[h,w]
      PSNR_bb = 20 * log10(1 / sqrt(MSE_bb)) = -10 * log10(MSE_bb)     (1000 when MSE_bb < 1e-10)

  The numerator sums all three channels but the denominator counts kept pixels of the single-channel
  mask, so on the kept pixels this is 3x the per-channel mean squared error. With no mask (everything
  kept) the denominator is H*W. The original passes the scale for PSNR as data range 1.

* `mse` / `psnr` are the corrected per-channel means (torchmetrics' `MeanSquaredError` /
  `PeakSignalNoiseRatio(data_range=1)` applied to the masked images). `region="image"` (the default)
  averages over all `3*H*W` entries of the masked images, so hole pixels count as zero error;
  `region="kept"` averages only over kept entries (`3 * sum k`), which equals `MSE_bb / 3`.

All functions return one value per image (a tensor of shape `N`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["keep_masked", "mse_brushbench", "psnr_brushbench", "mse", "psnr", "ssim", "gaussian_window"]

BRUSHBENCH_PSNR_CAP = 1000.0
"""Value the original script returns for PSNR when its MSE is below 1e-10."""


def _check_pair(generated: torch.Tensor, original: torch.Tensor, mask: torch.Tensor | None) -> None:
    if generated.shape != original.shape or generated.ndim != 4:
        raise ValueError(
            f"generated and original must both be N×C×H×W of the same shape, got "
            f"{tuple(generated.shape)} and {tuple(original.shape)}"
        )
    if mask is not None:
        n, _, h, w = generated.shape
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2:] != (h, w) or mask.shape[0] not in (1, n):
            raise ValueError(f"mask must be N×1×H×W matching the images, got {tuple(mask.shape)}")


def _keep(generated: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Keep mask `1 - mask` as `N×1×H×W` (all ones when `mask` is None)."""
    n, _, h, w = generated.shape
    if mask is None:
        return generated.new_ones(n, 1, h, w)
    return (1.0 - mask.to(generated.dtype)).expand(n, 1, h, w)


def keep_masked(images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Multiplies `images` (N×C×H×W) by the keep mask `1 - mask` (N×1×H×W, 1 = hole); None keeps all."""
    if mask is None:
        return images
    return images * (1.0 - mask.to(images.dtype))


def _squared_error(generated, original, mask) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pair(generated, original, mask)
    generated = generated.double()
    original = original.double()
    keep = _keep(generated, mask)
    squared_error = ((generated - original) * keep) ** 2
    return squared_error, keep


def mse_brushbench(
    generated: torch.Tensor, original: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE exactly as the original BrushBench script computes it (3x the per-channel mean on kept pixels).

    `MSE_bb = sum_{c,h,w} ((1 - mask) * (generated - original))**2 / sum_{h,w} (1 - mask)`.
    The published BrushBench tables print `MSE_bb × 10³`.

    Args:
        generated: `N×3×H×W` in [0, 1].
        original: `N×3×H×W` in [0, 1].
        mask: `N×1×H×W`, 1 = hole (excluded), 0 = kept; None = compare whole images.

    Returns:
        `N` float64 values; NaN for an image with no kept pixel.
    """
    squared_error, keep = _squared_error(generated, original, mask)
    return squared_error.sum(dim=(1, 2, 3)) / keep.sum(dim=(1, 2, 3))


def psnr_brushbench(
    generated: torch.Tensor, original: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """PSNR exactly as the original BrushBench script computes it, from `mse_brushbench`.

    `PSNR_bb = 20 * log10(1 / sqrt(MSE_bb))` (data range 1), and 1000 when `MSE_bb < 1e-10`.
    Because `MSE_bb` is 3x the per-channel mean, `PSNR_bb` is `10 * log10(3) ≈ 4.77` dB below `psnr`
    with `region="kept"`.

    Args: as `mse_brushbench`.

    Returns:
        `N` float64 values in dB.
    """
    mse_value = mse_brushbench(generated, original, mask)
    psnr_value = -10.0 * torch.log10(mse_value.clamp_min(1e-30))
    return torch.where(mse_value < 1e-10, torch.full_like(psnr_value, BRUSHBENCH_PSNR_CAP), psnr_value)


def mse(
    generated: torch.Tensor,
    original: torch.Tensor,
    mask: torch.Tensor | None = None,
    region: str = "image",
) -> torch.Tensor:
    """Corrected per-channel mean squared error on the masked images.

    With `e = (1 - mask) * (generated - original)`:

    * `region="image"` (default): `mean_{c,h,w} e**2` over all `3·H·W` entries — torchmetrics'
      `MeanSquaredError` on the masked images, the usual definition applied to BrushBench's inputs.
    * `region="kept"`: `sum e**2 / (3 · sum_{h,w} (1 - mask))`, the mean over kept entries only
      (`= mse_brushbench / 3`).

    Args:
        generated, original: `N×C×H×W` in [0, 1].
        mask: `N×1×H×W`, 1 = hole; None = whole images (both regions then agree).
        region: "image" or "kept".

    Returns:
        `N` float64 values.
    """
    squared_error, keep = _squared_error(generated, original, mask)
    if region == "image":
        return squared_error.mean(dim=(1, 2, 3))
    if region == "kept":
        return squared_error.sum(dim=(1, 2, 3)) / (keep.sum(dim=(1, 2, 3)) * squared_error.shape[1])
    raise ValueError(f"region must be 'image' or 'kept', got {region!r}")


def psnr(
    generated: torch.Tensor,
    original: torch.Tensor,
    mask: torch.Tensor | None = None,
    region: str = "image",
    data_range: float = 1.0,
) -> torch.Tensor:
    """Corrected PSNR: `10 * log10(data_range**2 / mse(..., region))`, `inf` for identical inputs.

    Args: as `mse`, plus `data_range` (1 for images in [0, 1]).

    Returns:
        `N` float64 values in dB.
    """
    mse_value = mse(generated, original, mask, region=region)
    return 10.0 * torch.log10(data_range**2 / mse_value)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised 1-D Gaussian of `size` taps centred on the middle tap."""
    offsets = torch.arange(size, dtype=dtype) - (size - 1) / 2
    window = torch.exp(-(offsets**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(
    generated: torch.Tensor,
    original: torch.Tensor,
    mask: torch.Tensor | None = None,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    data_range: float = 1.0,
    padding: str = "reflect",
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, Eq. 13) with a Gaussian window, per image.

    `SSIM(x, y) = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))`, with
    `C1 = (K1 L)²`, `C2 = (K2 L)²` and local statistics from an 11-tap σ=1.5 Gaussian (population
    covariances, variances clamped at 0), computed per channel and averaged over channels and positions.

    `padding="reflect"` (default) reflect-pads by 5 pixels and averages the full-size map, which is what
    torchmetrics' `structural_similarity_index_measure` (checked against 1.9) and so BrushEdit's SSIM
    column compute. `padding="valid"` averages only windows lying fully inside the image (the paper's
    and scikit-image's convention); the two differ by ~1e-3 on 512² images.

    Args:
        generated, original: `N×C×H×W` in [0, 1]; H and W larger than `window_size // 2`.
        mask: optional `N×1×H×W` (1 = hole); when given both images are multiplied by `1 - mask`
            first, as the other kept-region metrics do.
        window_size, sigma: Gaussian window.
        k1, k2: stabilising constants K1, K2.
        data_range: L, the dynamic range (1 for [0, 1]).
        padding: "reflect" or "valid".

    Returns:
        `N` float64 values in [-1, 1]; 1 for identical images.
    """
    _check_pair(generated, original, mask)
    smallest = window_size if padding == "valid" else window_size // 2 + 1
    if min(generated.shape[-2:]) < smallest:
        raise ValueError(
            f"SSIM with padding={padding!r} needs images of at least {smallest}×{smallest} pixels"
        )
    x = keep_masked(generated.double(), mask)
    y = keep_masked(original.double(), mask)
    if padding == "reflect":
        pad = window_size // 2
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    elif padding != "valid":
        raise ValueError(f"padding must be 'reflect' or 'valid', got {padding!r}")
    channels = x.shape[1]
    window_1d = gaussian_window(window_size, sigma).to(x.device)
    window = (window_1d[:, None] * window_1d[None, :]).expand(channels, 1, window_size, window_size)

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    sigma_xx = (local_mean(x * x) - mu_x**2).clamp_min(0.0)
    sigma_yy = (local_mean(y * y) - mu_y**2).clamp_min(0.0)
    sigma_xy = local_mean(x * y) - mu_x * mu_y
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (sigma_xx + sigma_yy + c2)
    )
    return ssim_map.mean(dim=(1, 2, 3))
