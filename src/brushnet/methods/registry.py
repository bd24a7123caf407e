"""The registry of methods, keyed by name. Built-in methods import lazily, on first use."""

from __future__ import annotations

import importlib

import torch

from ..image import InputError
from .base import InpaintMethod, ModelPaths

__all__ = ["register_method", "available_methods", "get_method_class", "load_method"]

# name -> module that defines (and registers) it
_BUILTIN: dict[str, str] = {
    "brushnet": "brushnet.methods.brushnet_method",
    "sd-inpainting": "brushnet.methods.sd_inpainting",
    "blended-latent-diffusion": "brushnet.methods.blended_latent",
    "repaint": "brushnet.methods.repaint",
    "controlnet-inpaint": "brushnet.methods.controlnet_inpaint",
}
_REGISTRY: dict[str, type[InpaintMethod]] = {}


def register_method(cls: type[InpaintMethod]) -> type[InpaintMethod]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of every method this installation provides (built-in ones whose module exists, and registered)."""
    names = set(_REGISTRY)
    for name, module in _BUILTIN.items():
        if importlib.util.find_spec(module) is not None:
            names.add(name)
    return sorted(names)


def get_method_class(name: str) -> type[InpaintMethod]:
    if name not in _REGISTRY and name in _BUILTIN:
        try:
            importlib.import_module(_BUILTIN[name])
        except ModuleNotFoundError as exc:
            if exc.name != _BUILTIN[name]:
                raise
    if name not in _REGISTRY:
        raise InputError(f"unknown method {name!r}; choose one of: {', '.join(available_methods())}")
    return _REGISTRY[name]


def load_method(
    name: str, models: ModelPaths | dict, device: str = "cpu", dtype: str | torch.dtype = "fp32"
) -> InpaintMethod:
    """Load method ``name`` with the given model paths (see :class:`ModelPaths`)."""
    if isinstance(models, dict):
        models = ModelPaths(**models)
    method = get_method_class(name).load(models, device=device, dtype=dtype)
    method.models = models
    return method
