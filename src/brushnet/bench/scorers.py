"""Extra per-image scorers of ``brushnet bench run --score NAME``, beside the paper's metrics.

A scorer is ``scorer(image, item, mask_kind) -> {column: value}``: ``image`` one output (PIL, at the item's
size), ``item`` the :class:`~brushnet.bench.datasets.BenchItem`, ``mask_kind`` ``"inside"`` or ``"outside"``.
Scorers are named here or given as ``module:function``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ..errors import InputError

__all__ = ["SCORERS", "get_scorer"]

SCORERS: dict[str, str] = {
    "shapes": "brushnet.data.shapes_metrics:text_alignment",
    "removal": "brushnet.data.shapes_metrics:removal",
}
"""Named scorers: ``shapes`` = the shapes world's prompted colour and shape in the hole (``colour_ok``,
``shape_ok``, and ``colour_hole_ok``/``shape_hole_ok`` on the hole pasted into the original); ``removal`` = the
shapes world's object removal: no object colour left in the hole (``removed``, ``object_fraction``)."""


def get_scorer(name: str) -> Callable[..., dict[str, Any]]:
    """The scorer ``name`` (a key of :data:`SCORERS` or ``module:function``).

    Raises:
        InputError: unknown name or unimportable target.
    """
    target = SCORERS.get(name, name)
    module_name, _, attribute = target.partition(":")
    if not attribute:
        raise InputError(f"unknown scorer {name!r}; choose one of: {', '.join(SCORERS)} (or module:function)")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot load scorer {name!r} ({target}): {exc}") from None
