"""Validation during training: inpaint a fixed set of (prompt, image, mask) with a fixed seed, save a grid.

The set is either given (``--validation_prompts/--validation_images/--validation_masks``) or the first
``--num_validation_samples`` samples of the data stream's first batch. Each row of the grid is
``masked input | mask | result``; it goes to ``output_dir/validation/step-<N>.png`` and to the tracker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..image import load_image, load_mask, tensor_to_pil
from ..io import atomic_write_bytes, make_grid, png_bytes

__all__ = ["ValidationSet", "run_validation"]

logger = logging.getLogger(__name__)

VALIDATION_SEED = 1234


@dataclass
class ValidationSet:
    """Prompts, RGB images and masks (``L`` mode, white = inpaint) at the training resolution."""

    prompts: list[str] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    masks: list[Image.Image] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prompts

    @classmethod
    def from_config(cls, config) -> ValidationSet:
        """The set given by the config's validation options (empty when none are given)."""
        if not config.validation_prompts:
            return cls()
        size = (config.resolution, config.resolution)
        images = [load_image(p).convert("RGB").resize(size, Image.BICUBIC) for p in config.validation_images]
        masks = [
            Image.fromarray((load_mask(p) * 255).astype(np.uint8)).resize(size, Image.NEAREST)
            for p in config.validation_masks
        ]
        return cls(list(config.validation_prompts), images, masks)

    def take_from_batch(self, batch: dict, count: int) -> None:
        """Fill the set with the first ``count`` samples of a training batch."""
        count = min(count, len(batch["caption"]))
        self.prompts = list(batch["caption"][:count])
        self.images = tensor_to_pil((batch["pixel_values"][:count].float() + 1) / 2)
        hole = (batch["mask"][:count, 0].float().cpu().numpy() > 0.5).astype(np.uint8) * 255
        self.masks = [Image.fromarray(m, mode="L") for m in hole]


@torch.no_grad()
def run_validation(
    accelerator,
    config,
    components,
    brushnet,
    ema,
    validation_set: ValidationSet,
    step: int,
    weight_dtype: torch.dtype,
) -> Path:
    """Inpaint the validation set with the current (EMA, if any) branch; save and log the grid.

    Call on the main process only. The branch is put back in training mode with its raw weights afterwards.
    """
    from diffusers import UniPCMultistepScheduler

    parameters = list(brushnet.parameters())
    if ema is not None:
        ema.store(parameters)
        ema.copy_to(parameters)
    brushnet.eval()
    try:
        pipeline = components.family.pipeline(  # the SD1.5 or the SDXL pipeline
            vae=components.vae,
            unet=components.unet,
            brushnet=brushnet,
            scheduler=UniPCMultistepScheduler.from_config(components.scheduler_config),
        )
        pipeline.set_progress_bar_config(disable=True)
        rows = []
        for prompt, image, mask in zip(validation_set.prompts, validation_set.images, validation_set.masks):
            with accelerator.autocast():
                result = pipeline(
                    prompt=prompt,
                    image=image,
                    mask_image=mask,
                    height=image.height,
                    width=image.width,
                    num_inference_steps=config.validation_inference_steps,
                    guidance_scale=config.validation_guidance_scale,
                    generator=torch.Generator().manual_seed(VALIDATION_SEED),
                ).images[0]
            black = Image.new("RGB", image.size)
            rows.append([Image.composite(black, image, mask), mask, result])
    finally:
        brushnet.train()
        if ema is not None:
            ema.restore(parameters)

    grid = make_grid([[image.convert("RGB") for image in row] for row in rows])
    path = Path(config.output_dir) / "validation" / f"step-{step}.png"
    atomic_write_bytes(path, png_bytes(grid))
    logger.info("saved validation grid %s", path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return path
