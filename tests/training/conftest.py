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
