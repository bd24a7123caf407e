"""Loading base models and BrushNet branches from local folders, hub ids or single files.

Only ``.safetensors`` weights load unless the caller passes ``allow_pickle=True`` (pickle-based ``.bin``/
``.ckpt``/``.pt`` files can run code when loaded). A checkpoint of the wrong kind gets a one-line error that
says what was found and what was expected.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .image import InputError

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "resolve_dtype", "load_base_components", "load_brushnet", "describe_folder"]

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class CheckpointError(InputError):
    """A checkpoint that is missing, of the wrong kind, or pickle-based without permission."""


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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc.__class__.__name__}") from None


def describe_folder(path: Path) -> str:
    """What kind of diffusers folder ``path`` is: 'pipeline:<class>', a model class name, or 'unknown'."""
    if (path / "model_index.json").is_file():
        return "pipeline:" + str(_read_json(path / "model_index.json").get("_class_name", "?"))
    if (path / "config.json").is_file():
        return str(_read_json(path / "config.json").get("_class_name", "unknown"))
    return "unknown"


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickled and not allow_pickle:
        raise CheckpointError(
            f"{folder} has only pickle-based weights ({pickled[0]}); pass --allow-pickle (allow_pickle=True) "
            "to load them if you trust the source"
        )
    if not pickled:
        raise CheckpointError(f"{folder} has no weight file (.safetensors)")


def _is_local(path: str | os.PathLike) -> bool:
    p = str(path)
    return os.path.exists(p) or p.startswith((".", "/", "~")) or os.sep in p and not _looks_like_hub_id(p)


def _looks_like_hub_id(p: str) -> bool:
    parts = p.split("/")
    return len(parts) == 2 and all(parts) and not p.startswith((".", "/"))


def load_brushnet(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    **hub_kwargs: Any,
):
    """Load a :class:`~brushnet.models.BrushNetModel` from a folder (``config.json`` + weights) or a hub id.

    Raises:
        CheckpointError: missing path, a UNet/pipeline/other model folder, or pickle weights without permission.
    """
    from .models.brushnet import BrushNetModel

    torch_dtype = resolve_dtype(dtype)
    if _is_local(path):
        folder = Path(path).expanduser() / (subfolder or "")
        if not folder.exists():
            raise CheckpointError(f"BrushNet checkpoint not found: {folder}")
        if not folder.is_dir():
            raise CheckpointError(
                f"BrushNet checkpoint must be a folder with config.json, got a file: {folder}"
            )
        kind = describe_folder(folder)
        if kind.startswith("pipeline:"):
            if (folder / "brushnet" / "config.json").is_file():
                folder = folder / "brushnet"
                kind = describe_folder(folder)
            else:
                raise CheckpointError(
                    f"{folder} is a full {kind[9:]} folder, not a BrushNet checkpoint; pass it as the base model"
                )
        if kind != "BrushNetModel":
            raise CheckpointError(f"{folder} holds a {kind}, not a BrushNetModel checkpoint")
        _check_weights(folder, allow_pickle)
        return BrushNetModel.from_pretrained(
            folder, torch_dtype=torch_dtype, use_safetensors=not allow_pickle
        )
    try:
        return BrushNetModel.from_pretrained(
            str(path),
            subfolder=subfolder,
            torch_dtype=torch_dtype,
            use_safetensors=not allow_pickle,
            **hub_kwargs,
        )
    except OSError as exc:
        raise CheckpointError(
            f"cannot load BrushNet {path!r} from the hub: {str(exc).splitlines()[0]}"
        ) from None


BASE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


def load_base_components(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    config: str | os.PathLike | None = None,
    **hub_kwargs: Any,
) -> dict[str, Any]:
    """Load a Stable Diffusion base model's components: ``vae, text_encoder, tokenizer, unet, scheduler``.

    Args:
        path: a diffusers folder (``model_index.json``), a hub id, or a single ``.safetensors`` checkpoint
            (original SD layout, as community models are shared).
        dtype: weights dtype (fp32 default).
        allow_pickle: allow ``.bin``/``.ckpt`` weights.
        config: for single files: a local diffusers folder (or hub id) with the model's configs; needed
            offline, since diffusers otherwise fetches the SD1.5 configs from the hub.

    Raises:
        CheckpointError: missing path, wrong kind (e.g. a BrushNet or UNet folder), pickle without permission.
    """
    from diffusers import StableDiffusionPipeline

    torch_dtype = resolve_dtype(dtype)
    p = Path(path).expanduser()
    if _is_local(path):
        if not p.exists():
            raise CheckpointError(f"base model not found: {p}")
        if p.is_file():
            suffix = p.suffix.lower()
            if suffix in PICKLE_SUFFIXES and not allow_pickle:
                raise CheckpointError(
                    f"{p} is a pickle-based checkpoint; pass --allow-pickle to load it if you trust the source"
                )
            if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
                raise CheckpointError(f"base model file must be .safetensors, got {p.name}")
            kwargs: dict[str, Any] = {"torch_dtype": torch_dtype}
            if config is not None:
                kwargs["config"] = str(config)
            try:
                pipe = StableDiffusionPipeline.from_single_file(
                    str(p), safety_checker=None, requires_safety_checker=False, **kwargs
                )
            except Exception as exc:  # diffusers raises many kinds here; keep one clear line
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
                hint = "" if config else " (offline? pass --base-config with a local diffusers folder)"
                raise CheckpointError(f"cannot load single-file checkpoint {p.name}: {first}{hint}") from None
            return {name: getattr(pipe, name) for name in BASE_COMPONENTS}
        kind = describe_folder(p)
        if not kind.startswith("pipeline:"):
            raise CheckpointError(
                f"{p} holds a {kind}, not a full base model folder (model_index.json with vae, unet, ...)"
            )
        missing = [c for c in BASE_COMPONENTS if not (p / c).is_dir()]
        if missing:
            raise CheckpointError(f"base model folder {p} lacks: {', '.join(missing)}")
        for name in ("vae", "text_encoder", "unet"):
            _check_weights(p / name, allow_pickle)
    return _load_components(str(p) if _is_local(path) else str(path), torch_dtype, allow_pickle, hub_kwargs)


def _load_components(source: str, torch_dtype, allow_pickle: bool, hub_kwargs) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common = {"use_safetensors": not allow_pickle, **hub_kwargs}
    try:
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=torch_dtype, **common
        )
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype, **common)
        text_encoder = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", torch_dtype=torch_dtype, **common
        )
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub_kwargs)
        scheduler_config = DDIMScheduler.load_config(source, subfolder="scheduler", **hub_kwargs)
    except OSError as exc:
        raise CheckpointError(
            f"cannot load base model {source!r}: {str(exc).strip().splitlines()[0]}"
        ) from None
    import diffusers

    scheduler_cls = (
        getattr(diffusers, str(scheduler_config.get("_class_name")), None) or diffusers.DDIMScheduler
    )
    scheduler = scheduler_cls.from_config(scheduler_config)
    if unet.config.in_channels != 4:
        kind = (
            "an inpainting (9-channel)"
            if unet.config.in_channels == 9
            else f"a {unet.config.in_channels}-channel"
        )
        logger.info("base model %s has %s UNet", source, kind)
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
    }
