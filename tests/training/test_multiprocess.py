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
