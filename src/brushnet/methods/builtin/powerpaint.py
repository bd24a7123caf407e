"""PowerPaint (Zhuang et al., "A Task is Worth One Word: Learning with Task Prompts for High-Quality Versatile
Image Inpainting", ECCV 2024) behind the method interface: v1 (a 9-channel inpainting UNet) and v2 / v2-1 (a
BrushNet branch with cross-attention and its own text encoder), with learned task words that select what the
model does in the hole (docs/powerpaint.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ...errors import RequestError
from ..base import BASE, BASE_CONFIG, GuidanceWindow, InpaintRequest, ModelSlot, Task, given
from ..pipeline_method import PipelineMethod, pipeline_to
from ..registry import register_method

__all__ = ["PowerPaint", "PowerPaintOptions", "POWERPAINT"]

POWERPAINT = ModelSlot(
    "powerpaint",
    "PowerPaint checkpoint folder as released (v2/v2-1: the folder with PowerPaint_Brushnet/; v1: the folder "
    "with unet/ and text_encoder/) or as diffusers folders; --base is the SD1.5 model it runs on.",
    folder="powerpaint",
    random_builder="brushnet.random_models:build_random_powerpaint",
)


class PowerPaintOptions(GuidanceWindow):
    task: Literal["text-guided", "shape-guided", "object-removal", "context-aware", "outpainting"] = Field(
        "text-guided",
        description="What to do in the hole: text-guided (object from the prompt), shape-guided (object "
        "filling the mask's shape), object-removal (background only), context-aware (fill from the "
        "surroundings), outpainting (extend the image).",
    )
    fitting_degree: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Shape-guided: how closely the object fills the mask (1 = its shape; the original "
        "recommends 0.5-0.6 for objects not bound to it, 0.8-0.95 to fill it).",
    )
    conditioning_scale: float = Field(
        1.0, ge=0.0, le=2.0, description="v2 branch strength (residual scale); v1 has no branch."
    )


@register_method
class PowerPaint(PipelineMethod):
    name = "powerpaint"
    description = (
        "PowerPaint v1/v2/v2-1: learned task words pick text-guided or shape-guided objects, object removal, "
        "context-aware fill or outpainting."
    )
    Options = PowerPaintOptions
    models = (BASE, POWERPAINT)
    optional_models = (BASE_CONFIG,)
    outpaint_options = {"task": "outpainting"}  # `brushnet outpaint`: the outpainting prompts

    def __init__(self, pipeline: Any, device: Any = "cpu", dtype: Any = None, version: str = "v2"):
        super().__init__(pipeline, device, dtype)
        self.version = version
        # v1 is diffusers' inpaint pipeline, which draws a batch's VAE samples in a batch-dependent order
        self.per_image_calls = version == "v1"
        self.counted_components = ("brushnet",) if version == "v2" else ()

    @classmethod
    def check(cls, request: InpaintRequest, options: PowerPaintOptions) -> InpaintRequest:
        """Also refuse ``fitting_degree`` with a task other than shape-guided (the only one it acts on)."""
        request = super().check(request, options)
        if given(options, "fitting_degree") and options.task != "shape-guided":
            raise RequestError(
                f"option fitting_degree has no effect with task {options.task!r}; it applies to task=shape-guided "
                "only: set task=shape-guided or drop fitting_degree"
            )
        return request

    @classmethod
    def load(cls, models, device: str = "cpu", dtype: Any = "fp32") -> PowerPaint:
        from ...loading import resolve_dtype
        from ...loading_powerpaint import load_powerpaint_pipeline

        models.require(cls)
        torch_dtype = resolve_dtype(dtype)
        pipeline, files = load_powerpaint_pipeline(
            models.powerpaint,
            models.base,
            dtype=torch_dtype,
            allow_pickle=models.allow_pickle,
            base_config=models.base_config,
        )
        return cls(pipeline_to(pipeline, device), device=device, dtype=torch_dtype, version=files.version)

    @classmethod
    def build_pipeline(cls, models, dtype):
        from ...loading_powerpaint import load_powerpaint_pipeline

        return load_powerpaint_pipeline(
            models.powerpaint, models.base, dtype, models.allow_pickle, models.base_config
        )[0]

    def call_arguments(self, task: Task) -> dict[str, Any]:
        options: PowerPaintOptions = task.options
        # The one mask conversion happens in the pipelines: both take the project's convention (white / 1 =
        # generate). v2 gives its branch the keep mask (1 − hole) as the 5th channel of `brushnet_cond`, as
        # BrushNet; v1 is diffusers' inpaint pipeline (UNet mask channel = 1 on the hole). tests/methods checks
        # what reaches each model.
        arguments = dict(
            image=task.image,
            mask_image=task.hole,
            task=options.task,
            fitting_degree=options.fitting_degree,
        )
        if self.version == "v1":
            if (options.conditioning_scale, options.control_guidance_start, options.control_guidance_end) != (
                1.0,
                0.0,
                1.0,
            ):
                raise RequestError(
                    "conditioning_scale and control_guidance_start/end set the v2 branch; PowerPaint v1 has none"
                )
            height, width = task.image.shape[-2:]
            return dict(arguments, height=height, width=width, strength=1.0)
        return dict(
            arguments,
            brushnet_conditioning_scale=options.conditioning_scale,
            control_guidance_start=options.control_guidance_start,
            control_guidance_end=options.control_guidance_end,
        )
