"""Every inpainting method on the same random-weight components, side by side in one process: UNet calls per
image and seconds per image.

    python benchmarks/methods_speed.py --preset small --resolution 256 --steps 10 --repeats 3

All methods get the same request (image, mask, prompt, seed, steps, guidance, scheduler) through
:func:`brushnet.methods.inpaint`, so the figures include each method's own pre/post-processing cost (text
encoding, VAE, paste-back) and its own way of spending UNet calls (RePaint's resampling jumps, BrushNet's branch,
the ControlNet, HD-Painter's RASG backward passes). The models come from :mod:`brushnet.random_models` (random weights: the cost does not depend on their
values), built under ``--models-dir`` once and reused. After one warm-up call per method, the timed calls go
round-robin over the methods (method A, B, C, …, A, B, C, …) so that a busy machine slows all of them alike.
The last column is the process's CPU time per image (all its threads): on a machine shared with other work it
varies far less than the wall clock (with ``--threads 1`` it is the single core's busy time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ALL_METHODS = (
    "brushnet",
    "sd-inpainting",
    "blended-latent-diffusion",
    "repaint",
    "controlnet-inpaint",
    "hd-painter",
)


def build_models(preset: str, root: Path) -> dict[str, str]:
    """Random-weight folders for every method (reused when already built)."""
    from brushnet.random_models import build_base, build_brushnet, build_controlnet, build_inpaint_model

    out = root / preset
    paths = {
        "base": out / "base",
        "brushnet": out / "brushnet",
        "inpaint_model": out / "inpaint",
        "controlnet": out / "controlnet",
    }
    if not (paths["base"] / "model_index.json").is_file():
        build_base(paths["base"], preset)
    if not (paths["brushnet"] / "config.json").is_file():
        build_brushnet(paths["brushnet"], paths["base"])
    if not (paths["inpaint_model"] / "model_index.json").is_file():
        build_inpaint_model(paths["inpaint_model"], paths["base"], preset)
    if not (paths["controlnet"] / "config.json").is_file():
        build_controlnet(paths["controlnet"], paths["base"])
    return {key: str(value) for key, value in paths.items()}


def scene(resolution: int):
    """A smooth test image and a centred square hole covering a quarter of the area."""
    from PIL import Image

    y, x = np.mgrid[0:resolution, 0:resolution] * (255 / max(1, resolution - 1))
    image = Image.fromarray(np.stack([x, y, (x + y) / 2], -1).astype(np.uint8))
    mask = np.zeros((resolution, resolution), np.uint8)
    quarter = resolution // 4
    mask[quarter : resolution - quarter, quarter : resolution - quarter] = 255
    return image, Image.fromarray(mask)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "sd15"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--repaint-jump-length", type=int, default=None, help="default: the method's own")
    parser.add_argument("--repaint-jump-n-sample", type=int, default=None, help="default: the method's own")
    parser.add_argument(
        "--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "brushnet-methods-speed"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from brushnet.methods import ModelPaths, get_method_class, inpaint, load_method

    names = [name.strip() for name in args.methods.split(",") if name.strip()]
    models = build_models(args.preset, args.models_dir)
    image, mask = scene(args.resolution)
    repaint_options = {}
    if args.repaint_jump_length is not None:
        repaint_options["jump_length"] = args.repaint_jump_length
    if args.repaint_jump_n_sample is not None:
        repaint_options["jump_n_sample"] = args.repaint_jump_n_sample
    request = {
        "prompt": "a red cube on a table",
        "negative_prompt": "blurry",
        "seed": 0,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": args.scheduler,
    }

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    load_start = os.getloadavg()[0]
    methods, results = {}, {}
    times, cpu_times = {name: [] for name in names}, {name: [] for name in names}
    for name in names:
        used = ModelPaths(**models).used_by(get_method_class(name))  # the set serves several methods
        methods[name] = load_method(name, used, device=args.device, dtype=args.dtype)
        options = repaint_options if name == "repaint" else {}
        results[name] = inpaint(methods[name], image, mask, dict(request, options=options))  # warm-up
    for _ in range(args.repeats):
        for name in names:
            options = repaint_options if name == "repaint" else {}
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            inpaint(methods[name], image, mask, dict(request, options=options))
            sync()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    load_end = os.getloadavg()[0]

    print(
        f"preset={args.preset} resolution={args.resolution} steps={args.steps} guidance={args.guidance} "
        f"scheduler={args.scheduler} dtype={args.dtype} device={args.device} threads={torch.get_num_threads()} "
        f"repeats={args.repeats} load-average(1 min) start={load_start:.2f} end={load_end:.2f}"
    )
    header = (
        f"{'method':<26} {'UNet calls/image':>16} {'other calls/image':>22} {'s/image median':>14} "
        f"{'s/image min':>11} {'CPU s/image median':>18}"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        result = results[name]
        median, best = statistics.median(times[name]), min(times[name])
        extra = (
            ", ".join(f"{k} {v}" for k, v in result.extra_calls.items() if k != "schedule_down_moves") or "-"
        )  # hd-painter: rasg_backward = UNet backward passes (a CFG pair counts 2, as UNet calls)
        cpu = statistics.median(cpu_times[name])
        print(f"{name:<26} {result.unet_calls:>16} {extra:>22} {median:>14.3f} {best:>11.3f} {cpu:>18.3f}")
    for name in names:
        options = ", ".join(f"{k}={v}" for k, v in results[name].parameters["options"].items()) or "-"
        print(f"options {name}: {options}")
    print(
        "runs (s): " + "; ".join(f"{name}: " + ", ".join(f"{t:.3f}" for t in times[name]) for name in names)
    )


if __name__ == "__main__":
    main()
