"""Honour the hooks that accelerate and diffusers put on a module's ``forward`` when code drives its submodules.

BrushNet's injection (:func:`~brushnet.models.unet_injection.unet_forward_with_brushnet`) runs a stock UNet by
calling its submodules, so the UNet's own ``forward`` is never called. Offloading and caching tools hang their
work on that ``forward``: accelerate's model CPU offload (``_hf_hook``: move the model to the accelerator, offload
the previous one), the top-level hook of its sequential offload, and diffusers' group offloading
(``_diffusers_hook``: onload a group of blocks before its first module runs, offload it after its last). The
functions here fire exactly those pre/post callbacks around the code that stands in for ``forward``, so every
such hook sees one call per evaluation, as if the module had been called. Nothing is patched or rebound.

Hooks that replace ``forward`` itself (diffusers' caching hooks: first-block cache, pyramid attention broadcast,
...) cannot be honoured without calling that ``forward``; a module carrying one is refused with one line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["run_hooked", "block_hooks", "unwrap_compiled"]


def unwrap_compiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``torch.compile`` wrapper (``OptimizedModule``), or ``module`` itself."""
    return getattr(module, "_orig_mod", module)


def _diffusers_hooks(module: torch.nn.Module) -> list:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or not registry._hook_order:
        return []
    hooks = [registry.hooks[name] for name in registry._hook_order]
    for name, hook in zip(registry._hook_order, hooks):
        if hasattr(hook, "new_forward"):
            raise NotImplementedError(
                f"{type(module).__name__} carries diffusers hook {name!r}, which replaces its forward; BrushNet "
                "drives the UNet's submodules and cannot run it (offloading and layerwise casting work)"
            )
    return hooks


def run_hooked(module: torch.nn.Module, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``function(*args, **kwargs)`` in place of ``module.forward``, firing the module's forward hooks around it.

    The order is the one the wrapped ``forward`` would run: the hook registered last is outermost (diffusers'
    registry, then accelerate's ``_hf_hook``, which is installed over it). Arguments pass through the hooks'
    ``pre_forward`` (which may move them to the execution device) and the result through ``post_forward``.

    Args:
        module: the module whose hooks fire (e.g. the UNet).
        function: what stands in for its ``forward``.
    """
    hooks = _diffusers_hooks(module)
    accelerate_hook = getattr(module, "_hf_hook", None)
    if accelerate_hook is not None:
        args, kwargs = accelerate_hook.pre_forward(module, *args, **kwargs)
    for hook in reversed(hooks):  # the last registered wraps the others
        args, kwargs = hook.pre_forward(module, *args, **kwargs)
    output = function(*args, **kwargs)
    for hook in hooks:
        output = hook.post_forward(module, output)
    if accelerate_hook is not None:
        output = accelerate_hook.post_forward(module, output)
    return output


@contextlib.contextmanager
def block_hooks(block: torch.nn.Module) -> Iterator[None]:
    """Fire ``block``'s hooks around code that runs the block's submodules instead of its ``forward``.

    Used for the blocks BrushNet iterates resnet by resnet (the UNet's down and up blocks, the branch's up
    blocks), so block-level group offloading onloads a block before it runs and offloads it after. The block's
    inputs are already on the execution device (the caller's own hooks put them there), so the hooks see no
    arguments. A block without hooks costs one attribute look-up.
    """
    hooks = _diffusers_hooks(block)
    accelerate_hook = getattr(block, "_hf_hook", None)
    if not hooks and accelerate_hook is None:
        yield
        return
    if accelerate_hook is not None:
        accelerate_hook.pre_forward(block)
    for hook in reversed(hooks):
        hook.pre_forward(block)
    yield
    for hook in hooks:
        hook.post_forward(block, None)
    if accelerate_hook is not None:
        accelerate_hook.post_forward(block, None)
