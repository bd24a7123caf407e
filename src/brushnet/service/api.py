"""The HTTP API and the web page, served by one FastAPI app over one :class:`Engine`.

Every error answers a JSON body ``{"error": "<one line>", ...}`` with its status: 400 bad image or mask (or
JSON nested too deeply), 403 cross-origin request or a ``Host`` that is not this server (:class:`HostGuard`),
413 too large, 422 schema violation, 404 unknown job, 409 job already finished, 429 queue full, 500 internal
(no traceback), 504 job timed out (``wait=true``). No CPU-heavy work runs on the event loop: decoding,
parsing, preparing and PNG encoding go to the thread pool, so ``/health`` always answers.

Requests that start or cancel jobs from a browser page of another origin are refused (403): a browser sends
a cross-site form POST without asking, and the server has no authentication. Requests without an ``Origin``
header (curl, scripts) and the server's own page pass; ``allowed_origins`` adds others (a proxy's address).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from ..methods.base import FAMILY_GUIDANCE, InpaintRequest
from ..schedulers import SCHEDULERS
from .engine import (
    Engine,
    Forbidden,
    InvalidInput,
    Job,
    JobConflict,
    Limits,
    SchemaError,
    ServiceError,
    TooLarge,
)
from .payload import (
    JsonInpaintBody,
    ServiceRequest,
    decode_base64,
    decode_image,
    merge_form_fields,
    parameters_json,
    parse_request,
    parse_request_json,
    png_bytes,
)

logger = logging.getLogger(__name__)

__all__ = ["create_app", "HostGuard", "is_loopback"]

STATIC_DIR = Path(__file__).parent / "static"
_POLL_S = 0.05
_KEEPALIVE_S = 15.0
_FAILED_STATUS = {"timeout": 504, "input": 400, "generation": 500, "internal": 500, "cancelled": 409}
_BOOLEAN = TypeAdapter(bool)

_INPAINT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "mask"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "Image file."},
                        "mask": {
                            "type": "string",
                            "format": "binary",
                            "description": "Mask file of the image's size, white = inpaint.",
                        },
                        "control_image": {
                            "type": "string",
                            "format": "binary",
                            "description": "Control image of the image's size, for brushnet served with a guide "
                            "ControlNet (--guide-controlnet); required there, refused elsewhere.",
                        },
                        "request": {
                            "type": "string",
                            "description": "JSON object: InpaintRequest fields plus 'method'. Each field may "
                            "also be sent as its own form field (prompt, seed, steps, options as JSON, ...).",
                            "example": '{"method": "brushnet", "prompt": "a red apple", "seed": 1}',
                        },
                        "wait": {"type": "boolean", "description": "Answer with the PNG when done."},
                    },
                }
            },
            "application/json": {"schema": JsonInpaintBody.model_json_schema()},
        },
    },
    "responses": {
        "200": {"description": "wait=true: the first image as PNG", "content": {"image/png": {}}},
        "202": {"description": "Queued: {job_id, state, status_url, events_url}"},
    },
}


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


async def _read_limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body is {declared} bytes; the limit is {limit}")
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise TooLarge(f"request body is over the limit of {limit} bytes")
        yield chunk


async def _parse_inpaint(request: Request, engine: Engine, limits: Limits, wait_query: bool | None):
    content_type = request.headers.get("content-type", "")
    max_bytes, max_pixels = limits.max_upload_bytes, engine.limits.max_pixels
    if content_type.startswith("multipart/form-data"):
        parser = MultiPartParser(
            request.headers,
            _read_limited(request, max_bytes),
            max_files=3,
            max_fields=64,
            max_part_size=max_bytes,
        )
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise InvalidInput(f"bad multipart body: {exc.message}") from None
        try:
            files, fields = {}, {}
            for name, part in form.multi_items():
                if name in files or name in fields:
                    raise SchemaError(f"form field {name!r} is given twice")
                if name in ("image", "mask", "control_image"):
                    if not isinstance(part, UploadFile):
                        raise SchemaError(f"form field {name!r} must be a file upload")
                    data = await part.read()
                    files[name] = await run_in_threadpool(decode_image, data, name, max_bytes, max_pixels)
                elif isinstance(part, UploadFile):
                    raise SchemaError(
                        f"unexpected file field {name!r}; only 'image', 'mask' and 'control_image' are files"
                    )
                else:
                    fields[name] = part
            for name in ("image", "mask"):
                if name not in files:
                    raise SchemaError(f"missing file field {name!r}")
            wait_field = fields.pop("wait", None)
            try:  # as the query parameter and the JSON field are read; a typo is no silent false
                wait = wait_field is not None and _BOOLEAN.validate_python(wait_field)
            except ValidationError:
                raise SchemaError(
                    f"form field 'wait' must be a boolean (true/false, 1/0, yes/no, on/off), got {wait_field[:40]!r}"
                ) from None
            data = parse_request_json(fields.pop("request", None) or "{}")
            body = parse_request(ServiceRequest, merge_form_fields(data, fields))
        finally:
            await form.close()
        image, mask, control = files["image"], files["mask"], files.get("control_image")
    elif content_type.startswith("application/json"):
        raw = b"".join([chunk async for chunk in _read_limited(request, max_bytes)])
        # parsing up to max_upload_bytes of JSON and base64, and decoding the images, is CPU work: off the loop
        body, image, mask, control = await run_in_threadpool(_parse_json_body, raw, max_bytes, max_pixels)
        wait = body.wait
    else:
        raise InvalidInput(
            f"unsupported content type {content_type or '(none)'!r}; send multipart/form-data or JSON"
        )
    fields = body.model_dump(include=set(InpaintRequest.model_fields), exclude_unset=True)
    inpaint_request = InpaintRequest.model_validate(fields)
    return body.method, image, mask, control, inpaint_request, (wait if wait_query is None else wait_query)


def _parse_json_body(raw: bytes, max_bytes: int, max_pixels: int):
    body = parse_request(JsonInpaintBody, parse_request_json(raw))
    image = decode_image(decode_base64(body.image, "image"), "image", max_bytes, max_pixels)
    mask = decode_image(decode_base64(body.mask, "mask"), "mask", max_bytes, max_pixels)
    control = None
    if body.control_image is not None:
        control = decode_image(
            decode_base64(body.control_image, "control_image"), "control_image", max_bytes, max_pixels
        )
    return body, image, mask, control


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _job_status(job: Job) -> dict:
    status = job.status()
    if job.result is not None:
        status["result"]["images"] = [
            f"/api/v1/jobs/{job.id}/image/{i}" for i in range(len(job.result.images))
        ]
    return status


def _check_origin(request: Request, allowed: frozenset[str]) -> None:
    origin = request.headers.get("origin")
    if origin is None:  # not sent by a browser page (or a same-origin GET)
        return
    own = {f"{request.url.scheme}://{request.headers.get('host', '')}".lower()}
    if origin.lower().rstrip("/") not in own | allowed:
        raise Forbidden(
            f"cross-origin request from {origin!r} refused; start the server with --allow-origin {origin} "
            "to allow that page"
        )


_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
_EVERY_INTERFACE = ("0.0.0.0", "::", "")


def _split_host(header: str) -> tuple[str, int | None]:
    """``"Example.org:7860"`` → ``("example.org", 7860)``; ``"[::1]:7860"`` → ``("::1", 7860)``; no port →
    ``None``; a malformed port → ``-1`` (matches nothing)."""
    header = header.strip().lower()
    if header.startswith("["):
        name, _, rest = header[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
    elif header.count(":") == 1:
        name, port_text = header.split(":")
    else:
        name, port_text = header, None
    if port_text is None:
        return name, None
    return name, int(port_text) if port_text.isdigit() else -1


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server reachable from this machine only."""
    import ipaddress

    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HostGuard:
    """The ``Host`` headers the server answers to: the DNS-rebinding guard.

    A web page on ``http://evil.example:7860`` whose name the attacker re-points at 127.0.0.1 reaches this
    server as a *same-origin* request (``Host`` and ``Origin`` both name evil.example), so the cross-origin check
    cannot see it; only the ``Host`` header can. Accepted: the loopback names (``localhost``, ``127.0.0.1``,
    ``::1``) and the bound address, on the bound port; when bound to every interface (0.0.0.0 / ::), also this
    machine's host names and any IP address (a rebinding attack needs a DNS name); and the host (and port) of
    each ``--allow-origin`` (a reverse proxy's public name).

    Args:
        bound_host, bound_port: the address the server listens on.
        allowed_origins: ``--allow-origin`` values (``https://inpaint.example.org``).
    """

    def __init__(self, bound_host: str, bound_port: int | None, allowed_origins: Iterable[str] = ()):
        import socket
        from urllib.parse import urlsplit

        self.port = bound_port
        self.every_interface = bound_host in _EVERY_INTERFACE
        self.names = set(_LOOPBACK_NAMES) | {bound_host.strip("[]").lower()}
        if self.every_interface:
            self.names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.origins: dict[str, set[int | None]] = {}
        for origin in allowed_origins:
            parts = urlsplit(origin)
            if parts.hostname:
                default = {"http": 80, "https": 443}.get(parts.scheme)
                self.origins.setdefault(parts.hostname.lower(), set()).update({parts.port or default})

    def allows(self, header: str) -> bool:
        name, port = _split_host(header)
        if name in self.origins and (port is None or port in self.origins[name]):
            return True
        if port is not None and self.port is not None and port != self.port:
            return False
        return name in self.names or (self.every_interface and _is_ip(name))


class _HostCheck:
    """Refuse (403) a request whose ``Host`` is not this server's address (DNS rebinding). A plain ASGI middleware:
    starlette's ``@app.middleware("http")`` wraps the request's ``receive``, and a handler behind it never learns
    that its client disconnected (a ``wait=true`` job whose client left would run to its end)."""

    def __init__(self, app, guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not self.guard.allows(header):
                response = _error(
                    403,
                    f"Host {header!r} is not this server's address; start it with --allow-origin "
                    "http://<that host>:<port> if you reach it through that name",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    engine: Engine,
    limits: Limits | None = None,
    allowed_origins: Iterable[str] = (),
    bound_host: str | None = None,
    bound_port: int | None = None,
) -> FastAPI:
    """Build the app.

    Args:
        engine: the engine that runs the jobs.
        limits: defaults to the engine's (bytes are checked here, pixels/queue/time in the engine).
        allowed_origins: browser origins besides the server's own allowed to start and cancel jobs
            (``"https://example.org"``).
        bound_host, bound_port: the address the server listens on. Every request whose ``Host`` header names
            another host is refused (403), so a web page cannot reach the server through a DNS name rebound to
            its address; see :class:`HostGuard`. ``None`` (an app under test): no ``Host`` check.
    """
    limits = limits or engine.limits
    allowed = frozenset(o.lower().rstrip("/") for o in allowed_origins)
    app = FastAPI(
        title="brushnet",
        description="BrushNet diffusion inpainting: a job queue over the loaded methods, and a web page at /.",
        version="1",
    )
    app.state.engine = engine
    app.state.limits = limits
    guard = HostGuard(bound_host, bound_port, allowed_origins) if bound_host is not None else None
    if bound_host is not None and not is_loopback(bound_host):
        logger.warning(
            "serving beyond this machine (%s): anyone who can reach it can use the API (there is no "
            "authentication); bind to 127.0.0.1 unless you need that",
            bound_host or "every interface",
        )

    if guard is not None:
        app.add_middleware(_HostCheck, guard=guard)

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError):
        return _error(exc.status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = f"not found: {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return _error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return _error(422, f"bad request: {where}: {first['msg'].removeprefix('Value error, ')}")

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception):
        logger.exception("internal error", exc_info=exc)
        return _error(500, "internal server error")

    @app.post("/api/v1/inpaint", status_code=202, openapi_extra=_INPAINT_OPENAPI)
    async def submit_inpaint(request: Request, wait: bool | None = None):
        """Queue an inpainting job (multipart or JSON). ``wait=true`` answers with the PNG when done."""
        _check_origin(request, allowed)
        method, image, mask, control, inpaint_request, wait = await _parse_inpaint(
            request, engine, limits, wait
        )
        # preparing (mask decoding, grow/shrink) is CPU work: off the event loop, so /health stays responsive
        job = await run_in_threadpool(engine.submit, method, image, mask, inpaint_request, control)
        if not wait:
            return JSONResponse(
                {
                    "job_id": job.id,
                    "state": job.state,
                    "status_url": f"/api/v1/jobs/{job.id}",
                    "events_url": f"/api/v1/jobs/{job.id}/events",
                },
                status_code=202,
                headers={"Location": f"/api/v1/jobs/{job.id}"},
            )
        while not job.finished:
            if (
                await request.is_disconnected()
            ):  # nobody will read the answer, and only this client knew the id
                with contextlib.suppress(ServiceError):
                    engine.cancel(job.id)
                return _error(499, "client disconnected", job_id=job.id)
            await asyncio.sleep(_POLL_S)
        if job.result is None:
            status = _FAILED_STATUS.get(job.error_kind or "", 500)
            return _error(status, job.error or job.state, job_id=job.id, state=job.state)
        return Response(
            await run_in_threadpool(png_bytes, job.result, 0),  # seconds for a large image: off the loop
            media_type="image/png",
            headers={
                "X-Brushnet-Job-Id": job.id,
                "X-Brushnet-Num-Images": str(len(job.result.images)),
                "X-Brushnet-Parameters": parameters_json(job.result, 0),
            },
        )

    @app.get("/api/v1/jobs/{job_id}")
    def job_status(job_id: str):
        """State, progress (step/total), result metadata with image URLs, and the error if it failed."""
        return _job_status(engine.get(job_id))

    @app.delete("/api/v1/jobs/{job_id}")
    def cancel_job(job_id: str, request: Request):
        """Cancel a queued job (at once) or a running one (at its next step); 409 if already finished."""
        _check_origin(request, allowed)
        job = engine.cancel(job_id)
        return JSONResponse(_job_status(job), status_code=200 if job.finished else 202)

    @app.get("/api/v1/jobs/{job_id}/image/{index}", response_class=Response)
    def job_image(job_id: str, index: int):
        """Result image ``index`` as PNG with the parameters in its ``parameters`` text chunk."""
        job = engine.get(job_id)
        if job.result is None:
            raise JobConflict(f"job {job_id} has no images (state: {job.state})")
        if not 0 <= index < len(job.result.images):
            raise InvalidInput(f"image index {index} out of range; the job has {len(job.result.images)}")
        seed = job.result.parameters.get("seeds", [job.result.seed])[index]
        return Response(
            png_bytes(job.result, index),
            media_type="image/png",
            headers={
                "X-Brushnet-Parameters": parameters_json(job.result, index),
                "Content-Disposition": f'inline; filename="brushnet-{job.result.method}-{seed}.png"',
            },
        )

    @app.get("/api/v1/jobs/{job_id}/events")
    async def job_events(job_id: str):
        """Server-Sent Events: ``progress`` events with the job status; ends with ``done``, ``failed``
        or ``cancelled``."""
        job = engine.get(job_id)

        async def stream() -> AsyncIterator[str]:
            last_version, last_sent = -1, time.monotonic()
            while True:
                version = job.version
                status = _job_status(job)
                if status["state"] in ("done", "failed", "cancelled"):
                    yield _event(status["state"], status)
                    return
                if version != last_version:
                    yield _event("progress", status)
                    last_version, last_sent = version, time.monotonic()
                elif time.monotonic() - last_sent > _KEEPALIVE_S:
                    yield ": keep-alive\n\n"
                    last_sent = time.monotonic()
                await asyncio.sleep(_POLL_S)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/api/v1/methods")
    def methods():
        """Loaded methods with their options' JSON schema and defaults, the request schema, the limits."""
        listed = []
        for name, method in engine.methods.items():
            info = type(method).describe()
            info.update(name=name, device=str(method.device), native_resolution=method.native_resolution,
                        family=method.family, default_guidance_scale=FAMILY_GUIDANCE[method.family],
                        control_image=method.accepts_control_image)  # fmt: skip
            listed.append(info)
        return {
            "methods": listed,
            "default_method": engine.default_method,
            "request_schema": ServiceRequest.model_json_schema(),
            "request_defaults": InpaintRequest().model_dump(),
            "schedulers": list(SCHEDULERS),
            "limits": {**engine.limits.model_dump(), "max_upload_bytes": limits.max_upload_bytes},
        }

    @app.get("/api/v1/health")
    def health():
        """Liveness and queue figures."""
        return {"status": "ok", "methods": list(engine.methods), **engine.stats()}

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
