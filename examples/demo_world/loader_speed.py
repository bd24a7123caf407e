"""How fast the inpainting stages' data stream delivers samples, with and without the preloaded scene table.

The branch, 9-channel and ControlNet stages read one stream (``inpainting._stream``: the BrushData shard reader,
the paper's masks, then :class:`world_data.HolePromptStream`). On a GPU these small models wait for it, so its
cost per sample decides how many samples a device call can train on. Prints, per mode, the milliseconds per
sample of the stream in this process, and with ``--workers N`` the samples per second a DataLoader with N
workers delivers in batches of ``--batch``::

    python examples/demo_world/loader_speed.py --work W --scenes 2000 --workers 2

``W/shards`` is written first if missing (stage ``data`` with ``--scenes``). Mode ``powerpaint`` times the
PowerPaint stage's samples instead (:class:`powerpaint_stage.TaskBatches`, rendered from the scene seeds, no
shards), in batches of 16 as the stage reads them::

    python examples/demo_world/loader_speed.py --work W --modes powerpaint --workers 2

Nothing here trains.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _stream(run, config, preload: bool):
    import inspect

    from inpainting import _stream as stage_stream

    if "preload" in inspect.signature(stage_stream).parameters:
        return stage_stream(run, config, preload=preload)
    if preload:  # a checkout from before the scene table (this file copied into it): only "none" exists
        raise SystemExit("this checkout's stream has no scene table: use --modes none")
    return stage_stream(run, config)


def _powerpaint_line(args) -> str:
    """The PowerPaint stage's samples: ms per sample in-process, and with ``--workers`` its batches of 16 from
    that many DataLoader workers (the stage's own :class:`~powerpaint_stage.TaskBatches`)."""
    from powerpaint_stage import BATCH, TaskBatches, TaskSamples

    samples = TaskSamples(0, args.scenes, 2)
    for position in range(args.warm):
        samples[position]
    start = time.perf_counter()
    for position in range(args.warm, args.warm + args.samples):
        samples[position]
    per_sample = (time.perf_counter() - start) / args.samples
    line = f"powerpaint {per_sample * 1e3:5.2f} ms/sample in-process ({per_sample * BATCH:.3f} s per batch of {BATCH})"
    if args.workers:
        batches = TaskBatches(0, args.scenes, BATCH, 2, workers=args.workers)
        for _ in range(2 * args.workers):  # workers started and warm
            batches(torch.Generator())
        start = time.perf_counter()
        for _ in range(args.batches):
            batches(torch.Generator())
        rate = args.batches * BATCH / (time.perf_counter() - start)
        line += f"; {rate:6.0f} samples/s from {args.workers} workers ({BATCH / rate:.3f} s/batch)"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", type=Path, required=True, help="run folder (its shards/ is read or written)"
    )
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=600, help="samples timed in-process")
    parser.add_argument("--warm", type=int, default=100, help="samples read before the timing starts")
    parser.add_argument(
        "--workers", type=int, default=0, help="also time a DataLoader with this many workers"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--modes", default="none,preload", help="comma-separated: none, preload, powerpaint")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if not set(modes) <= {"none", "preload", "powerpaint"} or args.samples < 1 or args.scenes < 1:
        parser.error(
            f"--modes takes none, preload and/or powerpaint, --samples and --scenes positive; got {args}"
        )
    if max(args.samples + args.warm, (args.batches + 2 * args.workers) * args.batch) > args.scenes:
        parser.error("one epoch (--scenes samples) must hold the samples and batches timed")

    from inpainting import _branch_config
    from recipe import Run, WorldTrainConfig

    torch.set_num_threads(1)
    if "powerpaint" in modes:
        print(_powerpaint_line(args), flush=True)
        modes.remove("powerpaint")
        if not modes:
            return 0
    if not (args.work / "shards").is_dir():
        subprocess.run(
            [sys.executable, str(HERE / "train_world.py"), "--work", str(args.work), "--stages", "data",
             "--scenes", str(args.scenes), "--threads", "2"],
            check=True,
        )  # fmt: skip
    run = Run(
        WorldTrainConfig(scenes=args.scenes, loader_workers=args.workers, branch_batch=args.batch), args.work
    )
    config = _branch_config(run, args.work / "loader_speed")
    print(f"{args.scenes} scenes, batch {args.batch}, one torch thread")
    for mode in modes:
        start = time.perf_counter()
        stream = _stream(run, config, preload=mode == "preload")
        made = time.perf_counter() - start
        samples = iter(stream)
        for _ in range(args.warm):
            next(samples)
        start = time.perf_counter()
        for _ in range(args.samples):
            next(samples)
        per_sample = (time.perf_counter() - start) / args.samples
        line = f"{mode:8s} stream made in {made:5.1f} s; {per_sample * 1e3:5.2f} ms/sample in-process"
        if args.workers:
            loader = torch.utils.data.DataLoader(
                stream, batch_size=args.batch, num_workers=args.workers, drop_last=True
            )
            batches = iter(loader)
            for _ in range(2 * args.workers):  # workers started and warm
                next(batches)
            start = time.perf_counter()
            for _ in range(args.batches):
                next(batches)
            rate = args.batches * args.batch / (time.perf_counter() - start)
            line += f"; {rate:6.0f} samples/s from {args.workers} workers ({args.batch / rate:.3f} s/batch)"
            del batches
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
