"""The held-out validation loss (``--validation_loss_steps``): a fixed set of samples never trained on, at fixed masks,
noise and timesteps, so that the number is a function of the weights alone (TencentARC/BrushNet #67, #35: "how to
identify when the model is converged")."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from brushnet.models.brushnet import BrushNetModel
from brushnet.training import loop
from brushnet.training.config import ConfigError, make_config, parse_train_args
from brushnet.training.entry import main
from brushnet.training.validation_loss import (
    RECORD_FILE,
    evaluate_validation_loss,
    load_held_out_set,
    timestep_buckets,
)

REQUIRED = ["--pretrained_model_name_or_path", "base", "--train_shards", "data/{0..3}.tar"]


def _record(run) -> dict:
    return json.loads((Path(run) / RECORD_FILE).read_text())


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _loss(components):
    return lambda model, batch, generator, timesteps: loop.brushnet_training_loss(
        model, components, batch, generator, timesteps=timesteps
    )


def _evaluate(components, held_out, branch, **kwargs) -> float:
    return evaluate_validation_loss(_accelerator(), held_out, _loss(components), branch, **kwargs).loss


class _TrainedKeys:
    """Wraps the loop's loss to record the keys of every training batch (the validation loss passes timesteps)."""

    def __init__(self, monkeypatch):
        self.keys: list[str] = []
        real = loop.brushnet_training_loss

        def recording(brushnet, components, batch, generator, **options):
            if options.get("timesteps") is None:
                self.keys += batch["key"]
            return real(brushnet, components, batch, generator, **options)

        monkeypatch.setattr(loop, "brushnet_training_loss", recording)


# -- flags ----------------------------------------------------------------------------------------------


def test_flags_are_checked_up_front():
    with pytest.raises(
        ConfigError, match="validation_shards is the held-out set of the validation loss: give "
    ):
        parse_train_args([*REQUIRED, "--validation_shards", "held/"])
    with pytest.raises(ConfigError, match="validation_data_dir is the held-out set"):
        parse_train_args([*REQUIRED, "--validation_data_dir", "held/"])
    with pytest.raises(ConfigError, match="at most one of validation_shards and validation_data_dir"):
        parse_train_args([*REQUIRED, "--validation_loss_steps", "5", "--validation_shards", "a",
                          "--validation_data_dir", "b"])  # fmt: skip
    for flag in ("validation_loss_steps", "validation_loss_samples", "validation_loss_buckets"):
        with pytest.raises(ConfigError, match=rf"{flag}: Input should be greater than 0"):
            parse_train_args([*REQUIRED, f"--{flag}", "0"])
    config = parse_train_args([*REQUIRED, "--validation_loss_steps", "50", "--validation_shards", "held/"])
    assert (config.validation_loss_steps, config.validation_loss_samples, config.validation_loss_buckets) == (
        50,
        8,
        5,
    )
    assert timestep_buckets(1000, 4) == [(0, 249), (250, 499), (500, 749), (750, 999)]
    assert timestep_buckets(10, 3) == [(0, 2), (3, 5), (6, 9)]
    with pytest.raises(
        ValueError, match="--validation_loss_buckets 11: the base's schedule has 10 timesteps"
    ):
        timestep_buckets(10, 11)


def _main(capsys, tmp_path, base, *flags) -> tuple[int, list[str]]:
    argv = ["--pretrained_model_name_or_path", str(base), "--output_dir", str(tmp_path / "run"), "--resolution",
            "16", "--train_batch_size", "1", "--max_train_steps", "1", "--report_to", "none"]  # fmt: skip
    status = main([*argv, *flags])
    return status, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_bad_held_out_data_is_one_line(capsys, tmp_path, shards, tiny_base):
    data = ["--train_shards", str(shards.paths[0].parent), "--validation_loss_steps", "1"]
    status, errors = _main(
        capsys, tmp_path, tmp_path / "no-base", *data, "--validation_shards", str(tmp_path / "x")
    )
    assert status == 2 and errors == [
        f"error: --validation_shards {tmp_path / 'x'}: no such shard file or folder"
    ]
    status, errors = _main(capsys, tmp_path, tmp_path / "no-base", *data, "--mask_mode", "brush",
                          "--validation_data_dir", str(tmp_path))  # fmt: skip
    assert status == 2 and errors == [f"error: --validation_data_dir: no images (.jpg, .jpeg, .png, .webp, .bmp) "
                                      f"in {tmp_path}"]  # fmt: skip
    status, errors = _main(capsys, tmp_path, tiny_base, *data, "--validation_loss_buckets", "1001")
    assert status == 2 and errors == [
        "error: --validation_loss_buckets 1001: the base's schedule has 1000 timesteps; give 1 to 1000"
    ]
    status, errors = _main(
        capsys, tmp_path, tiny_base, *data, "--validation_loss_samples", "9"
    )  # 9 usable samples
    assert status == 2 and errors == [
        "error: --validation_loss_samples 9 would hold out every usable sample of --train_shards (9): lower it or "
        "give --validation_shards"
    ]
    assert not (tmp_path / "run").exists()  # refused before training: nothing left behind


# -- the number -----------------------------------------------------------------------------------------


def test_the_loss_is_a_function_of_the_weights(base_config, tiny_base):
    """Two evaluations of the same weights agree to the bit, and so does a set loaded again; other weights give
    another number; with an EMA the EMA's weights are evaluated and the branch's own are put back."""
    from diffusers.training_utils import EMAModel

    config = make_config({**base_config, "validation_loss_steps": 1, "validation_loss_samples": 2})
    components = loop.load_components(str(tiny_base))
    loop.freeze(components, torch.float32, "cpu")
    held_out = load_held_out_set(config, 1000)
    again = load_held_out_set(config, 1000)
    assert again.description() == held_out.description() and held_out.timesteps.shape == (2, 5)
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["mask"], b["mask"])
               for a, b in zip(held_out.samples, again.samples))  # fmt: skip
    for (first, last), column in zip(held_out.buckets, held_out.timesteps.T):
        assert ((column >= first) & (column <= last)).all()

    branch = BrushNetModel.from_unet(components.unet).train()
    loss = _evaluate(components, held_out, branch)
    assert loss == _evaluate(components, held_out, branch) == _evaluate(components, again, branch)
    assert branch.training  # put back in training mode

    ema = EMAModel(branch.parameters(), decay=0.5)
    with torch.no_grad():
        for parameter in branch.parameters():
            parameter.add_(0.01)
    trained = _evaluate(components, held_out, branch)
    assert trained != loss
    own = [parameter.clone() for parameter in branch.parameters()]
    assert _evaluate(components, held_out, branch, ema=ema) == loss  # the EMA still holds the first weights
    assert all(torch.equal(a, b) for a, b in zip(own, branch.parameters()))


def test_the_terms_unconditional_half_is_a_setting_of_the_set_when_a_term_is_on(base_config):
    """With a guidance term on, ``unconditional_embeds`` changes the held-out numbers, so a resume that switches it
    starts a new curve (its settings differ) instead of mixing both in one; with the terms off it changes nothing
    and is not recorded (runs recorded before it keep their curve)."""
    values = {**base_config, "validation_loss_steps": 1, "validation_loss_samples": 2}

    def settings(**options):
        return load_held_out_set(make_config({**values, **options}), 1000).settings

    assert "unconditional_embeds" not in settings(unconditional_embeds="zeros")
    on = {"kept_invariance_weight": 1.0}
    encoded, zeros = (
        settings(unconditional_embeds="encoded", **on),
        settings(unconditional_embeds="zeros", **on),
    )
    assert encoded["unconditional_embeds"] == "encoded" and zeros["unconditional_embeds"] == "zeros"


def test_a_run_logs_and_records_it_and_never_trains_on_it(base_config, tmp_path, shards, monkeypatch, caplog):
    """Every N steps, at step 0 and at the end: the record, the log line and TensorBoard; the recorded number is that
    of the exported weights; the held-out samples are never in a training batch (over 2+ epochs), the others are."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trained = _TrainedKeys(monkeypatch)
    config = make_config({**base_config, "report_to": "tensorboard", "max_train_steps": 7, "checkpointing_steps": 100,
                          "validation_loss_steps": 3, "validation_loss_samples": 3})  # fmt: skip
    with caplog.at_level(logging.INFO, logger="brushnet.training.validation_loss"):
        result = loop.train(config)

    record = _record(config.output_dir)
    held = record["samples"]
    assert record["source"] == f"held out of --train_shards {config.train_shards}" and len(held) == 3
    assert record["timestep_buckets"] == [[0, 199], [200, 399], [400, 599], [600, 799], [800, 999]]
    assert [e["step"] for e in record["evaluations"]] == [0, 3, 6, 7]
    losses = [e["loss"] for e in record["evaluations"]]
    assert len(set(losses)) == 4  # it follows the training
    for entry in record["evaluations"]:
        assert len(entry["bucket_losses"]) == 5
        assert entry["loss"] == pytest.approx(sum(entry["bucket_losses"]) / 5)
    assert not set(held) & set(trained.keys)
    assert set(trained.keys) | set(held) == set(shards.valid_keys)
    assert len(trained.keys) == 7 * 2  # 6 samples left: the run went through its data more than twice

    messages = [r.getMessage() for r in caplog.records if "validation_loss=" in r.getMessage()]
    assert len(messages) == 4 and messages[-1].startswith(
        f"step 7: validation_loss={losses[-1]:.4g} (3 held-out"
    )

    events = EventAccumulator(str(Path(config.output_dir) / "logs" / "brushnet")).Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("validation_loss")] == list(
        zip([0, 3, 6, 7], losses)
    )
    assert [e.step for e in events.Scalars("validation_loss/t800-999")] == [0, 3, 6, 7]

    components = loop.load_components(config.pretrained_model_name_or_path)
    loop.freeze(components, torch.float32, "cpu")
    final = BrushNetModel.from_pretrained(result.final_model_dir)
    # the last bits may differ: the exported model is loaded anew
    assert _evaluate(components, load_held_out_set(config, 1000), final) == pytest.approx(
        losses[-1], rel=1e-6
    )


def test_resume_keeps_the_set_and_repeats_the_numbers(base_config, tmp_path, caplog):
    """2 steps + resume + 2 steps: the same held-out set, the same training losses and the same validation losses as
    4 steps in one run; the checkpoint names its held-out samples, a resumed run forgets an abandoned run's later
    evaluations, and a record of another set is moved aside."""
    values = {**base_config, "validation_loss_steps": 2, "validation_loss_samples": 2}
    straight = loop.train(make_config({**values, "output_dir": str(tmp_path / "a"), "max_train_steps": 4}))
    split = {**values, "output_dir": str(tmp_path / "b")}
    first = loop.train(make_config({**split, "max_train_steps": 2}))
    second = loop.train(make_config({**split, "max_train_steps": 4, "resume_from_checkpoint": "latest"}))
    assert first.losses + second.losses == straight.losses
    a, b = _record(tmp_path / "a"), _record(tmp_path / "b")
    assert a == b and [e["step"] for e in b["evaluations"]] == [0, 2, 4]
    state = json.loads((tmp_path / "b" / "checkpoint-2" / "training_state.json").read_text())
    assert state["held_out_samples"] == b["samples"]

    # from checkpoint-2 again, to step 3: the abandoned step-4 evaluation goes, steps 0 and 2 stay
    third = loop.train(make_config({**split, "max_train_steps": 3, "resume_from_checkpoint": str(tmp_path / "b" /
                                                                                                  "checkpoint-2")}))  # fmt: skip
    assert third.global_step == 3
    assert [e["step"] for e in _record(tmp_path / "b")["evaluations"]] == [0, 2, 3]
    assert _record(tmp_path / "b")["evaluations"][:2] == b["evaluations"][:2]

    # another bucket count is another set: its numbers are not comparable, the old record is moved aside
    loop.train(make_config({**values, "output_dir": str(tmp_path / "a"), "max_train_steps": 5,
                            "validation_loss_buckets": 2, "resume_from_checkpoint": "latest"}))  # fmt: skip
    assert json.loads((tmp_path / "a" / "validation_loss.before-step-4.json").read_text()) == a
    assert [e["step"] for e in _record(tmp_path / "a")["evaluations"]] == [5]

    # a checkpoint of a run that held nothing out: its steps may have trained on the held-out samples
    loop.train(make_config({**base_config, "output_dir": str(tmp_path / "c"), "max_train_steps": 2}))
    with caplog.at_level(logging.WARNING, logger="brushnet.training.loop"):
        loop.train(make_config({**values, "output_dir": str(tmp_path / "c"), "max_train_steps": 3,
                                "resume_from_checkpoint": "latest"}))  # fmt: skip
    assert any("did not hold out the samples this run holds out" in r.getMessage() for r in caplog.records)


def test_a_run_recorded_before_the_terms_half_was_keeps_its_curve(base_config, tmp_path):
    """With a guidance term on, a record written before ``unconditional_embeds`` was a setting of the set (and a
    checkpoint recorded before the option) is the same set when the resumed run uses the half those runs used (the
    family's fixed one): its curve goes on. Switching the half on the resume starts a new one."""
    import yaml

    values = {
        **base_config,
        "validation_loss_steps": 1,
        "validation_loss_samples": 2,
        "kept_invariance_weight": 1.0,
    }
    out = tmp_path / "run"
    loop.train(make_config({**values, "output_dir": str(out), "max_train_steps": 2}))
    record = _record(out)
    assert record["settings"]["unconditional_embeds"] == "encoded"
    del record["settings"]["unconditional_embeds"]  # as written before the setting existed
    (out / "validation_loss.json").write_text(json.dumps(record))
    for config_file in (out / "train_config.yaml", out / "checkpoint-2" / "train_config.yaml"):
        recorded = yaml.safe_load(config_file.read_text())
        del recorded["unconditional_embeds"]
        config_file.write_text(yaml.safe_dump(recorded, sort_keys=False))
    loop.train(
        make_config(
            {**values, "output_dir": str(out), "max_train_steps": 3, "resume_from_checkpoint": "latest"}
        )
    )
    assert [e["step"] for e in _record(out)["evaluations"]] == [0, 1, 2, 3]
    assert not list(out.glob("validation_loss.before-step-*.json"))
    # switched on a resume: another set of numbers, the old curve moved aside
    loop.train(make_config({**values, "output_dir": str(out), "max_train_steps": 4, "resume_from_checkpoint": "latest",
                            "unconditional_embeds": "zeros"}))  # fmt: skip
    # resumed from checkpoint-2: the old curve is moved aside whole, the new one starts after it
    assert [e["step"] for e in _record(out)["evaluations"]] == [3, 4]
    aside = json.loads((out / "validation_loss.before-step-2.json").read_text())
    assert [e["step"] for e in aside["evaluations"]] == [0, 1, 2, 3]


def _image_folder(root: Path, count: int, seed: int) -> Path:
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        pixels = (torch.rand(20, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"img{i}.png")
    return root


def test_image_folders_held_out_and_given(base_config, tmp_path, monkeypatch):
    """A folder: the images held out are never trained on. Separate held-out data: training sees the same batches,
    noise and timesteps as without the validation loss (the evaluation draws nothing from the run's randomness)."""
    trained = _TrainedKeys(monkeypatch)
    folder = {**base_config, "train_shards": None, "train_data_dir": str(_image_folder(tmp_path / "train", 7, 0)),
              "mask": {"mode": "brush"}}  # fmt: skip
    config = make_config({**folder, "output_dir": str(tmp_path / "a"), "max_train_steps": 4,
                          "validation_loss_steps": 3, "validation_loss_samples": 3})  # fmt: skip
    loop.train(config)
    held = _record(tmp_path / "a")["samples"]
    assert len(held) == 3 and all(name.endswith(".png") for name in held)
    stems = {name[: -len(".png")] for name in held}
    assert not stems & set(trained.keys) and len(set(trained.keys)) == 4 and len(trained.keys) == 8

    given = str(_image_folder(tmp_path / "held", 3, 1))
    with_loss = loop.train(make_config({**folder, "output_dir": str(tmp_path / "b"), "max_train_steps": 3,
                                        "validation_loss_steps": 2, "validation_data_dir": given}))  # fmt: skip
    without = loop.train(make_config({**folder, "output_dir": str(tmp_path / "c"), "max_train_steps": 3}))
    assert with_loss.losses == without.losses
    record = _record(tmp_path / "b")
    assert record["source"] == f"--validation_data_dir {given}"
    assert record["samples"] == ["img0.png", "img1.png", "img2.png"]
    assert [e["step"] for e in record["evaluations"]] == [0, 2, 3]
    a, b = (
        load_file(Path(r.final_model_dir) / "diffusion_pytorch_model.safetensors")
        for r in (with_loss, without)
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
