"""Shared fixtures for the training tests: the tiny SD1.5-layout base and a small synthetic shard set."""

from pathlib import Path

import pytest

TINY_BASE = Path(__file__).resolve().parents[1] / "fixtures" / "golden_tiny"


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The tiny SD1.5-layout base model folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    return TINY_BASE


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Two BrushData shards of 24×24 synthetic samples, three of the twelve malformed."""
    from brushnet.data.synthetic import write_synthetic_shards

    return write_synthetic_shards(
        tmp_path_factory.mktemp("shards"), num_shards=2, samples_per_shard=6, size=24, seed=0, malformed=3
    )


@pytest.fixture
def base_config(shards, tmp_path):
    """Config values for a tiny CPU run (16 px, batch 2, no tracker); tests add steps and options."""
    return {
        "pretrained_model_name_or_path": str(TINY_BASE),
        "train_shards": str(shards.paths[0].parent),
        "output_dir": str(tmp_path / "run"),
        "resolution": 16,
        "train_batch_size": 2,
        "learning_rate": 1e-3,
        "seed": 0,
        "shuffle_buffer": 4,
        "mask": {"mode": "mix"},
        "caption_dropout": 0.3,
        "checkpointing_steps": 2,
        "validation_steps": 1000,
        "report_to": "none",
    }


@pytest.fixture(scope="session")
def odd_base(tmp_path_factory) -> Path:
    """A base unlike SD1.5 in every way the training code must not assume: 8 latent channels, attention
    only in the deeper blocks, three levels, a BERT text encoder with its own tokenizer (named in
    ``model_index.json``), and a v-prediction scheduler."""
    import json

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import BertConfig, BertModel, BertTokenizer

    out = tmp_path_factory.mktemp("odd_base")
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=8,
        block_out_channels=(16, 24, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
    ).save_pretrained(out / "unet")
    AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=8,
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=0.5,
        sample_size=16,
    ).save_pretrained(out / "vae")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "square", "blue", "circle", "on", "grey"]  # fmt: skip
    (out / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(out / "vocab.txt"), model_max_length=12).save_pretrained(out / "tokenizer")
    (out / "vocab.txt").unlink()
    BertModel(
        BertConfig(
            vocab_size=len(words),
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=12,
        )
    ).save_pretrained(out / "text_encoder")
    DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction").save_pretrained(
        out / "scheduler"
    )
    index = {
        "_class_name": "StableDiffusionPipeline",
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


@pytest.fixture
def overfit():
    """``overfit(brushnet, components, batch, steps, **loss_options) -> losses``: AdamW (lr 2e-3) steps of the
    branch on one batch with the same draws every step (generator seed 3), the loss of each step."""
    import torch

    from brushnet.training import loop

    def run(brushnet, components, batch, steps, **loss_options):
        optimizer = torch.optim.AdamW(brushnet.parameters(), lr=2e-3)
        losses = []
        for _ in range(steps):
            generator = torch.Generator().manual_seed(3)
            loss = loop.brushnet_training_loss(brushnet, components, batch, generator, **loss_options)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    return run
