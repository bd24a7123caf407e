"""Every method on a tiny SDXL model set: the family is detected from the models (no new flags), the same
processing and counts as on SD1.5, one-line errors for a model of the other family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from brushnet.errors import CheckpointError
from brushnet.methods import get_method_class, inpaint, load_method, method_classes

FAST = {"steps": 3, "guidance_scale": 2.0, "seed": 5, "prompt": "a cat"}
ALL = ["brushnet", "sd-inpainting", "blended-latent-diffusion", "repaint", "controlnet-inpaint"]


@pytest.fixture(scope="module")
def xl_models(tmp_path_factory):
    from brushnet.random_models import build_model_set

    root = tmp_path_factory.mktemp("xl_set")
    return build_model_set(root, ["base", "brushnet", "inpaint_model", "controlnet"], "tiny-xl")


@pytest.fixture(scope="module")
def xl_scene():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24, 16:32] = 255
    return image, Image.fromarray(mask)


_LOADED: dict = {}


def _load(name, models):
    if name not in _LOADED:
        _LOADED[name] = load_method(name, models)
    return _LOADED[name]


def test_every_method_declares_its_families():
    for cls in method_classes().values():
        assert cls.describe()["families"] == list(cls.families)
    assert set(get_method_class("brushnet").families) == {"sd15", "sdxl"}


@pytest.mark.parametrize("name", ALL)
def test_method_runs_on_an_sdxl_base(xl_models, xl_scene, name):
    method = _load(name, xl_models)
    assert method.family == "sdxl"
    assert method.native_resolution == 8 * 2  # the tiny SDXL UNet's sample_size x its VAE factor
    options = {"jump_length": 1, "jump_n_sample": 2} if name == "repaint" else {}
    result = inpaint(method, *xl_scene, {**FAST, "num_images": 2, "options": options})
    assert [im.size for im in result.images] == [(48, 32)] * 2
    assert result.parameters["family"] == "sdxl"
    downs = 2 * FAST["steps"] if name == "repaint" else FAST["steps"]
    assert result.unet_calls == 2 * downs  # CFG pair per evaluation
    if name == "brushnet":  # the SDXL branch reads pooled text: it runs on both CFG halves
        assert result.extra_calls == {"brushnet": 2 * FAST["steps"]}
    single = inpaint(method, *xl_scene, {**FAST, "seed": FAST["seed"] + 1, "options": options})
    diff = np.abs(np.asarray(single.images[0], np.int16) - np.asarray(result.images[1], np.int16))
    assert diff.max() <= 1


def test_brushnet_method_is_the_sdxl_pipeline(xl_models, xl_scene):
    """The method adds nothing of its own: with blending off it gives what the SDXL pipeline gives, called as
    its users call it (no negative prompt: zeros for the unconditional text; the method passed "" before, and
    "" encodes CLIP(""))."""
    import torch

    from brushnet.image import pil_to_tensor, tensor_to_pil

    method = _load("brushnet", xl_models)
    result = inpaint(method, *xl_scene, {**FAST, "blend": False, "scheduler": "ddim"})
    image = pil_to_tensor(xl_scene[0])
    hole = torch.from_numpy(np.asarray(xl_scene[1]) > 127).float()[None, None]
    from brushnet.schedulers import make_scheduler

    pipe = method.pipeline
    pipe.scheduler = make_scheduler("ddim", method.base_scheduler_config)
    direct = pipe(
        prompt=FAST["prompt"],
        image=image,
        mask_image=hole,
        num_inference_steps=FAST["steps"],
        guidance_scale=FAST["guidance_scale"],
        generator=[torch.Generator().manual_seed(FAST["seed"])],
        output_type="pt",
    ).images
    expected = np.asarray(tensor_to_pil(direct)[0], np.int16)
    assert np.abs(np.asarray(result.images[0], np.int16) - expected).max() <= 1


def test_guidance_unset_is_the_family_value(xl_models, xl_scene, tiny_models):
    """No guidance_scale: SDXL runs at 5.0 (the original SDXL example's and diffusers' value), SD1.5 at 7.5; the
    record holds the value that ran. A given value is used as given."""
    request = {key: value for key, value in FAST.items() if key != "guidance_scale"}
    method = _load("brushnet", xl_models)
    unset = inpaint(method, *xl_scene, request)
    assert unset.parameters["guidance_scale"] == 5.0
    at_5 = inpaint(method, *xl_scene, {**request, "guidance_scale": 5.0})
    at_7 = inpaint(method, *xl_scene, {**request, "guidance_scale": 7.5})
    assert np.array_equal(np.asarray(unset.images[0]), np.asarray(at_5.images[0]))
    assert not np.array_equal(np.asarray(unset.images[0]), np.asarray(at_7.images[0]))
    assert at_7.parameters["guidance_scale"] == 7.5
    sd15 = load_method("blended-latent-diffusion", {"base": str(tiny_models["base"])})
    image = Image.new("RGB", (32, 32), (90, 120, 200))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    assert inpaint(sd15, image, mask, request).parameters["guidance_scale"] == 7.5


def test_crop_to_mask_works_at_the_sdxl_native_resolution(xl_models, xl_scene):
    result = inpaint(_load("blended-latent-diffusion", xl_models), *xl_scene, {**FAST, "crop_to_mask": True})
    region = result.parameters["region"]
    assert not region["whole_image"] and max(region["size"]) <= 32 and region["resized"]


def test_a_model_of_the_other_family_is_one_line(xl_models, tiny_models, tmp_path):
    from brushnet.random_models import build_controlnet

    with pytest.raises(CheckpointError, match="SD1.5 BrushNet .* does not fit an SDXL base"):
        load_method("brushnet", {"base": xl_models["base"], "brushnet": str(tiny_models["brushnet"])})
    with pytest.raises(CheckpointError, match="SDXL BrushNet .* does not fit an SD1.5 base"):
        load_method("brushnet", {"base": str(tiny_models["base"]), "brushnet": xl_models["brushnet"]})
    sd15_controlnet = build_controlnet(tmp_path / "controlnet_sd15", tiny_models["base"])
    with pytest.raises(CheckpointError, match="SD1.5 ControlNet .* does not fit the SDXL base"):
        load_method("controlnet-inpaint", {"base": xl_models["base"], "controlnet": str(sd15_controlnet)})


def test_cli_takes_sdxl_models_with_no_new_flags(xl_models, xl_scene, tmp_path):
    from brushnet.cli import app

    xl_scene[0].save(tmp_path / "i.png")
    xl_scene[1].save(tmp_path / "m.png")
    args = [
        "inpaint",
        "-i",
        str(tmp_path / "i.png"),
        "-m",
        str(tmp_path / "m.png"),
        "-o",
        str(tmp_path / "o.png"),
    ]
    args += ["--base", xl_models["base"], "--brushnet", xl_models["brushnet"], "--steps", "2", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    parameters = json.loads((tmp_path / "o.json").read_text())["parameters"]
    assert parameters["family"] == "sdxl"
    assert parameters["guidance_scale"] == 5.0  # no --guidance: SDXL's usual value, recorded as run
    listed = CliRunner().invoke(app, ["methods"])
    assert "families: sd15, sdxl" in listed.output


def test_a_method_without_an_sdxl_form_refuses_before_loading(xl_models):
    from brushnet.methods import GenerateOutput, InpaintMethod, register_method, registry
    from brushnet.methods.base import BASE

    class SD15Only(InpaintMethod):
        name = "test-sd15-only"
        description = "A method with an SD1.5 form only (test)."
        models = (BASE,)

        @classmethod
        def load(cls, models, device="cpu", dtype="fp32"):
            raise AssertionError("the family is checked before anything loads")

        def generate(self, task):  # pragma: no cover - never loaded
            return GenerateOutput(task.image, 0)

    register_method(SD15Only)
    try:
        with pytest.raises(CheckpointError, match="'test-sd15-only' has no SDXL form .*runs on SD1.5"):
            load_method("test-sd15-only", {"base": xl_models["base"]})
    finally:
        registry._REGISTRY.pop("test-sd15-only")


def test_load_method_checks_device_dtype_and_every_folder_before_loading(xl_models, tiny_models, monkeypatch):
    """``load_method``: an SDXL branch for an SD1.5 base (the loader's own message), a UNet or ControlNet folder
    as the branch, a missing branch, an unknown or absent device, a dtype that is no float and models that are not
    a mapping are each one line before any model loads."""
    import torch

    from brushnet.errors import InputError

    def no_load(*args, **kwargs):
        raise AssertionError("checked before anything loads")

    monkeypatch.setattr(get_method_class("brushnet"), "load", classmethod(no_load))
    sd15 = {"base": tiny_models["base"]}
    for models, message in [
        ({**sd15, "brushnet": xl_models["brushnet"]}, "this SDXL BrushNet .* does not fit an SD1.5 base"),
        (
            {"base": xl_models["base"], "brushnet": tiny_models["brushnet"]},
            "SD1.5 BrushNet .* not fit an SDXL",
        ),
        (
            {**sd15, "brushnet": tiny_models["base"] + "/unet"},
            "holds a UNet2DConditionModel, not a BrushNetModel",
        ),
        ({**sd15, "brushnet": tiny_models["controlnet"]}, "holds a ControlNetModel, not a BrushNetModel"),
        ({**sd15, "brushnet": tiny_models["base"] + "/missing"}, "BrushNet checkpoint not found"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            load_method("brushnet", models)
    models = {**sd15, "brushnet": tiny_models["brushnet"]}
    for kwargs, message in [
        ({"device": "garbage"}, "unknown device 'garbage'"),
        ({"dtype": torch.int8}, "not a floating-point type"),
        ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
    ]:
        with pytest.raises(InputError, match=message):
            load_method("brushnet", models, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available here"):
            load_method("brushnet", models, device="cuda")
    with pytest.raises(InputError, match="models must be a dict of paths or a ModelPaths, got list"):
        load_method("brushnet", [tiny_models["base"]])
    with pytest.raises(AssertionError, match="checked before anything loads"):  # the checks let it through
        load_method("brushnet", models)


def test_make_tiny_models_builds_an_sdxl_set(tmp_path):
    from brushnet.cli import app
    from brushnet.loading import peek_family

    result = CliRunner().invoke(app, ["make-tiny-models", str(tmp_path), "--preset", "tiny-xl"])
    assert result.exit_code == 0, result.output
    for folder in ("base", "brushnet", "inpaint", "controlnet"):
        assert peek_family(tmp_path / folder) == "sdxl", folder
    assert "--inpaint-model" in result.output and "--controlnet" in result.output
    # PowerPaint has no SDXL form: a folder nothing could run was written and advertised
    assert "--powerpaint" not in result.output and not (tmp_path / "powerpaint").exists()


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_sdxl_latent_methods_use_zeros_for_no_negative_prompt(xl_models, negative):
    """As the SDXL pipelines do (force_zeros_for_empty_prompt): no negative prompt is zeros, not CLIP("")."""
    from brushnet.methods import InpaintRequest

    method = _load("blended-latent-diffusion", xl_models)
    request = InpaintRequest(prompt="a cat", negative_prompt=negative, guidance_scale=2.0)
    text = method.encode_prompts(request, 64, 64)
    unconditional = text.embeddings[:1]
    assert (unconditional.abs().max() == 0) == (negative == "")
    assert (text.added_cond_kwargs["text_embeds"][:1].abs().max() == 0) == (negative == "")


def test_latent_methods_give_the_unet_float32_time_ids_in_bfloat16(xl_models, xl_scene):
    """The time ids are pixel counts the UNet embeds in float32: made in the model's dtype, bfloat16 rounds a
    working size above 256 px that is not a multiple of a power of two (1365 to 1368)."""
    method = load_method("blended-latent-diffusion", {"base": xl_models["base"]}, dtype="bf16")
    dtypes = []
    hook = method.pipeline.unet.add_time_proj.register_forward_pre_hook(
        lambda _, args: dtypes.append(args[0].dtype)
    )
    try:
        inpaint(method, *xl_scene, {**FAST, "steps": 1})
    finally:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.float32}


@pytest.mark.parametrize("name", ["blended-latent-diffusion", "repaint"])
def test_latent_methods_run_an_overflowing_sdxl_vae_in_float32_under_fp16(xl_models, xl_scene, name):
    """SDXL's stock VAE overflows in float16 (``force_upcast``): the SDXL BrushNet pipeline and diffusers' pipelines
    behind sd-inpainting and controlnet-inpaint run it in float32, but the two latent-loop methods ran it in float16
    (NaN: a GenerationError in ``--dtype fp16``). They upcast it now and give it back in float16."""
    method = load_method(name, {"base": xl_models["base"]}, dtype="fp16")
    vae = method.vae
    assert vae.dtype == torch.float16 and vae.config.force_upcast
    with torch.no_grad():  # activations past float16's range (65504); float32's group norms bring them back
        for conv in (vae.encoder.conv_in, vae.decoder.conv_in):
            conv.weight.mul_(1e5)
            conv.bias.mul_(1e5)
    dtypes = []
    hooks = [conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
             for conv in (vae.encoder.conv_in, vae.decoder.conv_in)]  # fmt: skip
    try:
        result = inpaint(method, *xl_scene, {**FAST, "steps": 2})
    finally:
        for hook in hooks:
            hook.remove()
    assert np.isfinite(np.asarray(result.images[0], dtype=np.float32)).all()
    assert dtypes and set(dtypes) == {torch.float32} and vae.dtype == torch.float16


def test_a_base_that_encodes_the_empty_prompt_gets_it_encoded(xl_models, tmp_path):
    """An SDXL base whose model_index.json sets ``force_zeros_for_empty_prompt`` false: its pipelines (diffusers' and
    ``StableDiffusionXLBrushNetPipeline.from_pretrained``) and training encode "" as the unconditional text, but the
    methods built their pipelines with the default (zeros) whatever the base said."""
    import json
    import shutil

    from brushnet.methods import InpaintRequest

    models = {}
    for slot in ("base", "inpaint_model"):
        folder = shutil.copytree(xl_models[slot], tmp_path / slot)
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
        models[slot] = folder
    models.update(brushnet=xl_models["brushnet"], controlnet=xl_models["controlnet"])
    for name in ("brushnet", "blended-latent-diffusion", "sd-inpainting", "controlnet-inpaint"):
        method = load_method(name, models)
        assert method.pipeline.config.force_zeros_for_empty_prompt is False, name
    assert _load("blended-latent-diffusion", xl_models).pipeline.config.force_zeros_for_empty_prompt is True
    request = InpaintRequest(prompt="a cat", guidance_scale=2.0)
    unconditional = method.pipeline.encode_prompt("", do_classifier_free_guidance=False)[0]
    latent = load_method("blended-latent-diffusion", {"base": models["base"]})
    text = latent.encode_prompts(request, 64, 64)
    assert text.embeddings[:1].abs().max() > 0  # CLIP(""), not zeros
    torch.testing.assert_close(text.embeddings[:1], unconditional)
