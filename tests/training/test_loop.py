import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from brushnet.data.brushdata import BrushDataStream
from brushnet.models.brushnet import BrushNetModel
from brushnet.training import loop
from brushnet.training.config import make_config
from brushnet.training.data import build_train_dataloader, iterate_batches


def _branch_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_falls_when_overfitting_one_batch(base_config, tiny_base, prediction_type, overfit):
    """Same batch, same noise and timesteps every step: the branch must learn to lower the loss."""
    components = loop.load_components(str(tiny_base))
    for module in components.frozen_modules.values():
        module.requires_grad_(False).eval()
    brushnet = BrushNetModel.from_unet(components.unet).train()
    config = make_config(base_config)
    dataset = BrushDataStream(config.train_shards, 16, config.mask, seed=0, shuffle_buffer=0)
    batch = next(iterate_batches(build_train_dataloader(config, dataset), dataset, epoch=0))
    losses = overfit(brushnet, components, batch, 25, prediction_type=prediction_type)
    assert losses[-1] < 0.6 * losses[0], losses


def test_training_target_formulas(tiny_base):
    """ε for epsilon; v = √ᾱ_t ε − √(1−ᾱ_t) z₀ for v-prediction, computed here by hand from the betas."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(tiny_base, subfolder="scheduler")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 2, 2, generator=generator)
    noise = torch.randn(3, 4, 2, 2, generator=generator)
    timesteps = torch.tensor([0, 500, 999])
    assert loop.training_target(scheduler, latents, noise, timesteps, "epsilon") is noise

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    assert scheduler.config.beta_schedule == "scaled_linear"
    alpha_bar = torch.cumprod(1 - betas, 0)[timesteps].view(3, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise.double() - (1 - alpha_bar).sqrt() * latents.double()
    v = loop.training_target(scheduler, latents, noise, timesteps, "v_prediction")
    torch.testing.assert_close(v.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown prediction_type 'sample'"):
        loop.training_target(scheduler, latents, noise, timesteps, "sample")


def test_v_prediction_target_differs_from_epsilon(base_config, tiny_base):
    components = loop.load_components(str(tiny_base))
    brushnet = BrushNetModel.from_unet(components.unet)
    config = make_config(base_config)
    dataset = BrushDataStream(config.train_shards, 16, config.mask, seed=0, shuffle_buffer=0)
    batch = next(iterate_batches(build_train_dataloader(config, dataset), dataset, epoch=0))
    with torch.no_grad():
        eps = loop.brushnet_training_loss(brushnet, components, batch, torch.Generator().manual_seed(1))
        v = loop.brushnet_training_loss(
            brushnet, components, batch, torch.Generator().manual_seed(1), prediction_type="v_prediction"
        )
    assert torch.isfinite(eps) and torch.isfinite(v) and eps != v


def test_frozen_parts_unchanged_and_branch_trained(base_config, tiny_base, monkeypatch):
    held = {}

    def load_and_keep(*args, **kwargs):
        held["components"] = loop.load_components.__wrapped__(*args, **kwargs)
        return held["components"]

    load_and_keep.__wrapped__ = loop.load_components
    monkeypatch.setattr(loop, "load_components", load_and_keep)
    result = loop.train(make_config({**base_config, "max_train_steps": 3}))
    assert result.global_step == 3 and len(result.losses) == 3

    trained = held["components"]
    fresh = loop.load_components.__wrapped__(str(tiny_base))
    for name, module in trained.frozen_modules.items():
        assert not any(p.requires_grad for p in module.parameters()), name
        reference = fresh.frozen_modules[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(value, reference[key]), f"{name}.{key} changed"

    initial = BrushNetModel.from_unet(fresh.unet).state_dict()
    final = _branch_weights(result.final_model_dir)
    assert any(not torch.equal(final[k], initial[k]) for k in final), "the branch did not train"
    BrushNetModel.from_pretrained(result.final_model_dir)  # loadable as is


@pytest.mark.parametrize("terms", [{}, {"kept_invariance_weight": 16.0, "hole_pull_anchor_weight": 16.0}])
def test_four_steps_equal_two_plus_resume_plus_two(base_config, tmp_path, terms):
    """With the anchor term the resumed run's anchor is the run's starting branch, not the checkpoint's."""
    straight = loop.train(
        make_config({**base_config, **terms, "output_dir": str(tmp_path / "a"), "max_train_steps": 4})
    )
    split = {**base_config, **terms, "output_dir": str(tmp_path / "b")}
    first = loop.train(make_config({**split, "max_train_steps": 2}))
    second = loop.train(make_config({**split, "max_train_steps": 4, "resume_from_checkpoint": "latest"}))
    assert first.losses + second.losses == straight.losses
    a, b = _branch_weights(straight.final_model_dir), _branch_weights(second.final_model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_without_a_seed_resumes_with_its_own(base_config, tmp_path, caplog):
    """Without --seed every start drew a new seed, the resume too: the resumed run read the stream in another
    order, with other masks and crops, than the run it continued."""
    import yaml

    values = {k: v for k, v in base_config.items() if k != "seed"}
    split = {**values, "output_dir": str(tmp_path / "b")}
    first = loop.train(make_config({**split, "max_train_steps": 2}))
    seed = yaml.safe_load((tmp_path / "b" / "checkpoint-2" / "train_config.yaml").read_text())["seed"]
    second = loop.train(make_config({**split, "max_train_steps": 4, "resume_from_checkpoint": "latest"}))
    straight = loop.train(
        make_config({**values, "seed": seed, "output_dir": str(tmp_path / "a"), "max_train_steps": 4})
    )
    assert first.losses + second.losses == straight.losses
    assert yaml.safe_load((tmp_path / "b" / "train_config.yaml").read_text())["seed"] == seed
    a, b = _branch_weights(straight.final_model_dir), _branch_weights(second.final_model_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # an explicit other seed is the user's choice, said out loud
    with caplog.at_level(logging.WARNING, logger="brushnet.training.loop"):
        loop.train(
            make_config({**split, "seed": seed + 1, "max_train_steps": 6, "resume_from_checkpoint": "latest"})
        )
    assert f"--seed {seed + 1} differs from the seed {seed} of the run" in caplog.text


def test_malformed_samples_are_counted_in_the_logs(base_config, caplog):
    config = make_config({**base_config, "max_train_steps": 4})
    # what the same stream skips while yielding the 8 samples of 4 batches
    reference = BrushDataStream(config.train_shards, 16, config.mask, seed=0, shuffle_buffer=4)
    for _, _ in zip(range(8), reference):
        pass
    expected = {k: v for k, v in reference.skipped.as_dict().items() if v}
    assert expected  # the fixture's malformed samples lie on the path

    with caplog.at_level(logging.INFO, logger="brushnet.training.loop"):
        result = loop.train(config)
    assert result.skipped_samples == expected
    assert f"skipped_samples={sum(expected.values())}" in caplog.text
    assert "skipped malformed samples" in caplog.text


def test_skipped_samples_are_counted_across_a_resume(base_config, tmp_path):
    """A resumed run counted only what it re-read of its epoch: the epochs before were lost from the log, the
    tracker and the final warning (3 and 3 skipped samples became 2 and 2)."""
    import shutil

    values = {**base_config, "max_train_steps": 12, "checkpointing_steps": 2, "checkpoints_total_limit": 10}
    straight = loop.train(make_config({**values, "output_dir": str(tmp_path / "a")}))
    assert sum(straight.skipped_samples.values()) > 3  # more than one epoch's: the stream was read again
    for step in (4, 10):  # at the end of the first epoch (4 batches), in the third
        run = tmp_path / f"resumed_{step}"
        shutil.copytree(tmp_path / "a", run)
        shutil.rmtree(run / "brushnet")
        for later in range(step + 2, 13, 2):
            shutil.rmtree(run / f"checkpoint-{later}")
        resumed = loop.train(
            make_config({**values, "output_dir": str(run), "resume_from_checkpoint": "latest"})
        )
        assert resumed.losses == straight.losses[step:]
        assert resumed.skipped_samples == straight.skipped_samples, step


def test_ema_validation_and_tensorboard(base_config):
    config = make_config(
        {
            **base_config,
            "max_train_steps": 3,
            "use_ema": True,
            "ema_decay": 0.5,
            "validation_steps": 2,
            "validation_inference_steps": 2,
            "num_validation_samples": 2,
            "report_to": "tensorboard",
            "lr_scheduler": "constant_with_warmup",
            "lr_warmup_steps": 2,
        }
    )
    result = loop.train(config)
    out = Path(config.output_dir)
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    grid = Image.open(out / "validation" / "step-2.png")
    assert grid.size == (3 * 16, 2 * 16)  # masked input | mask | result, two samples
    assert not (out / "validation" / "step-3.png").exists()  # on the schedule only
    # accelerate writes the hyper-parameters into a sub-folder; the scalars and images are in "brushnet/"
    events = EventAccumulator(
        str(out / config.logging_dir / "brushnet"), size_guidance={"images": 0, "scalars": 0}
    )
    events.Reload()
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3]
    assert [e.value for e in losses] == pytest.approx(result.losses, rel=1e-6)
    # linear warm-up over two steps, then constant
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([5e-4, 1e-3, 1e-3])
    (image,) = events.Images("validation")
    assert image.step == 2 and (image.width, image.height) == grid.size
    raw = _branch_weights(out / "checkpoint-2" / "brushnet")
    ema = _branch_weights(out / "checkpoint-2" / "ema")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    BrushNetModel.from_pretrained(out / "checkpoint-2" / "ema")
    final_ema = loop.train(
        make_config({**config.model_dump(), "max_train_steps": 2, "output_dir": str(out / "b")})
    )
    final = _branch_weights(final_ema.final_model_dir)  # the final model is the EMA
    assert all(torch.equal(final[k], ema[k]) for k in final)


def test_empty_stream_is_a_clear_error(base_config, tmp_path):
    from brushnet.data.synthetic import write_synthetic_shards

    write_synthetic_shards(tmp_path / "few", num_shards=1, samples_per_shard=1, size=24)
    config = make_config({**base_config, "train_shards": str(tmp_path / "few"), "max_train_steps": 1})
    from brushnet.errors import InputError

    with pytest.raises(InputError, match="yielded no batch"):  # one line, exit 2 from the command
        loop.train(config)


def test_folder_dataset_trains_and_resumes_exactly(base_config, tmp_path):
    from PIL import Image

    images = tmp_path / "folder" / "images"
    images.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(5):
        pixels = (torch.rand(20, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"img{i}.png")
    (images / "captions.jsonl").write_text('{"file": "img0.png", "caption": "noise"}\n')
    folder = {**base_config, "train_shards": None, "train_data_dir": str(tmp_path / "folder")}
    with pytest.raises(ValueError, match="--mask_mode brush"):  # no masks/ and segmentation masks asked for
        loop.train(make_config({**folder, "max_train_steps": 1, "mask": {"mode": "segmentation"}}))

    folder["mask"] = {"mode": "brush"}
    straight = loop.train(make_config({**folder, "output_dir": str(tmp_path / "a"), "max_train_steps": 4}))
    first = loop.train(make_config({**folder, "output_dir": str(tmp_path / "b"), "max_train_steps": 2}))
    second = loop.train(
        make_config(
            {
                **folder,
                "output_dir": str(tmp_path / "b"),
                "max_train_steps": 4,
                "resume_from_checkpoint": "latest",
            }
        )
    )
    assert first.losses + second.losses == straight.losses  # 2 batches per epoch: the resume crosses an epoch
    a, b = _branch_weights(straight.final_model_dir), _branch_weights(second.final_model_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resolved_config_next_to_the_run_and_in_every_checkpoint(base_config):
    import yaml

    config = make_config({**base_config, "max_train_steps": 4, "seed": None})
    loop.train(config)
    out = Path(config.output_dir)
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert isinstance(saved["seed"], int)  # the seed drawn for this run, so it can be repeated
    assert saved["prediction_type"] == "epsilon" and saved["mixed_precision"] == "no"
    assert saved["validation_guidance_scale"] == 7.5  # unset: the SD1.5 family's value
    assert saved["caption_dropout_embeds"] == "encoded"  # unset: SD1.5 encodes a dropped caption
    assert saved["unconditional_embeds"] == "encoded"  # unset: a dropped caption's
    for step in (2, 4):
        assert yaml.safe_load((out / f"checkpoint-{step}" / "train_config.yaml").read_text()) == saved
    resolved = (
        "seed",
        "prediction_type",
        "mixed_precision",
        "validation_guidance_scale",
        "caption_dropout_embeds",
        "unconditional_embeds",
    )
    assert make_config(saved).model_copy(update=dict.fromkeys(resolved)) == config


def test_gradient_checkpointing_gives_the_same_training(base_config, tmp_path):
    plain = loop.train(make_config({**base_config, "output_dir": str(tmp_path / "a"), "max_train_steps": 3}))
    checkpointed = loop.train(
        make_config(
            {
                **base_config,
                "output_dir": str(tmp_path / "b"),
                "max_train_steps": 3,
                "gradient_checkpointing": True,
            }
        )
    )
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)
    a, b = _branch_weights(plain.final_model_dir), _branch_weights(checkpointed.final_model_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_gradient_accumulation_counts_micro_batches(base_config):
    import json

    config = make_config({**base_config, "max_train_steps": 2, "gradient_accumulation_steps": 2})
    result = loop.train(config)
    assert result.global_step == 2 and len(result.losses) == 2
    state = json.loads((Path(config.output_dir) / "checkpoint-2" / "training_state.json").read_text())
    assert state["data_positions"] == [[0, 4]]  # two optimizer steps of two micro-batches each


def test_mixed_precision_freezes_in_bf16_and_trains_the_branch_in_float32(base_config, monkeypatch):
    held = {}

    def load_and_keep(*args, **kwargs):
        held["components"] = real_load(*args, **kwargs)
        return held["components"]

    real_load = loop.load_components
    monkeypatch.setattr(loop, "load_components", load_and_keep)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(
        True
    )  # the process-wide state holds the precision of the previous test's run
    try:
        result = loop.train(make_config({**base_config, "max_train_steps": 2, "mixed_precision": "bf16"}))
    finally:
        AcceleratorState._reset_state(True)
    assert all(math.isfinite(x) for x in result.losses)
    for name, module in held["components"].frozen_modules.items():
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
    assert {v.dtype for v in _branch_weights(result.final_model_dir).values()} == {torch.float32}


def test_caption_dropout_replaces_captions_by_the_empty_one(base_config, tiny_base):
    components = loop.load_components(str(tiny_base))
    brushnet = BrushNetModel.from_unet(components.unet)
    with torch.no_grad():  # non-zero taps, so the text reaching the UNet changes the prediction
        for name, param in brushnet.named_parameters():
            if name.startswith(("brushnet_down_blocks", "brushnet_mid_block", "brushnet_up_blocks")):
                param.normal_(0, 0.05)
    config = make_config(base_config)
    dataset = BrushDataStream(config.train_shards, 16, config.mask, seed=0, shuffle_buffer=0)
    batch = next(iterate_batches(build_train_dataloader(config, dataset), dataset, epoch=0))
    empty = {**batch, "caption": [""] * len(batch["caption"])}

    def loss(samples, caption_dropout):
        with torch.no_grad():
            generator = torch.Generator().manual_seed(5)
            return loop.brushnet_training_loss(
                brushnet, components, samples, generator, caption_dropout=caption_dropout
            ).item()

    # every probability > 0 draws the same dropout numbers first, so the rest of the step is the same
    assert loss(batch, 1.0) == loss(empty, 1.0)
    assert loss(batch, 1e-9) != loss(batch, 1.0)
    assert loss(batch, 1e-9) == loss(batch, 1e-12)


def test_gradient_clipping_bounds_the_first_update(base_config, tiny_base, tmp_path):
    """AdamW's first step moves each weight by ≈ lr·g/(|g| + ε): ≈ lr for ordinary gradients, but far less
    once the gradient is clipped to a norm well under ε."""
    initial = loop.initial_branch(loop.load_components(str(tiny_base))).state_dict()

    def largest_move(max_grad_norm: float) -> float:
        values = {**base_config, "output_dir": str(tmp_path / str(max_grad_norm)), "max_train_steps": 1}
        result = loop.train(make_config({**values, "max_grad_norm": max_grad_norm}))
        final = _branch_weights(result.final_model_dir)
        return max((final[k] - initial[k]).abs().max().item() for k in final)

    learning_rate = base_config["learning_rate"]
    assert largest_move(1.0) > 0.5 * learning_rate
    assert largest_move(1e-10) < 0.1 * learning_rate


def test_epochs_with_accumulation_read_the_epochs_asked_for(base_config, tmp_path):
    """--num_train_epochs 2 with 4 batches an epoch and 3 micro-batches a step ran 4 optimizer steps, 12
    micro-batches: three epochs, the third read because each epoch's steps were rounded up on their own."""
    import json

    import numpy as np
    from PIL import Image

    folder = tmp_path / "data" / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    values = {k: v for k, v in base_config.items() if k != "train_shards"}
    config = make_config(
        {
            **values,
            "train_data_dir": str(folder.parent),
            "train_batch_size": 1,
            "num_train_epochs": 2,
            "gradient_accumulation_steps": 3,
            "checkpointing_steps": 1,
            "checkpoints_total_limit": 10,
            "mask": {"mode": "brush"},
        }
    )
    result = loop.train(config)
    assert result.global_step == 3  # ceil(2 × 4 / 3): 9 micro-batches, the 8 of two epochs and one more
    positions = [
        json.loads((Path(config.output_dir) / f"checkpoint-{step}" / "training_state.json").read_text())
        for step in (1, 2, 3)
    ]
    assert [state["data_positions"] for state in positions] == [[[0, 3]], [[1, 2]], [[2, 1]]]
