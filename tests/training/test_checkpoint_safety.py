"""Resuming runs no code from a checkpoint; a malformed checkpoint or a full disk is one line; no crash loses a
checkpoint (issue 20, items 2 and 8; issue 19, training checkpoints)."""

import json
import os
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from brushnet.errors import CheckpointError
from brushnet.training import checkpointing, folders, loop
from brushnet.training.config import make_config
from brushnet.training.entry import main


class Evil:
    """Unpickled with full pickle, this creates the folder ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _weights(result):
    return load_file(result.final_model_dir / "diffusion_pytorch_model.safetensors")


def _flags(config: dict) -> list[str]:
    """``brushnet train`` flags for a config dict (the nested mask recipe goes through --mask_mode)."""
    flags = []
    for key, value in config.items():
        if key == "mask":
            flags += ["--mask_mode", value["mode"]]
        elif isinstance(value, bool):
            flags.append(f"--{key}" if value else f"--no-{key}")
        else:
            flags += [f"--{key}", str(value)]
    return flags


def _main(config: dict, capsys) -> tuple[int, str]:
    status = main(_flags(config))
    return status, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, shards, tiny_base):
    """A 2-step run with EMA (its checkpoint-2) and the straight 4-step run to compare resumed runs with."""
    root = tmp_path_factory.mktemp("ema_run")
    config = {
        "pretrained_model_name_or_path": str(tiny_base),
        "train_shards": str(shards.paths[0].parent),
        "resolution": 16,
        "train_batch_size": 2,
        "learning_rate": 1e-3,
        "seed": 0,
        "shuffle_buffer": 4,
        "mask": {"mode": "mix"},
        "checkpointing_steps": 2,
        "validation_steps": 1000,
        "report_to": "none",
        "use_ema": True,
        "ema_decay": 0.5,
    }
    straight = loop.train(make_config({**config, "output_dir": str(root / "straight"), "max_train_steps": 4}))
    loop.train(make_config({**config, "output_dir": str(root / "first"), "max_train_steps": 2}))
    return config, root / "first" / "checkpoint-2", _weights(straight)


@pytest.fixture
def checkpoint(ema_run, tmp_path):
    """A fresh copy of the EMA run's checkpoint-2 in its own output folder, and the config to resume it."""
    config, source, _ = ema_run
    out = tmp_path / "run"
    shutil.copytree(source, out / "checkpoint-2")
    return out / "checkpoint-2", {
        **config,
        "output_dir": str(out),
        "max_train_steps": 4,
        "resume_from_checkpoint": "latest",
    }


def test_checkpoint_holds_no_pickle_of_our_own(checkpoint):
    path, _ = checkpoint
    names = sorted(p.name for p in path.iterdir() if p.is_file())
    assert "ema_state.safetensors" in names and "process_state_0.safetensors" in names
    assert not [n for n in names if n.startswith("custom_checkpoint")]
    # the only pickle-format files are accelerate's, and each holds only tensors and plain values
    from accelerate.utils import load

    pickles = sorted(n for n in names if n.endswith((".bin", ".pkl", ".pt")))
    assert pickles == ["optimizer.bin", "random_states_0.pkl", "scheduler.bin"]
    for name in pickles:
        load(path / name, weights_only=True)


@pytest.mark.parametrize(
    "name",
    [
        "optimizer.bin",
        "scheduler.bin",
        "random_states_0.pkl",
        "custom_checkpoint_0.pkl",
        "process_state_0.pt",
    ],
)
def test_a_crafted_pickle_in_a_checkpoint_runs_no_code(checkpoint, tmp_path, capsys, name):
    path, config = checkpoint
    marker = tmp_path / "pwned"
    if name == "process_state_0.pt":  # an earlier version's format, still read (safely)
        (path / "process_state_0.safetensors").unlink()
    if (
        name == "custom_checkpoint_0.pkl"
    ):  # an earlier version's EMA state (accelerate read it with full pickle)
        (path / "ema_state.safetensors").unlink()
        (path / "ema_state.json").unlink()
    torch.save({"state": Evil(marker)}, path / name)
    status, line = _main(config, capsys)
    assert not marker.exists(), "code from the checkpoint ran"
    assert status == 2
    assert line == (
        f"error: {path / name} holds more than tensors and plain values (a reference to posix.mkdir: loading it "
        "could run code); refused"
    )


def test_an_earlier_versions_ema_checkpoint_resumes_exactly(ema_run, checkpoint):
    """Checkpoints written before this change kept the EMA as accelerate's custom_checkpoint_0.pkl: they are
    read with weights_only and resume bit-identically."""
    _, _, straight = ema_run
    path, config = checkpoint
    shadow = load_file(path / "ema_state.safetensors")
    state = json.loads((path / "ema_state.json").read_text())
    state["shadow_params"] = [shadow[key] for key in sorted(shadow)]
    torch.save(state, path / "custom_checkpoint_0.pkl")
    (path / "ema_state.safetensors").unlink()
    (path / "ema_state.json").unlink()
    generator = load_file(path / "process_state_0.safetensors")
    torch.save({"step_generator": {"state": generator["step_generator.state"]}}, path / "process_state_0.pt")
    (path / "process_state_0.safetensors").unlink()
    resumed = _weights(loop.train(make_config(config)))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "training_state.json").write_text("{not json"), "training_state.json is unreadable"),
        (lambda p: (p / "training_state.json").write_text("[1, 2]"), "training_state.json is malformed"),
        (lambda p: (p / "training_state.json").write_text('{"global_step": "2", "data_positions": [[0, 2]]}'),
         "training_state.json is malformed"),
        (lambda p: (p / "training_state.json").write_text('{"global_step": 2, "data_positions": [[0]]}'),
         "training_state.json is malformed"),
        (lambda p: (p / "optimizer.bin").write_bytes((p / "optimizer.bin").read_bytes()[:100]), "cannot read"),
        (lambda p: (p / "random_states_0.pkl").write_bytes(b"garbage"), "cannot read"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\0" * 8), "cannot resume from"),
        (lambda p: (p / "process_state_0.safetensors").unlink(), "has no state for process 0"),
        (lambda p: (p / "ema_state.safetensors").write_bytes(b"junk"), "cannot read the EMA state"),
    ],
)  # fmt: skip
def test_a_malformed_checkpoint_is_one_line(checkpoint, capsys, damage, message):
    path, config = checkpoint
    damage(path)
    status, line = _main(config, capsys)
    assert status == 2 and line.startswith("error: ") and message in line, line
    assert "Traceback" not in capsys.readouterr().err


def test_train_refuses_pickle_weights_without_allow_pickle(tiny_base, shards, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    unet = base / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(unet), unet.with_suffix(".bin"))
    unet.unlink()
    config = {
        "pretrained_model_name_or_path": str(base),
        "train_shards": str(shards.paths[0].parent),
        "output_dir": str(tmp_path / "run"),
        "resolution": 16,
        "train_batch_size": 2,
        "max_train_steps": 1,
        "report_to": "none",
        "mask": {"mode": "mix"},
    }
    status, line = _main(config, capsys)
    assert status == 2 and "pass --allow-pickle" in line and "only pickle-based weights" in line
    assert main(_flags({**config, "allow_pickle": True})) == 0
    assert (tmp_path / "run" / "brushnet" / "diffusion_pytorch_model.safetensors").is_file()
    # a branch saved as .bin is refused the same way
    branch = tmp_path / "branch"
    shutil.copytree(tmp_path / "run" / "brushnet", branch)
    weights = branch / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    status, line = _main({**config, "pretrained_model_name_or_path": str(tiny_base), "brushnet_model_name_or_path":
                          str(branch), "output_dir": str(tmp_path / "run2")}, capsys)  # fmt: skip
    assert status == 2 and "pass --allow-pickle" in line


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(
    base_config, monkeypatch, capsys
):
    config = {**base_config, "max_train_steps": 4}
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    status, line = _main(config, capsys)
    monkeypatch.undo()
    assert status == 2
    assert line.startswith(f"error: cannot save checkpoint-4 in {config['output_dir']}: [enforce fail at")
    assert line.endswith("the earlier checkpoints are untouched")
    out = Path(config["output_dir"])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    # the previous checkpoint stays loadable: a run resumes from it and finishes
    assert main(_flags({**config, "resume_from_checkpoint": "latest"})) == 0
    assert (out / "checkpoint-4").is_dir()


# -- crash points -------------------------------------------------------------------------------------------


class Killed(BaseException):
    """A simulated kill: not an ``Exception``, so no clean-up handler runs."""


def _fake_checkpoint(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl"):
        (path / name).write_text(content)
    (path / checkpointing.TRAINING_STATE_FILE).write_text(json.dumps({"content": content}))
    return path


def _content(path: Path) -> str | None:
    """The checkpoint's content if it is complete (every file there and agreeing), else None."""
    names = ("model.safetensors", "optimizer.bin", "random_states_0.pkl")
    if (
        not all((path / n).is_file() for n in names)
        or not (path / checkpointing.TRAINING_STATE_FILE).is_file()
    ):
        return None
    contents = {(path / n).read_text() for n in names}
    return contents.pop() if len(contents) == 1 else None


def _kill_at(monkeypatch, number: int) -> dict:
    """Kill the process at the ``number``-th folder operation of :mod:`brushnet.training.folders` (a rename, or
    a deletion, which then stops halfway: one file gone, the rest left)."""
    calls = {"n": 0}

    def tick():
        calls["n"] += 1
        if calls["n"] == number:
            raise Killed

    def replace(src, dst):
        tick()
        os.replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if calls["n"] + 1 == number:
            next(p for p in Path(path).rglob("*") if p.is_file()).unlink()  # half-deleted
        tick()
        shutil.rmtree(path, *args, **kwargs)

    proxy = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    proxy.replace = replace
    monkeypatch.setattr(folders, "os", proxy)
    monkeypatch.setattr(folders.shutil, "rmtree", rmtree)
    return calls


@pytest.mark.parametrize("kill_at", range(1, 7))
def test_a_kill_while_replacing_a_same_step_checkpoint_loses_nothing(tmp_path, monkeypatch, kill_at):
    final = _fake_checkpoint(tmp_path / "checkpoint-4", "old")
    staging = _fake_checkpoint(tmp_path / "checkpoint-4.tmp-99", "new")
    calls = _kill_at(monkeypatch, kill_at)
    killed = True
    try:
        folders.publish(staging, final)
        killed = False
    except Killed:
        pass
    monkeypatch.undo()
    # before recovery, whatever looks complete is complete
    for _, path in checkpointing.list_checkpoints(tmp_path):
        assert _content(path) in ("old", "new")
    checkpointing.recover_interrupted_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]  # no leftovers
    assert _content(final) == ("old" if killed and kill_at == 1 else "new")
    assert killed == (kill_at <= calls["n"])


@pytest.mark.parametrize("kill_at", [1, 2])
def test_a_kill_during_rotation_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch, kill_at):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}", str(step))
    _kill_at(monkeypatch, kill_at)  # 1: before checkpoint-2 is renamed; 2: halfway through deleting it
    with pytest.raises(Killed):
        checkpointing.rotate_checkpoints(tmp_path, keep=1)
    monkeypatch.undo()
    kept = ["2", "4", "6"] if kill_at == 1 else ["4", "6"]
    assert [_content(path) for _, path in checkpointing.list_checkpoints(tmp_path)] == kept  # all complete
    checkpointing.recover_interrupted_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint-{step}" for step in kept]


@pytest.mark.parametrize("kill_at", range(1, 6))
def test_a_kill_during_the_final_export_keeps_a_whole_model(tmp_path, monkeypatch, tiny_base, kill_at):
    from diffusers import UNet2DConditionModel

    from brushnet.models.brushnet import BrushNetModel

    final = tmp_path / "brushnet"
    final.mkdir()
    (final / "config.json").write_text("old")
    branch = BrushNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_base / "unet"))
    _kill_at(monkeypatch, kill_at)
    try:
        checkpointing.publish_final_model(branch, tmp_path)
    except Killed:
        pass
    monkeypatch.undo()
    checkpointing.recover_interrupted_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brushnet"]
    if (final / "config.json").read_text() != "old":
        BrushNetModel.from_pretrained(final)  # the new export, whole


def test_the_issue_scenario_a_kill_while_replacing_checkpoint_4_then_resume(
    base_config, tmp_path, monkeypatch
):
    """Run to step 4, resume from checkpoint-2 (which saves checkpoint-4 again) and die after the old
    checkpoint-4 was moved aside; the next start finishes the move and the run ends as an uninterrupted one."""
    config = {**base_config, "max_train_steps": 4}
    straight = _weights(loop.train(make_config(config)))
    out = Path(config["output_dir"])
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if Path(src).name == "checkpoint-4":  # the old copy is being moved aside
            os.replace(src, dst)
            raise Killed
        os.replace(src, dst)

    proxy = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    proxy.replace = replace
    monkeypatch.setattr(folders, "os", proxy)
    with pytest.raises(Killed):
        loop.train(make_config({**config, "resume_from_checkpoint": str(out / "checkpoint-2")}))
    monkeypatch.undo()
    assert not (out / "checkpoint-4").exists()  # between the two renames
    resumed = loop.train(make_config({**config, "resume_from_checkpoint": "latest"}))
    assert resumed.global_step == 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    weights = _weights(resumed)
    assert all(torch.equal(weights[k], straight[k]) for k in straight)


def test_publishing_refuses_nothing_and_recover_ignores_other_folders(tmp_path):
    (tmp_path / "logs.tmp-12").mkdir()  # not a checkpoint or the export: never touched
    (tmp_path / "brushnet.tmp-12").mkdir()
    assert checkpointing.recover_interrupted_saves(tmp_path) == [
        "removed brushnet.tmp-12: a save interrupted before it was complete"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tmp-12"]
    with pytest.raises(CheckpointError):
        checkpointing.resolve_checkpoint(tmp_path, "checkpoint-9")


def test_rotation_after_resuming_an_earlier_checkpoint_keeps_the_one_just_saved(
    base_config, caplog, monkeypatch
):
    """A run left checkpoints 2, 4, 6 and 8; resumed from checkpoint-2 with a limit of 2, the rotation after
    saving checkpoint-4 kept 6 and 8 (higher steps, the abandoned run's) and deleted the checkpoint it had just
    written."""
    import logging

    config = {**base_config, "max_train_steps": 8, "checkpointing_steps": 2}
    loop.train(make_config(config))
    out = Path(config["output_dir"])
    written = {}
    real_save = checkpointing.save_checkpoint

    def save_then_look(accelerator, output_dir, step, *args, **kwargs):
        final = real_save(accelerator, output_dir, step, *args, **kwargs)
        written[step] = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
        return final

    resumed = {**config, "max_train_steps": 4, "checkpoints_total_limit": 2,
               "resume_from_checkpoint": str(out / "checkpoint-2")}  # fmt: skip
    monkeypatch.setattr(loop, "save_checkpoint", save_then_look)  # the loop holds its own reference
    with caplog.at_level(logging.WARNING, logger="brushnet.training.loop"):
        loop.train(make_config(resumed))
    assert (
        "resuming from step 2 while" in caplog.text
        and "(checkpoint-4, checkpoint-6, checkpoint-8)" in caplog.text
    )
    assert "checkpoint-4" in written[4] and len(written[4]) == 2, written
