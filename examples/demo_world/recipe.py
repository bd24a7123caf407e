"""The recipe of the demo world: every size, step count and rate of a full run, and the run's folders.

The defaults are the shipped models' recipe; ``--smoke`` shrinks every stage to a few steps.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NEEDS", "PRODUCTS", "Run", "WorldTrainConfig", "check_config", "missing_needs", "smoke_config"]


@dataclass
class WorldTrainConfig:
    """Sizes, step counts and rates of a full run (defaults: the shipped models). Every field is a flag of
    ``train_world.py`` (``--base-steps 3000``; tuples as ``--unet-channels 32,64,96``)."""

    scenes: int = 20000
    seed: int = 0
    held_out_scenes: int = 256  # eval-split scenes the autoencoder stages measure reconstruction on
    # VAE (4× downsampling, 4 latent channels): trained on whole 128 px scenes (its GroupNorms see what they
    # will see at inference; 64 px crops cost 3 dB at 128 px)
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_layers: int = 1
    vae_steps: int = 6000
    vae_batch: int = 8
    vae_crop: int = 128
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-4
    decoder_steps: int = 3000
    decoder_lr: float = 3e-4
    # stage decoder_local (recipe v4.1; none before): more decoder steps, this share of the samples decoded with
    # a box of foreign latent cells and scored outside it, so kept pixels do not depend on the hole (autoencoder.py)
    decoder_local_steps: int = 3000
    decoder_local_share: float = 0.5
    decoder_local_noise: float = 0.2  # each sample's latent + N(0, (u·this·std)²), u ~ U(0, 1)
    # text encoder + text-to-image UNet: v-prediction, zero terminal SNR (Lin et al. 2024)
    unet_channels: tuple[int, ...] = (32, 64, 96)
    unet_layers: int = 1
    text_width: int = 64
    zero_terminal_snr: bool = True
    base_steps: int = 30000
    base_batch: int = 16
    base_lr: float = 3e-4
    base_warmup_steps: int = 100
    base_ema_decay: float = 0.999  # 0: no EMA
    min_snr_gamma: float = 5.0
    # "train": the text encoder is trained with the UNet (the shipped bases); "frozen": its token embeddings are
    # drawn N(0, 1) and the whole encoder is kept as initialised, so no two words can share a state (the shipped
    # encoders keep triangle, star and cross at cosine 0.99: docs/demo.md, "Why the base draws blobs")
    base_text_encoder: str = "train"
    # the three inpainting models (branch, 9-channel UNet, ControlNet): the same samples in the same order,
    # the same steps, batch, learning rate, schedule and EMA
    branch_steps: int = 4000
    branch_batch: int = 32  # recipe v4 (16 in v3); trained on a GPU, see docs/demo.md
    branch_lr: float = 1e-3
    branch_lr_scheduler: str = "cosine"
    branch_ema_decay: float = 0.999  # 0: no EMA
    hole_prompt_probability: float = 0.75
    object_holes: float = 0.5  # share of samples whose hole is replaced by one around an object
    # λ of the kept region's caption-invariance term for all three (brushnet.training's kept_invariance_weight:
    # λ × the kept cells' mean ‖c − u‖², which guidance multiplies); 0: the paper's loss (recipe v4.1). 16 = (5 − 1)²
    # weighs it as guidance 5 does; docs/demo.md, "The kept region's caption-invariance term"
    kept_invariance: float = 0.0
    # rings of latent cells around the hole left out of that term (brushnet.training's kept_invariance_margin); 1
    # halved the term's shape cost in a fine-tune (docs/demo.md). λ = 16 with margin 1 from the start (GPU,
    # 2026-11-28) met the kept-region target but not the shape target, so the shipped models keep λ = 0
    kept_invariance_margin: int = 0
    # DataLoader worker processes of the three (0: in the training process). Shards are dealt out to the
    # workers, so this changes the order of the samples (the same order for all three). PowerPaint's stage on a GPU
    # makes its samples in this many workers too (its samples do not depend on it)
    loader_workers: int = 3
    # PowerPaint v2-style branch and task words (stage ``powerpaint``), warm-started from the BrushNet branch
    powerpaint_steps: int = 1500
    # stage ``finetune`` (recipe v4.2; none before): the three inpainting models trained further, each for the same
    # steps on the recipe's stream of the first finetune_scenes training scenes (all of them if fewer), at a constant
    # rate without warm-up or EMA: the branch with the kept region's caption-invariance term (λ, as kept_invariance)
    # and the anchor term (μ: the hole's caption pull held to the branch's before the fine-tune), the 9-channel UNet
    # and the ControlNet with the plain loss. λ = 64, μ = 4 took BrushNet's raw kept region to within 1 dB of BLD's
    # (docs/demo.md, "The anchor term")
    finetune_scenes: int = 4000
    finetune_steps: int = 1200
    finetune_batch: int = 16
    finetune_lr: float = 1e-4
    finetune_kept_invariance: float = 64.0
    finetune_anchor: float = 4.0


BASE_TEXT_ENCODERS = ("train", "frozen")

# fields that may be 0 (every other number must be positive): the seed, warm-up, EMA decays (0 = none), the KL
# weight, loader workers and the shares
_MAY_BE_ZERO = {
    "seed",
    "base_warmup_steps",
    "base_ema_decay",
    "branch_ema_decay",
    "vae_kl_weight",
    "loader_workers",
    "decoder_local_noise",
    "kept_invariance",
    "kept_invariance_margin",
    "finetune_kept_invariance",
    "finetune_anchor",
}
_SHARES = {"hole_prompt_probability", "object_holes", "decoder_local_share"}
_BELOW_ONE = {"base_ema_decay", "branch_ema_decay"}


def check_config(cfg: WorldTrainConfig) -> None:
    """``ValueError`` naming the first field out of range (a count or rate that is not positive, a share outside
    [0, 1], an EMA decay of 1 or more), so a bad flag fails before any stage starts."""
    if cfg.base_text_encoder not in BASE_TEXT_ENCODERS:
        raise ValueError(
            f"--base-text-encoder must be one of {', '.join(BASE_TEXT_ENCODERS)}, got {cfg.base_text_encoder!r}"
        )
    for field in dataclasses.fields(cfg):
        name, value = field.name, getattr(cfg, field.name)
        if isinstance(value, bool) or not isinstance(value, int | float | tuple):
            continue
        flag = "--" + name.replace("_", "-")
        zero_ok = name in _MAY_BE_ZERO or name in _SHARES
        if any(v < 0 or (v == 0 and not zero_ok) for v in (value if isinstance(value, tuple) else (value,))):
            raise ValueError(f"{flag} must be {'non-negative' if zero_ok else 'positive'}, got {value}")
        if name in _SHARES and value > 1:
            raise ValueError(f"{flag} is a share: at most 1, got {value}")
        if name in _BELOW_ONE and value >= 1:
            raise ValueError(f"{flag} must be below 1, got {value}")


def smoke_config() -> WorldTrainConfig:
    """A few steps of every stage on 64 scenes: checks the code path in seconds."""
    return WorldTrainConfig(
        scenes=64,
        held_out_scenes=4,
        vae_steps=3,
        vae_batch=2,
        decoder_steps=3,
        decoder_local_steps=3,
        base_steps=3,
        base_batch=4,
        branch_steps=2,
        branch_batch=4,
        loader_workers=0,
        powerpaint_steps=2,
        finetune_scenes=8,
        finetune_steps=2,
        finetune_batch=2,
    )


@dataclass
class Run:
    """One training run: its recipe, its working folder (the scenes are rendered once, on first use) and the
    device its stages train on (``"cpu"``, ``"cuda"``: where, not what, so not part of the recipe)."""

    cfg: WorldTrainConfig
    work: Path
    device: str = "cpu"
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
        """``(uint8 (N, 3, 128, 128) images, scenes)`` of the run's training scenes, rendered on every core this
        process may use (the same bytes on any number)."""
        from world_data import load_scene_images

        if self._scenes is None:
            self._scenes = load_scene_images(self.cfg.scenes, self.cfg.seed, len(os.sched_getaffinity(0)))
        return self._scenes


PRODUCTS: dict[str, str] = {
    "data": "shards",
    "vae": "base/vae/config.json",
    "base": "base/model_index.json",
    "brushnet": "brushnet_run/brushnet/config.json",
    "inpaint": "inpaint/unet/config.json",
    "controlnet": "controlnet/config.json",
}
"""What shows, in a run folder, that a stage another stage reads from is done: the file it writes last (a folder
for ``data``, with at least one shard). The base stage's ``base/`` folder exists from the VAE stage on, so only its
``model_index.json`` says the base is there."""

NEEDS: dict[str, tuple[str, ...]] = {
    "data": (),
    "vae": (),  # renders its own scenes
    "base": ("vae",),  # encodes the scenes with the run's VAE
    "decoder": ("vae",),
    "decoder_local": ("vae",),
    "brushnet": ("data", "base"),
    "inpaint": ("data", "base"),
    "controlnet": ("data", "base"),
    "powerpaint": ("base",),  # renders its own samples; starts from the branch where there is one
    "finetune": ("base", "brushnet", "inpaint", "controlnet"),  # writes its own shards
}
"""The stages whose products each stage reads (:data:`PRODUCTS`)."""


def _done(work: Path, stage: str) -> bool:
    product = Path(work) / PRODUCTS[stage]
    if stage == "data":
        return product.is_dir() and any(product.glob("*.tar"))
    return product.is_file()


def missing_needs(work: str | os.PathLike, stage: str, stages_before=()) -> list[str]:
    """The stages ``stage`` reads from (:data:`NEEDS`) whose products are neither in the run folder ``work`` nor
    made by ``stages_before`` (the stages run before it in the same request), in :data:`NEEDS`' order."""
    return [need for need in NEEDS[stage] if need not in stages_before and not _done(Path(work), need)]
