"""The training command's body, shared by ``brushnet train``, ``python -m brushnet.train`` and
``accelerate launch -m brushnet.train`` (see ``--help`` and docs/training.md).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parse flags, train, and turn a configuration error into a one-line message and exit status 2."""
    from .config import ConfigError, parse_train_args

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_train_args(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from .loop import train

    train(config)
    return 0
