"""The BrushNet training loop (Ju et al., ECCV 2024, arXiv:2403.06976, §3 and §4.1).

Only the branch trains. VAE, UNet and text encoder(s) are frozen (``requires_grad=False``, eval mode) and
cast to the mixed-precision dtype (see :func:`freeze`); the branch stays float32. SD1.5-style and SDXL bases
train alike; what differs (text encoding, SDXL's added conditions c_add) is in :mod:`brushnet.training.family`.
One step, per micro-batch:

    z₀      = E(x)·s                          latent of the image
    z_m     = E(x ⊙ (1−m) − m)·s                latent of the masked image (hole set to −1, black)
    k       = 1 − resize_nearest(m)            keep-mask at latent size
    z_t     = √ᾱ_t z₀ + √(1−ᾱ_t) ε              ε ~ N(0, I), t ~ U{0, …, T−1}
    ε̂       = UNet(z_t, t, c, c_add; BrushNet(z_t, t, [z_m, k], c_add))
    loss    = ‖ε̂ − ε‖²  (or v = √ᾱ_t ε − √(1−ᾱ_t) z₀ with v-prediction), mean over the whole latent

With ``kept_invariance_weight`` λ > 0 (not in the paper; off by default) the UNet also runs on the unconditional
half of guidance as the pipeline builds it (:meth:`~brushnet.training.family.SD15Family.unconditional`: what a
dropped caption becomes, ``caption_dropout_embeds`` below; by default the empty caption on SD1.5, zeros on SDXL) with
the same branch features (SD1.5; the SDXL branch reads the pooled text and runs
on both halves), ε̂_∅, and the loss gains λ · mean over the kept cells of ‖ε̂ − ε̂_∅‖², the kept
cells being those no hole pixel touches (the hole max-pooled to latent size). Classifier-free guidance adds
(w − 1)(ε̂ − ε̂_∅) to every latent cell, so whatever the caption changes in the kept region, guidance multiplies;
the term teaches the branch to make the kept region's prediction independent of the caption. It costs one more
UNet forward and backward per step and draws nothing from the generator (a run with it sees the same samples).

With ``guided_loss_weight`` γ > 0 (not in the paper; off by default) the loss gains γ · ‖ε̂_w − ε‖² over the whole
latent, where ε̂_w = ε̂_∅ + w (ε̂ − ε̂_∅) is the guided prediction at ``guided_loss_scale`` w (the same UNet pass on
the empty caption as above, shared when both terms are on): the branch is trained for what sampling with guidance
asks of it, in the hole as on the kept region, instead of only for the prediction with the caption. Measured on
the demo world it does not help: the cheapest way to make the guided prediction right is to shrink ε̂ − ε̂_∅, so
the branch learns to undo the guidance and the hole follows the prompt less (docs/training.md). An option for
experiments.

With ``hole_pull_anchor_weight`` μ > 0 (not in the paper; off by default) the loss gains μ · mean over the hole's
cells (those a hole pixel touches) of ‖(ε̂ − ε̂_∅) − (ε̂ᴬ − ε̂ᴬ_∅)‖², where ε̂ᴬ and ε̂ᴬ_∅ are the same two predictions
with a frozen copy of the branch as it was at the start of the run (the anchor). ε̂ − ε̂_∅ is the caption's pull,
which guidance multiplies; in the hole it is what makes the hole follow the prompt. The term holds it there to the
starting branch's while the kept-invariance term turns it down on the kept cells: on the demo world that term, and
the guided one, turned it down in the hole too (docs/demo.md). It costs one more branch pass and UNet pass per step,
without gradients, and draws nothing. Measured there in fine-tunes, it keeps the shape but slows the kept region's
gain as well: over 1200 steps λ = 64, μ = 4 came within 1 dB of BLD for a small shape loss (that branch is the demo's
shipped one since recipe v4.2), though no weight tried beat the preservation scale of 2.0 on both counts
(docs/demo.md, "The anchor term"). Untried on real SD models: an option, not a default.

With ``caption_dropout`` p > 0 each caption is dropped with probability p: it becomes ``""`` through the text
encoders (``caption_dropout_embeds`` ``encoded``, the original's way) or zero prompt and pooled embeds (``zeros``,
what SDXL inference sends as the unconditional half; the time ids stay the sample's). Unset, the base's convention
decides (:func:`~brushnet.training.family.dropped_caption_default`: zeros on SDXL, encoded on SD1.5).

All randomness of a step (caption dropout, VAE posterior samples, ε, t) comes from one seeded generator
per process whose state is checkpointed, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..devices import DeferredLosses, to_device
from ..errors import CheckpointError, first_line
from ..models.brushnet import BrushNetModel
from ..models.conditioning import brushnet_conditioning, encode_latents
from ..models.unet_injection import unet_forward_with_brushnet
from .checkpointing import (
    CONFIG_FILE,
    full_branch,
    list_checkpoints,
    load_checkpoint,
    publish_final_model,
    recover_interrupted_saves,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, check_resolution, save_config
from .data import build_train_dataloader, build_train_dataset, iterate_batches
from .family import dropped_caption_default, family_for_unet, zero_dropped_captions
from .validation import ValidationSet, run_validation
from .validation_loss import ValidationLoss, load_held_out_set

__all__ = [
    "TrainResult",
    "Components",
    "StepGenerator",
    "load_components",
    "freeze",
    "initial_branch",
    "training_target",
    "brushnet_training_loss",
    "kept_cells",
    "kept_difference",
    "train",
]

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """The frozen parts of the base model and its noise scheduler."""

    vae: torch.nn.Module
    unet: torch.nn.Module
    family: object  # a brushnet.training.family class instance (text side)
    noise_scheduler: object  # diffusers.DDPMScheduler
    scheduler_config: dict = field(default_factory=dict)

    @property
    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae, "unet": self.unet, **self.family.frozen_modules}


def load_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    allow_pickle: bool = False,
    vae: str | None = None,
) -> Components:
    """Load the base (SD1.5-style or SDXL) with :func:`brushnet.loading.load_base_components`, in float32, and a
    ``DDPMScheduler`` from its scheduler config (the training noise schedule). Pickle-based weights need
    ``allow_pickle``, as for inference. ``vae``: another VAE folder or hub id instead of the base's (refused in
    one line if its latent channels differ from the base's)."""
    from diffusers import AutoencoderKL, DDPMScheduler

    from ..loading import load_base_components, load_model

    parts = load_base_components(pretrained_model_name_or_path, revision=revision, allow_pickle=allow_pickle)
    if vae is not None:
        replacement = load_model(AutoencoderKL, vae, "VAE", allow_pickle=allow_pickle)
        own, other = parts["vae"].config.latent_channels, replacement.config.latent_channels
        if own != other:
            raise CheckpointError(
                f"the VAE {vae} has {other} latent channels but the base's has {own}: it does not fit this base"
            )
        parts["vae"] = replacement
    family = family_for_unet(parts["unet"]).from_components(parts)
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    return Components(parts["vae"], parts["unet"], family, noise_scheduler, dict(noise_scheduler.config))


def initial_branch(
    components: Components, brushnet_model_name_or_path: str | None = None, allow_pickle: bool = False
) -> BrushNetModel:
    """The branch a run starts from: a BrushNet checkpoint (loaded by :func:`brushnet.loading.load_brushnet`:
    safetensors unless ``allow_pickle``, and refused if it does not fit the base), or
    ``BrushNetModel.from_unet`` of the base UNet.

    The branch's conditioning is the masked-image latent plus the keep-mask, so it has the VAE's latent
    channels + 1 input channels whatever the base (4 + 1 for Stable Diffusion).

    Raises:
        ValueError: the VAE's latent channels differ from the UNet's input channels, or the checkpoint was
            made for a base with other latent channels.
    """
    latent_channels = components.vae.config.latent_channels
    if latent_channels != components.unet.config.in_channels:
        raise ValueError(
            f"the base's VAE has {latent_channels} latent channels but its UNet takes "
            f"{components.unet.config.in_channels}: not a text-to-image base (an inpainting UNet?)"
        )
    if brushnet_model_name_or_path is None:
        return BrushNetModel.from_unet(components.unet, conditioning_channels=latent_channels + 1)
    from ..loading import load_brushnet

    brushnet = load_brushnet(
        brushnet_model_name_or_path, allow_pickle=allow_pickle, base_config=components.unet.config
    )
    if brushnet.config.conditioning_channels != latent_channels + 1:
        raise ValueError(
            f"{brushnet_model_name_or_path} takes {brushnet.config.conditioning_channels} conditioning channels; "
            f"this base needs {latent_channels + 1} (latent channels + mask)"
        )
    return brushnet


class StepGenerator:
    """A seeded CPU ``torch.Generator`` for a step's randomness, one per process, with its state as a dict."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


class SkipTally:
    """The malformed samples a run skipped, by reason, across resumes.

    The data stream's counter (:class:`brushnet.data.brushdata.SkipCounter`) counts what this process read. A
    resumed run re-reads the consumed part of its epoch (and counts its skips again) but not the epochs before,
    so a checkpoint keeps the counts as they were when its epoch began (:attr:`before_epoch`), and the resumed
    run adds them to what it counts."""

    def __init__(self, counter) -> None:
        self.counter = counter
        self.offset: dict[str, int] = {}
        self.before_epoch: dict[str, int] = {}

    def counts(self) -> dict[str, int]:
        """Every reason's count for the whole run (zeros included)."""
        read = self.counter.as_dict() if self.counter is not None else {}
        return {reason: read.get(reason, 0) + self.offset.get(reason, 0) for reason in {*read, *self.offset}}

    def epoch_ended(self) -> None:
        self.before_epoch = self.counts()

    def restore(self, saved, process_index: int) -> None:
        """Take this process's counts from a checkpoint's ``skipped_before_epoch`` (absent in older ones)."""
        if isinstance(saved, list) and process_index < len(saved) and isinstance(saved[process_index], dict):
            counts = saved[process_index]
            self.offset = {k: v for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool)}
            self.before_epoch = dict(self.offset)


def check_resume_fits_base(resume_path: Path, unet_config) -> None:
    """A one-line :class:`CheckpointError` when the checkpoint's branch (its ``brushnet/config.json``) does not fit
    this run's base, before any state is read: accelerate's own error was torch's "Error(s) in loading state_dict
    for BrushNetModel:", which named neither what differs nor the family."""
    import json

    from ..loading import check_brushnet_fits_base

    config_file = resume_path / "brushnet" / "config.json"
    try:
        branch_config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return  # a checkpoint without its exported branch: accelerate's own checks apply
    try:
        check_brushnet_fits_base(branch_config, unet_config)
    except CheckpointError as exc:
        raise CheckpointError(
            f"cannot resume from {resume_path} with this --pretrained_model_name_or_path: {exc}"
        ) from None


def run_seed(config: TrainConfig, resume_path: Path | None) -> int:
    """The run's seed: ``config.seed``; unset, the seed of the run a resume continues (its checkpoint's
    ``train_config.yaml``: the data order, masks and crops of the interrupted run follow from it), else a new
    one. An explicit seed other than the checkpoint's is a warning: the resumed run then reads other data than
    the interrupted one would have."""
    from .config import ConfigError, load_config_file

    recorded = None
    if resume_path is not None:
        try:
            recorded = load_config_file(resume_path / CONFIG_FILE).get("seed")
        except ConfigError:  # an unreadable record: no seed to continue with
            recorded = None
        if not isinstance(recorded, int) or isinstance(recorded, bool):
            recorded = None
    if config.seed is None:
        if recorded is not None:
            logger.info("seed %d: the seed of the run %s continues", recorded, resume_path)
            return recorded
        return random.SystemRandom().randrange(2**31)
    if recorded is not None and recorded != config.seed:
        logger.warning(
            "--seed %d differs from the seed %d of the run %s continues: the resumed run reads its data in another "
            "order, with other masks and crops, than the interrupted one (drop --seed to continue it as it was)",
            config.seed,
            recorded,
            resume_path,
        )
    return config.seed


def _resumed_record(resume_path: Path | None) -> dict | None:
    """The resolved config a resume continues (its checkpoint's ``train_config.yaml``), or None when nothing is
    resumed or the record is unreadable."""
    from .config import ConfigError, load_config_file

    if resume_path is None:
        return None
    try:
        return load_config_file(resume_path / CONFIG_FILE)
    except ConfigError:
        return None


def resumed_caption_dropout_embeds(resume_path: Path | None) -> str | None:
    """What a dropped caption became in the run a resume continues: its record's ``caption_dropout_embeds``, or
    ``"encoded"`` for a run recorded before the option existed (every dropped caption was the encoded ``""``);
    None when nothing is resumed or the record is unreadable (the base's convention then decides)."""
    recorded = _resumed_record(resume_path)
    value = None if recorded is None else recorded.get("caption_dropout_embeds", "encoded")
    return value if value in ("encoded", "zeros") else None


def resumed_unconditional_embeds(resume_path: Path | None, family) -> str | None:
    """The guidance terms' unconditional half in the run a resume continues: its record's ``unconditional_embeds``,
    or, for a run recorded before that setting existed (2026-11-29), the family's fixed half it trained them on
    (SD1.5 the encoded ``""``, SDXL zeros); None when nothing is resumed or the record is unreadable."""
    recorded = _resumed_record(resume_path)
    value = None if recorded is None else recorded.get("unconditional_embeds", family.dropped_caption)
    return value if value in ("encoded", "zeros") else None


def training_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet learns to predict: ``ε`` (``"epsilon"``) or ``v = √ᾱ_t ε − √(1−ᾱ_t) z₀`` (``"v_prediction"``,
    Salimans & Ho 2022, eq. 9 with their α_t = √ᾱ_t).

    Args:
        scheduler: the noise scheduler (its ``alphas_cumprod`` give ᾱ_t).
        latents: clean latents z₀, ``(B, C, h, w)``.
        noise: ε, same shape.
        timesteps: ``(B,)`` integer timesteps.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction_type {prediction_type!r} (epsilon or v_prediction)")


def draw_drops(count: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """``(count,)`` bool: which of ``count`` texts are dropped, each with ``probability`` (one draw per text from
    ``generator``; no draw at 0)."""
    if probability <= 0:
        return torch.zeros(count, dtype=torch.bool)
    return torch.rand(count, generator=generator) < probability


def drop_texts(texts: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Each text replaced by ``""`` with ``probability`` (:func:`draw_drops`)."""
    texts = list(texts)
    dropped = draw_drops(len(texts), probability, generator)
    return ["" if drop else text for text, drop in zip(texts, dropped.tolist())]


def branch_denoising_loss(
    brushnet: torch.nn.Module,
    components: Components,
    batch: dict,
    generator: torch.Generator,
    branch_hidden_states: torch.Tensor,
    unet_hidden_states: torch.Tensor,
    *,
    weight_dtype: torch.dtype,
    prediction_type: str,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    unconditional: tuple[torch.Tensor, dict[str, torch.Tensor] | None] | None = None,
    kept_invariance_weight: float = 0.0,
    kept_invariance_margin: int = 0,
    kept_invariance_min_timestep: int = 0,
    guided_loss_weight: float = 0.0,
    guided_loss_scale: float = 5.0,
    hole_pull_anchor_weight: float = 0.0,
    anchor: torch.nn.Module | None = None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The denoising loss of a branch on the frozen UNet for one micro-batch whose texts are encoded (shared by
    BrushNet and PowerPaint).

    Encodes the images (clean latents z₀ and the branch's conditioning, :mod:`brushnet.models.conditioning`),
    draws ``ε`` and ``t``, noises the latents, runs the branch (float32) and the UNet with its residuals
    (``weight_dtype``), and returns the MSE to the target. ``generator`` gives, in this order, the two VAE
    posterior samples, the noise and the timesteps.

    Args:
        brushnet: the branch (possibly wrapped by accelerate).
        components: the frozen parts, on the branch's device, in ``weight_dtype``.
        batch: ``{"pixel_values": (B, 3, H, W) in [-1, 1], "mask": (B, 1, H, W) 1 = hole, ...}``.
        generator: CPU generator (see above).
        branch_hidden_states, unet_hidden_states: the text the branch and the UNet read (the same tensor for
            BrushNet; PowerPaint's branch reads its task words).
        weight_dtype: dtype of the frozen parts.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        added_cond_kwargs: SDXL's added conditions, for the branch and the UNet alike.
        unconditional: ``(hidden states, added conditions)`` of guidance's unconditional half for the UNet; with
            ``kept_invariance_weight`` > 0 the UNet also runs on them, with the same branch features (a branch
            that reads no text: BrushNet on SD1.5; a branch that reads added conditions, SDXL's, runs on both
            halves), and the loss gains ``kept_invariance_weight`` × the mean over the
            kept latent cells of the squared difference of the two predictions (see the module docstring).
        kept_invariance_weight: λ of that term; 0 (the default) is the paper's loss.
        kept_invariance_margin: the term leaves out this many rings of latent cells around the cells a hole pixel
            touches (:func:`kept_cells`); 0: every kept cell counts.
        kept_invariance_min_timestep: only the samples noised to this timestep or above count in that term; 0:
            every sample.
        guided_loss_weight: γ of the guided term (module docstring): γ × the MSE of the guided prediction
            ``u + w (c − u)`` against the target; 0 (the default): off. Needs ``unconditional``, as the term above.
        guided_loss_scale: ``w`` of that guided prediction.
        hole_pull_anchor_weight: μ of the anchor term (module docstring): μ × the mean over the hole's latent cells
            of the squared difference between this branch's caption pull ``c − u`` and ``anchor``'s; 0 (the
            default): off. Needs ``unconditional`` and ``anchor``.
        anchor: the frozen branch the hole's pull is held to (the run's starting branch), run without gradients.
        timesteps: ``(B,)`` integer timesteps to noise to instead of drawing them (nothing is then drawn for them:
            the held-out validation loss, :mod:`brushnet.training.validation_loss`).

    Returns:
        Scalar float32: the MSE over the whole latent, plus the terms that are on.
    """
    vae, unet, scheduler = components.vae, components.unet, components.noise_scheduler
    device = next(unet.parameters()).device
    # in the VAE's dtype: an SDXL VAE kept in float32 under fp16 (force_upcast) reads the pixels unrounded
    pixel_values = to_device(batch["pixel_values"], device, vae.dtype)
    hole = to_device(batch["mask"], device, weight_dtype)
    with torch.no_grad():
        latents = encode_latents(vae, pixel_values, generator)
        brushnet_cond = brushnet_conditioning(vae, pixel_values, hole, generator).float()

    noise = to_device(torch.randn(latents.shape, generator=generator, dtype=torch.float32), device)
    if timesteps is None:
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
        )
    timesteps = to_device(timesteps, device)
    latents = latents.float()
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)

    with_empty = uses_empty_caption(kept_invariance_weight, guided_loss_weight, hole_pull_anchor_weight)
    if with_empty and unconditional is None:
        raise ValueError(
            "kept_invariance_weight, guided_loss_weight or hole_pull_anchor_weight > 0 needs the unconditional "
            "text encoding"
        )
    if hole_pull_anchor_weight > 0 and anchor is None:
        raise ValueError("hole_pull_anchor_weight > 0 needs the anchor branch")
    copies = 2 if with_empty else 1

    def repeat(tensor: torch.Tensor) -> torch.Tensor:  # no copy without the term
        tensor = tensor.to(weight_dtype)
        return tensor.repeat(copies, *([1] * (tensor.dim() - 1))) if copies > 1 else tensor

    hidden_states, added = unet_hidden_states, added_cond_kwargs
    if with_empty:  # one UNet pass over [caption; empty caption], the branch's features for both halves
        hidden_states = torch.cat([unet_hidden_states, unconditional[0].to(unet_hidden_states.dtype)])
        if added_cond_kwargs is not None:
            added = {k: torch.cat([v, unconditional[1][k].to(v.dtype)]) for k, v in added_cond_kwargs.items()}

    # a branch that reads the added conditions (SDXL's pooled text) gives other features for the unconditional
    # half, as it does when sampling with guidance: it runs on both halves; BrushNet on SD1.5 reads no text
    per_half = with_empty and added_cond_kwargs is not None

    def predict(branch: torch.nn.Module) -> torch.Tensor:  # the UNet with the features of this branch
        if per_half:
            down, mid, up = branch(
                torch.cat([noisy_latents, noisy_latents]),
                timesteps.repeat(2),
                encoder_hidden_states=torch.cat(
                    [branch_hidden_states, unconditional[0].to(branch_hidden_states.dtype)]
                ),
                brushnet_cond=torch.cat([brushnet_cond, brushnet_cond]),
                added_cond_kwargs=added,
                return_dict=False,
            )
            down, mid, up = (
                [d.to(weight_dtype) for d in down],
                mid.to(weight_dtype),
                [u.to(weight_dtype) for u in up],
            )
        else:
            down, mid, up = branch(
                noisy_latents,
                timesteps,
                encoder_hidden_states=branch_hidden_states,
                brushnet_cond=brushnet_cond,
                added_cond_kwargs=added_cond_kwargs,
                return_dict=False,
            )
            down, mid, up = [repeat(d) for d in down], repeat(mid), [repeat(u) for u in up]
        return unet_forward_with_brushnet(
            unet,
            repeat(noisy_latents),
            timesteps.repeat(copies),
            hidden_states,
            down,
            mid,
            up,
            added_cond_kwargs=added,
        ).float()

    prediction = predict(brushnet)
    model_pred = prediction[: latents.shape[0]]
    target = training_target(scheduler, latents, noise, timesteps, prediction_type)
    loss = F.mse_loss(model_pred, target.float(), reduction="mean")
    unconditional_pred = prediction[latents.shape[0] :]
    if kept_invariance_weight > 0:
        samples = timesteps >= kept_invariance_min_timestep if kept_invariance_min_timestep > 0 else None
        difference = kept_difference(
            model_pred, unconditional_pred, hole, margin=kept_invariance_margin, samples=samples
        )
        loss = loss + kept_invariance_weight * difference
    if guided_loss_weight > 0:
        guided = unconditional_pred + guided_loss_scale * (model_pred - unconditional_pred)
        loss = loss + guided_loss_weight * F.mse_loss(guided, target.float(), reduction="mean")
    if hole_pull_anchor_weight > 0:
        with torch.no_grad():
            anchored = predict(anchor)
        anchor_pull = anchored[: latents.shape[0]] - anchored[latents.shape[0] :]
        touched = ~kept_cells(hole, model_pred.shape[-2:])
        difference = cell_mean(model_pred - unconditional_pred, anchor_pull, touched)
        loss = loss + hole_pull_anchor_weight * difference
    return loss


def uses_empty_caption(*term_weights: float) -> bool:
    """Whether a step with these term weights (invariance, guided, anchor) also runs the UNet on the empty caption:
    every term beyond the paper's loss compares the predictions with the caption and without it."""
    return any(weight > 0 for weight in term_weights)


def kept_difference(
    conditional: torch.Tensor,
    unconditional: torch.Tensor,
    hole: torch.Tensor,
    margin: int = 0,
    samples: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the kept latent cells (:func:`kept_cells` of ``hole`` and ``margin``) of the squared difference of
    two ``(B, C, h, w)`` predictions, averaged over channels: the invariance term before its weight (0 when no cell
    is kept). ``samples``: a ``(B,)`` bool tensor; only the samples it marks count."""
    kept = kept_cells(hole, conditional.shape[-2:], margin)
    if samples is not None:
        kept = kept & samples.to(kept.device).view(-1, 1, 1, 1)
    return cell_mean(conditional, unconditional, kept)


def cell_mean(first: torch.Tensor, second: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Mean over the latent cells ``cells`` marks (a ``(B, 1, h, w)`` bool map) of the squared difference of two
    ``(B, C, h, w)`` tensors, averaged over channels; 0 when no cell is marked."""
    cells = cells.float()
    difference = (first.float() - second.float()).pow(2).mean(dim=1, keepdim=True)
    return (difference * cells).sum() / cells.sum().clamp(min=1.0)


def kept_cells(hole: torch.Tensor, latent_size, margin: int = 0) -> torch.Tensor:
    """``(B, 1, h, w)`` bool map of the latent cells no hole pixel touches: ``hole`` ``(B, 1, H, W)`` (1 = hole)
    max-pooled to ``latent_size`` ``(h, w)`` (``H`` and ``W`` multiples of them), then inverted. With ``margin``
    > 0 the touched cells are first grown by that many rings of cells (3 × 3 neighbourhoods), so only cells more
    than ``margin`` cells (Chebyshev distance) from every touched cell count as kept."""
    if margin < 0:
        raise ValueError(f"margin must be non-negative, got {margin}")
    height, width = hole.shape[-2:]
    h, w = int(latent_size[0]), int(latent_size[1])
    if height % h or width % w:
        raise ValueError(f"the mask's size {height}×{width} is not a multiple of the latent's {h}×{w}")
    touched = F.max_pool2d((hole > 0.5).float(), kernel_size=(height // h, width // w))
    if margin:
        touched = F.max_pool2d(touched, kernel_size=2 * margin + 1, stride=1, padding=margin)
    return touched < 0.5


def brushnet_training_loss(
    brushnet: torch.nn.Module,
    components: Components,
    batch: dict,
    generator: torch.Generator,
    *,
    weight_dtype: torch.dtype = torch.float32,
    prediction_type: str = "epsilon",
    caption_dropout: float = 0.0,
    caption_dropout_embeds: str | None = None,
    unconditional_embeds: str | None = None,
    kept_invariance_weight: float = 0.0,
    kept_invariance_margin: int = 0,
    kept_invariance_min_timestep: int = 0,
    guided_loss_weight: float = 0.0,
    guided_loss_scale: float = 5.0,
    hole_pull_anchor_weight: float = 0.0,
    anchor: torch.nn.Module | None = None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of one micro-batch (see the module docstring for the maths).

    Args:
        brushnet: the branch (possibly wrapped by accelerate), float32.
        components: the frozen parts, on the branch's device, in ``weight_dtype``.
        batch: ``{"pixel_values": (B, 3, H, W) in [-1, 1], "mask": (B, 1, H, W) 1 = hole, "caption": [str]}``,
            and for SDXL bases ``"original_size"``, ``"crop_top_left"`` ``(B, 2)`` (see
            :meth:`brushnet.training.family.SDXLFamily.time_ids`).
        generator: CPU generator for caption dropout, posterior samples, noise and timesteps.
        weight_dtype: dtype of the frozen parts.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        caption_dropout: probability of dropping a caption.
        caption_dropout_embeds: what a dropped caption becomes, and the unconditional half the guidance terms
            below use: ``"encoded"`` (``""`` through the text encoders) or ``"zeros"`` (zero prompt embeds and
            pooled embeds: :func:`~brushnet.training.family.zero_dropped_captions`); None: the family's pipeline
            default (SD1.5 ``"encoded"``, SDXL ``"zeros"``).
        unconditional_embeds: the guidance terms' unconditional half, ``"encoded"`` or ``"zeros"``; None: as
            ``caption_dropout_embeds``.
        kept_invariance_weight: λ of the kept region's caption-invariance term (module docstring); 0: off.
        kept_invariance_margin: the term's margin around the hole in latent cells (:func:`kept_cells`).
        kept_invariance_min_timestep: the term counts only the samples noised to this timestep or above.
        guided_loss_weight, guided_loss_scale: γ and w of the guided term (module docstring); γ = 0: off.
        hole_pull_anchor_weight, anchor: μ of the anchor term and the frozen branch it holds the hole's caption
            pull to (module docstring); μ = 0: off.
        timesteps: ``(B,)`` timesteps to noise to instead of drawing them (the held-out validation loss).

    Returns:
        Scalar float32: the MSE over the whole latent (plus the terms that are on).
    """
    if caption_dropout_embeds is None:
        caption_dropout_embeds = components.family.dropped_caption
    unconditional_embeds = unconditional_embeds or caption_dropout_embeds
    for name, value in (
        ("caption_dropout_embeds", caption_dropout_embeds),
        ("unconditional_embeds", unconditional_embeds),
    ):
        if value not in ("encoded", "zeros"):
            raise ValueError(f"{name} must be 'encoded' or 'zeros', got {value!r}")
    device = next(components.unet.parameters()).device
    dropped = draw_drops(len(batch["caption"]), caption_dropout, generator)
    captions = ["" if drop else caption for caption, drop in zip(batch["caption"], dropped.tolist())]
    unconditional = None
    with torch.no_grad():
        encoder_hidden_states, added_cond_kwargs = components.family.encode(
            captions, device, weight_dtype, batch
        )
        if caption_dropout_embeds == "zeros" and dropped.any():
            encoder_hidden_states, added_cond_kwargs = zero_dropped_captions(
                encoder_hidden_states, added_cond_kwargs, dropped
            )
        if uses_empty_caption(kept_invariance_weight, guided_loss_weight, hole_pull_anchor_weight):
            # the same unconditional text a dropped caption becomes (what sampling sends for this base)
            unconditional = components.family.unconditional(
                len(captions), device, weight_dtype, batch, embeds=unconditional_embeds
            )
    return branch_denoising_loss(
        brushnet,
        components,
        batch,
        generator,
        encoder_hidden_states,
        encoder_hidden_states,
        weight_dtype=weight_dtype,
        prediction_type=prediction_type,
        added_cond_kwargs=added_cond_kwargs,
        unconditional=unconditional,
        kept_invariance_weight=kept_invariance_weight,
        kept_invariance_margin=kept_invariance_margin,
        kept_invariance_min_timestep=kept_invariance_min_timestep,
        guided_loss_weight=guided_loss_weight,
        guided_loss_scale=guided_loss_scale,
        hole_pull_anchor_weight=hole_pull_anchor_weight,
        anchor=anchor,
        timesteps=timesteps,
    )


@dataclass
class TrainResult:
    """What a finished run reports."""

    global_step: int
    losses: list[float]  # per optimizer step, this process, averaged over accumulation micro-batches
    final_model_dir: Path
    skipped_samples: dict[str, int] = field(default_factory=dict)  # this process, by reason


def freeze(components: Components, weight_dtype: torch.dtype, device: torch.device | str) -> None:
    """Freeze the base (no gradients, eval mode) on ``device``, in ``weight_dtype``.

    One exception, as diffusers' ``train_controlnet_sdxl.py`` and the original SDXL script make it: an SDXL
    VAE whose config says it overflows in float16 (``force_upcast``) stays in float32 under fp16 mixed
    precision (bf16 has float32's range and needs no exception).
    """
    vae_config = components.vae.config
    keep_vae = (
        weight_dtype == torch.float16
        and components.family.name == "sdxl"
        and getattr(vae_config, "force_upcast", False)
    )
    for name, module in components.frozen_modules.items():
        module.requires_grad_(False).eval().to(device)
        if weight_dtype != torch.float32 and not (name == "vae" and keep_vae):
            module.to(dtype=weight_dtype)
    if keep_vae:
        logger.info("the SDXL VAE overflows in fp16 (force_upcast): it stays in float32")


def _mixed_precision_dtype(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def train(config: TrainConfig, dataset=None, on_start: Callable[[], None] | None = None) -> TrainResult:
    """Run (or resume) a training run described by ``config``. Call on every process.

    Args:
        config: the run.
        dataset: a dataset of the training sample dicts; default: the one ``config`` names (``train_shards`` /
            ``train_data_dir``) from :mod:`brushnet.data`. An iterable dataset must already be this process's
            part; a map-style one is the whole set (the loop's sampler gives each process its part).
        on_start: called once every startup check has passed, just before the first step (or, for a run that
            is already finished, instead of it): what a caller needs to tell a refused run from a failed one.
    """
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedType,
        ProjectConfiguration,
        broadcast_object_list,
        gather_object,
        set_seed,
    )
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    check_resolution(config)  # as the command does: the Python API gets the same one line, before anything
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)
        ),
    )
    if accelerator.is_main_process:
        recover_interrupted_saves(output_dir)  # finish or undo what a killed run left, before anyone looks
    accelerator.wait_for_everyone()
    # on every process, so that a bad --resume_from_checkpoint fails on each of them alike
    resume_path = resolve_checkpoint(output_dir, config.resume_from_checkpoint)
    seed = [run_seed(config, resume_path)]
    if accelerator.num_processes > 1:
        broadcast_object_list(seed)
    config = config.model_copy(update={"seed": seed[0]})
    set_seed(config.seed)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # models: frozen parts in the mixed-precision dtype, the branch in float32
    components = load_components(
        config.pretrained_model_name_or_path,
        config.revision,
        config.allow_pickle,
        config.pretrained_vae_model_name_or_path,
    )
    if resume_path is not None:
        check_resume_fits_base(resume_path, components.unet.config)
    brushnet = initial_branch(components, config.brushnet_model_name_or_path, config.allow_pickle)
    weight_dtype = _mixed_precision_dtype(accelerator)
    freeze(components, weight_dtype, accelerator.device)
    if brushnet.dtype != torch.float32:
        brushnet.to(dtype=torch.float32)
    brushnet.to(accelerator.device).train()
    anchor = None
    if config.hole_pull_anchor_weight > 0:  # the starting branch, frozen (a resumed run keeps the same one)
        anchor = copy.deepcopy(brushnet).requires_grad_(False).eval()
    if config.gradient_checkpointing:
        brushnet.enable_gradient_checkpointing()
        components.unet.enable_gradient_checkpointing()  # activations of the frozen UNet are recomputed too
    prediction_type = config.prediction_type or components.scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"the base scheduler's prediction_type is {prediction_type!r}; training supports epsilon and "
            "v_prediction (set --prediction_type)"
        )
    # the resolved config (seed, target, precision, validation guidance and dropped-caption embeds filled in) goes
    # next to the run and into every checkpoint; unset, validation images use the family's guidance, as inference
    # does (SDXL: 5.0, not 7.5), and a dropped caption becomes what the base's inference sends as the unconditional
    # text (SDXL: zeros, force_zeros_for_empty_prompt)
    from ..methods.base import FAMILY_GUIDANCE

    guidance = config.validation_guidance_scale
    embeds = config.caption_dropout_embeds or resumed_caption_dropout_embeds(resume_path)
    embeds = embeds or dropped_caption_default(
        components.family.name, config.pretrained_model_name_or_path, config.revision
    )
    # the terms' unconditional half: a dropped caption's, unless the resumed run trained them on another
    unconditional = (
        config.unconditional_embeds or resumed_unconditional_embeds(resume_path, components.family) or embeds
    )
    config = config.model_copy(
        update={
            "prediction_type": prediction_type,
            "mixed_precision": accelerator.mixed_precision,
            "validation_guidance_scale": FAMILY_GUIDANCE[components.family.name]
            if guidance is None
            else guidance,
            "caption_dropout_embeds": embeds,
            "unconditional_embeds": unconditional,
        }
    )
    if accelerator.is_main_process:
        save_config(config, output_dir / CONFIG_FILE)

    ema = None
    if config.use_ema and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("--use_ema is not supported with FSDP (the EMA would need the sharded weights)")
    if config.use_ema:
        ema = EMAModel(
            brushnet.parameters(),
            decay=config.ema_decay,
            model_cls=BrushNetModel,
            model_config=brushnet.config,
            # on CUDA a few multi-tensor kernels per step instead of three per parameter (as AdamW's default there);
            # on the CPU the per-parameter loop, whose results earlier runs reproduce to the bit
            foreach=accelerator.device.type == "cuda",
        )
        ema.to(accelerator.device)

    held_out = None  # the held-out validation loss's samples, read alike by every process
    if config.validation_loss_steps is not None:
        held_out = load_held_out_set(
            config,
            components.noise_scheduler.config.num_train_timesteps,
            # a record from before the terms' half was recorded used the family's fixed one
            implied={"unconditional_embeds": components.family.dropped_caption},
        )
    if dataset is None:
        dataset = build_train_dataset(
            config, accelerator.process_index, accelerator.num_processes, config.seed
        )
        if held_out is not None and held_out.held_out_of_training:
            dataset = held_out.exclude_from(dataset)
    elif held_out is not None and held_out.held_out_of_training:
        raise ValueError(
            "--validation_loss_steps without --validation_shards or --validation_data_dir holds samples out of the "
            "data the config names, not of a dataset passed to train(): give the held-out data"
        )
    dataloader = build_train_dataloader(config, dataset, accelerator.process_index, accelerator.num_processes)
    if config.max_train_steps is not None:
        max_train_steps = config.max_train_steps
    else:
        try:
            batches_per_epoch = len(dataloader)
        except TypeError:
            raise ValueError("this dataset has no known length: give --max_train_steps") from None
        # the micro-batches of E epochs, in whole optimizer steps: accumulation windows run on across an epoch's
        # end (the data is one stream), so E × ceil(batches / GA) would read further epochs whenever GA does not
        # divide an epoch (3 epochs of 4 batches for E = 2, GA = 3)
        max_train_steps = math.ceil(
            config.num_train_epochs * batches_per_epoch / config.gradient_accumulation_steps
        )

    optimizer = torch.optim.AdamW(
        brushnet.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    # accelerate steps a prepared scheduler once per process per optimizer step
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    if accelerator.state.deepspeed_plugin is not None:  # no dataloader goes through prepare()
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
            config.train_batch_size
        )
    brushnet, optimizer, lr_scheduler = accelerator.prepare(brushnet, optimizer, lr_scheduler)
    step_generator = StepGenerator(config.seed + accelerator.process_index)  # saved per process
    # the EMA is saved and restored by brushnet.training.checkpointing as safetensors + JSON, not registered
    # with accelerate (which would pickle it and read it back with full pickle)
    if accelerator.is_main_process and config.report_to != "none":
        hparams = {k: v for k, v in config.model_dump().items() if isinstance(v, int | float | str | bool)}
        accelerator.init_trackers("brushnet", config=hparams)

    validation_set = None
    if accelerator.is_main_process:  # before any resume, so it sees the same first batch
        validation_set = ValidationSet.from_config(config)
        if validation_set.empty:
            validation_set.take_from_batch(
                next(iterate_batches(dataloader, dataset, epoch=0)), config.num_validation_samples
            )
            if hasattr(getattr(dataset, "skipped", None), "reset"):
                dataset.skipped.reset()  # count what the training stream skips, not this extra read

    global_step, epoch, batches_done = 0, 0, 0
    skips = SkipTally(getattr(dataset, "skipped", None))
    if resume_path is not None:
        state, process_state = load_checkpoint(
            accelerator, resume_path, ema=ema, allow_pickle=config.allow_pickle
        )
        try:
            step_generator.load_state_dict(process_state["step_generator"])
        except (KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{resume_path}: malformed process state ({first_line(exc)})") from None
        if ema is not None:
            ema.to(accelerator.device)  # the EMA state is read on the CPU
        positions = state["data_positions"]
        global_step = state["global_step"]
        later = [path.name for step, path in list_checkpoints(output_dir) if step > global_step]
        if later and accelerator.is_main_process:
            logger.warning(
                "resuming from step %d while %s holds later checkpoints (%s): this run replaces each as it saves "
                "that step; until then `latest` resumes them, not this run",
                global_step,
                output_dir,
                ", ".join(later),
            )
        epoch, batches_done = positions[accelerator.process_index]
        skips.restore(state.get("skipped_before_epoch"), accelerator.process_index)
        if held_out is not None and held_out.held_out_of_training and accelerator.is_main_process:
            if state.get("held_out_samples") != held_out.keys:
                logger.warning(
                    "the run %s continues did not hold out the samples this run holds out for the validation loss: "
                    "its steps may have trained on them",
                    resume_path,
                )
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)", resume_path, global_step, epoch, batches_done
        )

    if global_step >= max_train_steps:
        logger.info(
            "already finished: %s is at step %d of %d; nothing to train (raise --max_train_steps to go on)",
            resume_path,
            global_step,
            max_train_steps,
        )
    else:
        logger.info(
            "training steps %d to %d: batch %d per device × %d processes × %d accumulation",
            global_step + 1,
            max_train_steps,
            config.train_batch_size,
            accelerator.num_processes,
            config.gradient_accumulation_steps,
        )
    if on_start is not None:
        on_start()
    unwrapped = accelerator.unwrap_model(brushnet)
    loss_options = {
        "weight_dtype": weight_dtype,
        "prediction_type": prediction_type,
        "caption_dropout_embeds": config.caption_dropout_embeds,  # the held-out loss drops no caption
        "unconditional_embeds": config.unconditional_embeds,
        "kept_invariance_weight": config.kept_invariance_weight,
        "kept_invariance_margin": config.kept_invariance_margin,
        "kept_invariance_min_timestep": config.kept_invariance_min_timestep,
        "guided_loss_weight": config.guided_loss_weight,
        "guided_loss_scale": config.guided_loss_scale,
        "hole_pull_anchor_weight": config.hole_pull_anchor_weight,
        "anchor": anchor,
    }
    validation_loss = None
    start_step = global_step
    if held_out is not None:
        validation_loss = ValidationLoss(
            accelerator,
            held_out,
            # the loss the run optimises, at the set's timesteps, with the caption (no dropout)
            lambda model, batch, generator, timesteps: brushnet_training_loss(
                model, components, batch, generator, timesteps=timesteps, **loss_options
            ),
            unwrapped,
            output_dir,
            ema=ema,
            # an FSDP branch is sharded: its wrapper runs the passes (the same number on every process)
            model=brushnet if accelerator.distributed_type == DistributedType.FSDP else None,
            start_step=global_step,
        )
        if global_step == 0 and max_train_steps > 0:
            validation_loss.evaluate(0)  # the starting branch: where the curve begins
    # each step's loss stays on the device until a log line needs it (at least every 100 steps): reading it every
    # step would make the host wait for the device at the end of every step (the batch: brushnet.devices.to_device)
    losses = DeferredLosses()

    accumulated_loss = torch.zeros((), device=accelerator.device)
    while global_step < max_train_steps:
        for batch in iterate_batches(dataloader, dataset, epoch=epoch, skip=batches_done):
            with accelerator.accumulate(brushnet):
                with accelerator.autocast():
                    loss = brushnet_training_loss(
                        brushnet,
                        components,
                        batch,
                        step_generator.generator,
                        caption_dropout=config.caption_dropout,
                        **loss_options,
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(brushnet.parameters(), config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            accumulated_loss += loss.detach() / config.gradient_accumulation_steps
            batches_done += 1
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            if ema is not None:
                ema.step(unwrapped.parameters())
            losses.add(accumulated_loss)
            accumulated_loss = torch.zeros((), device=accelerator.device)
            if global_step % config.logging_steps == 0:
                step_loss = losses.read()[-1]
                mean_loss = (
                    accelerator.gather(torch.tensor([step_loss], device=accelerator.device)).mean().item()
                )
                logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0]}
                if skips.counter is not None:
                    skipped = torch.tensor([sum(skips.counts().values())], device=accelerator.device)
                    logs["skipped_samples"] = int(accelerator.reduce(skipped, reduction="sum").item())
                accelerator.log(logs, step=global_step)
                if accelerator.is_main_process:
                    logger.info(
                        "step %d: %s", global_step, ", ".join(f"{k}={v:.4g}" for k, v in logs.items())
                    )

            # the held-out loss before the checkpoint: a run resumed from it does not evaluate that step again
            if validation_loss is not None and global_step % config.validation_loss_steps == 0:
                validation_loss.evaluate(global_step)
            if global_step % config.checkpointing_steps == 0:
                # each process reads its own part of the data: keep every process's position
                positions = gather_object([[epoch, batches_done]])
                training_state = {"global_step": global_step, "data_positions": positions}
                if skips.counter is not None:
                    training_state["skipped_before_epoch"] = gather_object([skips.before_epoch])
                if held_out is not None and held_out.held_out_of_training:
                    training_state["held_out_samples"] = held_out.keys
                save_checkpoint(
                    accelerator,
                    output_dir,
                    global_step,
                    full_branch(accelerator, brushnet),
                    training_state,
                    process_state={"step_generator": step_generator.state_dict()},
                    ema=ema,
                    total_limit=config.checkpoints_total_limit,
                    config=config,
                )
            if validation_set is not None and global_step % config.validation_steps == 0:
                run_validation(
                    accelerator, config, components, unwrapped, ema, validation_set, global_step, weight_dtype
                )
            if global_step >= max_train_steps:
                break
        else:
            epoch, batches_done = epoch + 1, 0
            skips.epoch_ended()
    if validation_loss is not None and global_step > start_step and validation_loss.last_step != global_step:
        validation_loss.evaluate(global_step)  # the end of the run
    accelerator.wait_for_everyone()
    final_dir = output_dir / "brushnet"
    final_branch = full_branch(accelerator, brushnet)
    if accelerator.is_main_process:
        # with EMA, the final model is the EMA of the branch (the raw weights are in the checkpoints)
        if ema is not None:
            ema.copy_to(final_branch.parameters())
        publish_final_model(final_branch, output_dir)  # atomic: never truncated weights after a kill
        logger.info("saved the final branch to %s", final_dir)
    skipped = {}
    if skips.counter is not None:
        skipped = {reason: count for reason, count in skips.counts().items() if count}
        if skipped:
            logger.warning("process %d skipped malformed samples: %s", accelerator.process_index, skipped)
    accelerator.end_training()
    return TrainResult(global_step, losses.read(), final_dir, skipped)
