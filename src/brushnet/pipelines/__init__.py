"""Pipelines, one class per file; what they share is in :mod:`brushnet.pipelines.common`."""

from .common import brushnet_keep_schedule
from .pipeline_brushnet import StableDiffusionBrushNetPipeline
from .pipeline_brushnet_sdxl import StableDiffusionXLBrushNetPipeline
from .pipeline_hd_painter import StableDiffusionHDPainterPipeline
from .pipeline_powerpaint import StableDiffusionPowerPaintBrushNetPipeline
from .pipeline_powerpaint_v1 import StableDiffusionPowerPaintInpaintPipeline

__all__ = [
    "StableDiffusionBrushNetPipeline",
    "StableDiffusionHDPainterPipeline",
    "StableDiffusionPowerPaintBrushNetPipeline",
    "StableDiffusionPowerPaintInpaintPipeline",
    "StableDiffusionXLBrushNetPipeline",
    "brushnet_keep_schedule",
]
