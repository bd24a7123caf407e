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


def test_markers_sort_core_extra_and_other_platforms_requirements(monkeypatch):
    """Which declared requirement is core, whose extra it is, and which is skipped (the dev extra's, another
    platform's) comes from its marker, as pip reads it: a platform-only requirement of this platform is core."""
    import importlib.metadata
    import sys

    from brushnet.cli import env

    here, there = sys.platform, "nowhere-os"
    declared = [
        "torch>=2.1",
        f'colorama>=0.4; sys_platform == "{here}"',
        f'pywin-thing>=1; sys_platform == "{there}"',
        'fastapi<1,>=0.100; extra == "serve"',
        f'accelerate>=1; extra == "train" and sys_platform == "{here}"',
        'pytest>=8; extra == "dev"',
        f'bitsy>=2; extra == "train" and sys_platform == "{there}"',
    ]
    real = importlib.metadata.requires
    monkeypatch.setattr(
        importlib.metadata, "requires", lambda name: declared if name == "brushnet" else real(name)
    )
    assert env._requirements() == [
        ("torch", ">=2.1", None),
        ("colorama", ">=0.4", None),
        ("fastapi", ">=0.100,<1", "serve"),
        ("accelerate", ">=1", "train"),
    ]
