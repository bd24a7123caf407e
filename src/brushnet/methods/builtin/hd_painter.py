"""HD-Painter (Manukyan et al., "HD-Painter: High-Resolution and Prompt-Faithful Text-Guided Image Inpainting
with Diffusion Models", arXiv 2312.14091) on a 9-channel SD1.x/SD2 inpainting UNet: PAIntA (prompt-aware
introverted attention) and RASG (reweighting attention score guidance), training-free, through
:class:`~brushnet.pipelines.pipeline_hd_painter.StableDiffusionHDPainterPipeline`.

The defaults are the original's (github.com/Picsart-AI-Research/HD-Painter, ``hd_inpaint.py``): both parts on,
RASG η 0.1, PAIntA while t > 500, its prompt additions, its DDIM timestep grid. The loop is the method's own
DDIM, so it takes only the ``ddim`` scheduler name. Its super-resolution stage is not implemented
(docs/hd_painter.md says why).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...errors import RequestError
from ..base import BASE_CONFIG, GenerateOutput, InpaintRequest, Task, given
from ..counting import count_backward
from ..pipeline_method import PipelineMethod
from ..registry import register_method
from .sd_inpainting import INPAINT_MODEL

__all__ = ["HDPainter", "HDPainterOptions", "ORIGINAL_POSITIVE_PROMPT", "ORIGINAL_NEGATIVE_PROMPT"]

ORIGINAL_POSITIVE_PROMPT = "Full HD, 4K, high quality, high resolution"
"""The original's default positive addition (CLI and demo), appended to the prompt as ``", <addition>"``."""

ORIGINAL_NEGATIVE_PROMPT = (
    "text, bad anatomy, bad proportions, blurry, cropped, deformed, disfigured, duplicate, error, extra limbs, "
    "gross proportions, jpeg artifacts, long neck, low quality, lowres, malformed, morbid, mutated, mutilated, "
    "out of frame, ugly, worst quality"
)
"""The original's default negative prompt (CLI and demo)."""


class HDPainterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    painta: bool = Field(
        True, description="PAIntA: damp hole-to-known self-attention on prompt-irrelevant pixels."
    )
    rasg: bool = Field(
        True, description="RASG: guide each DDIM step by the prompt's cross-attention on the hole."
    )
    rasg_eta: float = Field(
        0.1, ge=0.0, le=1.0, description="RASG strength: DDIM eta whose noise is the normalised gradient."
    )
    painta_end_timestep: int = Field(
        500, ge=0, le=1000, description="PAIntA acts on steps whose timestep is above this (original: 500)."
    )
    positive_prompt: str = Field(
        ORIGINAL_POSITIVE_PROMPT, description="Appended to the prompt as ', <text>' (empty: none)."
    )
    default_negative_prompt: str = Field(
        ORIGINAL_NEGATIVE_PROMPT, description="Negative prompt used when the request gives none."
    )
    timestep_spacing: Literal["original", "trailing"] = Field(
        "original",
        description="'original': 999, 999-1000//steps, ... (extra steps when steps does not divide 1000); "
        "'trailing': exactly `steps`.",
    )


@register_method
class HDPainter(PipelineMethod):
    name = "hd-painter"
    description = (
        "HD-Painter: PAIntA + RASG (training-free) on a 9-channel inpainting UNet, its own DDIM loop."
    )
    Options = HDPainterOptions
    models = (INPAINT_MODEL,)
    optional_models = (BASE_CONFIG,)
    default_scheduler = "ddim"
    schedulers = ("ddim",)
    compilable = False  # PAIntA/RASG install new attention processors on every call
    latent_mask = "cover"  # its pipeline dilates the hole and marks a cell for any hole pixel in it

    @classmethod
    def check(cls, request: InpaintRequest, options: HDPainterOptions) -> InpaintRequest:
        """Also refuse ``rasg_eta`` with RASG off, ``painta_end_timestep`` with PAIntA off, and
        ``default_negative_prompt`` where it is not used (the request has a negative prompt, or guidance is off)."""
        request = super().check(request, options)
        for name, part in (("rasg_eta", "rasg"), ("painta_end_timestep", "painta")):
            if given(options, name) and not getattr(options, part):
                raise RequestError(
                    f"option {name} has no effect with {part}=false: turn {part} on or drop {name}"
                )
        if given(options, "default_negative_prompt") and options.default_negative_prompt:
            if request.negative_prompt:
                raise RequestError(
                    "option default_negative_prompt has no effect with a negative_prompt given (it is used only "
                    "when the request has none); drop one of them"
                )
            if request.guidance_scale is not None and request.guidance_scale <= 1:
                raise RequestError(
                    "option default_negative_prompt has no effect with guidance_scale <= 1 (classifier-free "
                    "guidance is off); raise guidance_scale or drop it"
                )
        return request

    @classmethod
    def build_pipeline(cls, models, dtype):
        from ...errors import CheckpointError
        from ...pipelines.pipeline_hd_painter import StableDiffusionHDPainterPipeline

        components = cls.load_base(models, dtype, "inpaint_model", in_channels=9)
        prediction = components["scheduler"].config.prediction_type
        if prediction not in ("epsilon", "v_prediction"):
            raise CheckpointError(f"hd-painter supports epsilon and v_prediction models, not {prediction!r}")
        return StableDiffusionHDPainterPipeline(**components)

    def call_arguments(self, task: Task) -> dict[str, Any]:
        # The one mask conversion: the pipeline takes white / 1 = region to generate, the project's convention, so
        # the hole passes through unchanged (tests/methods/test_hd_painter.py checks the UNet's mask channel).
        options = task.options
        return dict(
            image=task.image,
            mask_image=task.hole,
            positive_prompt=options.positive_prompt,
            use_painta=options.painta,
            use_rasg=options.rasg,
            rasg_eta=options.rasg_eta,
            painta_end_timestep=options.painta_end_timestep,
            timestep_spacing=options.timestep_spacing,
        )

    def generate(self, task: Task) -> GenerateOutput:
        # the default negative acts only under guidance (the pipeline would warn about one given without)
        guided = task.request.guidance_scale is not None and task.request.guidance_scale > 1
        if guided and not task.request.negative_prompt and task.options.default_negative_prompt:
            request = task.request.model_copy(
                update={"negative_prompt": task.options.default_negative_prompt}
            )
            task = replace(task, request=request)
        # every RASG step is one backward pass through the UNet (a CFG pair counts 2, as for unet_calls)
        with count_backward(self.pipeline.unet.conv_in) as backward:
            output = super().generate(task)
        output.extra_calls["rasg_backward"] = backward.per_image(task.num_images)
        return output
