"""The fast path against the eager ones, side by side in one process (issue 14).

    python benchmarks/compile_speed.py --preset sd15 --device cuda --dtype fp16 --resolutions 512,1024 \\
        --steps 50 --repeats 5 --output benchmarks/results/compile_speed_gpu.json

One BrushNet pipeline on random-weight components (:mod:`brushnet.random_models`; the cost does not depend on the
values), UniPC ending at sigma_min, guidance 7.5, batch 1, a centred square hole. Variants (``--variants``, in the
order given, on the same loaded pipeline):

- ``doubled``: eager, the branch on the CFG-doubled batch (the original pipeline's schedule);
- ``once``: eager, the branch once per step (this project's default);
- ``compiled``: ``pipe.compile()`` — the step (branch + UNet + guidance) as one compiled function; on CUDA
  ``mode="reduce-overhead"`` (CUDA graphs);
- extras joined with ``+`` to any of them: ``channels_last`` (UNet, branch, VAE in channels-last memory),
  ``fused_qkv`` (``pipe.fuse_qkv_projections()`` and the branch's), ``max_autotune`` (compile mode),
  ``inductor_flags`` (``conv_1x1_as_mm``, ``coordinate_descent_tuning``, no epilogue fusion, CUDA graphs),
  ``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_cudnn`` / ``sdpa_math`` (one attention kernel forced),
  ``cudnn_benchmark`` (``torch.backends.cudnn.benchmark``: cuDNN times its convolution algorithms once per shape);
  and two
  that put back what this project changed, for the before/after: ``diffusers_unipc`` (diffusers' own UniPC, which
  synchronises the host with the GPU 7 times a step, instead of :class:`brushnet.unipc.SyncFreeUniPCMultistepScheduler`)
  and ``no_fp32_guard`` (the SD1.5 branch once per step even at strict fp32, where cuDNN's workspace for its
  batch-1 convolutions took gigabytes: :func:`brushnet.pipelines.common.strict_fp32_cudnn`).

Per variant: one warm-up call (``first_call_s``: for a compiled variant, the first compile into an empty cache plus
one image), then ``--repeats`` timed calls: ``s_per_image`` (median wall clock of the whole call, text encoding and
VAE included), ``s_per_step`` (median over calls of the time between the first and last step callbacks divided by
their number minus one; on CUDA measured with CUDA events, so nothing is synchronised per step), on CUDA
``s_to_first_step`` and ``s_after_last_step`` (from the call's start to the end of the first step, and from the end
of the last step to the call's end: text encoding, VAE encode and decode, pre- and post-processing), ``peak_mib``
(CUDA: ``max_memory_allocated`` over the timed calls; CPU: the process's peak RSS), ``cpu_s_per_image`` (the
process's CPU time per image: on a shared CPU machine steadier than the wall clock), and on CUDA
``host_syncs_per_step`` (calls that synchronised with the device, counted with ``torch.cuda.set_sync_debug_mode``
in one extra call). Eager variants run before compiled ones are built, and compiled state is dropped between
compiled variants, so the memory of one does not count in another's peak.

For the default compiled variant a second process then loads the same models and compiles again from the
on-disk cache the first one filled: ``warm_start_first_call_s`` is its first call (load excluded, reported as
``warm_start_load_s``). Everything is printed as a Markdown table and, with ``--output``, saved as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

BASES = ("doubled", "once", "compiled")
EXTRAS = (
    "channels_last",
    "fused_qkv",
    "max_autotune",
    "inductor_flags",
    "sdpa_flash",
    "sdpa_efficient",
    "sdpa_cudnn",
    "sdpa_math",
    "cudnn_benchmark",
    "diffusers_unipc",
    "no_fp32_guard",
)
# the flags the PyTorch team's diffusion write-up found to pay on GPUs ("Accelerating Generative AI Part III")
INDUCTOR_FLAGS = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
    "triton.cudagraphs": True,
}


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    base, *extras = text.split("+")
    if base not in BASES or any(e not in EXTRAS for e in extras):
        raise SystemExit(
            f"unknown variant {text!r}: a base of {BASES} with extras from {EXTRAS} joined by '+'"
        )
    if base != "compiled" and any(e in ("max_autotune", "inductor_flags") for e in extras):
        raise SystemExit(f"{text}: max_autotune and inductor_flags only apply to compiled variants")
    if base == "doubled" and "no_fp32_guard" in extras:
        raise SystemExit(f"{text}: no_fp32_guard runs the branch once per step, which contradicts 'doubled'")
    return base, tuple(extras)


def load_pipeline(preset: str, models_dir: Path, device: str, dtype: str):
    """The BrushNet pipeline on random-weight ``preset`` components (built once under ``models_dir``)."""
    from brushnet.bench.speed import random_weight_models
    from brushnet.methods import load_method
    from brushnet.schedulers import make_scheduler

    paths = random_weight_models(preset, models_dir, ["brushnet"])
    pipe = load_method("brushnet", paths, device=device, dtype=dtype).pipeline
    pipe.scheduler = make_scheduler("unipc-original", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply_extras(pipe, extras: tuple[str, ...], on: bool) -> None:
    import torch

    if "channels_last" in extras:
        memory_format = torch.channels_last if on else torch.contiguous_format
        for module in (pipe.unet, pipe.brushnet, pipe.vae):
            module.to(memory_format=memory_format)
    if "fused_qkv" in extras:
        if on:
            pipe.fuse_qkv_projections()
            pipe.brushnet.fuse_qkv_projections()
        else:
            pipe.unfuse_qkv_projections()
            pipe.brushnet.unfuse_qkv_projections()


@contextlib.contextmanager
def scheduler_context(pipe, extras: tuple[str, ...]):
    """``diffusers_unipc``: diffusers' own UniPC (same config) for the variant, the project's put back after."""
    if "diffusers_unipc" not in extras:
        yield
        return
    from diffusers import UniPCMultistepScheduler

    own = pipe.scheduler
    pipe.scheduler = UniPCMultistepScheduler.from_config(own.config)
    try:
        yield
    finally:
        pipe.scheduler = own


@contextlib.contextmanager
def fp32_guard_context(pipe, extras: tuple[str, ...]):
    """``no_fp32_guard``: the branch once per step at strict fp32 too (the behaviour before the fix);
    ``cudnn_benchmark``: cuDNN's algorithm search on for the variant."""
    import torch

    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = saved or "cudnn_benchmark" in extras
    try:
        if "no_fp32_guard" not in extras:
            yield
            return
        from brushnet.bench.speed import branch_once_at_strict_fp32

        with branch_once_at_strict_fp32(pipe):
            yield
    finally:
        torch.backends.cudnn.benchmark = saved


def attention_context(extras: tuple[str, ...]):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_math": SDPBackend.MATH,
    }
    chosen = [names[e] for e in extras if e in names]
    return sdpa_kernel(chosen) if chosen else contextlib.nullcontext()


def compile_pipeline(pipe, extras: tuple[str, ...], cache_dir: str) -> None:
    if "max_autotune" in extras:
        pipe.compile(mode="max-autotune", cache_dir=cache_dir)
    elif "inductor_flags" in extras:
        pipe.compile(options=dict(INDUCTOR_FLAGS), cache_dir=cache_dir)
    else:
        pipe.compile(cache_dir=cache_dir)


def drop_compiled(pipe) -> None:
    """Forget compiled graphs (and their CUDA-graph memory pools) before the next variant."""
    import torch

    pipe.uncompile()
    torch._dynamo.reset()
    with contextlib.suppress(Exception):
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def scene(resolution: int):
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:resolution, 0:resolution] / max(1, resolution - 1)
    image = Image.fromarray((np.stack([x, y, 0.5 * (x + y)], -1) * 255).round().astype(np.uint8))
    hole = np.zeros((resolution, resolution), np.uint8)
    quarter = resolution // 4
    hole[quarter : resolution - quarter, quarter : resolution - quarter] = 255
    return image, Image.fromarray(hole)


class StepClock:
    """Step callback that marks when each step ended: CUDA events (no synchronisation) or the wall clock."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda, self.torch, self.marks = cuda, torch, []

    def __call__(self, pipe, step, timestep, kwargs):
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return kwargs

    def outside(self, start, end) -> tuple[float, float] | None:
        """CUDA: seconds from the ``start`` event to the first step's end, and from the last step's end to ``end``."""
        if not (self.cuda and self.marks):
            return None
        return start.elapsed_time(self.marks[0]) / 1000, self.marks[-1].elapsed_time(end) / 1000

    def seconds_per_step(self) -> float | None:
        if len(self.marks) < 2:
            return None
        if self.cuda:
            return self.marks[0].elapsed_time(self.marks[-1]) / 1000 / (len(self.marks) - 1)
        return (self.marks[-1] - self.marks[0]) / (len(self.marks) - 1)


def call(pipe, image, mask, steps: int, guidance: float, on_step=None):
    import torch

    return pipe(
        prompt="a red circle",
        image=image,
        mask_image=mask,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        callback_on_step_end=on_step,
    ).images


def count_host_syncs(pipe, image, mask, steps: int, guidance: float) -> float:
    """Synchronising CUDA calls per step in one call (``torch.cuda.set_sync_debug_mode``)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call(pipe, image, mask, steps, guidance)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return len(syncs) / steps


def measure(pipe, variant: str, resolution: int, args, cache_dir: str) -> dict:
    import numpy as np
    import torch

    from brushnet.bench.speed import _PeakRSS, set_branch_on_doubled_batch

    base, extras = parse_variant(variant)
    cuda = torch.device(args.device).type == "cuda"
    image, mask = scene(resolution)
    set_branch_on_doubled_batch(pipe, base == "doubled")
    apply_extras(pipe, extras, on=True)
    if base == "compiled":
        compile_pipeline(pipe, extras, cache_dir)
    record = {"variant": variant, "resolution": resolution, "steps": args.steps}
    try:
        with attention_context(extras), scheduler_context(pipe, extras), fp32_guard_context(pipe, extras):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            first = call(pipe, image, mask, args.steps, args.guidance)
            if cuda:
                torch.cuda.synchronize()
            record["first_call_s"] = time.perf_counter() - start
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            seconds, cpu_seconds, per_step, outside = [], [], [], []
            with _PeakRSS() as rss:
                for _ in range(args.repeats):
                    clock = StepClock(cuda)
                    if cuda:
                        begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                        begin.record()
                    start, cpu_start = time.perf_counter(), time.process_time()
                    images = call(pipe, image, mask, args.steps, args.guidance, on_step=clock)
                    if cuda:
                        end.record()
                        torch.cuda.synchronize()
                        outside.append(clock.outside(begin, end))
                    seconds.append(time.perf_counter() - start)
                    cpu_seconds.append(time.process_time() - cpu_start)
                    if clock.seconds_per_step() is not None:
                        per_step.append(clock.seconds_per_step())
            record.update(
                s_per_image=statistics.median(seconds),
                s_per_image_all=seconds,
                cpu_s_per_image=statistics.median(cpu_seconds),
                s_per_step=statistics.median(per_step) if per_step else None,
                peak_mib=(torch.cuda.max_memory_allocated() if cuda else rss.peak) / 2**20,
                memory="cuda_max_allocated" if cuda else "cpu_peak_rss",
                max_abs_vs_first=float(np.abs((images - first).float().cpu().numpy()).max()),
            )
            if outside and all(o is not None for o in outside):
                record["s_to_first_step"] = statistics.median(o[0] for o in outside)
                record["s_after_last_step"] = statistics.median(o[1] for o in outside)
            if cuda:
                record["host_syncs_per_step"] = count_host_syncs(pipe, image, mask, args.steps, args.guidance)
            record["images"] = images.float().cpu()
    finally:
        apply_extras(pipe, extras, on=False)
        set_branch_on_doubled_batch(pipe, False)
        if base == "compiled":
            drop_compiled(pipe)
    return record


def warm_start(args, preset: str, dtype: str, resolution: int, cache_dir: str, variant: str) -> dict:
    """Load and compile in a fresh process against the filled cache; time its first call."""
    command = [sys.executable, __file__, "--warm-start-worker", "--preset", preset, "--dtype", dtype,
               "--device", args.device, "--resolutions", str(resolution), "--steps", str(args.steps),
               "--guidance", str(args.guidance), "--models-dir", str(args.models_dir), "--cache-dir", cache_dir,
               "--variants", variant]  # fmt: skip
    if args.threads:  # inductor's CPU kernels are keyed by the thread count: the same, or the cache misses
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"warm_start_error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def warm_start_worker(args) -> None:
    import torch

    start = time.perf_counter()
    pipe = load_pipeline(args.presets[0], args.models_dir, args.device, args.dtypes[0])
    load_seconds = time.perf_counter() - start
    _, extras = parse_variant(args.variants[0])
    apply_extras(pipe, extras, on=True)
    compile_pipeline(pipe, extras, args.cache_dir)
    image, mask = scene(args.resolutions[0])
    with attention_context(extras):
        start = time.perf_counter()
        call(pipe, image, mask, args.steps, args.guidance)
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()
    first = time.perf_counter() - start
    from torch._dynamo.utils import counters

    print(json.dumps({
        "warm_start_load_s": load_seconds,
        "warm_start_first_call_s": first,
        "warm_start_fx_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "warm_start_fx_cache_misses": counters["inductor"]["fxgraph_cache_miss"],
    }))  # fmt: skip


COLUMNS = (
    ("s_per_image", ".3f"),
    ("cpu_s_per_image", ".3f"),
    ("s_per_step", ".4f"),
    ("s_to_first_step", ".3f"),
    ("s_after_last_step", ".3f"),
    ("peak_mib", ".0f"),
    ("first_call_s", ".1f"),
    ("warm_start_first_call_s", ".1f"),
    ("host_syncs_per_step", ".1f"),
    ("max_abs_vs_once", ".2e"),
)


def table(records: list[dict]) -> str:
    header = ["preset", "dtype", "res", "variant", "s/image", "CPU s/image", "s/step", "to step 1 s", "after last s",
              "peak MiB", "first call s",
              "warm start s", "syncs/step", "max |Δ| vs once"]  # fmt: skip
    rows = [header]
    for r in records:
        if "error" in r:
            rows.append([r["preset"], r["dtype"], str(r["resolution"]), r["variant"], f"error: {r['error']}"[:60]]
                        + [""] * (len(header) - 5))  # fmt: skip
            continue

        def fmt(value, spec):
            return "–" if value is None else format(value, spec)

        rows.append(
            [r["preset"], r["dtype"], str(r["resolution"]), r["variant"]]
            + [fmt(r.get(key), spec) for key, spec in COLUMNS]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset",
        dest="presets",
        default="sd15",
        type=lambda s: s.split(","),
        help="random-weight presets, comma-separated (sd15, sdxl, small, tiny, tiny-xl)",
    )
    parser.add_argument("--dtype", dest="dtypes", default="fp16", type=lambda s: s.split(","))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolutions", default=[512], type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default=["doubled", "once", "compiled"], type=lambda s: s.split(","))
    parser.add_argument(
        "--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "brushnet-bench-models"
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="compile cache (default: a fresh folder, so the first compile is cold)",
    )
    parser.add_argument("--no-warm-start", action="store_true", help="skip the second-process warm start")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--warm-start-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()  # fmt: skip
    for variant in args.variants:
        parse_variant(variant)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    # every variant, size and guidance setting is its own graph of the one step function
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows mean fp32 (the original's measurement too)
        torch.backends.cudnn.allow_tf32 = False
    if args.warm_start_worker:
        warm_start_worker(args)
        return

    records = []
    for preset in args.presets:
        for dtype in args.dtypes:
            pipe = load_pipeline(preset, args.models_dir, args.device, dtype)
            for resolution in args.resolutions:
                cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="brushnet-compile-cache-")
                reference = None
                ordered = sorted(args.variants, key=lambda v: parse_variant(v)[0] == "compiled")
                for variant in ordered:
                    head = {"preset": preset, "dtype": dtype, "device": args.device}
                    try:
                        record = {**head, **measure(pipe, variant, resolution, args, cache_dir)}
                    except Exception as exc:  # noqa: BLE001 - a variant the device cannot run is recorded
                        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        records.append(
                            {**head, "variant": variant, "resolution": resolution, "error": message}
                        )
                        print(f"{preset} {dtype} {resolution} {variant}: error: {message}", file=sys.stderr)
                        continue
                    images = record.pop("images")
                    if variant == "once":
                        reference = images
                    if reference is not None:
                        record["max_abs_vs_once"] = float((images - reference).abs().max())
                    if variant == "compiled" and not args.no_warm_start:
                        record.update(warm_start(args, preset, dtype, resolution, cache_dir, variant))
                    records.append(record)
                    print(f"{preset} {dtype} {resolution} {variant}: {record['s_per_image']:.3f} s/image, "
                          f"first call {record['first_call_s']:.1f} s", file=sys.stderr)  # fmt: skip
            del pipe
            gc.collect()

    environment = {
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    print(table(records))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"environment": environment, "records": records}, indent=2))


if __name__ == "__main__":
    main()
