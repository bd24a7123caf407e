"""Stages ``vae`` and ``decoder``: the world's autoencoder (4× downsampling, 4 latent channels).

``vae`` trains an ``AutoencoderKL`` from scratch on random crops (L1 + MSE + a small KL term) and sets
``scaling_factor`` to 1 / std of the latents; ``decoder`` fine-tunes the decoder alone, so every latent the
other models learned on stays the same.
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

__all__ = ["held_out_images", "reconstruction_psnr", "train_decoder", "train_vae"]


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
        x = x.to(run.device)
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(run.device)  # drawn on the CPU
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
    from diffusers import AutoencoderKL

    cfg = run.cfg
    images, _ = run.scenes()
    vae_dir = run.base_dir / "vae"
    vae = AutoencoderKL.from_pretrained(vae_dir).requires_grad_(False).to(run.device)
    decoder = torch.nn.ModuleDict({"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv})
    decoder.requires_grad_(True)

    def loss_of(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = x.to(run.device)
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=generator).to(run.device)
            z = posterior.mean + posterior.std * eps
        recon = vae.decode(z).sample
        return F.l1_loss(recon, x) + F.mse_loss(recon, x)

    vae.encoder.eval()
    settings = FitSettings(steps=cfg.decoder_steps, learning_rate=cfg.decoder_lr, adam_weight_decay=0.0)
    result = fit(
        decoder,
        loss_of,
        _crops(images, cfg.vae_batch, cfg.vae_crop),
        settings,
        generator=stage_generator(cfg.seed, "decoder"),
        name="decoder",
        checkpoint=run.checkpoint("decoder"),
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
    run.checkpoint("decoder").unlink(missing_ok=True)
    return {
        **result.summary(),
        "held_out_psnr_db": reconstruction_psnr(vae, held_out_images(cfg.held_out_scenes)),
    }
