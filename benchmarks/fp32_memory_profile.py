"""Where the BrushNet pipeline's float32 GPU memory goes (issue 14: 26.1 GiB peak against the original's 7.3 GiB at
fp32 with TF32 off, SD1.5-sized weights, 512², 10 UniPC steps). Needs a CUDA device; one command:

    python benchmarks/fp32_memory_profile.py --preset sd15 --resolution 512 --steps 10 \\
        --output benchmarks/results/fp32_memory_profile.txt

It prints (and writes to ``--output``, with the raw snapshot next to it as ``.pickle`` for PyTorch's
``memory_viz``):

1. the peak (``max_memory_allocated`` above the loaded weights) of the whole call under each setting that could
   matter: TF32 off (the pipeline as it is: at strict fp32 the branch runs on the doubled batch) and the same with
   that guard off (the branch once, as before the fix), cuDNN TF32 on, ``cudnn.benchmark``, the branch on the
   doubled batch, the SDPA kernel forced to memory-efficient, blending on;
2. memory after each step and each step's peak, and the peak per phase of the default call (text encoder, VAE
   encode, each branch and UNet pass, VAE decode);
3. the allocations alive at the default call's peak, largest first, each with the innermost frames of
   ``brushnet`` / ``diffusers`` / ``torch.nn`` code that made it (``torch.cuda.memory._record_memory_history``);
4. every convolution of the branch, the UNet and the VAE run alone on the input shape it saw in the call (the
   guard off, so the branch's are at batch 1), ranked by
   the memory it needed beyond its input and output (cuDNN workspace: at fp32 without TF32 cuDNN may pick
   algorithms with workspaces of gigabytes).
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import sys
import tempfile
from pathlib import Path

MIB = 2**20


def load_pipeline(preset: str, models_dir: Path, device: str):
    from brushnet.bench.speed import random_weight_models
    from brushnet.methods import load_method
    from brushnet.schedulers import make_scheduler

    paths = random_weight_models(preset, models_dir, ["brushnet"])
    pipe = load_method("brushnet", paths, device=device, dtype="fp32").pipeline
    pipe.scheduler = make_scheduler("unipc-original", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scene(resolution: int):
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:resolution, 0:resolution] / max(1, resolution - 1)
    image = Image.fromarray((np.stack([x, y, 0.5 * (x + y)], -1) * 255).round().astype(np.uint8))
    hole = np.zeros((resolution, resolution), np.uint8)
    quarter = resolution // 4
    hole[quarter : resolution - quarter, quarter : resolution - quarter] = 255
    return image, Image.fromarray(hole)


def call(pipe, image, mask, steps: int, **extra):
    import torch

    return pipe(
        prompt="a red circle",
        image=image,
        mask_image=mask,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **extra,
    ).images


def peak_of(fn) -> float:
    """MiB allocated at the peak of ``fn()`` above what was allocated before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MIB


@contextlib.contextmanager
def branch_doubled(pipe):
    from brushnet.bench.speed import set_branch_on_doubled_batch

    set_branch_on_doubled_batch(pipe, True)
    try:
        yield
    finally:
        set_branch_on_doubled_batch(pipe, False)


def no_fp32_guard(pipe):
    """The branch once per step at strict fp32 too: the pipeline before issue 14's fix."""
    from brushnet.bench.speed import branch_once_at_strict_fp32

    return branch_once_at_strict_fp32(pipe)


@contextlib.contextmanager
def flags(**settings):
    import torch

    saved = {name: getattr(torch.backends.cudnn, name) for name in ("allow_tf32", "benchmark")}
    for name, value in settings.items():
        setattr(torch.backends.cudnn, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.backends.cudnn, name, value)


def phase_peaks(pipe, image, mask, steps: int) -> list[tuple[str, float]]:
    """Peak above the phase's start, per module call: text encoder, VAE encoder/decoder, branch, UNet."""
    import torch

    peaks: list[tuple[str, float]] = []
    start: dict[str, int] = {}

    def enter(name):
        def hook(*_):
            torch.cuda.synchronize()
            start[name] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

        return hook

    def leave(name):
        def hook(*_):
            torch.cuda.synchronize()
            peaks.append((name, (torch.cuda.max_memory_allocated() - start[name]) / MIB))

        return hook

    handles = []
    # the injected UNet forward calls conv_in first and conv_out last
    for name, first, last in (
        ("text encoder", pipe.text_encoder, pipe.text_encoder),
        ("VAE encoder", pipe.vae.encoder, pipe.vae.encoder),
        ("VAE decoder", pipe.vae.decoder, pipe.vae.decoder),
        ("branch", pipe.brushnet, pipe.brushnet),
        ("UNet", pipe.unet.conv_in, pipe.unet.conv_out),
    ):
        handles.append(first.register_forward_pre_hook(enter(name)))
        handles.append(last.register_forward_hook(leave(name)))
    try:
        call(pipe, image, mask, steps)
    finally:
        for handle in handles:
            handle.remove()
    return peaks


def alive_at_peak(snapshot: dict, top: int = 15) -> tuple[float, list[tuple[float, str]]]:
    """Replay the allocator trace; return the peak (MiB, traced allocations only) and the largest blocks alive."""
    alive: dict[int, dict] = {}
    total = best = 0
    best_alive: list[dict] = []
    for trace in snapshot["device_traces"]:
        for event in trace:
            action = event["action"]
            if action == "alloc":
                alive[event["addr"]] = event
                total += event["size"]
                if total > best:
                    best, best_alive = total, list(alive.values())
            elif action in ("free_completed",) and event["addr"] in alive:
                total -= alive.pop(event["addr"])["size"]
    rows = []
    for event in sorted(best_alive, key=lambda e: -e["size"])[:top]:
        frames = [
            f"{Path(f['filename']).name}:{f['line']} {f['name']}"
            for f in event.get("frames", [])
            if any(k in f["filename"] for k in ("brushnet", "diffusers", "torch/nn", "transformers"))
        ][:4]
        rows.append((event["size"] / MIB, " <- ".join(frames) or "(no Python frame)"))
    return best / MIB, rows


def conv_workspaces(pipe, image, mask, top: int = 15) -> list[tuple[float, str, tuple]]:
    """Each Conv2d run alone on the input shape it saw: memory beyond input + output (MiB), largest first."""
    import torch

    shapes: dict[str, tuple[torch.nn.Module, tuple]] = {}
    handles = []
    for owner in ("brushnet", "unet", "vae"):
        for name, module in getattr(pipe, owner).named_modules():
            if isinstance(module, torch.nn.Conv2d):

                def hook(mod, args, _key=f"{owner}.{name}"):
                    shapes.setdefault(_key, (mod, tuple(args[0].shape)))

                handles.append(module.register_forward_pre_hook(hook))
    try:
        call(pipe, image, mask, 1)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    with torch.no_grad():
        for key, (module, shape) in shapes.items():
            x = torch.randn(shape, device="cuda")
            outputs: list[int] = []
            peak = peak_of(lambda _m=module, _x=x, _out=outputs: _out.append(_m(_x).numel() * 4))
            extra = peak - outputs[0] / MIB
            rows.append((extra, key, shape))
            del x
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "brushnet-bench-models"
    )
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--sections", default="1,2,3,4", type=lambda s: set(s.split(",")), help="which parts to run (1-4)"
    )
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    pipe = load_pipeline(args.preset, args.models_dir, args.device)
    image, mask = scene(args.resolution)
    weights = torch.cuda.memory_allocated() / MIB
    say(f"{torch.cuda.get_device_name()} torch {torch.__version__}; preset {args.preset}, {args.resolution}², "
        f"{args.steps} steps, fp32; weights on the device: {weights:.0f} MiB")  # fmt: skip
    call(pipe, image, mask, 1)  # warm-up (cuBLAS / cuDNN handles)

    if "1" in args.sections:
        whole_call_peaks(pipe, image, mask, args, weights, say)
    if "2" in args.sections:
        phase_and_step_peaks(pipe, image, mask, args, weights, say)
    if "3" in args.sections:
        traced_peak(pipe, image, mask, args, say)
    if "4" in args.sections:
        say("\n4. convolutions alone: memory beyond input and output (MiB), largest first")
        with no_fp32_guard(pipe):
            rows = conv_workspaces(pipe, image, mask)
        for extra, key, shape in rows:
            say(f"  {extra:9.1f}  {key}  input {shape}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(lines) + "\n")


def whole_call_peaks(pipe, image, mask, args, weights: float, say) -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    say("\n1. peak of the whole call above the weights (MiB)")
    settings = {
        "TF32 off (matmul and cuDNN)": lambda: call(pipe, image, mask, args.steps),
        "TF32 off, branch once (no guard)": lambda: _with(no_fp32_guard(pipe), lambda: call(pipe, image, mask, args.steps)),
        "cuDNN TF32 on": lambda: _with(flags(allow_tf32=True), lambda: call(pipe, image, mask, args.steps)),
        "cudnn.benchmark": lambda: _with(flags(benchmark=True), lambda: call(pipe, image, mask, args.steps)),
        "branch on the doubled batch": lambda: _with(branch_doubled(pipe), lambda: call(pipe, image, mask, args.steps)),
        "SDPA memory-efficient only": lambda: _with(
            sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), lambda: call(pipe, image, mask, args.steps)
        ),
        "blending on": lambda: call(pipe, image, mask, args.steps, blending=True),
    }  # fmt: skip
    for name, fn in settings.items():
        try:
            above = peak_of(fn)
            say(f"  {name:32s} {above:9.0f}   (absolute {above + weights:6.0f}, "
                f"reserved {torch.cuda.max_memory_reserved() / MIB:6.0f})")  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a setting the device refuses is reported, not fatal
            say(f"  {name:32s} failed: {str(exc).splitlines()[0]}")


def phase_and_step_peaks(pipe, image, mask, args, weights: float, say) -> None:
    import torch

    say("\n2. allocated after each step of the default call / each step's peak (MiB above the weights)")
    marks: list[tuple[float, float]] = []

    def on_step(_pipe, _step, _timestep, kwargs):
        torch.cuda.synchronize()
        marks.append(
            (torch.cuda.memory_allocated() / MIB - weights, torch.cuda.max_memory_allocated() / MIB - weights)
        )
        torch.cuda.reset_peak_memory_stats()
        return kwargs

    torch.cuda.reset_peak_memory_stats()
    call(pipe, image, mask, args.steps, callback_on_step_end=on_step)
    say("  " + "  ".join(f"{alive:.0f}/{peak:.0f}" for alive, peak in marks))

    say("   peak per phase of the default call, above the phase's start (MiB)")
    for name, peak in phase_peaks(pipe, image, mask, 2):
        say(f"  {name:14s} {peak:9.0f}")


def traced_peak(pipe, image, mask, args, say) -> None:
    import torch

    say("\n3. allocations alive at the default call's peak (traced)")
    torch.cuda.memory._record_memory_history(max_entries=500_000)
    try:
        call(pipe, image, mask, args.steps)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak, rows = alive_at_peak(snapshot)
    say(f"  traced peak {peak:.0f} MiB")
    for size, where in rows:
        say(f"  {size:9.1f} MiB  {where}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with open(args.output.with_suffix(".pickle"), "wb") as handle:
            pickle.dump(snapshot, handle)


def _with(context, fn):
    with context:
        return fn()


if __name__ == "__main__":
    sys.exit(main())
