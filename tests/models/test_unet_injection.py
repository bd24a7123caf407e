import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from brushnet.models import BrushNetModel, count_injection_points, unet_forward_with_brushnet


@pytest.fixture(scope="module")
def golden(golden_dir):
    tensors = load_file(golden_dir / "model_level.safetensors")
    unet = UNet2DConditionModel.from_pretrained(golden_dir / "unet")
    brushnet = BrushNetModel.from_pretrained(golden_dir / "brushnet")
    return unet, brushnet, tensors


def test_unet_is_untouched_and_still_plain(golden):
    unet, brushnet, t = golden
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    modules_before = {name: type(m).forward for name, m in unet.named_modules()}
    s, ts, text, cond = t["in.sample"], t["in.timestep"], t["in.encoder_hidden_states"], t["in.brushnet_cond"]
    with torch.no_grad():
        plain_before = unet(s, ts, text).sample
        down, mid, up = brushnet(s, ts, text, cond, return_dict=False)
        unet_forward_with_brushnet(unet, s, ts, text, down, mid, up)
        plain_after = unet(s, ts, text).sample
    assert torch.equal(plain_before, plain_after)
    for name, module in unet.named_modules():
        assert "forward" not in vars(module), f"{name}.forward was rebound"
        assert type(module).forward is modules_before[name]
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert type(unet) is UNet2DConditionModel


def test_no_residuals_equals_plain_unet(golden):
    unet, _, t = golden
    with torch.no_grad():
        a = unet(t["in.sample"], t["in.timestep"], t["in.encoder_hidden_states"]).sample
        b = unet_forward_with_brushnet(unet, t["in.sample"], t["in.timestep"], t["in.encoder_hidden_states"])
    assert torch.equal(a, b)


def test_controlnet_residuals_match_stock_unet(golden):
    unet, _, t = golden
    s, ts, text = t["in.sample"], t["in.timestep"], t["in.encoder_hidden_states"]
    n_down, _ = count_injection_points(unet)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        shapes = []
        hook = unet.conv_in.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
        unet(s, ts, text)
        hook.remove()
        # build residuals with the real skip shapes by running the stock down path
        res = [torch.randn(shapes[0], generator=gen)]
        size, channels = shapes[0][-1], None  # square latents
        for block in unet.down_blocks:
            channels = block.resnets[0].out_channels
            for _ in block.resnets:
                res.append(torch.randn(s.shape[0], channels, size, size, generator=gen) * 0.1)
            if block.downsamplers is not None:
                size //= 2
                res.append(torch.randn(s.shape[0], channels, size, size, generator=gen) * 0.1)
        mid = torch.randn(s.shape[0], channels, size, size, generator=gen) * 0.1
        assert len(res) == n_down
        stock = unet(
            s, ts, text, down_block_additional_residuals=tuple(res), mid_block_additional_residual=mid
        ).sample
        ours = unet_forward_with_brushnet(
            unet, s, ts, text, down_block_additional_residuals=res, mid_block_additional_residual=mid
        )
    torch.testing.assert_close(ours, stock, atol=1e-6, rtol=0)


def test_wrong_residual_count_is_an_error(golden):
    unet, brushnet, t = golden
    s, ts, text, cond = t["in.sample"], t["in.timestep"], t["in.encoder_hidden_states"], t["in.brushnet_cond"]
    with torch.no_grad():
        down, mid, up = brushnet(s, ts, text, cond, return_dict=False)
        with pytest.raises(ValueError, match="down injection points"):
            unet_forward_with_brushnet(unet, s, ts, text, down[:-1], mid, up)
