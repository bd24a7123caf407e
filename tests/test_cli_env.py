"""``brushnet env``: the versions and devices a bug report needs, and a clear exit 1 when an installed package does
not fit brushnet's declared requirements (an install that breaks was the peers' commonest complaint)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import brushnet
from brushnet.cli import app

runner = CliRunner()


def test_env_reports_versions_devices_and_the_cache():
    import diffusers
    import torch

    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["brushnet", brushnet.__version__]
    assert any(line.split()[:2] == ["torch", torch.__version__] for line in lines)
    assert any(line.split()[:3] == ["diffusers", diffusers.__version__, "ok"] for line in lines)
    assert any(line.startswith("hub cache") for line in lines) and "problem" not in result.output
    info = json.loads(runner.invoke(app, ["env", "--json"]).output)
    assert info["packages"]["diffusers"]["required"] == ">=0.39,<0.43"
    assert info["devices"]["cpus_usable"] >= 1 and info["problems"] == []


def test_a_package_outside_the_requirements_is_named_with_its_fix(monkeypatch):
    from brushnet.cli import env

    real = env._installed
    versions = {"diffusers": "0.35.0", "safetensors": None, "fastapi": None}
    monkeypatch.setattr(env, "_installed", lambda name: versions[name] if name in versions else real(name))
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 1, result.output
    problems = [line for line in result.output.splitlines() if line.startswith("problem: ")]
    assert problems == [
        "problem: diffusers 0.35.0 is outside >=0.39,<0.43: pip install 'diffusers>=0.39,<0.43'",
        "problem: safetensors is not installed: pip install 'safetensors>=0.8'",
    ]  # fastapi belongs to the serve extra: missing is fine
    assert "diffusers         0.35.0  OUTSIDE >=0.39,<0.43" in result.output
