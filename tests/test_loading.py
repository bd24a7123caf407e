import json
import shutil

import pytest

from brushnet.loading import CheckpointError, load_base_components, load_brushnet


def test_load_tiny_base_and_brushnet(tiny_models):
    parts = load_base_components(tiny_models["base"])
    assert set(parts) == {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}
    brushnet = load_brushnet(tiny_models["brushnet"])
    assert brushnet.num_down_residuals > 0


def test_wrong_kind_errors(tiny_models, tmp_path):
    with pytest.raises(CheckpointError, match="UNet2DConditionModel, not a BrushNetModel"):
        load_brushnet(tiny_models["base"] / "unet")
    with pytest.raises(CheckpointError, match="not a BrushNet checkpoint"):
        load_brushnet(tiny_models["base"])
    with pytest.raises(CheckpointError, match="BrushNetModel, not a full base model"):
        load_base_components(tiny_models["brushnet"])
    with pytest.raises(CheckpointError, match="not found"):
        load_brushnet(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="not found"):
        load_base_components(tmp_path / "nothing")
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="allow-pickle"):
        load_base_components(tmp_path / "model.ckpt")


def test_pickle_only_folder_needs_permission(tiny_models, tmp_path):
    folder = tmp_path / "bn"
    shutil.copytree(tiny_models["brushnet"], folder)
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle-based weights"):
        load_brushnet(folder)


def test_brushnet_inside_pipeline_folder_is_found(tiny_models, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_models["base"], folder)
    shutil.copytree(tiny_models["brushnet"], folder / "brushnet")
    index = json.loads((folder / "model_index.json").read_text())
    index["brushnet"] = ["brushnet", "BrushNetModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert load_brushnet(folder).num_down_residuals > 0
