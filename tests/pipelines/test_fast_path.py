"""The fast path (issue 14): ``pipe.compile()`` runs each denoising step as one compiled function.

The default suite checks the mechanism with a backend that runs dynamo's graph as it is (no kernel generation, so
seconds, not minutes, on 2 CPU cores): the whole step traces as one graph (``fullgraph=True``: no graph break, so no
host round trip inside it), the output equals the eager path's, and a second call, a new image size or guidance
switched off compile exactly when they should. Inductor itself (the kernels a GPU would run) is checked behind
``-m slow``: parity at float32 and float16, and a warm start from the on-disk cache in a second process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch._dynamo
from diffusers.callbacks import SDCFGCutoffCallback

from brushnet import StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline
from brushnet.pipelines.fast_path import compile_cache_dir

from .conftest import tiny_components, tiny_inputs


class CountingBackend:
    """A ``torch.compile`` backend that runs the captured graph as it is and counts the graphs it was given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def make(kind: str = "sd"):
    cls = StableDiffusionXLBrushNetPipeline if kind == "xl" else StableDiffusionBrushNetPipeline
    pipe = cls(**tiny_components(kind))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **overrides):
    return pipe(**{**tiny_inputs(), **overrides}).images


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code is cached per function across tests: start each test with none."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_fast_path_equals_eager_and_compiles_once_per_shape(caplog):
    pipe = make()
    eager = run(pipe)
    eager_no_cfg = run(pipe, guidance_scale=1.0)
    eager_48 = run(pipe, **tiny_inputs(size=48))

    backend = CountingBackend()
    assert pipe.compile(backend=backend) is pipe and pipe.is_compiled
    with caplog.at_level(logging.INFO, logger="brushnet.pipelines.fast_path"):
        fast = run(pipe)
        assert backend.graphs == 1  # branch + UNet + guidance: one graph, no break
        assert diff(eager, fast) <= 1e-4
        assert diff(eager, run(pipe)) <= 1e-4
        assert backend.graphs == 1  # the second call replays
        assert diff(eager_no_cfg, run(pipe, guidance_scale=1.0)) <= 1e-4
        assert backend.graphs == 2  # guidance off: the step's other graph
        assert diff(eager_48, run(pipe, **tiny_inputs(size=48))) <= 1e-4
        assert diff(eager_48, run(pipe, **tiny_inputs(size=48))) <= 1e-4
        assert backend.graphs == 3  # a new size compiles once
        # the branch scale and guidance scale are tensors in the graph: changing them recompiles nothing
        changed = run(pipe, guidance_scale=3.0, brushnet_conditioning_scale=0.5, control_guidance_end=0.5)
        assert backend.graphs == 3
    said = [r.getMessage() for r in caplog.records if "compiling the denoising step" in r.getMessage()]
    assert len(said) == 3 and "batch 1, 16x16 latents, guidance on" in said[0]

    pipe.uncompile()
    assert not pipe.is_compiled
    eager_changed = run(pipe, guidance_scale=3.0, brushnet_conditioning_scale=0.5, control_guidance_end=0.5)
    assert diff(eager_changed, changed) <= 1e-4 and diff(eager_changed, eager) > 1e-3


def test_fast_path_sdxl_with_guidance_rescale():
    """SDXL: the branch on the doubled batch, added conditions, Euler's scaled input, guidance rescale."""
    pipe = make("xl")
    eager = run(pipe, guidance_rescale=0.7)
    backend = CountingBackend()
    pipe.compile(backend=backend)
    assert diff(eager, run(pipe, guidance_rescale=0.7)) <= 1e-4
    assert backend.graphs == 1


def test_fast_path_with_a_controlnet_and_a_cfg_cutoff():
    """A guide ControlNet inside the compiled step, and a callback that switches guidance off mid-loop."""
    pipe = make("sd+controlnet")
    control = tiny_inputs(seed=3)["image"]
    arguments = dict(
        control_image=control,
        num_inference_steps=4,
        callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5),
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    eager = run(pipe, **arguments)
    backend = CountingBackend()
    pipe.compile(backend=backend)
    assert diff(eager, run(pipe, **arguments)) <= 1e-4
    assert backend.graphs == 2  # guidance on, then off


def test_fast_path_powerpaint(powerpaint_pipes):
    """PowerPaint v2: the branch reads its own task words on the doubled batch."""
    pipe = powerpaint_pipes["v2"]
    inputs = tiny_inputs(size=64)
    arguments = dict(
        prompt="a ball",
        image=inputs["image"],
        mask_image=inputs["mask_image"],
        task="object-removal",
        num_inference_steps=2,
        output_type="np",
    )
    eager = pipe(**arguments, generator=torch.Generator().manual_seed(0)).images
    backend = CountingBackend()
    try:
        pipe.compile(backend=backend)
        fast = pipe(**arguments, generator=torch.Generator().manual_seed(0)).images
    finally:
        pipe.uncompile()
    assert diff(eager, fast) <= 1e-4 and backend.graphs == 1


def test_fast_path_refuses_offloading():
    pipe = make()
    pipe.enable_model_cpu_offload(device="cpu")
    pipe.compile(backend=CountingBackend())
    with pytest.raises(ValueError, match="cannot run with offloading: the unet carries offload hooks"):
        run(pipe)


def test_compile_arguments_are_checked():
    pipe = make()
    with pytest.raises(ValueError, match="either `mode` or `options`"):
        pipe.compile(mode="reduce-overhead", options={"max_autotune": True})
    with pytest.raises(ValueError, match="inductor backend only"):
        pipe.compile(mode="reduce-overhead", backend="eager")


def test_compile_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("BRUSHNET_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "brushnet" / "torch-compile"
    monkeypatch.setenv("BRUSHNET_COMPILE_CACHE", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"
    assert compile_cache_dir(tmp_path / "given") == tmp_path / "given"


# -- inductor: the kernels themselves (minutes on 2 CPU cores) ------------------------------------------------
_INDUCTOR_RUN = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, torch
    from torch._dynamo.utils import counters
    sys.path.insert(0, {tests!r})
    from pipelines.conftest import tiny_components, tiny_inputs
    from brushnet import StableDiffusionBrushNetPipeline

    dtype = getattr(torch, {dtype!r})
    pipe = StableDiffusionBrushNetPipeline(**tiny_components("sd")).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(**tiny_inputs(), output_type="pt").images.float()
    eager = run()
    pipe.compile(cache_dir={cache!r})
    start = time.perf_counter()
    first = run()
    first_seconds = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"]
    second = run()
    print(json.dumps(dict(
        diff=float((first - eager).abs().max()), diff_second=float((second - eager).abs().max()),
        graphs=graphs, graphs_after_second=counters["stats"]["unique_graphs"], first_seconds=first_seconds,
        hits=counters["inductor"]["fxgraph_cache_hit"], misses=counters["inductor"]["fxgraph_cache_miss"],
    )))
    """
)


def _inductor_run(tmp_path, dtype: str) -> dict:
    tests = os.path.dirname(os.path.dirname(__file__))
    code = _INDUCTOR_RUN.format(tests=tests, dtype=dtype, cache=str(tmp_path / "cache"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_inductor_fast_path_float32_parity_and_warm_start(tmp_path):
    cold = _inductor_run(tmp_path, "float32")
    assert cold["diff"] <= 1e-4 and cold["diff_second"] <= 1e-4
    assert cold["graphs"] == cold["graphs_after_second"] == 1  # the second call does not recompile
    assert cold["misses"] >= 1 and cold["hits"] == 0
    warm = _inductor_run(tmp_path, "float32")  # a second process: kernels from the on-disk cache
    assert warm["diff"] <= 1e-4
    assert warm["hits"] >= 1 and warm["misses"] == 0
    assert warm["first_seconds"] < cold["first_seconds"] / 2


@pytest.mark.slow
def test_inductor_fast_path_float16_parity(tmp_path):
    result = _inductor_run(tmp_path, "float16")
    assert result["diff"] <= 2e-2 and result["graphs"] == result["graphs_after_second"] == 1
