"""PowerPaint's task tokens as a stock tokenizer + text encoder, and every released PowerPaint file layout checked
against the key manifests of the original code (tests/fixtures/powerpaint/manifests, SD1.5 sizes, meta device:
no weights needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from brushnet.errors import CheckpointError
from brushnet.loading_powerpaint import check_fits, v1_unet_config
from brushnet.models import BrushNetModel
from brushnet.models.task_tokens import (
    TASK_TOKENS,
    add_task_tokens,
    expand_task_tokens,
    original_state_dict,
    stock_state_dict,
    task_token_ids,
    text_encoder_from_original,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "powerpaint"
MANIFESTS = FIXTURES / "manifests"
REFERENCE_CONFIG = Path(__file__).parents[1] / "fixtures" / "reference" / "powerpaint_v2_brushnet_config.json"

# runwayml/stable-diffusion-v1-5 (and RealisticVision V6.0 B1): the released PowerPaint files' sizes
SD15_UNET = {"cross_attention_dim": 768}  # every other key is diffusers' UNet2DConditionModel default
SD15_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "sample_size": 512,
}
CLIP_L_TEXT = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)


def manifest(name: str) -> dict[str, torch.Tensor]:
    """The manifest as a state dict of meta tensors of those shapes."""
    out = {}
    for line in (MANIFESTS / name).read_text().splitlines():
        key, shape = re.fullmatch(r"(\S+) (\[.*\])", line).groups()
        out[key] = torch.empty(json.loads(shape), device="meta")
    return out


def meta_model(factory):
    with torch.device("meta"):
        return factory()


# ---- tokens -------------------------------------------------------------------------------------------------


def test_task_tokens_get_the_originals_ids_and_expansion():
    tokenizer = CLIPTokenizer.from_pretrained(FIXTURES / "v1" / "stable-diffusion-inpainting" / "tokenizer")
    ids = add_task_tokens(tokenizer)
    table = json.loads((FIXTURES / "pipeline_level.json").read_text())["models"]["token_table"]
    assert ids == list(range(514, 544))
    assert task_token_ids(tokenizer) == {name: table[name]["ids"] for name in TASK_TOKENS}
    assert expand_task_tokens("a cat P_obj") == "a cat " + " ".join(table["P_obj"]["expanded_to"])
    with pytest.raises(ValueError, match="already has the task token"):
        add_task_tokens(tokenizer)


def test_released_text_encoder_is_an_extended_table_with_the_learned_vectors():
    """The released v1 file (original layout) becomes a stock CLIPTextModel whose rows 514–543 are the learned
    task vectors, in P_ctxt, P_shape, P_obj order; written back, the original layout is exact."""
    released = load_file(FIXTURES / "v1" / "ppt-v1" / "text_encoder" / "text_encoder.safetensors")
    config = CLIPTextConfig.from_pretrained(FIXTURES / "v1" / "stable-diffusion-inpainting" / "text_encoder")
    encoder, filled = text_encoder_from_original(released, config)
    assert filled == [] and encoder.config.vocab_size == 544
    vectors = load_file(FIXTURES / "pipeline_level.safetensors")
    table = encoder.get_input_embeddings().weight
    for i, name in enumerate(TASK_TOKENS):
        assert torch.equal(table[514 + 10 * i : 524 + 10 * i], vectors[f"task_vectors.v1.{name}"])
    back = original_state_dict(encoder.state_dict())
    assert set(back) == set(released) - {"text_model.embeddings.position_ids"}
    assert all(torch.equal(back[k], released[k]) for k in back)


def test_bad_text_encoder_files_are_one_line_errors():
    released = load_file(FIXTURES / "v1" / "ppt-v1" / "text_encoder" / "text_encoder.safetensors")
    config = CLIPTextConfig.from_pretrained(FIXTURES / "v1" / "stable-diffusion-inpainting" / "text_encoder")
    without = {k: v for k, v in released.items() if not k.endswith("P_shape")}
    with pytest.raises(ValueError, match="lacks the task vectors"):
        text_encoder_from_original(without, config)
    with pytest.raises(ValueError, match="not a PowerPaint text encoder"):
        stock_state_dict({"text_model.embeddings.token_embedding.weight": torch.zeros(3, 2)})
    five = {**released, **{k: v[:5] for k, v in released.items() if "trainable_embeddings" in k}}
    with pytest.raises(ValueError, match=r"shape \(5, 32\), expected \(10, 32\)"):
        text_encoder_from_original(five, config)
    partial = {k: v for k, v in released.items() if "layers.1." not in k}
    with pytest.raises(ValueError, match="lacks 16 keys"):
        text_encoder_from_original(partial, config)
    fallback = {k: v + 1 for k, v in stock_state_dict(released).items()}
    encoder, filled = text_encoder_from_original(partial, config, fallback=fallback)
    assert len(filled) == 16 and all("layers.1." in k for k in filled)


# ---- released layouts vs the original's key manifests (SD1.5 sizes) ------------------------------------------


@pytest.mark.parametrize("name", ["v1_text_encoder.txt", "v2_text_encoder_brushnet.txt"])
def test_released_task_token_text_encoders_load_with_no_missing_or_unexpected_key(name):
    """v1 ``text_encoder/text_encoder.safetensors`` and v2/v2-1 ``PowerPaint_Brushnet/pytorch_model.bin``: the
    original layout converts to exactly the keys and shapes of a stock CLIPTextModel with 49438 rows."""
    released = manifest(name)
    assert len(released) == 200
    stock = stock_state_dict(released)
    config = CLIPTextConfig(**{**CLIP_L_TEXT.to_dict(), "vocab_size": 49408 + 30})
    check_fits(meta_model(lambda: CLIPTextModel(config)), stock, "text encoder", name)
    assert tuple(stock["embeddings.token_embedding.weight"].shape) == (49438, 768)


def test_iopaint_text_encoder_folder_is_a_stock_clip_text_model():
    released = manifest("iopaint_v2_text_encoder_brushnet.txt")
    # transformers >= 5 keeps no `text_model.` prefix and no position_ids buffer in the state dict;
    # from_pretrained converts the file's keys
    keys = {k.removeprefix("text_model."): v for k, v in released.items() if not k.endswith("position_ids")}
    config = CLIPTextConfig(**{**CLIP_L_TEXT.to_dict(), "vocab_size": 49438})
    check_fits(meta_model(lambda: CLIPTextModel(config)), keys, "text encoder", "iopaint")


def test_released_v1_unet_loads_with_no_missing_or_unexpected_key():
    base = meta_model(lambda: UNet2DConditionModel(**SD15_UNET))
    unet = meta_model(lambda: UNet2DConditionModel.from_config(v1_unet_config(base.config)))
    released = manifest("v1_unet.txt")
    assert len(released) == 686
    check_fits(unet, released, "v1 UNet", "v1_unet.txt")


def test_released_v2_branch_loads_with_no_missing_or_unexpected_key():
    """The v2 / v2-1 branch file, built for the SD1.5 UNet as the loader does (no config shipped), and the
    published config: both give exactly the manifest; a branch without cross-attention does not."""
    released = manifest("v2_brushnet.txt")
    assert len(released) == 738
    base = meta_model(lambda: UNet2DConditionModel(**SD15_UNET))
    config = BrushNetModel.config_from_unet(base.config, cross_attention=True)
    check_fits(meta_model(lambda: BrushNetModel.from_config(config)), released, "branch", "v2_brushnet.txt")
    published = json.loads(REFERENCE_CONFIG.read_text())
    check_fits(meta_model(lambda: BrushNetModel.from_config(published)), released, "branch", "config.json")
    ours = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    assert {k: published[k] for k in ours} == ours
    plain = BrushNetModel.config_from_unet(base.config)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        check_fits(
            meta_model(lambda: BrushNetModel.from_config(plain)), released, "branch", "v2_brushnet.txt"
        )


@pytest.mark.parametrize(
    "name, factory",
    [
        ("v2_base_unet.txt", lambda: UNet2DConditionModel(**SD15_UNET)),
        ("v2_base_vae.txt", lambda: AutoencoderKL(**SD15_VAE)),
    ],
)
def test_released_v2_base_folder_is_a_stock_sd15_model(name, factory):
    check_fits(meta_model(factory), manifest(name), name, name)


def test_released_v2_base_text_encoder_is_stock():
    released = manifest("v2_base_text_encoder.txt")
    keys = {k.removeprefix("text_model."): v for k, v in released.items() if not k.endswith("position_ids")}
    check_fits(
        meta_model(lambda: CLIPTextModel(CLIP_L_TEXT)), keys, "text encoder", "v2_base_text_encoder.txt"
    )
