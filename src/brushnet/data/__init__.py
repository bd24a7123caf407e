"""Datasets, mask generators and run-length codecs.

The public names below are imported lazily (on first attribute access), so ``import brushnet.cli.data`` and
``brushnet data --help`` do not pay for torch or webdataset.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "BrushConfig": "masks",
    "MaskConfig": "masks",
    "make_training_mask": "masks",
    "morphological_opening": "masks",
    "pick_segmentation_mask": "masks",
    "random_brush_mask": "masks",
    "prepare_training_pair": "transforms",
    "BrushDataStream": "brushdata",
    "SkipCounter": "brushdata",
    "expand_shards": "brushdata",
    "FolderDataset": "folder",
    "write_synthetic_shards": "synthetic",
    "decode_brushdata_rle": "rle",
    "encode_brushdata_rle": "rle",
    "decode_brushbench_rle": "rle",
    "encode_brushbench_rle": "rle",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
