"""Loading PowerPaint checkpoints (v1, v2, v2-1) in every layout they are shared in, unchanged.

``--powerpaint PATH`` names one folder; its layout tells the version (:func:`find_powerpaint`):

- **v2 / v2-1, as released** (``JunhaoZhuang/PowerPaint_v2``, ``JunhaoZhuang/PowerPaint-v2-1``): the checkpoint
  folder (or its ``PowerPaint_Brushnet/`` subfolder) with ``PowerPaint_Brushnet/diffusion_pytorch_model.safetensors``
  (the branch; no config is needed: it is built for the base UNet, as the original does) and
  ``PowerPaint_Brushnet/pytorch_model.bin`` (the branch's text encoder with the task vectors, a tensor-only
  ``torch.save`` file: read with ``torch.load(weights_only=True)``, which runs no pickled code; anything that
  needs more is refused unless ``allow_pickle``).
- **v2, diffusers folders** (IOPaint's ``Sanster/PowerPaint_v2`` repack, and what this project writes with
  :func:`save_powerpaint`): ``PowerPaint_Brushnet/`` (``config.json`` + safetensors, fp16 variant allowed) and
  ``text_encoder_brushnet/`` (a ``CLIPTextModel`` whose vocabulary holds the 30 task rows).
- **v1, as released** (``JunhaoZhuang/PowerPaint-v1``): ``unet/unet.safetensors`` (a 9-channel UNet state dict
  without config: built from the base's UNet config with 9 input channels) and
  ``text_encoder/text_encoder.safetensors`` (original task-token layout).
- **v1, diffusers folders** (e.g. ``Sanster/PowerPaint-V1-stable-diffusion-inpainting``): ``unet/`` and
  ``text_encoder/`` with their ``config.json``.

The base (``--base``) supplies the rest: for v2 the frozen SD1.5 model (the release uses RealisticVision
V6.0 B1), for v1 the VAE, tokenizer and scheduler (the original takes them from SD1.5-inpainting; any SD1.5
folder has the same ones). The tokenizers get the task placeholders added
(:func:`~brushnet.models.task_tokens.add_task_tokens`). Every load is strict: a missing or unexpected key is a
one-line :class:`~brushnet.errors.CheckpointError` — except the v2 ``.bin`` text encoder, which the original
loads non-strictly on top of SD1.5's: keys it lacks come from the base text encoder, with a warning.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, first_line
from .loading import fp16_only_variant, has_cross_attention, load_base_components, resolve_dtype

__all__ = [
    "PowerPaintFiles",
    "find_powerpaint",
    "load_powerpaint_pipeline",
    "save_powerpaint",
    "check_fits",
    "v1_unet_config",
    "BRANCH_FOLDER",
    "TEXT_ENCODER_FOLDER",
]

logger = logging.getLogger(__name__)

BRANCH_FOLDER = "PowerPaint_Brushnet"
"""The branch's folder name in every v2 layout."""
TEXT_ENCODER_FOLDER = "text_encoder_brushnet"
"""The branch text encoder's folder in the diffusers-folder v2 layout."""
RELEASED_TEXT_ENCODER = "pytorch_model.bin"


@dataclass(frozen=True)
class PowerPaintFiles:
    """What :func:`find_powerpaint` found.

    Args:
        version: ``"v1"`` or ``"v2"`` (v2-1 has the v2 layout and loads the same way).
        layout: ``"released"`` (the original's files) or ``"diffusers"`` (config.json folders).
        model: v2: the branch folder; v1: the UNet (folder, or ``unet.safetensors``).
        text_encoder: the text encoder with the task words (folder, or the released file).
    """

    version: str
    layout: str
    model: Path
    text_encoder: Path


def _weights(folder: Path) -> list[Path]:
    """The branch's safetensors files, the full-precision one first (``sorted`` alone put ``….fp16.safetensors``
    ahead of ``….safetensors``, so a folder holding both loaded the fp16 copy)."""
    return sorted(
        folder.glob("diffusion_pytorch_model*.safetensors"), key=lambda p: (".fp16." in p.name, p.name)
    )


def _is_plain_brushnet(folder: Path) -> bool:
    """Whether ``folder`` (holding branch weights but no PowerPaint text encoder) is a BrushNet checkpoint: a
    ``BrushNetModel`` config without cross-attention (PowerPaint's branch has it), or one not in a
    ``PowerPaint_Brushnet/`` folder."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return False  # the released v2 branch has no config
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(config, dict) or config.get("_class_name") != "BrushNetModel":
        return False
    return not has_cross_attention(config) or folder.name != BRANCH_FOLDER


def find_powerpaint(path: str | os.PathLike) -> PowerPaintFiles:
    """Identify the PowerPaint checkpoint at ``path`` (see the module docstring for the layouts).

    Raises:
        CheckpointError: not found, a file, or no layout matches (the message says what was looked for).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"PowerPaint checkpoint not found: {root}")
    if not root.is_dir():
        raise CheckpointError(f"PowerPaint checkpoint must be a folder, got a file: {root}")
    # v1: unet/ + text_encoder/
    if (root / "unet" / "unet.safetensors").is_file() and (
        root / "text_encoder" / "text_encoder.safetensors"
    ).is_file():
        return PowerPaintFiles(
            "v1",
            "released",
            root / "unet" / "unet.safetensors",
            root / "text_encoder" / "text_encoder.safetensors",
        )
    if (root / "unet" / "config.json").is_file() and (root / "text_encoder" / "config.json").is_file():
        return PowerPaintFiles("v1", "diffusers", root / "unet", root / "text_encoder")
    # v2: the checkpoint folder holding PowerPaint_Brushnet/, or that folder itself
    branch = root / BRANCH_FOLDER if (root / BRANCH_FOLDER).is_dir() else root
    if _weights(branch):
        for folder in (branch.parent / TEXT_ENCODER_FOLDER, root / TEXT_ENCODER_FOLDER):
            if (folder / "config.json").is_file():
                return PowerPaintFiles("v2", "diffusers", branch, folder)
        if (branch / RELEASED_TEXT_ENCODER).is_file():
            return PowerPaintFiles("v2", "released", branch, branch / RELEASED_TEXT_ENCODER)
        if branch == root and _is_plain_brushnet(root):
            raise CheckpointError(
                f"{root} is a BrushNet checkpoint, not a PowerPaint one (expected {BRANCH_FOLDER}/ with "
                f"{TEXT_ENCODER_FOLDER}/ or {RELEASED_TEXT_ENCODER}); use it with --method brushnet --brushnet {root}"
            )
        raise CheckpointError(
            f"{branch} has the PowerPaint v2 branch but not its text encoder ({RELEASED_TEXT_ENCODER} or "
            f"{TEXT_ENCODER_FOLDER}/)"
        )
    raise CheckpointError(
        f"{root} is not a PowerPaint checkpoint: expected {BRANCH_FOLDER}/ (v2, v2-1) or "
        "unet/ + text_encoder/ (v1)"
    )


# -- reading files ---------------------------------------------------------------------------------------


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, or from a tensor-only ``torch.save`` file (``weights_only``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"cannot read {path}: {first_line(exc)}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds more than tensors ({first_line(exc)}); pass --allow-pickle (allow_pickle=True) "
                "to load it if you trust the source"
            ) from None
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {path}: {first_line(exc)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state


def check_fits(
    model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: os.PathLike | str
) -> None:
    """Raise a one-line :class:`CheckpointError` unless ``state`` has exactly ``model``'s keys and shapes (works
    on the meta device, so the released layouts can be checked without their weights)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the {what}: {len(missing)} missing keys, {len(unexpected)} unexpected keys "
            f"(first: {(missing or unexpected)[0]!r})"
        )
    bad = [k for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(
            f"{path} does not fit the {what}: {bad[0]} is {tuple(state[bad[0]].shape)}, "
            f"expected {tuple(own[bad[0]].shape)}"
        )


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """Load ``state`` into a model built on the meta device, every key and shape checked."""
    check_fits(model, state, what, path)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise RuntimeError(f"the {what} kept a tensor the checkpoint does not hold")


def v1_unet_config(base_unet_config) -> dict:
    """The config of a released PowerPaint v1 UNet (no config is shipped): the base's SD1.5 UNet config with 9
    input channels (noisy latent 4, mask 1, masked-image latent 4), as SD1.5-inpainting's."""
    config = {k: v for k, v in dict(base_unet_config).items() if not k.startswith("_")}
    return {**config, "in_channels": 9}


def _task_tokenizer(tokenizer, text_encoder, path: Path):
    from .models.task_tokens import add_task_tokens

    tokenizer = copy.deepcopy(tokenizer)
    add_task_tokens(tokenizer)
    if len(tokenizer) != text_encoder.config.vocab_size:
        raise CheckpointError(
            f"{path}: the text encoder has {text_encoder.config.vocab_size} token rows, but the base tokenizer "
            f"with the 30 task tokens has {len(tokenizer)}; use the base this PowerPaint was trained with"
        )
    return tokenizer


def _text_encoder(files: PowerPaintFiles, base_encoder, allow_pickle: bool):
    """The text encoder with the task rows (a ``CLIPTextModel``, float32)."""
    from transformers import CLIPTextModel

    from .models.task_tokens import text_encoder_from_original

    path = files.text_encoder
    if path.is_dir():
        variant = None if list(path.glob("model.safetensors")) else "fp16"
        try:
            return CLIPTextModel.from_pretrained(path, torch_dtype=torch.float32, variant=variant).eval()
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the text encoder {path}: {first_line(exc)}") from None
    state = _read_tensors(path, allow_pickle)
    fallback = None
    if files.version == "v2":  # the original loads it non-strictly on top of SD1.5's text encoder
        fallback = {k: v.float() for k, v in base_encoder.state_dict().items()}
    try:
        encoder, filled = text_encoder_from_original(state, base_encoder.config, fallback=fallback)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if filled:
        logger.warning(
            "%s lacks %d of the text encoder's tensors (first: %s); they come from the base's text encoder",
            path,
            len(filled),
            filled[0],
        )
    return encoder


def _v2_branch(files: PowerPaintFiles, unet):
    from .models.brushnet import BrushNetModel

    folder = files.model
    if (folder / "config.json").is_file():
        variant = fp16_only_variant(folder)
        try:
            branch = BrushNetModel.from_pretrained(folder, torch_dtype=torch.float32, variant=variant)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the PowerPaint branch {folder}: {first_line(exc)}") from None
    else:  # as released: no config; the original builds the branch from the SD1.5 UNet
        path = _weights(folder)[0]
        with torch.device("meta"):
            branch = BrushNetModel.from_config(
                BrushNetModel.config_from_unet(unet.config, cross_attention=True)
            )
        _load_strict(
            branch, _read_tensors(path, False), "PowerPaint v2 branch (built for the base UNet)", path
        )
    if not branch.uses_text:
        raise CheckpointError(
            f"{folder} holds a BrushNet without cross-attention, not a PowerPaint v2 branch"
        )
    return branch.eval()


def _v1_unet(files: PowerPaintFiles, base_unet):
    from diffusers import UNet2DConditionModel

    if files.layout == "diffusers":
        try:
            unet = UNet2DConditionModel.from_pretrained(files.model, torch_dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot load the PowerPaint v1 UNet {files.model}: {first_line(exc)}"
            ) from None
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(v1_unet_config(base_unet.config))
        _load_strict(unet, _read_tensors(files.model, False), "9-channel inpainting UNet", files.model)
    if unet.config.in_channels != 9:
        raise CheckpointError(
            f"{files.model}: a PowerPaint v1 UNet has 9 input channels, this one has {unet.config.in_channels}"
        )
    return unet.eval()


def load_powerpaint_pipeline(
    powerpaint: str | os.PathLike,
    base: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    base_config: str | os.PathLike | None = None,
) -> tuple[Any, PowerPaintFiles]:
    """The PowerPaint pipeline of the checkpoint at ``powerpaint`` on the base at ``base``.

    Args:
        powerpaint: a PowerPaint folder in one of the layouts of the module docstring.
        base: v2: the SD1.5 base model; v1: any SD1.5 (or SD1.5-inpainting) folder for the VAE, tokenizer,
            scheduler and the UNet's config (its UNet and text encoder are replaced).
        dtype: weights dtype (fp32 default).
        allow_pickle: allow a released ``.bin`` that holds more than tensors, and pickle-based base weights.
        base_config: config folder for a single-file base.

    Returns:
        ``(pipeline, files)``: a :class:`~brushnet.pipelines.StableDiffusionPowerPaintBrushNetPipeline` (v2) or
        :class:`~brushnet.pipelines.StableDiffusionPowerPaintInpaintPipeline` (v1), on the CPU; and what was
        found.

    Raises:
        CheckpointError: a missing or unrecognised checkpoint, a key that does not fit, a base of another
            family.
    """
    from .loading import detect_family

    files = find_powerpaint(powerpaint)
    torch_dtype = resolve_dtype(dtype)
    components = load_base_components(
        base, dtype=torch.float32, allow_pickle=allow_pickle, config=base_config
    )
    if detect_family(components["unet"].config) != "sd15":
        raise CheckpointError("PowerPaint is made for SD1.5 bases; this base is SDXL")
    text_encoder = _text_encoder(files, components["text_encoder"], allow_pickle)
    tokenizer = _task_tokenizer(components["tokenizer"], text_encoder, files.text_encoder)
    if files.version == "v2":
        from .pipelines.pipeline_powerpaint import StableDiffusionPowerPaintBrushNetPipeline

        pipe = StableDiffusionPowerPaintBrushNetPipeline(
            **components,
            brushnet=_v2_branch(files, components["unet"]),
            text_encoder_brushnet=text_encoder,
            tokenizer_brushnet=tokenizer,
            safety_checker=None,
        )
    else:
        from .pipelines.pipeline_powerpaint_v1 import StableDiffusionPowerPaintInpaintPipeline

        pipe = StableDiffusionPowerPaintInpaintPipeline(
            vae=components["vae"],
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=_v1_unet(files, components["unet"]),
            scheduler=components["scheduler"],
        )
    if torch_dtype != torch.float32:
        pipe = pipe.to(dtype=torch_dtype)
    return pipe, files


def save_powerpaint(out_dir: str | os.PathLike, brushnet, text_encoder_brushnet) -> Path:
    """Write a PowerPaint v2 branch and its text encoder as diffusers folders (``PowerPaint_Brushnet/`` and
    ``text_encoder_brushnet/``, safetensors; the layout IOPaint shares), loadable by
    :func:`load_powerpaint_pipeline`."""
    out = Path(out_dir)
    brushnet.save_pretrained(out / BRANCH_FOLDER)
    text_encoder_brushnet.save_pretrained(out / TEXT_ENCODER_FOLDER)
    return out
