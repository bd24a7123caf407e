"""Devices by name, checked before any model is loaded."""

from __future__ import annotations

from typing import Any

from .errors import InputError

__all__ = ["resolve_device"]


def resolve_device(device: Any) -> Any:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` (or a ``torch.device``) → ``torch.device``, checked.

    Raises:
        InputError: an unknown device name, or a device this machine does not have (one line saying what
            is available).
    """
    import torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise InputError(
                f"--device {device}: CUDA is not available here (torch {torch.__version__}, {build}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise InputError(
                f"--device {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
        return resolved
    if resolved.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"--device {device}: Apple MPS is not available here; use --device cpu")
        return resolved
    raise InputError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
