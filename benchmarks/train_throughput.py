"""Training throughput of a BrushNet branch on a frozen base: optimizer steps and samples per second and peak
memory, with and without gradient checkpointing, for each architecture preset, printed side by side.

    python benchmarks/train_throughput.py --presets tiny small --resolution 128 --batch_size 2      # CPU
    python benchmarks/train_throughput.py --presets sd15 --resolution 512 --batch_size 8 \\
        --device cuda --mixed_precision bf16                                                        # one GPU

Each step is the training loop's own (``brushnet.training.loop``): ``brushnet_training_loss`` under the
accelerator's autocast (VAE encode of image and masked image, text encoding, noise, branch, frozen UNet,
MSE), backward, gradient clipping and an AdamW step, on a branch made by ``initial_branch`` from a
random-weight base (``brushnet.random_models.build_base``: the cost does not depend on the weights' values).
Frozen parts in the mixed-precision dtype, branch in float32, as in ``brushnet train``. Data loading is not
timed (a fixed batch of random pixels with a centred hole). Every variant runs in a fresh process, so its
peak memory is its own: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on CPU; the last column is
that peak minus the memory held once the models are loaded (activations, gradients, optimizer state).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "sd15"])
    parser.add_argument("--resolution", type=int, default=128, help="Square training resolution (pixels).")
    parser.add_argument("--batch_size", type=int, default=2, help="Samples per optimizer step.")
    parser.add_argument("--steps", type=int, default=5, help="Timed optimizer steps per variant.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first (allocator, kernels).")
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument(
        "--gradient_checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"], help="Variants."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--cache_dir", default=None, help="Keep the random-weight bases here between runs.")
    parser.add_argument("--output", default=None, help="Also write the table to this file (atomically).")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)  # one variant, JSON in and out
    return parser


def fixed_batch(batch_size: int, size: int, caption: str, generator) -> dict:
    """A training batch of random pixels in [−1, 1] with a centred square hole (half the side), on the host."""
    import torch

    hole = torch.zeros(batch_size, 1, size, size)
    hole[:, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    pixels = torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1
    return {"pixel_values": pixels, "mask": hole, "caption": [caption] * batch_size}


def run_variant(spec: dict) -> dict:
    """Time ``spec["steps"]`` training steps of one (preset, gradient checkpointing) variant in this process."""
    import resource

    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from accelerate import Accelerator

    from brushnet.training.loop import brushnet_training_loss, initial_branch, load_components

    base = Path(spec["base_dir"])
    accelerator = Accelerator(mixed_precision=spec["mixed_precision"], cpu=spec["device"] == "cpu")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    components = load_components(str(base))
    brushnet = initial_branch(components)
    for module in components.frozen_modules.values():
        module.requires_grad_(False).eval().to(accelerator.device, dtype=weight_dtype)
    brushnet.to(accelerator.device).train()
    if spec["gradient_checkpointing"]:
        brushnet.enable_gradient_checkpointing()
        components.unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(brushnet.parameters(), lr=1e-5)
    brushnet, optimizer = accelerator.prepare(brushnet, optimizer)

    size, batch_size = spec["resolution"], spec["batch_size"]
    generator = torch.Generator().manual_seed(0)
    batch = fixed_batch(batch_size, size, "a photo of a wooden bench in a park", generator)
    cuda = accelerator.device.type == "cuda"

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with accelerator.autocast():
            loss = brushnet_training_loss(brushnet, components, batch, generator, weight_dtype=weight_dtype)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(brushnet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/statm") as statm:
            loaded = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    for _ in range(spec["warmup"]):
        step()
    times = [step() for _ in range(spec["steps"])]
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        memory_kind = "GPU max allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        memory_kind = "peak RSS"
    return {
        **spec,
        "times": times,
        "median_s": statistics.median(times),
        "peak_mib": peak,
        "step_mib": peak - loaded,  # above the loaded models: activations, gradients, optimizer state
        "memory_kind": memory_kind,
        "branch_parameters": sum(p.numel() for p in accelerator.unwrap_model(brushnet).parameters()),
        "unet_parameters": sum(p.numel() for p in components.unet.parameters()),
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }


def _format(results: list[dict], args: argparse.Namespace) -> str:
    first = results[0]
    lines = [
        f"# python {' '.join(sys.argv)}",
        f"device={first['device_name']} torch={first['torch']} mixed_precision={args.mixed_precision} "
        f"threads={args.threads or 'default'} steps={args.steps} (after {args.warmup} warm-up)",
        "",
        f"| preset | branch / UNet params | resolution | batch | grad ckpt | median s/step | steps/s | samples/s "
        f"| {first['memory_kind']} (MiB) | of which training (MiB) |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        steps_per_s = 1 / r["median_s"]
        lines.append(
            f"| {r['preset']} | {r['branch_parameters'] / 1e6:.1f}M / {r['unet_parameters'] / 1e6:.1f}M "
            f"| {r['resolution']}² | {r['batch_size']} | {'on' if r['gradient_checkpointing'] else 'off'} "
            f"| {r['median_s']:.3f} | {steps_per_s:.2f} | {steps_per_s * r['batch_size']:.2f} | {r['peak_mib']:.0f} "
            f"| {r['step_mib']:.0f} |"
        )
    lines.append("")
    lines.append("per-step seconds: " + "; ".join(
        f"{r['preset']}/{'ckpt' if r['gradient_checkpointing'] else 'plain'} "
        + ", ".join(f"{t:.3f}" for t in r["times"]) for r in results
    ))  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    args = _parser().parse_args()
    if args._worker:
        print("RESULT " + json.dumps(run_variant(json.loads(args._worker))), flush=True)
        return
    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="brushnet-bench-"))
    results = []
    for preset in args.presets:
        if not (cache / preset / "model_index.json").is_file():  # built here, outside the measured processes
            from brushnet.random_models import build_base

            build_base(cache / preset, preset, seed=0)
        for checkpointing in args.gradient_checkpointing:
            spec = {
                "preset": preset,
                "base_dir": str(cache / preset),
                "gradient_checkpointing": checkpointing == "on",
                "resolution": args.resolution,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "warmup": args.warmup,
                "device": args.device,
                "mixed_precision": args.mixed_precision,
                "threads": args.threads,
            }
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            done = subprocess.run(
                [sys.executable, __file__, "--_worker", json.dumps(spec)],
                env=env,
                capture_output=True,
                text=True,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"error: the {preset}/{checkpointing} variant failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(lines[-1][len("RESULT ") :]))
            r = results[-1]
            print(
                f"{preset} grad ckpt {checkpointing}: {r['median_s']:.3f} s/step", file=sys.stderr, flush=True
            )
    table = _format(results, args)
    print(table, end="")
    if args.output:
        from brushnet.io import atomic_write_bytes

        atomic_write_bytes(args.output, table.encode())


if __name__ == "__main__":
    main()
