"""Latent consistency distillation of a LoRA on the shipped demo base UNet (an LCM-LoRA for the shapes world).

Method: Luo et al. 2023, "Latent Consistency Models" (LCM; its Algorithm 1, latent consistency distillation) and "LCM-LoRA" (the LoRA form
with a fixed guidance scale, so the student needs no ``w`` embedding). Per training step, with the coarse grid
``t = k·i − 1`` (``i = 1 … N``, ``k = T / N``; the grid ``LCMScheduler`` samples on):

1. a clean latent ``z`` and caption ``c``; a grid step ``t_{n+k}`` and ``t_n = max(t_{n+k} − k, 0)``;
   ``z_{t_{n+k}} = √ᾱ z + √(1−ᾱ) ε``;
2. the teacher (the frozen base: LoRA off) solves ODE one skip-step with classifier-free guidance at fixed ``w``:
   its guided prediction gives ``ẑ₀`` and ``ε̂``, and the DDIM step lands at
   ``ẑ_{t_n} = √ᾱ_{t_n} ẑ₀ + √(1−ᾱ_{t_n}) ε̂`` (LCM's augmented PF-ODE step with the DDIM solver);
3. the consistency function ``f(z, t) = c_skip(t) z + c_out(t) x̂₀(z, t)`` (LCM's parameterisation: ``c_skip(0) = 1``,
   ``c_out(0) = 0``; ``σ_data = 0.5`` and the timestep scaled by 10, the boundary scalings ``LCMScheduler``
   applies when sampling) of the student (LoRA on, with gradient) at ``(z_{t_{n+k}}, t_{n+k})`` is pulled to
   the target ``f(ẑ_{t_n}, t_n)`` of an exponential moving average of the LoRA without gradient (LCM's
   ``θ⁻ ← μθ⁻ + (1−μ)θ``, ``μ = 0.95``; ``--ema_decay 0`` is LCM-LoRA's same-model target), with the
   pseudo-Huber loss ``√(d² + c²) − c`` (Song & Dhariwal 2023, used by LCM-LoRA).

The base predicts ``v``, so ``x̂₀ = √ᾱ z − √(1−ᾱ) v`` and ``ε̂ = √(1−ᾱ) z + √ᾱ v``. Training scenes are the
demo world's (``scene_rng("train", seed, i)``), the same captions as the base's training (the scene caption or
a phrase naming some of its objects); their VAE posteriors are computed once and cached.

With ``--brushnet`` the frozen branch runs in teacher, student and target (one hole per scene: around an object
or a rectangle; half the captions then name the object in the hole), which distils the LoRA for BrushNet; on the
demo world it measured no better than the plain recipe (docs/composing.md, "Few-step").

    OMP_NUM_THREADS=1 python tools/distill_lcm_lora.py --output_dir /tmp/lcm_lora --latents_cache /tmp/latents.pt

The LoRA is written with ``StableDiffusionPipeline.save_lora_weights`` (``pytorch_lora_weights.safetensors``),
so ``pipe.load_lora_weights(output_dir)`` reads it into the BrushNet pipeline; use it with ``LCMScheduler`` and
``guidance_scale=1`` (the teacher's guidance is distilled in).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",
]  # fmt: skip
"""Every attention, feed-forward and ResNet layer of the UNet (conv_in/out and the time MLP stay frozen)."""


def boundary_scalings(timesteps: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's ``c_skip(t)``, ``c_out(t)`` (eq. 9 with ``LCMScheduler``'s discrete scaling): 1, 0 at ``t = 0``."""
    scaled = timesteps.float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip[:, None, None, None], c_out[:, None, None, None]


def scene_hole(scene, masks: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, str | None]:
    """A hole for ``--brushnet``: around one object (its silhouette dilated 0–6 px, or a third of the time the
    disk holding it) or, one time in five, a random rectangle; with the phrase of the object it covers."""
    from brushnet.data.shapes import dilate_mask

    size = scene.size
    if rng.random() < 0.2:
        width, height = rng.integers(size // 8, size // 2, size=2)
        left, top = rng.integers(0, size - width), rng.integers(0, size - height)
        hole = np.zeros((size, size), bool)
        hole[top : top + height, left : left + width] = True
        return hole, None
    target = int(rng.integers(len(scene.objects)))
    margin = int(rng.integers(0, 7))
    if rng.random() < 1 / 3:
        obj = scene.objects[target]
        ys, xs = np.mgrid[0:size, 0:size] + 0.5
        return np.hypot(xs - obj.center[0], ys - obj.center[1]) <= obj.radius + margin + 1, obj.phrase
    return dilate_mask(masks[target], margin), scene.objects[target].phrase


def scene_latents(num_scenes: int, world_seed: int, vae, cache: Path | None, holes: bool = False):
    """Posterior mean and std (scaled by the VAE's factor) of the first ``num_scenes`` training scenes, and the
    scenes; with ``holes`` also one hole per scene (:func:`scene_hole`), its phrase, and the branch's
    ``brushnet_cond`` for it (posterior mode). Cached in ``cache`` (a ``.pt`` file) when given."""
    from brushnet.data.shapes import render_scene, sample_scene, scene_rng
    from brushnet.models.conditioning import brushnet_conditioning

    scenes = [sample_scene(scene_rng("train", world_seed, i), size=128) for i in range(num_scenes)]
    if cache is not None and cache.is_file():
        stats = torch.load(cache)
        if (
            len(stats["mean"]) == num_scenes
            and stats["world_seed"] == world_seed
            and (not holes or "cond" in stats)
        ):
            return stats, scenes
    scaling = vae.config.scaling_factor
    stats = {"mean": [], "std": [], "cond": [], "phrases": []}
    with torch.no_grad():
        for start in range(0, num_scenes, 64):
            rendered = [render_scene(s) for s in scenes[start : start + 64]]
            images = np.stack([np.asarray(image) for image, _ in rendered])
            pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            posterior = vae.encode(pixels).latent_dist
            stats["mean"].append(posterior.mean * scaling)
            stats["std"].append(posterior.std * scaling)
            if holes:
                picked = [
                    scene_hole(scene, masks, np.random.default_rng([world_seed, start + i, 7]))
                    for i, (scene, (_, masks)) in enumerate(zip(scenes[start : start + 64], rendered))
                ]
                hole = torch.from_numpy(np.stack([h for h, _ in picked])).float()[:, None]
                stats["cond"].append(brushnet_conditioning(vae, pixels, hole, sample=False))
                stats["phrases"] += [phrase for _, phrase in picked]
    stats = {k: torch.cat(v) if k != "phrases" and v else v for k, v in stats.items()}
    stats["world_seed"] = world_seed
    if cache is not None:
        torch.save(stats, cache)
    return stats, scenes


def caption_of(scene, rng: np.random.Generator) -> str:
    """The scene caption (half the time) or a phrase naming a random non-empty subset of its objects."""
    if rng.random() < 0.5:
        return scene.caption
    count = int(rng.integers(1, len(scene.objects) + 1))
    chosen = sorted(rng.choice(len(scene.objects), size=count, replace=False).tolist())
    phrases = [scene.objects[i].phrase for i in chosen]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def parse_args(argv=None) -> argparse.Namespace:
    from brushnet.demo.assets import DEMO_DIR

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", type=Path, default=DEMO_DIR / "base")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--num_scenes", type=int, default=4000, help="training scenes (latents cached)")
    parser.add_argument("--world_seed", type=int, default=0)
    parser.add_argument("--latents_cache", type=Path, default=None, help=".pt file for the scene latents")
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--max_train_steps", type=int, default=800)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--lr_warmup_steps", type=int, default=50)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="the teacher's fixed CFG scale w")
    parser.add_argument(
        "--num_ddim_timesteps", type=int, default=50, help="N of the skip-step grid (k = T / N)"
    )
    parser.add_argument(
        "--brushnet", type=Path, default=None,
        help="distil with this frozen BrushNet branch in the loop (see the module docstring)",
    )  # fmt: skip
    parser.add_argument("--ema_decay", type=float, default=0.95, help="μ of the target LoRA (0: the same)")
    parser.add_argument("--huber_c", type=float, default=1e-3)
    parser.add_argument("--checkpointing_steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def save_lora(unet, folder: Path) -> Path:
    """Write the UNet's LoRA in float16 as ``folder/pytorch_lora_weights.safetensors`` (``load_lora_weights``
    reads it into the model's dtype; ``lora_alpha`` equals the rank, the scale diffusers assumes for a file
    without alphas)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    layers = {
        k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(unet).items()
    }
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def main(argv=None) -> None:
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from brushnet.loading import load_base_components
    from brushnet.models import unet_forward_with_brushnet

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    components = load_base_components(args.pretrained_model_name_or_path)
    unet, vae = components["unet"], components["vae"]
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("v_prediction", "epsilon"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
    alphas_cumprod = scheduler.alphas_cumprod.float()
    num_train = scheduler.config.num_train_timesteps
    if num_train % args.num_ddim_timesteps:
        raise ValueError(f"--num_ddim_timesteps must divide {num_train}, got {args.num_ddim_timesteps}")
    skip = num_train // args.num_ddim_timesteps
    grid = torch.arange(1, args.num_ddim_timesteps + 1) * skip - 1  # LCMScheduler's training grid

    brushnet = None
    if args.brushnet is not None:
        from brushnet.loading import load_brushnet

        brushnet = load_brushnet(args.brushnet).requires_grad_(False).eval()
    stats, scenes = scene_latents(
        args.num_scenes, args.world_seed, vae, args.latents_cache, holes=brushnet is not None
    )
    mean, std = stats["mean"], stats["std"]
    del vae

    def encode(captions: list[str]) -> torch.Tensor:
        tokens = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        with torch.no_grad():
            return text_encoder(tokens, return_dict=False)[0]

    empty = encode([""])

    def branch(sample: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, index: torch.Tensor):
        """The frozen branch's residuals for the scenes ``index`` with their holes (``None`` without a branch)."""
        if brushnet is None:
            return None
        down, mid, up = brushnet(
            sample,
            timesteps,
            encoder_hidden_states=text,
            brushnet_cond=stats["cond"][index],
            return_dict=False,
        )
        return list(down), mid, list(up)

    def doubled(residuals):
        down, mid, up = residuals
        return [torch.cat([r, r]) for r in down], torch.cat([mid, mid]), [torch.cat([r, r]) for r in up]

    def denoise(sample: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor, residuals) -> torch.Tensor:
        """The UNet's output, with the branch's residuals injected when given."""
        if residuals is None:
            return unet(sample, timesteps, text).sample
        down, mid, up = residuals
        return unet_forward_with_brushnet(unet, sample, timesteps, text, down, mid, up)

    def predictions(model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor):
        """``(x̂₀, ε̂)`` from the model's output at ``timesteps`` (``ᾱ`` of ``t`` clamped to ``t ≥ 0``)."""
        alpha = alphas_cumprod[timesteps][:, None, None, None]
        a, s = alpha.sqrt(), (1 - alpha).sqrt()
        if prediction_type == "v_prediction":
            return a * sample - s * model_output, s * sample + a * model_output
        return (sample - s * model_output) / a, model_output

    unet.add_adapter(
        LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_rank,
            init_lora_weights="gaussian",
            target_modules=LORA_TARGETS,
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    print(f"LoRA parameters: {sum(p.numel() for p in params)}", flush=True)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, args.lr_warmup_steps))
    )
    ema = [p.detach().clone() for p in params]

    def swap_ema() -> None:
        for param, average in zip(params, ema):
            param.data, average.data = average.data, param.data

    args.output_dir.mkdir(parents=True, exist_ok=True)
    log = []
    start = time.perf_counter()
    for step in range(1, args.max_train_steps + 1):
        index = torch.randint(0, len(mean), (args.train_batch_size,), generator=generator)
        draws = torch.randint(0, 2**31, (len(index),), generator=generator).tolist()
        captions = [caption_of(scenes[i], np.random.default_rng(d)) for i, d in zip(index.tolist(), draws)]
        if brushnet is not None:  # half the time: the phrase of the object in the hole (benchmark prompts)
            phrases = [stats["phrases"][i] for i in index.tolist()]
            captions = [p if p and d % 2 else c for c, p, d in zip(captions, phrases, draws)]
        cond = encode(captions)
        uncond = empty.expand_as(cond)
        latents = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        start_t = grid[torch.randint(0, len(grid), (len(index),), generator=generator)]
        prev_t = (start_t - skip).clamp_min(0)
        noisy = scheduler.add_noise(latents, noise, start_t)

        with torch.no_grad():  # the teacher: the frozen base (and branch), one guided DDIM skip-step
            residuals = branch(noisy, start_t, cond, index)
            unet.disable_adapters()
            out_c, out_u = denoise(
                torch.cat([noisy, noisy]), torch.cat([start_t, start_t]), torch.cat([cond, uncond]),
                None if residuals is None else doubled(residuals),
            ).chunk(2)  # fmt: skip
            unet.enable_adapters()
            guided = out_u + args.guidance_scale * (out_c - out_u)
            x0, eps = predictions(guided, noisy, start_t)
            alpha_prev = alphas_cumprod[prev_t][:, None, None, None]
            solved = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps
            swap_ema()  # the target: the EMA of the LoRA, no gradient
            c_skip, c_out = boundary_scalings(prev_t)
            output = denoise(solved, prev_t, cond, branch(solved, prev_t, cond, index))
            target = c_skip * solved + c_out * predictions(output, solved, prev_t)[0]
            swap_ema()

        c_skip, c_out = boundary_scalings(start_t)
        output = denoise(noisy, start_t, cond, residuals)
        student = c_skip * noisy + c_out * predictions(output, noisy, start_t)[0]
        distance = (student.float() - target.float()) ** 2
        loss = (torch.sqrt(distance + args.huber_c**2) - args.huber_c).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for param, average in zip(params, ema):
                average.mul_(args.ema_decay).add_(param, alpha=1 - args.ema_decay)

        log.append(loss.item())
        if step % 10 == 0 or step == 1:
            seconds = time.perf_counter() - start
            recent = float(np.mean(log[-50:]))
            print(f"step {step} loss {recent:.5f} ({seconds / step:.2f} s/step)", flush=True)
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            save_lora(unet, args.output_dir / f"checkpoint-{step}")
    path = save_lora(unet, args.output_dir)
    record = {
        "steps": args.max_train_steps,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss_mean_last_50": float(np.mean(log[-50:])),
        "loss_every_10": [float(np.mean(log[i : i + 10])) for i in range(0, len(log), 10)],
        "args": {k: str(v) for k, v in vars(args).items()},
        "lora_bytes": path.stat().st_size,
        "base_unet_sha256": hashlib.sha256(
            (args.pretrained_model_name_or_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
        ).hexdigest(),
    }
    (args.output_dir / "distill_record.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {path} ({path.stat().st_size} bytes)", flush=True)


if __name__ == "__main__":
    main()
