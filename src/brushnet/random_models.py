"""Random-weight components of any size, built offline under a fixed seed and saved as real model folders.

Used by the tests (tiny), the benchmarks (mid-sized and SD1.5-sized, random weights) and ``brushnet serve
--tiny``: every method can be exercised end to end without downloading anything. The weights are random,
so outputs are noise-like; what they exercise is the code path, shapes, conventions and timings.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ArchSpec", "PRESETS", "build_base", "build_brushnet", "build_inpaint_model", "build_controlnet"]

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


PRESETS: dict[str, ArchSpec] = {
    "tiny": ArchSpec((32, 64), 1, 32, 4, 8, (8, 16, 16, 16), 1, 32, 2, 2, 37, 8),
    "small": ArchSpec((64, 128, 256, 256), 1, 256, 4, 16, (32, 64, 64, 64), 1, 256, 2, 4, 512, 64),
    "sd15": ArchSpec((320, 640, 1280, 1280), 2, 768, 8, 32, (128, 256, 512, 512), 2, 768, 12, 12, 3072, 64),
}


def _spec(preset: str | ArchSpec) -> ArchSpec:
    if isinstance(preset, ArchSpec):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[preset]


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


def _unet(spec: ArchSpec, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**_unet_config(spec, in_channels))


def build_base(out_dir: str | os.PathLike, preset: str | ArchSpec = "tiny", seed: int = 0) -> Path:
    """Write a random-weight SD1.5-layout base model folder (``model_index.json``, vae, text_encoder,
    tokenizer, unet, scheduler) and return its path."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = _spec(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    _unet(spec).save_pretrained(out / "unet")
    n_vae = len(spec.vae_block_out_channels)
    AutoencoderKL(
        block_out_channels=spec.vae_block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        latent_channels=4,
        layers_per_block=spec.vae_layers_per_block,
        norm_num_groups=min(8, spec.vae_block_out_channels[0]),
        sample_size=spec.sample_size * 2 ** (n_vae - 1),
    ).save_pretrained(out / "vae")
    tokenizer = CLIPTokenizer.from_pretrained(_TOKENIZER_DIR)
    tokenizer.save_pretrained(out / "tokenizer")
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden_size,
            intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=spec.text_hidden_size,
        )
    ).save_pretrained(out / "text_encoder")
    DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(out / "scheduler")
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
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def build_brushnet(
    out_dir: str | os.PathLike, base_dir: str | os.PathLike, seed: int = 0, random_taps: bool = True
) -> Path:
    """Write a BrushNet folder initialised ``from_unet`` of the base. With ``random_taps`` the zero 1×1 taps
    get small random weights, so the branch visibly changes the output (a fresh branch changes nothing)."""
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
    out_dir: str | os.PathLike, base_dir: str | os.PathLike, preset: str | ArchSpec = "tiny", seed: int = 0
) -> Path:
    """Write an SD-inpainting-style model folder: the base's components with a random 9-channel UNet."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base_dir, out, ignore=shutil.ignore_patterns("unet"))
    torch.manual_seed(seed + 1)
    _unet(_spec(preset), in_channels=9).save_pretrained(out / "unet")
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def build_controlnet(out_dir: str | os.PathLike, base_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a ControlNet folder initialised from the base UNet, with small random zero-convs so it acts."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(base_dir) / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    controlnet.save_pretrained(out_dir)
    return Path(out_dir)
