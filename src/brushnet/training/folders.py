"""Whole folders written, replaced and removed so that a crash at any instant loses no complete copy: the
training checkpoints and the final export.

While a folder ``<name>`` changes, these names are used next to it (``<pid>``: the writing process):

- ``<name>.tmp-<pid>``: being written; incomplete. :func:`recover` removes it.
- ``<name>.new-<pid>``: complete, about to become ``<name>``. :func:`recover` finishes the move (replacing
  ``<name>`` if it exists).
- ``<name>.old-<pid>``: the complete previous ``<name>``, moved aside for an instant. :func:`recover` puts it
  back when ``<name>`` is missing (and no ``.new`` copy exists), else removes it.
- ``<name>.del-<pid>``: being deleted. :func:`recover` removes it.

Every change of state is one ``os.replace`` of a folder (atomic within a file system), and a folder is
deleted only after it was renamed to ``.del``, so at every instant a complete copy exists under ``<name>``
or a ``.new``/``.old`` name, and no half-deleted folder ever carries a name that looks complete. The
files are flushed to the disk (:func:`fsync_tree`) before a folder is marked complete, so this holds after a
power cut too.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["staging_path", "fsync_tree", "publish", "remove", "recover"]

logger = logging.getLogger(__name__)

_TRANSIENT = re.compile(r"^(?P<name>.+)\.(?P<kind>tmp|new|old|del)-(?P<pid>\d+)$")


def _sibling(path: Path, kind: str) -> Path:
    match = _TRANSIENT.match(path.name)
    base = match["name"] if match else path.name  # checkpoint-4.old-7 is deleted as checkpoint-4.del-...
    if kind == "del":
        return path.with_name(f"{base}.del-{os.getpid()}{time.monotonic_ns()}")  # several may be under way
    return path.with_name(f"{base}.{kind}-{os.getpid()}")


def staging_path(final: str | os.PathLike) -> Path:
    """Where to write the new content of ``final`` before :func:`publish` (``<name>.tmp-<pid>``)."""
    return _sibling(Path(final), "tmp")


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under ``folder``, and the folders themselves, to the disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(path: str | os.PathLike) -> None:
    """Delete the folder ``path``: renamed to ``<name>.del-<pid>`` first, so a crash during the deletion leaves
    only a name :func:`recover` deletes, never a half-deleted folder under a name that looks complete."""
    path = Path(path)
    doomed = _sibling(path, "del")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def publish(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Make the complete folder ``staging`` become ``final``, replacing what is there.

    ``staging`` → ``<final>.new-<pid>`` (now marked complete); an existing ``final`` → ``<final>.old-<pid>``;
    ``.new`` → ``final``; the ``.old`` copy is deleted last. A crash between any two steps is finished by
    :func:`recover`, which then yields the new folder (or, before ``.new`` existed, the old one).
    """
    staging, final = Path(staging), Path(final)
    pending = _sibling(final, "new")
    if pending.exists():
        remove(pending)
    os.replace(staging, pending)
    retired = None
    if final.exists():
        retired = _sibling(final, "old")
        if retired.exists():
            remove(retired)
        os.replace(final, retired)
    os.replace(pending, final)
    if retired is not None:
        remove(retired)
    return final


def recover(parent: str | os.PathLike, accept: Callable[[str], bool]) -> list[str]:
    """Finish or undo what a crashed process left under ``parent`` for folders whose name ``accept`` approves.

    Returns:
        One line per action taken (also logged).
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found: dict[str, dict[str, list[Path]]] = {}
    for path in parent.iterdir():
        match = _TRANSIENT.match(path.name)
        if match and path.is_dir() and accept(match["name"]):
            found.setdefault(match["name"], {}).setdefault(match["kind"], []).append(path)
    actions = []

    def act(message: str) -> None:
        logger.warning("%s", message)
        actions.append(message)

    for name, kinds in sorted(found.items()):
        final = parent / name
        for path in kinds.get("tmp", []):
            remove(path)
            act(f"removed {path.name}: a save interrupted before it was complete")
        for path in kinds.get("del", []):
            shutil.rmtree(path)
            act(f"removed {path.name}: an interrupted deletion")
        new = sorted(kinds.get("new", []), key=lambda p: p.stat().st_mtime)
        for path in new[:-1]:
            remove(path)
            act(f"removed {path.name}: an older complete copy of {name}")
        if new:
            if final.exists():
                remove(final)
            os.replace(new[-1], final)
            act(f"finished an interrupted save: {new[-1].name} -> {name}")
        for path in kinds.get("old", []):
            if final.exists():
                remove(path)
                act(f"removed {path.name}: the previous {name}, already replaced")
            else:
                os.replace(path, final)
                act(f"restored {name} from {path.name}: its replacement was interrupted")
    return actions
