"""``brushnet serve``: flags reach the engine and the app; bad flags are one line and exit code 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from brushnet.cli import app

runner = CliRunner()


def test_serve_builds_the_app_on_loopback_with_the_limits(tiny_models, monkeypatch):
    from fastapi.testclient import TestClient

    from brushnet.cli import serve

    seen = {}

    def fake_run(asgi_app, engine, host, port, log_level):
        seen.update(host=host, port=port)
        with TestClient(asgi_app, base_url=f"http://{host}:{port}") as client:  # the Host the server answers to
            seen["health"] = client.get("/api/v1/health").json()
            seen["limits"] = client.get("/api/v1/methods").json()["limits"]

    monkeypatch.setattr(serve, "_run_server", fake_run)
    args = ["serve", "--base", str(tiny_models["base"]), "--brushnet", str(tiny_models["brushnet"])]
    result = runner.invoke(app, [*args, "--port", "8123", "--max-queue", "5", "--job-timeout", "30"])
    assert result.exit_code == 0, result.output
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert seen["health"]["methods"] == ["brushnet"] and seen["health"]["status"] == "ok"
    assert seen["limits"]["max_queue"] == 5 and seen["limits"]["job_timeout_s"] == 30.0
    assert seen["limits"]["max_upload_bytes"] == 20 * 2**20


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--max-queue", "0"], "bad limit: max_queue"),
        (["--method", "brushnet"], "needs --base, --brushnet"),
        (["--base", "/no/such/base", "--brushnet", "/no/such/branch"], "/no/such"),
        (["--method", "no-such-method", "--base", "x"], "no-such-method"),
    ],
)
def test_serve_bad_flags_exit_2(args, needle):
    result = runner.invoke(app, ["serve", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output
