"""Random-weight components of any size, built offline under a fixed seed and saved as real model folders.

Used by the tests (tiny), the benchmarks (mid-sized, SD1.5-sized and SDXL-sized, random weights) and
``brushnet serve --tiny``: every method can be exercised end to end without downloading anything. The
weights are random, so outputs are noise-like; what they exercise is the code path, shapes, conventions and
timings. Presets of both families sit in one table (:data:`PRESETS`): :class:`ArchSpec` ones build an
SD1.5-layout base, :class:`XLArchSpec` ones an SDXL-layout base (two text encoders, ``text_time``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "ArchSpec",
    "XLArchSpec",
    "PRESETS",
    "write_sd_model_index",
    "preset_family",
    "build_base",
    "build_brushnet",
    "build_inpaint_model",
    "build_controlnet",
    "build_model_set",
    "buildable",
]

_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"


@dataclass(frozen=True)
class ArchSpec:
    """Sizes of the random-weight components (the SD1.5 preset is the real SD1.5 architecture)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    cross_attention_dim: int
    attention_head_dim: int
    norm_num_groups: int
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    sample_size: int


@dataclass(frozen=True)
class XLArchSpec:
    """Sizes of random-weight SDXL-layout components (the "sdxl" preset is the real SDXL base architecture).

    The UNet has no attention in its first block and ``transformer_layers_per_block[i]`` transformer layers
    in block ``i`` after that, linear projections and the ``text_time`` added embedding (pooled text of
    ``text_2_projection_dim`` + 6 time ids × ``addition_time_embed_dim``); its cross-attention dimension is
    the two text encoders' hidden sizes together.
    """

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    transformer_layers_per_block: tuple[int, ...]
    attention_heads: tuple[int, ...]
    norm_num_groups: int
    addition_time_embed_dim: int
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    text_2_hidden_size: int
    text_2_layers: int
    text_2_heads: int
    text_2_intermediate: int
    text_2_projection_dim: int
    sample_size: int

    @property
    def cross_attention_dim(self) -> int:
        return self.text_hidden_size + self.text_2_hidden_size


PRESETS: dict[str, ArchSpec | XLArchSpec] = {
    "tiny": ArchSpec((32, 64), 1, 32, 4, 8, (8, 16, 16, 16), 1, 32, 2, 2, 37, 8),
    "small": ArchSpec((64, 128, 256, 256), 1, 256, 4, 16, (32, 64, 64, 64), 1, 256, 2, 4, 512, 64),
    "sd15": ArchSpec((320, 640, 1280, 1280), 2, 768, 8, 32, (128, 256, 512, 512), 2, 768, 12, 12, 3072, 64),
    # the two text encoders differ in width, as in SDXL (single-file loading tells them apart by it)
    "tiny-xl": XLArchSpec((16, 32, 32), 2, (1, 2, 2), (2, 4, 4), 8, 8, (16, 32), 1,
                          16, 2, 2, 37, 24, 2, 2, 37, 24, 8),
    "sdxl": XLArchSpec((320, 640, 1280), 2, (1, 2, 10), (5, 10, 20), 32, 256, (128, 256, 512, 512), 2,
                       768, 12, 12, 3072, 1280, 32, 20, 5120, 1280, 128),
}  # fmt: skip


def _spec(preset: str | ArchSpec | XLArchSpec) -> ArchSpec | XLArchSpec:
    if isinstance(preset, (ArchSpec, XLArchSpec)):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[preset]


def preset_family(preset: str | ArchSpec | XLArchSpec) -> str:
    """The base model family a preset builds: ``"sd15"`` or ``"sdxl"``."""
    return "sdxl" if isinstance(_spec(preset), XLArchSpec) else "sd15"


def _unet_config(spec: ArchSpec, in_channels: int = 4) -> dict:
    n = len(spec.block_out_channels)
    down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)
    return dict(
        sample_size=spec.sample_size,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.norm_num_groups,
    )


def _unet_config_xl(spec: XLArchSpec, in_channels: int = 4) -> dict:
    n = len(spec.block_out_channels)
    return dict(
        sample_size=spec.sample_size,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        transformer_layers_per_block=spec.transformer_layers_per_block,
        attention_head_dim=spec.attention_heads,  # diffusers' name for the number of heads
        use_linear_projection=True,
        cross_attention_dim=spec.cross_attention_dim,
        norm_num_groups=spec.norm_num_groups,
        addition_embed_type="text_time",
        addition_time_embed_dim=spec.addition_time_embed_dim,
        projection_class_embeddings_input_dim=spec.text_2_projection_dim + 6 * spec.addition_time_embed_dim,
    )


def _unet(spec: ArchSpec | XLArchSpec, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    if isinstance(spec, XLArchSpec):
        return UNet2DConditionModel(**_unet_config_xl(spec, in_channels))
    return UNet2DConditionModel(**_unet_config(spec, in_channels))


def _text_encoder(cls, tokenizer, hidden: int, layers: int, heads: int, intermediate: int, projection: int):
    from transformers import CLIPTextConfig

    return cls(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=projection,
        )
    )


def build_base(
    out_dir: str | os.PathLike, preset: str | ArchSpec | XLArchSpec = "tiny", seed: int = 0
) -> Path:
    """Write a random-weight base model folder and return its path.

    An :class:`ArchSpec` preset ("tiny", "small", "sd15") writes an SD1.5-layout folder (``model_index.json``,
    vae, text_encoder, tokenizer, unet, scheduler); an :class:`XLArchSpec` preset ("tiny-xl", "sdxl") an
    SDXL-layout one (+ text_encoder_2, tokenizer_2; Euler scheduler; VAE with ``force_upcast``).

    Args:
        out_dir: the folder to write (created if needed).
        preset: a name in :data:`PRESETS` or a spec.
        seed: torch seed for the random weights.
    """
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    spec = _spec(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    _unet(spec).save_pretrained(out / "unet")
    n_vae = len(spec.vae_block_out_channels)
    xl = isinstance(spec, XLArchSpec)
    AutoencoderKL(
        block_out_channels=spec.vae_block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        latent_channels=4,
        layers_per_block=spec.vae_layers_per_block,
        norm_num_groups=min(8, spec.vae_block_out_channels[0]),
        sample_size=spec.sample_size * 2 ** (n_vae - 1),
        **({"scaling_factor": 0.13025, "force_upcast": True} if xl else {}),
    ).save_pretrained(out / "vae")
    tokenizer = CLIPTokenizer.from_pretrained(_TOKENIZER_DIR)
    tokenizer.save_pretrained(out / "tokenizer")
    text = (spec.text_hidden_size, spec.text_layers, spec.text_heads, spec.text_intermediate)
    _text_encoder(CLIPTextModel, tokenizer, *text, spec.text_hidden_size).save_pretrained(
        out / "text_encoder"
    )
    if xl:
        _build_xl_rest(out, spec, tokenizer)
        return out
    DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(out / "scheduler")
    write_sd_model_index(out)
    return out


def _build_xl_rest(out: Path, spec: XLArchSpec, tokenizer) -> None:
    """The parts only an SDXL base has: text_encoder_2 (with projection), tokenizer_2, Euler scheduler."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    tokenizer.save_pretrained(out / "tokenizer_2")
    text_2 = (spec.text_2_hidden_size, spec.text_2_layers, spec.text_2_heads, spec.text_2_intermediate)
    encoder = _text_encoder(CLIPTextModelWithProjection, tokenizer, *text_2, spec.text_2_projection_dim)
    encoder.save_pretrained(out / "text_encoder_2")
    EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    ).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def build_brushnet(
    out_dir: str | os.PathLike, base_dir: str | os.PathLike, seed: int = 0, random_taps: bool = True
) -> Path:
    """Write a BrushNet folder initialised ``from_unet`` of the base (SD1.5 or SDXL layout; an SDXL branch
    gets a copy of the UNet's ``add_embedding``). With ``random_taps`` the zero 1×1 taps get small random
    weights, so the branch visibly changes the output (a fresh branch changes nothing)."""
    from diffusers import UNet2DConditionModel

    from .models.brushnet import BrushNetModel

    unet = UNet2DConditionModel.from_pretrained(Path(base_dir) / "unet")
    brushnet = BrushNetModel.from_unet(unet)
    if random_taps:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in brushnet.named_parameters():
                if name.startswith(("brushnet_down_blocks", "brushnet_mid_block", "brushnet_up_blocks")):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
                elif name.startswith("conv_in_condition.weight"):
                    param[:, 8:].copy_(torch.randn(param[:, 8:].shape, generator=generator) * 0.1)
    brushnet.save_pretrained(out_dir)
    return Path(out_dir)


def build_inpaint_model(
    out_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    preset: str | ArchSpec | XLArchSpec = "tiny",
    seed: int = 0,
) -> Path:
    """Write an SD-inpainting-style model folder: the base's components with a random 9-channel UNet."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base_dir, out, ignore=shutil.ignore_patterns("unet"))
    torch.manual_seed(seed + 1)
    _unet(_spec(preset), in_channels=9).save_pretrained(out / "unet")
    index = json.loads((out / "model_index.json").read_text())
    xl = preset_family(preset) == "sdxl"
    index["_class_name"] = "StableDiffusionXLInpaintPipeline" if xl else "StableDiffusionInpaintPipeline"
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def build_controlnet(out_dir: str | os.PathLike, base_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a ControlNet folder initialised from the base UNet, with small random zero-convs so it acts."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(base_dir) / "unet")
    # the conditioning embedding downsamples the control image to the latent size: one stride-2 conv per level
    vae_levels = len(json.loads((Path(base_dir) / "vae" / "config.json").read_text())["block_out_channels"])
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8,) * vae_levels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    controlnet.save_pretrained(out_dir)
    return Path(out_dir)


def build_random_base(out_dir, base_dir, preset, seed: int = 0) -> Path:
    """:class:`~brushnet.methods.ModelSlot` builder of the ``base`` slot (``base_dir`` is ``out_dir`` itself)."""
    return build_base(out_dir, preset, seed=seed)


def build_random_brushnet(out_dir, base_dir, preset, seed: int = 0) -> Path:
    """:class:`~brushnet.methods.ModelSlot` builder of the ``brushnet`` slot."""
    return build_brushnet(out_dir, base_dir, seed=seed)


def build_random_inpaint_model(out_dir, base_dir, preset, seed: int = 0) -> Path:
    """:class:`~brushnet.methods.ModelSlot` builder of the ``inpaint_model`` slot."""
    return build_inpaint_model(out_dir, base_dir, preset, seed=seed)


def build_random_controlnet(out_dir, base_dir, preset, seed: int = 0) -> Path:
    """:class:`~brushnet.methods.ModelSlot` builder of the ``controlnet`` slot."""
    return build_controlnet(out_dir, base_dir, seed=seed)


def buildable(slots) -> bool:
    """Whether every one of ``slots`` (names or :class:`~brushnet.methods.ModelSlot` s) has a random builder."""
    from .methods.registry import model_slots

    declared = model_slots()
    return all(declared[getattr(slot, "name", slot)].random_builder is not None for slot in slots)


def build_model_set(
    out_dir: str | os.PathLike,
    slots,
    preset: str | ArchSpec = "tiny",
    seed: int = 0,
    reuse: bool = False,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write the random-weight models of the given model slots (names or :class:`~brushnet.methods.ModelSlot`
    s) into ``out_dir/<slot folder>`` with each slot's ``random_builder``, and return ``{slot name: path}`` (a
    :class:`~brushnet.methods.ModelPaths` dict). The base is always built first, since the other models are
    made from it. With ``reuse``, folders that already hold a model are kept; with ``overwrite``, a slot folder
    that exists is removed and built again.

    Nothing is replaced by surprise: a slot folder that exists and is not empty (a model, or anything else) is
    refused, before anything is built, unless ``reuse`` (keep a model there) or ``overwrite`` (replace it). A
    build that fails removes the slot folders it created (and ``out_dir`` when it created it), so no
    half-written model is left.

    Raises:
        ValueError: a slot with no random builder (e.g. ``base_config``).
        InputError: ``out_dir`` (or a folder above it, or a slot folder) is a file, or a slot folder holds files
            and neither ``reuse`` nor ``overwrite`` is set.
    """
    import importlib

    from .methods.registry import model_slots

    out = Path(out_dir)
    declared = model_slots()
    names = [getattr(slot, "name", slot) for slot in slots]
    unknown = [name for name in names if declared[name].random_builder is None]
    if unknown:
        raise ValueError(f"no random-weight builder for {', '.join(unknown)}")
    order = ["base", *[n for n in dict.fromkeys(names) if n != "base"]]
    targets = {name: out / declared[name].folder for name in order}
    _check_model_set_folder(out, targets, reuse=reuse, overwrite=overwrite)
    created_top = _first_missing(out)
    created = [path for path in targets.values() if not path.exists()]
    paths: dict[str, str] = {}
    base = targets["base"]
    try:
        for name, path in targets.items():
            done = (path / "model_index.json").is_file() or (path / "config.json").is_file()
            if not (reuse and done):
                if overwrite and path.is_dir():
                    shutil.rmtree(path)  # no file of the replaced model stays beside the new one
                    created.append(path)
                module, _, function = declared[name].random_builder.partition(":")
                getattr(importlib.import_module(module), function)(path, base, preset, seed)
            paths[name] = str(path)
    except BaseException:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        if created_top is not None:
            _remove_empty_folders(out, created_top)
        raise
    return paths


def _first_missing(folder: Path) -> Path | None:
    """The top-most folder of ``folder`` and its parents that does not exist yet (``None``: it exists)."""
    missing, path = None, folder.absolute()
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


def _remove_empty_folders(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to ``top`` while they are empty."""
    path = folder.absolute()
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == top:
            return
        path = path.parent


def _check_model_set_folder(out: Path, targets: dict[str, Path], reuse: bool, overwrite: bool) -> None:
    """The refusals of :func:`build_model_set`, before anything is built (see there)."""
    from .errors import InputError
    from .io import file_in_the_way

    existing = file_in_the_way(out)
    if existing is not None:
        where = "" if existing == out else f" ({existing} is a file)"
        raise InputError(f"cannot write models into {out}: not a folder{where}")
    files = [p for p in targets.values() if p.exists() and not p.is_dir()]
    if files:
        raise InputError(f"cannot write models into {out}: {files[0]} is a file, not a folder")
    if reuse or overwrite:
        return
    used = [p for p in targets.values() if p.is_dir() and any(p.iterdir())]
    if used:
        listed = ", ".join(f"{p.name}/" for p in used)
        raise InputError(
            f"{out} already holds {listed}: the random weights would replace what is there; choose a new or "
            "empty folder, or pass --overwrite (overwrite=True) to replace them"
        )


def build_random_powerpaint(out_dir, base_dir, preset=None, seed: int = 0) -> Path:
    """:class:`~brushnet.methods.ModelSlot` builder of the ``powerpaint`` slot: a PowerPaint v2-style model for
    the base — a branch with cross-attention initialised ``from_unet`` (small random taps, so it acts) and a
    branch text encoder that is the base's with 30 random task rows — in the diffusers folders
    :func:`brushnet.loading_powerpaint.save_powerpaint` writes."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from .loading_powerpaint import save_powerpaint
    from .models.brushnet import BrushNetModel
    from .models.task_tokens import TASK_TOKENS, VECTORS_PER_TOKEN

    base = Path(base_dir)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    brushnet = BrushNetModel.from_unet(unet, cross_attention=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in brushnet.named_parameters():
            if name.startswith(("brushnet_down_blocks", "brushnet_mid_block", "brushnet_up_blocks")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
    table = encoder.get_input_embeddings().weight.detach()
    rows = (
        torch.randn(len(TASK_TOKENS) * VECTORS_PER_TOKEN, table.shape[1], generator=generator) * table.std()
    )
    encoder.resize_token_embeddings(table.shape[0] + rows.shape[0], mean_resizing=False)
    with torch.no_grad():
        encoder.get_input_embeddings().weight[table.shape[0] :] = rows
    return save_powerpaint(out_dir, brushnet, encoder)


def write_sd_model_index(folder: str | os.PathLike) -> None:
    """Write the ``model_index.json`` of an SD1.5-layout ``StableDiffusionPipeline`` folder (DDIM scheduler, no
    safety checker) into ``folder``."""
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2))
