"""``allow_pickle`` allows pickle files where present and still prefers safetensors (issue 20, item 11)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from brushnet.loading import CheckpointError, load_base_components, load_brushnet


def _to_bin(folder):
    """Re-save a diffusers model folder with pickle-based weights only (``diffusion_pytorch_model.bin``)."""
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(weights, folder / "diffusion_pytorch_model.bin")
    return weights


@pytest.fixture
def mixed(tiny_models, tmp_path):
    """A copy of the tiny set whose branch and base UNet are pickle-only; the rest stays safetensors."""
    base, brushnet = tmp_path / "base", tmp_path / "brushnet"
    shutil.copytree(tiny_models["base"], base)
    shutil.copytree(tiny_models["brushnet"], brushnet)
    return base, brushnet, _to_bin(brushnet), _to_bin(base / "unet")


def _same(module, weights):
    state = module.state_dict()
    return all(torch.equal(state[key], value) for key, value in weights.items())


def test_pickle_branch_with_a_safetensors_base(tiny_models, mixed):
    _, brushnet, branch_weights, _ = mixed
    with pytest.raises(CheckpointError, match="allow-pickle"):
        load_brushnet(brushnet)
    assert _same(load_brushnet(brushnet, allow_pickle=True), branch_weights)
    parts = load_base_components(tiny_models["base"], allow_pickle=True)  # all safetensors: still loads
    reference = load_file(tiny_models["base"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert _same(parts["unet"], reference)


def test_pickle_unet_among_safetensors_components(tiny_models, mixed):
    base, _, _, unet_weights = mixed
    with pytest.raises(CheckpointError, match="allow-pickle"):
        load_base_components(base)
    parts = load_base_components(base, allow_pickle=True)
    assert _same(parts["unet"], unet_weights)
    vae = load_file(tiny_models["base"] / "vae" / "diffusion_pytorch_model.safetensors")
    assert _same(parts["vae"], vae)


def test_safetensors_is_preferred_when_both_are_present(tiny_models, tmp_path):
    folder = tmp_path / "brushnet"
    shutil.copytree(tiny_models["brushnet"], folder)
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    torch.save(
        {key: torch.zeros_like(value) for key, value in weights.items()},
        folder / "diffusion_pytorch_model.bin",
    )
    assert _same(load_brushnet(folder, allow_pickle=True), weights)


def test_an_allowed_pickle_load_logs_no_fetch_error(mixed, logged):
    """A pickle-only folder loaded with permission: diffusers looked for a safetensors file first and logged
    "An error occurred while trying to fetch …" and "Defaulting to unsafe serialization" on a load that works."""
    base, brushnet, branch_weights, unet_weights = mixed
    with logged("diffusers.models.modeling_utils") as messages:
        assert _same(load_brushnet(brushnet, allow_pickle=True), branch_weights)
        assert _same(load_base_components(base, allow_pickle=True)["unet"], unet_weights)
    assert not [m for m in messages if "error occurred" in m or "unsafe serialization" in m], messages
