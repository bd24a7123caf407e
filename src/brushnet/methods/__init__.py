"""Every inpainting method behind one interface: ``load_method(name, models)`` then ``inpaint(method, ...)``."""

from .base import (
    GenerateOutput,
    InpaintMethod,
    InpaintRequest,
    InpaintResult,
    ModelPaths,
    NoOptions,
    StepCallback,
    inpaint,
)
from .registry import available_methods, get_method_class, load_method, register_method

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
    "register_method",
]
