"""LoRAs through the methods layer (``load_method(..., {"loras": [(path, scale), ...]})``, ``--lora PATH[:SCALE]``):
finding and checking the weights file before any model loads (a LoRA, of the base's family, the recorded file),
what a result records of each, and fusing them into a loaded pipeline's UNet."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from ..errors import InputError
from .base import InpaintMethod, LoraSpec, ModelPaths

logger = logging.getLogger(__name__)

__all__ = ["LORA_WEIGHT_NAME", "lora_file", "lora_records", "apply_loras", "fuse_loras"]


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""The file diffusers' ``save_lora_weights`` writes into a LoRA folder."""

# the input factor of a cross-attention key projection, in diffusers/PEFT (`attn2.to_k.lora_A.weight`), older
# diffusers (`attn2.to_k.lora.down.weight`, `attn2.processor.to_k_lora.down.weight`) and kohya
# (`..._attn2_to_k.lora_down.weight`) names: its second dimension is the width of the text the UNet reads
_CROSS_ATTENTION_FACTOR = re.compile(
    r"attn2[._](?:processor[._])?to_k(?:_lora)?[._](?:lora_A|lora_down|lora[._]down|down)\.weight$"
)
_TEXT_WIDTHS = {768: "an SD1.x", 1024: "an SD2.x", 2048: "an SDXL"}
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _hub_lora(repo_id: str) -> Path:
    """The snapshot folder of hub LoRA ``repo_id`` holding its ``pytorch_lora_weights.safetensors``: from the local
    Hugging Face cache, else downloaded (that one file); offline or unreachable and not cached, one line saying so.
    A cached repo without that file gives its snapshot folder, so that its only ``.safetensors`` file is used."""
    from ..errors import CheckpointError
    from ..loading import _cached_file, _check_hub_reachable

    cached = _cached_file(repo_id, LORA_WEIGHT_NAME)
    if cached is not None:
        return cached.parent
    snapshot = _cached_snapshot(repo_id)
    if snapshot is not None and any(snapshot.glob("*.safetensors")):
        return snapshot
    _check_hub_reachable(
        "LoRA", repo_id, LORA_WEIGHT_NAME, instead="a local .safetensors file or a folder holding one instead"
    )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, LORA_WEIGHT_NAME)).parent
    except Exception as exc:  # noqa: BLE001 - missing repo or file, gated repo, network
        raise CheckpointError(
            f"cannot fetch LoRA {repo_id!r} from the hub ({type(exc).__name__}): it needs a "
            f"{LORA_WEIGHT_NAME}; for another file name, download it and pass its path"
        ) from None


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local cache's snapshot folder of hub model ``repo_id`` at ``main``, or None (nothing is fetched)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or a malformed id: the hub lookup that follows reports it
        return None


def lora_file(path: str, allow_pickle: bool = False) -> Path:
    """The weights file of LoRA ``path``: the file itself or, in a folder, diffusers' ``pytorch_lora_weights.
    safetensors``, else the folder's only ``.safetensors`` file (with ``allow_pickle``: its only ``.bin``/``.ckpt``
    file, when it has no ``.safetensors``). A hub id (``owner/name``, where no such local path exists) is that
    repo's folder in the local Hugging Face cache, or its ``pytorch_lora_weights.safetensors`` downloaded.

    Raises:
        CheckpointError: missing, a folder with none or several, pickle-based without ``allow_pickle``, another
            format; a hub id offline and not cached.
    """
    from ..errors import CheckpointError
    from ..loading import _looks_like_hub_id, where
    from ..model_files import PICKLE_SUFFIXES

    file = Path(path).expanduser()
    weights = (".safetensors", *PICKLE_SUFFIXES)
    if not file.exists() and _looks_like_hub_id(str(path)) and not str(path).lower().endswith(weights):
        file = _hub_lora(str(path))
    if file.is_dir():
        found = {
            kind: sorted(f.name for f in file.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
            for kind, suffixes in (("safetensors", (".safetensors",)), ("pickle", PICKLE_SUFFIXES))
        }
        if (file / LORA_WEIGHT_NAME).is_file():
            file = file / LORA_WEIGHT_NAME
        elif len(found["safetensors"]) == 1:
            file = file / found["safetensors"][0]
        elif found["safetensors"]:
            raise CheckpointError(
                f"LoRA folder {path} holds {len(found['safetensors'])} .safetensors files "
                f"({', '.join(found['safetensors'][:3])}, ...): give the one to load"
            )
        elif len(found["pickle"]) == 1:
            file = file / found["pickle"][0]
        else:
            raise CheckpointError(f"LoRA folder {path} holds no .safetensors file ({LORA_WEIGHT_NAME})")
    elif not file.is_file():
        raise CheckpointError(
            f"LoRA not found: {where(path)} (a local .safetensors file, a folder holding one, or a hub id "
            "owner/name)"
        )
    suffix = file.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise CheckpointError(
            f"LoRA {file} is pickle-based ({suffix}); pass --allow-pickle (allow_pickle=True) to load it if you "
            "trust the source"
        )
    if suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise CheckpointError(
            f"LoRA {file} is not a .safetensors file (nor, with --allow-pickle, .bin or .ckpt)"
        )
    return file


def _lora_text_widths(file: Path) -> set[int]:
    """The widths of the text a ``.safetensors`` LoRA's cross-attention layers read (768 for SD1.x, 2048 for SDXL;
    empty when it has none), from the file's header alone; a pickle file is not opened here.

    Raises:
        CheckpointError: not a safetensors file, truncated, or no LoRA (no tensor of a LoRA's).
    """
    import json

    from ..errors import CheckpointError
    from ..model_files import safetensors_keys

    if file.suffix.lower() != ".safetensors":
        return set()
    keys = safetensors_keys(file)  # empty, truncated, not a safetensors file: one line each
    if not any("lora" in key.lower() for key in keys):
        whole = any(key.startswith(("model.diffusion_model.", "conv_in.", "down_blocks.")) for key in keys)
        what = "; it is a whole model's weights" if whole else ""
        raise CheckpointError(
            f"{file} is not a LoRA: none of its {len(keys)} tensors is a LoRA factor (lora_A/lora_B, "
            f"lora_down/lora_up){what}"
        )
    with open(file, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return {
        int(entry["shape"][1])
        for key, entry in header.items()
        if _CROSS_ATTENTION_FACTOR.search(key) and len(entry.get("shape", ())) == 2
    }


def _check_lora_fits(lora: LoraSpec, widths: set[int], unet_config: Any, unet_path: str) -> None:
    """A LoRA whose cross-attention reads text of another width than the UNet's is of another family (an SDXL
    LoRA on an SD1.5 base): one line, before diffusers' size-mismatch error."""
    from ..errors import CheckpointError

    width = dict(unet_config).get("cross_attention_dim")  # a config.json's dict, or a loaded UNet's config
    if isinstance(width, (list, tuple)):
        width = width[0]
    if not widths or width is None or widths == {width}:
        return

    def kind(text_width: int) -> str:
        family = _TEXT_WIDTHS.get(text_width)
        return (
            f"{family} UNet (text {text_width} wide)" if family else f"a UNet reading text {text_width} wide"
        )

    raise CheckpointError(
        f"LoRA {lora.path} was made for {kind(max(widths))}; {unet_path} is {kind(width)}: use a LoRA made for "
        "its family"
    )


def _sha256(file: Path) -> str:
    """The SHA-256 of ``file``'s bytes, computed once per process for each (path, size, modification time)."""
    import hashlib

    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def lora_records(loras: list[LoraSpec]) -> list[dict[str, Any]]:
    """What a result records of each LoRA (:meth:`ModelPaths.used_by`): the path as given, the scale, and the
    SHA-256 of its weights file (None where that cannot be read; loading it says why)."""
    records = []
    for lora in loras:
        try:
            digest = _sha256(lora_file(lora.path, allow_pickle=True))
        except (OSError, InputError):
            digest = None
        records.append({"path": lora.path, "scale": lora.scale, "sha256": digest})
    return records


def _unet_slot(cls: type[InpaintMethod]) -> str | None:
    """The model slot whose UNet a method's LoRAs go into: its base, or its inpainting model."""
    return next((slot.name for slot in cls.models if slot.name in ("base", "inpaint_model")), None)


def _loras_for(cls: type[InpaintMethod], models: ModelPaths) -> list[tuple[LoraSpec, Path, set[int]]]:
    """Each LoRA of ``models`` with its weights file and the text widths it reads, checked before any model loads:
    the method takes LoRAs, the file (:func:`lora_file`), that it is a LoRA, that it is the one recorded
    (``sha256``), and, where the UNet's config can be read this early, its family."""
    from ..errors import CheckpointError
    from ..loading import peek_unet_config
    from ..model_files import read_config
    from .latent_method import LatentMethod
    from .pipeline_method import PipelineMethod

    if not models.loras:
        return []
    if not issubclass(cls, (PipelineMethod, LatentMethod)):
        raise InputError(
            f"method {cls.name!r} takes no LoRA (a LoRA is fused into a diffusers pipeline's UNet, which this "
            "method does not run on): drop --lora or choose another --method"
        )
    slot = _unet_slot(cls)
    unet_config = peek_unet_config(models.get(slot), models.get("base_config")) if slot else None
    checked = []
    for lora in models.loras:
        file = lora_file(lora.path, models.allow_pickle)
        widths = _lora_text_widths(file)
        if lora.sha256 is not None and lora.sha256 != _sha256(file):
            raise CheckpointError(
                f"LoRA {lora.path} is not the file recorded: its sha256 is {_sha256(file)[:16]}..., the record's "
                f"{lora.sha256[:16]}..."
            )
        if unet_config is not None:
            _check_lora_fits(lora, widths, read_config(unet_config), f"the {slot} ({models.get(slot)})")
        checked.append((lora, file, widths))
    return checked


def _text_encoder_lora_problem() -> str | None:
    """Why the installed peft cannot put a LoRA on transformers' text encoders, or None when it can."""
    import peft
    from packaging.version import Version
    from transformers.integrations import peft as transformers_peft

    needed = transformers_peft.MIN_PEFT_VERSION
    if Version(peft.__version__) < Version(needed):
        return (
            f"text-encoder LoRA needs peft >= {needed} with this transformers (installed: {peft.__version__})"
        )
    return None


def fuse_loras(pipeline: Any, loras: list[tuple[Path, float, str]]) -> None:
    """Fuse LoRAs into ``pipeline.unet`` in order, each at its scale, and drop the adapters: the UNet is a plain one
    again with changed weights, so no step costs more and nothing else (attention processors, call counters,
    ``torch.compile``) meets a LoRA layer. diffusers' LoRA loader reads the file (so kohya and older diffusers
    formats load too). A LoRA's text-encoder part is fused the same way where the installed peft can load it;
    otherwise it is left out with a warning.

    Args:
        pipeline: a diffusers pipeline with the LoRA loader mixin (``load_lora_weights``).
        loras: ``(weights file, scale, the path as given)`` each.

    Raises:
        CheckpointError: a LoRA diffusers cannot read or that does not fit the UNet, one that changes no layer of
            it, or one that gives NaN weights.
    """
    from ..errors import CheckpointError, first_line
    from ..loading import quiet_warning

    text_problem = _text_encoder_lora_problem()
    for index, (file, scale, shown) in enumerate(loras):
        name = f"lora_{index}"
        try:
            state_dict, alphas = pipeline.lora_state_dict(
                str(file), use_safetensors=file.suffix.lower() == ".safetensors"
            )
        except Exception as exc:  # noqa: BLE001 - diffusers' conversions raise many kinds
            raise CheckpointError(f"LoRA {shown} cannot be read as a LoRA: {first_line(exc)}") from None
        encoders = [
            encoder
            for encoder in ("text_encoder", "text_encoder_2")
            if getattr(pipeline, encoder, None) is not None
            and any(key.startswith(f"{encoder}.") for key in state_dict)
        ]
        if encoders and text_problem is not None:
            count = sum(key.startswith(tuple(f"{e}." for e in encoders)) for key in state_dict)
            logger.warning(
                "LoRA %s: its text-encoder part (%d tensors) is not loaded, only its UNet part: %s",
                shown,
                count,
                text_problem,
            )
            encoders = []
        try:
            # the project says what went wrong in one line: diffusers' own log lines about it are dropped
            with (
                quiet_warning("diffusers.loaders.peft", "was unsuccessful with the following error"),
                quiet_warning("diffusers.loaders.peft", "No LoRA keys associated"),
            ):
                pipeline.load_lora_into_unet(
                    state_dict,
                    network_alphas=alphas,
                    unet=pipeline.unet,
                    adapter_name=name,
                    _pipeline=pipeline,
                )
            for encoder in encoders:
                pipeline.load_lora_into_text_encoder(
                    state_dict,
                    network_alphas=alphas,
                    text_encoder=getattr(pipeline, encoder),
                    prefix=encoder,
                    adapter_name=name,
                    _pipeline=pipeline,
                )
        except Exception as exc:  # noqa: BLE001 - PEFT's size mismatches and missing modules, one line each
            pipeline.unload_lora_weights()
            # torch's "Error(s) in loading state_dict for X:" names the first mismatch on its next line
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            reason = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
            raise CheckpointError(f"LoRA {shown} does not fit this model's UNet: {reason}") from None
        loaded = [
            c for c in ("unet", *encoders) if name in (getattr(getattr(pipeline, c), "peft_config", {}) or {})
        ]
        if "unet" not in loaded:
            pipeline.unload_lora_weights()
            raise CheckpointError(
                f"LoRA {shown} changes no layer of this model's UNet (it has no UNet tensors)"
            )
        try:
            pipeline.fuse_lora(components=loaded, lora_scale=scale, adapter_names=[name], safe_fusing=True)
        except ValueError as exc:  # safe_fusing: NaN in the merged weights
            pipeline.unload_lora_weights()
            raise CheckpointError(
                f"LoRA {shown} at scale {scale:g} gives NaN weights: {first_line(exc)}"
            ) from None
        pipeline.unload_lora_weights()


def apply_loras(
    method: InpaintMethod,
    cls: type[InpaintMethod],
    models: ModelPaths,
    loras: list[tuple[LoraSpec, Path, set[int]]],
) -> None:
    """Fuse the checked LoRAs (:func:`_loras_for`) into a loaded method's pipeline, after checking the family
    against the loaded UNet where its config was not readable before loading.

    Raises:
        InputError: the method's pipeline has no LoRA loader.
        CheckpointError: as :func:`fuse_loras`, or a LoRA of another family than the loaded UNet.
    """
    pipeline = getattr(method, "pipeline", None)
    if not callable(getattr(pipeline, "load_lora_weights", None)):
        raise InputError(f"method {cls.name!r} takes no LoRA (its pipeline has no LoRA loader): drop --lora")
    slot = _unet_slot(cls)
    unet = f"the {slot} ({models.get(slot)})" if slot else "the method's UNet"
    for lora, _file, widths in loras:  # the family, where the config was not readable before loading
        _check_lora_fits(lora, widths, pipeline.unet.config, unet)
    fuse_loras(pipeline, [(file, lora.scale, lora.path) for lora, file, _widths in loras])
