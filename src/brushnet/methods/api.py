"""The one way to run any method: ``prepare`` a request (every check, once), then ``run`` it.

- :func:`prepare` needs only the method's class: it validates the request and the method's options, loads
  and checks the image and the mask (size, emptiness, ``invert_mask``, ``mask_grow``) and draws the seed,
  returning a :class:`~brushnet.methods.base.PreparedJob`. The CLI prepares before it loads any model, so a
  bad option fails in a fraction of a second; the service prepares when a request arrives and queues the job.
- :func:`run` does the shared pre- and post-processing around the method's ``generate``: crop-to-mask and
  working size (the loaded model's native resolution), seeds (image i uses ``seed + i``), and the paste-back
  with the feathered blend — the same for every method, so comparisons are fair.
- :func:`inpaint` and :func:`outpaint` are ``run(prepare(...))``.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import secrets
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import GenerationError, InputError
from ..image import (
    DEFAULT_MAX_PIXELS,
    exif_orientation,
    load_image,
    load_mask,
    may_be_transparent,
    open_image,
    oriented,
    pil_to_tensor,
    tensor_to_pil,
)
from .base import InpaintMethod, InpaintRequest, InpaintResult, PreparedJob, StepCallback, Task
from .processing import (
    crop_padding_for,
    grow_mask,
    keep_alpha,
    mask_bbox,
    outpaint_canvas,
    paste_back,
    plan_region,
)

logger = logging.getLogger(__name__)

__all__ = ["check_request", "prepare", "prepare_outpaint", "run", "inpaint", "outpaint"]


def _method_class(method: InpaintMethod | type[InpaintMethod]) -> type[InpaintMethod]:
    return method if isinstance(method, type) else type(method)


def check_request(
    method: InpaintMethod | type[InpaintMethod],
    request: InpaintRequest | dict | None = None,
    **overrides: Any,
) -> tuple[InpaintRequest, Any]:
    """Validate a request for ``method`` without any image: the schema, the method's options and what the method
    supports (e.g. its schedulers). Returns the resolved request (scheduler filled in) and the parsed options.

    Raises:
        RequestError: one line naming the first problem.
    """
    cls = _method_class(method)
    request = InpaintRequest.build(request, **overrides)
    options = cls.parse_options(request.options)
    return cls.check(request, options), options


def _warn_if_orientation_is_ambiguous(image: Any, mask: Any) -> None:
    """The image is used upright, as viewers show it, by its EXIF orientation; an array or tensor mask carries
    no orientation, and one made from the stored pixels (``np.asarray(Image.open(...))``) lies turned against
    it. A mask of the stored size on a non-square image is refused by its size (:func:`load_mask` says why);
    on a square image the sizes agree, so this says it here."""
    if not isinstance(mask, (np.ndarray, torch.Tensor)):
        return
    orientation = 1
    if isinstance(image, Image.Image):
        orientation = exif_orientation(image)
    elif isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as stored:  # the header only
                orientation = exif_orientation(stored)
        except Exception:  # noqa: BLE001 - an unreadable file is refused where the image is read
            return
    if orientation != 1:
        logger.warning(
            "the image has EXIF orientation %s and is used upright, as viewers show it; the %s mask is taken "
            "as upright too: if it was made from the stored pixels (np.asarray(Image.open(...))), make it "
            "from PIL.ImageOps.exif_transpose(image) instead",
            orientation,
            type(mask).__name__,
        )


def _decoded(image: Any, max_pixels: int | None) -> Any:
    """A path opened and decoded once (checked against ``max_pixels``, upright by its EXIF orientation, as
    :func:`~brushnet.image.load_image` opens it), so that both the RGB image and its alpha are read from it;
    anything else as given."""
    if isinstance(image, (str, os.PathLike)):
        return open_image(image, max_pixels)
    return image


def _transparent(image: Any) -> Image.Image | None:
    """A PIL image with a transparent pixel as RGBA (its stored colours and alpha); None for anything else."""
    if not isinstance(image, Image.Image):
        return None
    image = oriented(image)
    if not may_be_transparent(image):
        return None
    rgba = image.convert("RGBA")
    return rgba if rgba.getchannel("A").getextrema()[0] < 255 else None


def prepare(
    method: InpaintMethod | type[InpaintMethod],
    image: Image.Image | str,
    mask: Any,
    request: InpaintRequest | dict | None = None,
    *,
    max_pixels: int | None = None,
    control_image: Image.Image | str | None = None,
    **overrides: Any,
) -> PreparedJob:
    """Check a request for ``method`` (a loaded method or its class) and its inputs; nothing is generated.

    Args:
        method: the method, loaded or not (only its declaration is read).
        image: RGB image (any size) or a path. A file or PIL image with transparent pixels is flattened onto
            black for the model; the result keeps its alpha channel and its stored colours wherever the result
            keeps the input (RGBA results).
        mask: white = inpaint; a path, PIL image (L/RGB/RGBA/I;16), array or tensor of the image's size.
        request: an :class:`InpaintRequest` or a dict of its fields; keyword ``overrides`` are merged in.
        max_pixels: refuse larger images before decoding them (default: PIL's decompression-bomb limit).
        control_image: for a method with a guide ControlNet slot (brushnet's ``guide_controlnet``): the image
            that steers it (pose, depth, edges, ...), an RGB image or path of the input's size; it is cropped and
            resized with the image.

    Raises:
        InputError: bad input (unreadable file, size mismatch, empty mask, ...); ``RequestError`` (a subclass)
            for the request, options or an unsupported scheduler.
    """
    start = time.perf_counter()
    cls = _method_class(method)
    request, options = check_request(cls, request, **overrides)
    source = _decoded(image, max_pixels)
    original = load_image(source, max_pixels=max_pixels)
    _warn_if_orientation_is_ambiguous(image, mask)
    hole = load_mask(mask, size=original.size, invert=request.invert_mask, max_pixels=max_pixels)
    grown = grow_mask(hole, request.mask_grow)
    if not grown.any():  # only a shrink empties a mask that had a hole
        left, top, right, bottom = mask_bbox(hole)
        raise InputError(
            f"mask is empty after mask_grow {request.mask_grow} (--mask-grow): shrinking by {-request.mask_grow} px "
            f"erased the whole hole ({int(hole.sum())} pixels in a {right - left}x{bottom - top} box); "
            "shrink less"
        )
    hole = grown
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    control = None
    if control_image is not None:
        if "guide_controlnet" not in {slot.name for slot in cls.optional_models}:
            raise InputError(f"method {cls.name!r} takes no control image (no guide ControlNet)")
        control = load_image(control_image, max_pixels=max_pixels)
        if control.size != original.size:
            raise InputError(
                f"control image is {control.size[0]}x{control.size[1]}, the image {original.size[0]}x{original.size[1]}"
            )
    job = PreparedJob(
        cls.name,
        request,
        options,
        original,
        hole,
        seed,
        control_image=control,
        transparent=_transparent(source),
    )
    job.record["prepare_s"] = time.perf_counter() - start
    return job


def prepare_outpaint(
    method: InpaintMethod | type[InpaintMethod],
    image: Image.Image | str,
    left: int = 0,
    top: int = 0,
    right: int = 0,
    bottom: int = 0,
    overlap: int = 0,
    fill: str = "edge",
    request: InpaintRequest | dict | None = None,
    *,
    max_pixels: int | None = None,
    **overrides: Any,
) -> PreparedJob:
    """:func:`prepare` for outpainting: extend the canvas by the given pixels per side; the new area (and
    ``overlap`` pixels of the original along each extended side) is the hole. The extents are recorded in the
    result's ``parameters["outpaint"]``. A transparent input is flattened for the model, as in :func:`prepare`;
    the result keeps its alpha and stored colours where it keeps the input, and the new area is opaque. A method's
    ``outpaint_options`` fill the options the request leaves out (PowerPaint: ``task="outpainting"``).

    Raises:
        InputError: no side extended, negative extents, an unknown fill, ``invert_mask`` set, or an outpainted
            canvas of more than ``max_pixels`` pixels (the input image's limit; checked before it is built).
    """
    extents = {"left": left, "top": top, "right": right, "bottom": bottom, "overlap": overlap}
    for name, value in extents.items():
        try:
            if isinstance(value, bool):
                raise TypeError
            extents[name] = operator.index(value)
        except TypeError:
            raise InputError(f"{name} must be a whole number of pixels, got {value!r}") from None
    left, top, right, bottom, overlap = extents.values()
    request = InpaintRequest.build(request, **overrides)
    if request.invert_mask:
        raise InputError("invert_mask makes no sense for outpainting: the mask is built from the extents")
    cls = method if isinstance(method, type) else type(method)
    defaults = {k: v for k, v in cls.outpaint_options.items() if k not in request.options}
    if defaults:  # e.g. PowerPaint's task=outpainting; an option the request gives is kept
        request = request.model_copy(update={"options": {**defaults, **request.options}})
    source = _decoded(image, max_pixels)
    original = load_image(source, max_pixels=max_pixels)
    width, height = (
        original.size[0] + max(left, 0) + max(right, 0),
        original.size[1] + max(top, 0) + max(bottom, 0),
    )
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if width * height > limit:
        raise InputError(
            f"outpainted canvas {width}x{height} = {width * height} pixels exceeds the limit of {limit} "
            "(--max-pixels); extend less"
        )
    canvas, hole = outpaint_canvas(original, left, top, right, bottom, overlap=overlap, fill=fill)
    job = prepare(method, canvas, hole, request, max_pixels=max_pixels)
    transparent = _transparent(source)
    # a transparent input: its colours and alpha where it sits; the new area is generated, opaque
    if transparent is not None:
        stored = canvas.convert("RGBA")
        stored.paste(transparent, (max(left, 0), max(top, 0)))
        job.transparent = stored
    extents = {"left": left, "top": top, "right": right, "bottom": bottom, "overlap": overlap, "fill": fill}
    job.record["outpaint"] = extents
    return job


def _warn_if_far_from_native(method: InpaintMethod, plan: Any) -> None:
    """A working area over 4x the model's native one (a photo at its own size) is slow and tends to repeat
    content; under a quarter of it, detail is lost. Neither is wrong, so this only says how to choose, once per
    loaded method and size (a batch, a benchmark's warm-up and repeats, a server's jobs)."""
    width, height = plan.size
    ratio = width * height / method.native_resolution**2
    said = method.__dict__.setdefault("_sizes_said_far_from_native", set())
    if 0.25 <= ratio <= 4 or (width, height) in said:
        return
    said.add((width, height))
    logger.warning(
        "%s works at %dx%d, %.3g times the area of its native %dx%d: %s; set resolution (--resolution %d) or "
        "crop_to_mask (--crop-to-mask) to work near the native size",
        method.name,
        width,
        height,
        ratio,
        method.native_resolution,
        method.native_resolution,
        "slow, and large images tend to repeat content" if ratio > 4 else "detail is lost",
        method.native_resolution,
    )


def _warn_if_the_hole_falls_out(
    method: InpaintMethod, hole: torch.Tensor, mask_grow: int, scale: float = 1.0
) -> None:
    """A model that samples one pixel of each latent cell (``latent_mask == "nearest"``) does not see a stroke
    thinner than a cell: it keeps the blacked-out stroke and paints it back dark (a scratch, a wire, text).
    ``hole`` is at the working size; ``scale`` is input pixels per working pixel (``mask_grow`` is in input
    pixels)."""
    # the VAE's factor (a method may round sizes to a coarser multiple than its VAE's, as ControlNet-inpaint's 8)
    factor = int(getattr(getattr(method, "pipeline", None), "vae_scale_factor", method.size_multiple))
    if method.latent_mask != "nearest" or factor <= 1 or hole.shape[-1] % factor or hole.shape[-2] % factor:
        return
    covered = float(torch.nn.functional.max_pool2d(hole, factor, factor).sum())
    seen = float(hole[..., ::factor, ::factor].sum())
    if covered == 0 or seen >= 0.5 * covered:
        return
    logger.warning(
        "%s sees the mask at 1/%d size, one pixel of each %dx%d cell, and %.0f%% of the cells the hole touches "
        "fall out (strokes thinner than %d px of the input); grow the mask (mask_grow %d now; --mask-grow %d) so "
        "they are repainted",
        method.name,
        factor,
        factor,
        factor,
        100 * (1 - seen / covered),
        math.ceil(factor * scale),
        mask_grow,
        mask_grow + math.ceil(factor / 2 * scale),
    )


def _refuse_non_finite(method: InpaintMethod, images: torch.Tensor) -> None:
    """NaN or infinite values would come out as a black (or blotched) image that looks like a result."""
    finite = torch.isfinite(images.flatten(1)).all(1)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten().tolist()
    advice = (
        "in float16 a model or VAE can overflow: try --dtype float32 or bf16, or a VAE made for float16"
        if method.dtype == torch.float16
        else "the models (a LoRA, a VAE, a converted checkpoint?) or the settings give non-finite values"
    )
    raise GenerationError(
        f"{method.name} produced NaN or infinite values in image(s) {', '.join(map(str, bad))} "
        f"({str(method.dtype).replace('torch.', '')}), so no image is returned: {advice}"
    )


def run(method: InpaintMethod, job: PreparedJob, on_step: StepCallback | None = None) -> InpaintResult:
    """Generate a prepared job with a loaded method and paste the result back at the input's size.

    Args:
        method: the loaded method ``job`` was prepared for.
        job: from :func:`prepare`.
        on_step: progress callback ``(done, total)``, totalled over all ``num_images``.

    Raises:
        GenerationError: the method produced NaN or infinite values (it would have been a black image).
    """
    if job.method != method.name:
        raise ValueError(f"this job was prepared for method {job.method!r}, not {method.name!r}")
    request = job.request.for_family(method.family)
    t_start = time.perf_counter()
    plan = plan_region(
        job.hole,
        request.crop_to_mask,
        crop_padding_for(request),
        request.resolution,
        method.native_resolution,
        multiple=method.size_multiple,
    )
    _warn_if_far_from_native(method, plan)
    left, top, right, bottom = plan.box
    region = job.image.crop(plan.box)
    region_hole = Image.fromarray(job.hole[top:bottom, left:right].astype(np.uint8) * 255)
    if region.size != plan.size:
        region = region.resize(plan.size, Image.Resampling.LANCZOS)
        # any coverage counts as hole, so the resized hole never under-covers the original one
        region_hole = region_hole.resize(plan.size, Image.Resampling.BILINEAR)
    hole_tensor = torch.from_numpy((np.asarray(region_hole) > 0).astype(np.float32))[None, None]
    box_width = plan.box[2] - plan.box[0]
    _warn_if_the_hole_falls_out(method, hole_tensor, request.mask_grow, box_width / plan.size[0])
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in job.seeds]
    control = None
    if job.control_image is not None:  # the same crop and resize as the image
        control = job.control_image.crop(plan.box)
        if control.size != plan.size:
            control = control.resize(plan.size, Image.Resampling.LANCZOS)
        control = pil_to_tensor(control)
    task = Task(pil_to_tensor(region), hole_tensor, request, job.options, generators, on_step, control)
    t_prepared = time.perf_counter()

    output = method.generate(task)
    if output.images.shape[0] != request.num_images:
        raise RuntimeError(f"{method.name} returned {output.images.shape[0]} images for {request.num_images}")
    _refuse_non_finite(method, output.images)
    t_generated = time.perf_counter()

    # a transparent input: paste back into its stored colours and keep its alpha (the model saw it flattened)
    kept = job.image if job.transparent is None else job.transparent.convert("RGB")
    images = [
        paste_back(kept, generated, job.hole, plan, request.blend, request.blend_kernel_size)
        for generated in tensor_to_pil(output.images)
    ]
    if job.transparent is not None:
        alpha = job.transparent.getchannel("A")
        images = [
            keep_alpha(image, alpha, job.hole, request.blend, request.blend_kernel_size) for image in images
        ]
    t_done = time.perf_counter()

    parameters = request.model_dump()
    parameters.update(
        seed=job.seed,
        seeds=job.seeds,
        options=job.options.model_dump(),
        region=plan.as_dict(),
        image_size=list(job.image.size),
        models=method.model_paths.used_by(type(method)) if method.model_paths is not None else None,
        family=method.family,
    )
    parameters.update({k: v for k, v in job.record.items() if k != "prepare_s"})
    prepare_s = job.record.get("prepare_s", 0.0) + (t_prepared - t_start)
    return InpaintResult(
        images=images,
        method=method.name,
        seed=job.seed,
        parameters=parameters,
        timings={
            "prepare_s": prepare_s,
            "generate_s": t_generated - t_prepared,
            "paste_back_s": t_done - t_generated,
            "total_s": prepare_s + (t_done - t_prepared),
        },
        unet_calls=output.unet_calls,
        extra_calls=output.extra_calls,
    )


def inpaint(
    method: InpaintMethod,
    image: Image.Image | str,
    mask: Any,
    request: InpaintRequest | dict | None = None,
    on_step: StepCallback | None = None,
    **overrides: Any,
) -> InpaintResult:
    """Inpaint ``image`` where ``mask`` is white with a loaded ``method``: ``run(method, prepare(...))``.

    Returns:
        :class:`InpaintResult` with images at the input's size (RGBA for a transparent input, see :func:`prepare`).

    Raises:
        InputError: bad input (size mismatch, empty mask, unknown option, ...), with a one-line message.
    """
    return run(method, prepare(method, image, mask, request, **overrides), on_step)


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
    """Extend ``image`` by the given pixels per side and paint the new area: ``run(method, prepare_outpaint(...))``.
    A transparent input keeps its alpha where the input sits; the new area is opaque (RGBA result).

    Returns:
        :class:`InpaintResult` with images of size ``(width + left + right, height + top + bottom)``.
    """
    job = prepare_outpaint(method, image, left, top, right, bottom, overlap, fill, request, **overrides)
    return run(method, job, on_step)
