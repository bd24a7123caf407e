"""brushnet: BrushNet dual-branch diffusion inpainting, and the methods it is compared against, on
upstream diffusers.

Heavy modules (torch, diffusers) load on first use, so ``import brushnet`` and ``brushnet --help`` are fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "BrushNetModel": "brushnet.models.brushnet",
    "BrushNetOutput": "brushnet.models.brushnet",
    "unet_forward_with_brushnet": "brushnet.models.unet_injection",
    "StableDiffusionBrushNetPipeline": "brushnet.pipelines.pipeline_brushnet",
    "StableDiffusionXLBrushNetPipeline": "brushnet.pipelines.pipeline_brushnet_sdxl",
}

__all__ = [
    "BrushNetModel",
    "BrushNetOutput",
    "StableDiffusionBrushNetPipeline",
    "StableDiffusionXLBrushNetPipeline",
    "unet_forward_with_brushnet",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from .models.brushnet import BrushNetModel, BrushNetOutput
    from .models.unet_injection import unet_forward_with_brushnet
    from .pipelines.pipeline_brushnet import StableDiffusionBrushNetPipeline
    from .pipelines.pipeline_brushnet_sdxl import StableDiffusionXLBrushNetPipeline


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'brushnet' has no attribute {name!r}")
