"""Checkpoints: ``output_dir/checkpoint-<step>/``, written atomically, rotated, found again for resuming.

A checkpoint folder holds

- the accelerate state (``accelerator.save_state``): ``model.safetensors`` (trained weights), ``optimizer.bin``,
  ``scheduler.bin`` and every process's ``random_states_<i>.pkl`` (global RNG states);
- ``brushnet/``: the branch in diffusers format, loadable as is with ``BrushNetModel.from_pretrained``;
- ``ema/``: the EMA weights in the same format, and ``ema_state.safetensors`` + ``ema_state.json``: the EMA's
  exact state for resuming (only with ``--use_ema``);
- ``training_state.json``: the global step and each process's position in the data stream;
- ``train_config.yaml``: the resolved configuration of the run that wrote it (seed, prediction type, mixed
  precision and validation guidance filled in), so a checkpoint says how it was made wherever it is copied;
- ``process_state_<i>.safetensors``: each process's own random generator (noise, timesteps, caption dropout).

**Resuming runs no code from the checkpoint.** Everything the project writes itself is safetensors, JSON or
YAML; the pickle files accelerate writes (``optimizer.bin``, ``scheduler.bin``, ``random_states_<i>.pkl``,
``scaler.pt``) are read with ``torch.load(weights_only=True)``, which builds only tensors and plain values
(checked for each file, with a one-line error naming a file that holds anything else). Checkpoints of earlier
versions, whose EMA state was accelerate's ``custom_checkpoint_0.pkl`` (read by accelerate with full pickle),
are read the same safe way. Two cases need ``--allow_pickle``: resuming under FSDP or DeepSpeed (their own
loaders read the checkpoint) and nothing else.

**No crash loses a checkpoint** (see :mod:`brushnet.training.folders`). Writing goes to
``checkpoint-<step>.tmp-<pid>/``; ``training_state.json`` is written last, the files are flushed to the disk,
and only then is the folder moved into place (replacing a same-step checkpoint of an earlier run through a
``.new``/``.old`` pair of names, never deleting the old copy before the new one is in place). Old checkpoints
are renamed to ``.del`` before they are deleted. The next start (:func:`recover_interrupted_saves`) finishes
or undoes whatever a killed process left. A save that fails (a full disk) removes its partial folder and
raises one line; the previous checkpoints are untouched and stay loadable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError, first_line
from ..io import atomic_write_text
from . import folders

__all__ = [
    "TRAINING_STATE_FILE",
    "CONFIG_FILE",
    "full_branch",
    "list_checkpoints",
    "resolve_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "rotate_checkpoints",
    "recover_interrupted_saves",
    "publish_final_model",
]

logger = logging.getLogger(__name__)

TRAINING_STATE_FILE = "training_state.json"
CONFIG_FILE = "train_config.yaml"
EMA_WEIGHTS_FILE = "ema_state.safetensors"
EMA_STATE_FILE = "ema_state.json"
FINAL_MODEL_DIR = "brushnet"
_COMPLETE = re.compile(r"^checkpoint-(\d+)$")
_PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")
_LEGACY_CUSTOM = re.compile(r"^custom_checkpoint_\d+\.pkl$")


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
        CheckpointError: an explicit path that is not a complete checkpoint.
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
        raise CheckpointError(f"{value} is not a complete checkpoint folder (no {TRAINING_STATE_FILE})")
    return path


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int, current: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (by step), never ``current`` (the one just
    saved: after a resume from an earlier checkpoint, the later ones of the abandoned run have higher steps);
    returns the deleted folders. Each is renamed to ``.del`` before it is deleted, so an interrupted deletion never
    leaves a checkpoint that looks complete."""
    checkpoints = list_checkpoints(output_dir)
    others = [path for _, path in checkpoints if current is None or path != Path(current)]
    removed = others[: max(len(checkpoints) - keep, 0)]
    for path in removed:
        logger.info("removing old checkpoint %s", path)
        folders.remove(path)
    return removed


def _is_saved_folder(name: str) -> bool:
    return bool(_COMPLETE.match(name)) or name == FINAL_MODEL_DIR


def recover_interrupted_saves(output_dir: str | os.PathLike) -> list[str]:
    """Finish or undo the checkpoint saves, rotations and final exports a killed run left under ``output_dir``
    (see :mod:`brushnet.training.folders`): incomplete folders are removed, complete ones moved into place.
    Call on the main process before anything looks for checkpoints. Returns what was done, one line each."""
    return folders.recover(output_dir, _is_saved_folder)


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


def _write_json(path: Path, data) -> None:
    """Write JSON atomically (:func:`brushnet.io.atomic_write_text`): the file is whole or absent."""
    atomic_write_text(path, json.dumps(data, indent=2))


def _flatten(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{"a": {"b": tensor}}`` → ``{"a.b": tensor}`` (a process state is tensors only, for safetensors)."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            flat[f"{prefix}{key}"] = value.detach().cpu().contiguous()
        else:
            raise TypeError(
                f"process state {prefix}{key} is a {type(value).__name__}; only tensors are saved"
            )
    return flat


def _unflatten(flat: dict[str, torch.Tensor]) -> dict:
    state: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = state
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return state


def _save_ema_state(ema, folder: Path) -> None:
    from safetensors.torch import save_file

    state = ema.state_dict()
    shadow = {
        f"shadow.{i:05d}": p.detach().cpu().contiguous() for i, p in enumerate(state.pop("shadow_params"))
    }
    save_file(shadow, folder / EMA_WEIGHTS_FILE)
    _write_json(folder / EMA_STATE_FILE, state)


def _save_error(final: Path, exc: BaseException) -> OSError:
    try:
        free = f"; {shutil.disk_usage(final.parent).free / 2**20:.0f} MiB free on its disk"
    except OSError:
        free = ""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
    return OSError(
        f"cannot save {final.name} in {final.parent}: {reason}{free}; the earlier checkpoints are untouched"
    )


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
        process_state: this process's own state, a (nested) dict of tensors (e.g. its random generator's
            state), saved by every process as ``process_state_<index>.safetensors``.
        ema: the ``diffusers.training_utils.EMAModel`` of the branch, or ``None``.
        total_limit: keep only this many newest checkpoints (``None``: keep all).
        config: the run's resolved :class:`~brushnet.training.config.TrainConfig`, saved as ``train_config.yaml``
            in the checkpoint (``None``: not saved).

    Returns:
        The final checkpoint folder.

    Raises:
        OSError: the save failed (a full disk, a read-only folder): one line; the partial folder is removed
            and every earlier checkpoint is left as it was.
    """
    from accelerate.utils import broadcast_object_list
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    owner = [os.getpid()]
    if accelerator.num_processes > 1:
        broadcast_object_list(owner)  # every process writes into the main process's temporary folder
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f"checkpoint-{step}.tmp-{owner[0]}"
    try:
        if accelerator.is_main_process:
            if partial.exists():
                folders.remove(partial)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()

        accelerator.save_state(str(partial))
        if process_state is not None:
            save_file(
                _flatten(process_state), partial / f"process_state_{accelerator.process_index}.safetensors"
            )
        accelerator.wait_for_everyone()  # every process's files are written before the folder is published
        if accelerator.is_main_process:
            _save_diffusers_model(brushnet, partial / "brushnet")
            if ema is not None:
                _save_ema_state(ema, partial)
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
            _write_json(partial / TRAINING_STATE_FILE, training_state)  # last: the folder is complete
            folders.fsync_tree(partial)
            folders.publish(partial, final)
            logger.info("saved checkpoint %s", final)
    except Exception as exc:
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)  # frees the space; nothing complete is lost
        raise _save_error(final, exc) from exc
    if accelerator.is_main_process and total_limit is not None:
        rotate_checkpoints(output_dir, total_limit, current=final)
    accelerator.wait_for_everyone()
    return final


def publish_final_model(model, output_dir: str | os.PathLike) -> Path:
    """Save the trained branch to ``output_dir/brushnet/`` atomically: written beside it, flushed, then moved
    into place (see :mod:`brushnet.training.folders`), so a kill leaves the previous export or the new one,
    never truncated weights."""
    final = Path(output_dir) / FINAL_MODEL_DIR
    staging = folders.staging_path(final)
    if staging.exists():
        folders.remove(staging)
    try:
        _save_diffusers_model(model, staging)
        folders.fsync_tree(staging)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise _save_error(final, exc) from exc
    return folders.publish(staging, final)


# -- resuming ------------------------------------------------------------------------------------------


def _read_training_state(path: Path, num_processes: int) -> dict:
    """``training_state.json``, checked: a global step and one ``[epoch, batch]`` position per process."""
    file = path / TRAINING_STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"cannot resume from {path}: {TRAINING_STATE_FILE} is unreadable ({first_line(exc)})"
        ) from None
    positions = state.get("data_positions") if isinstance(state, dict) else None
    step = state.get("global_step") if isinstance(state, dict) else None

    def is_count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if (
        not is_count(step)
        or not isinstance(positions, list)
        or not positions
        or not all(isinstance(p, list) and len(p) == 2 and all(is_count(v) for v in p) for p in positions)
    ):
        raise CheckpointError(
            f"cannot resume from {path}: {TRAINING_STATE_FILE} is malformed (expected a global_step and one "
            "[epoch, batch] data position per process)"
        )
    if len(positions) != num_processes:
        raise CheckpointError(
            f"{path} was written by {len(positions)} processes; resuming its data stream needs the same number "
            f"(this run has {num_processes})"
        )
    return state


def _load_plain(file: Path):
    """``torch.load`` with ``weights_only=True`` (tensors and plain values; the numpy types accelerate's RNG
    states hold): a file holding anything else is refused with one line, before any of it runs."""
    from accelerate.utils import load

    try:
        try:
            return load(file, map_location="cpu", mmap=True)  # tensors stay on the disk until used
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return load(file, map_location="cpu")  # not torch's zip format: read it whole
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, a truncated zip, a bad magic number ...
        found = re.search(r"unsupported global (\S+)", str(exc), re.IGNORECASE)
        if found:
            raise CheckpointError(
                f"{file} holds more than tensors and plain values (a reference to {found.group(1)}: loading it "
                "could run code); refused"
            ) from None
        raise CheckpointError(f"cannot read {file}: {first_line(exc)}") from None


def _load_ema_state(ema, path: Path, legacy: list[Path]) -> None:
    from safetensors.torch import load_file

    if (path / EMA_WEIGHTS_FILE).is_file():
        try:
            shadow = load_file(path / EMA_WEIGHTS_FILE)
            state = json.loads((path / EMA_STATE_FILE).read_text())
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"cannot read the EMA state in {path}: {first_line(exc)}") from None
        state["shadow_params"] = [shadow[key] for key in sorted(shadow)]
    elif legacy:
        state = _load_plain(legacy[0])  # an earlier version's accelerate custom state, read safely
    else:
        raise CheckpointError(
            f"{path} has no EMA state ({EMA_WEIGHTS_FILE}): it was written without --use_ema"
        )
    if not isinstance(state, dict) or len(state.get("shadow_params") or []) != len(ema.shadow_params):
        raise CheckpointError(f"the EMA state in {path} does not fit this branch")
    try:
        ema.load_state_dict(state)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"the EMA state in {path} is malformed: {first_line(exc)}") from None


def load_checkpoint(
    accelerator, path: str | os.PathLike, ema=None, allow_pickle: bool = False
) -> tuple[dict, dict]:
    """Restore a run from the checkpoint folder ``path``, running no code from it (see the module docstring).

    Args:
        accelerator: the run's accelerator, with the model, optimizer and scheduler prepared.
        path: a complete checkpoint folder.
        ema: the run's ``EMAModel`` (restored from the checkpoint's EMA state), or ``None``.
        allow_pickle: allow resuming under FSDP or DeepSpeed, whose own loaders read the checkpoint with pickle.

    Returns:
        ``(training_state, process_state)``: the checked ``training_state.json`` and this process's own state.

    Raises:
        CheckpointError: one line: a malformed training state, a missing or unreadable file, a file holding more
            than tensors and plain values, or a checkpoint that does not fit this run.
    """
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file

    path = Path(path)
    state = _read_training_state(path, accelerator.num_processes)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) and not allow_pickle:
        raise CheckpointError(
            f"resuming under {accelerator.distributed_type.value} reads {path} with its own pickle-based loader; "
            "pass --allow_pickle if you trust that folder"
        )
    files = sorted(p for p in path.iterdir() if p.is_file())
    legacy = [p for p in files if _LEGACY_CUSTOM.match(p.name)]
    for file in files:  # every pickle-format file, before accelerate reads any of it
        if file.suffix in _PICKLE_SUFFIXES and file not in legacy:
            _load_plain(file)
    view = None
    try:
        source = path
        if legacy:
            # accelerate would read these with full pickle: show it the folder without them, read them below
            view = Path(tempfile.mkdtemp(prefix="brushnet-resume-"))
            for file in path.iterdir():
                if file not in legacy:
                    (view / file.name).symlink_to(file.resolve())
            source = view
        accelerator.load_state(str(source))
    except Exception as exc:  # noqa: BLE001 - size mismatches, missing files: one line
        raise CheckpointError(f"cannot resume from {path}: {first_line(exc)}") from None
    finally:
        if view is not None:
            shutil.rmtree(view, ignore_errors=True)
    if ema is not None:
        _load_ema_state(ema, path, legacy)

    process_file = path / f"process_state_{accelerator.process_index}.safetensors"
    legacy_file = process_file.with_suffix(".pt")
    if process_file.is_file():
        try:
            process_state = _unflatten(load_file(process_file))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"cannot read {process_file}: {first_line(exc)}") from None
    elif legacy_file.is_file():
        process_state = _load_plain(legacy_file)
    else:
        raise CheckpointError(f"{path} has no state for process {accelerator.process_index}")
    return state, process_state
