"""The BrushNet branch and the plain function that runs a stock UNet with its residuals."""

from .brushnet import BrushNetModel, BrushNetOutput
from .unet_injection import count_injection_points, unet_forward_with_brushnet

__all__ = ["BrushNetModel", "BrushNetOutput", "count_injection_points", "unet_forward_with_brushnet"]
