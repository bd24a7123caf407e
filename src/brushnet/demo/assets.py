"""Where the shipped shapes-world models live, and the model paths each method loads from them."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEMO_DIR", "METHODS", "method_models"]

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_world"
"""The shipped folder: ``base/`` (diffusers Stable Diffusion layout), ``brushnet/``, ``inpaint/`` (a
9-channel inpainting pipeline folder), ``controlnet/`` and ``training_record.json``."""

METHODS: tuple[str, ...] = (
    "brushnet",
    "blended-latent-diffusion",
    "sd-inpainting",
    "controlnet-inpaint",
    "repaint",
)
"""Every method of :mod:`brushnet.methods`, in the order the demo grid and the tables show them."""


def method_models(method: str, root: str | os.PathLike | None = None) -> dict[str, str]:
    """The :class:`~brushnet.methods.base.ModelPaths` fields of ``method`` for the demo models under ``root``.

    Args:
        method: a name of :data:`METHODS`.
        root: the models folder; default :data:`DEMO_DIR`.

    Raises:
        ValueError: unknown method.
    """
    root = Path(root) if root is not None else DEMO_DIR
    base = str(root / "base")
    if method == "brushnet":
        return {"base": base, "brushnet": str(root / "brushnet")}
    if method == "sd-inpainting":
        return {"inpaint_model": str(root / "inpaint")}
    if method == "controlnet-inpaint":
        return {"base": base, "controlnet": str(root / "controlnet")}
    if method in ("blended-latent-diffusion", "repaint"):
        return {"base": base}
    raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
