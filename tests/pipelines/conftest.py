"""The PowerPaint reference fixtures (tests/fixtures/powerpaint: the original code's outputs on tiny random
weights) loaded through this project's loader, once per session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

POWERPAINT = Path(__file__).parents[1] / "fixtures" / "powerpaint"


@pytest.fixture(scope="session")
def powerpaint_reference():
    """``(runs by id, tensors)`` of ``pipeline_level.json`` / ``.safetensors``."""
    meta = json.loads((POWERPAINT / "pipeline_level.json").read_text())
    return {run["id"]: run for run in meta["runs"]}, load_file(POWERPAINT / "pipeline_level.safetensors")


@pytest.fixture(scope="session")
def powerpaint_v1_base(tmp_path_factory):
    """The fixture's SD-inpainting folder as a loadable base. The original overwrites its UNet and text
    encoder completely, so the fixture ships only their configs; random weights of those configs stand in."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    base = tmp_path_factory.mktemp("pp_v1") / "stable-diffusion-inpainting"
    shutil.copytree(POWERPAINT / "v1" / "stable-diffusion-inpainting", base)
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet")).save_pretrained(
        base / "unet"
    )
    CLIPTextModel(CLIPTextConfig.from_pretrained(base / "text_encoder")).save_pretrained(
        base / "text_encoder"
    )
    return base


@pytest.fixture(scope="session")
def powerpaint_pipes(powerpaint_v1_base):
    """``{"v1": pipeline, "v2": pipeline}`` loaded from the released-layout fixture folders, with the schedulers
    the original app uses (v1: the base's PNDM; v2: UniPC from the base's config, ending at sigma_min as
    diffusers 0.27 did)."""
    from brushnet.loading_powerpaint import load_powerpaint_pipeline
    from brushnet.schedulers import make_scheduler

    v2, _ = load_powerpaint_pipeline(
        POWERPAINT / "v2" / "ppt-v2", POWERPAINT / "v2" / "ppt-v2" / "realisticVisionV60B1_v51VAE"
    )
    v2.scheduler = make_scheduler("unipc-original", v2.scheduler.config)
    v1, _ = load_powerpaint_pipeline(POWERPAINT / "v1" / "ppt-v1", powerpaint_v1_base)
    for pipe in (v1, v2):
        pipe.set_progress_bar_config(disable=True)
    return {"v1": v1, "v2": v2}
