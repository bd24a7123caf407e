import json
import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from brushnet.models import BrushNetModel, count_injection_points, unet_forward_with_brushnet

REFERENCE = __import__("pathlib").Path(__file__).parents[1] / "fixtures" / "reference"


def read_manifest(name):
    shapes = {}
    for line in (REFERENCE / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = re.fullmatch(r"(\S+) \(([\d, ]*)\)", line.strip())
        assert match, line
        shapes[match[1]] = tuple(int(x) for x in match[2].replace(" ", "").split(",") if x)
    return shapes


@pytest.mark.parametrize(
    "config_name, manifest_name, n_tensors",
    [
        ("brushnet_sd15_config.json", "brushnet-sd15-state-dict.txt", 322),
        ("brushnet_sdxl_config.json", "brushnet-sdxl-state-dict.txt", 252),
    ],
)
def test_released_configs_produce_exactly_the_manifest_keys(config_name, manifest_name, n_tensors):
    config = json.loads((REFERENCE / config_name).read_text())
    with torch.device("meta"):
        model = BrushNetModel.from_config(config)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    manifest = read_manifest(manifest_name)
    assert len(manifest) == n_tensors
    assert set(state) - set(manifest) == set(), "unexpected keys"
    assert set(manifest) - set(state) == set(), "missing keys"
    assert state == manifest


def test_powerpaint_v2_config_constructs_with_cross_attention():
    config = json.loads((REFERENCE / "powerpaint_v2_brushnet_config.json").read_text())
    with torch.device("meta"):
        model = BrushNetModel.from_config(config)
    assert model.uses_text
    assert any(".attentions." in k for k in model.state_dict())
    assert model.num_down_residuals == 12 and model.num_up_residuals == 15


def test_golden_model_level(golden_dir):
    tensors = load_file(golden_dir / "model_level.safetensors")
    unet = UNet2DConditionModel.from_pretrained(golden_dir / "unet")
    brushnet = BrushNetModel.from_pretrained(golden_dir / "brushnet")
    args = (
        tensors["in.sample"],
        tensors["in.timestep"],
        tensors["in.encoder_hidden_states"],
        tensors["in.brushnet_cond"],
    )
    with torch.no_grad():
        down, mid, up = brushnet(*args, conditioning_scale=0.7, return_dict=False)
        for i, r in enumerate(down):
            torch.testing.assert_close(r, tensors[f"out.scale0.7.down.{i}"], atol=1e-5, rtol=0)
        torch.testing.assert_close(mid, tensors["out.scale0.7.mid"], atol=1e-5, rtol=0)
        for i, r in enumerate(up):
            torch.testing.assert_close(r, tensors[f"out.scale0.7.up.{i}"], atol=1e-5, rtol=0)
        assert len(down) == len([k for k in tensors if k.startswith("out.scale0.7.down.")])
        assert len(up) == len([k for k in tensors if k.startswith("out.scale0.7.up.")])

        gdown, gmid, gup = brushnet(*args, conditioning_scale=1.0, guess_mode=True, return_dict=False)
        for i, r in enumerate(gdown):
            torch.testing.assert_close(r, tensors[f"out.guess.down.{i}"], atol=1e-5, rtol=0)
        torch.testing.assert_close(gmid, tensors["out.guess.mid"], atol=1e-5, rtol=0)
        for i, r in enumerate(gup):
            torch.testing.assert_close(r, tensors[f"out.guess.up.{i}"], atol=1e-5, rtol=0)

        plain = unet(*args[:3]).sample
        torch.testing.assert_close(plain, tensors["out.unet_plain"], atol=1e-5, rtol=0)
        injected = unet_forward_with_brushnet(unet, *args[:3], down, mid, up)
        torch.testing.assert_close(injected, tensors["out.unet_with_brushnet_scale0.7"], atol=1e-5, rtol=0)
        assert (injected - plain).abs().max() > 1e-2  # the residuals matter


def test_sd15_branch_ignores_text(golden_dir):
    tensors = load_file(golden_dir / "model_level.safetensors")
    brushnet = BrushNetModel.from_pretrained(golden_dir / "brushnet")
    assert not brushnet.uses_text
    s, t, text, cond = (
        tensors[k] for k in ("in.sample", "in.timestep", "in.encoder_hidden_states", "in.brushnet_cond")
    )
    with torch.no_grad():
        a = brushnet(s, t, text, cond, return_dict=False)
        b = brushnet(s, t, torch.randn_like(text) * 5, cond, return_dict=False)
    for x, y in zip(a[0] + (a[1],) + a[2], b[0] + (b[1],) + b[2]):
        assert torch.equal(x, y)


def test_from_unet_initialisation(golden_dir):
    unet = UNet2DConditionModel.from_pretrained(golden_dir / "unet")
    brushnet = BrushNetModel.from_unet(unet)
    w = brushnet.conv_in_condition.weight
    assert torch.equal(w[:, :4], unet.conv_in.weight)
    assert torch.equal(w[:, 4:8], unet.conv_in.weight)
    assert torch.count_nonzero(w[:, 8:]) == 0
    assert torch.equal(brushnet.conv_in_condition.bias, unet.conv_in.bias)
    assert torch.equal(brushnet.time_embedding.linear_1.weight, unet.time_embedding.linear_1.weight)
    assert torch.equal(
        brushnet.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight
    )
    assert torch.equal(
        brushnet.up_blocks[1].resnets[2].conv2.weight, unet.up_blocks[1].resnets[2].conv2.weight
    )
    assert torch.equal(brushnet.mid_block.resnets[1].conv1.weight, unet.mid_block.resnets[1].conv1.weight)
    taps = [*brushnet.brushnet_down_blocks, brushnet.brushnet_mid_block, *brushnet.brushnet_up_blocks]
    assert all(torch.count_nonzero(p) == 0 for tap in taps for p in tap.parameters())
    assert (brushnet.num_down_residuals, brushnet.num_up_residuals) == count_injection_points(unet)

    # a fresh branch changes nothing
    sample = torch.randn(1, 4, 16, 16)
    text = torch.randn(1, 7, unet.config.cross_attention_dim)
    cond = torch.randn(1, 5, 16, 16)
    with torch.no_grad():
        down, mid, up = brushnet(sample, 10, text, cond, return_dict=False)
        torch.testing.assert_close(
            unet_forward_with_brushnet(unet, sample, 10, text, down, mid, up), unet(sample, 10, text).sample
        )


def test_save_load_round_trip(tmp_path, golden_dir):
    brushnet = BrushNetModel.from_pretrained(golden_dir / "brushnet")
    brushnet.save_pretrained(tmp_path / "bn")
    assert (tmp_path / "bn" / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((tmp_path / "bn" / "config.json").read_text())
    assert config["mid_block_type"] == "MidBlock2D"
    assert config["conditioning_embedding_out_channels"] == [16, 32, 96, 256]  # builds nothing, kept
    again = BrushNetModel.from_pretrained(tmp_path / "bn")
    a, b = brushnet.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_same_gradients(golden_dir):
    tensors = load_file(golden_dir / "model_level.safetensors")
    args = [tensors[k] for k in ("in.sample", "in.timestep", "in.encoder_hidden_states", "in.brushnet_cond")]

    def grads(checkpointing):
        model = BrushNetModel.from_pretrained(golden_dir / "brushnet")
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        down, mid, up = model(*args, return_dict=False)
        (
            sum(r.square().mean() for r in down) + mid.square().mean() + sum(r.square().mean() for r in up)
        ).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 50
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], atol=1e-6, rtol=1e-5)


def tiny_sdxl_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12 + 6 * 4,
        use_linear_projection=True,
    )


def test_sdxl_text_time_branch_depends_on_prompt_and_copies_add_embedding():
    unet = tiny_sdxl_unet()
    brushnet = BrushNetModel.from_unet(unet)
    assert brushnet.config.addition_embed_type == "text_time" and brushnet.uses_text
    assert torch.equal(brushnet.add_embedding.linear_1.weight, unet.add_embedding.linear_1.weight)
    with torch.no_grad():
        for p in brushnet.brushnet_down_blocks.parameters():
            p.normal_()
    sample, cond, text = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 8, 8), torch.randn(1, 3, 24)
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]])
    with torch.no_grad():
        a = brushnet(
            sample, 5, text, cond, added_cond_kwargs={"text_embeds": torch.randn(1, 12), "time_ids": time_ids}
        )
        b = brushnet(
            sample, 5, text, cond, added_cond_kwargs={"text_embeds": torch.randn(1, 12), "time_ids": time_ids}
        )
    assert torch.equal(a.down_block_res_samples[0], b.down_block_res_samples[0])  # conv_in tap: before time
    assert not torch.allclose(a.down_block_res_samples[-1], b.down_block_res_samples[-1])
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        brushnet(sample, 5, text, cond)
    # SDXL residuals drive the SDXL UNet through the same injection code
    with torch.no_grad():
        out = unet_forward_with_brushnet(
            unet, sample, 5, text, a.down_block_res_samples, a.mid_block_res_sample, a.up_block_res_samples,
            added_cond_kwargs={"text_embeds": torch.randn(1, 12), "time_ids": time_ids},
        )  # fmt: skip
    assert out.shape == sample.shape


def test_bad_conditioning_shape_is_a_clear_error(golden_dir):
    brushnet = BrushNetModel.from_pretrained(golden_dir / "brushnet")
    with pytest.raises(ValueError, match="channels"):
        brushnet(torch.randn(1, 4, 16, 16), 1, torch.randn(1, 7, 16), torch.randn(1, 4, 16, 16))
