import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from brushnet.errors import CheckpointError
from brushnet.models.brushnet import BrushNetModel
from brushnet.training import checkpointing, loop
from brushnet.training.config import make_config


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-"))


def test_rotation_keeps_exactly_the_newest(base_config):
    config = make_config(
        {**base_config, "max_train_steps": 5, "checkpointing_steps": 1, "checkpoints_total_limit": 2}
    )
    loop.train(config)
    out = Path(config.output_dir)
    assert _names(out) == ["checkpoint-4", "checkpoint-5"]
    state = json.loads((out / "checkpoint-5" / checkpointing.TRAINING_STATE_FILE).read_text())
    assert state["global_step"] == 5 and len(state["data_positions"]) == 1
    for name in ("checkpoint-4", "checkpoint-5"):
        BrushNetModel.from_pretrained(out / name / "brushnet")
        assert (out / name / "optimizer.bin").is_file() and (out / name / "model.safetensors").is_file()


def test_latest_ignores_partial_folders(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-30.tmp-123"):
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpointing.TRAINING_STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-20").mkdir()  # no training state: not complete
    assert checkpointing.resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"  # numeric order
    assert checkpointing.resolve_checkpoint(tmp_path / "missing", "latest") is None
    assert checkpointing.resolve_checkpoint(tmp_path, "checkpoint-2") == tmp_path / "checkpoint-2"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        checkpointing.resolve_checkpoint(tmp_path, "checkpoint-20")
    assert checkpointing.recover_interrupted_saves(tmp_path) == [
        "removed checkpoint-30.tmp-123: a save interrupted before it was complete"
    ]
    assert _names(tmp_path) == ["checkpoint-10", "checkpoint-2", "checkpoint-20"]


def test_crash_mid_save_keeps_the_last_good_checkpoint(base_config, tmp_path, monkeypatch):
    config = {**base_config, "max_train_steps": 4, "checkpoints_total_limit": 1}
    real_save = checkpointing._save_diffusers_model

    def crash_on_step_4(model, path):
        if path.parent.name.startswith("checkpoint-4"):
            (path / "half-written").mkdir(parents=True)
            raise OSError("disk full (simulated)")
        real_save(model, path)

    monkeypatch.setattr(checkpointing, "_save_diffusers_model", crash_on_step_4)
    with pytest.raises(OSError, match="cannot save checkpoint-4 in .*: disk full .*earlier checkpoints"):
        loop.train(make_config(config))
    out = Path(config["output_dir"])
    assert _names(out) == ["checkpoint-2"]  # the partial folder was removed, the last good one kept
    assert checkpointing.resolve_checkpoint(out, "latest") == out / "checkpoint-2"
    BrushNetModel.from_pretrained(out / "checkpoint-2" / "brushnet")

    # resuming from it finishes the run exactly like an uninterrupted one, and clears the partial folder
    monkeypatch.setattr(checkpointing, "_save_diffusers_model", real_save)
    resumed = loop.train(make_config({**config, "resume_from_checkpoint": "latest"}))
    assert _names(out) == ["checkpoint-4"]
    straight = loop.train(make_config({**config, "output_dir": str(tmp_path / "straight")}))
    a = load_file(resumed.final_model_dir / "diffusion_pytorch_model.safetensors")
    b = load_file(straight.final_model_dir / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_different_process_count_is_refused(base_config, tmp_path):
    config = {**base_config, "max_train_steps": 2}
    loop.train(make_config(config))
    state_file = Path(config["output_dir"]) / "checkpoint-2" / checkpointing.TRAINING_STATE_FILE
    state = json.loads(state_file.read_text())
    state["data_positions"].append([0, 1])  # as if written by two processes
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="same number"):
        loop.train(make_config({**config, "max_train_steps": 3, "resume_from_checkpoint": "latest"}))
