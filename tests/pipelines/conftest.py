"""The PowerPaint reference fixtures (tests/fixtures/powerpaint: the original code's outputs on tiny random
weights) loaded through this project's loader, once per session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

POWERPAINT = Path(__file__).parents[1] / "fixtures" / "powerpaint"


@pytest.fixture(scope="session")
def powerpaint_reference():
    """``(runs by id, tensors)`` of ``pipeline_level.json`` / ``.safetensors``."""
    meta = json.loads((POWERPAINT / "pipeline_level.json").read_text())
    return {run["id"]: run for run in meta["runs"]}, load_file(POWERPAINT / "pipeline_level.safetensors")


@pytest.fixture(scope="session")
def powerpaint_v1_base(tmp_path_factory):
    """The fixture's SD-inpainting folder as a loadable base. The original overwrites its UNet and text
    encoder completely, so the fixture ships only their configs; random weights of those configs stand in."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    base = tmp_path_factory.mktemp("pp_v1") / "stable-diffusion-inpainting"
    shutil.copytree(POWERPAINT / "v1" / "stable-diffusion-inpainting", base)
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet")).save_pretrained(
        base / "unet"
    )
    CLIPTextModel(CLIPTextConfig.from_pretrained(base / "text_encoder")).save_pretrained(
        base / "text_encoder"
    )
    return base


@pytest.fixture(scope="session")
def powerpaint_pipes(powerpaint_v1_base):
    """``{"v1": pipeline, "v2": pipeline}`` loaded from the released-layout fixture folders, with the schedulers
    the original app uses (v1: the base's PNDM; v2: UniPC from the base's config, ending at sigma_min as
    diffusers 0.27 did)."""
    from brushnet.loading_powerpaint import load_powerpaint_pipeline
    from brushnet.schedulers import make_scheduler

    v2, _ = load_powerpaint_pipeline(
        POWERPAINT / "v2" / "ppt-v2", POWERPAINT / "v2" / "ppt-v2" / "realisticVisionV60B1_v51VAE"
    )
    v2.scheduler = make_scheduler("unipc-original", v2.scheduler.config)
    v1, _ = load_powerpaint_pipeline(POWERPAINT / "v1" / "ppt-v1", powerpaint_v1_base)
    for pipe in (v1, v2):
        pipe.set_progress_bar_config(disable=True)
    return {"v1": v1, "v2": v2}


# -- tiny in-memory components for the diffusers-suite and composition tests (issue 15) ----------------------
# Built once per session under a fixed seed and handed out as deep copies, so every test gets fresh modules.

TOKENIZER_DIR = Path(__file__).parents[2] / "src" / "brushnet" / "assets" / "tiny_tokenizer"


def _random_taps(model, seed: int, prefixes: tuple[str, ...], scale: float = 0.05):
    """Small random weights on a fresh branch's zero taps, so it visibly changes the output."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(prefixes):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def _text_encoder(cls, tokenizer, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection or hidden,
    )
    return cls(config)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )


def build_tiny_sd_components(with_controlnet: bool = False) -> dict:
    """SD1.5-layout BrushNet pipeline components: UNet (32, 64), VAE factor 2, 2-layer CLIP, DDIM."""
    import torch
    from diffusers import ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from brushnet import BrushNetModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    brushnet = _random_taps(
        BrushNetModel.from_unet(unet), 1, ("brushnet_down", "brushnet_mid", "brushnet_up")
    )
    torch.manual_seed(0)
    vae = _tiny_vae()
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(0)
    text_encoder = _text_encoder(CLIPTextModel, tokenizer, 32)
    # steps_offset=1: StableDiffusionPipeline rewrites any other value in its scheduler's config, which would make
    # from_pipe (SD -> BrushNet) differ from a direct construction for a reason that is not BrushNet's
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    components = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "brushnet": brushnet,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "controlnet": None,
    }
    if with_controlnet:
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8))
        components["controlnet"] = _random_taps(
            controlnet,
            2,
            ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out"),
        )
    return components


def build_tiny_xl_components() -> dict:
    """SDXL-layout BrushNet pipeline components: text_time UNet (32, 64), two text encoders, Euler."""
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from brushnet import BrushNetModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=64,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    brushnet = _random_taps(
        BrushNetModel.from_unet(unet), 1, ("brushnet_down", "brushnet_mid", "brushnet_up")
    )
    torch.manual_seed(0)
    vae = _tiny_vae()
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(0)
    text_encoder = _text_encoder(CLIPTextModel, tokenizer, 32)
    text_encoder_2 = _text_encoder(CLIPTextModelWithProjection, tokenizer, 32, projection=32)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "unet": unet,
        "brushnet": brushnet,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
        "controlnet": None,
    }


_BUILT: dict = {}


def tiny_components(kind: str) -> dict:
    """Fresh deep copies of the tiny components of ``kind`` ("sd", "sd+controlnet", "xl")."""
    import copy

    if kind not in _BUILT:
        builders = {
            "sd": build_tiny_sd_components,
            "sd+controlnet": lambda: build_tiny_sd_components(with_controlnet=True),
            "xl": build_tiny_xl_components,
        }
        _BUILT[kind] = builders[kind]()
    return {k: copy.deepcopy(v) for k, v in _BUILT[kind].items()}


def tiny_inputs(seed: int = 0, size: int = 32) -> dict:
    """A PIL image with a square hole mask (white = inpaint), and the diffusers-style call arguments."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return {
        "prompt": "a red ball",
        "image": image,
        "mask_image": Image.fromarray(mask),
        "generator": torch.Generator().manual_seed(seed),
        "num_inference_steps": 2,
        "guidance_scale": 6.0,
        "output_type": "np",
    }


@pytest.fixture
def make_components():
    return tiny_components


def ip_adapter_state_dict(unet, image_embed_dim: int | None = None, seed: int = 0) -> dict:
    """A random IP-Adapter state dict in the released layout (``image_proj`` + ``ip_adapter``) for ``unet``:
    one ``to_k_ip`` / ``to_v_ip`` pair per cross-attention processor (ids 1, 3, 5, ... in ``attn_processors``
    order, as diffusers' loader reads them) and an ``ImageProjection`` to 4 tokens."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    embed_dim = image_embed_dim or cross
    channels = unet.config.block_out_channels
    layers, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        for part in ("to_k_ip", "to_v_ip"):
            layers[f"{key_id}.{part}.weight"] = torch.randn(hidden, cross, generator=generator) * 0.3
        key_id += 2
    image_proj = {
        "proj.weight": torch.randn(4 * cross, embed_dim, generator=generator) * 0.3,
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    return {"image_proj": image_proj, "ip_adapter": layers}


def refused(pipe, error, match: str, **arguments) -> str:
    """The call with ``arguments`` raises ``error`` with a one-line message matching ``match`` before the UNet
    runs (every UNet evaluation passes ``conv_in``, also when the pipeline drives the UNet's blocks)."""
    calls = []
    handle = pipe.unet.conv_in.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(error, match=match) as raised:
            pipe(**arguments)
    finally:
        handle.remove()
    message = str(raised.value)
    assert "\n" not in message.strip(), message
    assert not calls, f"the UNet ran {len(calls)} times before: {message}"
    return message
