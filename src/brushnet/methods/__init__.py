"""Every inpainting method behind one interface: ``load_method(name, models)`` then ``inpaint(method, ...)``,
or ``prepare`` (checks, no model needed) and ``run``.

Names load on first use (the CLI reads the declarations without importing torch, for a fast ``--help``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "GenerateOutput": "base",
    "GuidanceWindow": "base",
    "InpaintMethod": "base",
    "InpaintRequest": "base",
    "InpaintResult": "base",
    "ModelPaths": "base",
    "ModelSlot": "base",
    "NoOptions": "base",
    "PreparedJob": "base",
    "StepCallback": "base",
    "Task": "base",
    "check_request": "api",
    "inpaint": "api",
    "outpaint": "api",
    "prepare": "api",
    "prepare_outpaint": "api",
    "run": "api",
    "LatentMethod": "latent_method",
    "PipelineMethod": "pipeline_method",
    "available_methods": "registry",
    "get_method_class": "registry",
    "load_method": "registry",
    "method_classes": "registry",
    "model_slots": "registry",
    "register_method": "registry",
}
__all__ = [
    "GenerateOutput",
    "GuidanceWindow",
    "InpaintMethod",
    "InpaintRequest",
    "InpaintResult",
    "LatentMethod",
    "ModelPaths",
    "ModelSlot",
    "NoOptions",
    "PipelineMethod",
    "PreparedJob",
    "StepCallback",
    "Task",
    "available_methods",
    "check_request",
    "get_method_class",
    "inpaint",
    "load_method",
    "method_classes",
    "model_slots",
    "outpaint",
    "prepare",
    "prepare_outpaint",
    "register_method",
    "run",
]

if TYPE_CHECKING:  # pragma: no cover
    from .api import check_request, inpaint, outpaint, prepare, prepare_outpaint, run
    from .base import (
        GenerateOutput,
        GuidanceWindow,
        InpaintMethod,
        InpaintRequest,
        InpaintResult,
        ModelPaths,
        ModelSlot,
        NoOptions,
        PreparedJob,
        StepCallback,
        Task,
    )
    from .latent_method import LatentMethod
    from .pipeline_method import PipelineMethod
    from .registry import (
        available_methods,
        get_method_class,
        load_method,
        method_classes,
        model_slots,
        register_method,
    )


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
