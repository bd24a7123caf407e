"""Run-length codecs for the BrushData and BrushBench mask formats.

Both formats are a flat list ``[start, length, start, length, ...]`` with 1-based starts over the
flattened mask. They differ only in the flattening order:

- BrushData segmentation masks (training shards) are flattened **column-major** (Fortran order);
- BrushBench / EditBench masks (``mapping_file.json``) are flattened **row-major** (C order).

Decoded masks are boolean arrays of shape ``(height, width)``, ``True`` = the masked object / the
region to generate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "rle_decode",
    "rle_encode",
    "decode_brushdata_rle",
    "encode_brushdata_rle",
    "decode_brushbench_rle",
    "encode_brushbench_rle",
]


def rle_decode(rle: Sequence[int], height: int, width: int, order: str) -> np.ndarray:
    """Decode a 1-based ``[start, length, ...]`` run-length list into a boolean ``(height, width)`` mask.

    Args:
        rle: flat list of (1-based start, run length) pairs over the flattened mask.
        height, width: mask size.
        order: ``"F"`` (column-major, BrushData) or ``"C"`` (row-major, BrushBench).
    """
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', got {order!r}")
    values = np.asarray(rle, dtype=np.int64).reshape(-1)
    if values.size % 2:
        raise ValueError(f"run-length list has an odd number of values ({values.size})")
    starts, lengths = values[0::2] - 1, values[1::2]
    total = height * width
    if values.size and (starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > total):
        raise ValueError(f"run-length list does not fit a {height}x{width} mask")
    flat = np.zeros(total + 1, dtype=np.int32)
    np.add.at(flat, starts, 1)
    np.add.at(flat, starts + lengths, -1)
    flat = np.cumsum(flat[:-1]) > 0
    return flat.reshape((height, width), order=order)


def rle_encode(mask: np.ndarray, order: str) -> list[int]:
    """Encode a 2-D mask (nonzero = set) as a 1-based ``[start, length, ...]`` list; inverse of :func:`rle_decode`."""
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', got {order!r}")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    flat = mask.reshape(-1, order=order).astype(bool)
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    out = np.empty(starts.size * 2, dtype=np.int64)
    out[0::2] = starts + 1
    out[1::2] = ends - starts
    return out.tolist()


def decode_brushdata_rle(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """BrushData segmentation mask (column-major, 1-based) → boolean ``(height, width)``."""
    return rle_decode(rle, height, width, order="F")


def encode_brushdata_rle(mask: np.ndarray) -> list[int]:
    """Boolean ``(height, width)`` → BrushData run-length list (column-major, 1-based)."""
    return rle_encode(mask, order="F")


def decode_brushbench_rle(rle: Sequence[int], height: int = 512, width: int = 512) -> np.ndarray:
    """BrushBench / EditBench mask (row-major, 1-based) → boolean ``(height, width)``."""
    return rle_decode(rle, height, width, order="C")


def encode_brushbench_rle(mask: np.ndarray) -> list[int]:
    """Boolean ``(height, width)`` → BrushBench run-length list (row-major, 1-based)."""
    return rle_encode(mask, order="C")
