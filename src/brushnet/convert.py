"""Export a diffusers SD1.5- or SDXL-layout base model to one original-layout (LDM) ``.safetensors`` file.

Community SD1.5 models are shared as single files in the original CompVis layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``); SDXL ones in
Stability's layout (the same UNet and VAE names, the UNet's added embedding as ``label_emb``, and the two text
encoders as ``conditioner.embedders.0.transformer.*`` (CLIP) and ``conditioner.embedders.1.model.*``
(OpenCLIP: fused q/k/v, ``resblocks``, transposed ``text_projection``)). This module writes those layouts
from a diffusers folder — the inverse of what ``StableDiffusionPipeline.from_single_file`` and
``StableDiffusionXLPipeline.from_single_file`` read — so the single-file loading path can be tested offline
on tiny models, and users can hand a fine-tuned base to tools that only take single files.

    brushnet convert path/to/diffusers-folder model.safetensors    # or: python -m brushnet.convert ...
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = [
    "unet_to_ldm",
    "vae_to_ldm",
    "text_encoder_to_ldm",
    "open_clip_text_encoder_to_ldm",
    "save_single_file",
]

_RESNET_UNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_VAE = {"conv_shortcut": "nin_shortcut"}
_ATTENTION_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_inside(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def _unet_key(key: str, config) -> str:
    """One diffusers UNet key -> its LDM name (without the ``model.diffusion_model.`` prefix)."""
    layers = config.layers_per_block
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time embedding
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for new, old in fixed.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    parts = key.split(".")
    if parts[0] == "down_blocks":
        i = int(parts[1])
        kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{1 + i * (layers + 1) + j}.0.{_rename_inside(rest, _RESNET_UNET)}"
        if kind == "attentions":
            return f"input_blocks.{1 + i * (layers + 1) + j}.1.{rest}"
        if kind == "downsamplers":  # downsamplers.0.conv.weight -> op.weight
            return f"input_blocks.{(i + 1) * (layers + 1)}.0.op.{rest.split('.', 1)[1]}"
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_rename_inside(rest, _RESNET_UNET)}"
        if kind == "attentions":
            return f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        i = int(parts[1])
        kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
        has_attention = "CrossAttn" in config.up_block_types[i]
        per_block = layers + 1
        if kind == "resnets":
            return f"output_blocks.{i * per_block + j}.0.{_rename_inside(rest, _RESNET_UNET)}"
        if kind == "attentions":
            return f"output_blocks.{i * per_block + j}.1.{rest}"
        if kind == "upsamplers":
            return f"output_blocks.{i * per_block + layers}.{2 if has_attention else 1}.{rest}"
    raise ValueError(f"no original-layout name for UNet key {key!r}")


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """``UNet2DConditionModel`` (SD1.5 or SDXL layout) -> ``{"model.diffusion_model.<ldm key>": tensor}``."""
    config = unet.config
    if config.addition_embed_type not in (None, "text_time") or config.class_embed_type is not None:
        raise ValueError("only SD1.5- and SDXL-layout UNets can be exported")
    return {
        "model.diffusion_model." + _unet_key(k, config): v.detach().contiguous()
        for k, v in unet.state_dict().items()
    }


def _vae_key(key: str, num_blocks: int) -> str:
    parts = key.split(".")
    side = parts[0]
    if side in ("quant_conv", "post_quant_conv"):
        return key
    rest_parts = parts[1:]
    head = rest_parts[0]
    if head in ("conv_in", "conv_out"):
        return key
    if head == "conv_norm_out":
        return f"{side}.norm_out.{'.'.join(rest_parts[1:])}"
    if head == "mid_block":
        kind, j, rest = rest_parts[1], int(rest_parts[2]), ".".join(rest_parts[3:])
        if kind == "resnets":
            return f"{side}.mid.block_{j + 1}.{_rename_inside(rest, _RESNET_VAE)}"
        return f"{side}.mid.attn_1.{_rename_inside(rest, _ATTENTION_VAE)}"
    if head in ("down_blocks", "up_blocks"):
        i, kind = int(rest_parts[1]), rest_parts[2]
        level = i if head == "down_blocks" else num_blocks - 1 - i
        name = "down" if head == "down_blocks" else "up"
        if kind == "resnets":
            j, rest = int(rest_parts[3]), ".".join(rest_parts[4:])
            return f"{side}.{name}.{level}.block.{j}.{_rename_inside(rest, _RESNET_VAE)}"
        rest = ".".join(rest_parts[4:])  # downsamplers.0.conv.weight / upsamplers.0.conv.weight
        return f"{side}.{name}.{level}.{'downsample' if name == 'down' else 'upsample'}.{rest}"
    raise ValueError(f"no original-layout name for VAE key {key!r}")


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """``AutoencoderKL`` -> ``{"first_stage_model.<ldm key>": tensor}`` (attention projections as 1×1 convs)."""
    num_blocks = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        name = _vae_key(key, num_blocks)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + name] = value.detach().contiguous()
    return out


def text_encoder_to_ldm(
    text_encoder, prefix: str = "cond_stage_model.transformer."
) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` -> ``{"<prefix><key>": tensor}`` (SDXL's first encoder: ``conditioner.embedders.0.transformer.``)."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        # transformers 5 names the text tower's keys without the `text_model.` of the released files
        key = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + key] = value.detach().contiguous()
    return out


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def open_clip_text_encoder_to_ldm(
    text_encoder, prefix: str = "conditioner.embedders.1.model."
) -> dict[str, torch.Tensor]:
    """``CLIPTextModelWithProjection`` -> SDXL's OpenCLIP layout: q/k/v fused into ``attn.in_proj_*``,
    layers as ``transformer.resblocks.<i>``, the projection transposed as ``text_projection``."""
    state = {k.removeprefix("text_model."): v.detach() for k, v in text_encoder.state_dict().items()}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T,
    }
    state.pop("embeddings.position_ids", None)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        layer = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            fused = [state.pop(f"{layer}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(fused)
        for key in [k for k in state if k.startswith(layer)]:
            rest = _rename_inside(key[len(layer) :], _OPEN_CLIP_LAYER)
            out[f"transformer.resblocks.{i}.{rest}"] = state.pop(key)
    if state:
        raise ValueError(f"no OpenCLIP name for text encoder keys {sorted(state)[:3]}")
    return {prefix + k: v.contiguous() for k, v in out.items()}


def save_single_file(
    folder: str | os.PathLike,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Write the UNet, VAE and text encoder of a diffusers base folder as one original-layout file.

    Args:
        folder: a diffusers SD1.5- or SDXL-layout base model folder (SDXL: + ``text_encoder_2``).
        path: the ``.safetensors`` file to write (atomically).
        dtype: cast floating tensors (e.g. ``torch.float16``); None keeps each part's stored dtype.
        variant: read the weights of this variant (``"fp16"``: ``*.fp16.safetensors``) where a part has it, else
            its plain weights. None: the variant the folder is stored in, read as ``load_base_components`` reads
            it (the one every part without plain weights holds, fp16 first; a hub snapshot fetched with
            ``variant="fp16"``), or the plain weights; a folder no one variant loads is refused in one line naming
            its parts.
        allow_pickle: read a part whose weights are only pickle files (``.bin``, ``.ckpt``: loading one can run
            code); without it such a part is refused in one line before anything loads.

    Returns:
        The written path.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .model_files import weight_files

    folder, path = Path(folder), Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file, got {path.name}")
    _check_base_folder(folder)
    from .loading import _stored_variants, part_library

    # the variant rule of load_base_components and the pipelines' from_pretrained (each part the folder's variant
    # where it has it, else its plain weights)
    present = {part: part_library(part) for part in _PARTS if (folder / part).is_dir()}
    _, chosen = _stored_variants(folder, present, variant, choose="--variant")
    variants = {part: chosen.get(part) for part in _PARTS}
    for part in _PARTS:  # every part's weight files, before any loads (pickle only with allow_pickle)
        if (folder / part).is_dir():
            weight_files(folder / part, part_library(part), allow_pickle=allow_pickle, variant=variants[part])
    from .loading import safetensors_policy

    def load(cls, part):
        # None: each part as the folder stores it (fp16 stays fp16; diffusers would load float32)
        stored = dtype or _stored_dtype(folder / part, variants[part], allow_pickle) or torch.float32
        return cls.from_pretrained(
            folder,
            subfolder=part,
            torch_dtype=stored,
            variant=variants[part],
            use_safetensors=safetensors_policy(allow_pickle, folder / part),
        )

    state = {}
    unet = load(UNet2DConditionModel, "unet")
    state.update(unet_to_ldm(unet))
    state.update(vae_to_ldm(load(AutoencoderKL, "vae")))
    text_encoder = load(CLIPTextModel, "text_encoder")
    if unet.config.addition_embed_type == "text_time":  # SDXL
        state.update(text_encoder_to_ldm(text_encoder, "conditioner.embedders.0.transformer."))
        text_encoder_2 = load(CLIPTextModelWithProjection, "text_encoder_2")
        state.update(open_clip_text_encoder_to_ldm(text_encoder_2))
    else:
        state.update(text_encoder_to_ldm(text_encoder))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(state, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_base_folder(folder: Path) -> None:
    """A diffusers base folder (``unet/``, ``vae/``, ``text_encoder/``), or a one-line error naming what it is."""
    from .errors import CheckpointError
    from .loading import describe_folder

    if not folder.exists():
        raise CheckpointError(f"base folder not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is a file; give a diffusers base folder (unet/, vae/, text_encoder/)"
        )
    missing = [
        part for part in ("unet", "vae", "text_encoder") if not (folder / part / "config.json").is_file()
    ]
    if missing:
        kind = describe_folder(folder)
        what = f"holds a {kind}" if kind not in ("", "unknown") else "is not a diffusers base folder"
        raise CheckpointError(f"{folder} {what}: it lacks {', '.join(p + '/' for p in missing)}")


_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _stored_dtype(folder: Path, variant: str | None = None, allow_pickle: bool = False) -> torch.dtype | None:
    """The dtype of the first floating tensor in a model folder's weights of ``variant``: its safetensors, or with
    ``allow_pickle`` its pickle file (read with ``weights_only``, memory-mapped); None if unknown."""
    from safetensors import safe_open

    from .errors import CheckpointError
    from .loading import part_library
    from .model_files import weight_files

    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    try:
        files = weight_files(folder, part_library(folder.name), allow_pickle=allow_pickle, variant=variant)
    except CheckpointError:
        return None
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    name = f.get_slice(key).get_dtype()
                    if name in dtypes:
                        return dtypes[name]
        elif allow_pickle:
            try:
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception:  # noqa: BLE001 - unreadable here: loading names the problem
                return None
            found = [v.dtype for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
            return found[0] if found else None
    return None


def main(argv: list[str] | None = None) -> None:
    """``python -m brushnet.convert``: the ``brushnet convert`` command itself (one set of flags and checks).

    Exits 2 with one line on bad input, as the command does; returns normally when the file was written."""
    import typer

    from .cli import run_app
    from .cli.convert import convert_command

    command = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    command.command()(convert_command)
    code = run_app(command, argv, "python -m brushnet.convert")
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
