"""What the BrushNet pipelines (SD1.5, SDXL, PowerPaint v2) share, written once.

- :func:`brushnet_keep_schedule`: the per-step on/off of the branch (``control_guidance_start/end``);
- :class:`BrushNetPipelineMixin`: the guidance properties, the call's set-up (the ``mask`` alias, callback inputs,
  call state, batch size, IP-Adapter embeddings), the input checks every pipeline makes, image and
  mask preparation (the project's mask convention, 1 = hole; every batch format diffusers documents;
  ``padding_mask_crop``), the control images of an optional ControlNet, the start latents for ``strength``,
  **the denoising loop** (:meth:`~BrushNetPipelineMixin._denoise`: scaled input, one guided prediction per step
  (:func:`~brushnet.pipelines.denoising_step.guided_noise`), scheduler step, callbacks, interrupt, progress), the
  fast path's switch (:meth:`~BrushNetPipelineMixin.compile`, :mod:`brushnet.pipelines.fast_path`), and the final
  blending / post-processing.

Each pipeline keeps only what differs: its text encoding and added conditions, its extra inputs (named tensors the
loop hands to callbacks, turned into model inputs by ``_step_inputs``), and its decoding. The conditioning recipe
lives in :mod:`brushnet.models.conditioning`, the blending in :func:`brushnet.image.blend`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.pipelines.pag.pag_utils import PAGMixin

from ..image import blend, blend_pil, mask_batch, mask_to_array
from .denoising_step import StepPlan, guided_noise

__all__ = ["BrushNetPipelineMixin", "brushnet_keep_schedule", "controlnet_keep_schedule"]

logger = logging.getLogger(__name__)


def strict_fp32_cudnn(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether convolutions of ``dtype`` on ``device`` run through cuDNN in strict float32 (TF32 off).

    Then the SD1.5 branch runs on the CFG-doubled batch, as the original pipeline does, instead of once: measured
    on an H100 (cuDNN 9.19, torch 2.11, SD1.5-sized, 512²), cuDNN's choice for the branch's batch-1 3×3
    convolutions at 32×32 latents takes up to 19852 MiB of workspace (``up_blocks.2.resnets.2.conv1``, 960→640
    channels): the call peaked at 26224 MiB (weights included) against 7088 MiB on the doubled batch
    (``benchmarks/fp32_memory_profile.py``; issue 14). The residuals are the same either way (the branch reads no
    text; each half gets its own copy)."""
    return (
        device.type == "cuda"
        and dtype == torch.float32
        and torch.backends.cudnn.enabled
        and not torch.backends.cudnn.allow_tf32
    )


def brushnet_keep_schedule(num_steps: int, start: float, end: float) -> list[float]:
    """Per-step multiplier of the conditioning scale: 0 where ``i/N < start`` or ``(i+1)/N > end``, else 1."""
    return [0.0 if (i / num_steps < start or (i + 1) / num_steps > end) else 1.0 for i in range(num_steps)]


def controlnet_keep_schedule(
    num_steps: int, start: float | list[float], end: float | list[float]
) -> list[float | list[float]]:
    """:func:`brushnet_keep_schedule` for one ControlNet (floats) or several (lists, one entry per net)."""
    if isinstance(start, (list, tuple)):
        per_net = [brushnet_keep_schedule(num_steps, s, e) for s, e in zip(start, end)]
        return [[keep[i] for keep in per_net] for i in range(num_steps)]
    return brushnet_keep_schedule(num_steps, start, end)


# -- argument checks shared by the pipelines (one-line errors naming the argument and its value) -------------
IMAGE_FORMS = (
    "a PIL image, a float numpy array (H, W, 3) or (B, H, W, 3) in [0, 1], a float torch tensor (3, H, W) or "
    "(B, 3, H, W) in [0, 1] or [-1, 1], or a list of them"
)


def check_positive_int(name: str, value) -> int:
    """``value`` as an ``int`` if it is a whole number >= 1 (an ``int``, a numpy integer, or a float such as
    ``2.0``), else a one-line error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a positive integer, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value == int(value) and value >= 1):
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return int(value)


def check_finite(name: str, value, allow_list: bool = False) -> None:
    """``value`` must be a finite real number (a 0-d tensor counts); with ``allow_list`` also a list or tuple of
    them, checked element-wise."""
    if allow_list and isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_finite(f"{name}[{i}]", item)
        return
    number = value.item() if isinstance(value, torch.Tensor) and value.ndim == 0 else value
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be a finite number, got {number!r}")


def check_prompt(name: str, prompt) -> None:
    """``prompt`` (if given) must be a str or a non-empty list of str."""
    if prompt is None or isinstance(prompt, str):
        return
    if not isinstance(prompt, list):
        raise ValueError(f"`{name}` must be a str or a list of str, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError(f"`{name}` is an empty list: pass at least one prompt (or a str)")
    for item in prompt:
        if not isinstance(item, str):
            kind = type(item).__name__
            raise ValueError(f"`{name}` must be a str or a list of str, got a list holding {kind}")


def check_generator(generator, total: int) -> None:
    """``generator``: ``None``, a ``torch.Generator``, or a list of them, one per generated image (``total``)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, list) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != total:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators for {total} image(s): pass one per image "
                "(batch size × num_images_per_prompt)"
            )
        return
    kind = type(generator).__name__
    if isinstance(generator, (list, tuple)):
        kind = f"a {kind} holding {', '.join(sorted({type(g).__name__ for g in generator})) or 'nothing'}"
    raise TypeError(
        f"`generator` must be a torch.Generator or a list of them (one per image), got {kind}"
        + (f" {generator!r}" if isinstance(generator, (int, float, str)) else "")
    )


def warn_unused_negative(guidance_scale, **negatives) -> None:
    """Warn that the negative prompts or embeddings given (``{name: value}``; None or empty text counts as not
    given) have no effect: classifier-free guidance is off at ``guidance_scale`` <= 1, and diffusers then drops them
    without a word. A warning, not an error, so that these pipelines stay drop-ins for diffusers'."""
    if guidance_scale is None or guidance_scale > 1:
        return

    def given(value) -> bool:
        if value is None:
            return False
        if isinstance(value, str):
            return bool(value)
        if isinstance(value, (list, tuple)):
            return any(given(v) for v in value)
        return True

    names = [name for name, value in negatives.items() if given(value)]
    if names:
        logger.warning(
            "%s %s no effect at guidance_scale %g: classifier-free guidance is off at <= 1 (raise guidance_scale "
            "to use it)",
            " and ".join(f"`{name}`" for name in names),
            "has" if len(names) == 1 else "have",
            guidance_scale,
        )


def check_image_input(name: str, image) -> None:
    """``image`` in one of the forms diffusers' inpaint pipelines read (:data:`IMAGE_FORMS`): a one-line error for
    others (a uint8 array, a path, a grey or 4-channel array, a bare list ...)."""
    if isinstance(image, list):
        if not image:
            raise ValueError(f"`{name}` is an empty list; pass {IMAGE_FORMS}")
        for item in image:
            check_image_input(name, item)
        return
    if isinstance(image, PIL.Image.Image):
        return
    check_image_dtype(name, image)
    if isinstance(image, np.ndarray):
        if image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise ValueError(
                f"`{name}` as a numpy array must be (H, W, 3) or (B, H, W, 3), got shape {tuple(image.shape)}"
            )
        return
    if isinstance(image, torch.Tensor):
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(
                f"`{name}` as a torch tensor must be (3, H, W) or (B, 3, H, W), got shape {tuple(image.shape)}"
            )
        return
    raise TypeError(f"`{name}` must be {IMAGE_FORMS}; got {type(image).__name__}")


def check_image_dtype(name: str, image) -> None:
    """Image arrays and tensors (also in a list) must be float: diffusers' image processor reads their values as
    [0, 1] (tensors also [-1, 1]), so a uint8 image would turn into values up to 509."""
    for item in image if isinstance(image, list) else [image]:
        if isinstance(item, np.ndarray) and not np.issubdtype(item.dtype, np.floating):
            raise ValueError(
                f"`{name}` as a numpy array must be float in [0, 1], got dtype {item.dtype} (divide a uint8 "
                "image by 255, or pass a PIL image)"
            )
        if isinstance(item, torch.Tensor) and not item.is_floating_point():
            raise ValueError(
                f"`{name}` as a torch tensor must be float in [0, 1] or [-1, 1], got {item.dtype}"
            )
        # float values of 0-255 steps would be read as [0, 1] (or [-1, 1]) data far out of range; only such a
        # gross miss is refused (a decoded image a little past [-1, 1] passes, as in diffusers)
        # (3-channel images only: diffusers' inpaint pipeline also takes 4-channel VAE latents as ``image``)
        if isinstance(item, np.ndarray) and item.size and item.shape[-1] == 3:
            high = float(item.max())
        elif isinstance(item, torch.Tensor) and item.numel() and not item.is_meta and item.ndim >= 3:
            if item.shape[-3] != 3:
                continue
            high = float(item.detach().max())
        else:
            continue
        if high > 2.0:
            raise ValueError(
                f"`{name}` holds values up to {high:g}: a float image is read as [0, 1] (tensors also [-1, 1]); "
                "divide 0-255 values by 255"
            )


def check_mask_input(name: str, mask) -> None:
    """``mask`` must be a PIL image, a numpy array or a torch tensor, or a non-empty list of them (its values and
    shape are read by :func:`~brushnet.image.mask_to_array`)."""
    items = mask if isinstance(mask, list) else [mask]
    if not items:
        raise ValueError(f"`{name}` is an empty list")
    for item in items:
        if not isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            raise TypeError(
                f"`{name}` must be a PIL image, a numpy array, a torch tensor or a list of them; got "
                f"{type(item).__name__}"
            )


def check_blending_kernel_size(blending: bool, blending_kernel_size) -> None:
    """With ``blending``: the feathering kernel must be an odd positive integer (or 0: no feathering, as 1)."""
    if not blending:
        return
    size = blending_kernel_size
    integer = isinstance(size, numbers.Integral) and not isinstance(size, bool)
    if not integer or not (size == 0 or (size > 0 and size % 2 == 1)):
        raise ValueError(
            f"`blending_kernel_size` must be an odd positive integer (or 0: no feathering), got {size!r}"
        )


def check_branch_window(start, end, allow_list: bool = True) -> tuple[float, float]:
    """The BrushNet's on-window ``control_guidance_start/end`` as two floats, checked.

    diffusers' ControlNet pipelines (and the original BrushNet pipelines) also take these as lists, one entry per
    net; here there is one branch, so with ``allow_list`` a one-element list (a number next to a list is broadcast
    to it, as diffusers does) is read as its number. A ControlNet's window is ``controlnet_guidance_start/end``.

    Returns:
        ``(start, end)`` as floats with ``0 <= start < end <= 1``.
    """
    window = {"control_guidance_start": start, "control_guidance_end": end}
    for name, value in window.items():
        if not isinstance(value, (list, tuple)):
            continue
        if not allow_list:
            raise TypeError(
                f"`{name}` must be a number (the BrushNet's window; a ControlNet's is `controlnet_{name[8:]}`), "
                f"got {type(value).__name__} {list(value)!r}"
            )
        if len(value) != 1:
            raise ValueError(
                f"`{name}` has {len(value)} entries: it is the one BrushNet's window, a number or a one-element "
                f"list (a ControlNet's window is `controlnet_{name[8:]}`)"
            )
        window[name] = value[0]
    for name, value in window.items():
        check_finite(name, value)
    start, end = (float(v) for v in window.values())
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(
            f"need 0 <= control_guidance_start < control_guidance_end <= 1, got {start} and {end}"
        )
    return start, end


def check_pair(name: str, value, what: str = "(height, width)") -> None:
    """``value`` must be a pair of finite numbers, e.g. SDXL's ``original_size`` (``what``: how to name the pair in
    the error, ``"(height, width)"`` or ``"(top, left)"``)."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        if all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            return
    shown = f"{type(value).__name__} {value!r}" if isinstance(value, (list, tuple)) else repr(value)
    raise ValueError(f"`{name}` must be a {what} pair of numbers, got {shown}")


def check_single_file_components(pipeline_cls, kwargs: dict) -> None:
    """Before ``from_single_file``: a base checkpoint holds only the base model; components beyond it that the
    pipeline needs (the BrushNet branch; PowerPaint's branch text encoder and tokenizer) must be passed (diffusers
    failed on them with ``TypeError: unsupported operand type(s) for -: 'set' and 'list'``)."""
    import inspect

    from ..errors import CheckpointError

    base = {"vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler"}
    parameters = list(inspect.signature(pipeline_cls.__init__).parameters.items())[1:]
    missing = [
        name
        for name, parameter in parameters
        if parameter.default is inspect.Parameter.empty and name not in base and name not in kwargs
    ]
    if not missing:
        return
    needed = [f"{n}=BrushNetModel.from_pretrained(...)" if n == "brushnet" else f"{n}=..." for n in missing]
    raise CheckpointError(
        f"{pipeline_cls.__name__}.from_single_file loads the base model only: pass {', '.join(needed)}"
    )


class CheckedSourceMixin:
    """Put first among a pipeline's bases: its ``from_pretrained`` is diffusers' (every argument the same), after a
    check of the source (:func:`brushnet.loading.check_pipeline_source`): a missing path, a folder of one model,
    and a hub id offline that is not cached are one-line :class:`~brushnet.errors.CheckpointError`\\ s."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        from ..loading import check_pipeline_source, is_local_path, pipeline_only_variant

        hub = {
            k: kwargs[k] for k in ("cache_dir", "revision", "local_files_only") if kwargs.get(k) is not None
        }
        check_pipeline_source(pretrained_model_name_or_path, **hub)
        if kwargs.get("variant") is None and is_local_path(pretrained_model_name_or_path):
            # a folder saved with variant="fp16" holds no plain weights: diffusers failed in the text encoder
            # with "no file named model.safetensors"; it is read as it is stored (parts with plain weights too)
            variant = pipeline_only_variant(pretrained_model_name_or_path)
            if variant is not None:
                logger.info(
                    "%s holds its weights as the %s variant: loading that",
                    pretrained_model_name_or_path,
                    variant,
                )
                kwargs["variant"] = variant
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


class BrushNetPipelineMixin(PAGMixin):
    """Parts of a BrushNet pipeline that do not depend on the base model family.

    Perturbed-attention guidance comes from diffusers' ``PAGMixin``: ``pag_scale`` (and ``pag_adaptive_scale``) in
    the call, the layers by ``set_pag_applied_layers`` (default ``"mid"``, as diffusers' SD PAG pipelines); the PAG
    processors are set on the UNet for the call only (:meth:`_perturbed_attention`).

    The pipeline provides ``self.unet``, ``self.brushnet``, ``self.image_processor``, ``self.vae_scale_factor``
    and ``self._callback_tensor_inputs``, and sets ``self._guidance_scale`` etc. at the start of ``__call__``.
    """

    _branch_batch: str | None = None

    @property
    def branch_batch(self) -> str | None:
        """How the branch meets classifier-free guidance: ``None`` (default) once per step, except on the
        CFG-doubled batch when the branch reads text (SDXL, PowerPaint) or at strict fp32 on cuDNN
        (:func:`strict_fp32_cudnn`); ``"doubled"`` always on the doubled batch (the original pipeline's schedule,
        for comparisons); ``"once"`` once per step even at strict fp32 (a branch that reads text still runs
        doubled: each half needs its own prompt). Read at the start of each call."""
        return self._branch_batch

    @branch_batch.setter
    def branch_batch(self, value: str | None) -> None:
        if value not in (None, "doubled", "once"):
            raise ValueError(f"branch_batch must be None, 'doubled' or 'once', got {value!r}")
        self._branch_batch = value

    def _branch_on_doubled_batch(self, branch_dtype: torch.dtype) -> bool:
        if self.brushnet.uses_text or self._branch_batch == "doubled":
            return True
        # strict fp32 on cuDNN: the branch's batch-1 convolutions would take gigabytes of workspace
        return self._branch_batch is None and strict_fp32_cudnn(self.brushnet.device, branch_dtype)

    # -- properties, as in diffusers' pipelines ------------------------------------------------------
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # -- the fast path ---------------------------------------------------------------------------------------
    def compile(
        self,
        mode: str | None = None,
        backend: str = "inductor",
        *,
        fullgraph: bool = True,
        dynamic: bool = False,
        options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        """Turn on the fast path: every denoising step's prediction (branch, optional ControlNet, the UNet with the
        branch's residuals, classifier-free guidance) runs as one ``torch.compile``-d function.

        On CUDA the default is ``mode="reduce-overhead"``: each step replays one CUDA graph. Shapes are static: the
        first call at a new (batch, height, width) — or with guidance switched on/off — compiles (logged once),
        later calls replay. Compiled kernels are cached on disk (:func:`~brushnet.pipelines.fast_path
        .compile_cache_dir`, ``~/.cache/brushnet/torch-compile`` by default) so the next process starts warm. The
        output stays within float noise of the eager path (tests/pipelines/test_fast_path.py); the scheduler step,
        VAE and text encoders are not compiled. Not with offloading. See docs/speed.md.

        Args:
            mode: ``torch.compile`` mode for inductor (``"reduce-overhead"``, ``"max-autotune"``,
                ``"max-autotune-no-cudagraphs"``, ``"default"``); ``None``: reduce-overhead on CUDA, else default.
            backend: ``torch.compile`` backend; ``"aot_eager"`` / ``"eager"`` trace without generating kernels.
            fullgraph: raise on a graph break instead of splitting the step (the step has none).
            dynamic: dynamic shapes (``False``: one graph per shape, fastest).
            options: inductor options instead of ``mode`` (e.g. ``{"triton.cudagraphs": True,
                "conv_1x1_as_mm": True}``).
            cache_dir: where compiled kernels are kept (default: see above; ``$BRUSHNET_COMPILE_CACHE``).

        Returns:
            The pipeline (so ``pipe = Pipeline.from_pretrained(...).compile()`` reads naturally).
        """
        from .fast_path import CompiledStep

        self._compiled_step = CompiledStep(
            mode=mode,
            backend=backend,
            fullgraph=fullgraph,
            dynamic=dynamic,
            options=options,
            cache_dir=cache_dir,
        )
        return self

    def uncompile(self):
        """Back to the eager path (compiled graphs stay in torch's caches until the process ends)."""
        self._compiled_step = None
        return self

    @property
    def is_compiled(self) -> bool:
        """Whether :meth:`compile` is on."""
        return getattr(self, "_compiled_step", None) is not None

    def _make_image_processors(self, vae) -> None:
        """``vae_scale_factor`` and the image, mask and control-image processors (as diffusers' inpaint
        pipelines: masks binarised at 0.5, control images in [0, 1])."""
        from diffusers.image_processor import VaeImageProcessor

        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )

    # -- the call's set-up ----------------------------------------------------------------------------
    @staticmethod
    def _call_arguments(
        mask_image,
        mask,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        callback=None,
        callback_steps: int | None = 1,
    ) -> tuple[Any, Any, list[str]]:
        """The mask (``mask``: the original pipelines' keyword for ``mask_image``; passing both is an error), the
        step callback and the tensors it reads (a ``PipelineCallback`` names its own; default ``["latents"]``).

        ``callback(step, timestep, latents)`` every ``callback_steps`` steps is the original pipelines' (diffusers
        0.27's) deprecated form: it still works, through ``callback_on_step_end``, with a ``FutureWarning``.

        Returns:
            ``(mask_image, callback_on_step_end, callback_on_step_end_tensor_inputs)``.
        """
        import warnings

        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        if mask is not None:
            if mask_image is not None:
                raise ValueError("pass the mask once: `mask_image` or its alias `mask`, not both")
            mask_image = mask
        if callback is not None:
            if callback_on_step_end is not None:
                raise ValueError(
                    "pass one step callback: `callback_on_step_end`, or the deprecated `callback`"
                )
            if not callable(callback):
                raise ValueError(f"`callback` must be callable, got {type(callback).__name__}")
            integer = isinstance(callback_steps, numbers.Integral) and not isinstance(callback_steps, bool)
            if not integer or callback_steps < 1:
                raise ValueError(f"`callback_steps` must be a positive integer, got {callback_steps!r}")
            warnings.warn(
                "`callback` and `callback_steps` are deprecated (as in diffusers): use `callback_on_step_end`",
                FutureWarning,
                stacklevel=3,
            )
            legacy, every = callback, callback_steps

            def callback_on_step_end(pipe, i, t, tensors):
                # on the steps diffusers 0.27 called it on: those that advance the progress bar (every other
                # loop index for a second-order scheduler such as Heun), then every ``callback_steps``-th
                order = getattr(pipe.scheduler, "order", 1)
                last = i == pipe._num_timesteps - 1
                advances = last or ((i + 1) > getattr(pipe, "_num_warmup_steps", 0) and (i + 1) % order == 0)
                if advances and i % every == 0:
                    legacy(i // order, t, tensors["latents"])
                return {}

            callback_on_step_end_tensor_inputs = ["latents"]
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        return mask_image, callback_on_step_end, callback_on_step_end_tensor_inputs or ["latents"]

    def _begin_call(
        self, guidance_scale: float, clip_skip: int | None, cross_attention_kwargs: dict | None
    ) -> None:
        """Set the call's state the properties read (``guidance_scale``, ``clip_skip``, ``cross_attention_kwargs``,
        ``interrupt``), as diffusers' pipelines do at the start of ``__call__``."""
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

    @staticmethod
    def _batch_size(prompt, prompt_embeds) -> int:
        """The number of prompts: from ``prompt`` (a str or a list), else from ``prompt_embeds``."""
        if prompt is not None:
            return 1 if isinstance(prompt, str) else len(prompt)
        return prompt_embeds.shape[0]

    def _text_lora_scale(self) -> float | None:
        """The LoRA scale the text encoders take (``cross_attention_kwargs["scale"]``), else ``None``."""
        return self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs else None

    def _ip_adapter_embeds(
        self, ip_adapter_image, ip_adapter_image_embeds, device, total: int
    ) -> list | None:
        """The IP-Adapter image embeddings for ``total`` images (diffusers' ``prepare_ip_adapter_image_embeds``),
        or ``None`` without an IP-Adapter image."""
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            return None
        return self.prepare_ip_adapter_image_embeds(
            ip_adapter_image, ip_adapter_image_embeds, device, total, self.do_classifier_free_guidance
        )

    # -------------------------------------------------------------------------------------------------
    def _check_brushnet_inputs(
        self,
        image,
        mask_image,
        height,
        width,
        brushnet_conditioning_scale,
        control_guidance_start,
        control_guidance_end,
        callback_on_step_end_tensor_inputs,
        output_type,
        blending,
        strength: float = 1.0,
        padding_mask_crop: int | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
    ) -> None:
        """The checks every BrushNet pipeline makes besides its own text checks."""
        if image is None or mask_image is None:
            raise ValueError("both `image` and `mask_image` are required")
        check_image_input("image", image)
        check_mask_input("mask_image", mask_image)
        check_finite("strength", strength)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"`strength` must be in (0, 1], got {strength}")
        if padding_mask_crop is not None:
            if not isinstance(image, PIL.Image.Image):
                raise ValueError(f"`padding_mask_crop` needs one PIL image, got {type(image).__name__}")
            masks = mask_batch(mask_image)
            if len(masks) != 1:
                raise ValueError("`padding_mask_crop` needs one mask")
            mask_size = tuple(mask_to_array(masks[0]).shape[::-1])
            if mask_size != image.size:  # the crop's paste-back works in the input's pixels
                raise ValueError(
                    f"`padding_mask_crop` needs a mask of the image's size: mask {mask_size[0]}x{mask_size[1]}, "
                    f"image {image.size[0]}x{image.size[1]}"
                )
            if output_type != "pil":
                raise ValueError(
                    f"`padding_mask_crop` pastes into the input: output_type must be 'pil', got {output_type!r}"
                )
        if height is not None and height % self.vae_scale_factor != 0:
            raise ValueError(f"`height` must be a multiple of {self.vae_scale_factor}, got {height}")
        if width is not None and width % self.vae_scale_factor != 0:
            raise ValueError(f"`width` must be a multiple of {self.vae_scale_factor}, got {width}")
        if isinstance(brushnet_conditioning_scale, torch.Tensor):  # any real number, a numpy one too
            raise TypeError(
                "`brushnet_conditioning_scale` must be a number, got a torch tensor (use .item())"
            )
        check_finite("brushnet_conditioning_scale", brushnet_conditioning_scale)
        # the SD1.5 and SDXL pipelines unwrap diffusers' one-element list form before this check
        check_branch_window(control_guidance_start, control_guidance_end, allow_list=False)
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"callback tensor inputs {unknown} are not among {self._callback_tensor_inputs}"
                )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if blending and output_type == "latent":
            raise ValueError(
                "`blending` works on decoded images; it cannot be used with output_type='latent'"
            )
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("pass either `ip_adapter_image` or `ip_adapter_image_embeds`, not both")

    def _check_sampling_inputs(
        self,
        batch_size: int,
        num_inference_steps,
        num_images_per_prompt,
        generator,
        guidance_scale,
        clip_skip,
        blending: bool,
        blending_kernel_size,
        timesteps=None,
        sigmas=None,
        scales: dict[str, Any] | None = None,
    ) -> int:
        """The sampling arguments every BrushNet pipeline takes, checked before anything runs: the step count (a
        positive integer, unless custom ``timesteps``/``sigmas`` set the schedule), ``num_images_per_prompt``, the
        generator(s) (one per image), finite guidance and other ``scales`` (``{name: value}``; a list is checked
        element-wise), ``clip_skip`` within the text encoders' layers, and the blending kernel.

        Returns:
            ``num_inference_steps`` as an ``int`` (a whole float such as ``2.0`` is accepted).
        """
        if timesteps is None and sigmas is None:
            num_inference_steps = check_positive_int("num_inference_steps", num_inference_steps)
        num_images_per_prompt = check_positive_int("num_images_per_prompt", num_images_per_prompt)
        check_generator(generator, batch_size * num_images_per_prompt)
        check_finite("guidance_scale", guidance_scale)
        for name, value in (scales or {}).items():
            check_finite(name, value, allow_list=True)
        if clip_skip is not None:
            self._check_clip_skip(clip_skip)
        check_blending_kernel_size(blending, blending_kernel_size)
        return num_inference_steps

    def _check_clip_skip(self, clip_skip) -> None:
        """``clip_skip`` must be an integer the text encoder(s) can take: SD reads hidden state
        ``-(clip_skip + 1)`` of its encoder (``num_hidden_layers + 1`` states: up to ``num_hidden_layers``),
        SDXL-style pipelines (a ``text_encoder_2``) ``-(clip_skip + 2)`` of both (one less)."""
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, numbers.Integral):
            raise TypeError(f"`clip_skip` must be an integer, got {type(clip_skip).__name__} {clip_skip!r}")
        if clip_skip < 0:
            raise ValueError(f"`clip_skip` must be >= 0, got {clip_skip}")
        sdxl = hasattr(self, "text_encoder_2")
        encoders = [getattr(self, name, None) for name in ("text_encoder", "text_encoder_2")]
        layers = [encoder.config.num_hidden_layers for encoder in encoders if encoder is not None]
        if not layers:
            return
        limit = min(layers) - 1 if sdxl else min(layers)
        if clip_skip > limit:
            why = f"the text encoder has {min(layers)} layers"
            why += " and SDXL already skips one" if sdxl else ""
            raise ValueError(f"`clip_skip` must be in 0..{limit} ({why}), got {clip_skip}")

    @staticmethod
    def _check_embeds_match(prompt_embeds, negative_prompt_embeds) -> None:
        """Given both, the prompt and negative prompt embeddings must have the same shape."""
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                    f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
                )

    def _prepare_mask(
        self, mask_image, batch_size: int, height: int, width: int, device, dtype, crops_coords=None
    ) -> torch.Tensor:
        """Masks (white = inpaint; any of :func:`~brushnet.image.mask_batch`'s formats, one per item or one for
        all) → float ``(B, 1, height, width)``, 1 = hole. With ``crops_coords`` (``padding_mask_crop``) the one
        mask is cropped and resized as diffusers' inpaint pipelines do with the image."""
        if crops_coords is not None:
            mask = PIL.Image.fromarray(mask_to_array(mask_batch(mask_image)[0]).astype("uint8") * 255)
            hole = self.mask_processor.preprocess(
                mask, height=height, width=width, resize_mode="fill", crops_coords=crops_coords
            )
            return hole.expand(batch_size, -1, -1, -1).to(device=device, dtype=dtype)
        tensors = []
        for mask in mask_batch(mask_image):
            hole = torch.from_numpy(mask_to_array(mask).astype("float32"))[None, None]
            if hole.shape[-2:] != (height, width):
                hole = F.interpolate(hole, size=(height, width), mode="bilinear", align_corners=False) >= 0.5
                hole = hole.float()
            tensors.append(hole)
        hole = torch.cat(tensors)
        if hole.shape[0] == 1:
            hole = hole.expand(batch_size, -1, -1, -1)
        elif hole.shape[0] != batch_size:
            raise ValueError(f"got {hole.shape[0]} masks for a batch of {batch_size} prompts")
        return hole.to(device=device, dtype=dtype)

    def _prepare_image_and_mask(
        self,
        image,
        mask_image,
        height,
        width,
        batch_size: int,
        num_images_per_prompt: int,
        device,
        padding_mask_crop: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int, int, tuple[int, int, int, int] | None]:
        """The image in [-1, 1] and the hole (1 = hole) at ``height × width``, one per generated image.

        ``height``/``width`` default to the image size rounded down to a multiple of the VAE factor. With
        ``padding_mask_crop`` the model sees the mask's bounding box grown by that many pixels (and widened to
        the output's aspect ratio), resized to ``height × width``, as in diffusers' inpaint pipelines.

        Returns:
            ``(image (B·n, 3, H, W) float32, hole (B·n, 1, H, W) float32, height, width, crop box or None)``.
        """
        total = batch_size * num_images_per_prompt
        first = image[0] if isinstance(image, list) else image
        if isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim == 3:
            first = first[None]  # one (H, W, 3) array or (3, H, W) tensor, as preprocess reads it
        height, width = self.image_processor.get_default_height_width(first, height, width)
        crops_coords, resize_mode = None, "default"
        if padding_mask_crop is not None:
            mask = PIL.Image.fromarray(mask_to_array(mask_batch(mask_image)[0]).astype("uint8") * 255)
            crops_coords = self.mask_processor.get_crop_region(mask, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        image_tensor = self.image_processor.preprocess(
            image, height=height, width=width, crops_coords=crops_coords, resize_mode=resize_mode
        )
        image_tensor = image_tensor.to(device=device, dtype=torch.float32)
        if image_tensor.shape[0] == 1:
            image_tensor = image_tensor.expand(total, -1, -1, -1)
        elif image_tensor.shape[0] == batch_size:
            image_tensor = image_tensor.repeat_interleave(num_images_per_prompt, dim=0)
        else:
            raise ValueError(f"got {image_tensor.shape[0]} images for a batch of {batch_size} prompts")
        hole = self._prepare_mask(
            mask_image, batch_size, height, width, device, torch.float32, crops_coords=crops_coords
        )
        hole = hole.repeat_interleave(num_images_per_prompt, dim=0) if hole.shape[0] != total else hole
        return image_tensor, hole, height, width, crops_coords

    def _prepare_control_images(
        self,
        control_image,
        height: int,
        width: int,
        batch_size: int,
        num_images_per_prompt: int,
        device,
        crops_coords=None,
    ) -> list[torch.Tensor] | None:
        """The ControlNet conditioning images in [0, 1], ``(B·n, 3, H, W)`` each, one per ControlNet; ``None``
        without a ControlNet.

        With several ControlNets, ``control_image`` is a list with one entry per net (each an image or a batch);
        with one, it is an image or a batch (one for all prompts or one per prompt). With ``crops_coords``
        (``padding_mask_crop``) each is cropped to the box the image and mask are, as diffusers' ControlNet
        inpainting pipelines do, so that it stays aligned with them.
        """
        nets = self._controlnets()
        if not nets:
            return None
        if control_image is None:
            raise ValueError("this pipeline has a ControlNet: pass `control_image`")
        images = control_image if len(nets) > 1 else [control_image]
        if len(nets) > 1 and (not isinstance(control_image, (list, tuple)) or len(images) != len(nets)):
            raise ValueError(f"with {len(nets)} ControlNets pass a list of {len(nets)} control images")
        total = batch_size * num_images_per_prompt
        prepared = []
        for image, net in zip(images, nets):
            if crops_coords is not None:
                tensor = self.control_image_processor.preprocess(
                    image, height=height, width=width, crops_coords=crops_coords, resize_mode="fill"
                )
            else:
                tensor = self.control_image_processor.preprocess(image, height=height, width=width)
            tensor = tensor.to(device=device, dtype=net.dtype)
            if tensor.shape[0] == 1:
                tensor = tensor.expand(total, -1, -1, -1)
            elif tensor.shape[0] == batch_size:
                tensor = tensor.repeat_interleave(num_images_per_prompt, dim=0)
            elif tensor.shape[0] != total:
                raise ValueError(f"got {tensor.shape[0]} control images for a batch of {batch_size} prompts")
            prepared.append(tensor)
        return prepared

    def _controlnets(self) -> list:
        """The ControlNets steering the UNet (none, one, or the members of a ``MultiControlNetModel``)."""
        controlnet = getattr(self, "controlnet", None)
        if controlnet is None:
            return []
        return list(getattr(controlnet, "nets", [controlnet]))

    def _check_controlnet_inputs(
        self, control_image, controlnet_conditioning_scale, controlnet_guidance_start, controlnet_guidance_end
    ) -> None:
        """``control_image`` and the ControlNet scale and window: one value per net, windows ordered."""
        nets = self._controlnets()
        if not nets:
            if control_image is not None:
                raise ValueError("`control_image` given but the pipeline has no `controlnet`")
            return
        if control_image is None:
            raise ValueError("this pipeline has a ControlNet: pass `control_image`")
        for name, value in (
            ("controlnet_conditioning_scale", controlnet_conditioning_scale),
            ("controlnet_guidance_start", controlnet_guidance_start),
            ("controlnet_guidance_end", controlnet_guidance_end),
        ):
            if isinstance(value, (list, tuple)) and len(value) != len(nets):
                raise ValueError(f"`{name}` has {len(value)} entries for {len(nets)} ControlNets")
        starts = (
            controlnet_guidance_start
            if isinstance(controlnet_guidance_start, (list, tuple))
            else [controlnet_guidance_start]
        )
        ends = (
            controlnet_guidance_end
            if isinstance(controlnet_guidance_end, (list, tuple))
            else [controlnet_guidance_end]
        )
        for start, end in zip(starts, ends):
            check_finite("controlnet_guidance_start", start)
            check_finite("controlnet_guidance_end", end)
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(
                    f"need 0 <= controlnet_guidance_start < controlnet_guidance_end <= 1, got {start} and {end}"
                )

    @staticmethod
    def _branch_step_scales(num_steps: int, scale: float, start: float, end: float) -> list[float]:
        """Per step: the branch's ``brushnet_conditioning_scale``, 0 outside ``control_guidance_start/end``."""
        return [scale * keep for keep in brushnet_keep_schedule(num_steps, start, end)]

    def _controlnet_step_scales(
        self,
        num_steps: int,
        controlnet_conditioning_scale,
        controlnet_guidance_start,
        controlnet_guidance_end,
    ) -> list:
        """Per step: the ControlNet scale (a float with one net, a list with several), 0 outside its window."""
        n = len(self._controlnets())
        if n == 0:
            return [None] * num_steps
        if n > 1:
            scales = _per_net(controlnet_conditioning_scale, n)
            keep = controlnet_keep_schedule(
                num_steps, _per_net(controlnet_guidance_start, n), _per_net(controlnet_guidance_end, n)
            )
            return [[s * k for s, k in zip(scales, step)] for step in keep]
        keep = brushnet_keep_schedule(
            num_steps, _first(controlnet_guidance_start), _first(controlnet_guidance_end)
        )
        return [_first(controlnet_conditioning_scale) * k for k in keep]

    def _schedule(
        self, num_inference_steps: int, device, timesteps=None, sigmas=None, strength: float = 1.0
    ) -> tuple[torch.Tensor, int]:
        """The timesteps to run (custom ``timesteps``/``sigmas`` as in diffusers; below ``strength`` 1 only the last
        fraction of them) and their number of inference steps.

        The scheduler's begin index is set to the first timestep run (0, or where ``strength`` starts), so schedulers
        that keep a step index (Euler, UniPC, DPM-Solver) use that timestep's sigma and need no look-up (a host
        round trip on a GPU) on the first step."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        if strength < 1.0:  # get_timesteps sets the begin index where it cuts
            timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength, device)
            if num_inference_steps < 1:
                raise ValueError(
                    f"strength {strength} leaves no denoising step of {len(self.scheduler.timesteps)}"
                )
        elif hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        return timesteps, num_inference_steps

    def _branch_conditioning(self, image_tensor: torch.Tensor, hole: torch.Tensor, generator) -> torch.Tensor:
        """``brushnet_cond`` (masked-image latent + keep-mask, :func:`~brushnet.models.conditioning
        .brushnet_conditioning`) in the branch's dtype."""
        from ..models.conditioning import brushnet_conditioning

        brushnet_cond = brushnet_conditioning(self.vae, image_tensor, hole, generator)
        return brushnet_cond.to(dtype=self.brushnet.dtype)

    def _guidance_embedding(self, total: int, device, dtype) -> torch.Tensor | None:
        """The UNet's guidance-scale embedding (guidance-distilled UNets: ``time_cond_proj_dim``), else ``None``."""
        if self.unet.config.time_cond_proj_dim is None:
            return None
        guidance_tensor = torch.tensor(self.guidance_scale - 1).repeat(total)
        return self.get_guidance_scale_embedding(
            guidance_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
        ).to(device=device, dtype=dtype)

    def _start_latents(
        self, latents, image_tensor: torch.Tensor, timesteps: torch.Tensor, strength: float, dtype, generator
    ) -> torch.Tensor:
        """Start latents for the prepared image ``(B·n, 3, H, W)`` (their batch, size and device): pure noise at
        ``strength == 1`` (``prepare_latents``, the goldens' path); below it the input's VAE latents noised to the
        first timestep run, so the hole starts from the input (diffusers' inpaint ``strength``). Given ``latents``
        are the noise."""
        batch, _, height, width = image_tensor.shape
        channels, device = self.unet.config.in_channels, image_tensor.device
        if strength >= 1.0:
            return self.prepare_latents(batch, channels, height, width, dtype, device, generator, latents)
        from diffusers.utils.torch_utils import randn_tensor

        from ..models.conditioning import encode_latents

        latent_shape = (batch, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = (
            latents
            if latents is not None
            else randn_tensor(latent_shape, generator, device=device, dtype=dtype)
        )
        image_latents = encode_latents(self.vae, image_tensor, generator).to(device=device, dtype=dtype)
        return self.scheduler.add_noise(
            image_latents, noise.to(device=device, dtype=dtype), timesteps[:1].repeat(batch)
        )

    # -- the denoising loop, shared by every BrushNet pipeline ---------------------------------------------
    def _step_inputs(self, tensors: dict[str, torch.Tensor | None]) -> dict[str, Any]:
        """The per-step model inputs built from the loop's named tensors (those a step callback may replace).

        The mixin's: ``prompt_embeds`` (batched like the model input). A pipeline with more (SDXL's added
        conditions, PowerPaint's branch text) extends this; it is rebuilt only when a callback replaced a tensor.
        """
        return {"prompt_embeds": tensors["prompt_embeds"]}

    @contextlib.contextmanager
    def _perturbed_attention(self, pag_scale: float, pag_adaptive_scale: float):
        """Perturbed-attention guidance for the call: with ``pag_scale > 0`` the denoising loop gives the UNet's
        self-attention layers of ``pag_applied_layers`` diffusers' PAG processors, and every processor is put back
        here afterwards (also when the call fails), so the UNet is unchanged by the call."""
        if pag_scale < 0 or pag_adaptive_scale < 0:
            raise ValueError(
                f"pag_scale and pag_adaptive_scale must be >= 0, got {pag_scale} and {pag_adaptive_scale}"
            )
        self._pag_scale, self._pag_adaptive_scale = float(pag_scale), float(pag_adaptive_scale)
        if pag_scale == 0:
            yield
            return
        if getattr(self, "_pag_attn_processors", None) is None:
            self.set_pag_applied_layers("mid")
        original = self.unet.attn_processors
        try:
            yield  # the loop sets the PAG processors for its batch layout (and again if a callback changes it)
        finally:
            self.unet.set_attn_processor(original)
            self._pag_scale = 0.0

    def _pag_step_scales(self, timesteps: torch.Tensor) -> list[float]:
        """The PAG weight per step: ``pag_scale``, or with ``pag_adaptive_scale`` ``max(pag_scale − a (1000 − t),
        0)`` (diffusers' ``_get_pag_scale``), read once per call (no host sync per step)."""
        scale = getattr(self, "_pag_scale", 0.0)
        adaptive = getattr(self, "_pag_adaptive_scale", 0.0)
        if adaptive <= 0:
            return [scale] * len(timesteps)
        return [max(scale - adaptive * (1000 - float(t)), 0.0) for t in timesteps.tolist()]

    def _step_plan(self, guess_mode: bool) -> StepPlan:
        """The settings one prediction depends on besides its tensors (:class:`StepPlan`), read once per call and
        again only if a callback switches guidance: no ``ModelMixin.dtype`` walk per step."""
        controlnet = getattr(self, "controlnet", None)
        branch_dtype = self.brushnet.dtype
        return StepPlan(
            guidance=self.do_classifier_free_guidance,
            branch_on_doubled_batch=self._branch_on_doubled_batch(branch_dtype),
            guess_mode=guess_mode,
            rescale=getattr(self, "_guidance_rescale", 0.0) > 0.0,
            branch_dtype=branch_dtype,
            unet_dtype=self.unet.dtype,
            controlnet_dtype=controlnet.dtype if controlnet is not None else None,
            pag=getattr(self, "_pag_scale", 0.0) > 0,
            # a ControlNet whose conditions are pooled (the shuffle one) runs in guess mode, as in diffusers
            controlnet_guess_mode=any(
                getattr(net.config, "global_pool_conditions", False) for net in self._controlnets()
            ),
        )

    def _denoise(self, *args, pag_scale: float = 0.0, pag_adaptive_scale: float = 0.0, **kwargs):
        """:meth:`_denoise_steps` with perturbed-attention guidance set up for it (:meth:`_perturbed_attention`:
        the PAG processors on the UNet while it runs, the UNet's own put back afterwards)."""
        with self._perturbed_attention(pag_scale, pag_adaptive_scale):
            return self._denoise_steps(*args, **kwargs)

    def _denoise_steps(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        num_inference_steps: int,
        tensors: dict[str, torch.Tensor | None],
        brushnet_cond: torch.Tensor,
        conditioning_scales: list[float],
        guess_mode: bool,
        extra_step_kwargs: dict[str, Any],
        callback_on_step_end,
        callback_on_step_end_tensor_inputs: list[str],
        image_embeds: list[torch.Tensor] | None = None,
        control_images: list[torch.Tensor] | None = None,
        controlnet_scales: list | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """The denoising loop: per step the scaled input, one guided prediction (:func:`guided_noise`: branch,
        optional ControlNet, UNet with residuals, guidance and its rescale), the scheduler step, the step callback
        and the progress bar; ``interrupt`` skips the remaining steps.

        Eagerly by default; after :meth:`compile` the prediction is the compiled function
        (:mod:`brushnet.pipelines.fast_path`), its changing numbers passed as device tensors made once per call.

        Args:
            latents: the start latents ``(B, 4, h, w)``.
            timesteps, num_inference_steps: the schedule to run (after any ``strength`` / ``denoising_end`` cut).
            tensors: the named tensors a step callback may read and replace besides ``latents`` (the pipeline's
                ``_callback_tensor_inputs``); :meth:`_step_inputs` turns them into model inputs.
            brushnet_cond: ``(B, 5, h, w)``, the branch's conditioning.
            conditioning_scales: the branch's scale per step (the keep schedule applied).
            guess_mode, image_embeds, control_images: as :func:`predict_noise` (the UNet's guidance embedding,
                ``timestep_cond``, is made here: :meth:`_guidance_embedding`).
            controlnet_scales: the ControlNets' scale per step (``None`` entries without a ControlNet).
            extra_step_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs: as in diffusers.

        Returns:
            ``(latents, tensors)``: the denoised latents and the named tensors as the callbacks left them.
        """
        compiled = getattr(self, "_compiled_step", None)
        if compiled is not None:
            compiled.check(self)
        controlnet = getattr(self, "controlnet", None)
        timestep_cond = self._guidance_embedding(latents.shape[0], latents.device, latents.dtype)
        if controlnet_scales is None:
            controlnet_scales = [None] * len(timesteps)
        inputs = self._step_inputs(tensors)
        plans: dict[bool, StepPlan] = {}
        active: StepPlan | None = None
        pag_scales = self._pag_step_scales(timesteps)
        if compiled is not None:  # per-step numbers as device tensors, made once (no host copy per step)
            step_scales = torch.tensor(conditioning_scales, dtype=torch.float32, device=latents.device)
            step_pag_scales = torch.tensor(pag_scales, dtype=torch.float32, device=latents.device)
            guidance = {}

        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_warmup_steps = (
            num_warmup_steps  # the deprecated ``callback`` fires on the same steps as the bar
        )
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                cfg = self.do_classifier_free_guidance
                plan = plans.get(cfg)
                if plan is None:
                    plan = plans[cfg] = self._step_plan(guess_mode)
                if plan.pag and plan is not active:  # the PAG processors follow the batch layout (CFG on/off)
                    self._set_pag_attn_processor(self.pag_applied_layers, cfg)
                active = plan
                scaled = self.scheduler.scale_model_input(latents, t)
                common = dict(
                    timestep_cond=timestep_cond,
                    image_embeds=image_embeds,
                    control_images=control_images,
                    controlnet_scale=controlnet_scales[i],
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    **inputs,
                )
                if compiled is None:
                    noise_pred = guided_noise(
                        self.brushnet, self.unet, controlnet, plan, scaled, t,
                        brushnet_cond=brushnet_cond,
                        conditioning_scale=conditioning_scales[i],
                        guidance_scale=self.guidance_scale,
                        guidance_rescale=getattr(self, "_guidance_rescale", 0.0),
                        pag_scale=pag_scales[i],
                        **common,
                    )  # fmt: skip
                else:
                    key = (self.guidance_scale, getattr(self, "_guidance_rescale", 0.0))
                    if key not in guidance:
                        guidance[key] = torch.tensor(key, dtype=torch.float32, device=latents.device).unbind()
                    noise_pred = compiled(
                        self.brushnet, self.unet, controlnet, plan, scaled, t,
                        brushnet_cond=brushnet_cond,
                        conditioning_scale=step_scales[i],
                        guidance_scale=guidance[key][0],
                        guidance_rescale=guidance[key][1],
                        pag_scale=step_pag_scales[i],
                        **common,
                    )  # fmt: skip
                latents = self.scheduler.step(
                    noise_pred.to(latents.dtype), t, latents, **extra_step_kwargs, return_dict=False
                )[0]

                if callback_on_step_end is not None:
                    available = {"latents": latents, **tensors}
                    callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    replaced = {
                        k: v for k, v in callback_outputs.items() if k in tensors and v is not tensors[k]
                    }
                    replaced = fit_one_row(replaced, tensors, latents.shape[0])
                    if replaced:
                        tensors = {**tensors, **replaced}
                        inputs = self._step_inputs(tensors)

                if i == len(timesteps) - 1 or (
                    (i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0
                ):
                    progress_bar.update()
        return latents, tensors

    def _postprocess(
        self,
        decoded: torch.Tensor,
        image_tensor: torch.Tensor,
        hole: torch.Tensor,
        output_type: str,
        blending: bool,
        blending_kernel_size: int,
        has_nsfw: list[bool] | None = None,
    ):
        """Decoded images in [-1, 1] → the requested output type, blended into the input if asked.

        Args:
            decoded: the VAE's output ``(B, 3, H, W)`` in [-1, 1].
            image_tensor: the preprocessed input ``(B, 3, H, W)`` in [-1, 1].
            hole: ``(B, 1, H, W)``, 1 = hole.
            has_nsfw: the safety checker's flags; a flagged image comes out black (as in diffusers), unblended.
        """
        finite = torch.isfinite(decoded.float().flatten(1)).all(1)
        if not bool(finite.all()):  # diffusers says nothing: the image just comes out black
            logger.warning(
                "image(s) %s of this batch have NaN or infinite values and will come out black or blotched "
                "(%s; in float16 a VAE or UNet can overflow: try float32, or a VAE made for float16)",
                ", ".join(str(i) for i in (~finite).nonzero().flatten().tolist()),
                str(decoded.dtype).replace("torch.", ""),
            )
        images = (decoded.float() / 2 + 0.5).clamp(0, 1)
        if blending:
            original = (image_tensor.float() / 2 + 0.5).clamp(0, 1)
            images = blend(original, images, hole, kernel_size=blending_kernel_size)
        if has_nsfw is not None and any(has_nsfw):
            flagged = torch.tensor(has_nsfw, device=images.device).view(-1, 1, 1, 1)
            images = torch.where(flagged, torch.zeros_like(images), images)
        return self.image_processor.postprocess(
            images, output_type=output_type, do_denormalize=[False] * images.shape[0]
        )

    def _paste_crops(
        self, images, image, mask_image, crops_coords, blending=False, blending_kernel_size=21, has_nsfw=None
    ):
        """``padding_mask_crop``: paste each generated crop back into the full input.

        Without blending this is diffusers' overlay (the hole from the crop, the rest from the input). With
        blending the crop is pasted whole and the feathered blend runs on the full image, so its band reaches
        past the hole as it does without a crop, up to the crop box (the caller must not blend the crop itself;
        a ``padding_mask_crop`` of at least ``blending_kernel_size // 2`` holds the whole band). A flagged (black)
        image gets the plain overlay, as in diffusers.
        """
        if crops_coords is None:
            return images
        hole = mask_to_array(mask_batch(mask_image)[0])
        mask = PIL.Image.fromarray(hole.astype("uint8") * 255)
        original = image.convert("RGB")
        x0, y0, x1, y1 = crops_coords
        pasted = []
        for k, generated in enumerate(images):
            if not blending or (has_nsfw is not None and has_nsfw[k]):
                pasted.append(self.image_processor.apply_overlay(mask, image, generated, crops_coords))
                continue
            full = original.copy()
            crop = self.image_processor.resize(generated, height=y1 - y0, width=x1 - x0, resize_mode="crop")
            full.paste(crop.convert("RGB"), (x0, y0))
            pasted.append(blend_pil(original, full, hole, kernel_size=blending_kernel_size))
        return pasted


def fit_one_row(replaced: dict, tensors: dict, batch: int) -> dict:
    """Callback tensors of one row for a batch of several images: diffusers' CFG-cutoff callbacks keep the last row
    (``prompt_embeds[-1:]``, SDXL's pooled text and time ids too), which fits one image only. Where every image's
    conditional row equals that row (one prompt, ``num_images_per_prompt`` > 1), it stands for all of them; other
    prompts would be replaced by the last one, so that is one line instead of a shape error in the UNet."""
    fitted = {}
    for name, value in replaced.items():
        before = tensors.get(name)
        if (
            batch > 1
            and torch.is_tensor(value)
            and value.shape[0] == 1
            and torch.is_tensor(before)
            and before.shape[0] in (batch, 2 * batch)
        ):
            conditional = before[-batch:]
            if not torch.equal(conditional, value.to(conditional.dtype).expand_as(conditional)):
                raise ValueError(
                    f"a step callback returned {name} with 1 row for {batch} images of different prompts (diffusers' "
                    "CFG-cutoff callbacks keep the last row): return one row per image"
                )
            value = conditional
        fitted[name] = value
    return fitted


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _per_net(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n
