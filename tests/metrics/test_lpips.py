import pytest
import torch
from safetensors.torch import save_file

from brushnet.metrics.lpips import SQUEEZE_TAP_CHANNELS, LPIPSSqueeze, load_lpips_squeeze, lpips_distance

FIRE_INDICES = (3, 4, 6, 7, 9, 10, 11, 12)
# (in, squeeze, expand) of each Fire module of torchvision's squeezenet1_1, in order.
FIRE_SHAPES = ((64, 16, 64), (128, 16, 64), (128, 32, 128), (256, 32, 128), (256, 48, 192), (384, 48, 192))
FIRE_SHAPES += ((384, 64, 256), (512, 64, 256))


def _torchvision_backbone_keys():
    keys = {"features.0.weight": (64, 3, 3, 3), "features.0.bias": (64,)}
    for index, (c_in, squeeze, expand) in zip(FIRE_INDICES, FIRE_SHAPES):
        keys[f"features.{index}.squeeze.weight"] = (squeeze, c_in, 1, 1)
        keys[f"features.{index}.squeeze.bias"] = (squeeze,)
        keys[f"features.{index}.expand1x1.weight"] = (expand, squeeze, 1, 1)
        keys[f"features.{index}.expand1x1.bias"] = (expand,)
        keys[f"features.{index}.expand3x3.weight"] = (expand, squeeze, 3, 3)
        keys[f"features.{index}.expand3x3.bias"] = (expand,)
    return keys


@pytest.fixture(scope="module")
def lpips_model():
    torch.manual_seed(0)
    model = LPIPSSqueeze()
    for index in range(7):  # published heads are non-negative
        head = getattr(model, f"lin{index}").model[1]
        head.weight.data = head.weight.data.abs()
    return model.eval()


def _published_files(model, folder, fmt):
    backbone = {
        f"features.{k[len('net.features.') :]}": v
        for k, v in model.state_dict().items()
        if k.startswith("net.")
    }
    backbone["classifier.1.weight"] = torch.zeros(1000, 512, 1, 1)  # torchvision carries a classifier
    backbone["classifier.1.bias"] = torch.zeros(1000)
    heads = {k: v for k, v in model.state_dict().items() if k.startswith("lin")}
    if fmt == "pth":
        torch.save(backbone, folder / "squeezenet1_1.pth")
        torch.save(heads, folder / "squeeze.pth")
        return folder / "squeezenet1_1.pth", folder / "squeeze.pth"
    save_file(backbone, folder / "squeezenet1_1.safetensors")
    save_file(heads, folder / "squeeze.safetensors")
    return folder / "squeezenet1_1.safetensors", folder / "squeeze.safetensors"


def test_backbone_keys_match_torchvision_squeezenet1_1(lpips_model):
    features = {
        k[len("net.") :]: tuple(v.shape) for k, v in lpips_model.state_dict().items() if k.startswith("net.")
    }
    assert features == _torchvision_backbone_keys()
    # squeezenet1_1 has 1,235,496 parameters, 513,000 of them in the 1000-way classifier conv.
    assert sum(v.numel() for v in lpips_model.net.parameters()) == 1_235_496 - 513_000


def test_linear_head_keys_match_lpips_v01(lpips_model):
    heads = {k: tuple(v.shape) for k, v in lpips_model.state_dict().items() if k.startswith("lin")}
    assert heads == {f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(SQUEEZE_TAP_CHANNELS)}


def test_taps_have_published_channel_counts(lpips_model):
    taps = lpips_model.taps(torch.zeros(1, 3, 64, 64))
    assert [t.shape[1] for t in taps] == list(SQUEEZE_TAP_CHANNELS)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_save_load_round_trip(lpips_model, tmp_path, images, fmt):
    backbone_path, linear_path = _published_files(lpips_model, tmp_path, fmt)
    loaded = load_lpips_squeeze(backbone_path, linear_path)
    generated, original = images
    torch.testing.assert_close(
        lpips_distance(loaded, generated, original), lpips_distance(lpips_model, generated, original)
    )


def test_identical_is_zero_and_different_is_positive(lpips_model, images):
    generated, original = images
    assert torch.equal(lpips_distance(lpips_model, original, original), torch.zeros(2))
    distance = lpips_distance(lpips_model, generated, original)
    assert distance.shape == (2,) and (distance > 0).all()
    torch.testing.assert_close(distance, lpips_distance(lpips_model, original, generated))  # symmetric


def test_hole_differences_do_not_count(lpips_model, images):
    generated, original = images
    mask = torch.zeros(2, 1, 40, 48)
    mask[..., 10:30, 12:36] = 1
    pasted = original * (1 - mask) + generated * mask
    assert torch.equal(lpips_distance(lpips_model, pasted, original, mask), torch.zeros(2))
    assert (lpips_distance(lpips_model, pasted, original) > 0).all()


def test_linear_in_head_weights_batch_equals_single(lpips_model, images):
    generated, original = images
    base = lpips_distance(lpips_model, generated, original)
    doubled = LPIPSSqueeze()
    doubled.load_state_dict(lpips_model.state_dict())
    for index in range(7):
        getattr(doubled, f"lin{index}").model[1].weight.data *= 2
    torch.testing.assert_close(lpips_distance(doubled.eval(), generated, original), 2 * base)
    singles = torch.cat(
        [lpips_distance(lpips_model, generated[i : i + 1], original[i : i + 1]) for i in range(2)]
    )
    torch.testing.assert_close(base, singles)
    torch.testing.assert_close(base, lpips_distance(lpips_model, generated, original))  # deterministic (eval)


def test_missing_heads_raise(lpips_model, tmp_path):
    backbone_path, linear_path = _published_files(lpips_model, tmp_path, "pth")
    heads = torch.load(linear_path, weights_only=True)
    del heads["lin6.model.1.weight"]
    torch.save(heads, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="1 missing"):
        load_lpips_squeeze(backbone_path, tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError):
        load_lpips_squeeze(tmp_path / "nope.pth", linear_path)
