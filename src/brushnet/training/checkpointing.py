"""Checkpoints: ``output_dir/checkpoint-<step>/``, written atomically, rotated, found again for resuming.

A checkpoint folder holds

- the accelerate state (``accelerator.save_state``: trained weights, optimizer, LR scheduler, every
  process's global RNG states, the EMA registered for checkpointing);
- ``brushnet/``: the branch in diffusers format, loadable as is with ``BrushNetModel.from_pretrained``;
- ``ema/``: the EMA weights in the same format (only with ``--use_ema``);
- ``training_state.json``: the global step and each process's position in the data stream;
- ``train_config.yaml``: the resolved configuration of the run that wrote it (seed, prediction type and
  mixed precision filled in), so a checkpoint says how it was made wherever it is copied;
- ``process_state_<i>.pt``: each process's own random generator (noise, timesteps, caption dropout).

Writing goes to ``checkpoint-<step>.tmp-<pid>/``, renamed to ``checkpoint-<step>/`` with ``os.replace`` only
once everything is on disk, so a crash mid-save never leaves a folder that looks complete. Old checkpoints
are removed only after a successful save; ``latest`` only sees complete folders.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

__all__ = [
    "TRAINING_STATE_FILE",
    "CONFIG_FILE",
    "full_branch",
    "list_checkpoints",
    "resolve_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "rotate_checkpoints",
    "remove_stale_partial_checkpoints",
]

logger = logging.getLogger(__name__)

TRAINING_STATE_FILE = "training_state.json"
CONFIG_FILE = "train_config.yaml"
_COMPLETE = re.compile(r"^checkpoint-(\d+)$")
_PARTIAL = re.compile(r"^checkpoint-\d+\.tmp-\d+$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir`` as ``(step, path)``, oldest first. ``.tmp`` folders are ignored."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _COMPLETE.match(path.name)
        if match and path.is_dir() and (path / TRAINING_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(output_dir: str | os.PathLike, value: str | None) -> Path | None:
    """The folder ``--resume_from_checkpoint`` refers to.

    Args:
        output_dir: the run's output folder (searched for ``latest``).
        value: ``None``, ``"latest"`` (newest complete checkpoint, or ``None`` when there is none yet: a
            fresh start), or a path to a checkpoint folder (absolute, or relative to ``output_dir``).

    Raises:
        FileNotFoundError: an explicit path that is not a complete checkpoint.
    """
    if value is None:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("no checkpoint in %s yet: starting a fresh run", output_dir)
            return None
        return checkpoints[-1][1]
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / value
    if not (path / TRAINING_STATE_FILE).is_file():
        raise FileNotFoundError(f"{value} is not a complete checkpoint folder (no {TRAINING_STATE_FILE})")
    return path


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints; returns the deleted folders."""
    checkpoints = list_checkpoints(output_dir)
    removed = [path for _, path in checkpoints[: max(len(checkpoints) - keep, 0)]]
    for path in removed:
        logger.info("removing old checkpoint %s", path)
        shutil.rmtree(path)
    return removed


def remove_stale_partial_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete ``checkpoint-<step>.tmp-<pid>`` folders a crashed earlier run left behind."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    stale = [p for p in output_dir.iterdir() if _PARTIAL.match(p.name) and p.is_dir()]
    for path in stale:
        logger.warning("removing incomplete checkpoint %s left by an interrupted save", path)
        shutil.rmtree(path)
    return stale


def full_branch(accelerator, model):
    """The branch with all its weights, for saving: on the main process, ``None`` elsewhere.

    Call on every process: under FSDP and DeepSpeed gathering the weights is collective. Otherwise the
    unwrapped model itself is returned (no copy).
    """
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return unwrapped if accelerator.is_main_process else None
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    branch = type(unwrapped).from_config(unwrapped.config)
    branch.load_state_dict(state_dict)
    return branch


def _save_diffusers_model(model, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    brushnet,
    training_state: dict,
    process_state: dict | None = None,
    ema=None,
    total_limit: int | None = None,
    config=None,
) -> Path:
    """Save ``checkpoint-<step>/`` atomically, then rotate. Call on every process.

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (the model, optimizer and scheduler prepared by it).
        output_dir: the run's output folder.
        step: the global (optimizer) step.
        brushnet: the branch with its full weights on the main process (:func:`full_branch`).
        training_state: JSON-serialisable state of the run (global step, data positions), from the main process.
        process_state: this process's own state (``torch.save``-able; e.g. its random generator), saved by
            every process as ``process_state_<index>.pt`` (accelerate saves registered objects from the main
            process only).
        ema: the ``diffusers.training_utils.EMAModel`` of the branch, or ``None``.
        total_limit: keep only this many newest checkpoints (``None``: keep all).
        config: the run's resolved :class:`~brushnet.training.config.TrainConfig`, saved as ``train_config.yaml``
            in the checkpoint (``None``: not saved).

    Returns:
        The final checkpoint folder.
    """
    from accelerate.utils import broadcast_object_list

    output_dir = Path(output_dir)
    owner = [os.getpid()]
    if accelerator.num_processes > 1:
        broadcast_object_list(owner)  # every process writes into the main process's temporary folder
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f"checkpoint-{step}.tmp-{owner[0]}"
    if accelerator.is_main_process:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(partial))
    if process_state is not None:
        torch.save(process_state, partial / f"process_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()  # every process's files are written before the rename
    if accelerator.is_main_process:
        _save_diffusers_model(brushnet, partial / "brushnet")
        if ema is not None:
            parameters = list(brushnet.parameters())
            ema.store(parameters)
            ema.copy_to(parameters)
            try:
                _save_diffusers_model(brushnet, partial / "ema")
            finally:
                ema.restore(parameters)
        if config is not None:
            from .config import save_config

            save_config(config, partial / CONFIG_FILE)
        (partial / TRAINING_STATE_FILE).write_text(json.dumps(training_state, indent=2))
        if final.exists():  # a checkpoint of the same step from an earlier, abandoned run
            shutil.rmtree(final)
        os.replace(partial, final)
        logger.info("saved checkpoint %s", final)
        if total_limit is not None:
            rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike) -> tuple[dict, dict | None]:
    """Restore the accelerate state from ``path``.

    Returns:
        ``(training_state, process_state)``: the ``training_state.json`` and this process's own state
        (``None`` when the checkpoint has none for it).
    """
    path = Path(path)
    accelerator.load_state(str(path))
    training_state = json.loads((path / TRAINING_STATE_FILE).read_text())
    process_file = path / f"process_state_{accelerator.process_index}.pt"
    process_state = torch.load(process_file, weights_only=True) if process_file.is_file() else None
    return training_state, process_state
