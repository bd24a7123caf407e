"""Request bodies of the inpaint endpoint and PNG output with the parameters embedded.

The request schema is :class:`~brushnet.methods.InpaintRequest` itself plus ``method``; the JSON body adds
the base64 ``image`` and ``mask`` and ``wait``. Unknown fields are rejected everywhere (``extra="forbid"``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError
from pydantic import Field, ValidationError

from ..methods.base import InpaintRequest, InpaintResult
from .engine import InvalidInput, SchemaError, TooLarge

__all__ = [
    "ServiceRequest",
    "JsonInpaintBody",
    "parse_request",
    "parse_request_json",
    "merge_form_fields",
    "decode_image",
    "decode_base64",
    "parameters_json",
    "png_bytes",
]


class ServiceRequest(InpaintRequest):
    """:class:`InpaintRequest` plus the method to run (default: the first loaded method)."""

    method: str | None = Field(None, description="Method name (GET /api/v1/methods); default: the first.")


class JsonInpaintBody(ServiceRequest):
    """JSON form of the inpaint request: the request fields plus base64 images."""

    image: str = Field(..., description="Image file (PNG/JPEG/WebP...) as base64 or a data: URL.")
    mask: str = Field(..., description="Mask file, white = inpaint (RGBA: alpha is the mask), base64.")
    control_image: str | None = Field(
        None,
        description="Control image for a guide ControlNet (brushnet served with --guide-controlnet), base64.",
    )
    wait: bool = Field(False, description="Answer with the PNG when done instead of 202 + job id.")


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "request"
    if first["type"] == "extra_forbidden":
        return f"unknown field {where!r} (see GET /api/v1/methods for the request schema)"
    if first["type"] == "missing":
        return f"missing field {where!r}"
    return f"bad request: {where}: {first['msg'].removeprefix('Value error, ')}"


def parse_request(model: type[ServiceRequest], data: Any) -> ServiceRequest:
    """Validate ``data`` against ``model``; a violation is a :class:`SchemaError` with one clear line."""
    if not isinstance(data, dict):
        raise SchemaError("the request must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SchemaError(_validation_message(exc)) from None


def merge_form_fields(data: dict, fields: dict[str, str]) -> dict:
    """Merge single multipart form fields (``prompt=...``, ``seed=3``, ``options={"k": 1}``) into the
    ``request`` JSON object; a field given both ways is an error. Values stay strings; pydantic converts
    them (``"3"`` -> 3, ``"true"`` -> True) and rejects unknown names."""
    merged = dict(data)
    for name, value in fields.items():
        if name in merged:
            raise SchemaError(f"field {name!r} is given both as a form field and inside 'request'")
        if name == "options":
            value = parse_request_json(value, "form field 'options'")
        merged[name] = value
    return merged


MAX_JSON_DEPTH = 32
"""Deepest nesting of objects and lists a request may have (the schema needs 3: request, options, a list)."""


def _json_depth(data: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


def parse_request_json(text: str | bytes, what: str = "request") -> dict:
    """Parse ``text`` as a JSON object; anything else is a :class:`SchemaError` naming ``what``. Nesting deeper
    than :data:`MAX_JSON_DEPTH` is an :class:`InvalidInput` (400), also where Python's parser would overflow its
    stack (``RecursionError``)."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{what} is not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidInput(f"{what} is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise SchemaError(f"{what} must be a JSON object")
    if _json_depth(data) > MAX_JSON_DEPTH:
        raise InvalidInput(f"{what} is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)")
    return data


def decode_base64(text: str, what: str) -> bytes:
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is not valid base64") from None


def decode_image(data: bytes, what: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Open uploaded bytes as an image, refusing oversized ones before decoding the pixels. The image comes back
    as stored (any mode, alpha kept): :func:`brushnet.methods.prepare` flattens it for the model and keeps a
    transparent input's alpha in the result."""
    if len(data) > max_bytes:
        raise TooLarge(f"{what} is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise InvalidInput(f"{what} is empty")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise TooLarge(f"{what} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
        img.load()
    except Image.DecompressionBombError:
        raise TooLarge(f"{what} has too many pixels (decompression bomb guard)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"{what} is not a readable image ({exc.__class__.__name__})") from None
    return img


def parameters_json(result: InpaintResult, index: int) -> str:
    """Everything needed to reproduce image ``index`` of ``result`` as one line of ASCII JSON."""
    meta = result.metadata()
    meta["image_index"] = index
    meta["seed"] = result.parameters.get("seeds", [result.seed])[index]
    return json.dumps(meta, ensure_ascii=True, sort_keys=True, separators=(",", ":"), default=str)


def png_bytes(result: InpaintResult, index: int) -> bytes:
    """Image ``index`` of ``result`` as PNG with the reproduction parameters in its text chunks, as the CLI
    writes them: ``brushnet`` (full JSON: method, this image's seed, the request, timings), ``seed``,
    ``method`` and ``prompt``."""
    info = PngImagePlugin.PngInfo()
    meta = parameters_json(result, index)
    info.add_text("brushnet", meta)
    info.add_text("seed", str(json.loads(meta)["seed"]))
    info.add_text("method", result.method)
    info.add_itxt("prompt", str(result.parameters.get("prompt", "")))
    info.add_text("Software", "brushnet")
    buffer = io.BytesIO()
    result.images[index].save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
