"""The one place for image/mask conversion and the blurred-mask paste-back.

**Mask convention** (everywhere at the public edges of this project): a mask is single-channel;
**white / 1 / True = the region to generate (the hole)**, black / 0 = keep. Masks are binarised at 0.5
(a grey value ≥ 0.5 is a hole). Images are RGB, in [0, 1] when they are tensors or float arrays.

Only model adapters convert to a model's internal convention (BrushNet's branch reads a *keep* mask,
1 = keep; RePaint keeps 1 = known; ControlNet-inpaint marks hole pixels −1). Those conversions live next
to the model that needs them, never here.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

__all__ = [
    "InputError",
    "DEFAULT_MAX_PIXELS",
    "load_image",
    "open_image",
    "oriented",
    "exif_orientation",
    "may_be_transparent",
    "load_mask",
    "mask_to_array",
    "mask_batch",
    "pil_to_tensor",
    "tensor_to_pil",
    "gaussian_kernel_1d",
    "feather_mask",
    "blend",
    "blend_pil",
]


DEFAULT_MAX_PIXELS = 8192 * 8192
"""The largest image (width x height) the project opens unless told otherwise; checked from the file's header
before any pixel is decoded (a decompression bomb is refused, not decoded)."""


_PIL_LIMIT_LOCK = threading.Lock()


def _open_header(path: Path, limit: int) -> Image.Image:
    """``Image.open`` (the header only) with PIL's own decompression-bomb guard out of the way of ``limit``:
    below PIL's hard limit (2 x ``Image.MAX_IMAGE_PIXELS``) PIL refuses only what ``limit`` refuses too; above
    it, PIL's limit is lifted to ``limit`` for this call."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is None or limit <= 2 * pil_limit:
        return Image.open(path)
    with _PIL_LIMIT_LOCK:
        Image.MAX_IMAGE_PIXELS = limit
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit


def _check_in_memory_size(width: int, height: int, what: str, max_pixels: int | None) -> None:
    """An in-memory image or mask (PIL, numpy, torch) against an explicit ``max_pixels``, as a file's header is
    (``None``: no limit, since nothing is decoded)."""
    if max_pixels is None:
        return
    if max_pixels < 1:
        raise InputError(f"--max-pixels must be at least 1, got {max_pixels}")
    if width * height > max_pixels:
        raise InputError(
            f"{what} is {width}x{height} = {width * height} pixels; the limit is {max_pixels} (--max-pixels)"
        )


def _open(path: str | os.PathLike, what: str, max_pixels: int | None = None) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} path is not a file: {path}")
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if limit < 1:
        raise InputError(f"--max-pixels must be at least 1, got {limit}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open_header(path, limit) as img:
                width, height = img.size
                if width * height > limit:
                    raise InputError(
                        f"{what} {path} is {width}x{height} = {width * height} pixels; the limit is {limit} "
                        "(--max-pixels)"
                    )
                img.load()
                return ImageOps.exif_transpose(img) if _has_orientation(img) else img.copy()
    except Image.DecompressionBombError as exc:  # over PIL's hard limit, which is above ``limit``
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1))} pixels" if found else "too many pixels"
        raise InputError(f"{what} {path} has {size}; the limit is {limit} (--max-pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{what} file is not a readable image: {path} ({exc.__class__.__name__})") from None


def exif_orientation(img: Image.Image) -> int:
    """``img``'s EXIF orientation tag (1, upright, when it has none or its EXIF block is broken)."""
    try:
        return img.getexif().get(0x0112) or 1
    except Exception:  # noqa: BLE001 - a broken EXIF block is no orientation
        return 1


def _has_orientation(img: Image.Image) -> bool:
    return exif_orientation(img) != 1


def may_be_transparent(img: Image.Image) -> bool:
    """Whether ``img`` can hold transparent pixels: an alpha channel (RGBA, LA, PA) or a PNG ``tRNS`` colour key
    (``transparency`` on a P, L or RGB image)."""
    return img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info


def oriented(img: Image.Image) -> Image.Image:
    """``img`` turned upright by its EXIF orientation tag, as viewers (and the web page) show it."""
    return ImageOps.exif_transpose(img) if _has_orientation(img) else img


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer/float greyscale images scaled by their range to 8-bit ``L`` (PIL's own
    ``convert("L")`` clips them, so a 16-bit mask or photo would come out nearly white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            top = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        elif img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            top = 65535.0
        else:
            top = 255.0
        return Image.fromarray(np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8), mode="L")
    return img


def open_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    r"""Open an image file as stored (any mode, alpha kept), checked as :func:`load_image` checks it: missing or
    unreadable files and more than ``max_pixels`` pixels (from the header) are one-line :class:`InputError`\ s.
    For a caller that needs more of the file than :func:`load_image`'s RGB, without decoding it twice."""
    return _open(path, "image", max_pixels)


def _array_to_pil(image: np.ndarray | torch.Tensor) -> Image.Image:
    """An in-memory image as PIL: numpy ``(H, W)``, ``(H, W, 1|3|4)``; torch ``(H, W)``, ``(C, H, W)`` or
    ``(1, C, H, W)`` with ``C`` in 1, 3, 4; uint8 0–255, bool, or float in [0, 1]."""
    is_tensor = isinstance(image, torch.Tensor)
    kind = "tensor" if is_tensor else "array"
    shapes = "(3, H, W) or (1, 3, H, W)" if is_tensor else "(H, W, 3), (H, W, 4) or (H, W)"
    bad_shape = InputError(f"image {kind} must be {shapes}, got shape {tuple(image.shape)}")
    if is_tensor:
        arr = image.detach().cpu()
        arr = (arr.float() if arr.dtype in (torch.float16, torch.bfloat16) else arr).numpy()
        if arr.ndim == 4 and arr.shape[0] != 1:
            raise InputError(
                f"image tensor holds a batch of {arr.shape[0]} images {tuple(arr.shape)}; pass one"
            )
        if arr.ndim == 4:
            arr = arr[0]
        if arr.ndim == 3:
            if arr.shape[0] not in (1, 3, 4):
                raise bad_shape
            arr = arr.transpose(1, 2, 0)
    else:
        arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
        raise bad_shape
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        low, high = float(np.min(arr)), float(np.max(arr))
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 1.0:
            raise InputError(f"a float image {kind} must hold values in [0, 1], got {low:g}..{high:g}")
        arr = np.round(arr * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise InputError(f"image {kind} must be uint8 (0-255), bool or float in [0, 1], got {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))  # uint8 (H, W) / (H, W, 3) / (H, W, 4): L / RGB / RGBA


def load_image(
    path: str | os.PathLike | Image.Image | np.ndarray | torch.Tensor, max_pixels: int | None = None
) -> Image.Image:
    """Load an image as RGB: a file (upright by its EXIF orientation), a PIL image, a numpy array ``(H, W, 3)``,
    ``(H, W, 4)`` or ``(H, W)`` (uint8 0–255, bool, or float in [0, 1]) or a torch tensor ``(3, H, W)`` or
    ``(1, 3, H, W)`` in [0, 1] (uint8 tensors are read as 0–255). Transparent pixels of RGBA/LA images are
    composited on black; 16-bit images are scaled by their range.

    Raises:
        InputError: missing or unreadable file, more than ``max_pixels`` pixels (a file's checked before
            decoding; an in-memory image's when ``max_pixels`` is given), or an array/tensor of another shape,
            dtype or value range; anything else is refused with its type.
    """
    if isinstance(path, Image.Image):
        _check_in_memory_size(*path.size, "image", max_pixels)
        img = oriented(path)
    elif isinstance(path, (np.ndarray, torch.Tensor)):
        img = _array_to_pil(path)
        _check_in_memory_size(*img.size, "image", max_pixels)
    elif isinstance(path, (str, os.PathLike)):
        img = _open(path, "image", max_pixels)
    else:
        raise InputError(
            f"image must be a path, a PIL image, a numpy array or a torch tensor, got {type(path).__name__}"
        )
    img = _eight_bit(img)
    if may_be_transparent(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _grey(arr: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` mask data as ``(H, W)``, as a PIL mask of that mode is read: with 4 channels whose alpha
    varies (a stroke layer), the alpha; otherwise the mean of the colour channels (the alpha left out). The
    dtype is kept for uint8 and bool (so their 0-255 / boolean reading stays), float otherwise."""
    if arr.shape[-1] == 4:
        alpha = arr[..., 3]
        if alpha.min() != alpha.max():
            return alpha
        arr = arr[..., :3]
    if arr.dtype in (np.uint8, np.bool_) and (arr == arr[..., :1]).all():
        return arr[..., 0]  # every channel the same: no mean needed, the type kept
    return arr.astype(np.float32).mean(-1)


def _mask_values(mask: Image.Image | np.ndarray | torch.Tensor) -> tuple[np.ndarray, bool]:
    """A mask's grey values as float ``(H, W)`` in [0, 1] (not yet binarised), and whether it was given in
    0–255 steps (a PIL image or uint8 data; for messages)."""
    if isinstance(mask, Image.Image):
        mask = _eight_bit(mask)
        if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
            rgba = np.asarray(mask.convert("RGBA"))
            colour, alpha = rgba[..., :3], rgba[..., 3]
            # a stroke layer (the alpha varies): the alpha is the mask, whatever colour was painted
            if alpha.min() != alpha.max():
                values = alpha.astype(np.float32) / 255.0
            else:  # opaque (or uniformly translucent): the colour is the mask
                values = colour.astype(np.float32).mean(-1) / 255.0
        else:
            arr = np.asarray(mask.convert("L") if mask.mode not in ("L", "RGB") else mask)
            arr = arr.astype(np.float32)
            values = (arr.mean(-1) if arr.ndim == 3 else arr) / 255.0
        return values, True
    if mask is None:
        raise InputError("mask is missing (None); give a PIL image, a numpy array or a torch tensor")
    if isinstance(mask, torch.Tensor):
        if mask.is_meta:
            raise InputError("mask is a meta tensor (no data)")
        arr = mask.detach().float().cpu().numpy()
        while arr.ndim > 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim == 3 and arr.shape[0] not in (3, 4) and arr.shape[-1] in (1, 3, 4):  # H, W, C
            arr = _grey(arr)
        elif arr.ndim == 3:  # C, H, W
            arr = _grey(np.moveaxis(arr, 0, -1))
    else:
        arr = np.asarray(mask)
        if arr.dtype.kind not in "biuf":
            raise InputError(f"mask must hold numbers (uint8, bool or float), got dtype {arr.dtype}")
        # (1, H, W), (1, H, W, C): a batch of one, as the tensors; (H, W, C) keeps its channels
        while arr.ndim > 3 or (arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[-1] not in (1, 3, 4)):
            if arr.shape[0] != 1:
                break
            arr = arr[0]
        if arr.ndim == 3:
            arr = _grey(arr)
    if arr.ndim != 2:
        raise InputError(f"mask must be 2-D (H, W) after squeezing, got shape {tuple(np.shape(arr))}")
    if arr.dtype == np.bool_:
        return arr.astype(np.float32), False
    if not np.isfinite(arr).all():
        raise InputError("mask holds NaN or infinite values")
    high = arr.max(initial=0)
    if np.asarray(mask).dtype == np.uint8:
        return arr.astype(np.float32) / 255.0, True
    if high > 1.0 or arr.min(initial=0) < 0:
        # 0-255 steps given as numbers of another type: whole numbers up to 255 only
        if high > 255 or arr.min(initial=0) < 0 or not np.array_equal(arr, np.round(arr)):
            raise InputError(
                f"mask values must be in [0, 1] (or whole numbers 0-255), got {float(arr.min()):g}..{float(high):g}"
            )
        return arr.astype(np.float32) / 255.0, True
    return arr.astype(np.float32), False


def mask_to_array(mask: Image.Image | np.ndarray | torch.Tensor, invert: bool = False) -> np.ndarray:
    """Convert a mask in any common form to a boolean ``(H, W)`` array, True = hole.

    Accepted: PIL images in modes 1, L, P, RGB, RGBA/LA (for RGBA/LA and transparent palette images whose alpha
    channel varies, the alpha is the mask — painted strokes of any colour on a transparent layer, as painting
    tools export them, are the hole, whatever colour the transparent pixels store; an opaque RGBA/LA mask is
    read by its colour), numpy arrays ``(H, W)``, ``(H, W, C)`` (uint8 0–255, bool, or float in [0, 1]), torch
    tensors ``(H, W)``, ``(1, H, W)`` or ``(1, 1, H, W)`` in [0, 1]. Colour masks use the mean of their
    channels. Binarised at 0.5.
    """
    hole = _mask_values(mask)[0] >= 0.5
    return ~hole if invert else hole


def _empty_mask_message(values: np.ndarray, eight_bit: bool, invert: bool) -> str:
    """Why a mask read as ``values`` (see :func:`_mask_values`) marks no hole, in one line."""
    if invert:
        return (
            "mask is empty after --invert-mask (invert_mask): the mask is all white (white = keep when inverted), "
            "so nothing is left to inpaint"
        )
    high = float(values.max(initial=0.0))
    if high <= 0.0:
        return "mask is empty: no white pixel marks a region to inpaint (white = inpaint)"
    low = float(values.min(initial=high))
    if eight_bit:
        span = f"values {round(low * 255)}..{round(high * 255)}"
        return f"mask is empty: no pixel is >= 128 ({span}); masks are binarised at 50 % (white = inpaint)"
    span = f"values {low:.3g}..{high:.3g}"
    return f"mask is empty: no value is >= 0.5 ({span}); masks are binarised at 50 % (white = inpaint)"


def mask_batch(mask_image) -> list:
    """Split masks given in any of diffusers' documented batch formats into one entry per mask.

    - a PIL image, or a list of PIL images, arrays or tensors (each one mask, or a batch of them);
    - numpy: ``(H, W)`` and ``(H, W, C)`` with ``C`` in 1, 3, 4 are one mask; other 3-D arrays are a batch
      ``(B, H, W)``; 4-D arrays ``(B, H, W, C)``;
    - torch: ``(H, W)`` is one mask; ``(B, H, W)`` and ``(B, C, H, W)`` are batches (as diffusers reads them:
      a 3-D tensor is a batch of masks, never a colour mask).

    Every entry is then read by :func:`mask_to_array` (white / 1 = inpaint).
    """
    if isinstance(mask_image, (list, tuple)):
        return [m for item in mask_image for m in mask_batch(item)]
    if isinstance(mask_image, torch.Tensor):
        return list(mask_image) if mask_image.ndim in (3, 4) else [mask_image]
    if isinstance(mask_image, np.ndarray):
        if mask_image.ndim == 4 or (mask_image.ndim == 3 and mask_image.shape[-1] not in (1, 3, 4)):
            return list(mask_image)
        return [mask_image]
    return [mask_image]


def load_mask(
    path: str | os.PathLike | Image.Image | np.ndarray | torch.Tensor,
    size: tuple[int, int] | None = None,
    invert: bool = False,
    allow_empty: bool = False,
    allow_full: bool = True,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Load a mask (white = inpaint) as a boolean ``(H, W)`` array, True = hole, with input checks.

    Args:
        path: file path, or an in-memory mask (see :func:`mask_to_array`).
        size: expected ``(width, height)`` — the image's size. A mismatch is an :class:`InputError`.
        invert: swap hole and kept region (for masks drawn white = keep).
        allow_empty: an all-black mask (nothing to inpaint) is an error unless True; the message names the
            cause (all white under ``invert``; a grey mask with no value >= 50 %, and the range it has).
        allow_full: an all-white mask (nothing kept) is allowed by default (it is plain text-to-image).
        max_pixels: refuse larger mask files before decoding them, and larger in-memory masks.

    A mask file or PIL image is turned upright by its EXIF orientation, as the image is.
    """
    source = path
    if isinstance(path, (str, os.PathLike)):
        source = _open(path, "mask", max_pixels)
    elif isinstance(path, Image.Image):
        source = oriented(path)
    values, eight_bit = _mask_values(source)
    if not isinstance(path, (str, os.PathLike)):  # in memory (a file's header was checked)
        _check_in_memory_size(values.shape[1], values.shape[0], "mask", max_pixels)
    hole = values >= 0.5
    if invert:
        hole = ~hole
    if size is not None and (hole.shape[1], hole.shape[0]) != tuple(size):
        turned = ""
        if (hole.shape[0], hole.shape[1]) == tuple(size) and isinstance(path, (np.ndarray, torch.Tensor)):
            turned = (
                " (turned: if the image has an EXIF orientation it is used upright; make the mask from "
                "PIL.ImageOps.exif_transpose(image))"
            )
        raise InputError(
            f"mask is {hole.shape[1]}x{hole.shape[0]} but the image is {size[0]}x{size[1]}; they must match{turned}"
        )
    if not allow_empty and not hole.any():
        raise InputError(_empty_mask_message(values, eight_bit, invert))
    if not allow_full and hole.all():
        raise InputError("mask covers the whole image: nothing is kept (white = inpaint)")
    return hole


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float tensor ``(1, 3, H, W)`` in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float tensor ``(B, 3, H, W)`` in [0, 1] → list of RGB PIL images (rounded, not truncated)."""
    arr = (
        (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255.0)
        .round()
        .astype(np.uint8)
    )
    return [Image.fromarray(a) for a in arr]


def gaussian_kernel_1d(kernel_size: int, sigma: float | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel. ``sigma=None`` uses the OpenCV rule ``0.3·((k−1)/2 − 1) + 0.8``
    (3.5 for the reference's 21-pixel kernel)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if sigma is None or sigma <= 0:
        sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def feather_mask(hole: torch.Tensor, kernel_size: int = 21, sigma: float | None = None) -> torch.Tensor:
    """The reference's feathered blending mask ``m' = 1 − (1 − m)(1 − blur(m))``.

    The blur spreads outward into the kept region only; the hole itself stays exactly 1, and pixels farther
    than ``kernel_size // 2`` from the hole stay exactly 0.

    Args:
        hole: ``(B, 1, H, W)`` float, 1 = hole (binary).
        kernel_size: Gaussian kernel size (reference: 21). ``0`` or ``1`` disables feathering (``m' = m``).
    """
    hole = hole.to(torch.float64)
    if kernel_size <= 1:
        return hole
    kernel = gaussian_kernel_1d(kernel_size, sigma).to(hole.device)
    pad = kernel_size // 2
    # OpenCV's default border (BORDER_REFLECT_101) is torch's "reflect"; tiny images fall back to replicate.
    mode = "reflect" if min(hole.shape[-2:]) > pad else "replicate"
    blurred = F.pad(hole, (pad, pad, 0, 0), mode=mode)
    blurred = F.conv2d(blurred, kernel.view(1, 1, 1, -1))
    blurred = F.pad(blurred, (0, 0, pad, pad), mode=mode)
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1))
    blurred = blurred.clamp(0, 1)
    return 1 - (1 - hole) * (1 - blurred)


def blend(
    original: torch.Tensor, generated: torch.Tensor, hole: torch.Tensor, kernel_size: int = 21
) -> torch.Tensor:
    """Paste the generated image into the original through the feathered mask.

    ``out = original·(1 − m') + generated·m'`` (reference §4). Where ``m' = 0`` the original values are
    returned unchanged.

    Args:
        original, generated: ``(B, 3, H, W)`` in [0, 1] (``original`` may have batch 1).
        hole: ``(B, 1, H, W)`` or ``(1, 1, H, W)``, 1 = hole.
    """
    weight = feather_mask(hole, kernel_size).to(generated.dtype)
    original = original.to(generated.dtype).expand_as(generated)
    out = original * (1 - weight) + generated * weight
    return torch.where(weight == 0, original, out)


def blend_pil(
    original: Image.Image, generated: Image.Image, hole: np.ndarray, kernel_size: int = 21
) -> Image.Image:
    """:func:`blend` for PIL images; pixels outside the feathered band are byte-identical to ``original``."""
    if original.size != generated.size:
        raise InputError(f"cannot blend a {generated.size} result into a {original.size} image")
    orig = np.asarray(original.convert("RGB"))
    gen = np.asarray(generated.convert("RGB"))
    weight = feather_mask(torch.from_numpy(hole.astype(np.float64))[None, None], kernel_size)[0, 0].numpy()
    weight = weight[..., None]
    out = orig.astype(np.float64) * (1 - weight) + gen.astype(np.float64) * weight
    out = np.where(weight == 0, orig, np.clip(np.round(out), 0, 255)).astype(np.uint8)
    return Image.fromarray(out)
