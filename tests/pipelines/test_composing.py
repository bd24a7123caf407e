"""BrushNet composed with the rest of diffusers (issue 15, docs/composing.md).

Every composition is checked both ways: it changes the output when on (so it is not silently ignored) and the
output is the plain run's when it is off or at zero strength (so it breaks no parity).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderTiny,
    ControlNetModel,
    LCMScheduler,
    StableDiffusionPipeline,
    TCDScheduler,
    UNet2DConditionModel,
)
from PIL import Image

from brushnet import BrushNetModel, StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline

from .conftest import ip_adapter_state_dict, tiny_components, tiny_inputs


def make(kind: str = "sd", **overrides):
    components = {**tiny_components(kind), **overrides}
    cls = StableDiffusionXLBrushNetPipeline if kind == "xl" else StableDiffusionBrushNetPipeline
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **overrides):
    return pipe(**{**tiny_inputs(), **overrides}).images


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def controlnet_for(unet, seed: int = 2) -> ControlNetModel:
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return controlnet


# -- offloading and compile ---------------------------------------------------------------------------------
def test_sequential_offload_of_unet_branch_and_vae():
    """accelerate's sequential offload (every leaf's weights on 'meta' until it runs) on the models the injection
    drives: same output, weights really offloaded."""
    from accelerate import cpu_offload

    pipe = make()
    plain = run(pipe)
    for name in ("unet", "brushnet", "vae"):
        cpu_offload(getattr(pipe, name), execution_device=torch.device("cpu"))
    assert {p.device.type for p in pipe.unet.parameters()} == {"meta"}
    assert diff(plain, run(pipe)) < 1e-5


def test_model_offload_order_every_use_after_its_onload():
    """With model CPU offload, the UNet is moved in (its hook fires) before each of its uses in the loop, and is
    not offloaded while the loop uses it; the branch stays resident across steps (not in the chain)."""
    pipe = make()
    pipe.enable_model_cpu_offload(device="cpu")
    events = []
    for user_hook in pipe._all_hooks:
        name = next(n for n, c in pipe.components.items() if c is user_hook.model)
        pre, off = user_hook.hook.pre_forward, user_hook.offload

        def onload(module, *args, _pre=pre, _name=name, **kwargs):
            events.append(("on", _name))
            return _pre(module, *args, **kwargs)

        def offload(_off=off, _name=name):
            events.append(("off", _name))
            return _off()

        user_hook.hook.pre_forward, user_hook.offload = onload, offload
    pipe.unet.conv_in.register_forward_hook(lambda *a: events.append(("use", "unet")))
    pipe.brushnet.conv_in_condition.register_forward_hook(lambda *a: events.append(("use", "brushnet")))
    run(pipe)
    for i, (kind, name) in enumerate(events):
        if kind == "use":
            last = [e for e in events[:i] if e[1] == name and e[0] in ("on", "off")]
            assert last and last[-1][0] == "on", (i, events)
    assert events.count(("use", "unet")) == 2 and events.count(("use", "brushnet")) == 2
    assert ("off", "brushnet") not in events  # not in the chain: never bounced between steps


def test_compiled_unet_runs_a_compiled_graph():
    """``pipe.unet = torch.compile(pipe.unet)`` compiles the injected forward (dynamo traces it) and gives the
    same images."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    pipe = make()
    plain = run(pipe)
    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    compiled = run(pipe)
    assert counters["stats"]["unique_graphs"] >= 1
    assert diff(plain, compiled) < 1e-5


def test_block_level_group_offloading_runs_every_block_on_its_weights(monkeypatch):
    """Block-level group offloading: with the offloaded copies standing for weights elsewhere (NaN while
    offloaded), the output is finite and equal: every block the injection drives was onloaded first."""
    from diffusers.hooks.group_offloading import ModuleGroup

    pipe = make()
    plain = run(pipe)
    originals = {}

    def poison(group):  # the "offloaded" state: NaN weights, real ones kept aside
        for module in group.modules:
            for param in module.parameters():
                originals.setdefault(id(param), param.data.clone())
                param.data = torch.full_like(param.data, float("nan"))
        for param in group.parameters:
            originals.setdefault(id(param), param.data.clone())
            param.data = torch.full_like(param.data, float("nan"))

    def restore(group):
        for module in group.modules:
            for param in module.parameters():
                param.data = originals[id(param)]
        for param in group.parameters:
            param.data = originals[id(param)]

    monkeypatch.setattr(ModuleGroup, "offload_", poison)
    monkeypatch.setattr(ModuleGroup, "onload_", restore)
    for name in ("unet", "brushnet"):
        getattr(pipe, name).enable_group_offload("cpu", offload_type="block_level", num_blocks_per_group=1)
    out = run(pipe)
    assert np.isfinite(out).all() and diff(plain, out) < 1e-6


# -- LoRA, textual inversion ---------------------------------------------------------------------------------
def _lora_folder(tmp_path, text_encoder: bool):
    """Save a random LoRA (UNet attention, and optionally the text encoder's q/v) in diffusers' LoRA format."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = make()
    torch.manual_seed(1)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets))
    layers = {"unet_lora_layers": get_peft_model_state_dict(donor.unet)}
    if text_encoder:
        donor.text_encoder.add_adapter(
            LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
        )
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(donor.text_encoder)
    StableDiffusionPipeline.save_lora_weights(tmp_path, **layers)
    return tmp_path


def test_unet_lora_scale_fuse_unload(tmp_path):
    pytest.importorskip("peft")
    pipe = make()
    plain = run(pipe)
    pipe.load_lora_weights(_lora_folder(tmp_path, text_encoder=False), adapter_name="style")
    with_lora = run(pipe)
    zero_scale = run(pipe, cross_attention_kwargs={"scale": 0.0})
    half = run(pipe, cross_attention_kwargs={"scale": 0.5})
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    half_by_weight = run(pipe)
    pipe.set_adapters(["style"], adapter_weights=[1.0])
    pipe.fuse_lora()
    fused = run(pipe)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    unloaded = run(pipe)
    assert diff(plain, with_lora) > 1e-2  # the LoRA acts through the injected UNet
    assert diff(plain, zero_scale) < 1e-5  # scale 0 via cross_attention_kwargs: the plain run
    assert diff(half, with_lora) > 1e-3 and diff(half, plain) > 1e-3 and diff(half, half_by_weight) < 1e-5
    assert diff(fused, with_lora) < 1e-4
    assert diff(plain, unloaded) < 1e-5


def test_text_encoder_lora(tmp_path):
    peft = pytest.importorskip("peft")
    from packaging.version import Version
    from transformers.integrations import peft as transformers_peft

    if Version(peft.__version__) < Version(transformers_peft.MIN_PEFT_VERSION):
        pytest.skip(
            f"transformers needs peft >= {transformers_peft.MIN_PEFT_VERSION} for text-encoder adapters"
        )
    pipe = make()
    plain = run(pipe)
    pipe.load_lora_weights(_lora_folder(tmp_path, text_encoder=True))
    assert diff(plain, run(pipe)) > 1e-2
    pipe.unload_lora_weights()
    assert diff(plain, run(pipe)) < 1e-5


def test_textual_inversion_token_reaches_the_prompt():
    pipe = make()
    plain = run(pipe, prompt="a <shape-token> ball")
    dim = pipe.text_encoder.config.hidden_size
    pipe.load_textual_inversion(
        {"<shape-token>": torch.randn(dim, generator=torch.Generator().manual_seed(0))}
    )
    learned = run(pipe, prompt="a <shape-token> ball")
    assert diff(plain, learned) > 1e-3


# -- IP-Adapter -----------------------------------------------------------------------------------------------
def tiny_image_encoder():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=4,
    )
    processor = CLIPImageProcessor(crop_size=32, size=32)
    return CLIPVisionModelWithProjection(config), processor


@pytest.mark.parametrize("kind", ["sd", "xl"])
def test_ip_adapter_image_through_a_tiny_image_encoder(kind):
    encoder, processor = tiny_image_encoder()
    pipe = make(kind, image_encoder=encoder, feature_extractor=processor)
    plain = run(pipe)
    pipe.load_ip_adapter(
        ip_adapter_state_dict(pipe.unet, image_embed_dim=32),
        subfolder="",
        weight_name="",
        image_encoder_folder=None,
    )
    red = Image.new("RGB", (32, 32), (255, 0, 0))
    blue = Image.new("RGB", (32, 32), (0, 0, 255))
    pipe.set_ip_adapter_scale(5.0)
    with_red, with_blue = run(pipe, ip_adapter_image=red), run(pipe, ip_adapter_image=blue)
    pipe.set_ip_adapter_scale(0.0)
    scale_zero = run(pipe, ip_adapter_image=red)
    assert diff(plain, with_red) > 1e-2 and diff(with_red, with_blue) > 1e-3
    assert diff(plain, scale_zero) < 1e-5
    pipe.unload_ip_adapter()
    assert diff(plain, run(pipe)) < 1e-5


# -- ControlNet with BrushNet ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd", "xl"])
def test_controlnet_steers_and_is_parity_when_off(kind):
    components = tiny_components(kind)
    controlnet = controlnet_for(components["unet"])
    plain = run(make(kind))
    pipe = make(kind, controlnet=controlnet)
    control = Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    steered = run(pipe, control_image=control)
    off = run(pipe, control_image=control, controlnet_conditioning_scale=0.0)
    window = run(pipe, control_image=control, controlnet_guidance_end=0.5)
    other = run(pipe, control_image=Image.new("RGB", (32, 32), (0, 0, 0)))
    assert diff(plain, steered) > 1e-3 and diff(steered, other) > 1e-4
    assert diff(plain, off) < 1e-6
    assert diff(window, steered) > 1e-5 and diff(window, plain) > 1e-5
    with pytest.raises(ValueError, match="control_image"):
        run(pipe)


def test_multi_controlnet_sums_and_each_has_its_scale():
    components = tiny_components("sd")
    first, second = controlnet_for(components["unet"], 2), controlnet_for(components["unet"], 3)
    control = Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    single = run(make(controlnet=first), control_image=control)
    multi = make(controlnet=[first, second])
    only_first = run(multi, control_image=[control, control], controlnet_conditioning_scale=[1.0, 0.0])
    both = run(multi, control_image=[control, control])
    assert diff(single, only_first) < 1e-5 and diff(single, both) > 1e-4
    with pytest.raises(ValueError, match="2 ControlNets"):
        run(multi, control_image=control)


def test_controlnet_guess_mode_conditions_the_text_half_only():
    components = tiny_components("sd")
    pipe = make(controlnet=controlnet_for(components["unet"]))
    batches = []
    pipe.controlnet.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    control = Image.new("RGB", (32, 32), (200, 10, 10))
    run(pipe, control_image=control)
    run(pipe, control_image=control, guess_mode=True)
    assert batches == [2, 2, 1, 1]


def test_a_controlnet_with_pooled_conditions_runs_in_guess_mode_and_the_branch_does_not():
    """A ControlNet with ``global_pool_conditions`` (the shuffle ControlNet) ran on both guidance halves; diffusers'
    ControlNet pipelines run it in guess mode. The branch keeps its own mode."""
    components = tiny_components("sd")
    controlnet = controlnet_for(components["unet"])
    controlnet.register_to_config(global_pool_conditions=True)
    pipe = make(controlnet=controlnet)
    net_batches = []
    pipe.controlnet.register_forward_hook(lambda m, a, o: net_batches.append(a[0].shape[0]))
    control = Image.new("RGB", (32, 32), (200, 10, 10))
    run(pipe, control_image=control)
    assert net_batches == [1, 1]
    # with the net's residuals scaled to nothing the result is the pipeline's without it: the branch's
    # unconditional half still gets its residuals (in guess mode it would not)
    muted = run(pipe, control_image=control, controlnet_conditioning_scale=0.0)
    assert diff(muted, run(make())) < 1e-6


# -- inputs -----------------------------------------------------------------------------------------------------
def _two_masks(size: int = 32):
    left = np.zeros((size, size), np.float32)
    left[:, : size // 2] = 1
    top = np.zeros((size, size), np.float32)
    top[: size // 2] = 1
    return left, top


MASK_FORMATS = {
    "pil list": lambda a, b: [
        Image.fromarray((a * 255).astype(np.uint8)),
        Image.fromarray((b * 255).astype(np.uint8)),
    ],
    "numpy (B,H,W)": lambda a, b: np.stack([a, b]),
    "numpy (B,H,W,1)": lambda a, b: np.stack([a, b])[..., None],
    "numpy uint8 (B,H,W)": lambda a, b: (np.stack([a, b]) * 255).astype(np.uint8),
    "numpy list of (H,W)": lambda a, b: [a, b],
    "torch (B,H,W)": lambda a, b: torch.from_numpy(np.stack([a, b])),
    "torch (B,1,H,W)": lambda a, b: torch.from_numpy(np.stack([a, b]))[:, None],
    "torch list of (1,H,W)": lambda a, b: [torch.from_numpy(a)[None], torch.from_numpy(b)[None]],
}
SINGLE_FORMATS = {
    "pil": lambda a: Image.fromarray((a * 255).astype(np.uint8)),
    "pil RGB": lambda a: Image.fromarray((a * 255).astype(np.uint8)).convert("RGB"),
    "numpy (H,W)": lambda a: a,
    "numpy (H,W,1)": lambda a: a[..., None],
    "numpy (H,W,3)": lambda a: np.repeat(a[..., None], 3, -1),
    "torch (H,W)": lambda a: torch.from_numpy(a),
    "torch (1,H,W)": lambda a: torch.from_numpy(a)[None],
    "torch (1,1,H,W)": lambda a: torch.from_numpy(a)[None, None],
}


def _keep_masks_seen(pipe, **inputs):
    seen = []
    handle = pipe.brushnet.register_forward_hook(
        lambda m, args, kw, out: seen.append(kw["brushnet_cond"][:, 4].clone()), with_kwargs=True
    )
    try:
        run(pipe, num_inference_steps=1, guidance_scale=1.0, **inputs)
    finally:
        handle.remove()
    return seen[0]


@pytest.fixture(scope="module")
def mask_pipe():
    return make()


@pytest.mark.parametrize("fmt", list(MASK_FORMATS))
def test_batched_mask_formats_give_each_item_its_mask(mask_pipe, fmt):
    left, top = _two_masks()
    keep = _keep_masks_seen(mask_pipe, prompt=["a", "b"], mask_image=MASK_FORMATS[fmt](left, top))
    expected = 1 - torch.from_numpy(np.stack([left, top]))[:, ::2, ::2]  # latent size (VAE factor 2)
    assert torch.equal(keep, expected), fmt


@pytest.mark.parametrize("fmt", list(SINGLE_FORMATS))
def test_single_mask_formats(mask_pipe, fmt):
    left, _ = _two_masks()
    keep = _keep_masks_seen(mask_pipe, mask_image=SINGLE_FORMATS[fmt](left))
    assert torch.equal(keep, 1 - torch.from_numpy(left)[None, ::2, ::2]), fmt


def test_padding_mask_crop_pastes_into_the_input():
    pipe = make()
    inputs = tiny_inputs()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[8:20, 40:56] = 255
    out = pipe(**{**inputs, "image": image, "mask_image": Image.fromarray(mask), "output_type": "pil"},
               padding_mask_crop=4, height=32, width=32).images[0]  # fmt: skip
    out, original = np.asarray(out), np.asarray(image)
    assert out.shape == original.shape
    assert np.array_equal(out[mask == 0], original[mask == 0])  # outside the hole: the input
    assert not np.array_equal(out[mask > 0], original[mask > 0])
    with pytest.raises(ValueError, match="pil"):
        pipe(**{**inputs, "image": image, "mask_image": Image.fromarray(mask)}, padding_mask_crop=4)
    small = Image.fromarray(mask).resize((32, 32))  # failed after denoising with numpy's broadcast error
    with pytest.raises(
        ValueError, match=r"^`padding_mask_crop` needs a mask of the image's size: mask 32x32, image 64x64$"
    ):
        pipe(
            **{**inputs, "image": image, "mask_image": small, "output_type": "pil"},
            padding_mask_crop=4,
            blending=True,
        )


@pytest.mark.parametrize("kind", ["sd", "xl"])
def test_padding_mask_crop_keeps_the_feathered_blend(kind):
    """With blending, the crop was blended in its own frame and then pasted through diffusers' hard-mask overlay,
    which put the input back over the whole feather band: a hard seam, the blend silently dropped."""
    from brushnet.image import feather_mask

    pipe = make(kind)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[20:36, 24:44] = 255
    inputs = {**tiny_inputs(), "image": image, "mask_image": Image.fromarray(mask), "output_type": "pil",
              "blending": True, "blending_kernel_size": 9, "padding_mask_crop": 8, "height": 32,
              "width": 32}  # fmt: skip
    out = np.asarray(pipe(**inputs).images[0]).astype(int)
    original = np.asarray(image).astype(int)
    hole = mask > 0
    band = (feather_mask(torch.from_numpy(hole.astype("float64"))[None, None], 9)[0, 0].numpy() > 0) & ~hole
    changed = np.abs(out - original).max(-1) > 0
    assert changed[band].mean() > 0.5  # the feather reaches past the hole
    assert not changed[~band & ~hole].any()  # beyond the band: the input, byte for byte


@pytest.mark.parametrize("kind", ["sd", "xl"])
def test_padding_mask_crop_crops_the_control_image_with_the_image(kind):
    """The control image was resized whole to the crop's size: a pose or depth map no longer lined up with the
    cropped image and mask (diffusers' ControlNet inpainting pipelines crop it the same way)."""
    pipe = make(kind, controlnet=controlnet_for(tiny_components(kind)["unet"]))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    control = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mask = np.zeros((48, 64), np.uint8)
    mask[10:20, 30:44] = 255
    seen = []
    pipe.controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["controlnet_cond"].clone()) and None, with_kwargs=True
    )
    inputs = {**tiny_inputs(), "image": image, "mask_image": Image.fromarray(mask), "output_type": "pil",
              "control_image": control, "num_inference_steps": 1, "padding_mask_crop": 4, "height": 48,
              "width": 64}  # fmt: skip
    pipe(**inputs)
    crop = pipe.mask_processor.get_crop_region(Image.fromarray(mask), 64, 48, pad=4)
    expected = pipe.control_image_processor.preprocess(
        control, height=48, width=64, crops_coords=crop, resize_mode="fill"
    )
    torch.testing.assert_close(seen[0][:1].float(), expected.float(), rtol=0, atol=1e-6)


def test_strength_starts_the_hole_from_the_input():
    pipe = make()
    calls = []
    pipe.brushnet.register_forward_hook(lambda *a: calls.append(1))
    full = run(pipe, num_inference_steps=4)
    default = run(pipe, num_inference_steps=4, strength=1.0)
    assert diff(full, default) == 0 and len(calls) == 8
    calls.clear()
    half = run(pipe, num_inference_steps=4, strength=0.5)
    assert len(calls) == 2 and diff(full, half) > 1e-3
    with pytest.raises(ValueError, match="strength"):
        run(pipe, strength=0.0)


@pytest.mark.parametrize("kind", ["sd", "xl"])
def test_strength_steps_use_the_sigmas_of_their_timesteps(kind):
    """Below strength 1 the scheduler's step index starts where the schedule is cut, so each step uses its own
    timestep's sigma (the SDXL pipeline reset it to 0 and denoised t=251 with the sigma of t=751)."""
    from diffusers import EulerDiscreteScheduler

    pipe = make(kind)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    seen = []

    def callback(pipeline, step, timestep, kwargs):  # the scheduler has advanced past the step just run
        scheduler = pipeline.scheduler
        seen.append((float(timestep), float(scheduler.timesteps[scheduler.step_index - 1])))
        return kwargs

    run(pipe, num_inference_steps=4, strength=0.5, callback_on_step_end=callback)
    assert len(seen) == 2 and all(timestep == stepped for timestep, stepped in seen), seen


class FlagEverything(torch.nn.Module):
    """A safety checker with diffusers' call convention that flags every image (not the component under test)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):  # as transformers models have
        return self.weight.device

    @property
    def dtype(self):
        return self.weight.dtype

    def forward(self, images, clip_input):
        return images, [True] * len(images)


def test_safety_flagged_images_are_black():
    from transformers import CLIPImageProcessor

    pipe = make(safety_checker=FlagEverything(), feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    output = pipe(**tiny_inputs())
    assert output.nsfw_content_detected == [True]
    assert output.images.max() == 0.0


def test_autoencoder_tiny_whole_pipeline():
    pipe = make()
    pipe.vae = AutoencoderTiny(
        encoder_block_out_channels=(16, 16),
        decoder_block_out_channels=(16, 16),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
    )
    out = run(pipe)
    weak = run(pipe, strength=0.5, num_inference_steps=4)
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all() and np.isfinite(weak).all()


def test_from_pipe_of_a_stable_diffusion_pipeline_shares_components():
    components = tiny_components("sd")
    brushnet = components.pop("brushnet")
    components.pop("controlnet")
    base = StableDiffusionPipeline(**components)
    pipe = StableDiffusionBrushNetPipeline.from_pipe(base, brushnet=brushnet)
    assert pipe.unet is base.unet and pipe.text_encoder is base.text_encoder and pipe.brushnet is brushnet
    pipe.set_progress_bar_config(disable=True)
    assert np.isfinite(run(pipe)).all()


# -- few-step ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler_cls", [LCMScheduler, TCDScheduler])
def test_few_step_schedulers(scheduler_cls):
    pipe = make()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    out = run(pipe, num_inference_steps=2, guidance_scale=1.0)
    assert np.isfinite(out).all()


def test_lcm_distilled_unet_reads_the_guidance_embedding():
    """A UNet with ``time_cond_proj_dim`` (LCM-distilled) gets ``w`` as timestep_cond; CFG is then off."""
    components = tiny_components("sd")
    config = {k: v for k, v in components["unet"].config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = 32
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    brushnet = BrushNetModel.from_unet(unet)
    brushnet.load_state_dict(components["brushnet"].state_dict(), strict=False)
    pipe = make(
        unet=unet, brushnet=brushnet, scheduler=LCMScheduler.from_config(components["scheduler"].config)
    )
    pipe._guidance_scale = 8.0
    assert not pipe.do_classifier_free_guidance
    batches = []
    pipe.unet.conv_in.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    low, high = run(pipe, guidance_scale=2.0), run(pipe, guidance_scale=8.0)
    assert batches == [1] * 4 and diff(low, high) > 1e-5


def test_cfg_cutoff_with_a_text_reading_branch():
    """SDCFGCutoffCallback turns guidance off mid-loop; a branch with cross-attention (PowerPaint-style) then
    reads the conditional half (it crashed on the doubled text before)."""
    from diffusers.callbacks import SDCFGCutoffCallback

    components = tiny_components("sd")
    branch = BrushNetModel.from_unet(components["unet"], cross_attention=True)
    branch.load_state_dict(components["brushnet"].state_dict(), strict=False)
    pipe = make(brushnet=branch)
    assert pipe.brushnet.uses_text
    full = run(pipe, num_inference_steps=4)
    cut = run(pipe, num_inference_steps=4, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    assert np.isfinite(cut).all() and diff(full, cut) > 1e-4


@pytest.mark.parametrize("kind", ["sd", "xl"])
def test_cfg_cutoff_with_several_images_of_one_prompt(kind):
    """diffusers' CFG-cutoff callbacks keep the last row of the text (and SDXL's pooled text and time ids): with
    ``num_images_per_prompt=2`` the UNet then failed on a shape error. One prompt's rows are all that row, so each
    image now comes out as it does alone; rows of different prompts are one line."""
    from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback

    pipe = make(kind)
    callback = (SDXLCFGCutoffCallback if kind == "xl" else SDCFGCutoffCallback)(cutoff_step_ratio=0.5)
    both = run(pipe, num_inference_steps=4, num_images_per_prompt=2, callback_on_step_end=callback,
               generator=[torch.Generator().manual_seed(seed) for seed in (0, 1)])  # fmt: skip
    for index, seed in enumerate((0, 1)):
        alone = run(
            pipe,
            num_inference_steps=4,
            callback_on_step_end=callback,
            generator=torch.Generator().manual_seed(seed),
        )
        assert diff(both[index], alone[0]) < 1e-4
    with pytest.raises(
        ValueError, match="returned prompt_embeds with 1 row for 2 images of different prompts"
    ):
        run(pipe, prompt=["a red ball", "a blue cube"], num_inference_steps=4, callback_on_step_end=callback)


@pytest.mark.parametrize("kind", ["sd", "xl"])
def test_a_vae_with_latent_statistics_encodes_and_decodes_in_one_space(kind):
    """Playground v2.5's SDXL-layout VAE has ``latents_mean``/``latents_std``: the SDXL pipeline normalised by them
    when decoding but not when encoding (the start latents, the branch's masked image), so with ``strength`` < 1
    the kept content came back shifted (0.45 off on this test). With the UNet predicting 0 and a deterministic
    posterior, the output is the VAE's reconstruction of the input, with the statistics or without."""
    inputs = tiny_inputs()
    for stats in (False, True):
        pipe = make(kind)
        with torch.no_grad():
            pipe.vae.quant_conv.weight[4:] = 0  # the posterior's log-variance -30: its sample is its mean
            pipe.vae.quant_conv.bias[4:] = -30.0
            pipe.unet.conv_out.weight.zero_()
            pipe.unet.conv_out.bias.zero_()
        if stats:
            pipe.vae.register_to_config(latents_mean=[0.3, -0.2, 0.1, 0.4], latents_std=[0.6, 0.8, 0.5, 0.7])
        with torch.no_grad():
            pixels = pipe.image_processor.preprocess(inputs["image"])
            reconstruction = pipe.image_processor.postprocess(
                pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample, output_type="np"
            )
        size = reconstruction.shape[1] // pipe.vae_scale_factor
        out = pipe(
            **{**inputs, "num_inference_steps": 10}, strength=0.3, latents=torch.zeros(1, 4, size, size),
            brushnet_conditioning_scale=0.0, blending=False,
        ).images  # fmt: skip
        assert np.abs(out - reconstruction).max() < 2e-3, (kind, stats)  # the bug: 0.45


def test_a_pipeline_saved_with_the_projects_unipc_reloads(tmp_path):
    """``make_scheduler("unipc")`` (the methods' default) is brushnet.unipc's scheduler; diffusers looks up its
    loading base class in that module, which did not import it: "cannot be loaded as it does not seem to have any
    of the loading methods"."""
    from brushnet.schedulers import make_scheduler

    pipe = make("sd")
    pipe.scheduler = make_scheduler("unipc", pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = StableDiffusionBrushNetPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    np.testing.assert_array_equal(loaded(**tiny_inputs()).images, pipe(**tiny_inputs()).images)


@pytest.mark.parametrize("kind", ["sd", "xl"])
def test_the_original_pipelines_deprecated_step_callback_still_works(kind):
    """``callback=`` / ``callback_steps=`` (the original pipelines', diffusers 0.27's) were a TypeError: a drop-in
    call failed. They run through ``callback_on_step_end`` with a FutureWarning, at the same steps."""
    pipe = make(kind)
    calls, new_calls = [], []
    with pytest.warns(FutureWarning, match="callback_on_step_end"):
        out = pipe(
            **{**tiny_inputs(), "num_inference_steps": 4},
            callback=lambda step, t, latents: calls.append((step, int(t), latents.shape)),
            callback_steps=2,
        ).images

    def on_step_end(pipe, i, t, tensors):
        new_calls.append((i, int(t), tensors["latents"].shape))
        return {}

    same = pipe(**{**tiny_inputs(), "num_inference_steps": 4}, callback_on_step_end=on_step_end).images
    assert calls == [c for c in new_calls if c[0] % 2 == 0] and len(calls) == 2
    np.testing.assert_array_equal(out, same)
    with pytest.raises(ValueError, match="pass one step callback"):
        pipe(**tiny_inputs(), callback=print, callback_on_step_end=on_step_end)
    # a second-order scheduler: once per step, on the steps that advance the progress bar, as diffusers 0.27
    from diffusers import HeunDiscreteScheduler

    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    steps = []
    with pytest.warns(FutureWarning):
        pipe(
            **{**tiny_inputs(), "num_inference_steps": 3},
            callback=lambda step, t, latents: steps.append(step),
        )
    assert steps == [0, 1, 2]
    with pytest.raises(ValueError, match="callback_steps` must be a positive integer"):
        pipe(**tiny_inputs(), callback=print, callback_steps=0)
