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


def test_convert_reads_an_fp16_only_folder_and_a_chosen_variant(tiny_models, tmp_path, capsys):
    """A hub snapshot fetched with ``variant="fp16"`` holds only ``*.fp16.safetensors``: the export failed to find
    weights; ``--variant`` picks one of two, and a variant the folder lacks is refused in one line."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextModel

    from brushnet.convert import main

    parts = ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder"))
    only = tmp_path / "only_fp16"
    both = tmp_path / "both"
    shutil.copytree(tiny_models["base"], both)
    for cls, part in parts:
        model = cls.from_pretrained(tiny_models["base"], subfolder=part)
        # distinct values in the variant, so reading the wrong file shows
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25)
        model.half().save_pretrained(both / part, variant="fp16")
        model.save_pretrained(only / part, variant="fp16")
    for name in ("model_index.json", "scheduler", "tokenizer"):
        src = tiny_models["base"] / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, only / name)
    assert not list((only / "unet").glob("diffusion_pytorch_model.safetensors"))

    plain = save_single_file(tiny_models["base"], tmp_path / "plain.safetensors")
    from_only = save_single_file(only, tmp_path / "only.safetensors")
    chosen = tmp_path / "chosen.safetensors"
    main([str(both), str(chosen), "--variant", "fp16"])
    capsys.readouterr()
    with (
        safe_open(str(plain), "pt") as a,
        safe_open(str(from_only), "pt") as b,
        safe_open(str(chosen), "pt") as c,
    ):
        assert set(a.keys()) == set(b.keys()) == set(c.keys())
        key = "model.diffusion_model.out.2.weight"
        assert {b.get_slice(k).get_dtype() for k in b.keys()} == {"F16"}
        torch.testing.assert_close(b.get_tensor(key).float(), a.get_tensor(key) + 0.25, rtol=0, atol=2e-3)
        torch.testing.assert_close(c.get_tensor(key), b.get_tensor(key), rtol=0, atol=0)
    # without --variant the folder with both reads its plain weights
    assert save_single_file(both, tmp_path / "both.safetensors").read_bytes() == plain.read_bytes()
    capsys.readouterr()  # the loaders' progress bars above

    with pytest.raises(SystemExit) as info:
        main([str(only), str(tmp_path / "x.safetensors"), "--variant", "bf16"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert "has no 'bf16' variant of its weights (text_encoder: fp16; unet: fp16; vae: fp16)" in err
    assert not (tmp_path / "x.safetensors").exists()


def _variant_folder(base, folder, saves):
    """``folder``: ``base``'s scheduler and tokenizer, and each weighted part written by ``saves(model, part_folder)``
    from ``base``'s model with 0.25 added to every weight (so reading another file shows)."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for cls, part in (
        (UNet2DConditionModel, "unet"),
        (AutoencoderKL, "vae"),
        (CLIPTextModel, "text_encoder"),
    ):
        model = cls.from_pretrained(base, subfolder=part)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25)
        saves(model, folder / part)
    for name in ("model_index.json", "scheduler", "tokenizer"):
        src = base / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, folder / name)
    return folder


def test_convert_reads_fp16_safetensors_beside_a_plain_pickle(tiny_models, tmp_path, capsys):
    """A part with a plain ``diffusion_pytorch_model.bin`` beside ``diffusion_pytorch_model.fp16.safetensors``
    counted as plain: the UNet and VAE loaded from the pickle (which the project loads only with --allow-pickle)
    and the file came out mixed float32/float16. Only safetensors count, as in ``brushnet.loading``: the fp16
    weights are read (the pickle holds other values, so reading it shows), the file is float16 throughout. A
    sharded fp16-only variant reads the same."""
    from safetensors import safe_open

    def pickle_and_fp16(model, part):
        model.half().save_pretrained(part, variant="fp16")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model.float().save_pretrained(part, safe_serialization=False)

    mixed = _variant_folder(tiny_models["base"], tmp_path / "mixed", pickle_and_fp16)
    assert sorted(p.name for p in (mixed / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    sharded = _variant_folder(
        tiny_models["base"],
        tmp_path / "sharded",
        lambda model, part: model.half().save_pretrained(part, variant="fp16", max_shard_size="200KB"),
    )
    assert (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    plain = save_single_file(tiny_models["base"], tmp_path / "plain.safetensors")
    outputs = [save_single_file(f, tmp_path / f"{f.name}.safetensors") for f in (mixed, sharded)]
    capsys.readouterr()  # the loaders' progress bars
    with safe_open(str(plain), "pt") as a:
        reference = {k: a.get_tensor(k) for k in a.keys()}
    for out in outputs:
        with safe_open(str(out), "pt") as b:
            assert set(b.keys()) == set(reference)
            assert {b.get_slice(k).get_dtype() for k in b.keys()} == {"F16"}, out.name
            for key in ("model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_out.weight"):
                torch.testing.assert_close(
                    b.get_tensor(key).float(), reference[key] + 0.25, rtol=0, atol=2e-3, msg=key
                )


def test_convert_reads_a_folder_of_several_variants_by_the_loaders_rule(tiny_models, tmp_path, capsys):
    """Parts holding two variants and no plain weights are read as ``--base`` and the pipelines' ``from_pretrained``
    read them: fp16 where every part holds it (convert refused this folder while the loaders read it), ``--variant``
    picks the other. Where no variant is fp16, which to read is the user's choice, named in one line (exit 2,
    nothing written); parts in different variants only are refused in one line. A branch folder holding only fp16
    weights is refused as a branch, as a full-precision one is."""
    from safetensors import safe_open

    from brushnet.convert import main
    from brushnet.models import BrushNetModel

    def saving(*variants):
        def save(model, part):
            for variant in variants:
                dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(variant, torch.float32)
                model.to(dtype).save_pretrained(part, variant=variant)

        return save

    both = _variant_folder(tiny_models["base"], tmp_path / "both", saving("fp16", "bf16"))
    for args, dtype in (([], "F16"), (["--variant", "bf16"], "BF16")):
        main([str(both), str(tmp_path / f"{dtype}.safetensors"), *args])
        with safe_open(str(tmp_path / f"{dtype}.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {dtype}
    no_fp16 = _variant_folder(tiny_models["base"], tmp_path / "no_fp16", saving("bf16", "full"))
    apart = _variant_folder(tiny_models["base"], tmp_path / "apart", saving("bf16"))
    for path in (apart / "vae").glob("*.bf16.safetensors"):
        path.rename(path.with_name(path.name.replace(".bf16.", ".fp16.")))
    branch = tmp_path / "branch_fp16"
    BrushNetModel.from_pretrained(tiny_models["brushnet"]).half().save_pretrained(branch, variant="fp16")
    capsys.readouterr()
    for folder, message in (
        (no_fp16, "(text_encoder: bf16, full; unet: bf16, full; vae: bf16, full) and no plain weights: pass "
         "--variant one of 'bf16', 'full'"),
        (apart, "stores its parts only as different variants (text_encoder: bf16; unet: bf16; vae: fp16)"),
        (branch, "holds a BrushNetModel: it lacks unet/, vae/, text_encoder/"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            main([str(folder), str(tmp_path / "x.safetensors")])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "x.safetensors").exists()


def test_convert_reads_pickle_only_parts_only_with_allow_pickle(tiny_models, tmp_path, capsys, monkeypatch):
    """A base folder saved with ``safe_serialization=False`` (only ``.bin`` files) was read without asking, though
    loading a pickle can run code and every other loader here needs --allow-pickle. Now it is refused in one line
    before any part loads (exit 2, nothing written); ``--allow-pickle`` reads it, and gives the same file as the
    safetensors folder."""
    from diffusers import UNet2DConditionModel

    from brushnet.convert import main

    pickled = _variant_folder(
        tiny_models["base"],
        tmp_path / "pickled",
        lambda model, part: model.save_pretrained(part, safe_serialization=False),
    )
    assert (pickled / "unet" / "diffusion_pytorch_model.bin").is_file()
    loads = []
    original = UNet2DConditionModel.from_pretrained.__func__
    monkeypatch.setattr(
        UNet2DConditionModel,
        "from_pretrained",
        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)),
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(pickled), str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert "has only pickle-based weights (diffusion_pytorch_model.bin); pass --allow-pickle" in err
    assert not (tmp_path / "x.safetensors").exists() and not loads
    main([str(pickled), str(tmp_path / "allowed.safetensors"), "--allow-pickle"])
    safe = _variant_folder(
        tiny_models["base"], tmp_path / "safe", lambda model, part: model.save_pretrained(part)
    )
    main([str(safe), str(tmp_path / "safe.safetensors")])
    capsys.readouterr()
    assert (tmp_path / "allowed.safetensors").read_bytes() == (tmp_path / "safe.safetensors").read_bytes()


def test_convert_keeps_each_parts_stored_dtype(tiny_models, tmp_path, caplog):
    """Unasked (no --fp16), every part was loaded in the UNet's stored dtype, so a float16 VAE beside a UNet read as
    float32 was upcast, and a pickle UNet (whose dtype was not read) made every diffusers part float32. Each part
    now keeps the dtype of the files it is read from, pickle files too, and an allowed pickle load logs nothing
    (diffusers' "An error occurred while trying to fetch")."""
    import logging

    from safetensors import safe_open

    def dtypes(path):
        prefixes = {"model.": "unet", "first_stage_model.": "vae", "cond_stage_model.": "text_encoder"}
        found = {}
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                part = next(v for k, v in prefixes.items() if key.startswith(k))
                found.setdefault(part, set()).add(f.get_slice(key).get_dtype())
        return found

    def text_plain_rest_fp16(model, part):  # fp16 where it is stored as fp16, the text encoder plain float32
        model.save_pretrained(part) if part.name == "text_encoder" else model.half().save_pretrained(
            part, variant="fp16"
        )

    mixed = _variant_folder(tiny_models["base"], tmp_path / "mixed", text_plain_rest_fp16)
    out = save_single_file(mixed, tmp_path / "mixed.safetensors")
    assert dtypes(out) == {"unet": {"F16"}, "vae": {"F16"}, "text_encoder": {"F32"}}

    def pickled_fp16(model, part):
        model.half().save_pretrained(part, variant="fp16", safe_serialization=False)

    pickled = _variant_folder(tiny_models["base"], tmp_path / "pickled", pickled_fp16)
    assert (pickled / "unet" / "diffusion_pytorch_model.fp16.bin").is_file()
    with caplog.at_level(logging.WARNING):
        out = save_single_file(pickled, tmp_path / "pickled.safetensors", allow_pickle=True)
    assert dtypes(out) == {"unet": {"F16"}, "vae": {"F16"}, "text_encoder": {"F16"}}
    assert not [r for r in caplog.records if "error occurred" in r.getMessage().lower()], caplog.records
