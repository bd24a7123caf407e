"""The recipe of the demo world: every size, step count and rate of a full run, and the run's folders.

The defaults are the shipped models' recipe; ``--smoke`` shrinks every stage to a few steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Run", "WorldTrainConfig", "smoke_config"]


@dataclass
class WorldTrainConfig:
    """Sizes and step counts of a full run (defaults: the shipped models). Every field is a flag of
    ``train_world.py`` (``--base-steps 3000``; tuples as ``--unet-channels 32,64,96``)."""

    scenes: int = 6000
    seed: int = 0
    held_out_scenes: int = 256  # eval-split scenes the autoencoder stages measure reconstruction on
    # VAE (4× downsampling, 4 latent channels)
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_layers: int = 1
    vae_steps: int = 600
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-4
    decoder_steps: int = 3000  # the shipped models: two rounds of 1500
    decoder_lr: float = 5e-4
    # text encoder + text-to-image UNet
    unet_channels: tuple[int, ...] = (32, 64, 96)
    unet_layers: int = 1
    text_width: int = 64
    zero_terminal_snr: bool = False
    base_steps: int = 1500
    base_batch: int = 16
    base_lr: float = 3e-4
    base_v_steps: int = 1200
    base_v_lr: float = 2e-4
    min_snr_gamma: float = 5.0
    # the three inpainting models (branch, 9-channel UNet, ControlNet): same data, batch and schedule
    brushnet_steps: int = 400
    brushnet_more_steps: int = 500
    inpaint_steps: int = 400
    controlnet_steps: int = 400
    branch_batch: int = 16
    branch_lr: float = 3e-4
    tap_lr: float = 1e-3  # brushnet_more and the ControlNet: zero-initialised taps need a larger rate
    branch_lr_scheduler: str = "constant_with_warmup"
    branch_ema_decay: float = 0.0  # 0: no EMA
    hole_prompt_probability: float = 0.5
    # PowerPaint v2-style branch and task words (stage ``powerpaint``), warm-started from the BrushNet branch
    powerpaint_steps: int = 1500


def smoke_config() -> WorldTrainConfig:
    """A few steps of every stage on 64 scenes: checks the code path in seconds."""
    return WorldTrainConfig(
        scenes=64,
        held_out_scenes=4,
        vae_steps=3,
        vae_batch=4,
        decoder_steps=3,
        base_steps=3,
        base_v_steps=3,
        base_batch=4,
        brushnet_steps=2,
        brushnet_more_steps=2,
        inpaint_steps=2,
        controlnet_steps=2,
        branch_batch=4,
        powerpaint_steps=2,
    )


@dataclass
class Run:
    """One training run: its recipe and its working folder (the scenes are rendered once, on first use)."""

    cfg: WorldTrainConfig
    work: Path
    _scenes: tuple | None = dataclasses.field(default=None, repr=False)

    @property
    def base_dir(self) -> Path:
        """The text-to-image model being built (diffusers Stable Diffusion layout)."""
        return self.work / "base"

    @property
    def shards(self) -> Path:
        return self.work / "shards"

    def checkpoint(self, stage: str) -> Path:
        """Where the stage's fit state goes (a rerun of the stage resumes from it)."""
        return self.work / "checkpoints" / f"{stage}.pt"

    def scenes(self) -> tuple:
        """``(uint8 (N, 3, 128, 128) images, scenes)`` of the run's training scenes."""
        from world_data import load_scene_images

        if self._scenes is None:
            self._scenes = load_scene_images(self.cfg.scenes, self.cfg.seed)
        return self._scenes
