"""``python -m brushnet.train`` / ``accelerate launch -m brushnet.train``: train a BrushNet branch.

Takes the same flags as ``brushnet train`` (see ``--help`` and docs/training.md); the code is
:func:`brushnet.training.entry.main`.
"""

from __future__ import annotations

import sys

from .training.entry import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
