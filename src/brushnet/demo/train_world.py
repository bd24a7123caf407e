"""Train every demo model from scratch on the shapes world, on a CPU, in one command.

    python -m brushnet.demo.train_world --work /tmp/demo_world_run --export src/brushnet/assets/demo_world

Stages (each writes a diffusers folder under ``--work``; the timings go to ``training_record.json``):

1. **data**: BrushData shards of ``--scenes`` training scenes (:func:`brushnet.data.shapes_writers.write_training_shards`).
2. **vae**: an ``AutoencoderKL`` with a 4× downsampling (128 px → 32 × 32 × 4 latents), trained on random
   64 px crops with L1 + MSE and a small KL term; ``scaling_factor`` is set to 1 / std of the latents.
3. **base**: a word-level ``CLIPTokenizer`` built offline from the world's vocabulary (:func:`build_tokenizer`),
   a tiny ``CLIPTextModel`` and a text-to-image ``UNet2DConditionModel`` trained jointly with the
   ε-prediction loss (min-SNR-5 weighted) on precomputed latents. Captions are the scene caption, a
   phrase naming some of its objects (so a prompt like "a red circle" means something), or empty (10 %,
   for classifier-free guidance).
4. **brushnet**: the branch, trained by :func:`brushnet.training.train` (the project's own loop, paper masks:
   segmentation / brush mix) from ``BrushNetModel.from_unet`` of the frozen base.
5. **inpaint**: a 9-channel UNet (latent + mask + masked-image latent, diffusers' layout) fine-tuned from the
   base UNet (new input channels zero-initialised), same data and masks.
6. **controlnet**: ``ControlNetModel.from_unet`` of the base (4× conditioning embedding), trained on the
   control image diffusers' inpaint ControlNet reads (image in [0, 1], hole = −1) with the base frozen.
7. **decoder** (twice): the VAE decoder alone is fine-tuned longer (encoder frozen, so every latent the other
   models learned on is unchanged); it can run in parallel with stages 3–6 (``--stages decoder decoder``).

In stages 4–6 the caption of a sample whose hole covers at least half of some objects becomes, half of the
time, the phrase naming those objects (:class:`HolePromptStream`): the benchmark asks "a red circle" for a hole.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

logger = logging.getLogger("brushnet.demo.train_world")

__all__ = [
    "DEFAULT_STAGES",
    "WorldTrainConfig",
    "HolePromptStream",
    "build_tokenizer",
    "train_all",
    "export",
    "main",
]

SIZE = 128
DEFAULT_STAGES: tuple[str, ...] = (
    "data", "vae", "base", "base_v", "brushnet", "brushnet_more", "inpaint", "controlnet", "decoder", "decoder"
)  # fmt: skip
"""The stages of a full run, in order (the decoder is fine-tuned twice)."""
TEXT_MAX_LENGTH = 32
UNET_CHANNELS = (32, 64, 96)
VAE_CHANNELS = (16, 32, 64)


@dataclass
class WorldTrainConfig:
    """Sizes and step counts of a full run (defaults: the shipped models)."""

    scenes: int = 6000
    seed: int = 0
    vae_steps: int = 600
    vae_batch: int = 16
    vae_lr: float = 1e-3
    base_steps: int = 1500
    base_batch: int = 16
    base_lr: float = 3e-4
    base_v_steps: int = 1200
    base_v_lr: float = 2e-4
    brushnet_steps: int = 400
    brushnet_more_steps: int = 500
    tap_lr: float = 1e-3
    inpaint_steps: int = 400
    controlnet_steps: int = 400
    branch_batch: int = 16
    branch_lr: float = 3e-4
    decoder_steps: int = 1500
    decoder_lr: float = 5e-4
    threads: int = 1


# -- tokenizer ------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable character table (the byte-level alphabet of its BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_tokenizer(out_dir: str | os.PathLike, words: list[str] | None = None):
    """Write a ``CLIPTokenizer`` whose BPE merges make every world word one token; return it loaded.

    The vocabulary is CLIP's 512 byte-level symbols (each byte alone and word-final), then one entry per
    merge (each word is merged left to right), then ``<|startoftext|>`` / ``<|endoftext|>``. Any text still
    tokenizes (unknown words fall back to bytes); ``model_max_length`` is :data:`TEXT_MAX_LENGTH`.
    """
    from transformers import CLIPTokenizer

    from ..data.shapes import caption_vocabulary

    words = sorted(set(words if words is not None else caption_vocabulary()))
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = CLIPTokenizer(
            str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=TEXT_MAX_LENGTH
        )
        # A merge of one word can pre-empt another word's chain ("pl" of "plain" inside "purple"): chain the
        # pieces left over with new, lowest-priority merges (they never fire inside a word that merges fully).
        split = [tokenizer.tokenize(word) for word in words]
        stuck = [pieces for pieces in split if len(pieces) > 1]
        if not stuck:
            break
        for pieces in stuck:
            while len(pieces) > 1:
                if (pieces[0], pieces[1]) not in merges:
                    merges.append((pieces[0], pieces[1]))
                vocab.setdefault(pieces[0] + pieces[1], len(vocab))
                pieces = [pieces[0] + pieces[1]] + pieces[2:]
    else:
        raise RuntimeError(f"could not make every word one token: {stuck}")
    tokenizer.save_pretrained(out)
    return CLIPTokenizer.from_pretrained(out)


# -- captions for holes ---------------------------------------------------------------------------------


def _join_phrases(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def subset_caption(scene, rng: np.random.Generator) -> str:
    """A caption naming a random non-empty subset of the scene's objects (no background), e.g. "a red circle"."""
    objects = list(scene.objects)
    count = int(rng.integers(1, len(objects) + 1))
    chosen = sorted(rng.choice(len(objects), size=count, replace=False).tolist())
    return _join_phrases([objects[i].phrase for i in chosen])


class HolePromptStream(IterableDataset):
    """Wrap a BrushData stream of shapes-world shards: name the hole's objects in the caption, half the time.

    The scene of sample ``key`` is regenerated from the shard seed (shapes-world scenes are pure functions of
    ``(seed, index)``) to know which objects the hole covers (at least half of their pixels). Images are
    already at the training resolution, so masks align without cropping. ``set_epoch`` and ``skipped`` are
    forwarded (the training loop resumes it by skipping batches).
    """

    def __init__(self, stream, world_seed: int, size: int = SIZE, probability: float = 0.5, seed: int = 0):
        self.stream = stream
        self.world_seed = world_seed
        self.size = size
        self.probability = probability
        self.seed = seed
        self.skipped = getattr(stream, "skipped", None)
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self.stream.set_epoch(epoch)

    def __iter__(self):
        from ..data.shapes import render_scene, sample_scene, scene_rng

        for sample in self.stream:
            index = int(sample["key"])
            scene = sample_scene(scene_rng("train", self.world_seed, index), size=self.size)
            _, masks = render_scene(scene)
            hole = sample["mask"][0].numpy() > 0.5
            covered = [
                obj.phrase
                for obj, mask in zip(scene.objects, masks)
                if mask.any() and (hole & mask).sum() >= 0.5 * mask.sum()
            ]
            rng = np.random.default_rng([self.seed, self._epoch, index])
            if covered and rng.random() < self.probability:
                sample = {**sample, "caption": _join_phrases(covered)}
            yield sample


# -- helpers --------------------------------------------------------------------------------------------


def _load_scene_images(num_scenes: int, seed: int) -> tuple[torch.Tensor, list]:
    from ..data.shapes import render_scene, sample_scene, scene_rng

    images, scenes = [], []
    for index in range(num_scenes):
        scene = sample_scene(scene_rng("train", seed, index), size=SIZE)
        image, _ = render_scene(scene)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        scenes.append(scene)
    return torch.stack(images), scenes  # uint8 (N, 3, H, W)


def _to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


def _log_every(step: int, total: int, start: float, losses: list[float], name: str) -> None:
    if step % 50 == 0 or step == total:
        recent = losses[-50:]
        logger.info(
            "%s step %d/%d loss %.4f (%.0f s)",
            name,
            step,
            total,
            sum(recent) / len(recent),
            time.time() - start,
        )


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


# -- stage 2: VAE ---------------------------------------------------------------------------------------


def train_vae(images: torch.Tensor, cfg: WorldTrainConfig, out_dir: Path) -> dict:
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05
    )
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    crop = 64
    losses: list[float] = []
    start = time.time()
    vae.train()
    for step in range(1, cfg.vae_steps + 1):
        index = torch.randint(0, len(images), (cfg.vae_batch,), generator=generator)
        top, left = torch.randint(0, SIZE - crop + 1, (2,), generator=generator).tolist()
        x = _to_unit(images[index, :, top : top + crop, left : left + crop])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / z[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        _log_every(step, cfg.vae_steps, start, losses, "vae")
    vae.eval()
    with torch.no_grad():
        sample = _to_unit(images[:256])
        latents = vae.encode(sample).latent_dist.mean
        recon = vae.decode(latents).sample.clamp(-1, 1)
        mse = float(F.mse_loss((recon + 1) / 2, (sample + 1) / 2))
        scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(out_dir / "vae")
    return {
        "steps": cfg.vae_steps,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "recon_psnr_db": 10 * math.log10(1.0 / mse),
        "scaling_factor": scaling,
    }


def train_decoder(images: torch.Tensor, cfg: WorldTrainConfig, out_dir: Path) -> dict:
    """Fine-tune the VAE decoder alone (the encoder, hence every latent the other models learned on, is
    unchanged): sharper outputs for every method at no cost to the rest."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out_dir / "vae")
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.decoder_lr, total_steps=cfg.decoder_steps, pct_start=0.05
    )
    generator = torch.Generator().manual_seed(cfg.seed + 6)
    crop = 64
    losses: list[float] = []
    start = time.time()
    vae.decoder.train()
    for step in range(1, cfg.decoder_steps + 1):
        index = torch.randint(0, len(images), (cfg.vae_batch,), generator=generator)
        top, left = torch.randint(0, SIZE - crop + 1, (2,), generator=generator).tolist()
        x = _to_unit(images[index, :, top : top + crop, left : left + crop])
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        _log_every(step, cfg.decoder_steps, start, losses, "decoder")
    vae.eval()
    with torch.no_grad():
        sample = _to_unit(images[:256])
        recon = vae.decode(vae.encode(sample).latent_dist.mean).sample.clamp(-1, 1)
        mse = float(F.mse_loss((recon + 1) / 2, (sample + 1) / 2))
    tmp = out_dir / "vae.decoder-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    vae.save_pretrained(tmp)
    old = out_dir / "vae.old"
    os.replace(out_dir / "vae", old)
    os.replace(tmp, out_dir / "vae")
    shutil.rmtree(old)
    return {
        "steps": cfg.decoder_steps,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "recon_psnr_db": 10 * math.log10(1.0 / mse),
    }


# -- stage 3: text encoder + text-to-image UNet ----------------------------------------------------------


def _unet_config() -> dict:
    return dict(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def _min_snr_weights(
    scheduler, timesteps: torch.Tensor, gamma: float = 5.0, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """Loss weights per sample. ε: min-SNR-γ (Hang et al. 2023), ``min(snr, γ) / snr``. v: the same cap with a
    floor of 1 on the implied x₀ weight, ``clamp(snr, 1, γ) / (snr + 1)``, so the highest noise levels (where
    the sampler's first steps decide the layout) are not weighted down to nothing."""
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    if prediction_type == "v_prediction":
        return torch.clamp(snr, min=1.0, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def _latent_stats(images: torch.Tensor, vae_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (scaled) of every training image, so the UNet stages never run the encoder."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    scaling = vae.config.scaling_factor
    with torch.no_grad():
        means, stds = [], []
        for start in range(0, len(images), 64):
            posterior = vae.encode(_to_unit(images[start : start + 64])).latent_dist
            means.append(posterior.mean * scaling)
            stds.append(posterior.std * scaling)
    return torch.cat(means), torch.cat(stds)


def _fit_text_to_image(
    unet,
    text_encoder,
    tokenizer,
    stats,
    scenes: list,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    prediction_type: str,
    name: str,
) -> list[float]:
    """Train ``unet`` and ``text_encoder`` jointly (min-SNR-5 weighted ``prediction_type`` loss)."""
    from diffusers import DDPMScheduler

    latent_mean, latent_std = stats
    noise_scheduler = DDPMScheduler.from_config(_scheduler(prediction_type).config)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    start = time.time()
    unet.train()
    text_encoder.train()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(latent_mean), (batch,), generator=generator)
        captions = []
        for i in index.tolist():
            draw = rng.random()
            captions.append(
                "" if draw < 0.1 else scenes[i].caption if draw < 0.55 else subset_caption(scenes[i], rng)
            )
        tokens = tokenizer(
            captions, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        hidden = text_encoder(tokens, return_dict=False)[0]
        latents = latent_mean[index] + latent_std[index] * torch.randn(
            latent_mean[index].shape, generator=generator
        )
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, hidden).sample
        target = _target(noise_scheduler, latents, noise, timesteps)
        weights = _min_snr_weights(noise_scheduler, timesteps, prediction_type=prediction_type)
        loss = (weights * ((prediction - target) ** 2).mean(dim=(1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        _log_every(step, steps, start, losses, name)
    unet.eval()
    text_encoder.eval()
    return losses


def _target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    from ..training.loop import training_target

    return training_target(noise_scheduler, latents, noise, timesteps, noise_scheduler.config.prediction_type)


def _save_text_to_image(unet, text_encoder, out_dir: Path, prediction_type: str) -> None:
    unet.save_pretrained(out_dir / "unet")
    text_encoder.save_pretrained(out_dir / "text_encoder")
    _scheduler(prediction_type).save_pretrained(out_dir / "scheduler")


def train_base(images: torch.Tensor, scenes: list, cfg: WorldTrainConfig, out_dir: Path) -> dict:
    """Stage ``base``: tokenizer, text encoder and text-to-image UNet from scratch, ε-prediction."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(out_dir / "tokenizer")
    stats = _latent_stats(images, out_dir / "vae")
    torch.manual_seed(cfg.seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=64,
        )
    )
    unet = UNet2DConditionModel(**_unet_config())
    losses = _fit_text_to_image(
        unet,
        text_encoder,
        tokenizer,
        stats,
        scenes,
        steps=cfg.base_steps,
        batch=cfg.base_batch,
        lr=cfg.base_lr,
        seed=cfg.seed + 3,
        prediction_type="epsilon",
        name="base",
    )
    _save_text_to_image(unet, text_encoder, out_dir, "epsilon")
    index_file = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (out_dir / "model_index.json").write_text(json.dumps(index_file, indent=2))
    return {"steps": cfg.base_steps, "final_loss": sum(losses[-50:]) / len(losses[-50:])}


def train_base_v(images: torch.Tensor, scenes: list, cfg: WorldTrainConfig, out_dir: Path) -> dict:
    """Stage ``base_v``: fine-tune the ε base to v-prediction (as Stable Diffusion 2 did from its ε model).

    Why: at high noise an ε model's estimate of the clean latent is its ε error times √((1−ᾱ)/ᾱ) (≈ 14 at
    t = 990), so a small model trained for minutes predicts x₀ worse than the data mean there and samples
    noise; a v model predicts x₀ directly at high noise. The branches trained on a v base learn to copy the
    kept region from the first sampling step.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer")
    stats = _latent_stats(images, out_dir / "vae")
    unet = UNet2DConditionModel.from_pretrained(out_dir / "unet", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(out_dir / "text_encoder", torch_dtype=torch.float32)
    losses = _fit_text_to_image(
        unet,
        text_encoder,
        tokenizer,
        stats,
        scenes,
        steps=cfg.base_v_steps,
        batch=cfg.base_batch,
        lr=cfg.base_v_lr,
        seed=cfg.seed + 13,
        prediction_type="v_prediction",
        name="base_v",
    )
    _save_text_to_image(unet, text_encoder, out_dir, "v_prediction")
    return {"steps": cfg.base_v_steps, "final_loss": sum(losses[-50:]) / len(losses[-50:])}


# -- stages 4–6: branches -------------------------------------------------------------------------------


def _branch_config(cfg: WorldTrainConfig, base_dir: Path, shards: Path, out_dir: Path, steps: int):
    from ..training.config import make_config

    return make_config(
        {
            "pretrained_model_name_or_path": str(base_dir),
            "output_dir": str(out_dir),
            "train_shards": str(shards),
            "resolution": SIZE,
            "shuffle_buffer": 500,
            "mask": {"mode": "mix", "p_brush": 0.5},
            "caption_dropout": 0.1,
            "train_batch_size": cfg.branch_batch,
            "max_train_steps": steps,
            "learning_rate": cfg.branch_lr,
            "lr_scheduler": "constant_with_warmup",
            "lr_warmup_steps": 20,
            "mixed_precision": "no",
            "seed": cfg.seed,
            "checkpointing_steps": steps,
            "checkpoints_total_limit": 1,
            "validation_steps": 10**9,
            "report_to": "none",
            "logging_steps": 50,
        }
    )


def _stream(config, cfg: WorldTrainConfig) -> HolePromptStream:
    from ..training.data import build_train_dataset

    return HolePromptStream(build_train_dataset(config, 0, 1, cfg.seed), cfg.seed, seed=cfg.seed)


def train_brushnet(
    cfg: WorldTrainConfig, base_dir: Path, shards: Path, work: Path, more: bool = False
) -> dict:
    """Stage ``brushnet`` (from ``from_unet``, ``branch_lr``) or ``brushnet_more`` (continues from it with
    ``tap_lr``: the zero-initialised taps barely moved in 400 steps at 3e-4)."""
    from ..training.loop import train

    if more:
        config = _branch_config(cfg, base_dir, shards, work / "brushnet_more_run", cfg.brushnet_more_steps)
        config.brushnet_model_name_or_path = str(work / "brushnet_run" / "brushnet")
        config.learning_rate = cfg.tap_lr
        config.seed = cfg.seed + 1
    else:
        config = _branch_config(cfg, base_dir, shards, work / "brushnet_run", cfg.brushnet_steps)
    result = train(config, dataset=_stream(config, cfg))
    return {
        "steps": result.global_step,
        "final_loss": sum(result.losses[-50:]) / len(result.losses[-50:]),
        "model_dir": str(result.final_model_dir),
    }


def _branch_loop(
    cfg: WorldTrainConfig, base_dir: Path, shards: Path, work: Path, kind: str, steps: int
) -> dict:
    """Train the 9-channel UNet (``kind="inpaint"``) or the ControlNet (``"controlnet"``) on the same data."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..training.data import collate

    config = _branch_config(cfg, base_dir, shards, work / f"{kind}_run", steps)
    stream = _stream(config, cfg)
    loader = DataLoader(stream, batch_size=cfg.branch_batch, collate_fn=collate, drop_last=True)
    vae = AutoencoderKL.from_pretrained(base_dir / "vae").eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(base_dir / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base_dir / "text_encoder").eval().requires_grad_(False)
    base_unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    noise_scheduler = DDPMScheduler.from_pretrained(base_dir / "scheduler")
    torch.manual_seed(cfg.seed + 4)
    if kind == "inpaint":
        model = UNet2DConditionModel.from_config({**base_unet.config, "in_channels": 9})
        state = base_unet.state_dict()
        weight = torch.zeros_like(model.conv_in.weight)
        weight[:, :4] = state["conv_in.weight"]
        state["conv_in.weight"] = weight
        model.load_state_dict(state)
        frozen_unet = None
    else:
        model = ControlNetModel.from_unet(base_unet, conditioning_embedding_out_channels=(16, 32, 64))
        frozen_unet = base_unet.eval().requires_grad_(False)
    model.train()
    lr = cfg.branch_lr if kind == "inpaint" else cfg.tap_lr  # zero-initialised taps need the larger rate
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(cfg.seed + 5)
    scaling = vae.config.scaling_factor
    losses: list[float] = []
    start = time.time()
    step, epoch = 0, 0
    while step < steps:
        stream.set_epoch(epoch)
        for batch in loader:
            pixels, hole = batch["pixel_values"], batch["mask"]
            captions = ["" if torch.rand((), generator=generator) < 0.1 else c for c in batch["caption"]]
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample(generator) * scaling
                tokens = tokenizer(
                    captions,
                    padding="max_length",
                    max_length=TEXT_MAX_LENGTH,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
                hidden = text_encoder(tokens, return_dict=False)[0]
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator
            )
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if kind == "inpaint":
                with torch.no_grad():
                    masked = pixels * (hole < 0.5)  # diffusers' inpainting pipelines: hole pixels = 0
                    masked_latents = vae.encode(masked).latent_dist.sample(generator) * scaling
                    small_hole = F.interpolate(hole, size=latents.shape[-2:], mode="nearest")
                prediction = model(
                    torch.cat([noisy, small_hole, masked_latents], 1), timesteps, hidden
                ).sample
            else:
                control = torch.where(hole > 0.5, torch.full_like(pixels, -1.0), (pixels + 1) / 2)
                down, mid = model(noisy, timesteps, hidden, controlnet_cond=control, return_dict=False)
                prediction = frozen_unet(
                    noisy,
                    timesteps,
                    hidden,
                    down_block_additional_residuals=down,
                    mid_block_additional_residual=mid,
                ).sample
            loss = F.mse_loss(prediction, _target(noise_scheduler, latents, noise, timesteps))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            warmup = min(1.0, (step + 1) / 20)
            for group in optimizer.param_groups:
                group["lr"] = lr * warmup
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            _log_every(step, steps, start, losses, kind)
            if step >= steps:
                break
        epoch += 1
    model.eval()
    out = work / kind
    if kind == "inpaint":
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(base_dir, out, ignore=shutil.ignore_patterns("unet"))
        model.save_pretrained(out / "unet")
        index = json.loads((out / "model_index.json").read_text())
        index["_class_name"] = "StableDiffusionInpaintPipeline"
        (out / "model_index.json").write_text(json.dumps(index, indent=2))
    else:
        model.save_pretrained(out)
    return {"steps": step, "final_loss": sum(losses[-50:]) / len(losses[-50:]), "model_dir": str(out)}


# -- orchestration --------------------------------------------------------------------------------------


def train_all(work: str | os.PathLike, cfg: WorldTrainConfig, stages: list[str] | None = None) -> dict:
    """Run the stages (all by default) into ``work``; return the record (per-stage seconds and figures)."""
    from ..data.shapes_writers import write_training_shards

    torch.set_num_threads(cfg.threads)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    record_path = work / "training_record.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"stages": {}}
    record["config"] = cfg.__dict__
    record["hardware"] = {
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    base_dir, shards = work / "base", work / "shards"
    stages = stages or list(DEFAULT_STAGES)
    images = scenes = None
    done_here: set[str] = set()
    for stage in stages:
        start = time.time()
        logger.info("stage %s", stage)
        if stage == "data":
            write_training_shards(shards, cfg.scenes, scenes_per_shard=1000, size=SIZE, seed=cfg.seed)
            info = {"scenes": cfg.scenes}
        elif stage in ("vae", "base", "base_v", "decoder"):
            if images is None:
                images, scenes = _load_scene_images(cfg.scenes, cfg.seed)
            if stage == "vae":
                info = train_vae(images, cfg, base_dir)
            elif stage == "base":
                info = train_base(images, scenes, cfg, base_dir)
            elif stage == "base_v":
                info = train_base_v(images, scenes, cfg, base_dir)
            else:
                info = train_decoder(images, cfg, base_dir)
        elif stage in ("brushnet", "brushnet_more"):
            info = train_brushnet(cfg, base_dir, shards, work, more=stage == "brushnet_more")
        elif stage in ("inpaint", "controlnet"):
            steps = cfg.inpaint_steps if stage == "inpaint" else cfg.controlnet_steps
            info = _branch_loop(cfg, base_dir, shards, work, stage, steps)
        else:
            raise ValueError(f"unknown stage {stage!r}")
        info["seconds"] = round(time.time() - start, 1)
        if record_path.exists():  # another process may have run other stages meanwhile: keep theirs
            mine = {key: record["stages"][key] for key in done_here}
            record["stages"] = {**json.loads(record_path.read_text())["stages"], **mine}
        key, round_ = stage, 1
        while key in record["stages"] and key in done_here | ({stage} if stage == "decoder" else set()):
            round_ += 1
            key = f"{stage}#{round_}"
        done_here.add(key)
        record["stages"][key] = info
        record["total_seconds"] = round(sum(s["seconds"] for s in record["stages"].values()), 1)
        record_path.write_text(json.dumps(record, indent=2))
        logger.info("stage %s done: %s", stage, info)
    return record


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _halve(folder: Path) -> None:
    """Store a folder's ``*.safetensors`` weights in float16 (loaders cast them back to the dtype asked for)."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})


def export(work: str | os.PathLike, dest: str | os.PathLike, half: bool = True) -> Path:
    """Copy the trained folders that exist into ``dest`` (``base/``, ``brushnet/``, ``inpaint/``,
    ``controlnet/``, ``training_record.json``), without run logs or checkpoints; other files in ``dest``
    (the mini-BrushBench results) are kept. With ``half`` the UNets, branch and ControlNet are stored in
    float16 (VAE and text encoder stay float32)."""
    work, dest = Path(work), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    sources = {
        "base": work / "base",
        "brushnet": work / "brushnet_more_run" / "brushnet"
        if (work / "brushnet_more_run" / "brushnet").is_dir()
        else work / "brushnet_run" / "brushnet",
        "inpaint": work / "inpaint",
        "controlnet": work / "controlnet",
    }
    for name, source in sources.items():
        if not source.is_dir():
            continue
        tmp = dest / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("vae") if name == "inpaint" else None)
        if name == "inpaint":
            shutil.copytree(work / "base" / "vae", tmp / "vae")  # the final (decoder-tuned) VAE
        if half:
            for sub in ("unet",) if name in ("base", "inpaint") else ("",):
                _halve(tmp / sub)
        if (dest / name).exists():
            shutil.rmtree(dest / name)
        os.replace(tmp, dest / name)
    shutil.copy(work / "training_record.json", dest / "training_record.json")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m brushnet.demo.train_world",
        description="Train the shapes-world demo models from scratch.",
    )
    parser.add_argument("--work", required=True, help="Working folder (shards, runs, trained folders).")
    parser.add_argument(
        "--export", help="Copy the finished models here (e.g. src/brushnet/assets/demo_world)."
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        help=f"Run only these stages (of: {' '.join(dict.fromkeys(DEFAULT_STAGES))}).",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="A few steps of everything (checks the code path)."
    )
    for name, value in WorldTrainConfig().__dict__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = WorldTrainConfig()
    if args.smoke:
        cfg = WorldTrainConfig(
            scenes=64,
            vae_steps=3,
            base_steps=3,
            base_v_steps=3,
            brushnet_steps=2,
            brushnet_more_steps=2,
            inpaint_steps=2,
            controlnet_steps=2,
            decoder_steps=3,
            vae_batch=4,
            base_batch=4,
            branch_batch=4,
        )
    for name in cfg.__dict__:
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    start = time.time()
    record = train_all(args.work, cfg, args.stages)
    logger.info("all stages: %.1f s (record %s)", time.time() - start, record.get("total_seconds"))
    if args.export:
        export(args.work, args.export)
        logger.info("exported to %s", args.export)
    return 0


if __name__ == "__main__":
    sys.exit(main())
