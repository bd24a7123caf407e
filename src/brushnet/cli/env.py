"""``brushnet env``: what a bug report needs, and whether the installed packages fit brushnet's requirements."""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

import typer

from .common import available_cpus, guarded

# the extras whose packages are checked when installed (the dev extra's test tools are not worth a line)
_EXTRAS = ("serve", "train")
_ALSO_SHOWN = (
    "peft",
    "xformers",
    "torchvision",
    "bitsandbytes",
)  # optional: change what composes with diffusers


def _requirements() -> list[tuple[str, str, str | None]]:
    """``(name, specifier, extra or None)`` for brushnet's declared requirements (its installed metadata)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        declared = requires("brushnet") or []
    except PackageNotFoundError:  # run from a source tree that was not installed
        return []
    found = []
    for line in declared:
        requirement = Requirement(line)
        extra = None
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            # not a core requirement here: one of the checked extras', or another extra's (dev) or platform's
            extra = next((e for e in _EXTRAS if requirement.marker.evaluate({"extra": e})), None)
            if extra is None:
                continue
        # floors first: ">=0.39,<0.43"
        specifier = ",".join(
            sorted(map(str, requirement.specifier), key=lambda s: (not s.startswith(">"), s))
        )
        found.append((requirement.name, specifier, extra))
    return found


def _installed(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    """The environment as data: versions, devices, the Hugging Face cache, and the requirements that do not hold."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    import brushnet

    packages, problems = {}, []
    for name, specifier, extra in _requirements():
        installed = _installed(name)
        entry = {"version": installed, "required": specifier or None, "extra": extra}
        if installed is None:
            if extra is None:
                problems.append(f"{name} is not installed: pip install '{name}{specifier}'")
        else:
            try:
                fits = Version(installed) in SpecifierSet(specifier, prereleases=True)
            except InvalidVersion:
                fits = True
            if not fits:
                problems.append(f"{name} {installed} is outside {specifier}: pip install '{name}{specifier}'")
        entry["ok"] = installed is not None and not any(p.startswith(f"{name} ") for p in problems)
        packages[name] = entry
    for name in _ALSO_SHOWN:
        packages.setdefault(name, {"version": _installed(name), "required": None, "extra": "optional"})

    import torch

    devices: dict[str, Any] = {"cpus_usable": available_cpus(), "torch_threads": torch.get_num_threads()}
    devices["cuda"] = torch.version.cuda
    devices["cuda_devices"] = (
        [
            f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
            for i in range(torch.cuda.device_count())
        ]
        if torch.cuda.is_available()
        else []
    )
    devices["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())

    from huggingface_hub import constants

    return {
        "brushnet": {"version": brushnet.__version__, "path": os.path.dirname(brushnet.__file__)},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "devices": devices,
        "packages": packages,
        "hub": {"cache": constants.HF_HUB_CACHE, "offline": bool(constants.HF_HUB_OFFLINE)},
        "problems": problems,
    }


def _text(info: dict[str, Any]) -> str:
    devices = info["devices"]
    if devices["cuda_devices"]:
        accel = f"CUDA {devices['cuda']}: {', '.join(devices['cuda_devices'])}"
    elif devices["cuda"]:
        accel = f"CUDA {devices['cuda']} build, no CUDA device visible"
    else:
        accel = "CPU build (no CUDA)"
    if devices["mps"]:
        accel += "; MPS available"
    width = max(len(name) for name in ("brushnet", "hub cache", *info["packages"])) + 2
    lines = [
        f"{'brushnet':<{width}}{info['brushnet']['version']}  ({info['brushnet']['path']})",
        f"{'python':<{width}}{info['python']}  ({info['platform']})",
        f"{'devices':<{width}}{accel}; CPUs usable: {devices['cpus_usable']}, torch threads: "
        f"{devices['torch_threads']}",
    ]
    for name, entry in info["packages"].items():
        if entry["version"] is None:
            state = "not installed" + (f" ({entry['extra']})" if entry["extra"] else "")
        else:
            state = entry["version"]
            if entry["required"]:
                state += f"  {'ok' if entry.get('ok') else 'OUTSIDE'} {entry['required']}"
            if entry["extra"]:
                state += f"  ({entry['extra']})"
        lines.append(f"{name:<{width}}{state}")
    hub = info["hub"]
    lines.append(f"{'hub cache':<{width}}{hub['cache']}; offline mode {'on' if hub['offline'] else 'off'}")
    lines += [f"problem: {p}" for p in info["problems"]]
    return "\n".join(lines)


@guarded
def env_command(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Versions, devices and the Hugging Face cache, for a bug report; exit 1 if an installed package does not
    fit brushnet's requirements (each named, with the pip command that fixes it)."""
    info = collect()
    typer.echo(json.dumps(info, indent=2) if as_json else _text(info))
    if info["problems"]:
        raise typer.Exit(1)
