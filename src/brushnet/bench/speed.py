"""Speed and memory per method × resolution × dtype × step count.

For each combination: one warm-up call (excluded), then ``repeats`` timed calls of
:func:`brushnet.methods.inpaint` on a fixed synthetic image with a centred square hole (a quarter of the
area). Reported:

- ``seconds_per_image``: the median wall clock around the whole ``inpaint`` call (text encoding, VAE
  encode/decode and paste-back included);
- ``seconds_per_step``: the median time of one denoising step, measured between the method's step
  callbacks (first to last, divided by their number minus one: so the VAE and text encoder are excluded);
  on CUDA the device is synchronised at every callback so that the step timer measures GPU work;
- ``unet_calls`` per image (as the method counts them: a CFG pair is 2) and ``extra_calls`` (BrushNet
  branch / ControlNet passes, counted the same way);
- peak memory during the timed calls: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's
  peak resident set size (psutil, sampled every 5 ms; it includes the loaded weights, and
  ``rss_increase_mib`` is the rise over the RSS before the calls).

``cfg_branch`` compares BrushNet's two ways of running the branch under classifier-free guidance: ``once``
(this project: the SD1.5 branch reads no text, so one pass serves both halves) and ``doubled`` (the
original pipeline: the branch runs on the CFG-doubled batch). Each record names the mode that ran: an SDXL
branch reads text and always runs doubled, and without guidance there is no doubled batch (``None``); a mode
that would run as one already timed is skipped. Other methods have one way (recorded as ``None``). A combination that the device cannot run (e.g. a dtype without kernels there) is recorded with
its ``error`` instead of figures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CFG_BRANCH_MODES",
    "DTYPES",
    "check_speed_settings",
    "random_weight_models",
    "compile_method",
    "measure_speed",
    "format_table",
]

CFG_BRANCH_MODES = ("once", "doubled")
DTYPES = ("fp32", "fp16", "bf16")


def check_speed_settings(
    resolutions: Sequence[int],
    dtypes: Sequence[str],
    steps: Sequence[int],
    repeats: int,
    cfg_branch: Sequence[str],
    names: dict[str, str] | None = None,
) -> None:
    """Refuse settings :func:`measure_speed` cannot time, before any model is built or loaded: an empty list, a
    resolution or step count below 1, ``repeats`` below 1, an unknown dtype or CFG branch mode.

    Args:
        names: what to call each setting in the message (the CLI passes its flags, ``{"resolutions":
            "--resolutions", ...}``); default: the parameter names.

    Raises:
        ValueError: one line naming the setting and the bad value.
    """
    names = {
        key: (names or {}).get(key, key)
        for key in ("resolutions", "dtypes", "steps", "repeats", "cfg_branch")
    }
    for key, values in (
        ("resolutions", resolutions),
        ("dtypes", dtypes),
        ("steps", steps),
        ("cfg_branch", cfg_branch),
    ):
        if not values:
            raise ValueError(f"{names[key]} is empty: give at least one value")
    for key, values in (("resolutions", resolutions), ("steps", steps)):
        bad = [
            value for value in values if isinstance(value, bool) or not isinstance(value, int) or value < 1
        ]
        if bad:
            raise ValueError(f"{names[key]} must be whole numbers of at least 1, got {bad[0]!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"{names['repeats']} must be at least 1, got {repeats!r}")
    unknown = [dtype for dtype in dtypes if dtype not in (*DTYPES, "float32", "float16", "bfloat16")]
    if unknown:
        raise ValueError(f"{names['dtypes']}: unknown dtype {unknown[0]!r}; choose among {', '.join(DTYPES)}")
    unknown = [mode for mode in cfg_branch if mode not in CFG_BRANCH_MODES]
    if unknown:
        raise ValueError(
            f"{names['cfg_branch']}: unknown mode {unknown[0]!r}; choose among {', '.join(CFG_BRANCH_MODES)}"
        )


def random_weight_models(preset: str, out_dir: str | os.PathLike, methods: Sequence[str]):
    """Build random-weight components for ``methods`` with :mod:`brushnet.random_models` under ``out_dir``
    (reused when already there) and return their :class:`~brushnet.methods.ModelPaths`."""
    from .. import random_models
    from ..methods import ModelPaths

    out = Path(out_dir) / preset
    base = out / "base"
    if not (base / "model_index.json").is_file():
        random_models.build_base(base, preset)
    paths: dict[str, str] = {"base": str(base)}
    if "brushnet" in methods:
        if not (out / "brushnet" / "config.json").is_file():
            random_models.build_brushnet(out / "brushnet", base)
        paths["brushnet"] = str(out / "brushnet")
    if {"sd-inpainting", "hd-painter"} & set(methods):  # the 9-channel inpainting model
        if not (out / "inpaint" / "model_index.json").is_file():
            random_models.build_inpaint_model(out / "inpaint", base, preset)
        paths["inpaint_model"] = str(out / "inpaint")
    if "controlnet-inpaint" in methods:
        if not (out / "controlnet" / "config.json").is_file():
            random_models.build_controlnet(out / "controlnet", base)
        paths["controlnet"] = str(out / "controlnet")
    return ModelPaths(**paths)


def compile_method(method) -> list[str]:
    """Turn on the method's compiled path, in place: :meth:`~brushnet.methods.InpaintMethod.compile`, the same
    switch as ``--compile`` everywhere (BrushNet: the whole denoising step, branch + injected UNet + guidance, as one
    compiled function; other methods: ``torch.compile`` of their UNet / ControlNet). Returns what was compiled."""
    compiled = method.compile()
    if not compiled:
        logger.warning("--compile: %s has no compiled path; timed eagerly", type(method).__name__)
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


class _StepTimer:
    """``on_step`` callback that records when each denoising step ended (synchronising CUDA first)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.times: list[float] = []

    def __call__(self, step: int, total: int) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def seconds_per_step(self) -> float | None:
        if len(self.times) < 2:
            return None
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


def set_branch_on_doubled_batch(pipe, doubled: bool) -> None:
    """Make a BrushNet pipeline run its branch on the CFG-doubled batch (as the original pipeline does) or by the
    pipeline's own rule (this project's default: once per step), for before/after comparisons.

    Sets the pipeline's ``branch_batch`` (``"doubled"`` or ``None``); the branch model itself is not touched. A
    branch that reads text (SDXL, PowerPaint) runs on the doubled batch either way.
    """
    pipe.branch_batch = "doubled" if doubled else None


def _branch_mode_that_runs(method, guidance_scale: float) -> str | None:
    """How the loaded BrushNet's branch will actually run: ``"doubled"`` or ``"once"`` under classifier-free
    guidance (a branch that reads text, SDXL's, always runs doubled; so does the default at strict fp32 on
    cuDNN), ``None`` without guidance (there is no doubled batch)."""
    if guidance_scale <= 1:
        return None
    pipe = method.pipeline
    return "doubled" if pipe._branch_on_doubled_batch(pipe.brushnet.dtype) else "once"


def _set_branch_on_doubled_batch(method, doubled: bool) -> None:
    """:func:`set_branch_on_doubled_batch` for a loaded BrushNet method's pipeline."""
    set_branch_on_doubled_batch(method.pipeline, doubled)


@contextlib.contextmanager
def branch_once_at_strict_fp32(pipe):
    """Within the block, ``pipe``'s SD1.5 branch runs once per step at strict fp32 too (``branch_batch =
    "once"``): the pipeline as it was before issue 14's fix (:func:`brushnet.pipelines.common.strict_fp32_cudnn`),
    for the before/after rows of ``benchmarks/compile_speed.py`` and ``benchmarks/fp32_memory_profile.py``."""
    saved, pipe.branch_batch = pipe.branch_batch, "once"
    try:
        yield
    finally:
        pipe.branch_batch = saved


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
    guidance_scale: float | None = 7.5,
    cfg_branch: Sequence[str] = ("once",),
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Time every method × dtype × resolution × step count (× CFG branch mode for BrushNet); see the module
    docstring for what is measured.

    Args:
        methods: registered method names.
        models: :class:`~brushnet.methods.ModelPaths` (or a dict of its fields).
        resolutions: square working sizes.
        dtypes: ``fp32``, ``fp16``, ``bf16``.
        steps: denoising step counts.
        repeats: timed calls per combination (the median is reported); one warm-up call before them.
        device: ``cpu`` or ``cuda[:N]``.
        compile: turn on each method's compiled path (:func:`compile_method`); the warm-up call, which compiles,
            is recorded as ``first_call_seconds``.
        scheduler, guidance_scale: the request's (``guidance_scale`` None: each method's family value,
            :data:`~brushnet.methods.base.FAMILY_GUIDANCE`).
        cfg_branch: BrushNet's modes to time (:data:`CFG_BRANCH_MODES`); ignored for other methods.
        options: method options per method name (``{"hd-painter": {"rasg": False}}``), recorded with each
            combination as ``options``.

    Returns:
        One record per combination: ``method, device, dtype, resolution, steps, cfg_branch, compile,
        repeats, first_call_seconds`` (the warm-up), ``seconds_per_image`` (median), ``seconds`` (every repeat),
        ``seconds_per_step`` (median), ``unet_calls``, ``extra_calls``, ``memory`` (``"cuda_max_allocated"`` or ``"cpu_peak_rss"``),
        ``peak_memory_mib`` and, on CPU, ``rss_increase_mib``; or, for a combination that failed,
        the same keys up to ``repeats`` and ``error``.
    """
    import torch

    from ..errors import InputError
    from ..methods import inpaint, load_method
    from ..methods.base import FAMILY_GUIDANCE

    check_speed_settings(resolutions, dtypes, steps, repeats, cfg_branch)
    cuda = torch.device(device).type == "cuda"
    records = []
    for method_name in methods:
        modes: Sequence[str | None] = list(cfg_branch) if method_name == "brushnet" else [None]
        for dtype in dtypes:
            method = load_method(method_name, _used(method_name, models), device=device, dtype=dtype)
            guidance = FAMILY_GUIDANCE[method.family] if guidance_scale is None else guidance_scale
            compiled = compile_method(method) if compile else []
            for resolution in resolutions:
                image, hole = _test_input(resolution)
                for step_count in steps:
                    timed_modes: set[str | None] = set()
                    for asked in modes:
                        mode = asked
                        if asked is not None:
                            _set_branch_on_doubled_batch(method, asked == "doubled")
                            mode = _branch_mode_that_runs(method, guidance)
                            # e.g. SDXL's branch reads text: doubled whatever is asked
                            if mode in timed_modes:
                                logger.info("--cfg-branch %s runs as %s here: timed once", asked, mode)
                                continue
                            timed_modes.add(mode)
                        # a method with its own schedule (RePaint) keeps it; the record says which ran
                        takes = type(method).schedulers is None or scheduler in type(method).schedulers
                        request = {
                            "prompt": "a red circle",
                            "seed": 0,
                            "steps": step_count,
                            "guidance_scale": guidance,
                            "scheduler": scheduler if takes else None,
                            "options": dict((options or {}).get(method_name) or {}),
                        }
                        record: dict[str, Any] = {
                            "method": method_name,
                            "device": device,
                            "dtype": dtype,
                            "resolution": resolution,
                            "steps": step_count,
                            "cfg_branch": mode,
                            "compile": bool(compiled),
                            "repeats": repeats,
                            "scheduler": scheduler if takes else type(method).default_scheduler,
                            "options": request["options"],
                        }
                        try:
                            start = time.perf_counter()
                            inpaint(
                                method, image, hole, request
                            )  # warm-up (compiles with --compile), excluded
                            record["first_call_seconds"] = time.perf_counter() - start
                        except (RuntimeError, NotImplementedError, TypeError, InputError) as exc:
                            message = (
                                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                            )
                            logger.warning(
                                "%s %s %s: cannot run here: %s", method_name, device, dtype, message
                            )
                            record["error"] = f"{type(exc).__name__}: {message}"
                            records.append(record)
                            continue
                        seconds, per_step = [], []
                        if cuda:
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                        with _PeakRSS() as rss:
                            for _ in range(repeats):
                                timer = _StepTimer(cuda)
                                start = time.perf_counter()
                                result = inpaint(method, image, hole, request, on_step=timer)
                                if cuda:
                                    torch.cuda.synchronize()
                                seconds.append(time.perf_counter() - start)
                                if timer.seconds_per_step() is not None:
                                    per_step.append(timer.seconds_per_step())
                        record.update(
                            seconds_per_image=statistics.median(seconds),
                            seconds=seconds,
                            seconds_per_step=statistics.median(per_step) if per_step else None,
                            unet_calls=result.unet_calls,
                            extra_calls=result.extra_calls,
                        )
                        if cuda:
                            record["memory"] = "cuda_max_allocated"
                            record["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
                        else:
                            record["memory"] = "cpu_peak_rss"
                            record["peak_memory_mib"] = rss.peak / 2**20
                            record["rss_increase_mib"] = (rss.peak - rss.start) / 2**20
                        logger.info(
                            "%s %s %dpx %d steps%s: %.2f s/image",
                            method_name,
                            dtype,
                            resolution,
                            step_count,
                            f" (branch {mode})" if mode else "",
                            record["seconds_per_image"],
                        )
                        logger.debug("%s", record)
                        records.append(record)
            if method_name == "brushnet":
                _set_branch_on_doubled_batch(method, False)
            del method
            if cuda:
                torch.cuda.empty_cache()
    return records


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`measure_speed` records (failed combinations show their error)."""
    header = ["method", "device", "dtype", "res", "steps", "CFG branch", "compile", "s/image", "s/step",
              "UNet calls", "other calls", "peak MiB", "+MiB"]  # fmt: skip
    lines = [header]
    for r in records:
        head = [r["method"], r["device"], r["dtype"], str(r["resolution"]), str(r["steps"]),
                r.get("cfg_branch") or "–", "yes" if r["compile"] else "no"]  # fmt: skip
        if "error" in r:
            lines.append(head + [f"not run: {r['error']}"[:80]] + [""] * (len(header) - len(head) - 1))
            continue
        increase = r.get("rss_increase_mib")
        per_step = r.get("seconds_per_step")
        extra = r.get("extra_calls") or {}
        lines.append(
            head
            + [
                f"{r['seconds_per_image']:.3f}",
                "–" if per_step is None else f"{per_step:.4f}",
                str(r["unet_calls"]),
                ", ".join(f"{k} {v}" for k, v in extra.items()) or "–",
                f"{r['peak_memory_mib']:.0f}",
                "–" if increase is None else f"{increase:.0f}",
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _used(name: str, models):
    """The paths of a model set (several methods') that method ``name`` reads."""
    from ..methods import ModelPaths, get_method_class

    paths = models if isinstance(models, ModelPaths) else ModelPaths(**models)
    return paths.used_by(get_method_class(name))
