"""The base of methods that run a diffusers pipeline (BrushNet, SD-inpainting, ControlNet-inpaint, ...).

:class:`PipelineMethod` owns what such methods share: loading (``build_pipeline`` from the model paths),
switching the scheduler per request (built from the base model's scheduler config), progress counted from the
scheduler's real timesteps (second-order and PRK schedulers take more than ``steps``), the call counters, and
the pipeline call itself — once for the whole batch, or once per image where a pipeline draws its random
numbers in a batch-dependent order. A subclass gives ``build_pipeline`` and ``call_arguments``.
"""

from __future__ import annotations

import contextlib
import logging
from abc import abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from .base import GenerateOutput, InpaintMethod, ModelPaths, Task
from .counting import count_calls

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

__all__ = ["PipelineMethod", "pipeline_to"]


def pipeline_to(pipeline, device):
    """``pipeline.to(device)`` without diffusers' warning that a float16 pipeline "cannot run" on the CPU: this
    torch runs float16 there (slowly), and the warning came four times per load, on runs that succeed."""
    from ..loading import quiet_warning

    with quiet_warning("diffusers.pipelines.pipeline_utils", "cannot run with `cpu` device"):
        return pipeline.to(device)


class PipelineMethod(InpaintMethod):
    """A method whose ``generate`` is one diffusers pipeline call (see the module docstring)."""

    #: one pipeline call per image: diffusers' inpaint pipelines draw the VAE-encoding samples of a batch in an
    #: order that differs from a single-image run, so image i would not equal a single run at seed + i otherwise
    per_image_calls: ClassVar[bool] = False
    #: pipeline components whose samples are reported in ``extra_calls`` (e.g. ``("brushnet",)``)
    counted_components: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pipeline: Any, device: Any = "cpu", dtype: Any = None):
        from ..loading import detect_family

        super().__init__(device, dtype)
        self.pipeline = pipeline
        self.family = detect_family(pipeline.unet.config)
        self.base_scheduler_config = dict(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        self.size_multiple = int(pipeline.vae_scale_factor)
        sample_size = pipeline.unet.config.sample_size
        if isinstance(sample_size, (list, tuple)):
            sample_size = max(sample_size)
        self.native_resolution = int(sample_size) * self.size_multiple

    @classmethod
    def load(cls, models: ModelPaths, device: str = "cpu", dtype: Any = "fp32") -> PipelineMethod:
        from ..loading import resolve_dtype

        models.require(cls)
        torch_dtype = resolve_dtype(dtype)
        pipeline = cls.build_pipeline(models, torch_dtype)
        return cls(pipeline_to(pipeline, device), device=device, dtype=torch_dtype)

    @classmethod
    @abstractmethod
    def build_pipeline(cls, models: ModelPaths, dtype: torch.dtype) -> Any:
        """The method's pipeline, on the CPU, from its model paths."""

    @abstractmethod
    def call_arguments(self, task: Task) -> dict[str, Any]:
        """The method's own pipeline arguments for ``task`` (image, mask in the model's convention, its options).
        The shared ones (prompts, steps, guidance, generator, output type, callback) are added by ``generate``."""

    def generate(self, task: Task) -> GenerateOutput:
        import torch

        from ..schedulers import make_scheduler, pipeline_arguments

        pipe, request = self.pipeline, task.request
        pipe.scheduler = make_scheduler(request.scheduler, self.base_scheduler_config, request.steps)
        # no negative prompt: None, so that an SDXL pipeline uses zeros for the unconditional text
        # (force_zeros_for_empty_prompt), as its own default and the original SDXL script do; "" would encode
        # CLIP(""). SD1.5 pipelines encode "" for None, the same as before.
        negative = request.negative_prompt or None
        calls = len(task.generators) if self.per_image_calls else 1
        done = [0]

        def callback(_pipe, _step, _t, kwargs):
            done[0] += 1
            task.step(done[0], calls * _pipe.num_timesteps)
            return kwargs

        arguments = dict(
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            output_type="pt",
            callback_on_step_end=callback,
            **pipeline_arguments(request.scheduler),  # TCD's gamma
            **self.call_arguments(task),
        )
        n = task.num_images
        with contextlib.ExitStack() as stack:
            # every UNet evaluation passes its conv_in once, whether the pipeline calls the UNet's forward or
            # drives its submodules (BrushNet's injection)
            unet_calls = stack.enter_context(count_calls(pipe.unet.conv_in))
            extra = {
                name: stack.enter_context(count_calls(getattr(pipe, name)))
                for name in self.counted_components
            }
            if self.per_image_calls:
                outputs = [
                    pipe(
                        prompt=request.prompt,
                        negative_prompt=negative,
                        generator=g,
                        **arguments,
                    )
                    for g in task.generators
                ]
                images = torch.cat([output.images for output in outputs])
            else:
                images = pipe(
                    prompt=[request.prompt] * n,
                    negative_prompt=None if negative is None else [negative] * n,
                    generator=task.generators,
                    **arguments,
                ).images
        return GenerateOutput(
            images=images.float().cpu(),
            unet_calls=unet_calls.per_image(n),
            extra_calls={name: counter.per_image(n) for name, counter in extra.items()},
        )
