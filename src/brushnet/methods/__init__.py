"""Every inpainting method behind one interface: ``load_method(name, models)`` then ``inpaint(method, ...)``.

Names load on first use (this package's CLI module must import without torch, for a fast ``--help``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "GenerateOutput": "base",
    "InpaintMethod": "base",
    "InpaintRequest": "base",
    "InpaintResult": "base",
    "ModelPaths": "base",
    "NoOptions": "base",
    "StepCallback": "base",
    "inpaint": "base",
    "outpaint": "base",
    "available_methods": "registry",
    "get_method_class": "registry",
    "load_method": "registry",
    "register_method": "registry",
}
__all__ = [
    "GenerateOutput",
    "InpaintMethod",
    "InpaintRequest",
    "InpaintResult",
    "ModelPaths",
    "NoOptions",
    "StepCallback",
    "available_methods",
    "get_method_class",
    "inpaint",
    "load_method",
    "outpaint",
    "register_method",
]

if TYPE_CHECKING:  # pragma: no cover
    from .base import (
        GenerateOutput,
        InpaintMethod,
        InpaintRequest,
        InpaintResult,
        ModelPaths,
        NoOptions,
        StepCallback,
        inpaint,
        outpaint,
    )
    from .registry import available_methods, get_method_class, load_method, register_method


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
