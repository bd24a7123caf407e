"""What a run starts from: the base's text side (from model_index.json), the initial branch, a base unlike
SD1.5, and the export path (a checkpoint's ``brushnet/`` folder in the stock pipeline)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from brushnet.loading import CheckpointError
from brushnet.models.brushnet import BrushNetModel
from brushnet.training import family, loop
from brushnet.training.config import make_config


def test_text_classes_come_from_model_index(odd_base, tiny_base, tmp_path):
    """Training loads its base through the library's one loader, which reads the text-side classes from
    model_index.json (the CLIP defaults without one)."""
    odd = loop.load_components(str(odd_base))
    assert type(odd.family.tokenizer).__name__ == "BertTokenizer"
    assert type(odd.family.text_encoder).__name__ == "BertModel"
    tiny = loop.load_components(str(tiny_base))  # the tiny fixture has no model_index.json
    assert type(tiny.family.text_encoder).__name__ == "CLIPTextModel"
    assert isinstance(tiny.family, family.SD15Family) and tiny.family.name == "sd15"

    bad = tmp_path / "bad"
    shutil.copytree(tiny_base, bad)
    (bad / "model_index.json").write_text(json.dumps({"text_encoder": ["transformers", "NoSuchTextModel"]}))
    with pytest.raises(CheckpointError, match="names text_encoder class 'NoSuchTextModel'"):
        loop.load_components(str(bad))


def test_initial_branch_from_unet_and_from_a_checkpoint(tiny_base, tmp_path):
    components = loop.load_components(str(tiny_base))
    fresh = loop.initial_branch(components)
    assert fresh.config.conditioning_channels == 5 and fresh.config.in_channels == 4
    reference = BrushNetModel.from_unet(components.unet).state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in fresh.state_dict().items())

    with torch.no_grad():
        fresh.conv_in_condition.bias.add_(1.0)  # a "trained" branch, distinguishable from a fresh one
    fresh.save_pretrained(tmp_path / "trained")
    continued = loop.initial_branch(components, str(tmp_path / "trained"))
    assert torch.equal(continued.conv_in_condition.bias, fresh.conv_in_condition.bias)


def test_initial_branch_refuses_mismatched_channels(tiny_base, odd_base, tmp_path):
    tiny = loop.load_components(str(tiny_base))
    odd = loop.load_components(str(odd_base))
    loop.initial_branch(tiny).save_pretrained(tmp_path / "sd_branch")
    with pytest.raises(ValueError, match="does not fit the base UNet: .*latent channels 4 vs 8"):
        loop.initial_branch(odd, str(tmp_path / "sd_branch"))
    mixed = loop.Components(odd.vae, tiny.unet, tiny.family, tiny.noise_scheduler, tiny.scheduler_config)
    with pytest.raises(ValueError, match="VAE has 8 latent channels but its UNet takes 4"):
        loop.initial_branch(mixed)


def _run_pipeline(base: Path, branch_dir: Path, prompt: str):
    """Two denoising steps of the stock pipeline with the exported branch (loaded exactly as a user would)."""
    from brushnet import StableDiffusionBrushNetPipeline

    brushnet = BrushNetModel.from_pretrained(branch_dir)
    pipe = StableDiffusionBrushNetPipeline.from_pretrained(str(base), brushnet=brushnet, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    return pipe(
        prompt,
        image,
        Image.fromarray(mask),
        height=16,
        width=16,
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_odd_base_trains_and_its_checkpoint_runs_in_the_pipeline(odd_base, base_config):
    """8 latent channels, a BERT text encoder, attention in the deep blocks only, v-prediction from the
    scheduler config: the run needs no flag for any of it, and the exported branch runs as is."""
    config = make_config(
        {
            **base_config,
            "pretrained_model_name_or_path": str(odd_base),
            "max_train_steps": 2,
            "caption_dropout": 0,
        }
    )
    result = loop.train(config)
    assert result.global_step == 2 and all(np.isfinite(result.losses))
    out = Path(config.output_dir)
    saved = yaml.safe_load((out / "checkpoint-2" / "train_config.yaml").read_text())
    assert saved["prediction_type"] == "v_prediction"  # resolved from the base's scheduler config
    branch = BrushNetModel.from_pretrained(out / "checkpoint-2" / "brushnet")
    assert branch.config.in_channels == 8 and branch.config.conditioning_channels == 9
    images = _run_pipeline(odd_base, out / "checkpoint-2" / "brushnet", "a red square")
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_sd_checkpoint_runs_in_the_pipeline(tiny_base, base_config, tmp_path):
    """The export path of docs/training.md: copy ``checkpoint-<step>/brushnet`` anywhere and load it."""
    config = make_config({**base_config, "max_train_steps": 2})
    loop.train(config)
    base = tmp_path / "base"  # the fixture is a bare folder of components: give it the pipeline's index
    index = {
        "_class_name": "StableDiffusionPipeline",
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    for name, library, cls in [("vae", "diffusers", "AutoencoderKL"), ("unet", "diffusers", "UNet2DConditionModel"),
                               ("scheduler", "diffusers", "DDIMScheduler"), ("tokenizer", "transformers", "CLIPTokenizer"),
                               ("text_encoder", "transformers", "CLIPTextModel")]:  # fmt: skip
        shutil.copytree(tiny_base / name, base / name)
        index[name] = [library, cls]
    (base / "model_index.json").write_text(json.dumps(index))
    exported = tmp_path / "my_brushnet"
    shutil.copytree(Path(config.output_dir) / "checkpoint-2" / "brushnet", exported)
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    trained = _run_pipeline(base, exported, "a red square")
    loop.initial_branch(loop.load_components(str(tiny_base))).save_pretrained(tmp_path / "untrained")
    untrained = _run_pipeline(base, tmp_path / "untrained", "a red square")
    assert trained.shape == (1, 16, 16, 3)
    assert np.abs(trained - untrained).max() > 1e-4  # the trained branch is the one that ran


def test_another_vae_replaces_the_bases_for_training_and_validation(tiny_base, base_config, tmp_path):
    """``--pretrained_vae_model_name_or_path`` (diffusers' SDXL scripts' flag, for an fp16-fixed VAE): the run
    encodes with that VAE; one of other latent channels or a missing folder is refused in one line."""
    from diffusers import AutoencoderKL

    from brushnet.training.config import parse_train_args

    other = AutoencoderKL.from_pretrained(tiny_base, subfolder="vae")
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(0.5)
    other.save_pretrained(tmp_path / "vae")
    components = loop.load_components(str(tiny_base), vae=str(tmp_path / "vae"))
    for name, value in other.state_dict().items():
        assert torch.equal(components.vae.state_dict()[name], value), name
    config = make_config(
        {**base_config, "pretrained_vae_model_name_or_path": str(tmp_path / "vae"), "max_train_steps": 1}
    )
    own = loop.train(make_config({**base_config, "output_dir": str(tmp_path / "own"), "max_train_steps": 1}))
    assert loop.train(config).losses != own.losses  # the latents came from the other VAE
    flags = ["--pretrained_model_name_or_path", "b", "--train_shards", "s"]
    assert (
        parse_train_args(
            [*flags, "--pretrained_vae_model_name_or_path", "v"]
        ).pretrained_vae_model_name_or_path
        == "v"
    )

    wide = AutoencoderKL(latent_channels=8, block_out_channels=(8,), norm_num_groups=8)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(CheckpointError, match=r"has 8 latent channels but the base's has 4"):
        loop.load_components(str(tiny_base), vae=str(tmp_path / "wide"))
    with pytest.raises(CheckpointError, match=r"^VAE checkpoint not found: "):
        loop.load_components(str(tiny_base), vae=str(tmp_path / "nope"))
