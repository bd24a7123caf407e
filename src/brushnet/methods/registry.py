"""The registry of methods, discovered from their declarations.

A method is found, with nothing to list anywhere else, when its class is decorated with
:func:`register_method` in

- a module of the :mod:`brushnet.methods.builtin` package (adding a built-in method = adding one file there), or
- a module named by an entry point of the group ``brushnet.methods`` (a method in another package), or
- any module the caller imports before using the registry.

Discovery imports only declarations (method modules import torch inside their functions), so the CLI can
build its flags from the registry and still start instantly.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..errors import InputError
from .base import InpaintMethod, ModelPaths, ModelSlot, validation_message
from .lora import _loras_for, apply_loras

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "register_method",
    "available_methods",
    "get_method_class",
    "method_classes",
    "model_slots",
    "load_method",
    "ENTRY_POINT_GROUP",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "brushnet.methods"
_REGISTRY: dict[str, type[InpaintMethod]] = {}
_discovered = False


def register_method(cls: type[InpaintMethod]) -> type[InpaintMethod]:
    """Class decorator: make ``cls`` available under ``cls.name`` (its declaration is checked here)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} must declare a non-empty `name`")
    if getattr(cls.Options, "model_config", {}).get("extra") != "forbid":
        raise TypeError(f"{cls.__name__}.Options must forbid unknown fields (model_config extra='forbid')")
    for slot in (*cls.models, *cls.optional_models):
        if not isinstance(slot, ModelSlot):
            raise TypeError(f"{cls.__name__}.models must hold ModelSlot declarations, got {slot!r}")
    previous = _REGISTRY.get(name)
    if previous is not None and previous.__qualname__ != cls.__qualname__:
        raise ValueError(f"two methods are named {name!r}: {previous.__module__} and {cls.__module__}")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    from . import builtin

    for module in pkgutil.iter_modules(builtin.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{builtin.__name__}.{module.name}")
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not break the built-in methods
            logger.warning("method plug-in %s could not be loaded: %s", entry.value, exc)
            continue
        if isinstance(loaded, type) and issubclass(loaded, InpaintMethod):
            register_method(loaded)


def method_classes() -> dict[str, type[InpaintMethod]]:
    """Every registered method class by name, sorted by name."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def available_methods() -> list[str]:
    """Names of every method this installation provides."""
    return list(method_classes())


def get_method_class(name: str) -> type[InpaintMethod]:
    """The class of method ``name``.

    Raises:
        InputError: unknown name, listing the known ones.
    """
    classes = method_classes()
    if name not in classes:
        raise InputError(f"unknown method {name!r}; choose one of: {', '.join(classes)}")
    return classes[name]


def model_slots() -> dict[str, ModelSlot]:
    """Every model slot any method declares, by name (the CLI has one flag for each)."""
    slots: dict[str, ModelSlot] = {}
    for cls in method_classes().values():
        for slot in (*cls.models, *cls.optional_models):
            known = slots.setdefault(slot.name, slot)
            if known != slot:
                raise TypeError(f"model slot {slot.name!r} is declared twice, differently ({cls.__name__})")
    return slots


def load_method(
    name: str,
    models: ModelPaths | dict[str, Any],
    device: str = "cpu",
    dtype: str | torch.dtype = "fp32",
) -> InpaintMethod:
    """Load method ``name`` from the given model paths (see :class:`ModelPaths`).

    Before anything loads, it checks the device and dtype, and every model's config (a local folder's, the config
    folder of a single-file base or else the file's tensor names, a hub id's in the local cache): a branch folder
    of another kind (a UNet, a ControlNet, a missing path), a model of a family the method has no form for, a
    branch that does not fit the base (an SDXL branch for an SD1.5 base) and any model of the other family than
    the base's (an SD1.5 ControlNet with an SDXL base) are each one line.

    ``models.loras`` (``[(path, scale), ...]``) are fused into the method's base UNet in order, each at its scale,
    after it loads (diffusers' LoRA loader, so kohya and older diffusers files load too); a LoRA's text-encoder part
    as well where the installed peft can load it (else a warning). Before anything loads each is checked: the file
    (``.safetensors``; pickle-based only with ``allow_pickle``), that it is a LoRA, and, where the UNet's config is
    readable, that it is of the base's family (after loading otherwise).

    Raises:
        InputError: unknown method, a model it needs is missing, models not a dict, an unknown or absent device,
            a dtype that is not fp32 / fp16 / bf16, LoRAs for a method that takes none.
        CheckpointError: a checkpoint of the wrong kind or family; a LoRA that is missing, not a LoRA, pickle-based
            without ``allow_pickle``, or of another family than the base.
    """
    cls = get_method_class(name)
    if isinstance(models, dict):
        try:
            models = ModelPaths(**models)
        except ValidationError as exc:
            raise InputError(validation_message(exc, "model paths")) from None
    elif not isinstance(models, ModelPaths):
        raise InputError(f"models must be a dict of paths or a ModelPaths, got {type(models).__name__}")
    models.require(cls)
    unused = models.unread(cls)
    if unused:  # one set of paths for several methods is fine; each takes what it reads
        logger.warning(
            "method %r does not read %s; ignored (it reads %s)",
            name,
            ", ".join(unused),
            ", ".join(slot for slot in models.used_by(cls) if slot not in ("allow_pickle", "loras")),
        )
    if models.get("base_config") is not None and "base_config" in models.used_by(cls):
        single = [
            slot
            for slot in ("base", "inpaint_model")
            if slot in models.used_by(cls) and Path(str(models.get(slot))).expanduser().is_file()
        ]
        if not single:
            raise InputError(
                "--base-config is read only for a single-file --base or --inpaint-model (.safetensors / .ckpt); "
                f"{', '.join(f'{slot} {models.get(slot)}' for slot in ('base', 'inpaint_model') if models.get(slot))} "
                "carries its own config: drop --base-config"
            )
    from ..devices import resolve_device
    from ..errors import CheckpointError
    from ..loading import (
        FAMILY_NAMES,
        brushnet_folder,
        check_brushnet_fits_base,
        describe_folder,
        peek_family,
        peek_unet_config,
        refuse_cross_attention_branch,
        resolve_dtype,
        where,
    )
    from ..loading import is_local_path as is_local
    from ..model_files import check_config_types, read_config

    resolve_device(device)  # an unknown or absent device, before anything loads
    try:
        torch_dtype = resolve_dtype(dtype)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if not torch_dtype.is_floating_point:
        raise InputError(f"dtype {dtype!r} is not a floating-point type; choose one of: fp32, fp16, bf16")
    import torch

    if torch_dtype == torch.float16 and torch.device(device).type == "cpu":
        logger.warning(
            "fp16 on the CPU runs, but several times slower than fp32 (most CPUs have no fast float16 kernels; "
            "the README's high-level example took 70 s against 8 s): use fp32 on the CPU"
        )

    def refuse(family: str) -> None:
        runs_on = " and ".join(FAMILY_NAMES.get(f, f) for f in cls.families)
        raise CheckpointError(
            f"method {name!r} has no {FAMILY_NAMES.get(family, family)} form (it runs on {runs_on} models); use "
            "another method or a base of that family"
        )

    # every model's config, before anything loads: the family of each (a local folder's config, a single file's
    # tensor names, a cached hub id's config), a branch of the right kind, and every model of the base's family
    config_folder = models.get("base_config")
    families: dict[str, str] = {}
    for slot in (*cls.models, *cls.optional_models):
        path = models.get(slot.name)
        if (
            slot.name == "base"
            and path is not None
            and is_local(path)
            and not Path(path).expanduser().exists()
        ):
            raise CheckpointError(f"base model not found: {where(path)}")  # the base loader's words, first
        if slot.name == "brushnet" and path is not None and is_local(path):
            branch = brushnet_folder(path, into_pipeline=True)  # missing, a UNet, a ControlNet, ...: one line
            refuse_cross_attention_branch(branch)
            unet_config = peek_unet_config(models.get("base"), config_folder)
            if unet_config is not None:
                # the branch against the base UNet's config: the message the loader gives after loading the base
                from diffusers import UNet2DConditionModel

                from ..models.brushnet import BrushNetModel

                config, base_config = read_config(branch / "config.json"), read_config(unet_config)
                check_config_types(BrushNetModel, config, branch / "config.json")
                check_config_types(UNet2DConditionModel, base_config, unet_config)
                check_brushnet_fits_base(config, base_config)
        base_like = slot.name in ("base", "inpaint_model")  # a single file of these is a whole model
        if path is not None and (base_like or not Path(path).expanduser().is_file()):
            family = peek_family(path, config_folder if base_like else None)
            if family is not None:
                families[slot.name] = family
    for family in families.values():
        if family not in cls.families:
            refuse(family)
    base_family = families.get("base")
    for slot in (*cls.models, *cls.optional_models):
        family = families.get(slot.name)
        if base_family is None or family in (None, base_family) or slot.name in ("base", "base_config"):
            continue
        path = models.get(slot.name)
        kind = describe_folder(Path(path).expanduser()) if is_local(path) else "unknown"
        what = kind.removesuffix("Model") if kind.endswith("Model") else f"{slot.flag} model"
        base_name = FAMILY_NAMES[base_family]
        raise CheckpointError(
            f"this {FAMILY_NAMES[family]} {what} ({path}) does not fit the {base_name} base ({models.get('base')}); "
            f"use an {base_name} {what} with this base"
        )
    loras = _loras_for(cls, models)
    method = cls.load(models, device=device, dtype=dtype)
    if method.family not in cls.families:
        refuse(method.family)
    if loras:
        apply_loras(method, cls, models, loras)
    method.model_paths = models
    return method
