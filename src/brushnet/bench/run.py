"""Entry point for ``accelerate launch -m brushnet.bench.run [brushnet bench run options]``.

Each process takes items ``i`` with ``i % num_processes == process_index``; the main process merges the
reports once every process is done.
"""

from __future__ import annotations

import sys


def main() -> None:
    from .cli import app

    app(args=["run", *sys.argv[1:]], prog_name="brushnet.bench.run")


if __name__ == "__main__":
    main()
