"""A denoising step where the branch's scale is 0 (outside ``control_guidance_start/end``, or
``brushnet_conditioning_scale=0``): the branch run and its zero residuals added (the original pipeline, and this
project before the step skipped it) versus the branch not run, side by side in one process, alternating A/B so
machine noise hits both alike. Both go through :func:`brushnet.pipelines.denoising_step.predict_noise`, with
classifier-free guidance; the run-and-add-zeros side passes the scale as a tensor, which is what the compiled step
does and which always runs the branch.

    python benchmarks/branch_window.py --resolution 512 --repeats 3

Random weights (the cost does not depend on their values); fp32 on CPU by default. The two predictions must be
equal bit for bit; the script says so.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="sd15", choices=["tiny", "small", "sd15"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import UNet2DConditionModel

    from brushnet.loading import resolve_dtype
    from brushnet.models import BrushNetModel
    from brushnet.pipelines.denoising_step import StepPlan, predict_noise
    from brushnet.random_models import PRESETS, _unet_config

    dtype = resolve_dtype(args.dtype)
    spec = PRESETS[args.preset]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_unet_config(spec)).to(args.device).eval()
    brushnet = BrushNetModel.from_unet(unet).to(args.device).eval()
    if dtype != torch.float32:
        unet, brushnet = unet.to(dtype=dtype), brushnet.to(dtype=dtype)
    plan = StepPlan(True, False, False, False, dtype, dtype)
    latent = args.resolution // 8
    latents = torch.randn(2, 4, latent, latent, device=args.device, dtype=dtype)  # the CFG-doubled batch
    cond = torch.randn(1, 5, latent, latent, device=args.device, dtype=dtype)
    text = torch.randn(2, 77, spec.cross_attention_dim, device=args.device, dtype=dtype)  # [uncond, cond]
    t = torch.tensor(500, device=args.device)
    zero = torch.tensor(0.0, device=args.device)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.no_grad()
    def step_run():
        return predict_noise(brushnet, unet, None, plan, latents, t, text, cond, zero)

    @torch.no_grad()
    def step_skip():
        return predict_noise(brushnet, unet, None, plan, latents, t, text, cond, 0.0)

    same = torch.equal(step_run(), step_skip())  # also the warm-up
    times = {"run": [], "skip": []}
    for _ in range(args.repeats):
        for name, fn in (("run", step_run), ("skip", step_skip)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"preset={args.preset} resolution={args.resolution} dtype={args.dtype} device={args.device} "
        f"threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    for name, label in (("run", "branch run, zero residuals added"), ("skip", "branch skipped (brushnet)")):
        runs = ", ".join(f"{x:.3f}" for x in times[name])
        print(f"{label:<34} median {med[name]:.3f} s/step  [{runs}]")
    print(f"speed-up of such a step: {med['run'] / med['skip']:.3f}x; predictions equal bit for bit: {same}")


if __name__ == "__main__":
    main()
