"""``brushnet serve``: the API and the web page in one process.

Only typer and the standard library are imported at module level, so ``--help`` is instant.
"""

from __future__ import annotations

import logging
import signal
import tempfile
from pathlib import Path
from typing import Any

import typer

from .common import fail, guarded, set_flag_help
from .flags import model_flags, runtime_flags

__all__ = ["serve_command"]


def _run_server(app, engine, host: str, port: int, log_level: str) -> None:
    """uvicorn's server, stopping the engine's jobs when shutdown begins (Ctrl-C, SIGTERM): a request waiting
    for a job (``wait=true``, an event stream) then gets its answer at once, where uvicorn's graceful shutdown
    would wait for the job to finish (up to the job timeout)."""
    import uvicorn

    class StoppingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.stop_jobs()
            super().handle_exit(sig, frame)

    StoppingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()


def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)


@guarded
@model_flags()
@runtime_flags(quiet=False)
def serve_command(
    method: list[str] = typer.Option(
        None,
        "--method",
        "-m",
        help="Method to load (repeatable, or comma-separated: several are served at once). Default: brushnet.",
    ),
    tiny: bool = typer.Option(
        False, "--tiny", help="Build random tiny models into a temp dir (try the server with no weights)."
    ),
    demo: bool = typer.Option(
        False, "--demo", help="Serve every method on the shipped shapes-world demo models (128x128 scenes)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (default: loopback only)."),
    port: int = typer.Option(7860, "--port", help="TCP port (1-65535)."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest request body, MiB."),
    max_pixels: int = typer.Option(4096 * 4096, "--max-pixels", help="Largest image, width x height."),
    max_queue: int = typer.Option(32, "--max-queue", help="Most waiting jobs; more answer 429."),
    job_timeout: float = typer.Option(600.0, "--job-timeout", help="Longest a job may run, seconds."),
    history: int = typer.Option(100, "--history", help="Finished jobs kept in memory."),
    max_result_mb: float = typer.Option(
        2048.0, "--max-result-mb", help="Result images kept in memory, MiB (least recently used go first)."
    ),
    result_ttl: float = typer.Option(3600.0, "--result-ttl", help="Seconds a finished job's result is kept."),
    allow_origin: list[str] = typer.Option(
        [],
        "--allow-origin",
        help="Browser origin besides the server's own allowed to start jobs (repeatable).",
    ),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn/log level."),
    models: dict = None,
    runtime: Any = None,
) -> None:
    """Serve the inpainting API (/api/v1, docs at /docs) and the web page (/) from one process."""
    from pydantic import ValidationError

    from ..methods import get_method_class

    if not 1 <= port <= 65535:
        fail(f"--port must be between 1 and 65535, got {port}")
    levels = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
    if log_level.lower() not in levels:
        fail(f"unknown --log-level {log_level!r}; choose one of: {', '.join(levels)}")
    level = "DEBUG" if log_level.lower() == "trace" else log_level.upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    runtime.apply()
    if tiny and demo:
        fail("--tiny and --demo are two different model sets: give one")
    method = [name.strip() for given in method or [] for name in given.split(",") if name.strip()]
    from ..service.engine import Engine, Limits

    try:
        limits = Limits(
            max_upload_bytes=int(max_upload_mb * 2**20),
            max_pixels=max_pixels,
            max_queue=max_queue,
            job_timeout_s=job_timeout,
            max_history=history,
            max_result_bytes=int(max_result_mb * 2**20),
            result_ttl_s=result_ttl,
        )
    except ValidationError as exc:
        fail(f"bad limit: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
    if demo:
        from ..demo.assets import DEMO_DIR, METHODS, method_models

        names = list(dict.fromkeys(method or METHODS))
        classes = {name: get_method_class(name) for name in names}
        paths = {name: {**method_models(name, DEMO_DIR), **models} for name in names}
    else:
        names = list(dict.fromkeys(method or ["brushnet"]))
        classes = {name: get_method_class(name) for name in names}  # unknown names fail before any loading
        paths = {name: dict(models) for name in names}
    tmp = None
    try:
        if tiny:
            from ..random_models import build_model_set

            tmp = tempfile.TemporaryDirectory(prefix="brushnet-tiny-")
            # SIGTERM (a service manager's stop) unwinds like Ctrl-C, so the temporary models are removed;
            # uvicorn restores this handler after its graceful shutdown and re-raises the signal to it
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
            typer.echo(f"building tiny random components in {tmp.name} ...")
            needed = {slot for cls in classes.values() for slot in cls.models if slot.name not in models}
            built = build_model_set(Path(tmp.name), needed)
            paths = {name: {**built, **given} for name, given in paths.items()}
        loaded = {name: runtime.load_method(name, paths[name]) for name in names}
        from ..service.api import create_app

        engine = Engine(loaded, limits)
        typer.echo(f"serving {', '.join(loaded)} on http://{host}:{port}/ (API docs at /docs)")
        if models.get("loras"):
            fused = ", ".join(f"{lora['path']} at {lora['scale']:g}" for lora in models["loras"])
            typer.echo(f"with LoRA {fused} fused into each method's UNet")
        app = create_app(engine, allowed_origins=allow_origin, bound_host=host, bound_port=port)
        try:
            _run_server(app, engine, host, port, log_level.lower())
        finally:
            engine.close()
    finally:
        if tmp is not None:
            tmp.cleanup()


set_flag_help(
    serve_command,
    "lora",
    "LoRA fused into the UNet of every served method at SCALE (default 1.0): a .safetensors file, a folder "
    "holding one or a hub id, of the base's family (repeatable; applied in order). Recorded in every result.",
)
# the guide ControlNet's shared help points to --control-image, which serve lacks: here each job sends it
set_flag_help(
    serve_command,
    "guide_controlnet",
    "Optional ControlNet of the base's family (pose, depth, edges, ...) that steers brushnet's fill; every "
    "brushnet job then sends its control image (the request's control_image field; an upload on the page).",
)
