"""``load_method`` tells every model's family before anything loads, whatever form the base takes: a folder, a
single file (with or without a config folder: the file's tensor names) or a hub id in the local cache; and every
model (branch, guide ControlNet, inpaint ControlNet) must be of the base's family, one line naming both."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from brushnet.errors import CheckpointError
from brushnet.methods import load_method


@pytest.fixture(scope="module")
def xl_models(tmp_path_factory):
    from brushnet.random_models import build_model_set

    root = tmp_path_factory.mktemp("xl_family_set")
    return build_model_set(root, ["base", "brushnet", "controlnet"], "tiny-xl")


@pytest.fixture(scope="module")
def single_files(tiny_models, xl_models, tmp_path_factory):
    """Each tiny base written as one original-layout ``.safetensors`` file, as community models are shared."""
    from brushnet.convert import save_single_file

    root = tmp_path_factory.mktemp("single_files")
    return {
        "sd15": str(save_single_file(tiny_models["base"], root / "sd15.safetensors")),
        "sdxl": str(save_single_file(xl_models["base"], root / "xl.safetensors")),
    }


@pytest.fixture
def no_base_load(monkeypatch):
    """Loading a base (from a folder, a hub id or a single file) fails the test: the checks come first."""
    from brushnet import loading

    def loaded(*args, **kwargs):
        raise AssertionError("a base was loaded")

    monkeypatch.setattr(loading, "_load_components", loaded)
    monkeypatch.setattr(loading, "_pipeline_from_single_file", loaded)


def _hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """A Hugging Face cache under ``root`` holding ``files`` ({name in the repo: local file}) of ``repo_id``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    for name, source in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, snapshot / name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return root


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_single_file_base_and_a_branch_of_the_other_family_are_refused_before_loading(
    tiny_models, xl_models, single_files, no_base_load
):
    """With a single-file base the wrong-family branch was refused only after the whole base had loaded."""
    sd15_branch, xl_branch = tiny_models["brushnet"], xl_models["brushnet"]
    for models, message in [
        (  # a config folder: the loader's own message, sizes and all
            {"base": single_files["sdxl"], "base_config": xl_models["base"], "brushnet": sd15_branch},
            r"^this SD1.5 BrushNet \(block_out_channels \[32, 64\]\) does not fit an SDXL base \(block_out_",
        ),
        (  # no config folder: the family from the file's tensor names
            {"base": single_files["sdxl"], "brushnet": sd15_branch},
            rf"^this SD1.5 BrushNet \({sd15_branch}\) does not fit the SDXL base \({single_files['sdxl']}\); "
            "use an SDXL BrushNet with this base$",
        ),
        (
            {"base": single_files["sd15"], "brushnet": xl_branch},
            r"^this SDXL BrushNet \(.*\) does not fit the SD1.5 base \(.*sd15.safetensors\)",
        ),
    ]:
        with pytest.raises(CheckpointError, match=message) as info:
            load_method("brushnet", models)
        _one_line(info)
    for models in (  # the right family passes the checks and reaches the loader
        {"base": single_files["sdxl"], "brushnet": xl_branch},
        {"base": single_files["sd15"], "base_config": tiny_models["base"], "brushnet": sd15_branch},
    ):
        with pytest.raises(AssertionError, match="a base was loaded"):
            load_method("brushnet", models)


def test_controlnets_of_the_other_family_are_refused_before_loading(
    tiny_models, xl_models, single_files, no_base_load
):
    """An SD1.5 ControlNet with an SDXL base (or the reverse), as the guide ControlNet or controlnet-inpaint's, was
    refused only after the base and the branch had loaded, though the folders' configs tell the families."""
    xl = {"base": xl_models["base"], "brushnet": xl_models["brushnet"]}
    sd15 = {"base": tiny_models["base"], "brushnet": tiny_models["brushnet"]}
    for method, models, message in [
        (
            "brushnet",
            {**xl, "guide_controlnet": tiny_models["controlnet"]},
            rf"^this SD1.5 ControlNet \({tiny_models['controlnet']}\) does not fit the SDXL base "
            rf"\({xl_models['base']}\); use an SDXL ControlNet with this base$",
        ),
        (
            "brushnet",
            {**sd15, "guide_controlnet": xl_models["controlnet"]},
            r"^this SDXL ControlNet \(.*\) does not fit the SD1.5 base",
        ),
        (
            "controlnet-inpaint",
            {"base": xl_models["base"], "controlnet": tiny_models["controlnet"]},
            r"^this SD1.5 ControlNet \(.*\) does not fit the SDXL base",
        ),
        (
            "controlnet-inpaint",
            {"base": tiny_models["base"], "controlnet": xl_models["controlnet"]},
            r"^this SDXL ControlNet \(.*\) does not fit the SD1.5 base",
        ),
    ]:
        with pytest.raises(CheckpointError, match=message) as info:
            load_method(method, models)
        _one_line(info)
    for controlnet in (xl_models["controlnet"], single_files["sd15"]):  # a file is not read as a base's keys
        with pytest.raises(AssertionError, match="a base was loaded"):
            load_method("brushnet", {**xl, "guide_controlnet": controlnet})


def test_a_cached_hub_id_is_checked_from_its_cached_config(
    tiny_models, xl_models, tmp_path, monkeypatch, no_base_load
):
    """A hub id (offline, from the local cache) as the base or a ControlNet: the family from its cached config,
    before anything loads. A hub id whose config is not cached skips the check (the loader says it is not cached)."""
    xl_base = Path(xl_models["base"])
    cache = _hub_cache(
        tmp_path / "hub", "someone/tiny-xl", {"unet/config.json": xl_base / "unet" / "config.json"}
    )
    _hub_cache(
        cache, "someone/controlnet-sd15", {"config.json": Path(tiny_models["controlnet"]) / "config.json"}
    )
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    for method, models, message in [
        (
            "brushnet",
            {"base": "someone/tiny-xl", "brushnet": tiny_models["brushnet"]},
            r"^this SD1.5 BrushNet \(block_out_channels \[32, 64\]\) does not fit an SDXL base",
        ),
        (
            "controlnet-inpaint",
            {"base": xl_models["base"], "controlnet": "someone/controlnet-sd15"},
            r"^this SD1.5 --controlnet model \(someone/controlnet-sd15\) does not fit the SDXL base",
        ),
    ]:
        with pytest.raises(CheckpointError, match=message) as info:
            load_method(method, models)
        _one_line(info)
    with pytest.raises(AssertionError, match="a base was loaded"):  # the right family passes
        load_method("brushnet", {"base": "someone/tiny-xl", "brushnet": xl_models["brushnet"]})
    with pytest.raises(CheckpointError, match="'someone/not-cached': offline mode is on"):
        load_method("brushnet", {"base": "someone/not-cached", "brushnet": tiny_models["brushnet"]})


def test_a_single_file_of_a_family_the_method_lacks_is_refused_before_loading(single_files, no_base_load):
    """HD-Painter has an SD1.5 form only: an SDXL single-file inpainting model was refused after it had loaded."""
    with pytest.raises(CheckpointError, match="^method 'hd-painter' has no SDXL form") as info:
        load_method("hd-painter", {"inpaint_model": single_files["sdxl"]})
    _one_line(info)
