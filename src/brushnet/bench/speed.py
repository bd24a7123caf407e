"""Speed and memory per method × resolution × dtype × step count.

For each combination: one warm-up call (excluded), then ``repeats`` timed calls of
:func:`brushnet.methods.inpaint` on a fixed synthetic image with a centred square hole (a quarter of the
area). Reported: the median seconds per image (wall clock around the whole ``inpaint`` call), UNet calls
per image (as the method counts them: a CFG pair is 2), and peak memory during the timed calls — on CUDA
``torch.cuda.max_memory_allocated``; on CPU the process's peak resident set size (psutil, sampled every
5 ms; it includes the loaded weights, and ``rss_increase_mib`` is the rise over the RSS before the calls).
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["random_weight_models", "compile_method", "measure_speed", "format_table"]


def random_weight_models(preset: str, out_dir: str | os.PathLike, methods: Sequence[str]):
    """Build random-weight components for ``methods`` with :mod:`brushnet.testing` under ``out_dir``
    (reused when already there) and return their :class:`~brushnet.methods.ModelPaths`."""
    from .. import testing
    from ..methods import ModelPaths

    out = Path(out_dir) / preset
    base = out / "base"
    if not (base / "model_index.json").is_file():
        testing.build_base(base, preset)
    paths: dict[str, str] = {"base": str(base)}
    if "brushnet" in methods:
        if not (out / "brushnet" / "config.json").is_file():
            testing.build_brushnet(out / "brushnet", base)
        paths["brushnet"] = str(out / "brushnet")
    if "sd-inpainting" in methods:
        if not (out / "inpaint" / "model_index.json").is_file():
            testing.build_inpaint_model(out / "inpaint", base, preset)
        paths["inpaint_model"] = str(out / "inpaint")
    if "controlnet-inpaint" in methods:
        if not (out / "controlnet" / "config.json").is_file():
            testing.build_controlnet(out / "controlnet", base)
        paths["controlnet"] = str(out / "controlnet")
    return ModelPaths(**paths)


def compile_method(method) -> list[str]:
    """``torch.compile`` the denoising networks of a loaded method, in place.

    BrushNet drives the stock UNet from plain code that calls its blocks, so compiling the UNet's own
    ``forward`` would not take effect; instead every block of ``down_blocks``, ``mid_block`` and
    ``up_blocks`` of the UNet and of the branch (BrushNet / ControlNet) is compiled with
    ``nn.Module.compile`` (the module keeps its type and weights). Returns what was compiled.
    """
    pipeline = getattr(method, "pipeline", None)
    compiled: list[str] = []
    seen: set[int] = set()
    for owner in (pipeline, method):
        if owner is None:
            continue
        for name in ("unet", "brushnet", "controlnet"):
            module = getattr(owner, name, None)
            if module is None or id(module) in seen:
                continue
            seen.add(id(module))
            for part in ("down_blocks", "mid_block", "up_blocks"):
                blocks = getattr(module, part, None)
                if blocks is None:
                    continue
                for index, block in enumerate(blocks if hasattr(blocks, "__len__") else [blocks]):
                    block.compile()
                    compiled.append(f"{name}.{part}.{index}")
    if not compiled:
        logger.warning("--compile: found no unet/brushnet/controlnet blocks on %s", type(method).__name__)
    return compiled


class _PeakRSS:
    """Samples the process RSS in a background thread; ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.start = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _test_input(resolution: int):
    from PIL import Image

    y, x = np.mgrid[0:resolution, 0:resolution] / max(1, resolution - 1)
    rgb = np.stack([x, y, 0.5 * (x + y)], axis=-1)
    image = Image.fromarray((rgb * 255).round().astype(np.uint8))
    hole = np.zeros((resolution, resolution), dtype=bool)
    quarter = resolution // 4
    hole[quarter : resolution - quarter, quarter : resolution - quarter] = True
    return image, hole


def measure_speed(
    methods: Sequence[str],
    models,
    resolutions: Sequence[int] = (512,),
    dtypes: Sequence[str] = ("fp32",),
    steps: Sequence[int] = (50,),
    repeats: int = 3,
    device: str = "cpu",
    compile: bool = False,
    scheduler: str = "unipc-original",
    guidance_scale: float = 7.5,
) -> list[dict[str, Any]]:
    """Time every method × dtype × resolution × step count (see the module docstring).

    Returns:
        One record per combination: ``method, device, dtype, resolution, steps, compile, repeats,
        seconds_per_image`` (median), ``seconds`` (every repeat), ``unet_calls``, ``extra_calls``,
        ``memory`` (``"cuda_max_allocated"`` or ``"cpu_peak_rss"``), ``peak_memory_mib`` and, on CPU,
        ``rss_increase_mib``.
    """
    import torch

    from ..methods import inpaint, load_method

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    cuda = torch.device(device).type == "cuda"
    records = []
    for method_name in methods:
        for dtype in dtypes:
            method = load_method(method_name, models, device=device, dtype=dtype)
            compiled = compile_method(method) if compile else []
            for resolution in resolutions:
                image, hole = _test_input(resolution)
                for step_count in steps:
                    request = {
                        "prompt": "a red circle",
                        "seed": 0,
                        "steps": step_count,
                        "guidance_scale": guidance_scale,
                        "scheduler": scheduler,
                    }
                    inpaint(method, image, hole, request)  # warm-up, excluded
                    seconds = []
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    with _PeakRSS() as rss:
                        for _ in range(repeats):
                            start = time.perf_counter()
                            result = inpaint(method, image, hole, request)
                            if cuda:
                                torch.cuda.synchronize()
                            seconds.append(time.perf_counter() - start)
                    record = {
                        "method": method_name,
                        "device": device,
                        "dtype": dtype,
                        "resolution": resolution,
                        "steps": step_count,
                        "compile": bool(compiled),
                        "repeats": repeats,
                        "seconds_per_image": statistics.median(seconds),
                        "seconds": seconds,
                        "unet_calls": result.unet_calls,
                        "extra_calls": result.extra_calls,
                    }
                    if cuda:
                        record["memory"] = "cuda_max_allocated"
                        record["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
                    else:
                        record["memory"] = "cpu_peak_rss"
                        record["peak_memory_mib"] = rss.peak / 2**20
                        record["rss_increase_mib"] = (rss.peak - rss.start) / 2**20
                    logger.info("%s", record)
                    records.append(record)
            del method
    return records


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of :func:`measure_speed` records."""
    header = [
        "method",
        "device",
        "dtype",
        "res",
        "steps",
        "compile",
        "s/image",
        "UNet calls",
        "peak MiB",
        "+MiB",
    ]
    lines = [header]
    for r in records:
        increase = r.get("rss_increase_mib")
        lines.append(
            [
                r["method"],
                r["device"],
                r["dtype"],
                str(r["resolution"]),
                str(r["steps"]),
                "yes" if r["compile"] else "no",
                f"{r['seconds_per_image']:.3f}",
                str(r["unet_calls"]),
                f"{r['peak_memory_mib']:.0f}",
                "–" if increase is None else f"{increase:.0f}",
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)
