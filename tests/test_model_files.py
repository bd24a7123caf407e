"""Broken checkpoints are one line naming the file and the problem, before any model is built (issue 19,
"Checkpoints"): empty, truncated or garbage ``.safetensors``, missing weights, a config that is a list or has
wrong value types, a weight file under another name, a model of the wrong kind. Each case runs through the
command line too: exit 2, one ``error:`` line, no traceback, nothing written."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from brushnet.cli import app
from brushnet.errors import CheckpointError
from brushnet.loading import load_base_components, load_brushnet
from brushnet.model_files import check_config_types, safetensors_keys

runner = CliRunner()
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _empty(folder):
    (folder / WEIGHTS).write_bytes(b"")


def _truncated(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _garbage(folder):
    (folder / WEIGHTS).write_bytes(bytes(range(256)) * 20)


def _missing_keys(folder):
    weights = load_file(folder / WEIGHTS)
    for key in sorted(weights)[:3]:
        del weights[key]
    save_file(weights, folder / WEIGHTS)


def _config(value):
    def corrupt(folder):
        (folder / "config.json").write_text(
            json.dumps(value(json.loads((folder / "config.json").read_text())))
        )

    return corrupt


def _renamed(folder):
    (folder / WEIGHTS).rename(folder / "model.safetensors")


CORRUPTIONS = {
    "empty": (_empty, "is empty (0 bytes)"),
    "truncated": (_truncated, "is truncated"),
    "garbage": (_garbage, "is not a safetensors file"),
    "missing weights": (_missing_keys, "lacks 3 of the"),
    "config is a list": (
        _config(lambda c: [c]),
        "config.json must hold a JSON object of settings, got a list",
    ),
    "config wrong type": (
        _config(lambda c: {**c, "block_out_channels": "abc"}),
        'block_out_channels must be a list of numbers, got "abc"',
    ),
    "config wrong scalar": (
        _config(lambda c: {**c, "layers_per_block": "two"}),
        "layers_per_block must be a number",
    ),
    "config not json": (lambda f: (f / "config.json").write_text("{"), "is not valid JSON"),
    "weights renamed": (_renamed, "has model.safetensors but diffusers loads " + WEIGHTS),
}


@pytest.fixture
def broken(tiny_models, tmp_path):
    """``broken(kind, corruption)``: a copy of the tiny branch (``"brushnet"``) or base (``"unet"``, ``"vae"``)
    with one corruption; returns (the path to pass, the folder that was corrupted)."""

    def make(kind, corruption):
        if kind == "brushnet":
            path = folder = tmp_path / "brushnet"
            shutil.copytree(tiny_models["brushnet"], path)
        else:
            path = tmp_path / "base"
            shutil.copytree(tiny_models["base"], path)
            folder = path / kind
        CORRUPTIONS[corruption][0](folder)
        return path, folder

    return make


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("kind", ["brushnet", "unet", "vae"])
def test_a_broken_model_folder_is_one_line_naming_the_file(broken, kind, corruption):
    path, folder = broken(kind, corruption)
    load = load_brushnet if kind == "brushnet" else load_base_components
    with pytest.raises(CheckpointError) as error:
        load(path)
    message = str(error.value)
    assert CORRUPTIONS[corruption][1] in message and str(folder) in message and "\n" not in message


def test_a_truncated_text_encoder_is_named(tiny_models, tmp_path):
    base = shutil.copytree(tiny_models["base"], tmp_path / "base")
    weights = base / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{weights} is truncated"):
        load_base_components(base)
    (base / "text_encoder" / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="got a list"):
        load_base_components(base)


def test_a_folder_of_a_variant_only_names_the_variant_that_loads_it(tiny_models, tmp_path):
    """``BrushNetModel.from_pretrained`` on a folder of ``diffusion_pytorch_model.fp16.safetensors`` only said
    "rename the file", where ``variant="fp16"`` loads it."""
    from brushnet.models import BrushNetModel

    folder = shutil.copytree(tiny_models["brushnet"], tmp_path / "fp16")
    (folder / WEIGHTS).rename(folder / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(CheckpointError) as info:
        BrushNetModel.from_pretrained(folder)
    assert str(info.value) == (
        f"{folder} has only the fp16 variant of its weights (diffusion_pytorch_model.fp16.safetensors): load it "
        'with variant="fp16"'
    )
    assert BrushNetModel.from_pretrained(folder, variant="fp16").num_down_residuals > 0


def test_safetensors_header_checks_read_no_tensor(tiny_models, tmp_path):
    source = tiny_models["brushnet"] / WEIGHTS
    assert safetensors_keys(source) == set(load_file(source))
    cases = {
        b"": "is empty",
        b"\x01\x00": "too short",
        (10**9).to_bytes(8, "little") + b"{": "no safetensors header",
        (500).to_bytes(8, "little") + b'{"a": ': "header alone needs 508",
        (20).to_bytes(8, "little") + b'{"a": [1, 2, 3]}    ': "unreadable header",
    }
    for data, message in cases.items():
        (tmp_path / "w.safetensors").write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            safetensors_keys(tmp_path / "w.safetensors")


def test_config_types_accept_every_shipped_config():
    """No false alarm on real configs: the shipped demo models, the golden fixtures, the random presets."""
    import diffusers

    from brushnet.demo.assets import DEMO_DIR
    from brushnet.models import BrushNetModel

    roots = [DEMO_DIR, os.path.join(os.path.dirname(__file__), "fixtures")]
    checked = 0
    for root in roots:
        for dirpath, _, files in os.walk(root):
            if "config.json" not in files:
                continue
            path = os.path.join(dirpath, "config.json")
            config = json.loads(open(path).read())
            name = config.get("_class_name") if isinstance(config, dict) else None
            cls = BrushNetModel if name == "BrushNetModel" else getattr(diffusers, str(name), None)
            if cls is None or not hasattr(cls, "from_config"):
                continue
            check_config_types(cls, config, path)
            checked += 1
    assert checked >= 10


def test_wrong_kinds_are_named_before_loading(tiny_models, tmp_path):
    from diffusers import ControlNetModel

    from brushnet.loading import load_model

    with pytest.raises(CheckpointError, match="holds a UNet2DConditionModel, not a ControlNetModel"):
        load_model(ControlNetModel, tiny_models["base"] / "unet", "ControlNet")
    with pytest.raises(CheckpointError, match="holds a BrushNetModel, not a ControlNetModel"):
        load_model(ControlNetModel, tiny_models["brushnet"], "ControlNet")
    base = shutil.copytree(tiny_models["base"], tmp_path / "base")
    shutil.rmtree(base / "unet")
    shutil.copytree(tiny_models["brushnet"], base / "unet")  # was "unknown mid_block_type: MidBlock2D"
    with pytest.raises(CheckpointError, match="unet holds a BrushNetModel, not a UNet2DConditionModel"):
        load_base_components(base)


def _cli_inpaint(tmp_path, *models):
    from PIL import Image

    Image.new("RGB", (32, 32), (90, 120, 30)).save(tmp_path / "img.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out" / "o.png"
    args = ["inpaint", *models, "-i", str(tmp_path / "img.png"), "-m", str(tmp_path / "mask.png")]
    return runner.invoke(app, [*args, "-o", str(out), "--steps", "1", "-q"]), out.parent


def _one_line(result, message):
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_cli_broken_brushnet_or_base(tiny_models, broken, tmp_path, corruption):
    for kind in ("brushnet", "unet"):
        path, _ = broken(kind, corruption)
        models = {"base": tiny_models["base"], "brushnet": tiny_models["brushnet"]}
        models["brushnet" if kind == "brushnet" else "base"] = path
        result, out = _cli_inpaint(
            tmp_path, "--base", str(models["base"]), "--brushnet", str(models["brushnet"])
        )
        _one_line(result, CORRUPTIONS[corruption][1])
        assert not out.exists() or list(out.iterdir()) == []
        shutil.rmtree(path)


def test_cli_wrong_model_kinds(tiny_models, tmp_path):
    base, unet = str(tiny_models["base"]), str(tiny_models["base"] / "unet")
    cases = [
        (["--base", base, "--brushnet", unet], "holds a UNet2DConditionModel, not a BrushNetModel"),
        (
            ["--base", str(tiny_models["brushnet"]), "--brushnet", str(tiny_models["brushnet"])],
            "not a full base",
        ),
        (["--method", "controlnet-inpaint", "--base", base, "--controlnet", unet], "not a ControlNetModel"),
    ]
    for models, message in cases:
        result, out = _cli_inpaint(tmp_path, *models)
        _one_line(result, message)


def test_a_hub_id_offline_says_so_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    result, _ = _cli_inpaint(tmp_path, "--base", "someone/not-cached-model", "--brushnet", "someone/branch")
    _one_line(result, "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local cache")
    assert "pass a local folder" in result.output
    assert time.perf_counter() - start < 10
    with pytest.raises(CheckpointError, match="not in the local cache"):
        load_brushnet("someone/branch")
    from brushnet.models.brushnet import BrushNetModel

    mine = tmp_path / "my-cache"
    with pytest.raises(
        CheckpointError, match=f"not in the local cache \\({mine}\\)"
    ):  # the cache it looked in
        BrushNetModel.from_pretrained("someone/branch", cache_dir=str(mine))


def test_a_misspelt_folder_under_a_local_folder_is_not_found_not_a_hub_id(tiny_models, monkeypatch):
    """``tiny/brushnett`` where ``tiny/`` is a folder here is a local path whose folder is missing (it read as the
    hub id ``tiny/brushnett``: "the hub is unreachable ... pass a local folder")."""
    root = tiny_models["root"]
    monkeypatch.chdir(root.parent)
    misspelt = f"{root.name}/brushnett"
    with pytest.raises(CheckpointError, match=f"^BrushNet checkpoint not found: {misspelt}$"):
        load_brushnet(misspelt)
    assert load_brushnet(f"{root.name}/brushnet").num_down_residuals > 0


@pytest.mark.parametrize(
    "case", ["unet as branch", "controlnet-like as branch", "branch as base", "truncated"]
)
def test_train_refuses_wrong_or_broken_models_in_one_line(tiny_models, broken, tmp_path, capsys, case):
    """``train`` loads through the same checks (it said "Cannot copy out of meta tensor" for a UNet branch)."""
    from brushnet.data.synthetic import write_synthetic_shards
    from brushnet.training.entry import main

    shards = write_synthetic_shards(tmp_path / "shards", num_shards=1, samples_per_shard=2, size=16)
    base, branch = tiny_models["base"], None
    if case == "unet as branch":
        branch, message = tiny_models["base"] / "unet", "holds a UNet2DConditionModel, not a BrushNetModel"
    elif case == "controlnet-like as branch":
        branch = shutil.copytree(tiny_models["base"] / "unet", tmp_path / "cn")
        _config(lambda c: {**c, "_class_name": "ControlNetModel"})(branch)
        message = "holds a ControlNetModel, not a BrushNetModel"
    elif case == "branch as base":
        base, message = tiny_models["brushnet"], "holds a BrushNetModel, not a full base model folder"
    else:
        branch, _ = broken("brushnet", "truncated")
        message = "is truncated"
    argv = ["--pretrained_model_name_or_path", str(base), "--train_shards", str(shards.paths[0])]
    argv += ["--output_dir", str(tmp_path / "run"), "--resolution", "16", "--max_train_steps", "1"]
    argv += ["--report_to", "none"] + (["--brushnet_model_name_or_path", str(branch)] if branch else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_a_hub_id_without_network_says_so_at_once(tmp_path, monkeypatch):
    """Not in offline mode, but the hub does not answer (a closed port stands for no network)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    with pytest.raises(
        CheckpointError, match=r"the hub \(http://127.0.0.1:9\) is unreachable and it is not in the"
    ):
        load_base_components("someone/not-cached-model")
    with pytest.raises(CheckpointError, match="pass a local folder instead"):
        load_brushnet("someone/branch")
    assert time.perf_counter() - start < 10  # no retries with back-off (they took 28-38 s)


def test_cli_powerpaint_and_brushnet_folders_swapped(tmp_path):
    """The shipped demo's PowerPaint folder as ``--brushnet`` and its BrushNet as ``--powerpaint`` (it said "holds a
    unknown" and "has the PowerPaint v2 branch but not its text encoder")."""
    import brushnet

    demo = Path(brushnet.__file__).parent / "assets" / "demo_world"
    base, powerpaint, branch = (str(demo / name) for name in ("base", "powerpaint", "brushnet"))
    result, _ = _cli_inpaint(tmp_path, "--base", base, "--brushnet", powerpaint)
    _one_line(
        result,
        "is a PowerPaint v2 checkpoint (PowerPaint_Brushnet/, text_encoder_brushnet/), not a BrushNet",
    )
    assert f"use --method powerpaint --powerpaint {powerpaint}" in result.output
    result, _ = _cli_inpaint(tmp_path, "--method", "powerpaint", "--base", base, "--powerpaint", branch)
    _one_line(result, f"{branch} is a BrushNet checkpoint, not a PowerPaint one")
    assert "text encoder" not in result.output
