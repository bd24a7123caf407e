"""Checks of a local model folder before any model is built from it: its ``config.json``, the kind of model it
holds, its weight file's name and integrity, and whether the weights cover the model the config describes.

``from_pretrained`` meets these problems late and reports them as something else: an empty or truncated
``.safetensors`` file as "Unable to load weights", missing weights as "Cannot copy out of meta tensor", a
``config.json`` that is a list as an ``AttributeError``, a BrushNet folder given as a UNet as "unknown
mid_block_type". :func:`check_model_folder` turns each into one :class:`~brushnet.errors.CheckpointError` line
naming the file and the problem, reading only the config and the weight file's header (no tensor is loaded;
the model the config describes is built on the ``meta`` device, which allocates nothing).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

from .errors import CheckpointError, first_line

__all__ = [
    "read_config",
    "check_config_types",
    "safetensors_keys",
    "safetensors_variants",
    "weight_files",
    "check_model_folder",
]

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
WEIGHT_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
"""The weight file name each library's ``from_pretrained`` reads (``<stem>.safetensors``, or a sharded
``<stem>.safetensors.index.json`` with its shards)."""

_MAX_HEADER = 100_000_000  # the safetensors format's own bound on the JSON header


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``path`` (a ``config.json``) as a dict.

    Raises:
        CheckpointError: missing, unreadable, not JSON, or not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}: not a model folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {first_line(exc)}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object of settings, got a {type(config).__name__}")
    return config


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON ``value`` plausibly fits a type ``hint``. Lenient: numbers and booleans stand for each
    other (diffusers annotates some flags as ``float``); only clear mismatches (text for a number, a number for
    a list, ...) are refused."""
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, (str, typing.ForwardRef)):
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in (bool, int, float):
        return isinstance(value, (bool, int, float))
    if hint is str:
        return isinstance(value, str)
    if hint in (tuple, list) or origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        args = [arg for arg in typing.get_args(hint) if arg is not Ellipsis]
        return len(set(args)) != 1 or all(_matches(item, args[0]) for item in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _describe_hint(hint: Any) -> str:
    """``int`` → "a number", ``tuple[int, ...]`` → "a list of numbers", unions joined with "or"."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe_hint(arg) for arg in typing.get_args(hint)))
    if hint is type(None):
        return "null"
    if hint in (bool, int, float):
        return "a number"
    if hint is str:
        return "a string"
    if hint in (tuple, list) or origin in (tuple, list):
        args = [arg for arg in typing.get_args(hint) if arg is not Ellipsis]
        if len(set(args)) == 1:
            inner = _describe_hint(args[0])
            return "a list of " + (inner[2:] + "s" if inner.startswith("a ") else inner)
        return "a list"
    if hint is dict or origin is dict:
        return "an object"
    return str(hint).replace("typing.", "")


def check_config_types(model_cls: type, config: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a config value whose type clearly does not fit the model's ``__init__`` annotation (text where a
    number or a list is expected, ...). ``None`` is accepted where the argument defaults to ``None``.

    Raises:
        CheckpointError: ``<path>: <key> must be <type>, got <value>``.
    """
    try:
        hints = typing.get_type_hints(model_cls.__init__)
        parameters = inspect.signature(model_cls.__init__).parameters
    except Exception:  # noqa: BLE001 - annotations that do not resolve are not checked
        return
    for key, value in config.items():
        if key.startswith("_") or key not in hints or key not in parameters:
            continue
        if value is None and parameters[key].default is None:
            continue
        if not _matches(value, hints[key]):
            raise CheckpointError(
                f"{path}: {key} must be {_describe_hint(hints[key])}, got {json.dumps(value)[:60]}"
            )


def safetensors_keys(path: str | os.PathLike) -> set[str]:
    """The tensor names of a ``.safetensors`` file, read from its header after checking that the file is one and
    is complete (its size covers every tensor the header lists). No tensor is read.

    Raises:
        CheckpointError: empty, truncated, or not a safetensors file, each said so.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download or copy")
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is {size} bytes: too short to be a safetensors file")
        header_size = int.from_bytes(prefix, "little")
        start = handle.read(1)
        if header_size > _MAX_HEADER or start != b"{":
            raise CheckpointError(f"{path} is not a safetensors file (no safetensors header)")
        if 8 + header_size > size:
            raise CheckpointError(
                f"{path} is truncated: {size} bytes, its header alone needs {8 + header_size}"
            )
        try:
            header = json.loads(start + handle.read(header_size - 1))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    needed = 8 + header_size + max(ends, default=0)
    if size < needed:
        raise CheckpointError(
            f"{path} is truncated: {size} bytes of the {needed} its header describes (an interrupted download "
            "or copy)"
        )
    return {key for key in header if key != "__metadata__"}


def safetensors_variants(folder: str | os.PathLike, library: str = "diffusers") -> dict[str | None, str]:
    """The variants of the safetensors weights in a model folder, each with the file that holds it: ``None`` for
    ``<stem>.safetensors`` (or its shard index), ``"fp16"`` for ``<stem>.fp16.safetensors`` or its shard index
    (``<stem>.safetensors.index.fp16.json`` as diffusers and transformers write it, or
    ``<stem>.fp16.safetensors.index.json``). Reads file names only."""
    stem = re.escape(WEIGHT_STEMS[library])
    return _variants(folder, re.compile(rf"{stem}(?:\.(\w+))?\.safetensors(?:\.index(?:\.(\w+))?\.json)?"))


def _variants(folder: str | os.PathLike, pattern: re.Pattern) -> dict[str | None, str]:
    """``{variant: first file}`` of the files in ``folder`` whose names ``pattern`` matches in full; its group 1
    (a weight file's) or group 2 (a shard index's) is the variant, neither: None; both: not a weight file."""
    found: dict[str | None, str] = {}
    folder = Path(folder)
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        match = pattern.fullmatch(path.name)
        if match and path.is_file() and not (match[1] and match[2]):
            found.setdefault(match[1] or match[2], path.name)
    return found


PICKLE_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "pytorch_model"}


def pickle_variants(folder: str | os.PathLike, library: str = "diffusers") -> dict[str | None, str]:
    """The variants of the pickle (``.bin``) weights in a model folder, each with a file that holds it, as
    :func:`safetensors_variants` for safetensors: ``None`` for ``<stem>.bin``, its shards or its shard index,
    ``"fp16"`` for ``<stem>.fp16.bin``, its shards (``<stem>.fp16-00001-of-00002.bin``) or its shard index
    (``<stem>.bin.index.fp16.json``); the stem is ``pytorch_model`` for ``library="transformers"``. Reads file names
    only."""
    stem = re.escape(PICKLE_STEMS[library])
    return _variants(
        folder, re.compile(rf"{stem}(?:\.(\w+?))?(?:-\d+-of-\d+)?\.bin(?:\.index(?:\.(\w+))?\.json)?")
    )


def weight_files(
    folder: str | os.PathLike,
    library: str = "diffusers",
    allow_pickle: bool = False,
    variant: str | None = None,
) -> list[Path]:
    """The weight files ``from_pretrained`` will read in ``folder``: ``<stem>.safetensors`` (with ``variant``
    ``<stem>.<variant>.safetensors``), the shards of ``<stem>.safetensors.index.json`` (with ``variant`` that of
    :func:`safetensors_variants`), or (with ``allow_pickle`` and no safetensors) the pickle file.

    Raises:
        CheckpointError: no weight file; only a variant's weights without ``variant`` (naming the ``variant=``
            that loads them); a weight file under another name (naming both); only pickle files without
            ``allow_pickle``; a shard index that is unreadable or names a missing shard.
    """
    folder = Path(folder)
    stem = WEIGHT_STEMS[library] + (f".{variant}" if variant else "")
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / safetensors_variants(folder, library).get(variant, f"{stem}.safetensors.index.json")
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a readable shard index (weight_map)") from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{folder} lacks {missing[0]}, a shard named by {index.name}")
        return [folder / name for name in shards]
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    pickled = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickled and not any(name.endswith(".safetensors") for name in files):
        if not allow_pickle:
            raise CheckpointError(
                f"{folder} has only pickle-based weights ({pickled[0]}); pass --allow-pickle (allow_pickle=True) "
                "to load them if you trust the source"
            )
        return [folder / pickled[0]]
    variants = {name: file for name, file in safetensors_variants(folder, library).items() if name}
    if variant is None and variants:
        name, file = next(iter(variants.items()))
        raise CheckpointError(
            f'{folder} has only the {name} variant of its weights ({file}): load it with variant="{name}"'
        )
    others = [name for name in files if name.endswith(".safetensors")]
    if others:
        raise CheckpointError(
            f"{folder} has {others[0]} but {library} loads {single.name}: rename the file (or pass the folder "
            "that holds it in the expected layout)"
        )
    raise CheckpointError(f"{folder} has no weight file ({single.name})")


def _expected_keys(model_cls: type, config: dict[str, Any], path: Path):
    """The model ``config`` describes, built on the meta device (nothing allocated), and its weight names."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            model = model_cls.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any failure here means the config does not describe the model
        raise CheckpointError(
            f"{path} does not describe a valid {model_cls.__name__}: {first_line(exc)}"
        ) from None
    return model, set(model.state_dict())


def check_model_folder(
    folder: str | os.PathLike,
    model_cls: type | None = None,
    expected: str | tuple[str, ...] | None = None,
    library: str = "diffusers",
    allow_pickle: bool = False,
    variant: str | None = None,
) -> None:
    """Everything that can be checked about a model folder before loading it, each problem one line.

    Args:
        folder: the model's folder (``config.json`` and its weights).
        model_cls: the diffusers model class to load (its ``__init__`` annotations check the config's types,
            and the model built on the meta device gives the weight names the file must hold). ``None``: only
            the config and the weight files' integrity are checked (transformers models).
        expected: the ``_class_name`` (or names) the config must have, e.g. ``"BrushNetModel"``; default
            ``model_cls.__name__`` for diffusers models.
        library: ``"diffusers"`` or ``"transformers"`` (the weight file's name).
        allow_pickle: accept a folder with only pickle-based weights (their tensor names are not checked).
        variant: the weights' variant (``"fp16"``: ``<stem>.fp16.safetensors``), as ``from_pretrained``'s.

    Raises:
        CheckpointError: a config that is unreadable, of another model kind, or with wrong value types; a
            missing, misnamed, empty, truncated or garbage weight file; weights missing from the file.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    config = read_config(config_path)
    if expected is None and model_cls is not None and library == "diffusers":
        expected = model_cls.__name__
    if expected is not None:
        names = (expected,) if isinstance(expected, str) else tuple(expected)
        found = config.get("_class_name")
        if found is not None and found not in names:
            raise CheckpointError(f"{folder} holds a {found}, not a {names[0]}")
    if model_cls is not None:
        check_config_types(model_cls, config, config_path)
    files = weight_files(folder, library, allow_pickle, variant)
    keys: set[str] = set()
    for path in files:
        if path.suffix == ".safetensors":
            keys |= safetensors_keys(path)
    if model_cls is None or library != "diffusers" or not keys:
        return
    model, wanted = _expected_keys(model_cls, config, config_path)
    renamed = dict.fromkeys(keys)
    try:
        model._fix_state_dict_keys_on_load(renamed)  # diffusers' own renaming of old attention-block names
    except Exception:  # noqa: BLE001 - a diffusers without it: compare the names as they are
        pass
    missing = sorted(wanted - set(renamed))
    if missing:
        where = files[0] if len(files) == 1 else f"{folder} ({len(files)} shards)"
        raise CheckpointError(
            f"{where} lacks {len(missing)} of the {len(wanted)} weights of the {model_cls.__name__} its config "
            f"describes (first: {missing[0]}): an incomplete export, or weights of another model"
        )
