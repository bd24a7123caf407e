import json
import shutil
from pathlib import Path

import pytest
import torch

from brushnet.loading import (
    FAMILY_COMPONENTS,
    CheckpointError,
    check_brushnet_fits_base,
    detect_family,
    load_base_components,
    load_brushnet,
    pipeline_only_variant,
)


def test_load_tiny_base_and_brushnet(tiny_models):
    parts = load_base_components(tiny_models["base"])
    assert set(parts) == {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}
    brushnet = load_brushnet(tiny_models["brushnet"])
    assert brushnet.num_down_residuals > 0


def test_wrong_kind_errors(tiny_models, tmp_path):
    with pytest.raises(CheckpointError, match="UNet2DConditionModel, not a BrushNetModel"):
        load_brushnet(tiny_models["base"] / "unet")
    with pytest.raises(CheckpointError, match="not a BrushNet checkpoint"):
        load_brushnet(tiny_models["base"])
    with pytest.raises(CheckpointError, match="BrushNetModel, not a full base model"):
        load_base_components(tiny_models["brushnet"])
    with pytest.raises(CheckpointError, match="not found"):
        load_brushnet(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="not found"):
        load_base_components(tmp_path / "nothing")
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="allow-pickle"):
        load_base_components(tmp_path / "model.ckpt")


def test_brushnet_from_pretrained_checks_the_source_first(tiny_models, tmp_path, monkeypatch):
    """``BrushNetModel.from_pretrained`` (the original's way to load a branch) refuses, in one line and before
    diffusers reads anything, what it would otherwise load wrongly or refuse in many lines: a UNet folder (diffusers
    would build a branch of random weights from its config), a ControlNet, a pipeline folder (naming the
    subfolder that loads its branch), a missing path, and a hub id offline that is not cached."""
    from brushnet.models import BrushNetModel

    base = tiny_models["base"]
    controlnet = tmp_path / "controlnet"  # only the config is read
    controlnet.mkdir()
    (controlnet / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    for path, kwargs, message in [
        (base / "unet", {}, "holds a UNet2DConditionModel, not a BrushNetModel checkpoint"),
        (base, {"subfolder": "unet"}, "holds a UNet2DConditionModel, not a BrushNetModel checkpoint"),
        (controlnet, {}, "holds a ControlNetModel, not a BrushNetModel checkpoint"),
        (base, {}, "is a full StableDiffusionPipeline folder, not a BrushNet checkpoint"),
        (tmp_path / "nothing", {}, "BrushNet checkpoint not found"),
    ]:
        with pytest.raises(CheckpointError, match=message) as info:
            BrushNetModel.from_pretrained(path, **kwargs)
        assert "\n" not in str(info.value)
    pipe = tmp_path / "pipe"
    shutil.copytree(base, pipe)
    shutil.copytree(tiny_models["brushnet"], pipe / "brushnet")
    with pytest.raises(CheckpointError, match="the branch in it loads with subfolder='brushnet'"):
        BrushNetModel.from_pretrained(pipe)
    assert BrushNetModel.from_pretrained(pipe, subfolder="brushnet").num_down_residuals > 0
    assert (
        BrushNetModel.from_pretrained(tiny_models["brushnet"], torch_dtype=torch.float16).dtype
        == torch.float16
    )
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="offline mode is on"):
        BrushNetModel.from_pretrained("someone/brushnet_not_cached", cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "pipeline",
    [
        "StableDiffusionBrushNetPipeline",
        "StableDiffusionXLBrushNetPipeline",
        "StableDiffusionHDPainterPipeline",
        "StableDiffusionPowerPaintInpaintPipeline",
        "StableDiffusionPowerPaintBrushNetPipeline",
    ],
)
def test_pipeline_from_pretrained_checks_the_source_first(pipeline, tiny_models, tmp_path, monkeypatch):
    """The pipelines' ``from_pretrained``: a missing path, a folder of one model and a hub id offline that is not
    cached are one line (diffusers: "neither a valid local path nor a valid repo id", a multi-sentence OSError)."""
    import brushnet.pipelines

    cls = getattr(brushnet.pipelines, pipeline)
    for path, message in [
        (tmp_path / "nothing", "base model not found"),
        (tiny_models["brushnet"], "holds a BrushNetModel, not a pipeline folder"),
        (tiny_models["base"] / "unet", "holds a UNet2DConditionModel, not a pipeline folder"),
    ]:
        with pytest.raises(CheckpointError, match=message) as info:
            cls.from_pretrained(path)
        assert "\n" not in str(info.value)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(
        CheckpointError, match="cannot load pipeline 'someone/base_not_cached': offline mode is on"
    ):
        cls.from_pretrained("someone/base_not_cached", cache_dir=str(tmp_path / "cache"))


def test_the_brushnet_pipeline_still_loads_a_pipeline_folder(tiny_models):
    from brushnet import StableDiffusionBrushNetPipeline
    from brushnet.models import BrushNetModel

    branch = BrushNetModel.from_pretrained(tiny_models["brushnet"])
    pipe = StableDiffusionBrushNetPipeline.from_pretrained(tiny_models["base"], brushnet=branch)
    assert pipe.brushnet is branch


def test_a_pipeline_saved_as_a_variant_loads_without_naming_it(tiny_xl_models, tmp_path):
    """``save_pretrained(..., variant="fp16")`` writes no plain weights; loading the folder back without
    ``variant=`` failed in the text encoder ("no file named model.safetensors"). It is read as it is stored, and
    parts stored only in different variants are one line naming them."""
    import numpy as np
    import torch
    from PIL import Image

    from brushnet import StableDiffusionXLBrushNetPipeline
    from brushnet.models import BrushNetModel

    branch = BrushNetModel.from_pretrained(tiny_xl_models["brushnet"])
    pipe = StableDiffusionXLBrushNetPipeline.from_pretrained(tiny_xl_models["base"], brushnet=branch)
    pipe.save_pretrained(tmp_path / "saved", variant="fp16")
    assert not (tmp_path / "saved" / "text_encoder" / "model.safetensors").exists()
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    arguments = dict(image=Image.new("RGB", (32, 32), (90, 120, 200)), mask_image=Image.fromarray(mask),
                     num_inference_steps=1, output_type="np")  # fmt: skip
    named = StableDiffusionXLBrushNetPipeline.from_pretrained(tmp_path / "saved", variant="fp16")
    unnamed = StableDiffusionXLBrushNetPipeline.from_pretrained(tmp_path / "saved")
    for loaded in (named, unnamed):
        loaded.set_progress_bar_config(disable=True)
    expected = named("x", generator=torch.Generator().manual_seed(0), **arguments).images
    np.testing.assert_array_equal(
        unnamed("x", generator=torch.Generator().manual_seed(0), **arguments).images, expected
    )
    # a part in a second variant: the one every part holds is read (fp16); parts in different variants only are
    # one line, since no one variant loads them all
    pipe.vae.to(torch.bfloat16).save_pretrained(tmp_path / "saved" / "vae", variant="bf16")
    again = StableDiffusionXLBrushNetPipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(
        again("x", generator=torch.Generator().manual_seed(0), **arguments).images, expected
    )
    (tmp_path / "saved" / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"vae: bf16\) and no plain weights: no one variant loads"
    ) as info:
        StableDiffusionXLBrushNetPipeline.from_pretrained(tmp_path / "saved")
    assert "\n" not in str(info.value)


def test_pickle_only_folder_needs_permission(tiny_models, tmp_path):
    folder = tmp_path / "bn"
    shutil.copytree(tiny_models["brushnet"], folder)
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle-based weights"):
        load_brushnet(folder)


def test_brushnet_inside_pipeline_folder_is_found(tiny_models, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_models["base"], folder)
    shutil.copytree(tiny_models["brushnet"], folder / "brushnet")
    index = json.loads((folder / "model_index.json").read_text())
    index["brushnet"] = ["brushnet", "BrushNetModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert load_brushnet(folder).num_down_residuals > 0


# -- families ------------------------------------------------------------------------------------------

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
XL_GOLDEN = Path(__file__).parent / "fixtures" / "golden_xl_tiny"


def _config(path):
    return json.loads(Path(path).read_text())


def test_detect_family_from_unet_and_brushnet_configs(golden_dir):
    assert detect_family(_config(golden_dir / "unet" / "config.json")) == "sd15"
    assert detect_family(_config(golden_dir / "brushnet" / "config.json")) == "sd15"
    assert detect_family(_config(XL_GOLDEN / "unet" / "config.json")) == "sdxl"
    assert detect_family(_config(XL_GOLDEN / "brushnet" / "config.json")) == "sdxl"
    assert detect_family(_config(REFERENCE / "brushnet_sd15_config.json")) == "sd15"
    assert detect_family(_config(REFERENCE / "brushnet_sdxl_config.json")) == "sdxl"
    assert detect_family(_config(REFERENCE / "powerpaint_v2_brushnet_config.json")) == "sd15"
    with pytest.raises(CheckpointError, match="class_embed_type='timestep'"):
        detect_family({"addition_embed_type": None, "class_embed_type": "timestep"})


def test_sdxl_preset_is_the_sdxl_architecture_and_fits_the_released_branch():
    """The "sdxl" random-weight preset has the SDXL base UNet's 2,567,463,684 parameters, and a branch made
    from it with from_unet has exactly the released SDXL BrushNet's tensors (no missing/unexpected keys)."""
    import torch
    from diffusers import UNet2DConditionModel

    from brushnet.models import BrushNetModel
    from brushnet.random_models import PRESETS, _unet_config_xl, preset_family

    assert preset_family("sdxl") == preset_family("tiny-xl") == "sdxl" and preset_family("sd15") == "sd15"
    released = _config(REFERENCE / "brushnet_sdxl_config.json")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_unet_config_xl(PRESETS["sdxl"]))
        from_unet = BrushNetModel.from_unet(unet)
        from_config = BrushNetModel.from_config(released)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    check_brushnet_fits_base(released, unet.config)
    shapes = {k: tuple(v.shape) for k, v in from_unet.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in from_config.state_dict().items()} and len(shapes) == 252
    with pytest.raises(CheckpointError, match=r"^this SD1.5 BrushNet .* does not fit an SDXL base"):
        check_brushnet_fits_base(_config(REFERENCE / "brushnet_sd15_config.json"), unet.config)


def test_family_mismatch_is_refused_before_the_weights_are_read(golden_dir, tmp_path):
    folder = tmp_path / "sdxl_branch"  # the released SDXL config, and no weights at all
    folder.mkdir()
    shutil.copy(REFERENCE / "brushnet_sdxl_config.json", folder / "config.json")
    sd15_unet = _config(golden_dir / "unet" / "config.json")
    with pytest.raises(CheckpointError) as err:
        load_brushnet(folder, base_config=sd15_unet)
    message = str(err.value)
    assert message.startswith("this SDXL BrushNet (block_out_channels [320, 640, 1280], text_time embedding")
    assert "does not fit an SD1.5 base (block_out_channels [16, 32, 32])" in message and "\n" not in message
    with pytest.raises(CheckpointError, match="no weight file"):  # the same folder, a fitting base
        load_brushnet(folder)


def test_sdxl_base_folders_load_with_both_text_encoders(tiny_xl_models, tmp_path):
    for folder in (tiny_xl_models["base"], XL_GOLDEN):  # with model_index.json, and bare component folders
        parts = load_base_components(folder)
        assert set(parts) == set(FAMILY_COMPONENTS["sdxl"])
        assert detect_family(parts["unet"].config) == "sdxl"
        assert type(parts["text_encoder"]).__name__ == "CLIPTextModel"
        assert type(parts["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
        assert type(parts["scheduler"]).__name__ == "EulerDiscreteScheduler"
    base = load_base_components(tiny_xl_models["base"])
    branch = load_brushnet(tiny_xl_models["brushnet"], base_config=base["unet"].config)
    assert (branch.num_down_residuals, branch.num_up_residuals) == (9, 11)  # SDXL's counts
    with pytest.raises(CheckpointError, match="projection_class_embeddings_input_dim 72 vs 64"):
        load_brushnet(tiny_xl_models["brushnet"], base_config=parts["unet"].config)  # the golden's base
    torch.testing.assert_close(
        branch.add_embedding.linear_1.weight, base["unet"].add_embedding.linear_1.weight
    )

    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_xl_models["base"], incomplete, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(CheckpointError, match=r"SDXL base model folder .* lacks: text_encoder_2"):
        load_base_components(incomplete)


def test_sdxl_single_file_loads_back_every_weight(tiny_xl_models, tmp_path):
    """An SDXL folder exported to Stability's single-file layout (label_emb, conditioner.embedders.0/1 with
    OpenCLIP's fused attention) loads back through the same loader, offline with a config folder."""
    from safetensors import safe_open

    from brushnet.convert import save_single_file

    path = save_single_file(tiny_xl_models["base"], tmp_path / "xl.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    for key in (
        "model.diffusion_model.label_emb.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "first_stage_model.decoder.conv_out.weight",
    ):
        assert key in keys, key
    from_folder = load_base_components(tiny_xl_models["base"])
    from_file = load_base_components(path, config=tiny_xl_models["base"])
    assert set(from_file) == set(FAMILY_COMPONENTS["sdxl"])
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = from_folder[name].state_dict(), from_file[name].state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(
        CheckpointError, match=r"cannot load single-file checkpoint xl.safetensors: .*offline\?"
    ):
        load_base_components(path)  # SDXL detected from the keys; its configs are not on this machine


def _powerpaint_folder(tiny_models, root: Path) -> Path:
    """A PowerPaint v2 folder in the diffusers layout (its files only; nothing in it is loaded)."""
    shutil.copytree(tiny_models["brushnet"], root / "PowerPaint_Brushnet")
    shutil.copytree(tiny_models["base"] / "text_encoder", root / "text_encoder_brushnet")
    return root


def test_a_powerpaint_folder_as_the_brushnet_is_named_with_the_flags_to_use(tiny_models, tmp_path):
    folder = _powerpaint_folder(tiny_models, tmp_path / "pp")
    with pytest.raises(CheckpointError) as info:
        load_brushnet(folder)
    assert str(info.value) == (
        f"{folder} is a PowerPaint v2 checkpoint (PowerPaint_Brushnet/, text_encoder_brushnet/), not a BrushNet "
        f"one; use --method powerpaint --powerpaint {folder}"
    )


def test_a_powerpaint_branch_as_the_brushnet_is_refused(tiny_models, tmp_path):
    """The branch folder of a PowerPaint checkpoint (a BrushNetModel with cross-attention) passed as --brushnet
    ran: it read the user's prompt through the base's encoder instead of PowerPaint's task words."""
    from brushnet.methods import load_method
    from brushnet.random_models import build_model_set

    powerpaint = Path(build_model_set(tmp_path, ["powerpaint"], "tiny")["powerpaint"])
    branch = powerpaint / "PowerPaint_Brushnet"
    message = (
        f"{branch} is a PowerPaint branch (a BrushNetModel with cross-attention, read with PowerPaint's task-word "
        f"text encoder), not a BrushNet one; use --method powerpaint --powerpaint {powerpaint}"
    )
    with pytest.raises(CheckpointError) as info:
        load_brushnet(branch)
    assert str(info.value) == message
    with pytest.raises(CheckpointError) as info:
        load_method("brushnet", {"base": tiny_models["base"], "brushnet": branch})
    assert str(info.value) == message
    load_brushnet(tiny_models["brushnet"])  # a BrushNet branch still loads


def test_a_branch_folder_with_only_the_fp16_variant_loads(tiny_models, tmp_path):
    """A hub repo may ship a branch as ``diffusion_pytorch_model.fp16.safetensors`` only; it was refused with
    "rename the file", though ``from_pretrained(..., variant="fp16")`` reads it."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "fp16_only"
    folder.mkdir()
    shutil.copy(tiny_models["brushnet"] / "config.json", folder)
    weights = load_file(tiny_models["brushnet"] / "diffusion_pytorch_model.safetensors")
    save_file({k: v.half() for k, v in weights.items()}, folder / "diffusion_pytorch_model.fp16.safetensors")
    branch = load_brushnet(folder)
    assert branch.dtype == torch.float32
    for name, value in branch.state_dict().items():
        assert torch.equal(value, weights[name].half().float()), name


def test_a_base_folder_with_only_fp16_variant_weights_loads(tiny_xl_models, tmp_path):
    """A base saved with ``save_pretrained(variant="fp16")`` (or a hub download of its ``*.fp16.safetensors``
    files) was refused with "... has diffusion_pytorch_model.fp16.safetensors ... rename the file", though branch
    folders of fp16 files load. It loads in the dtype asked for, a sharded component too (diffusers names the
    index ``diffusion_pytorch_model.safetensors.index.fp16.json``). A base whose components mix fp16-only and
    full-precision-only weights was refused here while the pipelines' ``from_pretrained`` loaded it (diffusers'
    rule: each part reads the folder's variant where it holds it, else its plain weights): both load it now."""
    full = load_base_components(tiny_xl_models["base"])
    folder = shutil.copytree(
        tiny_xl_models["base"], tmp_path / "fp16", ignore=shutil.ignore_patterns("*.safetensors")
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        shard = {"max_shard_size": "100KB"} if name == "unet" else {}
        copy = type(full[name]).from_pretrained(tiny_xl_models["base"] / name)
        copy.half().save_pretrained(folder / name, variant="fp16", **shard)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    for dtype in (torch.float32, torch.float16):
        parts = load_base_components(folder, dtype=dtype)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            assert parts[name].dtype == dtype, name
            loaded, original = parts[name].state_dict(), full[name].state_dict()
            assert all(torch.equal(loaded[k], original[k].half().to(dtype)) for k in original), name
    full["vae"].save_pretrained(folder / "vae_full")
    shutil.rmtree(folder / "vae")
    (folder / "vae_full").rename(folder / "vae")
    assert pipeline_only_variant(folder) == "fp16"
    parts = load_base_components(folder)
    assert torch.equal(parts["vae"].decoder.conv_out.weight, full["vae"].decoder.conv_out.weight)  # plain
    key = "conv_out.weight"
    assert torch.equal(parts["unet"].state_dict()[key], full["unet"].state_dict()[key].half().float())
    # parts stored only as different variants: no one variant loads them all (diffusers fails on either), one line
    shutil.rmtree(folder / "vae")
    full["vae"].to(torch.bfloat16).save_pretrained(folder / "vae", variant="bf16")
    for load in (load_base_components, pipeline_only_variant):
        with pytest.raises(CheckpointError) as info:
            load(folder)
        assert str(info.value) == (
            f"{folder} stores its parts only as different variants (text_encoder: fp16; text_encoder_2: fp16; "
            "unet: fp16; vae: bf16) and no plain weights: no one variant loads them all; save every part as the "
            "same variant"
        )
    with pytest.raises(CheckpointError, match="neither the 'fp16' variant nor plain weights for vae"):
        load_base_components(folder, variant="fp16")
    # every part in two variants: fp16 first, as before; variant= reads the other; one no part has is refused
    for name in ("unet", "text_encoder", "text_encoder_2"):
        type(full[name]).from_pretrained(tiny_xl_models["base"] / name).to(torch.bfloat16).save_pretrained(
            folder / name, variant="bf16", **({"max_shard_size": "100KB"} if name == "unet" else {})
        )
    full["vae"].half().save_pretrained(folder / "vae", variant="fp16")
    assert pipeline_only_variant(folder) == "fp16"
    assert load_base_components(folder, dtype=torch.float16)["unet"].dtype == torch.float16
    bf16 = load_base_components(folder, variant="bf16")
    key = "conv_out.weight"
    assert torch.equal(bf16["unet"].state_dict()[key], full["unet"].state_dict()[key].bfloat16().float())
    with pytest.raises(CheckpointError, match="has no 'int8' variant of its weights"):
        load_base_components(folder, variant="int8")
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    with pytest.raises(
        CheckpointError, match="names a diffusers folder's weight files; model.safetensors is one"
    ):
        load_base_components(single, variant="fp16")  # refused, not ignored


def test_a_pickle_only_part_reads_the_folders_variant(tiny_models, tmp_path):
    """A part holding only ``*.fp16.bin`` beside fp16-only safetensors parts: with pickle allowed it loads its fp16
    file (the pipelines' ``from_pretrained`` does); the rule counted safetensors only, and loading failed naming the
    folder's plain ``.bin`` in the wrong folder. Sharded pickle variants and folders of pickles only count too."""
    full = load_base_components(tiny_models["base"])
    folder = shutil.copytree(
        tiny_models["base"], tmp_path / "mixed", ignore=shutil.ignore_patterns("*.safetensors")
    )
    full["unet"].half().save_pretrained(folder / "unet", variant="fp16")
    full["text_encoder"].half().save_pretrained(folder / "text_encoder", variant="fp16")
    full["vae"].half().save_pretrained(folder / "vae", variant="fp16", safe_serialization=False)
    assert sorted(p.name for p in (folder / "vae").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.fp16.bin",
    ]
    with pytest.raises(CheckpointError, match="allow_pickle|pickle"):
        load_base_components(folder)
    parts = load_base_components(folder, allow_pickle=True)
    weight = parts["vae"].decoder.conv_out.weight
    assert torch.equal(weight, full["vae"].decoder.conv_out.weight.half().float())
    # a sharded pickle variant (pytorch_model.fp16-00001-of-0000N.bin and its index), and every part pickled
    # (transformers writes safetensors whatever it is asked now; older tools wrote these)
    for path in (folder / "text_encoder").glob("model*.safetensors"):
        path.unlink()
    state = {k: v.half() for k, v in full["text_encoder"].state_dict().items()}
    keys, weight_map = sorted(state), {}
    for i, half in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"pytorch_model.fp16-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in half}, folder / "text_encoder" / name)
        weight_map.update(dict.fromkeys(half, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "text_encoder" / "pytorch_model.bin.index.fp16.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "unet")
    full["unet"].half().save_pretrained(folder / "unet", variant="fp16", safe_serialization=False)
    assert not list(folder.rglob("*.safetensors"))
    for variant in (None, "fp16"):
        parts = load_base_components(folder, allow_pickle=True, variant=variant)
        for name in ("unet", "text_encoder", "vae"):
            loaded, original = parts[name].state_dict(), full[name].state_dict()
            assert all(torch.equal(loaded[k], original[k].half().float()) for k in original), name
    # a variant no part holds, on a plain folder: one line naming what each part holds
    with pytest.raises(CheckpointError) as info:
        load_base_components(tiny_models["base"], variant="fp16")
    assert str(info.value) == (
        f"{tiny_models['base']} has no 'fp16' variant of its weights (text_encoder: plain; unet: plain; vae: plain)"
    )


def test_a_controlnet_folder_with_only_the_fp16_variant_loads(tiny_models, tmp_path):
    """A ControlNet folder of ``diffusion_pytorch_model.fp16.safetensors`` only loads as a branch folder does (it
    was "rename the file")."""
    from diffusers import ControlNetModel

    from brushnet.loading import load_model
    from brushnet.random_models import build_controlnet

    original = ControlNetModel.from_pretrained(build_controlnet(tmp_path / "full", tiny_models["base"]))
    original.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    controlnet = load_model(ControlNetModel, tmp_path / "fp16", "ControlNet")
    assert controlnet.dtype == torch.float32
    assert all(torch.equal(v, original.state_dict()[k].float()) for k, v in controlnet.state_dict().items())


def test_a_single_file_read_as_the_other_family_is_loaded_again_as_its_own(
    tiny_xl_models, tmp_path, monkeypatch
):
    """A pickle ``.ckpt`` is taken as SD1.5 before loading (its keys are not read); with an SDXL config from the
    hub the UNet came out SDXL but the components SD1.5's: a TypeError (no text_encoder_2) at the pipeline."""
    from brushnet import loading
    from brushnet.convert import save_single_file

    path = save_single_file(tiny_xl_models["base"], tmp_path / "xl.safetensors")
    monkeypatch.setattr(loading, "_single_file_family", lambda p, config: "sd15")  # as for a .ckpt
    parts = load_base_components(path, config=tiny_xl_models["base"])
    assert set(parts) == set(FAMILY_COMPONENTS["sdxl"])


def test_from_pretrained_refuses_a_weight_file_missing_weights_and_expands_the_home_folder(
    tiny_models, tmp_path, monkeypatch
):
    """``BrushNetModel.from_pretrained`` (the README's call) loaded a file lacking some weights with only diffusers'
    "newly initialized" warning: random or meta tensors. ``~/branch`` passed the check and failed in diffusers."""
    from safetensors.torch import load_file, save_file

    from brushnet.models.brushnet import BrushNetModel

    folder = tmp_path / "partial"
    folder.mkdir()
    shutil.copy(tiny_models["brushnet"] / "config.json", folder)
    weights = load_file(tiny_models["brushnet"] / "diffusion_pytorch_model.safetensors")
    dropped = sorted(weights)[:2]
    save_file(
        {k: v for k, v in weights.items() if k not in dropped}, folder / "diffusion_pytorch_model.safetensors"
    )
    with pytest.raises(CheckpointError, match="lacks 2 of the"):
        BrushNetModel.from_pretrained(folder)
    monkeypatch.setenv("HOME", str(tiny_models["brushnet"].parent))
    branch = BrushNetModel.from_pretrained("~/brushnet")
    assert sum(p.numel() for p in branch.parameters()) > 0


def test_config_from_an_older_unet_config_json_takes_the_defaults_it_lacks():
    """A UNet config.json written by an older diffusers lacks later keys; they became None in the branch's
    config (``unknown time_embedding_norm : None`` when the branch was built)."""
    from brushnet.models.brushnet import BrushNetModel

    old = {"in_channels": 4, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types":
           ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [32, 64], "layers_per_block": 1,
           "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 8}  # fmt: skip
    config = BrushNetModel.config_from_unet(old)
    assert config["resnet_time_scale_shift"] == "default" and config["transformer_layers_per_block"] == 1
    BrushNetModel(**config)  # builds


def test_a_folder_without_a_config_is_named_in_plain_words(tiny_models, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as info:
        load_brushnet(tmp_path / "empty")
    assert "holds a unknown" not in str(info.value)
    assert str(info.value).endswith(
        "empty holds no model (no config.json or model_index.json), not a BrushNetModel checkpoint"
    )
    with pytest.raises(
        CheckpointError, match=r"holds no model \(no config.json or model_index.json\), not a full base"
    ):
        load_base_components(tmp_path / "empty")


def test_a_brushnet_folder_as_the_powerpaint_is_called_a_brushnet_checkpoint(tiny_models, tmp_path):
    from brushnet.loading_powerpaint import find_powerpaint

    folder = tiny_models["brushnet"]
    with pytest.raises(CheckpointError) as info:
        find_powerpaint(folder)
    message = str(info.value)
    assert message.startswith(
        f"{folder} is a BrushNet checkpoint, not a PowerPaint one (expected PowerPaint_Brushnet/"
    )
    assert message.endswith(f"use it with --method brushnet --brushnet {folder}")
    assert "text encoder" not in message.split("(")[0]
    # a PowerPaint branch (cross-attention, in its PowerPaint_Brushnet/ folder) without its text encoder still
    # says what is missing
    branch = _powerpaint_folder(tiny_models, tmp_path / "pp") / "PowerPaint_Brushnet"
    shutil.rmtree(branch.parent / "text_encoder_brushnet")
    config = json.loads((branch / "config.json").read_text())
    config["down_block_types"] = ["CrossAttnDownBlock2D"] * len(config["down_block_types"])
    (branch / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has the PowerPaint v2 branch but not its text encoder"):
        find_powerpaint(branch)
