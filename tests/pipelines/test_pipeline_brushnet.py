import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UniPCMultistepScheduler
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from brushnet import BrushNetModel, StableDiffusionBrushNetPipeline
from brushnet.image import feather_mask
from brushnet.pipelines import brushnet_keep_schedule


class TextReadingBrushNet(BrushNetModel):
    """Same branch, but claims to read text: the pipeline then runs it on the CFG-doubled batch (the original's way)."""

    @property
    def uses_text(self):
        return True


def make_pipe(golden_dir, brushnet_cls=BrushNetModel):
    pipe = StableDiffusionBrushNetPipeline(
        vae=AutoencoderKL.from_pretrained(golden_dir / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(golden_dir / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(golden_dir / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(golden_dir / "unet"),
        brushnet=brushnet_cls.from_pretrained(golden_dir / "brushnet"),
        scheduler=DDIMScheduler.from_pretrained(golden_dir / "scheduler"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(golden_dir):
    return make_pipe(golden_dir)


@pytest.fixture(scope="module")
def inputs(golden_dir):
    image = Image.open(golden_dir / "image.png").convert("RGB")
    mask = Image.open(golden_dir / "mask.png").convert("RGB")
    arr = np.asarray(image).copy()
    arr[np.asarray(mask).mean(-1) > 127.5] = 0
    return image, mask, Image.fromarray(arr)


def golden_kwargs(golden_dir, name, pipe):
    meta = json.loads((golden_dir / "pipeline_level.json").read_text())["runs"][name]
    tensors = load_file(golden_dir / "pipeline_level.safetensors")
    if meta["scheduler"] == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    else:
        pipe.scheduler = UniPCMultistepScheduler.from_config(
            pipe.scheduler.config, final_sigmas_type="sigma_min"
        )
    kwargs = dict(
        prompt_embeds=tensors["in.prompt_embeds"],
        num_inference_steps=meta["steps"],
        guidance_scale=meta["guidance_scale"],
        brushnet_conditioning_scale=meta["brushnet_conditioning_scale"],
        control_guidance_start=meta["control_guidance_start"],
        control_guidance_end=meta["control_guidance_end"],
        generator=torch.Generator().manual_seed(1234),
        output_type="np",
    )
    if meta["guidance_scale"] > 1:
        kwargs["negative_prompt_embeds"] = tensors["in.negative_prompt_embeds"]
    return kwargs, tensors[f"out.{name}"].numpy()


@pytest.mark.parametrize("run", ["ddim_cfg", "unipc_cfg", "ddim_nocfg"])
@pytest.mark.parametrize("pre_blacked", [True, False])
def test_golden_pipeline_runs(pipe, inputs, golden_dir, run, pre_blacked):
    image, mask, blacked = inputs
    kwargs, expected = golden_kwargs(golden_dir, run, pipe)
    # positional call, as the original scripts make it
    out = pipe(None, blacked if pre_blacked else image, mask, **kwargs).images
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


def test_cfg_branch_once_per_step_equals_doubled_batch(golden_dir, inputs):
    image, mask, _ = inputs
    once, doubled = make_pipe(golden_dir), make_pipe(golden_dir, TextReadingBrushNet)
    batches = {"once": [], "doubled": []}
    once.brushnet.register_forward_hook(lambda m, a, o: batches["once"].append(a[0].shape[0]))
    doubled.brushnet.register_forward_hook(lambda m, a, o: batches["doubled"].append(a[0].shape[0]))
    kwargs, _ = golden_kwargs(golden_dir, "ddim_cfg", once)
    a = once(None, image, mask, **kwargs).images
    kwargs, _ = golden_kwargs(golden_dir, "ddim_cfg", doubled)
    b = doubled(None, image, mask, **kwargs).images
    # window 0-0.75 of 8 steps: the last 2 skip the branch
    assert batches["once"] == [1] * 6 and batches["doubled"] == [2] * 6
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_steps_outside_the_window_skip_the_branch(pipe, inputs, golden_dir):
    """Where the branch's scale is 0 (steps outside control_guidance_start/end, or a scale of 0) it is not run:
    the golden runs (windows 0-0.75 and 0.25-1 of 8 steps, recorded from the original, which runs it every step)
    come out the same with 6 branch calls each, and a scale of 0 calls it never."""
    image, mask, _ = inputs
    calls = []
    handle = pipe.brushnet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        for run in ("ddim_cfg", "unipc_cfg"):
            calls.clear()
            kwargs, expected = golden_kwargs(golden_dir, run, pipe)
            np.testing.assert_allclose(pipe(None, image, mask, **kwargs).images, expected, atol=1e-4, rtol=0)
            assert calls == [1] * 6, (run, calls)
        calls.clear()
        kwargs, _ = golden_kwargs(golden_dir, "ddim_cfg", pipe)
        pipe(None, image, mask, **{**kwargs, "brushnet_conditioning_scale": 0.0})
        assert calls == []
    finally:
        handle.remove()


def test_a_zero_scale_step_predicts_what_the_branch_adding_zeros_does(pipe):
    """:func:`predict_noise` at a Python 0 (the eager loop's scale outside the window) skips the branch; at a
    tensor 0 (the compiled step's scale, which must not change the graph) it runs it and adds its zero residuals:
    the same prediction, bit for bit."""
    from brushnet.pipelines.denoising_step import StepPlan, predict_noise

    plan = StepPlan(True, False, False, False, torch.float32, torch.float32)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 32, 32, generator=generator)
    text = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=generator)
    cond = torch.randn(1, 5, 32, 32, generator=generator)
    calls = []
    handle = pipe.brushnet.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with torch.no_grad():
            skipped = predict_noise(
                pipe.brushnet, pipe.unet, None, plan, latents, torch.tensor(500), text, cond, 0.0
            )
            assert calls == []
            run = predict_noise(
                pipe.brushnet,
                pipe.unet,
                None,
                plan,
                latents,
                torch.tensor(500),
                text,
                cond,
                torch.tensor(0.0),
            )
            assert calls == [1]
            scaled = predict_noise(
                pipe.brushnet, pipe.unet, None, plan, latents, torch.tensor(500), text, cond, 1.0
            )
    finally:
        handle.remove()
    assert torch.equal(skipped, run)
    assert not torch.allclose(skipped, scaled)  # the branch does change the prediction when it is on


def test_strict_fp32_cudnn_runs_the_branch_on_the_doubled_batch(golden_dir, inputs, monkeypatch):
    """At strict fp32 on cuDNN the branch's batch-1 convolutions took 19.4 GiB of workspace on an H100 (issue 14):
    there the pipeline runs the branch on the doubled batch, as the original does."""
    from brushnet.pipelines import common

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert common.strict_fp32_cudnn(cuda, torch.float32)
    assert not common.strict_fp32_cudnn(cuda, torch.float16)
    assert not common.strict_fp32_cudnn(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert not common.strict_fp32_cudnn(cuda, torch.float32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "enabled", False)
    assert not common.strict_fp32_cudnn(cuda, torch.float32)

    image, mask, _ = inputs
    pipe = make_pipe(golden_dir)
    batches = []
    pipe.brushnet.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    kwargs, expected = golden_kwargs(golden_dir, "ddim_cfg", pipe)
    monkeypatch.setattr(common, "strict_fp32_cudnn", lambda device, dtype: dtype == torch.float32)
    out = pipe(None, image, mask, **kwargs).images
    assert batches == [2] * 6  # the window's 6 of 8 steps
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


def test_branch_batch_picks_the_schedule_and_refuses_other_values(golden_dir, inputs, monkeypatch):
    """``pipe.branch_batch``: None = the rule (once; doubled at strict fp32), "doubled" = the original's schedule,
    "once" = once even at strict fp32; the image is the golden's either way; anything else is refused."""
    from brushnet.pipelines import common

    image, mask, _ = inputs
    pipe = make_pipe(golden_dir)
    batches = []
    pipe.brushnet.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    for strict, choice, size in [(False, None, 1), (False, "doubled", 2), (True, None, 2), (True, "once", 1)]:
        kwargs, expected = golden_kwargs(golden_dir, "ddim_cfg", pipe)  # a fresh generator per call
        monkeypatch.setattr(common, "strict_fp32_cudnn", lambda device, dtype, strict=strict: strict)
        pipe.branch_batch = choice
        batches.clear()
        out = pipe(None, image, mask, **kwargs).images
        assert batches == [size] * 6, (strict, choice)  # the window's 6 of 8 steps
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="branch_batch must be None, 'doubled' or 'once', got 'twice'"):
        pipe.branch_batch = "twice"
    assert pipe.branch_batch == "once"


def test_branch_sees_keep_mask_white_is_hole(pipe, inputs, golden_dir):
    image, mask, _ = inputs
    seen = []
    handle = pipe.brushnet.register_forward_hook(
        lambda m, args, kw, out: seen.append(kw["brushnet_cond"]), with_kwargs=True
    )
    try:
        kwargs, _ = golden_kwargs(golden_dir, "ddim_nocfg", pipe)
        pipe(None, image, mask, **{**kwargs, "num_inference_steps": 1})
    finally:
        handle.remove()
    keep = seen[0][0, 4]  # 5th channel: 1 = keep
    hole = torch.from_numpy(np.asarray(mask.convert("L")) > 127)
    hole_latent = torch.nn.functional.interpolate(hole[None, None].float(), size=keep.shape, mode="nearest")[
        0, 0
    ]
    assert torch.equal(keep, 1 - hole_latent)
    assert 0 < keep.mean() < 1


def test_blending_keeps_pixels_outside_band_exactly(pipe, inputs, golden_dir):
    image, mask, _ = inputs
    kwargs, _ = golden_kwargs(golden_dir, "ddim_nocfg", pipe)
    out = pipe(None, image, mask, blending=True, **{**kwargs, "output_type": "pil"}).images[0]
    raw = pipe(
        None,
        image,
        mask,
        **{**kwargs, "output_type": "pil", "generator": torch.Generator().manual_seed(1234)},
    )
    hole = np.asarray(mask.convert("L")) > 127
    band = feather_mask(torch.from_numpy(hole.astype(np.float64))[None, None])[0, 0].numpy() > 0
    out_arr, in_arr, raw_arr = np.asarray(out), np.asarray(image), np.asarray(raw.images[0])
    assert np.array_equal(out_arr[~band], in_arr[~band])
    assert np.array_equal(out_arr[hole], raw_arr[hole])  # the hole is the generated image
    assert not np.array_equal(raw_arr[~band], in_arr[~band])  # without blending, kept pixels drift (VAE)
    assert band.sum() > hole.sum()


def test_unknown_keyword_is_an_error(pipe, inputs):
    image, mask, _ = inputs
    with pytest.raises(TypeError):
        pipe("a ball", image, mask, num_inference_step=2)


def test_mask_alias_and_conflict(pipe, inputs):
    image, mask, _ = inputs
    out = pipe("a red ball", image, mask=mask, num_inference_steps=1, output_type="np").images
    assert out.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="mask"):
        pipe("a red ball", image, mask, mask=mask, num_inference_steps=1)


def test_prompt_text_num_images_and_callback(pipe, inputs):
    image, mask, _ = inputs
    steps = []

    def callback(p, i, t, kw):
        steps.append(i)
        assert set(kw) == {"latents"}
        return kw

    out = pipe(
        ["a red ball", "a cat"],
        image,
        mask,
        negative_prompt=["blurry", ""],
        num_images_per_prompt=2,
        num_inference_steps=3,
        output_type="np",
        callback_on_step_end=callback,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (4, 64, 64, 3) and steps == [0, 1, 2]
    single = pipe(
        "a red ball", image, mask, negative_prompt="blurry", num_inference_steps=3, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    np.testing.assert_allclose(single[0], out[0], atol=1e-5)


def test_bad_inputs(pipe, inputs):
    image, mask, _ = inputs
    with pytest.raises(ValueError, match="multiple of"):
        pipe("x", image, mask, height=61, num_inference_steps=1)
    with pytest.raises(ValueError, match="control_guidance"):
        pipe("x", image, mask, control_guidance_start=0.8, control_guidance_end=0.2, num_inference_steps=1)
    with pytest.raises(ValueError, match="latent"):
        pipe("x", image, mask, blending=True, output_type="latent", num_inference_steps=1)
    with pytest.raises(ValueError, match="image"):
        pipe("x", None, mask)


def test_size_not_multiple_of_total_downsampling(pipe, inputs):
    image, mask, _ = inputs  # golden VAE factor 2: 60 px -> 30 latent, not a multiple of the UNet's 4
    out = pipe("x", image, mask, height=60, width=52, num_inference_steps=1, output_type="np").images
    assert out.shape == (1, 60, 52, 3)


def test_keep_schedule():
    assert brushnet_keep_schedule(8, 0.0, 0.75) == [1, 1, 1, 1, 1, 1, 0, 0]
    assert brushnet_keep_schedule(8, 0.25, 1.0) == [0, 0, 1, 1, 1, 1, 1, 1]


def test_sdxl_branch_on_sd15_base_is_rejected(golden_dir):
    import json as _json

    config = _json.loads((golden_dir.parent / "reference" / "brushnet_sdxl_config.json").read_text())
    with torch.device("meta"):
        sdxl = BrushNetModel.from_config(config)
    parts = make_pipe(golden_dir).components
    with pytest.raises(ValueError, match=r"this SDXL BrushNet \(.*\) does not fit an SD1.5 base"):
        StableDiffusionBrushNetPipeline(**{**parts, "brushnet": sdxl})


def _run(pipe, image, mask, **kwargs):
    kwargs = {
        "num_inference_steps": 2,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(0),
        **kwargs,
    }
    return pipe("a red ball", image, mask, **kwargs).images


def test_prompt_embeds_latents_and_return_dict(pipe, inputs):
    image, mask, _ = inputs
    reference = _run(pipe, image, mask, negative_prompt="blurry")
    embeds, negative = pipe.encode_prompt("a red ball", "cpu", 1, True, "blurry")
    from_embeds = pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, image=image, mask_image=mask,
        num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    np.testing.assert_allclose(from_embeds, reference, atol=1e-6)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    a = _run(pipe, image, mask, latents=latents.clone())
    b = _run(pipe, image, mask, latents=latents.clone())
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, reference)  # the given latents are used, not the generator's
    as_tuple = pipe("a red ball", image, mask, num_inference_steps=1, output_type="np", return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (1, 64, 64, 3)


@pytest.mark.parametrize(
    "option",
    [
        {"clip_skip": 1},
        {"guess_mode": True},
        {"brushnet_conditioning_scale": 0.3},
        {"control_guidance_end": 0.5},
    ],
)
def test_options_change_the_output(pipe, inputs, option):
    image, mask, _ = inputs
    reference = _run(pipe, image, mask)
    changed = _run(pipe, image, mask, **option)
    assert np.abs(changed - reference).max() > 1e-4, option


@pytest.mark.parametrize(
    "name",
    [
        "EulerDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "EulerAncestralDiscreteScheduler",
        "LMSDiscreteScheduler",
    ],
)
def test_any_diffusers_scheduler(golden_dir, inputs, name):
    import diffusers

    image, mask, _ = inputs
    pipe = make_pipe(golden_dir)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    out = _run(pipe, image, mask, num_inference_steps=3)
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_eta_reaches_ddim(pipe, inputs):
    image, mask, _ = inputs
    reference = _run(pipe, image, mask, num_inference_steps=3)
    noisy = _run(pipe, image, mask, num_inference_steps=3, eta=1.0)
    assert np.abs(noisy - reference).max() > 1e-4


def test_clip_skip_uses_the_penultimate_layer(pipe):
    ids = pipe.tokenizer(
        ["a red ball"], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
    norm = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm
    embeds, _ = pipe.encode_prompt("a red ball", "cpu", 1, False, clip_skip=1)
    torch.testing.assert_close(embeds, norm(hidden[-2]))
    plain, _ = pipe.encode_prompt("a red ball", "cpu", 1, False)
    torch.testing.assert_close(plain, pipe.text_encoder(ids)[0])
