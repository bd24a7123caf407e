"""Pipelines, one class per file; what they share is in :mod:`brushnet.pipelines.common`."""

from .common import brushnet_keep_schedule
from .pipeline_brushnet import StableDiffusionBrushNetPipeline
from .pipeline_brushnet_sdxl import StableDiffusionXLBrushNetPipeline
from .pipeline_hd_painter import StableDiffusionHDPainterPipeline

__all__ = [
    "StableDiffusionBrushNetPipeline",
    "StableDiffusionHDPainterPipeline",
    "StableDiffusionXLBrushNetPipeline",
    "brushnet_keep_schedule",
]
