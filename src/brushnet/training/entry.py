"""The training command's body, shared by ``brushnet train``, ``python -m brushnet.train`` and
``accelerate launch -m brushnet.train`` (see ``--help`` and docs/training.md).
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["main", "bound_threads"]


def bound_threads() -> int:
    """Give torch this process's share of the CPUs: ``OMP_NUM_THREADS`` when set, else the CPUs available to the
    process (affinity, cgroup quota) divided among the processes of this machine (``LOCAL_WORLD_SIZE``, set by
    ``accelerate launch``/``torchrun``); one inter-op thread. Returns the intra-op thread count."""
    import torch

    from ..cli.common import available_cpus

    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        threads = int(env)
    else:
        local = os.environ.get("LOCAL_WORLD_SIZE", "")
        threads = max(1, available_cpus() // (int(local) if local.isdigit() and int(local) > 0 else 1))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    return threads


def main(argv: list[str] | None = None) -> int:
    """Parse flags and train. A bad configuration, model, checkpoint or data path, or a failed write (a full
    disk), is a one-line message and exit status 2 (``BRUSHNET_DEBUG=1`` shows the traceback)."""
    from ..cli.common import silence_library_noise
    from ..errors import InputError, first_line
    from .config import ConfigError, parse_train_args

    silence_library_noise()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_train_args(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from .data import check_training_data
    from .loop import train

    bound_threads()
    try:
        check_training_data(config)  # before any model loads
        train(config)
    except (InputError, ValueError, OSError) as error:
        if os.environ.get("BRUSHNET_DEBUG"):
            raise
        print(f"error: {first_line(error)}", file=sys.stderr)
        return 2
    return 0
