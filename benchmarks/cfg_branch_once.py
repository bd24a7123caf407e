"""One denoising step of an SD1.5-sized UNet + BrushNet with classifier-free guidance: the branch on the
CFG-doubled batch (the original pipeline) versus once on the un-doubled batch (this project), side by side
in one process, alternating A/B so machine noise hits both alike.

    python benchmarks/cfg_branch_once.py --resolution 512 --repeats 3

Random weights (the cost does not depend on their values); fp32 on CPU by default.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def step_setup(description: str) -> tuple[argparse.Namespace, dict]:
    """The arguments both step benchmarks take (this one and ``branch_window.py``), parsed, and one step's models
    and inputs: ``unet``, ``brushnet`` (random weights of ``--preset``), ``latents`` ``(1, 4, h, w)``, ``cond``
    ``(1, 5, h, w)``, ``text`` ``[unconditional, conditional]``, ``t``, ``dtype``, ``sync`` (waits for the device)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
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
    from brushnet.random_models import PRESETS, _unet_config

    dtype = resolve_dtype(args.dtype)
    spec = PRESETS[args.preset]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_unet_config(spec)).to(args.device).eval()
    brushnet = BrushNetModel.from_unet(unet).to(args.device).eval()
    if dtype != torch.float32:
        unet, brushnet = unet.to(dtype=dtype), brushnet.to(dtype=dtype)
    latent = args.resolution // 8

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    return args, {
        "unet": unet,
        "brushnet": brushnet,
        "latents": torch.randn(1, 4, latent, latent, device=args.device, dtype=dtype),
        "cond": torch.randn(1, 5, latent, latent, device=args.device, dtype=dtype),
        "text": torch.randn(2, 77, spec.cross_attention_dim, device=args.device, dtype=dtype),
        "t": torch.tensor(500, device=args.device),
        "dtype": dtype,
        "sync": sync,
    }


def alternate(variants: dict, repeats: int, sync) -> dict[str, list[float]]:
    """Seconds per call of each variant (name → function), ``repeats`` rounds of A, B, ... so machine noise hits
    them alike; ``sync`` waits for the device around each call."""
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    from brushnet.models import unet_forward_with_brushnet

    args, m = step_setup(__doc__)
    unet, brushnet, latents, cond, text, t, sync = (
        m[k] for k in ("unet", "brushnet", "latents", "cond", "text", "t", "sync")
    )

    @torch.no_grad()
    def step_doubled():
        doubled = torch.cat([latents] * 2)
        down, mid, up = brushnet(doubled, t, text, torch.cat([cond] * 2), return_dict=False)
        return unet_forward_with_brushnet(unet, doubled, t, text, down, mid, up)

    @torch.no_grad()
    def step_once():
        doubled = torch.cat([latents] * 2)
        down, mid, up = brushnet(latents, t, text[1:], cond, return_dict=False)
        down = [torch.cat([r, r]) for r in down]
        up = [torch.cat([r, r]) for r in up]
        return unet_forward_with_brushnet(unet, doubled, t, text, down, torch.cat([mid, mid]), up)

    a, b = step_doubled(), step_once()  # warm-up, and the two agree
    max_diff = (a - b).abs().max().item()
    times = alternate({"doubled": step_doubled, "once": step_once}, args.repeats, sync)

    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(
        f"preset={args.preset} resolution={args.resolution} dtype={args.dtype} device={args.device} "
        f"threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    for name, label in (
        ("doubled", "branch on doubled batch (original)"),
        ("once", "branch once per step (brushnet)"),
    ):
        runs = ", ".join(f"{x:.3f}" for x in times[name])
        print(f"{label:<36} median {med[name]:.3f} s/step  min {best[name]:.3f} s/step  [{runs}]")
    print(
        f"speed-up: {med['doubled'] / med['once']:.3f}x (medians), {best['doubled'] / best['once']:.3f}x (minima); "
        f"max |difference| of the UNet outputs: {max_diff:.2e}"
    )


if __name__ == "__main__":
    main()
