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

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cfg_branch_once import alternate, step_setup  # noqa: E402


def main() -> None:
    from brushnet.pipelines.denoising_step import StepPlan, predict_noise

    args, m = step_setup(__doc__)
    unet, brushnet, cond, text, t, sync = (m[k] for k in ("unet", "brushnet", "cond", "text", "t", "sync"))
    plan = StepPlan(True, False, False, False, m["dtype"], m["dtype"])
    latents = torch.cat([m["latents"]] * 2)  # the CFG-doubled batch
    zero = torch.tensor(0.0, device=args.device)

    @torch.no_grad()
    def step_run():
        return predict_noise(brushnet, unet, None, plan, latents, t, text, cond, zero)

    @torch.no_grad()
    def step_skip():
        return predict_noise(brushnet, unet, None, plan, latents, t, text, cond, 0.0)

    same = torch.equal(step_run(), step_skip())  # also the warm-up
    times = alternate({"run": step_run, "skip": step_skip}, args.repeats, sync)

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
