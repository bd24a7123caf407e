"""Stage ``base``: the offline tokenizer, the text encoder and the text-to-image UNet.

It builds a word-level ``CLIPTokenizer`` (:func:`world_data.build_tokenizer`), a tiny ``CLIPTextModel`` and an
SD1.5-layout ``UNet2DConditionModel`` and trains text encoder and UNet jointly on precomputed latents, with
the v-prediction target on a noise schedule rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion
Noise Schedules and Sample Steps are Flawed"): at the sampler's first step the model sees pure noise, as it
does in training, so it cannot learn to read a scene's colours from the residual signal that Stable
Diffusion's schedule leaves at t = 999 and then invent them from the noise at inference. Loss weights are
min-SNR-γ for v. Captions: the full scene caption (45 %), a phrase naming some of its objects (45 %, so that
"a red circle" is a meaningful prompt), empty (10 %, for classifier-free guidance).
"""

from __future__ import annotations

import numpy as np
import torch
from fit_loop import FitSettings, fit, seeded_init, stage_generator
from recipe import Run, WorldTrainConfig
from world_data import SIZE, TEXT_MAX_LENGTH, build_tokenizer, subset_caption, to_unit

from brushnet.devices import to_device
from brushnet.random_models import write_sd_model_index

__all__ = ["base_caption", "base_scheduler", "min_snr_weights", "snapshot_base", "train_base", "unet_config"]


def base_scheduler(cfg: WorldTrainConfig):
    """The base's scheduler (saved as ``DDIMScheduler``; training and every method read its config):
    Stable Diffusion's betas, rescaled to zero terminal SNR with trailing timesteps when
    ``cfg.zero_terminal_snr``."""
    from diffusers import DDIMScheduler

    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if cfg.zero_terminal_snr else {}
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
        **extra,
    )


def unet_config(cfg: WorldTrainConfig) -> dict:
    """The text-to-image UNet: SD1.5's layout, small (cross-attention in the two lower-resolution levels)."""
    levels = len(cfg.unet_channels)
    return dict(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_width,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weights of the v loss: min-SNR-γ (Hang et al. 2023) with a floor of 1 on the implied x₀
    weight, ``clamp(snr, 1, γ) / (snr + 1)``, so the highest noise levels (where the sampler's first steps
    decide the layout; snr = 0 at t = 999) are not weighted down to nothing."""
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, min=1.0, max=gamma) / (snr + 1)


def base_caption(scene, draw: float) -> str:
    """The base's caption of ``scene`` for a uniform ``draw`` in [0, 1): empty below 0.1, the scene caption below
    0.55, else a phrase naming some of its objects (the subset is a function of the draw, so the stage's
    generator alone decides)."""
    if draw < 0.1:
        return ""
    if draw < 0.55:
        return scene.caption
    return subset_caption(scene, np.random.default_rng(int(draw * 2**53)))


def _latent_stats(images: torch.Tensor, vae_dir, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (scaled) of every training image, so the UNet stage never runs the encoder
    (computed on ``device``, returned on the CPU)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval().to(device)
    scaling = vae.config.scaling_factor
    with torch.no_grad():
        means, stds = [], []
        for start in range(0, len(images), 64):
            posterior = vae.encode(to_unit(images[start : start + 64]).to(device)).latent_dist
            means.append((posterior.mean * scaling).cpu())
            stds.append((posterior.std * scaling).cpu())
    return torch.cat(means), torch.cat(stds)


def _base_models(run: Run, generator: torch.Generator):
    """``(tokenizer, text encoder, UNet)`` of the base stage, drawn from ``generator`` as the stage draws them (the
    tokenizer is written to ``base/tokenizer``)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = run.cfg
    tokenizer = build_tokenizer(run.base_dir / "tokenizer")
    with seeded_init(generator):
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cfg.text_width,
                intermediate_size=2 * cfg.text_width,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=TEXT_MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                projection_dim=cfg.text_width,
            )
        )
        unet = UNet2DConditionModel(**unet_config(cfg))
        if cfg.base_text_encoder == "frozen":  # each word its own direction, kept as drawn
            torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, 0.0, 1.0)
            text_encoder.requires_grad_(False)
    return tokenizer, text_encoder, unet


def _save_base(run: Run, unet, text_encoder, folder) -> None:
    """Write the UNet, text encoder, scheduler and ``model_index.json`` of a base pipeline folder."""
    unet.save_pretrained(folder / "unet")
    text_encoder.save_pretrained(folder / "text_encoder")
    base_scheduler(run.cfg).save_pretrained(folder / "scheduler")
    write_sd_model_index(folder)


def snapshot_base(run: Run, out) -> int:
    """Write the base stage's last checkpoint (``checkpoints/base.pt`` of a run still training) as a base pipeline
    folder at ``out`` that ``diagnose.py --base`` reads: the EMA weights where the stage keeps an EMA, the run's
    tokenizer and VAE. Returns the checkpoint's step. ``run.cfg`` must be the recipe the run trains with."""
    import shutil
    from pathlib import Path

    out = Path(out)
    checkpoint = run.checkpoint("base")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no base-stage checkpoint at {checkpoint}")
    state = torch.load(checkpoint, weights_only=False)
    _, text_encoder, unet = _base_models(run, stage_generator(run.cfg.seed, "base"))
    model = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    model.load_state_dict(state["model"])
    if state.get("ema") is not None:  # the shadow parameters, in the order fit() lists the trained ones
        trained = [p for p in model.parameters() if p.requires_grad]
        shadow = state["ema"]["shadow_params"]
        if len(shadow) != len(trained):
            raise ValueError(f"{checkpoint}: {len(shadow)} EMA parameters for {len(trained)} trained ones")
        with torch.no_grad():
            for param, value in zip(trained, shadow):
                param.copy_(value)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _save_base(run, unet, text_encoder, out)
    for part in ("tokenizer", "vae"):
        shutil.copytree(run.base_dir / part, out / part)
    return int(state["step"])


def train_base(run: Run) -> dict:
    """Stage ``base``: tokenizer, text encoder and text-to-image UNet from scratch, trained jointly on the
    run's scenes; writes the whole ``base/`` pipeline folder (with the VAE of stage ``vae``)."""
    from diffusers import DDPMScheduler

    from brushnet.training.loop import training_target

    cfg = run.cfg
    generator = stage_generator(cfg.seed, "base")
    tokenizer, text_encoder, unet = _base_models(run, generator)
    model = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}).to(run.device)
    images, scenes = run.scenes()
    latent_mean, latent_std = _latent_stats(images, run.base_dir / "vae", run.device)
    scheduler = base_scheduler(cfg)
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)

    def batches(generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        index = torch.randint(0, len(latent_mean), (cfg.base_batch,), generator=generator)
        draws = torch.rand(len(index), generator=generator).tolist()
        return index, [base_caption(scenes[i], draw) for i, draw in zip(index.tolist(), draws)]

    def loss_of(batch, generator: torch.Generator) -> torch.Tensor:
        index, captions = batch
        tokens = tokenizer(
            captions, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        hidden = text_encoder(to_device(tokens, run.device), return_dict=False)[0]
        # every draw on the CPU, from the stage's generator (the same draws on any device)
        latents = latent_mean[index] + latent_std[index] * torch.randn(
            latent_mean[index].shape, generator=generator
        )
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator
        )
        weights = to_device(min_snr_weights(noise_scheduler, timesteps, cfg.min_snr_gamma), run.device)
        latents, noise, timesteps = (to_device(t, run.device) for t in (latents, noise, timesteps))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, hidden).sample
        target = training_target(noise_scheduler, latents, noise, timesteps, "v_prediction")
        return (weights * ((prediction - target) ** 2).mean(dim=(1, 2, 3))).mean()

    settings = FitSettings(
        steps=cfg.base_steps,
        learning_rate=cfg.base_lr,
        lr_warmup_steps=cfg.base_warmup_steps,
        ema_decay=cfg.base_ema_decay or None,
    )
    result = fit(
        model, loss_of, batches, settings, generator=generator, name="base", checkpoint=run.checkpoint("base")
    )
    _save_base(run, unet, text_encoder, run.base_dir)
    run.checkpoint("base").unlink(missing_ok=True)
    return result.summary()
