"""Loading base models and BrushNet branches from local folders, hub ids or single files: the one loader.

Both families load through here — SD1.5-style bases (one CLIP text encoder; also SD2.x) and SDXL bases (two
text encoders, ``added_cond_kwargs``) — for inference, the methods and training alike. The family is read
from the UNet's (or the branch's) config (:func:`detect_family`); a branch made for one family with a base
of the other is a one-line :class:`CheckpointError` (:func:`check_brushnet_fits_base`).

Only ``.safetensors`` weights load unless the caller passes ``allow_pickle=True`` (pickle-based ``.bin``/
``.ckpt``/``.pt`` files can run code when loaded). A checkpoint of the wrong kind gets a one-line error that
says what was found and what was expected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, first_line
from .model_files import PICKLE_SUFFIXES

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "FAMILY_NAMES",
    "FAMILY_COMPONENTS",
    "resolve_dtype",
    "detect_family",
    "peek_family",
    "peek_unet_config",
    "check_brushnet_fits_base",
    "load_base_components",
    "brushnet_folder",
    "check_brushnet_source",
    "is_local_path",
    "check_pipeline_source",
    "load_brushnet",
    "load_model",
    "describe_folder",
    "safetensors_policy",
]

FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
"""Display names of the base model families."""

FAMILY_COMPONENTS = {
    "sd15": ("vae", "text_encoder", "tokenizer", "unet", "scheduler"),
    "sdxl": ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler"),
}
"""The components :func:`load_base_components` returns for each family."""

BASE_COMPONENTS = FAMILY_COMPONENTS["sd15"]

# transformers classes of the text side when model_index.json names none (the diffusers defaults)
_DEFAULT_CLASSES = {
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "CLIPTextModelWithProjection",
    "tokenizer": "CLIPTokenizer",
    "tokenizer_2": "CLIPTokenizer",
}
_WEIGHTED = ("vae", "text_encoder", "text_encoder_2", "unet")


def part_library(name: str) -> str:
    """The library whose weight file names a base's part folder uses: ``"transformers"`` for the text encoders
    (``model*.safetensors``), ``"diffusers"`` for the rest."""
    return "transformers" if name.startswith("text_") else "diffusers"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}  # fmt: skip
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: fp32, fp16, bf16")
    return names[dtype]


# -- families ------------------------------------------------------------------------------------------


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def detect_family(config: Any) -> str:
    """The base model family a UNet or BrushNet config belongs to: ``"sd15"`` or ``"sdxl"``.

    ``"sdxl"``: the SDXL ``text_time`` added embedding (pooled text + size/crop time ids). ``"sd15"``: no added
    embedding (Stable Diffusion 1.x and 2.x layouts).

    Args:
        config: a ``UNet2DConditionModel`` or :class:`~brushnet.models.BrushNetModel` config (the model's
            ``.config``, or the dict of its ``config.json``).

    Raises:
        CheckpointError: a config of neither family (class embeddings, other added embeddings).
    """
    addition = _get(config, "addition_embed_type")
    if addition == "text_time":
        return "sdxl"
    if addition is None and _get(config, "class_embed_type") is None:
        return "sd15"
    raise CheckpointError(
        f"unsupported model (addition_embed_type={addition!r}, class_embed_type="
        f"{_get(config, 'class_embed_type')!r}): only SD1.5-style and SDXL bases are supported"
    )


def peek_family(path: str | os.PathLike | None, config: str | os.PathLike | None = None) -> str | None:
    """The family of a model from its config or its file's tensor names alone, before anything is loaded.

    A local folder: ``unet/config.json`` of a pipeline folder, or a model folder's ``config.json``. A hub id: the
    same files in the local Hugging Face cache (nothing is downloaded). A single-file base: ``unet/config.json``
    of its local ``config`` folder, else, for a ``.safetensors`` file, its tensor names (as
    :func:`load_base_components` tells). ``None`` when it cannot tell so cheaply: a hub id not in the cache, a
    pickle file without a config folder, an unreadable or foreign config or file.
    """
    if path is None:
        return None
    if not is_local_path(path):
        candidates = [_cached_file(str(path), name) for name in ("unet/config.json", "config.json")]
    else:
        folder = Path(path).expanduser()
        if folder.is_file():
            suffix = folder.suffix.lower()
            if suffix != ".safetensors" and (
                suffix not in PICKLE_SUFFIXES or peek_unet_config(folder, config) is None
            ):
                return None  # a pickle file's keys are not read before loading (that would unpickle it)
            try:
                return _single_file_family(folder, config)
            except (CheckpointError, AttributeError, TypeError):
                return None  # the loader says what is wrong with it
        candidates = [folder / "unet" / "config.json", folder / "config.json"]
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            try:
                return detect_family(json.loads(candidate.read_text()))
            except (OSError, ValueError, CheckpointError, AttributeError, TypeError):
                return None
    return None


def peek_unet_config(path: str | os.PathLike | None, config: str | os.PathLike | None = None) -> Path | None:
    """The ``unet/config.json`` a base will be built from, found without loading anything: that of a local base
    folder, of the local ``config`` folder given with a single file, or of a hub id in the local cache; ``None``
    when there is none to read so cheaply."""
    if path is None:
        return None
    if not is_local_path(path):
        return _cached_file(str(path), "unet/config.json")
    base = Path(path).expanduser()
    if base.is_file():
        if config is None:
            return None
        base = Path(config)  # as _single_file_family reads it
    found = base / "unet" / "config.json"
    return found if found.is_file() else None


def _layers(config: Any) -> list[int]:
    n_blocks = len(_get(config, "block_out_channels"))
    layers = _get(config, "layers_per_block")
    return list(layers) if isinstance(layers, (list, tuple)) else [layers] * n_blocks


def _injection_points(config: Any) -> tuple[int, int]:
    """(down, up) residual counts of a UNet or branch config: conv_in + resnets + downsamplers; resnets +
    upsamplers (see :func:`brushnet.models.unet_injection.count_injection_points`)."""
    layers = _layers(config)
    return 1 + sum(layers) + len(layers) - 1, sum(n + 1 for n in layers) + len(layers) - 1


def _summary(config: Any) -> str:
    text = f"block_out_channels {list(_get(config, 'block_out_channels'))}"
    if _get(config, "addition_embed_type") == "text_time":
        text += f", text_time embedding of {_get(config, 'projection_class_embeddings_input_dim')}"
    return text


def check_brushnet_fits_base(brushnet_config: Any, unet_config: Any) -> None:
    """Raise a one-line :class:`CheckpointError` when a branch does not fit a base UNet.

    A branch of one family with a base of the other names both (``this SDXL BrushNet (...) does not fit an
    SD1.5 base (...)``); within a family, the mismatching sizes are listed.

    Args:
        brushnet_config: the branch's config (``brushnet.config`` or its ``config.json`` as a dict).
        unet_config: the base UNet's config.
    """
    branch_family, base_family = detect_family(brushnet_config), detect_family(unet_config)
    branch_name, base_name = FAMILY_NAMES[branch_family], FAMILY_NAMES[base_family]
    if branch_family != base_family:
        raise CheckpointError(
            f"this {branch_name} BrushNet ({_summary(brushnet_config)}) does not fit an {base_name} base "
            f"({_summary(unet_config)}); use an {base_name} BrushNet with this base"
        )
    problems = []
    channels = (
        list(_get(brushnet_config, "block_out_channels")),
        list(_get(unet_config, "block_out_channels")),
    )
    if channels[0] != channels[1]:
        problems.append(f"block_out_channels {channels[0]} vs {channels[1]}")
    points = _injection_points(brushnet_config), _injection_points(unet_config)
    if points[0] != points[1]:
        problems.append(
            f"{points[0][0]}/{points[0][1]} residuals for {points[1][0]}/{points[1][1]} injection points"
        )
    if _get(brushnet_config, "in_channels") != _get(unet_config, "in_channels"):
        problems.append(
            f"latent channels {_get(brushnet_config, 'in_channels')} vs {_get(unet_config, 'in_channels')}"
        )
    if branch_family == "sdxl":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if _get(brushnet_config, key) != _get(unet_config, key):
                problems.append(f"{key} {_get(brushnet_config, key)} vs {_get(unet_config, key)}")
    if problems:
        raise CheckpointError(
            f"this {branch_name} BrushNet does not fit the base UNet: " + "; ".join(problems)
        )


# -- folders -------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    from .model_files import read_config

    return read_config(path)


def describe_folder(path: Path) -> str:
    """What kind of diffusers folder ``path`` is: 'pipeline:<class>', a model class name, or 'unknown'."""
    if (path / "model_index.json").is_file():
        return "pipeline:" + str(_read_json(path / "model_index.json").get("_class_name", "?"))
    if (path / "config.json").is_file():
        return str(_read_json(path / "config.json").get("_class_name", "unknown"))
    return "unknown"


def _holds(folder: Path, kind: str) -> str:
    """``folder`` and its ``kind`` (from :func:`describe_folder`) as the start of a wrong-kind message:
    "<folder> holds a ControlNetModel", or in plain words for a folder of no known kind."""
    if kind != "unknown":
        return f"{folder} holds a {kind}"
    if (folder / "config.json").is_file():
        return f"{folder} holds a config.json without _class_name (no known model)"
    return f"{folder} holds no model (no config.json or model_index.json)"


def _powerpaint_hint(folder: Path) -> str | None:
    """The message for a PowerPaint checkpoint given where a BrushNet one is expected, or None."""
    from .loading_powerpaint import find_powerpaint

    try:
        files = find_powerpaint(folder)
    except CheckpointError:
        return None
    parts = []
    for path in (files.model, files.text_encoder):
        rel = path.relative_to(folder).as_posix() if path.is_relative_to(folder) else path.name
        if rel != ".":
            parts.append(rel + ("/" if path.is_dir() else ""))
    layout = f" ({', '.join(parts)})" if parts else ""
    return (
        f"{folder} is a PowerPaint {files.version} checkpoint{layout}, not a BrushNet one; "
        f"use --method powerpaint --powerpaint {folder}"
    )


def safetensors_policy(allow_pickle: bool, folder: str | os.PathLike | None = None) -> bool | None:
    """The ``use_safetensors`` argument of diffusers' and transformers' ``from_pretrained`` for a pickle policy:
    ``True`` (safetensors only) without permission; with it ``None`` (safetensors where present, else the pickle
    file), or ``False`` for a local ``folder`` that holds no ``.safetensors`` file at all (diffusers would look
    for one first and log "An error occurred while trying to fetch" on a load that works). Never ``False`` where
    a safetensors file is, which would ignore it."""
    if not allow_pickle:
        return True
    if folder is not None and Path(folder).is_dir() and not any(Path(folder).glob("*.safetensors")):
        return False
    return None


def _check_weights(
    folder: Path, allow_pickle: bool, model_cls: type | None = None, variant: str | None = None
) -> None:
    """:func:`brushnet.model_files.check_model_folder` for a diffusers model folder (``model_cls``) or, with
    ``None``, a transformers one (config and weight files only)."""
    from .model_files import check_model_folder

    library = "diffusers" if model_cls is not None else "transformers"
    check_model_folder(folder, model_cls, library=library, allow_pickle=allow_pickle, variant=variant)


def fp16_only_variant(folder: Path, library: str = "diffusers") -> str | None:
    """``"fp16"`` for a model folder that holds only the fp16 variant of its safetensors weights
    (``diffusion_pytorch_model.fp16.safetensors`` or its shards, as some hub repos ship a branch, and as
    ``save_pretrained(variant="fp16")`` writes; ``model.fp16.safetensors`` for ``library="transformers"``), else
    None."""
    from .model_files import safetensors_variants

    variants = safetensors_variants(folder, library)
    return "fp16" if "fp16" in variants and None not in variants else None


def where(path: str | os.PathLike) -> str:
    """``path`` for a "not found" message: a relative path also says which folder it was looked for from (a
    command run outside the folder a config's relative paths assume)."""
    if Path(path).expanduser().is_absolute():
        return str(path)
    return f"{path} (relative to {Path.cwd()})"


def is_local_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a local file or folder (existing, or written as a path: ``./x``, ``/x``, ``~/x``,
    ``a/b/c``) rather than a hub id (``owner/name``, unless a folder ``owner`` is here)."""
    p = str(path)
    return os.path.exists(p) or p.startswith((".", "/", "~")) or os.sep in p and not _looks_like_hub_id(p)


def _looks_like_hub_id(p: str) -> bool:
    """``owner/name``, unless a folder ``owner`` is here: then ``owner/name`` is a local path (a misspelt one is
    "not found", not a hub lookup)."""
    parts = p.split("/")
    return len(parts) == 2 and all(parts) and not p.startswith((".", "/")) and not os.path.isdir(parts[0])


def _cached_file(repo_id: str, filename: str, hub_kwargs: dict | None = None) -> Path | None:
    """Where ``filename`` of hub repo ``repo_id`` is in the local Hugging Face cache, or None (nothing is fetched)."""
    from huggingface_hub import try_to_load_from_cache

    kwargs = {k: v for k, v in (hub_kwargs or {}).items() if k in ("cache_dir", "revision")}
    try:
        found = try_to_load_from_cache(repo_id, filename, **kwargs)
    except Exception:  # noqa: BLE001 - a malformed id is "not cached"; loading reports it
        return None
    return Path(found) if isinstance(found, str) else None


def _cached(repo_id: str, filename: str, hub_kwargs: dict | None = None) -> bool:
    """Whether ``filename`` of hub repo ``repo_id`` is in the local Hugging Face cache."""
    return _cached_file(repo_id, filename, hub_kwargs) is not None


_LOCAL_INSTEAD = (
    "a local folder instead (a diffusers folder: model_index.json, unet/, vae/, ... for a base; config.json + "
    "weights for a model)"
)


def _offline_message(
    what: str,
    repo_id: str,
    reason: str,
    cache_dir: str | os.PathLike | None = None,
    instead: str = _LOCAL_INSTEAD,
) -> str:
    from huggingface_hub import constants

    return (
        f"cannot load {what} {repo_id!r}: {reason} and it is not in the local cache "
        f"({cache_dir or constants.HF_HUB_CACHE}); "
        f"pass {instead}, or download it once where the hub can be reached"
    )


def _hub_answers(timeout: float = 5.0) -> bool:
    """Whether the hub's endpoint answers at all (any HTTP status), within ``timeout`` and without retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - no connection, DNS failure, timeout, proxy refusal ...
        return False
    return True


def _check_hub_reachable(
    what: str,
    repo_id: str,
    filenames: str | tuple[str, ...],
    hub_kwargs: dict | None = None,
    instead: str = _LOCAL_INSTEAD,
) -> None:
    """For a hub id not in the local cache, fail at once, saying what to do, when offline mode is on or the hub
    does not answer (instead of the hub client's retries and a misleading "no file named config.json")."""
    from huggingface_hub import constants

    names = (filenames,) if isinstance(filenames, str) else filenames
    if any(_cached(repo_id, name, hub_kwargs) for name in names):
        return
    cache_dir = (hub_kwargs or {}).get("cache_dir")
    if constants.HF_HUB_OFFLINE or (hub_kwargs or {}).get("local_files_only"):
        raise CheckpointError(
            _offline_message(what, repo_id, "offline mode is on (HF_HUB_OFFLINE=1)", cache_dir, instead)
        )
    if not _hub_answers():
        raise CheckpointError(
            _offline_message(
                what, repo_id, f"the hub ({constants.ENDPOINT}) is unreachable", cache_dir, instead
            )
        )


def _connection_failure(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it was raised from is a network failure or an offline-mode refusal."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if any(part in name for part in ("Connect", "Timeout", "LocalEntryNotFound", "OfflineModeIsEnabled")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _hub_error(what: str, repo_id: str, exc: BaseException, subfolder: str | None = None) -> CheckpointError:
    """One line for a failed hub load: an unreachable hub and nothing cached says so and how to pass a folder."""
    config = f"{subfolder}/config.json" if subfolder else "config.json"
    cached = _cached(repo_id, "model_index.json") or _cached(repo_id, config)
    if _connection_failure(exc) and not cached:
        return CheckpointError(_offline_message(what, repo_id, "the hub is unreachable"))
    return CheckpointError(f"cannot load {what} {repo_id!r} from the hub: {first_line(exc)}")


# -- branches ------------------------------------------------------------------------------------------


def brushnet_folder(
    path: str | os.PathLike, subfolder: str | None = None, into_pipeline: bool = False
) -> Path:
    """The local BrushNet folder ``path`` (``/ subfolder``) names, checked from its config alone.

    With ``into_pipeline`` a pipeline folder that holds ``brushnet/`` means that subfolder; without it, such a
    folder is refused with the ``subfolder="brushnet"`` that loads it.

    Raises:
        CheckpointError: missing path, a file, a pipeline folder, a folder of another model (a UNet, a ControlNet,
            a PowerPaint checkpoint: named, with what loads it) or of no model.
    """
    folder = Path(path).expanduser() / (subfolder or "")
    if not folder.exists():
        raise CheckpointError(f"BrushNet checkpoint not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"BrushNet checkpoint must be a folder with config.json, got a file: {folder}")
    kind = describe_folder(folder)
    holds_branch = kind != "BrushNetModel" and describe_folder(folder / "brushnet") == "BrushNetModel"
    if kind.startswith("pipeline:") and not holds_branch:
        raise CheckpointError(
            f"{folder} is a full {kind[9:]} folder, not a BrushNet checkpoint; pass it as the base model"
        )
    if holds_branch:
        if not into_pipeline:
            what = (
                f"a full {kind[9:]} folder" if kind.startswith("pipeline:") else "not a BrushNet checkpoint"
            )
            raise CheckpointError(f"{folder} is {what}; the branch in it loads with subfolder='brushnet'")
        folder = folder / "brushnet"
        kind = describe_folder(folder)
    if kind != "BrushNetModel":
        hint = _powerpaint_hint(folder)
        if hint:
            raise CheckpointError(hint)
        raise CheckpointError(f"{_holds(folder, kind)}, not a BrushNetModel checkpoint")
    return folder


def has_cross_attention(config: dict) -> bool:
    """Whether a branch config (a ``config.json`` dict) has cross-attention blocks: PowerPaint's branch does,
    BrushNet's (which reads no text) does not."""
    blocks = [*(config.get("down_block_types") or []), str(config.get("mid_block_type") or "")]
    return any("CrossAttn" in str(block) for block in blocks)


def refuse_cross_attention_branch(folder: Path) -> None:
    """A branch folder whose config has cross-attention blocks is PowerPaint's (it reads PowerPaint's task-word
    text encoder), not a BrushNet one, which reads no text: loaded as ``--brushnet`` it would read the user's
    prompt through the base's encoder and silently give another model's output.

    Raises:
        CheckpointError: naming the PowerPaint folder and the flags that load it.
    """
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # refused where the config is read, with its own message
    if isinstance(config, dict) and has_cross_attention(config):
        root = folder.parent if folder.name == "PowerPaint_Brushnet" else folder
        raise CheckpointError(
            f"{folder} is a PowerPaint branch (a BrushNetModel with cross-attention, read with PowerPaint's "
            f"task-word text encoder), not a BrushNet one; use --method powerpaint --powerpaint {root}"
        )


def check_brushnet_source(path: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any) -> None:
    """What :meth:`BrushNetModel.from_pretrained <brushnet.models.BrushNetModel.from_pretrained>` checks before
    diffusers reads anything: a local folder as :func:`brushnet_folder` (no pipeline folder), a hub id that is
    cached or reachable (:func:`_check_hub_reachable`).

    Raises:
        CheckpointError: one line, as :func:`load_brushnet`'s.
    """
    if is_local_path(path):
        brushnet_folder(path, subfolder)
    else:
        _check_hub_reachable(
            "BrushNet", str(path), f"{subfolder}/config.json" if subfolder else "config.json", hub_kwargs
        )


def check_pipeline_source(path: str | os.PathLike, **hub_kwargs: Any) -> None:
    """What the pipelines' ``from_pretrained`` checks before diffusers reads anything: a local path that exists
    and holds a pipeline (``model_index.json``), a hub id that is cached or reachable.

    Raises:
        CheckpointError: one line: a missing path, a file, a folder of one model (naming it), a hub id offline
            and not cached.
    """
    if not is_local_path(path):
        _check_hub_reachable("pipeline", str(path), "model_index.json", hub_kwargs)
        return
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"base model not found: {where(folder)}")
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is a file; a pipeline loads from a folder with model_index.json (a single file: "
            "from_single_file)"
        )
    kind = describe_folder(folder)
    if not kind.startswith("pipeline:"):
        raise CheckpointError(
            f"{_holds(folder, kind)}, not a pipeline folder (model_index.json, unet/, vae/, ...)"
        )


def pipeline_only_variant(folder: str | os.PathLike) -> str | None:
    """The variant a local pipeline folder's weights are stored in when some part holds no plain safetensors
    weights, only that one variant (``save_pretrained(..., variant="fp16")``, a hub snapshot fetched with
    ``variant="fp16"``; fp16 first where those parts hold several); None when every part has plain weights, or the
    folder is not a local pipeline folder.
    Loaded with that variant, a part that lacks it reads its plain weights (diffusers' rule, and
    :func:`load_base_components`').

    Raises:
        CheckpointError: no one variant is held by every part without plain weights, or several are and none is
            fp16 (which to load is the caller's choice: ``variant=``); see :func:`_stored_variants`.
    """
    folder = Path(folder).expanduser()
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    parts = {}
    for name, entry in index.items() if isinstance(index, dict) else ():
        if (
            isinstance(entry, list)
            and len(entry) == 2
            and entry[0]
            and (folder / name / "config.json").is_file()
        ):
            parts[name] = "transformers" if entry[0] == "transformers" else "diffusers"
    return _stored_variants(folder, parts)[0]


def _stored_variants(
    folder: Path, parts: dict[str, str], variant: str | None = None, choose: str = "variant="
) -> tuple[str | None, dict[str, str | None]]:
    """The variant a folder of model parts (``{name: library}``) is stored in, and the variant each part loads.

    A part's variants are those of its safetensors weights, or of its pickle weights where it has no safetensors
    (:func:`~brushnet.model_files.pickle_variants`; whether pickle may load is checked elsewhere). Unasked
    (``variant`` None), the folder's variant is the one every part without plain weights holds (``"fp16"`` first
    where they hold several), None when every part has plain ones. Each part loads the folder's variant where it
    holds it, else its plain weights — as diffusers' ``DiffusionPipeline.from_pretrained(variant=...)`` does.

    Raises:
        CheckpointError: in one line, naming the parts: no one variant is held by every part without plain weights;
            several are and none is fp16 (``choose``, the argument that picks one, is named); the asked ``variant``
            is in no part, or a part has neither it nor plain weights.
    """
    from .model_files import pickle_variants, safetensors_variants

    held = {
        name: set(safetensors_variants(folder / name, library) or pickle_variants(folder / name, library))
        for name, library in parts.items()
    }
    only = {name: found for name, found in held.items() if found and None not in found}

    def listing(names) -> str:
        return "; ".join(
            f"{name}: {', '.join(sorted('plain' if v is None else v for v in held[name]))}"
            for name in sorted(names)
            if held[name]
        )

    if variant is None:
        if not only:
            return None, dict.fromkeys(parts)
        common = set.intersection(*only.values())
        if not common:
            raise CheckpointError(
                f"{folder} stores its parts only as different variants ({listing(only)}) and no plain weights: "
                "no one variant loads them all; save every part as the same variant"
            )
        if len(common) > 1 and "fp16" not in common:
            raise CheckpointError(
                f"{folder} stores some parts only as variants ({listing(only)}) and no plain weights: pass "
                f"{choose} one of {', '.join(repr(v) for v in sorted(common))}"
            )
        variant = "fp16" if "fp16" in common else next(iter(common))
    elif not any(variant in found for found in held.values()):
        raise CheckpointError(
            f"{folder} has no {variant!r} variant of its weights ({listing(held) or 'no weight files'})"
        )
    lacking = sorted(name for name in only if variant not in only[name])
    if lacking:
        raise CheckpointError(
            f"{folder} has neither the {variant!r} variant nor plain weights for {', '.join(lacking)} "
            f"({listing(lacking)})"
        )
    return variant, {name: variant if variant in found else None for name, found in held.items()}


def force_zeros_for_empty_prompt(
    path: str | os.PathLike, config: str | os.PathLike | None = None, revision: str | None = None
) -> bool:
    """Whether an SDXL base's pipelines send zeros as the unconditional text when no negative prompt is given: its
    ``model_index.json``'s ``force_zeros_for_empty_prompt`` (of ``config`` for a single file), read from a local
    folder or the local hub cache (nothing is fetched); True without that file or that key, the SDXL pipelines'
    default and SDXL base 1.0's setting."""
    from .model_files import read_config

    source = config if config is not None and Path(path).expanduser().is_file() else path
    if is_local_path(source):
        index = Path(source).expanduser() / "model_index.json"
    else:
        index = _cached_file(str(source), "model_index.json", {"revision": revision})
    if index is None or not index.is_file():
        return True
    try:
        return bool(read_config(index).get("force_zeros_for_empty_prompt", True))
    except CheckpointError:
        return True


def load_brushnet(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    base_config: Any = None,
    **hub_kwargs: Any,
):
    """Load a :class:`~brushnet.models.BrushNetModel` from a folder (``config.json`` + weights) or a hub id.

    Args:
        path: a BrushNet folder (as released, SD1.5 or SDXL), a pipeline folder holding ``brushnet/``, or a
            hub id.
        dtype: weights dtype (fp32 default).
        allow_pickle: allow ``.bin`` weights where the folder has no ``.safetensors`` (those are preferred).
        subfolder: a subfolder of ``path`` (or of the hub repo).
        base_config: the base UNet's config: when given, a branch that does not fit it is refused (before
            its weights are read, for local folders) with :func:`check_brushnet_fits_base`'s error.

    Raises:
        CheckpointError: missing path, a UNet/pipeline/other model folder (a PowerPaint folder is named as one,
            with the flags that load it), pickle weights without permission, or a branch that does not fit
            ``base_config``.
    """
    from .models.brushnet import BrushNetModel

    torch_dtype = resolve_dtype(dtype)
    if is_local_path(path):
        folder = brushnet_folder(path, subfolder, into_pipeline=True)
        refuse_cross_attention_branch(folder)
        if base_config is not None:
            from .model_files import check_config_types

            config = _read_json(folder / "config.json")
            check_config_types(BrushNetModel, config, folder / "config.json")
            check_brushnet_fits_base(config, base_config)
        variant = fp16_only_variant(folder)
        _check_weights(folder, allow_pickle, BrushNetModel, variant)
        return BrushNetModel.from_pretrained(
            folder,
            torch_dtype=torch_dtype,
            use_safetensors=safetensors_policy(allow_pickle, folder),
            variant=variant,
        )
    _check_hub_reachable(
        "BrushNet", str(path), f"{subfolder}/config.json" if subfolder else "config.json", hub_kwargs
    )
    try:
        brushnet = BrushNetModel.from_pretrained(
            str(path),
            subfolder=subfolder,
            torch_dtype=torch_dtype,
            use_safetensors=safetensors_policy(allow_pickle),
            **hub_kwargs,
        )
    except (OSError, ValueError) as exc:
        raise _hub_error("BrushNet", str(path), exc, subfolder) from None
    if base_config is not None:
        check_brushnet_fits_base(brushnet.config, base_config)
    return brushnet


def load_model(
    model_cls: type,
    path: str | os.PathLike,
    what: str,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    **hub_kwargs: Any,
):
    """Load one diffusers model (a ControlNet, ...) from a local folder or a hub id, with the folder checks of
    :func:`brushnet.model_files.check_model_folder` first, so every problem is one line naming the file.

    Args:
        model_cls: the diffusers model class (e.g. ``ControlNetModel``); the folder's ``_class_name`` must be it.
        path: the model's folder (``config.json`` + weights; only the fp16 variant's weights load too, as for a
            branch folder) or a hub id.
        what: the model's name in messages, e.g. ``"ControlNet"``.
        dtype: weights dtype (fp32 default).
        allow_pickle: allow ``.bin`` weights where the folder has no ``.safetensors``.
        subfolder: a subfolder of ``path`` (or of the hub repo).

    Raises:
        CheckpointError: a missing path, a folder of another kind, a bad config or weight file, or a hub id that
            cannot be reached.
    """
    torch_dtype = resolve_dtype(dtype)
    policy = safetensors_policy(allow_pickle)
    if is_local_path(path):
        folder = Path(path).expanduser() / (subfolder or "")
        if not folder.is_dir():
            problem = "not found" if not folder.exists() else "must be a folder with config.json, got a file"
            raise CheckpointError(f"{what} checkpoint {problem}: {folder}")
        kind = describe_folder(folder)
        if kind.startswith("pipeline:"):
            raise CheckpointError(
                f"{folder} is a full {kind[9:]} folder, not a {what} ({model_cls.__name__})"
            )
        variant = fp16_only_variant(
            folder
        )  # as a branch folder's: fp16 files only load in the dtype asked for
        _check_weights(folder, allow_pickle, model_cls, variant)
        policy = safetensors_policy(allow_pickle, folder)
        return model_cls.from_pretrained(
            folder, torch_dtype=torch_dtype, use_safetensors=policy, variant=variant
        )
    config = f"{subfolder}/config.json" if subfolder else "config.json"
    _check_hub_reachable(what, str(path), config, hub_kwargs)
    try:
        return model_cls.from_pretrained(
            str(path), subfolder=subfolder, torch_dtype=torch_dtype, use_safetensors=policy, **hub_kwargs
        )
    except (OSError, ValueError) as exc:
        raise _hub_error(what, str(path), exc, subfolder) from None


# -- bases ---------------------------------------------------------------------------------------------


def load_base_components(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    config: str | os.PathLike | None = None,
    variant: str | None = None,
    **hub_kwargs: Any,
) -> dict[str, Any]:
    """Load a Stable Diffusion base model's components, SD1.5-style or SDXL (detected from the UNet config).

    SD1.5 (also SD2.x): ``vae, text_encoder, tokenizer, unet, scheduler``. SDXL: the same plus
    ``text_encoder_2, tokenizer_2`` (see :data:`FAMILY_COMPONENTS`). The classes of the text side are those
    ``model_index.json`` names (as ``DiffusionPipeline.from_pretrained`` does), the CLIP defaults without one;
    the scheduler is the class its config names.

    Args:
        path: a diffusers folder (``model_index.json``, or just the component subfolders), a hub id, or a single
            ``.safetensors`` checkpoint (original SD / SDXL layout, as community models are shared). A folder whose
            components hold only a variant of their weights (``save_pretrained(variant="fp16")``) loads that
            variant, and a component without it its plain weights (as the pipelines' ``from_pretrained`` does).
        variant: read this variant of the weights (``"fp16"``: ``*.fp16.safetensors``) where a component has it,
            else its plain weights; None: the folder's own (above; fp16 first where its parts hold several). For a
            hub id every component must hold it (no file list is fetched to tell which do).
        dtype: weights dtype (fp32 default).
        allow_pickle: allow ``.bin``/``.ckpt`` weights for components without ``.safetensors`` (those are
            preferred), and pickle-based single files.
        config: for single files: a local diffusers folder (or hub id) with the model's configs; needed
            offline, since diffusers otherwise fetches the SD1.5 or SDXL configs from the hub.
        hub_kwargs: passed to ``from_pretrained`` (``revision``, ``cache_dir``, ``local_files_only``, ...).

    Returns:
        ``{name: component}``; ``detect_family(components["unet"].config)`` tells the family.

    Raises:
        CheckpointError: missing path, wrong kind (e.g. a BrushNet or UNet folder), missing component, pickle
            without permission, or a model of neither family.
    """
    torch_dtype = resolve_dtype(dtype)
    if not is_local_path(path):
        _check_hub_reachable("base model", str(path), ("model_index.json", "unet/config.json"), hub_kwargs)
        variants = dict.fromkeys(_WEIGHTED, variant) if variant is not None else None
        return _load_components(str(path), torch_dtype, allow_pickle, hub_kwargs, variants)
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"base model not found: {where(p)}")
    if p.is_file():
        if variant is not None:
            raise CheckpointError(
                f"variant={variant!r} names a diffusers folder's weight files; {p.name} is one file"
            )
        return _load_single_file(p, torch_dtype, allow_pickle, config)
    kind = describe_folder(p)
    if not kind.startswith("pipeline:") and not (kind == "unknown" and (p / "unet").is_dir()):
        raise CheckpointError(
            f"{_holds(p, kind)}, not a full base model folder (model_index.json with vae, unet, ...)"
        )
    if not (p / "unet" / "config.json").is_file():
        raise CheckpointError(f"base model folder {p} lacks: unet")
    family = detect_family(_read_json(p / "unet" / "config.json"))
    missing = [c for c in FAMILY_COMPONENTS[family] if not (p / c).is_dir()]
    if missing:
        raise CheckpointError(f"{FAMILY_NAMES[family]} base model folder {p} lacks: {', '.join(missing)}")
    import diffusers

    weighted = [name for name in _WEIGHTED if name in FAMILY_COMPONENTS[family]]
    _, variants = _stored_variants(p, {name: part_library(name) for name in weighted}, variant)
    classes = _component_classes(str(p), hub_kwargs)
    for name in weighted:
        model_cls = None  # text encoders: transformers models (config and weight files checked)
        if name == "unet":
            model_cls = diffusers.UNet2DConditionModel
        elif name == "vae":
            model_cls = _library_class(diffusers, classes.get("vae", "AutoencoderKL"), "vae", str(p))
        _check_weights(p / name, allow_pickle, model_cls, variants[name])
    return _load_components(str(p), torch_dtype, allow_pickle, hub_kwargs, variants)


def _component_classes(source: str, hub_kwargs: dict) -> dict[str, str]:
    """Class names ``model_index.json`` gives the components (empty without one)."""
    from diffusers import DiffusionPipeline

    if is_local_path(source) and not (Path(source) / "model_index.json").is_file():
        return {}
    try:
        index = DiffusionPipeline.load_config(source, **hub_kwargs)
    except (OSError, ValueError):
        return {}
    return {
        name: entry[1]
        for name, entry in index.items()
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]
    }


def _library_class(library, name: str, component: str, source: str) -> type:
    cls = getattr(library, name, None)
    if cls is None:
        raise CheckpointError(
            f"{source} names {component} class {name!r}, which {library.__name__} does not have"
        )
    return cls


def _load_components(
    source: str, torch_dtype, allow_pickle: bool, hub_kwargs, variants: dict[str, str | None] | None = None
) -> dict[str, Any]:
    """The components of a base folder or hub id; ``variants``: the weights variant each weighted part loads
    (:func:`_stored_variants`; none: the plain weights)."""
    import diffusers
    import transformers
    from diffusers import UNet2DConditionModel

    local = is_local_path(source)

    def common_for(part: str) -> dict[str, Any]:
        folder = Path(source).expanduser() / part if local else None
        variant = (variants or {}).get(part)
        return {"use_safetensors": safetensors_policy(allow_pickle, folder), "variant": variant, **hub_kwargs}

    try:
        family = detect_family(UNet2DConditionModel.load_config(source, subfolder="unet", **hub_kwargs))
        classes = _component_classes(source, hub_kwargs)
        parts: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", torch_dtype=torch_dtype, **common_for("unet")
            )
        }
        vae_cls = _library_class(diffusers, classes.get("vae", "AutoencoderKL"), "vae", source)
        parts["vae"] = vae_cls.from_pretrained(
            source, subfolder="vae", torch_dtype=torch_dtype, **common_for("vae")
        )
        for name in FAMILY_COMPONENTS[family]:
            if name.startswith("text_encoder"):
                cls = _library_class(transformers, classes.get(name, _DEFAULT_CLASSES[name]), name, source)
                parts[name] = cls.from_pretrained(
                    source, subfolder=name, torch_dtype=torch_dtype, **common_for(name)
                )
            elif name.startswith("tokenizer"):
                cls = _library_class(transformers, classes.get(name, _DEFAULT_CLASSES[name]), name, source)
                parts[name] = cls.from_pretrained(source, subfolder=name, **hub_kwargs)
        scheduler_config = diffusers.DDIMScheduler.load_config(source, subfolder="scheduler", **hub_kwargs)
    except OSError as exc:
        if not is_local_path(source):
            raise _hub_error("base model", source, exc) from None
        raise CheckpointError(f"cannot load base model {source!r}: {first_line(exc)}") from None
    scheduler_cls = (
        getattr(diffusers, str(scheduler_config.get("_class_name")), None) or diffusers.DDIMScheduler
    )
    parts["scheduler"] = scheduler_cls.from_config(scheduler_config)
    unet = parts["unet"]
    if unet.config.in_channels != 4:
        kind = (
            "an inpainting (9-channel)"
            if unet.config.in_channels == 9
            else f"a {unet.config.in_channels}-channel"
        )
        logger.debug("%s holds %s UNet", source, kind)
    return {name: parts[name] for name in FAMILY_COMPONENTS[family]}


def _single_file_family(path: Path, config: str | os.PathLike | None) -> str:
    """The family of a single-file checkpoint: from the config folder when given, else from its keys
    (SDXL files hold a second text encoder under ``conditioner.embedders.1``)."""
    if config is not None and (Path(config) / "unet" / "config.json").is_file():
        return detect_family(_read_json(Path(config) / "unet" / "config.json"))
    if path.suffix.lower() != ".safetensors":
        return "sd15"
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"cannot load single-file checkpoint {path.name}: {first_line(exc)}") from None
    return "sdxl" if any(k.startswith("conditioner.embedders.1.") for k in keys) else "sd15"


@contextlib.contextmanager
def quiet_warning(logger_name: str, fragment: str):
    """Within the block, drop the records of logger ``logger_name`` whose message contains ``fragment`` (a library
    warning the project answers itself, in one line); every other record passes."""

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return fragment not in record.getMessage()

    logger, drop = logging.getLogger(logger_name), Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _load_single_file(
    p: Path, torch_dtype, allow_pickle: bool, config: str | os.PathLike | None
) -> dict[str, Any]:
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise CheckpointError(
            f"{p} is a pickle-based checkpoint; pass --allow-pickle to load it if you trust the source"
        )
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"base model file must be .safetensors, got {p.name}")
    family = _single_file_family(p, config)
    pipe = _pipeline_from_single_file(p, family, torch_dtype, config)
    loaded = detect_family(pipe.unet.config)
    if loaded != family:
        # a pickle file's keys are not read before loading (that would unpickle it twice), so its family is
        # taken as SD1.5 unless a local config folder says otherwise; the config diffusers used (a hub id's)
        # built the UNet of the other family: load it again as that family
        logger.info(
            "%s holds an %s UNet: loading it as %s", p.name, FAMILY_NAMES[loaded], FAMILY_NAMES[loaded]
        )
        family = loaded
        pipe = _pipeline_from_single_file(p, family, torch_dtype, config)
    return {name: getattr(pipe, name) for name in FAMILY_COMPONENTS[family]}


def _pipeline_from_single_file(p: Path, family: str, torch_dtype, config: str | os.PathLike | None):
    """diffusers' ``from_single_file`` of the pipeline class of ``family``; its errors as one line."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype}
    if config is not None:
        kwargs["config"] = str(config)
    if family == "sdxl":
        pipeline_cls, kwargs["add_watermarker"] = StableDiffusionXLPipeline, False
    else:
        pipeline_cls = StableDiffusionPipeline
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:  # offline without --base-config, diffusers' two-line "Attempting to download" warning precedes our line
        with quiet_warning("diffusers.loaders.single_file", "no local configs were found"):
            return pipeline_cls.from_single_file(str(p), **kwargs)
    except Exception as exc:  # diffusers raises many kinds here; keep one clear line
        hint = "" if config else " (offline? pass --base-config with a local diffusers folder)"
        raise CheckpointError(
            f"cannot load single-file checkpoint {p.name}: {first_line(exc)}{hint}"
        ) from None
