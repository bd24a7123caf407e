"""The training command's body, shared by ``brushnet train``, ``python -m brushnet.train`` and
``accelerate launch -m brushnet.train`` (see ``--help`` and docs/training.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

__all__ = ["main", "bound_threads", "OutputFolderGuard"]


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
    from .config import ConfigError, check_resolution, parse_train_args

    silence_library_noise()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_train_args(argv)
        check_resolution(config)  # reads the VAE config only
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from .data import check_training_data
    from .loop import train

    bound_threads()
    guard = None
    try:
        check_output_dir(config.output_dir)
        check_training_data(config)  # before any model loads
        guard = OutputFolderGuard(config)
        train(config, on_start=guard.mark_started)
    except (Exception, KeyboardInterrupt) as error:
        if guard is not None:
            guard.undo()  # a run that failed before it trained leaves nothing behind
        if not isinstance(error, (InputError, ValueError, OSError)) or os.environ.get("BRUSHNET_DEBUG"):
            raise
        print(f"error: {first_line(error)}", file=sys.stderr)
        return 2
    return 0


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """Refuse an ``--output_dir`` that is a file, or lies under one, before anything is loaded or written.

    Raises:
        InputError: one line naming the flag and the file.
    """
    from ..errors import InputError
    from ..io import file_in_the_way

    folder = Path(output_dir)
    existing = file_in_the_way(folder)
    if existing == folder:
        raise InputError(f"--output_dir {folder} is a file, not a folder")
    if existing is not None:
        raise InputError(f"--output_dir {folder}: {existing} is a file, not a folder")


class OutputFolderGuard:
    """Undoes what a run refused at startup (bad data, a model that does not fit, a bad checkpoint ...) wrote
    into its output folder: ``train_config.yaml`` and the tracker's folder when this run created them, and the
    output folder itself (with the folders above it this run made) when this run created it and it is empty
    again. Nothing else is touched: not what the folder held before, nor anything else the run wrote (a
    checkpoint, the final model); and only an error before training began counts (the loop calls
    :meth:`mark_started` when its startup checks have passed), so a failed run's tracker logs are kept. Only the
    main process (``RANK`` 0 or unset) undoes anything.

    Pass :meth:`mark_started` as :func:`brushnet.training.loop.train`'s ``on_start``, then call :meth:`undo` on an
    error.
    """

    def __init__(self, config):
        from .checkpointing import CONFIG_FILE

        self.folder = Path(config.output_dir)
        self.before = set(os.listdir(self.folder)) if self.folder.is_dir() else None
        self.created = None  # the top-most folder this run creates
        path = self.folder.absolute()
        while not path.exists() and path != path.parent:
            self.created, path = path, path.parent
        self.startup = {CONFIG_FILE}
        # a resumed run rewrites the config it finds; one refused at startup puts the old one back
        self.config_path = self.folder / CONFIG_FILE
        self.config_before = None
        try:
            self.config_before = self.config_path.read_bytes()
        except OSError:
            pass
        tracker = Path(config.logging_dir)
        if not tracker.is_absolute() and tracker.parts and tracker.parts[0] not in (".", ".."):
            self.startup.add(tracker.parts[0])
        self.started = False

    def mark_started(self) -> None:
        """The run passed its startup checks: from here on, what it wrote is kept."""
        self.started = True

    def undo(self) -> list[Path]:
        """Remove what this run wrote at startup, as described above, and put back the ``train_config.yaml`` it
        replaced (a refused resume). Returns the paths removed."""
        if self.started or os.environ.get("RANK", "0") != "0" or not self.folder.is_dir():
            return []
        new = set(os.listdir(self.folder)) - (self.before or set())
        if not new <= self.startup:  # something else appeared: keep everything
            return []
        if self.config_before is not None:
            from ..io import atomic_write_bytes

            atomic_write_bytes(self.config_path, self.config_before)
        removed = []
        for name in sorted(new):
            path = self.folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        if self.created is not None:  # the empty folders this run made, deepest first
            path = self.folder.absolute()
            while True:
                try:
                    path.rmdir()
                except OSError:
                    break
                removed.append(path)
                if path == self.created:
                    break
                path = path.parent
        return removed
