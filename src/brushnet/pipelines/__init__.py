"""Pipelines, one class per file."""

from .pipeline_brushnet import StableDiffusionBrushNetPipeline, brushnet_keep_schedule

__all__ = ["StableDiffusionBrushNetPipeline", "brushnet_keep_schedule"]
