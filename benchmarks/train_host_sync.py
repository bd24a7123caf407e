"""Does the host wait for the device in a training step? Steps per second of the branch's training step with a
wait at every step and without, side by side in one process.

    python benchmarks/train_host_sync.py --device cuda                 # the demo world's base, batch 32
    python benchmarks/train_host_sync.py --device cpu --steps 4 --rounds 1 --batch 4     # the CPU (no overlap there)

Where Python takes about as long to issue a step's kernels as the GPU takes to run them (small models, small
batches: in the demo world's GPU runs about 0.05 s of each 0.1 s step did not grow with the batch, docs/demo.md),
a host that waits for the device once per step (a loss read with ``.item()``, a blocking copy of the batch or the
noise from ordinary host memory) serialises the two: the step costs issue time plus device time instead of the
larger of the two. That is the hypothesis this script tests. The
training loops (``brushnet.training.loop``, ``examples/demo_world/fit_loop.py``) read their losses only when
they log, copy through :func:`brushnet.devices.to_device` and, on CUDA, update the EMA with multi-tensor kernels.
This script times the library's step (``brushnet_training_loss`` in float32, backward, clipping, AdamW, the
EMA) in two modes, alternating ``--rounds`` times in one process:

- ``wait``: what the loops did before: ``torch.cuda.synchronize()`` at the start of every step (what the blocking
  copies of the batch and the noise did), the loss read with ``.item()`` at its end, the EMA one parameter at a
  time;
- ``overlap``: the loops now: no wait inside the run, the EMA with ``foreach``, one synchronisation after the
  last step (so both modes time finished work).

With ``--count-ops`` it counts, per mode and phase of one step, the operators the step issues (on any device:
how many trips through the dispatcher, and so roughly how many kernel launches, a step costs). On CUDA it then
runs one more step with ``torch.cuda.set_sync_debug_mode("warn")`` and lists every place that
step still synchronises (the first frame outside torch), so what is left to remove is named. The batch is
random pixels with a centred hole, fixed, on the host (data loading is not timed). Nothing here is a test.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import fixed_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_BASE = ROOT / "src" / "brushnet" / "assets" / "demo_world" / "base"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base", default=str(DEMO_BASE), help="base model folder (default: the demo world's)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="wait / overlap alternations")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="also count the operators one step of each mode issues, per phase (torch.profiler)",
    )
    return parser


def count_ops(step, modes, torch) -> None:
    """Print, per mode and phase of one ``step(mode, phase)``, how many operators it issues: the ``aten::`` calls
    not made inside another one: each is one trip through the dispatcher, and most launch a kernel on a GPU
    (views such as ``reshape`` do not)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    print("| mode | phase | operators |")
    print("| --- | --- | ---: |")
    for mode in modes:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(mode, record_function)
        events = prof.events()
        phases = [e for e in events if e.name in PHASES or e.name.startswith("ema (")]
        total = 0
        for phase in phases:
            start, end = phase.time_range.start, phase.time_range.end
            count = sum(
                1
                for e in events
                if e.name.startswith("aten::")
                and start <= e.time_range.start
                and e.time_range.end <= end
                and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))
            )
            total += count
            print(f"| {mode} | {phase.name} | {count} |")
        print(f"| {mode} | all | {total} |")


PHASES = ("forward", "backward", "clip", "adamw")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.batch < 1:
        sys.exit("error: --steps, --rounds and --batch must be at least 1")
    if not (Path(args.base) / "model_index.json").is_file():
        sys.exit(f"error: --base {args.base}: no model_index.json there (a diffusers base model folder)")
    import torch

    from brushnet.devices import resolve_device
    from brushnet.errors import InputError

    try:
        device = resolve_device(args.device)
    except InputError as exc:
        sys.exit(f"error: {exc}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers.training_utils import EMAModel

    from brushnet.training.loop import brushnet_training_loss, freeze, initial_branch, load_components

    components = load_components(args.base)
    freeze(components, torch.float32, device)
    branch = initial_branch(components).to(device).train()
    params = list(branch.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    emas = {mode: EMAModel(params, decay=0.999, foreach=(mode == "overlap")) for mode in ("wait", "overlap")}
    for ema in emas.values():
        ema.to(device)
    prediction_type = components.scheduler_config.get("prediction_type", "epsilon")
    generator = torch.Generator().manual_seed(0)
    size, batch_size = args.resolution, args.batch
    batch = fixed_batch(batch_size, size, "a red square on a blue background", generator)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def step(mode: str, phase=contextlib.nullcontext) -> torch.Tensor:
        if mode == "wait":
            sync()
        with phase("forward"):
            loss = brushnet_training_loss(
                branch, components, batch, generator, prediction_type=prediction_type
            )
        with phase("backward"):
            loss.backward()
        with phase("clip"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        with phase("adamw"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with phase(f"ema ({'foreach' if emas[mode].foreach else 'per parameter'})"):
            emas[mode].step(params)
        if mode == "wait":
            loss.item()
        return loss.detach()

    def timed(mode: str) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(mode)
        sync()
        return (time.perf_counter() - start) / args.steps

    for mode in ("wait", "overlap"):
        for _ in range(args.warmup):
            step(mode)
    times: dict[str, list[float]] = {"wait": [], "overlap": []}
    for _ in range(args.rounds):
        for mode in ("wait", "overlap"):
            times[mode].append(timed(mode))

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"# python benchmarks/train_host_sync.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"device={name} torch={torch.__version__} threads={torch.get_num_threads()} base={args.base} "
        f"batch={batch_size} resolution={size} steps={args.steps} × rounds={args.rounds} (after {args.warmup} "
        f"warm-up each)"
    )
    print("| mode | median s/step | samples/s | per round |")
    print("| --- | ---: | ---: | --- |")
    for mode, values in times.items():
        median = statistics.median(values)
        print(
            f"| {mode} | {median:.4f} | {batch_size / median:.1f} | {', '.join(f'{v:.4f}' for v in values)} |"
        )
    ratio = statistics.median(times["wait"]) / statistics.median(times["overlap"])
    print(f"overlap / wait speed: {ratio:.2f}×")

    if args.count_ops:
        count_ops(step, ("wait", "overlap"), torch)
    if cuda:
        sync()
        places: dict[str, int] = {}
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")

                def record(message, category, filename, lineno, file=None, line=None):
                    frames = [
                        f
                        for f in traceback.extract_stack()[:-1]
                        if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")
                    ]
                    where = (
                        f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else "?"
                    )
                    places[where] = places.get(where, 0) + 1

                warnings.showwarning = record  # restored by catch_warnings
                step("overlap")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print(f"synchronisations left in one overlap step: {sum(places.values())}")
        for where, count in sorted(places.items(), key=lambda kv: -kv[1]):
            print(f"  {count} × {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
