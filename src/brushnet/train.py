"""``python -m brushnet.train`` / ``accelerate launch -m brushnet.train``: train a BrushNet branch.

Takes the same flags as ``brushnet train`` (see ``--help`` and docs/training.md).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parse flags, train, and turn a configuration error into a one-line message and exit status 2."""
    from .training.config import ConfigError, parse_train_args

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_train_args(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from .training.loop import train

    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
