"""The fast path and float32 memory on a CUDA device (issue 14; run where a GPU is lent:
``python -m pytest -m gpu tests/pipelines/test_fast_path_gpu.py``).

- ``pipe.compile()`` with its CUDA default (``reduce-overhead``: CUDA graphs) stays within fp16 noise of the eager
  path, a second call replays without compiling, and a scheduler that keeps model outputs (PNDM) sees its own copies
  (a CUDA graph overwrites its output on the next replay);
- float32 memory: at strict fp32 the SD1.5-sized call peaks less than 2 GiB above its weights (the issue's defect:
  26.1 GiB for the pipeline against 7.3 GiB for the original; the cause was cuDNN's workspace for the branch's
  batch-1 convolutions, see ``brushnet.pipelines.common.strict_fp32_cudnn``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _pipeline(tmp_path_factory, preset: str, dtype: torch.dtype):
    from brushnet.bench.speed import random_weight_models
    from brushnet.methods import load_method

    paths = random_weight_models(preset, tmp_path_factory.mktemp(f"fast_{preset}"), ["brushnet"])
    pipe = load_method("brushnet", paths, device="cuda", dtype=dtype).pipeline
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _scene(size: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return image, Image.fromarray(mask)


def _run(pipe, size: int, steps: int = 4):
    image, mask = _scene(size)
    return pipe(
        "a red ball",
        image,
        mask,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images.float()


@pytest.mark.parametrize("scheduler", ["unipc", "pndm"])
def test_cuda_graph_fast_path_fp16_parity_and_one_compile(tmp_path_factory, scheduler):
    from torch._dynamo.utils import counters

    from brushnet.schedulers import make_scheduler

    torch._dynamo.reset()
    counters.clear()
    pipe = _pipeline(tmp_path_factory, "tiny", torch.float16)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    eager = _run(pipe, 64)
    pipe.compile(cache_dir=tmp_path_factory.mktemp("cache"))
    fast = _run(pipe, 64)
    graphs = counters["stats"]["unique_graphs"]
    again = _run(pipe, 64)
    assert graphs == 1 and counters["stats"]["unique_graphs"] == 1
    assert pipe._compiled_step.resolved_mode == "reduce-overhead"
    assert (fast - eager).abs().max() <= 2e-2 and (again - eager).abs().max() <= 2e-2


def test_fp32_sd15_peak_stays_near_the_weights(tmp_path_factory, monkeypatch):
    """Strict fp32 (TF32 off), SD1.5-sized random weights, 512², CFG: the call's peak above the weights stays under
    2 GiB. Before the fix it was 19909 MiB on an H100 (cuDNN's workspace for the branch's batch-1 convolutions;
    the original pipeline, branch on the doubled batch: 7.3 GiB in all, about 1 GiB above its weights)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    pipe = _pipeline(tmp_path_factory, "sd15", torch.float32)
    _run(pipe, 512, steps=1)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _run(pipe, 512, steps=3)
    torch.cuda.synchronize()
    above = (torch.cuda.max_memory_allocated() - weights) / 2**20
    assert above <= 2048, f"{above:.0f} MiB above the weights"
