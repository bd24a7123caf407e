"""Where classifier-free guidance moves the kept region: each inpainting model's clean-latent estimate on the
kept cells, with the prompt, without it, and guided, per noise level.

A model's guided prediction is ``u + w (c − u)`` (``c``, ``u``: its predictions with the prompt and with the
empty prompt); its error on the kept region is ``(1 − w)·e_u + w·e_c``. Where ``e_c`` and ``e_u`` are the same
error, guidance leaves it as it is; where they differ, it multiplies the difference by ``w``. This prints, per
noise level, the mean squared error of the clean-latent estimate on the kept latent cells (those no hole pixel
touches) for the three, and the part guidance adds, ``‖c − u‖²``, for BrushNet and the 9-channel SD-inpainting
model, on the first mini-BrushBench scenes (inside holes, their prompts)::

    python examples/demo_world/guidance_drift.py --models src/brushnet/assets/demo_world --scenes 48

``--region hole`` measures the same on the latent cells a hole pixel touches: there ``‖c − u‖²`` is how much the
prompt changes what the model puts in the hole, which guidance multiplies.

With ``--scales 0,0.5,1,...`` it prints instead BrushNet's own objective at each preservation scale: the mean
squared error of its prompted v-prediction (no guidance) on the hole's latent cells and on the kept ones
(``--scene-seed 1``: scenes of the eval split other than the mini-BrushBench's).

The latents are the VAE posterior's mean, the noise one seeded draw per scene and level. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["drift", "main", "scale_errors"]

TIMESTEPS = (999, 900, 700, 500, 300, 100)


def _setup(models: str | Path, items: list[dict], nine: bool = True) -> dict:
    """What :func:`drift` and :func:`scale_errors` read: the models of a demo folder and the scenes' latents,
    conditionings, prompt and empty-prompt embeddings and kept-cell mask; with ``nine``, also the 9-channel model
    and its extra input channels (``nine``, ``nine_extra``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from brushnet.models.brushnet import BrushNetModel
    from brushnet.models.conditioning import brushnet_conditioning, keep_mask_latent

    models = Path(models)
    base = models / "base"
    vae = AutoencoderKL.from_pretrained(base / "vae").eval()
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder").eval()

    def embed(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        return text_encoder(torch.tensor(ids.input_ids))[0]

    from locality import _pixels  # one image → (1, 3, H, W) in [−1, 1], as the VAE stages read it

    pixels = torch.cat([_pixels(item["image"].convert("RGB")) for item in items])
    hole = torch.from_numpy(np.stack([item["hole"] for item in items]).astype(np.float32))[:, None]
    scale = vae.config.scaling_factor
    latents = vae.encode(pixels).latent_dist.mode() * scale
    factor = pixels.shape[-1] // latents.shape[-1]
    setup = {
        "scheduler": DDIMScheduler.from_pretrained(base / "scheduler"),
        "unet": UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32).eval(),
        "branch": BrushNetModel.from_pretrained(models / "brushnet", torch_dtype=torch.float32).eval(),
        "latents": latents,
        # the conditioning each model was trained on (posterior means here, as at inference)
        "branch_cond": brushnet_conditioning(vae, pixels, hole, sample=False),  # hole at −1, keep mask
        "keep": 1.0 - F.max_pool2d(hole, factor),  # scored: the latent cells no hole pixel touches
        "cond": embed([item["prompt"] for item in items]),
        "uncond": embed([""] * len(items)),
    }
    if nine:
        grey = vae.encode(pixels * (hole < 0.5)).latent_dist.mode() * scale  # diffusers' 9-channel: hole at 0
        setup["nine"] = UNet2DConditionModel.from_pretrained(
            models / "inpaint" / "unet", torch_dtype=torch.float32
        ).eval()
        setup["nine_extra"] = torch.cat([1.0 - keep_mask_latent(hole, latents.shape[-2:]), grey], 1)
    return setup


@torch.no_grad()
def drift(
    models: str | Path,
    items: list[dict],
    guidance: float = 5.0,
    seed: int = 0,
    conditioning_scale: float = 1.0,
    region: str = "kept",
) -> dict:
    """``{model: {t: {"cond", "uncond", "guided", "difference"}}}``: mean squared error on the kept latent
    cells of the clean-latent estimates with the prompt, without it and guided, and ``‖c − u‖²`` there
    (per cell and channel), for ``brushnet`` (its residuals times ``conditioning_scale``, the preservation
    scale) and ``sd-inpainting``; ``region="hole"``: the same on the cells a hole pixel touches instead."""
    from brushnet.models.unet_injection import unet_forward_with_brushnet

    m = _setup(models, items)
    scheduler, unet, branch, nine = m["scheduler"], m["unet"], m["branch"], m["nine"]
    latents, keep, cond, uncond = m["latents"], m["keep"], m["cond"], m["uncond"]
    if region not in ("kept", "hole"):
        raise ValueError(f"region must be 'kept' or 'hole', got {region!r}")
    if region == "hole":
        keep = 1.0 - keep  # the cells a hole pixel touches
    alphas = scheduler.alphas_cumprod
    cells = keep.expand_as(latents).sum()

    def kept_mse(x: torch.Tensor) -> float:
        return float(((x - latents) ** 2 * keep).sum() / cells)

    def brushnet_v(noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        down, mid, up = branch(noisy, timesteps, encoder_hidden_states=text, brushnet_cond=m["branch_cond"],
                               conditioning_scale=conditioning_scale, return_dict=False)  # fmt: skip
        return unet_forward_with_brushnet(unet, noisy, timesteps, text, list(down), mid, list(up))

    def nine_v(noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return nine(torch.cat([noisy, m["nine_extra"]], 1), timesteps, text).sample

    generator = torch.Generator().manual_seed(seed)
    result: dict = {"brushnet": {}, "sd-inpainting": {}}
    for t in TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.full((len(items),), t, dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        a, s = alphas[t].sqrt(), (1 - alphas[t]).sqrt()
        for name, predict in (("brushnet", brushnet_v), ("sd-inpainting", nine_v)):
            # v-prediction → clean latent: a·x_t − s·v
            c = a * noisy - s * predict(noisy, timesteps, cond)
            u = a * noisy - s * predict(noisy, timesteps, uncond)
            result[name][t] = {
                "cond": kept_mse(c),
                "uncond": kept_mse(u),
                "guided": kept_mse(u + guidance * (c - u)),
                "difference": float(((c - u) ** 2 * keep).sum() / cells),
            }
    return result


@torch.no_grad()
def scale_errors(models: str | Path, items: list[dict], scales: list[float], seed: int = 0) -> dict:
    """``{scale: {t: {"hole", "kept"}}}``: BrushNet's own objective at each preservation scale, without guidance:
    the mean squared error of its prompted v-prediction on the latent cells a hole pixel touches and on the kept
    ones. The branch runs once per level; its residuals are scaled after (what ``conditioning_scale`` does)."""
    from brushnet.models.unet_injection import unet_forward_with_brushnet

    m = _setup(models, items, nine=False)
    scheduler, unet, branch, latents, text = m["scheduler"], m["unet"], m["branch"], m["latents"], m["cond"]
    kept = m["keep"].expand_as(latents)
    touched = 1.0 - kept
    generator = torch.Generator().manual_seed(seed)
    result: dict = {scale: {} for scale in scales}
    for t in TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.full((len(items),), t, dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps)
        down, mid, up = branch(noisy, timesteps, encoder_hidden_states=text, brushnet_cond=m["branch_cond"],
                               return_dict=False)  # fmt: skip
        for scale in scales:
            v = unet_forward_with_brushnet(
                unet, noisy, timesteps, text, [r * scale for r in down], mid * scale, [r * scale for r in up]
            )
            error = (v - target) ** 2
            result[scale][t] = {
                "hole": float((error * touched).sum() / touched.sum().clamp(min=1)),
                "kept": float((error * kept).sum() / kept.sum().clamp(min=1)),
            }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", type=Path, required=True, help="a demo model folder (brushnet.demo layout)"
    )
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--conditioning-scale", type=float, default=1.0, help="BrushNet's preservation scale")
    parser.add_argument(
        "--region",
        choices=("kept", "hole"),
        default="kept",
        help="the latent cells measured: the kept ones (default) or those a hole pixel touches",
    )
    parser.add_argument(
        "--scales",
        help="instead: BrushNet's own (prompted, unguided) v error in the hole and on the kept cells at each of "
        "these comma-separated preservation scales",
    )
    parser.add_argument(
        "--scene-seed", type=int, default=0, help="the eval set's seed (0: the mini-BrushBench's scenes)"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.scenes < 1:
        parser.error(f"--scenes must be positive, got {args.scenes}")
    scales = None
    if args.scales is not None:
        try:
            scales = [float(x) for x in args.scales.split(",")]
        except ValueError:
            parser.error(f"--scales must be comma-separated numbers, got {args.scales!r}")
        if any(x < 0 for x in scales):
            parser.error(f"--scales must be non-negative, got {args.scales!r}")
    missing = [p for p in ("base", "brushnet", "inpaint/unet") if not (args.models / p).is_dir()]
    if missing:
        parser.error(f"{args.models} is not a demo model folder: no {', '.join(missing)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from evaluate import eval_items

    items = eval_items(args.scenes, seed=args.scene_seed)
    if scales is not None:
        errors = scale_errors(args.models, items, scales)
        print(f"BrushNet's prompted v error, no guidance ({args.scenes} scenes of seed {args.scene_seed}): "
              "hole cells / kept cells")  # fmt: skip
        print(f"{'t':>4s} " + " ".join(f"{'scale ' + format(x, 'g'):>15s}" for x in scales))

        def cells(pairs: list[tuple[float, float]]) -> str:
            return " ".join(f"{f'{hole:.4f}/{kept:.4f}':>15s}" for hole, kept in pairs)

        for t in TIMESTEPS:
            print(f"{t:4d} " + cells([(errors[x][t]["hole"], errors[x][t]["kept"]) for x in scales]))
        means = [
            tuple(np.mean([errors[x][t][part] for t in TIMESTEPS]) for part in ("hole", "kept"))
            for x in scales
        ]
        print("mean " + cells(means))
        return 0
    result = drift(
        args.models, items, args.guidance, conditioning_scale=args.conditioning_scale, region=args.region
    )
    print(f"{args.region}-region MSE of the clean-latent estimate ({args.scenes} scenes, guidance {args.guidance:g}, "
          f"BrushNet's preservation scale {args.conditioning_scale:g})")  # fmt: skip
    print(f"{'model':14s} {'t':>4s} {'prompt':>8s} {'empty':>8s} {'guided':>8s} {'|c-u|^2':>9s}")
    for name, rows in result.items():
        for t, row in rows.items():
            print(f"{name:14s} {t:4d} {row['cond']:8.4f} {row['uncond']:8.4f} {row['guided']:8.4f} "
                  f"{row['difference']:9.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
