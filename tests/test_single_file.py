"""Single-file base models: a diffusers folder exported to the original layout loads back identically."""

import pytest
import torch

from brushnet.convert import save_single_file
from brushnet.loading import CheckpointError, load_base_components
from brushnet.random_models import PRESETS, ArchSpec, build_base

# two resnets per block exercise the LDM block-index arithmetic that one layer per block would hide
TWO_LAYERS = ArchSpec((32, 64, 64), 2, 32, 4, 8, (8, 16), 1, 32, 2, 2, 37, 8)


@pytest.fixture(scope="module", params=["tiny", "two_layers"])
def exported(request, tmp_path_factory):
    spec = PRESETS["tiny"] if request.param == "tiny" else TWO_LAYERS
    root = tmp_path_factory.mktemp(f"single_{request.param}")
    folder = build_base(root / "base", spec, seed=3)
    path = save_single_file(folder, root / "model.safetensors")
    return folder, path


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_single_file_loads_back_every_weight(exported):
    folder, path = exported
    from_folder = load_base_components(folder)
    from_file = load_base_components(path, config=folder)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same(from_folder[name], from_file[name])
    assert type(from_file["scheduler"]).__name__ == type(from_folder["scheduler"]).__name__


def test_export_names_match_the_original_layout(exported):
    from safetensors import safe_open

    _, path = exported
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    # names a community SD1.5 checkpoint carries
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert key in keys, key
    assert not any(k.startswith(("down_blocks", "up_blocks", "mid_block")) for k in keys)


def test_single_file_errors_are_one_line(tmp_path, exported):
    folder, path = exported
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="pickle-based"):
        load_base_components(bad)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(
        CheckpointError, match="cannot load single-file checkpoint corrupt.safetensors"
    ) as err:
        load_base_components(corrupt, config=folder)
    assert "\n" not in str(err.value)
    text = tmp_path / "x.txt"
    text.write_text("x")
    with pytest.raises(CheckpointError, match="must be .safetensors"):
        load_base_components(text)


def test_pipeline_from_single_file_matches_the_folder(exported, tmp_path):
    """diffusers' FromSingleFileMixin on the BrushNet pipeline: the single file (+ the folder's configs) with a
    branch passed as a component gives the folder-built pipeline's image exactly."""
    import numpy as np
    from PIL import Image

    from brushnet import BrushNetModel, StableDiffusionBrushNetPipeline
    from brushnet.random_models import build_brushnet

    folder, path = exported
    brushnet = BrushNetModel.from_pretrained(build_brushnet(tmp_path / "brushnet", folder, seed=5))
    from_file = StableDiffusionBrushNetPipeline.from_single_file(
        str(path), config=str(folder), brushnet=brushnet, safety_checker=None, requires_safety_checker=False
    )
    parts = load_base_components(folder)
    from_folder = StableDiffusionBrushNetPipeline(
        **{k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        brushnet=brushnet, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    assert isinstance(from_file.brushnet, BrushNetModel) and from_file.brushnet is brushnet
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    kwargs = dict(num_inference_steps=2, output_type="np", guidance_scale=7.5)
    a = from_file("a cat", image, Image.fromarray(mask), generator=torch.Generator().manual_seed(0), **kwargs)
    b = from_folder(
        "a cat", image, Image.fromarray(mask), generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert np.abs(a.images - b.images).max() == 0
    assert from_file.scheduler.__class__ is from_folder.scheduler.__class__


def test_offline_without_a_config_the_error_is_the_only_line(exported, tmp_path, monkeypatch, logged):
    """Offline and without ``config`` (``--base-config``), diffusers' two-line "Attempting to download the
    necessary config files" warning came before the project's own error, which says what to do."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with logged("diffusers.loaders.single_file") as messages:
        with pytest.raises(CheckpointError, match="pass --base-config with a local diffusers folder"):
            load_base_components(exported[1])
    assert not [m for m in messages if "Attempting to download" in m]


def test_convert_keeps_an_fp16_folder_fp16_and_refuses_other_folders_in_one_line(
    tiny_models, tmp_path, capsys
):
    """An fp16 base came out mixed (UNet and VAE upcast to float32, the text encoder float16: twice the size);
    a branch folder or a missing one ended in a traceback."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextModel

    from brushnet.convert import main

    half = tmp_path / "half"
    shutil.copytree(tiny_models["base"], half)
    for cls, part in (
        (UNet2DConditionModel, "unet"),
        (AutoencoderKL, "vae"),
        (CLIPTextModel, "text_encoder"),
    ):
        cls.from_pretrained(tiny_models["base"], subfolder=part).half().save_pretrained(half / part)
    out = save_single_file(half, tmp_path / "half.safetensors")
    with safe_open(str(out), "pt") as f:
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F16"}
    capsys.readouterr()  # the loaders' progress bars above
    for folder, message in (
        (tiny_models["brushnet"], "holds a BrushNetModel: it lacks unet/, vae/, text_encoder/"),
        (tmp_path / "nope", "base folder not found"),
    ):
        with pytest.raises(SystemExit) as info:
            main([str(folder), str(tmp_path / "x.safetensors")])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and message in err, err
