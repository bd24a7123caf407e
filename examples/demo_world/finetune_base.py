"""Fine-tune a demo base (UNet and text encoder) with the objects' latent cells weighted up in the loss.

    python examples/demo_world/finetune_base.py --out /tmp/base_w5 --object-weight 5 --steps 1500 --lr 2e-4
    python examples/demo_world/finetune_base.py --out /tmp/base_w1 --object-weight 1 --steps 1500 --lr 2e-4
    python examples/demo_world/finetune_base.py --out /tmp/base_one --max-objects 1 --threads 2
    python examples/demo_world/diagnose.py --base /tmp/base_w5 --samples 48 --redraw 24

An experiment on why the base draws blobs (docs/demo.md, "Why the base draws blobs"): the objects cover about
15 % of the latent cells, and the loss of the other 85 % (textured, striped, noisy backgrounds) dominates every
step. ``--object-weight W`` multiplies the squared v error of the cells an object touches (its mask dilated by
one pixel, max-pooled to the latent grid) by ``W`` and normalises each sample by its weights' sum;
``--object-weight 1`` is the same fine-tune with the base's own loss, the control. Everything else is the base
stage's: v-prediction on the zero-terminal-SNR schedule, min-SNR-5 weights, the caption mix (10 % empty, 45 % the
scene caption, 45 % a subset of its objects), batch 16, gradient clipping at 1; AdamW at a constant rate without
weight decay, warm-up or EMA, the first ``--scenes`` training scenes of world seed 0 (``--max-objects 1``: the
same seeds drawn with one object each, whose captions are the kind ``diagnose.py`` draws from). The result is a whole base
folder (a copy of ``--base`` with the new UNet, stored in float16, and text encoder). Not part of the recipe.

The text encoder is fine-tuned with the UNet at ``--lr`` or at its own ``--text-lr`` (whether a faster encoder
pulls the shape words apart); ``--text-encoder fresh`` replaces it by a newly initialised one of the same config
(CLIP's initialisation, seed 0) and keeps it frozen, so ``--text-lr`` is refused with it.

    python examples/demo_world/finetune_base.py --out /tmp/base_tlr --text-lr 2e-3
    python examples/demo_world/finetune_base.py --out /tmp/base_fresh --text-encoder fresh

``--transformer-layers N`` and ``--attention-top`` grow the UNet before the fine-tune, so that it starts as the
base it was (the same output, checked) with more room where the layout is decided: N transformer blocks in every
cross-attention block and the mid block instead of one, and cross-attention at the 32 × 32 level too. The new
blocks start as identities (their output projections zero), so what the fine-tune adds is what the new capacity
learns (``grow_unet``).

    python examples/demo_world/finetune_base.py --out /tmp/base_deep --transformer-layers 2 --attention-top
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["object_cells", "weighted_v_loss", "grow_unet", "main"]

DEMO_BASE = Path(__file__).resolve().parents[2] / "src" / "brushnet" / "assets" / "demo_world" / "base"


def object_cells(masks: list[np.ndarray], size: int) -> torch.Tensor:
    """``(1, size/4, size/4)`` float map of the latent cells that any object mask touches (masks dilated by one
    pixel, then max-pooled 4 × 4: the VAE's downsampling)."""
    union = np.zeros((size, size), dtype=bool)
    for mask in masks:
        union |= mask
    cells = torch.from_numpy(union).float().view(1, 1, size, size)
    return torch.nn.functional.max_pool2d(torch.nn.functional.max_pool2d(cells, 3, 1, 1), 4)[0]


def weighted_v_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    cells: torch.Tensor,
    object_weight: float,
    snr_weights: torch.Tensor,
) -> torch.Tensor:
    """Mean over the batch of ``snr_weights`` × the per-sample weighted mean of the squared error (averaged over
    channels), where cells in ``cells`` weigh ``object_weight`` and the others 1. ``object_weight`` 1 is the base
    stage's loss."""
    weights = 1 + (object_weight - 1) * cells
    error = ((prediction - target) ** 2).mean(1, keepdim=True)
    per_sample = (error * weights).sum((1, 2, 3)) / weights.sum((1, 2, 3))
    return (snr_weights * per_sample).mean()


def grow_unet(unet, transformer_layers: int = 1, attention_top: bool = False):
    """A UNet2DConditionModel like ``unet`` with ``transformer_layers`` transformer blocks in every cross-attention
    block (and the mid block) and, with ``attention_top``, cross-attention blocks at the first level too; its
    weights are ``unet``'s, and every new block starts as an identity (the output projections of its attention
    and feed-forward layers, or of a new transformer, zero), so it computes what ``unet`` computes."""
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config["transformer_layers_per_block"] = transformer_layers
    if attention_top:
        config["down_block_types"] = ["CrossAttnDownBlock2D", *config["down_block_types"][1:]]
        config["up_block_types"] = [*config["up_block_types"][:-1], "CrossAttnUpBlock2D"]
    grown = UNet2DConditionModel.from_config(config)
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"grow_unet: the grown UNet lacks {unexpected[:3]}")
    new = {key.rsplit(".", 1)[0] for key in missing}
    for name, module in grown.named_modules():
        if not any(key == name or key.startswith(name + ".") for key in new):
            continue
        if name.endswith(("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")) or (
            name.endswith("proj_out") and name in new
        ):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return grown if unet.dtype == torch.float32 else grown.to(unet.dtype)


def _fine_tune(folder: Path, images, cells, scenes, args, start: float) -> None:
    """Fine-tune the base in ``folder`` in place (UNet and text encoder; see the module docstring)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from text_to_image import _latent_stats, base_caption, min_snr_weights
    from transformers import CLIPTextModel, CLIPTokenizer
    from world_data import TEXT_MAX_LENGTH

    from brushnet.training.loop import training_target

    mean, std = _latent_stats(images, folder / "vae")  # the base stage's posterior mean and std, scaled
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    if args.text_encoder == "fresh":  # re-initialised from the same config and frozen: words stay apart
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(text_encoder.config).requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    if args.transformer_layers > 1 or args.attention_top:
        before = sum(p.numel() for p in unet.parameters())
        unet = grow_unet(unet, args.transformer_layers, args.attention_top)
        print(f"grown UNet: {before} -> {sum(p.numel() for p in unet.parameters())} parameters", flush=True)
    groups = [{"params": list(unet.parameters()), "lr": args.lr}]
    if args.text_encoder == "train":
        groups.append({"params": list(text_encoder.parameters()), "lr": args.text_lr or args.lr})
    params = [param for group in groups for param in group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    unet.train()
    text_encoder.train(args.text_encoder == "train")
    smoothed = 0.0
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(mean), (args.batch,), generator=generator)
        draws = torch.rand(args.batch, generator=generator).tolist()
        captions = [base_caption(scenes[i], draw) for i, draw in zip(index.tolist(), draws)]
        tokens = tokenizer(
            captions,
            padding="max_length",
            max_length=TEXT_MAX_LENGTH,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden = text_encoder(tokens, return_dict=False)[0]
        latents = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=generator)
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
        target = training_target(scheduler, latents, noise, timesteps, "v_prediction")
        snr = min_snr_weights(scheduler, timesteps, 5.0)
        loss = weighted_v_loss(prediction, target, cells[index], args.object_weight, snr)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        smoothed = loss.item() if step == 1 else 0.98 * smoothed + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step} loss {smoothed:.4f} ({time.time() - start:.0f} s)", flush=True)
    unet.half().save_pretrained(folder / "unet")
    text_encoder.save_pretrained(folder / "text_encoder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python examples/demo_world/finetune_base.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--base", default=str(DEMO_BASE), help="The base folder to start from (the shipped one)."
    )
    parser.add_argument("--out", required=True, help="New folder for the fine-tuned base (must not exist).")
    parser.add_argument(
        "--object-weight", type=float, default=1.0, help="Loss weight of object cells (1: none)."
    )
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--scenes", type=int, default=6000, help="Training scenes (world seed 0, train split)."
    )
    parser.add_argument(
        "--max-objects",
        type=int,
        default=3,
        help="Objects per training scene (3: the world's; 1: one-object scenes, the captions diagnose.py draws).",
    )
    parser.add_argument("--text-lr", type=float, help="Learning rate of the text encoder (default: --lr).")
    parser.add_argument(
        "--text-encoder",
        choices=("train", "fresh"),
        default="train",
        help="train: fine-tune the base's text encoder with the UNet (default); fresh: replace it by a newly "
        "initialised one of the same config, kept frozen, so no two words can share a state.",
    )
    parser.add_argument(
        "--transformer-layers",
        type=int,
        default=1,
        help="Transformer blocks per cross-attention block (the base's: 1); new ones start as identities.",
    )
    parser.add_argument(
        "--attention-top",
        action="store_true",
        help="Add cross-attention at the first (32 x 32) level, starting as an identity.",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (default 1).")
    args = parser.parse_args(argv)
    base, out = Path(args.base), Path(args.out)
    if not all((base / part).is_dir() for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")):
        parser.error(f"--base {base}: not a Stable Diffusion folder (needs unet/, vae/, text_encoder/, ...)")
    if out.exists():
        parser.error(f"--out {out}: exists; give a new folder")
    if (
        args.object_weight < 1
        or min(args.steps, args.batch, args.scenes, args.max_objects, args.transformer_layers) < 1
        or args.lr <= 0
        or (args.text_lr is not None and args.text_lr <= 0)
    ):
        parser.error(
            "--object-weight must be at least 1 and --steps, --lr, --text-lr, --batch, --scenes, --max-objects, "
            "--transformer-layers positive"
        )
    if args.text_lr is not None and args.text_encoder == "fresh":
        parser.error("--text-lr: the text encoder is frozen with --text-encoder fresh; give one of the two")

    from world_data import SIZE

    from brushnet.data.shapes import render_scene, sample_scene, scene_rng

    torch.set_num_threads(args.threads)
    start = time.time()
    images, cells, scenes = [], [], []
    for index in range(args.scenes):
        scene = sample_scene(scene_rng("train", 0, index), size=SIZE, max_objects=args.max_objects)
        image, masks = render_scene(scene)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        cells.append(object_cells(masks, SIZE))
        scenes.append(scene)
    images, cells = torch.stack(images), torch.stack(cells)
    print(f"{args.scenes} scenes, object cells {cells.mean().item():.3f} of the latent", flush=True)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(base, partial)
    try:
        _fine_tune(partial, images, cells, scenes, args, start)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays
        raise
    print(f"wrote {out} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
