"""Where the shipped shapes-world models live, and the model paths each method loads from them."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEMO_DIR", "METHODS", "method_models"]

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_world"
"""The shipped model set: one folder per model slot (``base/``, ``brushnet/``, ``inpaint/``, ``controlnet/``,
``powerpaint/``; see :class:`~brushnet.methods.ModelSlot`), and ``training_record.json``."""

METHODS: tuple[str, ...] = (
    "brushnet",
    "blended-latent-diffusion",
    "sd-inpainting",
    "controlnet-inpaint",
    "repaint",
    "hd-painter",
    "powerpaint",
)
"""The methods the demo shows, in the order of its grid and tables."""


def method_models(method: str, root: str | os.PathLike | None = None) -> dict[str, str]:
    """The :class:`~brushnet.methods.ModelPaths` fields of ``method`` in the model set ``root`` (default
    :data:`DEMO_DIR`): each model slot the method declares, at the slot's folder.

    Raises:
        InputError: unknown method.
    """
    from ..methods.registry import get_method_class

    root = Path(root) if root is not None else DEMO_DIR
    cls = get_method_class(method)
    return {slot.name: str(root / slot.folder) for slot in cls.models if slot.folder is not None}
