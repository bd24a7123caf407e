"""Stages ``vae`` and ``decoder``: the world's autoencoder (4× downsampling, 4 latent channels).

``vae`` trains an ``AutoencoderKL`` from scratch on random crops (L1 + MSE + a small KL term) and sets
``scaling_factor`` to 1 / std of the latents; ``decoder`` fine-tunes the decoder alone, so every latent the
other models learned on stays the same.

The decoder's GroupNorms take their statistics over the whole latent, so a decoder trained on whole scenes only
lets a few foreign latent cells (a hole a method filled) change the colour of the whole image: replacing the
latent of a 6 % hole by the image's own mean latent moved the kept region's blue by 21 levels (the demo's striped
scene, recipe v4's VAE).
The ``decoder_local`` stage therefore decodes a share (``decoder_local_share``) of its samples with a random box of
latent cells replaced (by another scene's latents, the latent's mean or noise) and scores those only outside
the box and a one-cell margin: the kept pixels must not depend on what is in the hole. Every latent of that stage
is also perturbed a little everywhere (Gaussian, up to ``decoder_local_noise`` of the latents' std), since a
method that regenerates the kept region hands the decoder a latent slightly off the input's.
:func:`decoder_locality` measures it.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from fit_loop import FitSettings, fit, seeded_init, stage_generator
from recipe import Run
from world_data import SIZE, to_unit

from brushnet.devices import to_device

__all__ = [
    "corrupt_latent_boxes",
    "decoder_locality",
    "held_out_images",
    "reconstruction_psnr",
    "train_decoder",
    "train_decoder_local",
    "train_vae",
]


def held_out_images(count: int) -> torch.Tensor:
    """The first ``count`` eval-split scenes of world seed 0 (the mini-BrushBench's), uint8 ``(N, 3, H, W)``."""
    from brushnet.data.shapes import render_scene, sample_scene, scene_rng

    images = [
        np.asarray(render_scene(sample_scene(scene_rng("eval", 0, index), size=SIZE))[0])
        for index in range(count)
    ]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


@torch.no_grad()
def reconstruction_psnr(vae, images_uint8: torch.Tensor) -> float:
    """Mean over images of the PSNR (dB, images in [0, 1]) of ``decode(encode(x).mode)`` against ``x``."""
    psnrs = []
    for start in range(0, len(images_uint8), 32):
        x = to_unit(images_uint8[start : start + 32]).to(vae.device)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((recon - x) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnrs += (10 * torch.log10(1 / mse)).tolist()
    return sum(psnrs) / len(psnrs)


def corrupt_latent_boxes(
    z: torch.Tensor,
    share: float,
    generator: torch.Generator,
    fills: tuple[str, ...] = ("other", "mean", "noise"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a random box of latent cells (a tenth to a third of each side) in a ``share`` of the samples of
    ``z`` ``(B, C, h, w)`` by one of ``fills``: ``"other"`` (the next sample's latents there), ``"mean"`` (the
    sample's mean latent) or ``"noise"`` (Gaussian at the batch's std times 0.5-1.5).

    Returns ``(corrupted, keep)``: ``keep`` ``(B, 1, h, w)`` is 0 on each box grown by one cell, 1 elsewhere (the
    cells whose pixels must not change). Every draw comes from ``generator`` (on the CPU).
    """
    b, c, h, w = z.shape
    out = z.clone()
    keep = torch.ones(b, 1, h, w, device=z.device)
    chosen = (torch.rand(b, generator=generator) < share).nonzero().flatten().tolist()
    for i in chosen:
        bh, bw = torch.randint(max(1, h // 10), h // 3 + 1, (2,), generator=generator).tolist()
        top = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
        kind = fills[int(torch.randint(0, len(fills), (1,), generator=generator))]
        box = (slice(None), slice(top, top + bh), slice(left, left + bw))
        if kind == "other":
            fill = z[(i + 1) % b][box]
        elif kind == "mean":
            fill = z[i].mean(dim=(1, 2), keepdim=True).expand(c, bh, bw)
        else:
            scale = 0.5 + float(torch.rand((), generator=generator))
            fill = to_device(torch.randn(c, bh, bw, generator=generator) * scale, z.device) * z.std()
        out[i][box] = fill
        keep[i, :, max(top - 1, 0) : top + bh + 1, max(left - 1, 0) : left + bw + 1] = 0
    return out, keep


@torch.no_grad()
def decoder_locality(vae, images_uint8: torch.Tensor, fill: str = "other", seed: int = 0) -> float:
    """How little the kept pixels move when a box of latent cells is replaced (by ``fill``, as in
    :func:`corrupt_latent_boxes`, one box per image from ``seed``): mean over images of the PSNR (dB) of
    ``decode(corrupted)`` against ``decode(z)`` outside the box and its one-cell margin. Higher is more local."""
    generator = torch.Generator().manual_seed(seed)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    psnrs = []
    for start in range(0, len(images_uint8), 32):
        x = to_unit(images_uint8[start : start + 32]).to(vae.device)
        z = vae.encode(x).latent_dist.mode()
        corrupted, keep = corrupt_latent_boxes(z, 1.0, generator, fills=(fill,))
        clean, moved = vae.decode(z).sample.clamp(-1, 1), vae.decode(corrupted).sample.clamp(-1, 1)
        keep = F.interpolate(keep, scale_factor=factor, mode="nearest")
        mse = (((moved - clean) / 2).pow(2) * keep).sum(dim=(1, 2, 3)) / (keep.sum(dim=(1, 2, 3)) * 3)
        psnrs += (10 * torch.log10(1 / mse.clamp_min(1e-10))).tolist()
    return sum(psnrs) / len(psnrs)


def _crops(images: torch.Tensor, batch: int, crop: int):
    """``generator → (batch, 3, crop, crop)`` random crops of random images, in [−1, 1]."""

    def draw(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, len(images), (batch,), generator=generator)
        top, left = torch.randint(0, SIZE - crop + 1, (2,), generator=generator).tolist()
        return to_unit(images[index, :, top : top + crop, left : left + crop])

    return draw


def train_vae(run: Run) -> dict:
    """Stage ``vae``: an ``AutoencoderKL`` from scratch; writes ``base/vae``."""
    from diffusers import AutoencoderKL

    cfg = run.cfg
    images, _ = run.scenes()
    generator = stage_generator(cfg.seed, "vae")
    with seeded_init(generator):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(cfg.vae_channels),
            down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
            latent_channels=4,
            layers_per_block=cfg.vae_layers,
            norm_num_groups=16,
            sample_size=SIZE,
            mid_block_add_attention=False,
        )
    vae.to(run.device)

    def loss_of(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = to_device(x, run.device)
        posterior = vae.encode(x).latent_dist
        # drawn on the CPU
        eps = to_device(torch.randn(posterior.mean.shape, generator=generator), run.device)
        z = posterior.mean + posterior.std * eps
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / z[0].numel()
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.vae_kl_weight * kl

    settings = FitSettings(steps=cfg.vae_steps, learning_rate=cfg.vae_lr, adam_weight_decay=0.0)
    result = fit(
        vae,
        loss_of,
        _crops(images, cfg.vae_batch, cfg.vae_crop),
        settings,
        generator=generator,
        name="vae",
        checkpoint=run.checkpoint("vae"),
    )
    with torch.no_grad():
        latents = torch.cat(
            [
                vae.encode(to_unit(images[i : i + 64]).to(run.device)).latent_dist.mean
                for i in range(0, 512, 64)
            ]
        )
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(run.base_dir / "vae")
    run.checkpoint("vae").unlink(missing_ok=True)
    return {
        **result.summary(),
        "held_out_psnr_db": reconstruction_psnr(vae, held_out_images(cfg.held_out_scenes)),
        "scaling_factor": scaling,
    }


def train_decoder(run: Run) -> dict:
    """Stage ``decoder``: fine-tune ``base/vae``'s decoder alone (encoder frozen, so every latent is
    unchanged): sharper outputs for every method at no cost to the rest."""
    return _tune_decoder(run, "decoder", run.cfg.decoder_steps, share=0.0)


def train_decoder_local(run: Run) -> dict:
    """Stage ``decoder_local``: go on tuning the decoder with a ``decoder_local_share`` of the samples decoded
    from latents with a foreign box and scored outside it (module docstring), so the kept pixels stop depending
    on what a method put in the hole."""
    return _tune_decoder(run, "decoder_local", run.cfg.decoder_local_steps, share=run.cfg.decoder_local_share)


def _tune_decoder(run: Run, name: str, steps: int, share: float) -> dict:
    from diffusers import AutoencoderKL

    cfg = run.cfg
    images, _ = run.scenes()
    vae_dir = run.base_dir / "vae"
    vae = AutoencoderKL.from_pretrained(vae_dir).requires_grad_(False).to(run.device)
    decoder = torch.nn.ModuleDict({"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv})
    decoder.requires_grad_(True)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def loss_of(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = to_device(x, run.device)
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            eps = to_device(torch.randn(posterior.mean.shape, generator=generator), run.device)
            z = posterior.mean + posterior.std * eps
            if share > 0:
                z, keep = corrupt_latent_boxes(z, share, generator)
                # and every sample's latent a little off everywhere (up to ``decoder_local_noise`` of its std),
                # as a method's kept latent is: the decoder must give the clean scene back
                if cfg.decoder_local_noise > 0:
                    level = torch.rand(z.shape[0], 1, 1, 1, generator=generator) * cfg.decoder_local_noise
                    z = z + to_device(level * torch.randn(z.shape, generator=generator), z.device) * z.std()
        recon = vae.decode(z).sample
        if share == 0:
            return F.l1_loss(recon, x) + F.mse_loss(recon, x)
        keep = F.interpolate(keep, scale_factor=factor, mode="nearest")  # the kept cells' pixels
        error = recon - x
        return ((error.abs() + error.pow(2)) * keep).sum() / (keep.sum() * x.shape[1])

    vae.encoder.eval()
    settings = FitSettings(steps=steps, learning_rate=cfg.decoder_lr, adam_weight_decay=0.0)
    result = fit(
        decoder,
        loss_of,
        _crops(images, cfg.vae_batch, cfg.vae_crop),
        settings,
        generator=stage_generator(cfg.seed, name),
        name=name,
        checkpoint=run.checkpoint(name),
    )
    vae.eval()
    tmp, old = run.base_dir / "vae.decoder-tmp", run.base_dir / "vae.old"
    for folder in (tmp, old):
        if folder.exists():
            shutil.rmtree(folder)
    vae.save_pretrained(tmp)
    os.replace(vae_dir, old)
    os.replace(tmp, vae_dir)
    shutil.rmtree(old)
    run.checkpoint(name).unlink(missing_ok=True)
    held_out = held_out_images(cfg.held_out_scenes)
    return {
        **result.summary(),
        "held_out_psnr_db": reconstruction_psnr(vae, held_out),
        "locality_psnr_db": {fill: decoder_locality(vae, held_out, fill) for fill in ("other", "mean")},
    }
