"""LoRAs through the methods layer, the CLI (``--lora PATH[:SCALE]``) and ``brushnet serve``: fused into each
method's base UNet at their scale, recorded with the result, and refused in one line when they cannot load."""

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from brushnet.cli import app
from brushnet.errors import CheckpointError, InputError
from brushnet.methods import inpaint, load_method

pytest.importorskip("peft")

runner = CliRunner()
REQUEST = {
    "steps": 2,
    "guidance_scale": 2.0,
    "scheduler": "ddim",
    "seed": 3,
    "prompt": "a cat",
    "blend": False,
}
FLAGS = [
    "--steps",
    "2",
    "--guidance",
    "2.0",
    "--scheduler",
    "ddim",
    "--seed",
    "3",
    "-p",
    "a cat",
    "--quiet",
    "--no-blend",
]
EVERY_METHOD = [
    "brushnet",
    "sd-inpainting",
    "controlnet-inpaint",
    "powerpaint",
    "blended-latent-diffusion",
    "repaint",
    "hd-painter",
]


def save_lora(folder, base, seed=1, text_encoder=False, safe=True):
    """A random LoRA (rank 4 on every attention projection) of the UNet in ``base``, in diffusers' format (what
    ``save_lora_weights`` writes: ``pytorch_lora_weights.safetensors`` in ``folder``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(f"{base}/unet")
    config = LoraConfig(
        r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    unet.add_adapter(config)
    layers = {"unet_lora_layers": get_peft_model_state_dict(unet)}
    if text_encoder:  # built with PEFT alone: transformers 5 wants a newer peft for its own adapter API
        from peft import inject_adapter_in_model

        encoder = CLIPTextModel.from_pretrained(f"{base}/text_encoder")
        config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
        encoder = inject_adapter_in_model(config, encoder)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(encoder)
    xl = unet.config.addition_embed_type == "text_time"
    (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).save_lora_weights(
        folder, safe_serialization=safe, **layers
    )
    return folder


@pytest.fixture(scope="module")
def lora(tiny_models, tmp_path_factory):
    return str(save_lora(tmp_path_factory.mktemp("lora"), tiny_models["base"]))


@pytest.fixture(scope="module")
def other_lora(tiny_models, tmp_path_factory):
    return str(save_lora(tmp_path_factory.mktemp("other_lora"), tiny_models["base"], seed=2))


def pixels(result):
    return np.asarray(result.images[0], dtype=float)


def sha256(folder):
    return hashlib.sha256((Path(folder) / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("name", EVERY_METHOD)
def test_a_lora_changes_every_method_and_scale_zero_is_the_plain_output(load, tiny_models, scene, lora, name):
    options = {"options": {"rasg": False}} if name == "hd-painter" else {}  # RASG needs a 1/4-size attention
    plain = inpaint(load(name), *scene, {**REQUEST, **options})
    with_lora = inpaint(
        load_method(name, {**tiny_models, "loras": [(lora, 1.0)]}), *scene, {**REQUEST, **options}
    )
    zero = inpaint(load_method(name, {**tiny_models, "loras": [(lora, 0.0)]}), *scene, {**REQUEST, **options})
    assert np.abs(pixels(with_lora) - pixels(plain)).max() > 2
    assert np.array_equal(pixels(zero), pixels(plain))


@pytest.mark.parametrize("name", ["brushnet", "blended-latent-diffusion"])
def test_an_sdxl_lora_on_the_sdxl_methods(tiny_xl_models, scene, tmp_path, name):
    models = {"base": str(tiny_xl_models["base"]), "brushnet": str(tiny_xl_models["brushnet"])}
    if name != "brushnet":
        del models["brushnet"]
    lora = str(save_lora(tmp_path, tiny_xl_models["base"]))
    plain, with_lora, zero = (
        inpaint(load_method(name, {**models, "loras": loras}), *scene, REQUEST)
        for loras in ([], [(lora, 1.0)], [(lora, 0.0)])
    )
    assert with_lora.parameters["family"] == "sdxl"
    assert np.abs(pixels(with_lora) - pixels(plain)).max() > 2
    assert np.array_equal(pixels(zero), pixels(plain))
    assert with_lora.parameters["models"]["loras"][0]["sha256"] == sha256(lora)


def test_the_fused_scales_are_diffusers_adapter_weights(tiny_models, lora, other_lora):
    """Two LoRAs fused at 0.5 and -1.0, in order, give the UNet diffusers' unfused adapters give with those
    weights; afterwards the UNet holds no LoRA layer (nothing per step costs more)."""
    fused = load_method("brushnet", {**tiny_models, "loras": [(lora, 0.5), (other_lora, -1.0)]}).pipeline
    reference = load_method("brushnet", tiny_models).pipeline
    reference.load_lora_weights(lora, adapter_name="a")
    reference.load_lora_weights(other_lora, adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.5, -1.0])
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 7, fused.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        outputs = [pipe.unet(sample, 500, encoder_hidden_states=text).sample for pipe in (fused, reference)]
    assert torch.allclose(*outputs, atol=1e-5)
    assert not any("lora" in name for name, _ in fused.unet.named_modules())


def test_the_lora_is_recorded_with_its_sha256(tiny_models, scene, lora):
    method = load_method(
        "blended-latent-diffusion", {**tiny_models, "loras": [lora]}
    )  # a path alone: scale 1
    result = inpaint(method, *scene, REQUEST)
    assert result.parameters["models"]["loras"] == [{"path": lora, "scale": 1.0, "sha256": sha256(lora)}]
    assert json.loads(json.dumps(result.metadata()))["parameters"]["models"]["loras"][0]["sha256"] == sha256(
        lora
    )


def test_a_pickle_lora_needs_allow_pickle(tiny_models, scene, lora, tmp_path):
    pickled = save_lora(tmp_path, tiny_models["base"], safe=False)
    assert (pickled / "pytorch_lora_weights.bin").is_file()
    with pytest.raises(CheckpointError, match="pickle-based .*--allow-pickle"):
        load_method("brushnet", {**tiny_models, "loras": [pickled]})
    allowed = load_method("brushnet", {**tiny_models, "loras": [pickled], "allow_pickle": True})
    same = load_method("brushnet", {**tiny_models, "loras": [lora]})
    assert np.array_equal(pixels(inpaint(allowed, *scene, REQUEST)), pixels(inpaint(same, *scene, REQUEST)))


def test_a_text_encoder_part_is_left_out_with_one_warning_where_peft_cannot_load_it(
    tiny_models, scene, lora, tmp_path, caplog
):
    """transformers 5 needs peft >= 0.22 for text-encoder adapters; with an older peft the UNet part is fused and
    a warning says what was left out. With a newer one the text-encoder part is fused too."""
    from brushnet.methods.lora import _text_encoder_lora_problem

    both = save_lora(tmp_path, tiny_models["base"], text_encoder=True)
    with caplog.at_level(logging.WARNING, logger="brushnet.methods.lora"):
        method = load_method("brushnet", {**tiny_models, "loras": [both]})
    unet_only = load_method("brushnet", {**tiny_models, "loras": [lora]})
    same = np.array_equal(
        pixels(inpaint(method, *scene, REQUEST)), pixels(inpaint(unet_only, *scene, REQUEST))
    )
    problem = _text_encoder_lora_problem()
    if problem is None:
        assert not same
    else:
        assert same and "peft >= " in problem
        warnings = [r.getMessage() for r in caplog.records if r.name == "brushnet.methods.lora"]
        assert warnings == [
            f"LoRA {both}: its text-encoder part (8 tensors) is not loaded, only its UNet part: {problem}"
        ]


@pytest.fixture
def no_loading(monkeypatch):
    """Any method load fails the test: the LoRA checks below come before any model loads."""
    from brushnet.methods.latent_method import LatentMethod
    from brushnet.methods.pipeline_method import PipelineMethod

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.name} was loaded before the LoRA was refused")

    monkeypatch.setattr(PipelineMethod, "load", classmethod(refuse))
    monkeypatch.setattr(LatentMethod, "load", classmethod(refuse))


def test_bad_loras_are_one_line_before_loading(tiny_models, tmp_path, lora, no_loading):
    def refused(loras, error=CheckpointError, **models):
        with pytest.raises(error) as caught:
            load_method("brushnet", {**tiny_models, **models, "loras": loras})
        message = str(caught.value)
        assert "\n" not in message
        return message

    assert "LoRA not found: /no/such/lora.safetensors" in refused(["/no/such/lora.safetensors"])
    unet = Path(tiny_models["base"]) / "unet" / "diffusion_pytorch_model.safetensors"
    assert "is not a LoRA: none of its" in refused([unet]) and "whole model" in refused([unet])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    assert "is not a safetensors file" in refused([tmp_path / "junk.safetensors"])
    (tmp_path / "style.pt").write_bytes(b"x")
    assert "pickle-based (.pt); pass --allow-pickle" in refused([tmp_path / "style.pt"])
    (tmp_path / "notes.txt").write_text("x")
    assert "is not a .safetensors file" in refused([tmp_path / "notes.txt"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no .safetensors file" in refused([empty])
    wrong = {"path": lora, "sha256": "0" * 64}
    assert "is not the file recorded: its sha256 is" in refused([wrong])
    assert "bad model paths: loras.0.scale" in refused([(lora, "strong")], InputError)


def test_a_lora_that_does_not_fit_the_unet_is_one_line_when_it_loads(tiny_models, tmp_path, caplog):
    """What the header cannot tell (a pickle file's family, layers the UNet lacks, a self-attention width, NaN
    factors, text-encoder tensors alone) is one line when diffusers loads it, and nothing else is logged."""
    from safetensors.torch import save_file

    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    encoder = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    cases = {
        "elsewhere": ({"unet.nowhere.to_q.lora_A.weight": (4, 32), "unet.nowhere.to_q.lora_B.weight": (32, 4)},
                      "does not fit this model's UNet: Target modules {'nowhere.to_q'} not found in the base model"),
        "wider": ({f"{layer}.lora_A.weight": (4, 99), f"{layer}.lora_B.weight": (99, 4)},
                  "does not fit this model's UNet: Error(s) in loading state_dict for UNet2DConditionModel: size "
                  f"mismatch for {layer[5:]}.lora_A.lora_0.weight"),
        "broken": ({f"{layer}.lora_A.weight": (4, 32), f"{layer}.lora_B.weight": (32, 4)},
                   "at scale 1 gives NaN weights: NaNs detected in the merged weights"),
        "text-only": ({f"{encoder}.lora_A.weight": (4, 32), f"{encoder}.lora_B.weight": (32, 4)},
                      "changes no layer of this model's UNet (it has no UNet tensors)"),
    }  # fmt: skip
    for label, (shapes, needle) in cases.items():
        fill = float("nan") if label == "broken" else 0.0
        file = tmp_path / f"{label}.safetensors"
        save_file({key: torch.full(shape, fill) for key, shape in shapes.items()}, file)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="diffusers"), pytest.raises(CheckpointError) as caught:
            load_method("blended-latent-diffusion", {"base": tiny_models["base"], "loras": [file]})
        assert str(caught.value).startswith(f"LoRA {file} {needle}") and "\n" not in str(caught.value), label
        assert not [r for r in caplog.records if r.name.startswith("diffusers")], label


def test_a_lora_of_the_other_family_is_refused_before_loading(tiny_xl_models, lora, no_loading):
    """An SD1.5 LoRA on an SDXL base: its cross-attention reads text of another width than the base's UNet."""
    with pytest.raises(CheckpointError) as caught:
        load_method("brushnet", {"base": str(tiny_xl_models["base"]), "brushnet": str(tiny_xl_models["brushnet"]),
                                 "loras": [lora]})  # fmt: skip
    message = str(caught.value)
    assert message == (
        f"LoRA {lora} was made for a UNet reading text 32 wide; the base ({tiny_xl_models['base']}) is a UNet "
        "reading text 40 wide: use a LoRA made for its family"
    )


def test_the_family_is_read_from_kohya_and_older_diffusers_names(tiny_models, tmp_path, no_loading):
    """The width of the text a LoRA's cross-attention reads, in the names kohya's scripts (diffusers' and LDM block
    names) and older diffusers versions write: an SDXL LoRA (2048) on the SD1.5-layout tiny base is refused."""
    from safetensors.torch import save_file

    names = [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight",
    ]
    for index, name in enumerate(names):
        file = tmp_path / f"{index}.safetensors"
        save_file({name: torch.zeros(4, 2048), name.replace("down", "up"): torch.zeros(320, 4)}, file)
        with pytest.raises(CheckpointError) as caught:
            load_method("brushnet", {**tiny_models, "loras": [file]})
        assert str(caught.value) == (
            f"LoRA {file} was made for an SDXL UNet (text 2048 wide); the base ({tiny_models['base']}) is a UNet "
            "reading text 32 wide: use a LoRA made for its family"
        ), name


def test_the_demo_lcm_lora_with_the_lcm_scheduler_is_diffusers_unfused_lora(scene):
    """The audit's case (LCM-LoRA with BrushNet): ``--lora`` + ``--scheduler lcm`` at 4 steps, guidance 1, on the
    demo models with their distilled LCM-LoRA gives what the pipeline gives with diffusers' own (unfused) LoRA."""
    from diffusers import LCMScheduler

    from brushnet.demo.assets import DEMO_DIR, method_models
    from brushnet.loading import load_base_components, load_brushnet
    from brushnet.pipelines import StableDiffusionBrushNetPipeline

    lora = Path(__file__).parents[1] / "fixtures" / "lcm_lora_demo"
    image = scene[0].resize((128, 128))
    mask = np.zeros((128, 128), np.uint8)
    mask[40:88, 40:88] = 255
    method = load_method("brushnet", {**method_models("brushnet"), "loras": [lora]})
    request = {"steps": 4, "guidance_scale": 1.0, "scheduler": "lcm", "seed": 1234, "prompt": "a red circle"}
    fused = inpaint(method, image, mask, {**request, "blend": False})
    components = load_base_components(DEMO_DIR / "base")
    components["scheduler"] = LCMScheduler.from_config(components["scheduler"].config)
    pipe = StableDiffusionBrushNetPipeline(
        **components, brushnet=load_brushnet(DEMO_DIR / "brushnet"), safety_checker=None
    )
    pipe.load_lora_weights(lora)
    unfused = pipe("a red circle", image, Image.fromarray(mask), num_inference_steps=4, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(1234)).images[0]  # fmt: skip
    plain = inpaint(
        load_method("brushnet", method_models("brushnet")), image, mask, {**request, "blend": False}
    )
    assert np.abs(pixels(fused) - np.asarray(unfused, dtype=float)).max() <= 2
    assert np.abs(pixels(fused) - pixels(plain)).max() > 20


def test_a_method_without_a_diffusers_pipeline_takes_no_lora(tiny_models, lora, monkeypatch):
    from brushnet.methods import registry
    from brushnet.methods.base import BASE, GenerateOutput, InpaintMethod

    class Plain(InpaintMethod):
        name = "plain-loop"
        models = (BASE,)

        @classmethod
        def load(cls, models, device="cpu", dtype="fp32"):
            raise AssertionError("loaded before the LoRA was refused")

        def generate(self, task):
            return GenerateOutput(task.image, 0)

    monkeypatch.setitem(registry._REGISTRY, "plain-loop", Plain)
    with pytest.raises(InputError, match="method 'plain-loop' takes no LoRA"):
        load_method("plain-loop", {"base": tiny_models["base"], "loras": [lora]})


# -- CLI -------------------------------------------------------------------------------------------------------
def test_the_lora_flag_fuses_and_records(tiny_models, scene, lora, tmp_path):
    image, mask = scene
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    base = ["inpaint", "-i", str(tmp_path / "in.png"), "-m", str(tmp_path / "mask.png"), "--base",
            tiny_models["base"], "--brushnet", tiny_models["brushnet"], *FLAGS]  # fmt: skip
    outputs = {}
    for label, extra in (("plain", []), ("lora", ["--lora", lora]), ("half", ["--lora", f"{lora}:0.5"])):
        out = tmp_path / f"{label}.png"
        result = runner.invoke(app, [*base, "-o", str(out), *extra])
        assert result.exit_code == 0, result.output
        outputs[label] = (
            np.asarray(Image.open(out), dtype=float),
            json.loads(out.with_suffix(".json").read_text()),
        )
    assert "loras" not in outputs["plain"][1]["parameters"]["models"]
    for label, scale in (("lora", 1.0), ("half", 0.5)):
        recorded = outputs[label][1]["parameters"]["models"]["loras"]
        assert recorded == [{"path": lora, "scale": scale, "sha256": sha256(lora)}]
    python = inpaint(load_method("brushnet", {**tiny_models, "loras": [(lora, 0.5)]}), image, mask, REQUEST)
    assert np.array_equal(outputs["half"][0], pixels(python))
    assert np.abs(outputs["lora"][0] - outputs["plain"][0]).max() > 2
    assert np.abs(outputs["half"][0] - outputs["lora"][0]).max() > 0


@pytest.mark.parametrize(
    "value, needle",
    [
        ("{lora}:strong", "error: --lora {lora}:strong: SCALE 'strong' is not a finite number"),
        ("{lora}:inf", "error: --lora {lora}:inf: SCALE 'inf' is not a finite number"),
        ("/no/such/lora:0.5", "error: LoRA not found: /no/such/lora"),
    ],
)
def test_bad_lora_flags_are_one_line_exit_2(tiny_models, scene, lora, tmp_path, value, needle):
    image, mask = scene
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    args = ["inpaint", "-i", str(tmp_path / "in.png"), "-m", str(tmp_path / "mask.png"), "-o", str(tmp_path / "o.png"),
            "--base", tiny_models["base"], "--brushnet", tiny_models["brushnet"], "--lora", value.format(lora=lora)]  # fmt: skip
    result = runner.invoke(app, [*args, *FLAGS])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(needle.format(lora=lora)), result.output
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("command", ["inpaint", "outpaint", "batch", "compare", "serve"])
def test_every_command_that_loads_a_method_has_the_flag(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert "--lora" in result.output and "PATH[:SCALE]" in result.output


def test_batch_resumes_with_the_same_lora_and_refuses_another_scale(tiny_models, scene, lora, tmp_path):
    image, mask = scene
    (tmp_path / "images").mkdir()
    image.save(tmp_path / "images" / "a.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out"
    args = ["batch", "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "mask.png"), "--output",
            str(out), "--base", tiny_models["base"], "--brushnet", tiny_models["brushnet"], *FLAGS]  # fmt: skip
    assert runner.invoke(app, [*args, "--lora", lora]).exit_code == 0
    stamp = (out / "a.png").stat().st_mtime_ns
    again = runner.invoke(app, [*args, "--lora", lora])
    assert (
        again.exit_code == 0 and "1 skipped" in again.output and (out / "a.png").stat().st_mtime_ns == stamp
    )
    other = runner.invoke(app, [*args, "--lora", f"{lora}:0.5"])
    assert other.exit_code == 2 and "was made with other settings: --lora" in other.output


def test_serve_fuses_the_lora_into_the_served_methods(tiny_models, lora, monkeypatch):
    from diffusers import UNet2DConditionModel

    from brushnet.cli import serve

    seen = {}

    def fake_run(asgi_app, engine, host, port, log_level):
        seen.update(engine.methods)

    monkeypatch.setattr(serve, "_run_server", fake_run)
    args = ["serve", "--method", "brushnet,blended-latent-diffusion", "--base", tiny_models["base"],
            "--brushnet", tiny_models["brushnet"], "--lora", f"{lora}:0.7"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"with LoRA {lora} at 0.7 fused into each method's UNet" in result.output
    plain = UNet2DConditionModel.from_pretrained(f"{tiny_models['base']}/unet").state_dict()
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    for name, method in seen.items():
        assert method.model_paths.used_by(type(method))["loras"] == [
            {"path": lora, "scale": 0.7, "sha256": sha256(lora)}
        ], name
        assert not torch.equal(method.pipeline.unet.state_dict()[key], plain[key]), name


def _hub_cache(root, repo_id, files):
    """A Hugging Face cache under ``root`` holding ``files`` ({name in the repo: local file}) of ``repo_id``."""
    import shutil

    repo = Path(root) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return root


def test_a_hub_lora_loads_from_the_local_cache(tiny_models, scene, lora, tmp_path, monkeypatch):
    """``--lora owner/name`` was "LoRA not found" even when the repo sat in the Hugging Face cache; it is now read
    from there (diffusers' file name, or a cached repo's only .safetensors file) and gives the local path's result.
    Offline and not cached, it is one line saying so, before anything loads."""
    weights = Path(lora) / "pytorch_lora_weights.safetensors"
    cache = _hub_cache(tmp_path / "hub", "someone/tiny-lora", {"pytorch_lora_weights.safetensors": weights})
    _hub_cache(cache, "someone/renamed-lora", {"my_style.safetensors": weights})
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    local = inpaint(load_method("brushnet", {**tiny_models, "loras": [(lora, 0.7)]}), *scene, REQUEST)
    for repo_id in ("someone/tiny-lora", "someone/renamed-lora"):
        result = inpaint(load_method("brushnet", {**tiny_models, "loras": [(repo_id, 0.7)]}), *scene, REQUEST)
        assert np.array_equal(pixels(result), pixels(local)), repo_id
        assert result.parameters["models"]["loras"][0]["path"] == repo_id
        assert result.parameters["models"]["loras"][0]["sha256"] == sha256(lora)
    with pytest.raises(CheckpointError) as caught:
        load_method("brushnet", {**tiny_models, "loras": ["someone/not-cached"]})
    message = str(caught.value)
    assert "\n" not in message and "cannot load LoRA 'someone/not-cached': offline mode is on" in message
    assert "pass a local .safetensors file or a folder holding one instead" in message
    # a missing local file is still "not found", not a hub lookup
    with pytest.raises(CheckpointError, match="LoRA not found: missing.safetensors"):
        load_method("brushnet", {**tiny_models, "loras": ["missing.safetensors"]})
