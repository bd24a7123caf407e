"""Counting network evaluations, the cost unit every method reports (a CFG pair counts 2)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["CallCounter", "count_backward", "count_calls"]


class CallCounter:
    """Counts single-sample passes through a module (a CFG-doubled batch of 2 counts 2)."""

    def __init__(self) -> None:
        self.samples = 0

    def per_image(self, num_images: int) -> int:
        return self.samples // max(1, num_images)


@contextlib.contextmanager
def count_calls(module: Any) -> Iterator[CallCounter]:
    """Count the samples that go through ``module.forward`` inside the ``with`` block (a forward pre-hook reads
    the batch size of the first tensor argument, positional or ``sample=``)."""
    import torch

    counter = CallCounter()

    def hook(_module, args, kwargs):
        first = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        counter.samples += int(first.shape[0]) if isinstance(first, torch.Tensor) else 1

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


@contextlib.contextmanager
def count_backward(module: Any) -> Iterator[CallCounter]:
    """Count the samples whose gradient flows back through ``module`` inside the ``with`` block (a full backward
    pre-hook reads the batch size of the gradient of the module's output; a CFG-doubled batch of 2 counts 2)."""

    counter = CallCounter()

    def hook(_module, grad_output):
        counter.samples += int(grad_output[0].shape[0])

    handle = module.register_full_backward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()
