"""The training loop on a CUDA device (run where a GPU is lent: ``python -m pytest -m gpu tests/training``).

On CPU every tensor shares one device, so these catch what only a GPU shows: state restored on the wrong
device after a resume, and the mixed-precision path with real half-precision kernels.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from brushnet.training import loop
from brushnet.training.config import make_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_resume_with_ema_on_cuda(base_config, tmp_path, mixed_precision):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the precision differs between the parametrised runs
    common = {**base_config, "use_ema": True, "ema_decay": 0.9, "mixed_precision": mixed_precision}
    straight = loop.train(make_config({**common, "output_dir": str(tmp_path / "a"), "max_train_steps": 4}))
    loop.train(make_config({**common, "output_dir": str(tmp_path / "b"), "max_train_steps": 2}))
    resumed = loop.train(
        make_config(
            {
                **common,
                "output_dir": str(tmp_path / "b"),
                "max_train_steps": 4,
                "resume_from_checkpoint": "latest",
            }
        )
    )
    AcceleratorState._reset_state(True)
    assert resumed.global_step == 4 and len(resumed.losses) == 2
    # The same noise and data. CUDA kernels may sum in another order, so close rather than bit-equal; Adam
    # turns a near-zero gradient's sign flip into a full ±lr step, hence atol of a few steps' size (lr 1e-3).
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-2)
    a = load_file(Path(straight.final_model_dir) / "diffusion_pytorch_model.safetensors")
    b = load_file(Path(resumed.final_model_dir) / "diffusion_pytorch_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=5e-3)
