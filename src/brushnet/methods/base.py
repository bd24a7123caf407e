"""One interface for every inpainting method.

Every method takes the same :class:`InpaintRequest` and returns the same :class:`InpaintResult`; only the
base (:func:`inpaint`) does the shared pre- and post-processing — mask grow/shrink, crop-to-mask, working
size, paste-back with the feathered blend — so comparisons between methods are fair. A method implements
``load`` (its models) and ``generate`` (its own denoising on an already-prepared region).
"""

from __future__ import annotations

import logging
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..image import InputError, load_image, mask_to_array, pil_to_tensor, tensor_to_pil
from .processing import grow_mask, outpaint_canvas, paste_back, plan_region

logger = logging.getLogger(__name__)

__all__ = [
    "InpaintRequest",
    "ModelPaths",
    "NoOptions",
    "GenerateOutput",
    "InpaintResult",
    "InpaintMethod",
    "StepCallback",
    "inpaint",
    "outpaint",
]

StepCallback = Callable[[int, int], None]  # (step done, total steps)


class InpaintRequest(BaseModel):
    """What to inpaint and how; shared by the Python API, CLI, REST API, web page and benchmarks.

    Unknown fields are an error. Method-specific settings go in ``options`` and are validated by the
    method's own ``Options`` model.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", description="What to paint in the hole.")
    negative_prompt: str = Field("", description="What to avoid.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Random seed; None draws one (reported).")
    steps: int = Field(50, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0, description="Classifier-free guidance (off at <= 1).")
    scheduler: str = Field("unipc", description="Scheduler name (see brushnet.schedulers.SCHEDULERS).")
    num_images: int = Field(1, ge=1, le=16, description="Images per request; image i uses seed + i.")
    blend: bool = Field(True, description="Feathered paste-back: pixels away from the hole stay exact.")
    blend_kernel_size: int = Field(21, ge=1, le=255, description="Feathering Gaussian kernel (odd).")
    mask_grow: int = Field(0, ge=-256, le=256, description="Grow (>0) or shrink (<0) the mask, pixels.")
    invert_mask: bool = Field(False, description="Treat black as the region to inpaint.")
    crop_to_mask: bool = Field(False, description="Work on a padded box around the mask at native size.")
    crop_padding: int = Field(32, ge=0, le=4096, description="Padding of the crop box, pixels.")
    resolution: int | None = Field(
        None, ge=64, le=4096, description="Working size (area ~ resolution^2); default: input size / native."
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Method-specific options.")

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        from ..schedulers import SCHEDULERS

        if value.lower() not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {value!r}; choose one of: {', '.join(SCHEDULERS)}")
        return value.lower()

    @field_validator("blend_kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"blend_kernel_size must be odd, got {value}")
        return value


class ModelPaths(BaseModel):
    """Where a method's models are. Each method reads the fields it needs and says which are missing."""

    model_config = ConfigDict(extra="forbid")

    base: str | None = Field(None, description="SD1.5 base: diffusers folder, hub id or single .safetensors.")
    base_config: str | None = Field(None, description="Configs for a single-file base (offline).")
    brushnet: str | None = Field(None, description="BrushNet checkpoint folder or hub id.")
    inpaint_model: str | None = Field(None, description="9-channel SD inpainting model folder or hub id.")
    controlnet: str | None = Field(None, description="SD1.5 inpaint ControlNet folder or hub id.")
    allow_pickle: bool = Field(False, description="Allow pickle-based (.bin/.ckpt) weights.")

    def require(self, method: str, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            flags = ", ".join("--" + n.replace("_", "-") for n in missing)
            raise InputError(f"method {method!r} needs {flags}")


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class GenerateOutput:
    """What a method's ``generate`` returns: images ``(N, 3, h, w)`` in [0, 1] at the working size, and
    how many network evaluations one image cost (per single sample; a CFG pair counts 2)."""

    images: torch.Tensor
    unet_calls: int
    extra_calls: dict[str, int] = field(default_factory=dict)


@dataclass
class InpaintResult:
    """Images at the input's size, and everything needed to reproduce them."""

    images: list[Image.Image]
    method: str
    seed: int
    parameters: dict[str, Any]
    timings: dict[str, float]
    unet_calls: int
    extra_calls: dict[str, int] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": self.seed,
            "parameters": self.parameters,
            "timings": self.timings,
            "unet_calls": self.unet_calls,
            "extra_calls": self.extra_calls,
        }


class InpaintMethod(ABC):
    """Base class of every method: loads its models once, then ``generate`` on prepared regions.

    Subclasses set ``name``, ``description``, ``Options`` (a pydantic model with ``extra="forbid"``), and
    ``native_resolution``; they implement :meth:`load` and :meth:`generate`. Mask conversion to the model's
    own convention happens inside ``generate``, in one place per method.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    native_resolution: ClassVar[int] = 512
    latent_multiple: ClassVar[int] = 8
    #: the model paths it was loaded from (set by :func:`~brushnet.methods.load_method`; recorded in results)
    models: ModelPaths | None = None

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    @abstractmethod
    def load(
        cls, models: ModelPaths, device: str = "cpu", dtype: str | torch.dtype = "fp32"
    ) -> InpaintMethod:
        """Load the method's models."""

    @abstractmethod
    def generate(
        self,
        image: torch.Tensor,
        hole: torch.Tensor,
        request: InpaintRequest,
        options: BaseModel,
        generators: list[torch.Generator],
        on_step: StepCallback | None = None,
    ) -> GenerateOutput:
        """Inpaint a prepared region.

        Args:
            image: ``(1, 3, h, w)`` in [0, 1], ``h`` and ``w`` multiples of ``latent_multiple``.
            hole: ``(1, 1, h, w)`` in {0, 1}, **1 = region to generate** (the project's convention).
            request: the shared settings (prompt, steps, guidance, scheduler, num_images, ...).
            options: this method's validated ``Options``.
            generators: one CPU generator per image (``request.num_images``), seeded ``seed + i``; pass the
                list to diffusers (``randn_tensor`` draws image i from generator i).
            on_step: called after each denoising step with (step, total).
        """

    def parse_options(self, options: dict[str, Any]) -> BaseModel:
        try:
            return self.Options(**options)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InputError(f"bad option for method {self.name!r}: {where}: {first['msg']}") from None

    @classmethod
    def options_schema(cls) -> dict[str, Any]:
        return cls.Options.model_json_schema()


def _resolve_request(request: InpaintRequest | dict | None, overrides: dict[str, Any]) -> InpaintRequest:
    if request is None:
        request = {}
    if isinstance(request, dict):
        request = {**request, **overrides}
        try:
            return InpaintRequest(**request)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "request"
            raise InputError(f"bad request: {where}: {first['msg']}") from None
    if overrides:
        return _resolve_request(request.model_dump(), overrides)
    return request


def inpaint(
    method: InpaintMethod,
    image: Image.Image | str,
    mask: Image.Image | np.ndarray | torch.Tensor | str,
    request: InpaintRequest | dict | None = None,
    on_step: StepCallback | None = None,
    **overrides: Any,
) -> InpaintResult:
    """Inpaint ``image`` where ``mask`` is white with ``method``; the one entry point for every method.

    Args:
        method: a loaded method (see :func:`brushnet.methods.load_method`).
        image: RGB image (any size) or a path.
        mask: white = inpaint; a path, PIL image (L/RGB/RGBA), array or tensor of the image's size.
        request: an :class:`InpaintRequest` or a dict of its fields; keyword ``overrides`` are merged in.
        on_step: progress callback ``(step, total)``, totalled over all ``num_images``.

    Returns:
        :class:`InpaintResult` with images at the input's size.

    Raises:
        InputError: bad input (size mismatch, empty mask, unknown option, ...), with a one-line message.
    """
    request = _resolve_request(request, overrides)
    options = method.parse_options(request.options)
    t_start = time.perf_counter()

    original = load_image(image)
    if isinstance(mask, str):
        from ..image import load_mask

        hole = load_mask(mask, size=original.size, invert=request.invert_mask, allow_empty=True)
    else:
        hole = mask_to_array(mask, invert=request.invert_mask)
    if (hole.shape[1], hole.shape[0]) != original.size:
        raise InputError(
            f"mask is {hole.shape[1]}x{hole.shape[0]} but the image is {original.size[0]}x{original.size[1]}"
        )
    hole = grow_mask(hole, request.mask_grow)
    if not hole.any():
        raise InputError("mask is empty: no white pixel marks a region to inpaint (white = inpaint)")

    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    plan = plan_region(
        hole, request.crop_to_mask, request.crop_padding, request.resolution, method.native_resolution
    )
    region = original.crop(plan.box)
    region_hole = Image.fromarray(
        hole[plan.box[1] : plan.box[3], plan.box[0] : plan.box[2]].astype(np.uint8) * 255
    )
    if region.size != plan.size:
        region = region.resize(plan.size, Image.Resampling.LANCZOS)
        # any coverage counts as hole, so the resized hole never under-covers the original one
        region_hole = region_hole.resize(plan.size, Image.Resampling.BILINEAR)
    hole_tensor = torch.from_numpy((np.asarray(region_hole) > 0).astype(np.float32))[None, None]
    image_tensor = pil_to_tensor(region)
    t_prepared = time.perf_counter()

    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(request.num_images)]
    output = method.generate(image_tensor, hole_tensor, request, options, generators, on_step)
    if output.images.shape[0] != request.num_images:
        raise RuntimeError(f"{method.name} returned {output.images.shape[0]} images for {request.num_images}")
    t_generated = time.perf_counter()

    images = [
        paste_back(original, generated, hole, plan, request.blend, request.blend_kernel_size)
        for generated in tensor_to_pil(output.images)
    ]
    t_done = time.perf_counter()

    parameters = request.model_dump()
    parameters["seed"] = seed
    parameters["seeds"] = [seed + i for i in range(request.num_images)]
    parameters["options"] = options.model_dump()
    parameters["region"] = plan.as_dict()
    parameters["image_size"] = list(original.size)
    parameters["models"] = method.models.model_dump(exclude_none=True) if method.models is not None else None
    return InpaintResult(
        images=images,
        method=method.name,
        seed=seed,
        parameters=parameters,
        timings={
            "prepare_s": t_prepared - t_start,
            "generate_s": t_generated - t_prepared,
            "paste_back_s": t_done - t_generated,
            "total_s": t_done - t_start,
        },
        unet_calls=output.unet_calls,
        extra_calls=output.extra_calls,
    )


def outpaint(
    method: InpaintMethod,
    image: Image.Image | str,
    left: int = 0,
    top: int = 0,
    right: int = 0,
    bottom: int = 0,
    overlap: int = 0,
    fill: str = "edge",
    request: InpaintRequest | dict | None = None,
    on_step: StepCallback | None = None,
    **overrides: Any,
) -> InpaintResult:
    """Extend ``image`` by the given pixels per side and paint the new area with ``method`` (outpainting).

    The canvas and its mask come from :func:`~brushnet.methods.processing.outpaint_canvas`; the rest is
    :func:`inpaint` with the same request, so every method gets the same pre- and post-processing. The extents
    are recorded in ``result.parameters["outpaint"]``.

    Args:
        left, top, right, bottom: pixels added on each side (≥ 0, at least one > 0).
        overlap: also repaint this many pixels of the original along each extended side.
        fill: pre-fill of the new area, ``"edge"`` (replicated border) or ``"black"``.
        request, on_step, overrides: as for :func:`inpaint` (``invert_mask`` must stay False: the mask is
            built here).

    Returns:
        :class:`InpaintResult` with images of size ``(width + left + right, height + top + bottom)``.
    """
    request = _resolve_request(request, overrides)
    if request.invert_mask:
        raise InputError("invert_mask makes no sense for outpainting: the mask is built from the extents")
    canvas, hole = outpaint_canvas(load_image(image), left, top, right, bottom, overlap=overlap, fill=fill)
    result = inpaint(method, canvas, hole, request, on_step=on_step)
    result.parameters["outpaint"] = {
        "left": left,
        "top": top,
        "right": right,
        "bottom": bottom,
        "overlap": overlap,
        "fill": fill,
    }
    return result
