"""``brushnet serve``: the API and the web page in one process.

Only typer and the standard library are imported at module level, so ``--help`` is instant.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import threading
import time
from pathlib import Path

import typer

__all__ = ["serve_command", "build_tiny_models", "BackgroundServer"]


class BackgroundServer:
    """Serve ``app`` with uvicorn on a free loopback port in a daemon thread (tests, load script).

    Usage::

        with BackgroundServer(create_app(engine)) as server:
            httpx.get(server.url + "/api/v1/health")
    """

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def build_tiny_models(out_dir: str | Path, with_baselines: bool = True) -> dict[str, str]:
    """Write random tiny components (seeded) into ``out_dir``; return ModelPaths fields pointing at them."""
    from ..random_models import build_base, build_brushnet, build_controlnet, build_inpaint_model

    out = Path(out_dir)
    base = build_base(out / "base", "tiny")
    paths = {"base": str(base), "brushnet": str(build_brushnet(out / "brushnet", base))}
    if with_baselines:
        paths["inpaint_model"] = str(build_inpaint_model(out / "inpaint", base))
        paths["controlnet"] = str(build_controlnet(out / "controlnet", base))
    return paths


def serve_command(
    method: list[str] = typer.Option(
        ["brushnet"], "--method", "-m", help="Method to load (repeatable: several are served at once)."
    ),
    base: str | None = typer.Option(
        None, "--base", help="SD1.5 base: diffusers folder, hub id or .safetensors."
    ),
    brushnet: str | None = typer.Option(None, "--brushnet", help="BrushNet checkpoint folder or hub id."),
    inpaint_model: str | None = typer.Option(
        None, "--inpaint-model", help="SD inpainting model (9-channel)."
    ),
    controlnet: str | None = typer.Option(None, "--controlnet", help="SD1.5 inpaint ControlNet."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle-based weights."),
    tiny: bool = typer.Option(
        False, "--tiny", help="Build random tiny components into a temp dir (try the server with no weights)."
    ),
    device: str = typer.Option("cpu", "--device", help="Torch device for every method (cpu, cuda, cuda:1)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (default: loopback only)."),
    port: int = typer.Option(7860, "--port", help="TCP port."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest request body, MiB."),
    max_pixels: int = typer.Option(4096 * 4096, "--max-pixels", help="Largest image, width x height."),
    max_queue: int = typer.Option(32, "--max-queue", help="Most waiting jobs; more answer 429."),
    job_timeout: float = typer.Option(600.0, "--job-timeout", help="Longest a job may run, seconds."),
    history: int = typer.Option(100, "--history", help="Finished jobs kept in memory."),
    result_ttl: float = typer.Option(3600.0, "--result-ttl", help="Seconds a finished job's result is kept."),
    allow_origin: list[str] = typer.Option(
        [],
        "--allow-origin",
        help="Browser origin besides the server's own allowed to start jobs (repeatable).",
    ),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn/log level."),
) -> None:
    """Serve the inpainting API (/api/v1, docs at /docs) and the web page (/) from one process."""
    import uvicorn

    from ..image import InputError
    from ..methods import ModelPaths, load_method
    from .api import create_app
    from .engine import Engine, Limits

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    names = list(dict.fromkeys(method))
    try:
        limits = Limits(
            max_upload_bytes=int(max_upload_mb * 2**20),
            max_pixels=max_pixels,
            max_queue=max_queue,
            job_timeout_s=job_timeout,
            max_history=history,
            result_ttl_s=result_ttl,
        )
    except ValueError as exc:
        typer.echo(f"error: bad limit: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}", err=True)
        raise typer.Exit(2) from None
    paths = {"base": base, "brushnet": brushnet, "inpaint_model": inpaint_model, "controlnet": controlnet}
    tmp = None
    if tiny:
        tmp = tempfile.TemporaryDirectory(prefix="brushnet-tiny-")
        typer.echo(f"building tiny random components in {tmp.name} ...")
        built = build_tiny_models(tmp.name, with_baselines=names != ["brushnet"])
        paths = {k: v if v is not None else built.get(k) for k, v in paths.items()}
    try:
        model_paths = ModelPaths(**paths, allow_pickle=allow_pickle)
        methods = {name: load_method(name, model_paths, device=device, dtype=dtype) for name in names}
    except (InputError, OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    engine = Engine(methods, limits)
    typer.echo(f"serving {', '.join(methods)} on http://{host}:{port}/ (API docs at /docs)")
    try:
        uvicorn.run(
            create_app(engine, allowed_origins=allow_origin),
            host=host,
            port=port,
            log_level=log_level.lower(),
        )
    finally:
        engine.close()
        if tmp is not None:
            tmp.cleanup()
