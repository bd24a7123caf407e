"""Stages ``brushnet``, ``inpaint`` and ``controlnet``: the three inpainting models on the frozen base, from
the same stream of samples (shards, masks, object holes, hole-naming captions, in the same order), with the
same step count, batch, learning rate, schedule and EMA — so the comparison between them is one of
architecture.

- ``brushnet``: the branch, by the project's own loop (:func:`brushnet.training.train`, the paper's mask
  recipe: segmentation / brush mix, opening, hole–kept swap) from ``BrushNetModel.from_unet`` of the base.
- ``inpaint``: a 9-channel UNet (latent, hole mask, masked-image latent: diffusers' inpainting layout, hole
  pixels set to 0 as its pipeline does) fine-tuned from the base UNet, new input channels zero-initialised.
- ``controlnet``: ``ControlNetModel.from_unet`` of the base, trained with the base frozen on the control image
  diffusers' inpaint ControlNet reads (image in [0, 1], hole = −1).

The last two run through :func:`fit_loop.fit` with the branch loop's optimiser, schedule, clipping and EMA, on
:class:`fit_loop.StreamBatches` of the same stream, and with the pieces the branch loop uses
(:func:`brushnet.training.loop.load_components`, :func:`brushnet.models.conditioning.encode_latents`,
:func:`brushnet.training.loop.training_target`).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch
import torch.nn.functional as F
from fit_loop import FitSettings, StreamBatches, fit, seeded_init, stage_generator
from recipe import Run
from world_data import SIZE, HolePromptStream

from brushnet.devices import to_device

__all__ = ["FINETUNED", "finetune_on", "train_brushnet", "train_controlnet", "train_inpaint"]

CAPTION_DROPOUT = 0.1
WARMUP_STEPS = 20


def _branch_config(run: Run, out_dir):
    """The :class:`brushnet.training.config.TrainConfig` of the branch (and the data of the other two)."""
    from brushnet.training.config import make_config

    cfg = run.cfg
    return make_config(
        {
            "pretrained_model_name_or_path": str(run.base_dir),
            "output_dir": str(out_dir),
            "train_shards": str(run.shards),
            "resolution": SIZE,
            "shuffle_buffer": 500,
            "mask": {"mode": "mix", "p_brush": 0.5},
            "caption_dropout": CAPTION_DROPOUT,
            "kept_invariance_weight": cfg.kept_invariance,
            "kept_invariance_margin": cfg.kept_invariance_margin,
            "train_batch_size": cfg.branch_batch,
            "max_train_steps": cfg.branch_steps,
            "learning_rate": cfg.branch_lr,
            "lr_scheduler": cfg.branch_lr_scheduler,
            "lr_warmup_steps": WARMUP_STEPS,
            "use_ema": cfg.branch_ema_decay > 0,
            "ema_decay": cfg.branch_ema_decay if cfg.branch_ema_decay > 0 else 0.9999,
            "mixed_precision": "no",
            "seed": cfg.seed,
            "checkpointing_steps": 250,
            "checkpoints_total_limit": 1,
            "resume_from_checkpoint": "latest",
            "validation_steps": 10**9,
            "report_to": "none",
            "logging_steps": 50,
            "dataloader_num_workers": cfg.loader_workers,
        }
    )


def _stream(run: Run, config, preload: bool = True) -> HolePromptStream:
    """The stream of the three stages; ``preload``: its scene table (the same samples, faster; see
    :class:`world_data.HolePromptStream`)."""
    from brushnet.cli.common import available_cpus
    from brushnet.training.data import build_train_dataset

    dataset = build_train_dataset(config, 0, 1, config.seed)
    cfg = run.cfg
    return HolePromptStream(
        dataset,
        cfg.seed,
        probability=cfg.hole_prompt_probability,
        seed=config.seed,
        object_holes=cfg.object_holes,
        preload=cfg.scenes if preload else 0,
        processes=available_cpus(),
    )


def train_branch_on(run: Run, config):
    """:func:`brushnet.training.train` of ``config`` on the run's stream, on the run's device: the loop trains
    where accelerate puts it (CUDA when there is one), so ``ACCELERATE_USE_CPU`` is pinned for the call and then
    restored."""
    from brushnet.training.loop import train

    use_cpu = os.environ.get("ACCELERATE_USE_CPU")
    os.environ["ACCELERATE_USE_CPU"] = "true" if run.device == "cpu" else "false"
    try:
        return train(config, dataset=_stream(run, config))
    finally:
        if use_cpu is None:
            os.environ.pop("ACCELERATE_USE_CPU")
        else:
            os.environ["ACCELERATE_USE_CPU"] = use_cpu


def train_brushnet(run: Run) -> dict:
    """Stage ``brushnet``: the branch from ``BrushNetModel.from_unet`` of the base, by the project's loop;
    writes ``brushnet_run/brushnet``."""
    config = _branch_config(run, run.work / "brushnet_run")
    start = time.perf_counter()
    result = train_branch_on(run, config)
    seconds = time.perf_counter() - start
    for checkpoint in (run.work / "brushnet_run").glob("checkpoint-*"):  # done: a rerun starts over
        shutil.rmtree(checkpoint)
    recent = result.losses[-50:] or [float("nan")]
    return {
        "steps": result.global_step,
        "final_loss": sum(recent) / len(recent),
        "seconds_per_step": round(seconds / max(len(result.losses), 1), 3),
        "model_dir": str(result.final_model_dir),
    }


def _fit_on_stream(run: Run, stage: str, model, loss_of, config=None, checkpoint: bool = True):
    """Train ``model`` with the branch's settings (:func:`_branch_config`, or ``config`` in its place) on the
    branch's stream; ``checkpoint``: save the fit's state to the stage's checkpoint file as it goes. Returns the
    :class:`fit_loop.FitResult`."""
    config = config if config is not None else _branch_config(run, run.work / f"{stage}_run")
    settings = FitSettings(
        steps=config.max_train_steps,
        learning_rate=config.learning_rate,
        lr_scheduler=config.lr_scheduler,
        lr_warmup_steps=config.lr_warmup_steps,
        adam_weight_decay=config.adam_weight_decay,
        max_grad_norm=config.max_grad_norm,
        ema_decay=config.ema_decay if config.use_ema else None,
    )
    result = fit(
        model,
        loss_of,
        StreamBatches(_stream(run, config), config.train_batch_size, config.dataloader_num_workers),
        settings,
        generator=stage_generator(run.cfg.seed, stage),
        name=stage,
        checkpoint=run.checkpoint(stage) if checkpoint else None,
    )
    return result


def _noised(components, latents: torch.Tensor, generator: torch.Generator):
    """Noise and timesteps drawn on the CPU from the stage's generator (the same draws on any device)."""
    scheduler = components.noise_scheduler
    noise = to_device(torch.randn(latents.shape, generator=generator), latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    timesteps = to_device(timesteps, latents.device)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def _target(components, latents, noise, timesteps) -> torch.Tensor:
    from brushnet.training.loop import training_target

    scheduler = components.noise_scheduler
    return training_target(scheduler, latents, noise, timesteps, scheduler.config.prediction_type)


def _captions(components, batch: dict, generator: torch.Generator, device, weight: float):
    """The UNet's text for a batch: the captions after dropout, and with the invariance term on (``weight`` > 0)
    the empty caption's states after them, ``(2B, L, D)``, so the model runs once on both halves."""
    from brushnet.training.loop import drop_texts  # the branch loop's dropout: the same draws

    captions = drop_texts(batch["caption"], CAPTION_DROPOUT, generator)
    if weight > 0:
        captions = captions + [""] * len(captions)
    hidden, _ = components.family.encode(captions, device, torch.float32)
    return hidden


def _loss(
    components, prediction, latents, noise, timesteps, hole, weight: float, margin: int = 0
) -> torch.Tensor:
    """The v (or ε) MSE of the first ``B`` predictions, plus, with ``weight`` > 0, ``weight`` × the mean over the
    kept latent cells (``margin`` rings around the hole left out) of the squared difference between them and the
    empty caption's predictions after them (the term :func:`brushnet.training.loop.branch_denoising_loss` adds to
    the branch's loss)."""
    from brushnet.training.loop import kept_difference

    size = len(latents)
    loss = F.mse_loss(prediction[:size], _target(components, latents, noise, timesteps))
    if weight > 0:
        loss = loss + weight * kept_difference(prediction[:size], prediction[size:], hole, margin)
    return loss


def _twice(tensor: torch.Tensor, weight: float) -> torch.Tensor:
    """``tensor`` for both halves of the batch when the invariance term is on."""
    return torch.cat([tensor, tensor]) if weight > 0 else tensor


def _frozen_components(run: Run):
    from brushnet.training.loop import load_components

    components = load_components(str(run.base_dir))
    for module in components.frozen_modules.values():
        module.requires_grad_(False).eval().to(run.device)
    return components


def _inpaint_loss(run: Run, components, model):
    """``(batch, generator) → loss`` of the 9-channel UNet ``model`` on the run's samples."""
    from brushnet.models.conditioning import encode_latents, keep_mask_latent

    vae, device, weight = components.vae, torch.device(run.device), run.cfg.kept_invariance
    margin = run.cfg.kept_invariance_margin

    def loss_of(batch: dict, generator: torch.Generator) -> torch.Tensor:
        pixels, hole = to_device(batch["pixel_values"], device), to_device(batch["mask"], device)
        with torch.no_grad():
            hidden = _captions(components, batch, generator, device, weight)
            latents = encode_latents(vae, pixels, generator)
            # diffusers' inpainting pipelines blank the hole to 0 (grey) and feed the hole mask (1 = hole)
            masked_latents = encode_latents(vae, pixels * (hole < 0.5), generator)
            hole_latent = 1.0 - keep_mask_latent(hole, latents.shape[-2:])
        noisy, noise, timesteps = _noised(components, latents, generator)
        inputs = _twice(torch.cat([noisy, hole_latent, masked_latents], 1), weight)
        prediction = model(inputs, _twice(timesteps, weight), hidden).sample
        return _loss(components, prediction, latents, noise, timesteps, hole, weight, margin)

    return loss_of


def _save_inpaint(run: Run, model, out) -> None:
    """``out``: an SD-inpainting pipeline folder of the run's base with ``model`` as its UNet."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run.base_dir, out, ignore=shutil.ignore_patterns("unet"))
    model.save_pretrained(out / "unet")
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def train_inpaint(run: Run) -> dict:
    """Stage ``inpaint``: the 9-channel UNet; writes ``inpaint/`` (an SD-inpainting pipeline folder)."""
    from diffusers import UNet2DConditionModel

    components = _frozen_components(run)
    base_unet = components.unet
    with seeded_init(stage_generator(run.cfg.seed, "inpaint.init")):
        model = UNet2DConditionModel.from_config({**base_unet.config, "in_channels": 9})
    state = base_unet.state_dict()
    weight = torch.zeros_like(model.conv_in.weight)
    weight[:, :4] = state["conv_in.weight"]
    state["conv_in.weight"] = weight
    model.load_state_dict(state)
    model.to(run.device)
    info = _fit_on_stream(run, "inpaint", model, _inpaint_loss(run, components, model)).summary()
    out = run.work / "inpaint"
    _save_inpaint(run, model, out)
    run.checkpoint("inpaint").unlink(missing_ok=True)
    return {**info, "model_dir": str(out)}


def _controlnet_loss(run: Run, components, model):
    """``(batch, generator) → loss`` of the ControlNet ``model`` on the run's samples, with the base frozen."""
    from brushnet.models.conditioning import encode_latents

    unet, vae, device = components.unet, components.vae, torch.device(run.device)
    weight, margin = run.cfg.kept_invariance, run.cfg.kept_invariance_margin

    def loss_of(batch: dict, generator: torch.Generator) -> torch.Tensor:
        pixels, hole = to_device(batch["pixel_values"], device), to_device(batch["mask"], device)
        with torch.no_grad():
            hidden = _captions(components, batch, generator, device, weight)
            latents = encode_latents(vae, pixels, generator)
        control = torch.where(hole > 0.5, torch.full_like(pixels, -1.0), (pixels + 1) / 2)
        noisy, noise, timesteps = _noised(components, latents, generator)
        noisy2, timesteps2 = _twice(noisy, weight), _twice(timesteps, weight)
        down, mid = model(
            noisy2, timesteps2, hidden, controlnet_cond=_twice(control, weight), return_dict=False
        )
        prediction = unet(
            noisy2,
            timesteps2,
            hidden,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        return _loss(components, prediction, latents, noise, timesteps, hole, weight, margin)

    return loss_of


def train_controlnet(run: Run) -> dict:
    """Stage ``controlnet``: the inpaint ControlNet (4× conditioning embedding) on the frozen base; writes
    ``controlnet/``."""
    from diffusers import ControlNetModel

    components = _frozen_components(run)
    with seeded_init(stage_generator(run.cfg.seed, "controlnet.init")):
        model = ControlNetModel.from_unet(components.unet, conditioning_embedding_out_channels=(16, 32, 64))
    model.to(run.device)
    info = _fit_on_stream(run, "controlnet", model, _controlnet_loss(run, components, model)).summary()
    out = run.work / "controlnet"
    model.save_pretrained(out)
    run.checkpoint("controlnet").unlink(missing_ok=True)
    return {**info, "model_dir": str(out)}


FINETUNED = ("inpaint", "controlnet")
"""The models :func:`finetune_on` fine-tunes (the branch is fine-tuned by :func:`train_branch_on`)."""


def finetune_on(run: Run, config, part: str, source, out):
    """Fine-tune a trained 9-channel UNet (``part`` ``"inpaint"``: ``source`` is its SD-inpainting folder) or
    ControlNet (``"controlnet"``: its folder) with ``config``'s settings (a :func:`_branch_config` with its changes)
    on the run's stream, as :func:`train_branch_on` fine-tunes a branch from the same config: the same samples in
    the same order, the same steps, batch, rate and schedule, the stage's own loss. Writes ``out`` (float32, a
    folder of ``source``'s layout; the rest of an inpainting folder from the run's base); no checkpoints. Returns
    the :class:`fit_loop.FitResult`."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    if part not in FINETUNED:
        raise ValueError(f"cannot fine-tune {part!r}: one of {', '.join(FINETUNED)}")
    components = _frozen_components(run)
    if part == "inpaint":
        model = UNet2DConditionModel.from_pretrained(source / "unet", torch_dtype=torch.float32)
        loss_of = _inpaint_loss(run, components, model)
    else:
        model = ControlNetModel.from_pretrained(source, torch_dtype=torch.float32)
        loss_of = _controlnet_loss(run, components, model)
    model.to(run.device).requires_grad_(True)
    result = _fit_on_stream(run, part, model, loss_of, config=config, checkpoint=False)
    if part == "inpaint":
        _save_inpaint(run, model, out)
    else:
        model.save_pretrained(out)
    return result
