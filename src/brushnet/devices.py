"""Devices by name, checked before any model is loaded."""

from __future__ import annotations

from typing import Any

from .errors import InputError

__all__ = ["DeferredLosses", "resolve_device", "to_device"]


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


def to_device(tensor: Any, device: Any, dtype: Any = None) -> Any:
    """``tensor`` on ``device`` (then in ``dtype``, when given), without making the host wait for the device.

    A blocking copy from ordinary host memory to a CUDA device waits until everything queued on the device
    has run, so a training step that moves its batch, noise or token ids that way cannot prepare its work
    while the previous step's runs. A CPU tensor bound for CUDA is therefore copied from page-locked memory
    with ``non_blocking=True`` (the caching host allocator keeps that memory until the copy is done); every
    other move is ``Tensor.to`` as usual. The values are the same either way; only the order of host and
    device work changes.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        tensor = tensor.to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    return tensor if dtype is None else tensor.to(dtype)


class DeferredLosses:
    """Per-step losses kept on their device and read into :attr:`losses` (floats) in batches.

    Reading each step's loss as it comes (``.item()``) makes the host wait for the device at the end of every
    step. :meth:`add` keeps the tensor instead and reads the batch once ``every`` are waiting; :meth:`read` reads
    what is waiting (for a log line, a checkpoint, the end of a run) and returns the whole list.
    """

    def __init__(self, losses: list[float] | None = None, every: int = 100):
        self.losses = [] if losses is None else losses
        self.every = every
        self._unread: list = []

    def add(self, loss: Any) -> None:
        self._unread.append(loss.detach())
        if len(self._unread) >= self.every:
            self.read()

    def read(self) -> list[float]:
        if self._unread:
            import torch

            self.losses.extend(torch.stack(self._unread).tolist())
            self._unread.clear()
        return self.losses
