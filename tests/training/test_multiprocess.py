"""Two data-parallel processes on CPU (gloo) through torchrun: each reads its own shards, and a resumed run
repeats an uninterrupted one exactly (each process restores its own data position and generator)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _torchrun(args: list[str]) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, "-m", "brushnet.train", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow  # three torchrun launches of two processes: ~25 s on 2 cores (run with -m slow)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_processes_resume_exactly(base_config, tmp_path):
    flags = []
    for key, value in {**base_config, "mask": None, "mask_mode": "mix"}.items():
        if value is not None:
            flags += [f"--{key}", str(value)]
    _torchrun([*flags, "--output_dir", str(tmp_path / "a"), "--max_train_steps", "4"])
    _torchrun([*flags, "--output_dir", str(tmp_path / "b"), "--max_train_steps", "2"])
    _torchrun(
        [
            *flags,
            "--output_dir",
            str(tmp_path / "b"),
            "--max_train_steps",
            "4",
            "--resume_from_checkpoint",
            "latest",
        ]
    )

    state = json.loads((tmp_path / "b" / "checkpoint-2" / "training_state.json").read_text())
    assert len(state["data_positions"]) == 2
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoint-2").glob("process_state_*")) == [
        "process_state_0.safetensors",
        "process_state_1.safetensors",
    ]
    a = load_file(Path(tmp_path / "a" / "brushnet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(Path(tmp_path / "b" / "brushnet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # one torchrun launch of two processes: ~45 s on one core (run with -m slow)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_processes_share_the_validation_loss(base_config, tmp_path):
    """5 (sample, timestep) pairs split 3 / 2 between two processes and summed: the recorded numbers are those one
    process computes for the same weights (the main process's share alone would be about 3/5 of them)."""
    from accelerate import Accelerator

    from brushnet.models.brushnet import BrushNetModel
    from brushnet.training import loop
    from brushnet.training.config import make_config
    from brushnet.training.validation_loss import evaluate_validation_loss, load_held_out_set

    values = {**base_config, "output_dir": str(tmp_path / "run"), "max_train_steps": 2,
              "validation_loss_steps": 2, "validation_loss_samples": 1}  # fmt: skip
    flags = []
    for key, value in {**values, "mask": None, "mask_mode": "mix"}.items():
        if value is not None:
            flags += [f"--{key}", str(value)]
    _torchrun(flags)
    record = json.loads((tmp_path / "run" / "validation_loss.json").read_text())
    assert [e["step"] for e in record["evaluations"]] == [0, 2]

    config = make_config(values)
    components = loop.load_components(config.pretrained_model_name_or_path)
    loop.freeze(components, torch.float32, "cpu")
    held_out = load_held_out_set(config, 1000)
    assert held_out.keys == record["samples"] and held_out.timesteps.tolist() == record["timesteps"]

    def loss(model, batch, generator, timesteps):
        return loop.brushnet_training_loss(model, components, batch, generator, timesteps=timesteps)

    for step, branch in [
        (0, BrushNetModel.from_unet(components.unet)),
        (2, BrushNetModel.from_pretrained(tmp_path / "run" / "checkpoint-2" / "brushnet")),
    ]:
        expected = evaluate_validation_loss(Accelerator(cpu=True), held_out, loss, branch)
        entry = record["evaluations"][[0, 2].index(step)]
        assert entry["loss"] == pytest.approx(expected.loss, rel=1e-6)
        assert entry["bucket_losses"] == pytest.approx(expected.bucket_losses, rel=1e-6)
