"""The SDXL BrushNet pipeline: the original's goldens, the branch's batch under CFG, size conditioning, fp16."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from brushnet import BrushNetModel, StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline
from brushnet.image import feather_mask
from brushnet.loading import CheckpointError, load_base_components, load_brushnet

SCHEDULERS = {
    "euler": EulerDiscreteScheduler.from_config,
    "unipc": lambda config: UniPCMultistepScheduler.from_config(config, final_sigmas_type="sigma_min"),
    "ddim": DDIMScheduler.from_config,
}


@pytest.fixture(scope="session")
def xl_golden_dir(golden_dir):
    return golden_dir.parent / "golden_xl_tiny"


class TextBlindBrushNet(BrushNetModel):
    """Same branch, but claims to ignore text: the pipeline then runs it once, on the conditional half."""

    @property
    def uses_text(self):
        return False


def make_pipe(folder, brushnet_cls=BrushNetModel, **kwargs):
    pipe = StableDiffusionXLBrushNetPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        brushnet=brushnet_cls.from_pretrained(folder / "brushnet"),
        scheduler=EulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(xl_golden_dir):
    return make_pipe(xl_golden_dir)


@pytest.fixture(scope="module")
def inputs(xl_golden_dir):
    image = Image.open(xl_golden_dir / "image.png").convert("RGB")
    mask = Image.open(xl_golden_dir / "mask.png").convert("RGB")
    arr = np.asarray(image).copy()
    arr[np.asarray(mask).mean(-1) > 127.5] = 0
    return image, mask, Image.fromarray(arr)


def sd15_pipe(folder):
    """The SD1.5 golden pipeline, through the library's loader (the folder has no model_index.json)."""
    sd15 = StableDiffusionBrushNetPipeline(
        **load_base_components(folder), brushnet=load_brushnet(folder / "brushnet"), safety_checker=None
    )
    sd15.set_progress_bar_config(disable=True)
    return sd15


def golden_kwargs(folder, name, pipe):
    """The original's call for run ``name`` (reference README, golden/xl_tiny) and its output."""
    meta = json.loads((folder / "pipeline_level.json").read_text())["runs"][name]
    tensors = load_file(folder / "pipeline_level.safetensors")
    # from the saved config, not the current scheduler's (UniPC's final_sigmas_type would reach Euler)
    pipe.scheduler = SCHEDULERS[meta["scheduler"]](EulerDiscreteScheduler.load_config(folder / "scheduler"))
    kwargs = dict(
        prompt_embeds=tensors["in.prompt_embeds"],
        pooled_prompt_embeds=tensors["in.pooled_prompt_embeds"],
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
        kwargs["negative_pooled_prompt_embeds"] = tensors["in.negative_pooled_prompt_embeds"]
    return kwargs, tensors[f"out.{name}"].numpy()


@pytest.mark.parametrize("run", ["euler_cfg", "unipc_cfg", "ddim_nocfg"])
@pytest.mark.parametrize("pre_blacked", [True, False])
def test_golden_pipeline_runs(pipe, inputs, xl_golden_dir, run, pre_blacked):
    image, mask, blacked = inputs
    kwargs, expected = golden_kwargs(xl_golden_dir, run, pipe)
    # the original's keywords: image=, mask=
    out = pipe(image=blacked if pre_blacked else image, mask=mask, **kwargs).images
    assert out.shape == expected.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


def _record_branch_calls(model):
    """Forward pre-hook on a branch: the batch size and keyword inputs of every call."""
    calls = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0].shape[0], kwargs)), with_kwargs=True
    )
    return calls, handle


def test_sdxl_branch_runs_on_the_doubled_batch_and_sd15_branch_once(pipe, inputs, xl_golden_dir, golden_dir):
    """SDXL: the branch reads the pooled text, so under CFG it sees both halves (negative first); SD1.5: it
    reads no text and runs once per step on the un-doubled batch."""
    image, mask, _ = inputs
    kwargs, _ = golden_kwargs(xl_golden_dir, "euler_cfg", pipe)
    calls, handle = _record_branch_calls(pipe.brushnet)
    try:
        pipe(image=image, mask_image=mask, **kwargs)
    finally:
        handle.remove()
    assert [batch for batch, _ in calls] == [2] * 4  # window 0-0.75 of 6 steps: the last 2 skip it
    text_embeds = calls[0][1]["added_cond_kwargs"]["text_embeds"]
    torch.testing.assert_close(text_embeds[0], kwargs["negative_pooled_prompt_embeds"][0])
    torch.testing.assert_close(text_embeds[1], kwargs["pooled_prompt_embeds"][0])
    assert calls[0][1]["brushnet_cond"].shape[0] == 2

    # negative control: the SD1.5 shortcut (one pass, conditional half repeated) misses the golden
    blind = make_pipe(xl_golden_dir, TextBlindBrushNet)
    kwargs, expected = golden_kwargs(xl_golden_dir, "euler_cfg", blind)
    assert np.abs(blind(image=image, mask_image=mask, **kwargs).images - expected).max() > 1e-2

    sd15 = sd15_pipe(golden_dir)
    sd15_calls, handle = _record_branch_calls(sd15.brushnet)
    try:
        sd15("a red ball", image, mask, num_inference_steps=3, guidance_scale=7.5, output_type="np")
    finally:
        handle.remove()
    assert [batch for batch, _ in sd15_calls] == [1] * 3


def test_guess_mode_and_no_cfg_run_the_branch_on_the_conditional_half(pipe, inputs):
    image, mask, _ = inputs
    calls, handle = _record_branch_calls(pipe.brushnet)
    try:
        pipe(
            "a red ball",
            image=image,
            mask_image=mask,
            num_inference_steps=2,
            guess_mode=True,
            output_type="np",
        )
        pipe(
            "a red ball",
            image=image,
            mask_image=mask,
            num_inference_steps=2,
            guidance_scale=1.0,
            output_type="np",
        )
    finally:
        handle.remove()
    assert [batch for batch, _ in calls] == [1] * 4


def test_size_conditioning_is_exact_in_bfloat16(xl_golden_dir, inputs):
    """The time ids are pixel counts that the UNet, the branch and a guide ControlNet embed in float32; cast to
    bfloat16 with the text (as diffusers and the original do), an original size of 1365 reached them as 1368 and
    a crop at 683 as 684."""
    from diffusers import ControlNetModel

    base = make_pipe(xl_golden_dir)
    controlnet = ControlNetModel.from_unet(
        base.unet, conditioning_embedding_out_channels=(16, 32)
    )  # the VAE: /2
    pipe = StableDiffusionXLBrushNetPipeline(**{**base.components, "controlnet": controlnet})
    pipe = pipe.to(dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    image, mask, _ = inputs
    seen, handles = {}, []
    for name in ("unet", "brushnet", "controlnet"):

        def hook(_, args, name=name):
            seen.setdefault(name, args[0].tolist())  # returns None: the input is left as it is

        handles.append(getattr(pipe, name).add_time_proj.register_forward_pre_hook(hook))
    try:
        out = pipe(
            "a red ball", image=image, mask_image=mask, control_image=image, num_inference_steps=1,
            output_type="np", original_size=(1365, 2047), crops_coords_top_left=(683, 301), target_size=(64, 64),
        ).images  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    expected = [1365, 2047, 683, 301, 64, 64] * 2  # the unconditional and the conditional half
    assert seen == {"unet": expected, "brushnet": expected, "controlnet": expected}
    assert np.isfinite(out).all()


def test_size_conditioning_reaches_branch_and_unet(pipe, inputs):
    """Time ids are (original size, crop top-left, target size); negative ones pair with the unconditional
    half of every image, also with several images per prompt."""
    image, mask, _ = inputs
    calls, handle = _record_branch_calls(pipe.brushnet)
    common = dict(image=image, mask_image=mask, num_inference_steps=2, output_type="np")
    try:
        default = pipe("a red ball", **common, generator=torch.Generator().manual_seed(0)).images
        sized = pipe(
            "a red ball", **common, generator=torch.Generator().manual_seed(0),
            original_size=(256, 128), crops_coords_top_left=(16, 8), target_size=(64, 32),
            negative_original_size=(512, 512), negative_crops_coords_top_left=(0, 4), negative_target_size=(64, 64),
            num_images_per_prompt=2,
        ).images  # fmt: skip
    finally:
        handle.remove()
    assert calls[0][1]["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    time_ids = calls[-1][1]["added_cond_kwargs"]["time_ids"].tolist()
    assert time_ids == [[512, 512, 0, 4, 64, 64]] * 2 + [[256, 128, 16, 8, 64, 32]] * 2
    assert sized.shape == (2, 64, 64, 3)
    assert np.abs(sized[0] - default[0]).max() > 1e-3


def test_prompt_text_equals_its_embeddings_and_force_zeros(pipe, inputs):
    image, mask, _ = inputs
    common = dict(image=image, mask_image=mask, num_inference_steps=2, output_type="np")
    from_text = pipe(
        "a red ball", negative_prompt="blurry", **common, generator=torch.Generator().manual_seed(0)
    )
    embeds = pipe.encode_prompt("a red ball", device="cpu", negative_prompt="blurry")
    keys = (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )
    from_embeds = pipe(**dict(zip(keys, embeds)), **common, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(from_embeds.images, from_text.images, atol=1e-6)
    assert embeds[0].shape == (1, 77, 32) and embeds[2].shape == (1, 16)

    # no negative prompt: zeros (force_zeros_for_empty_prompt=True, as the original builds it)
    calls, handle = _record_branch_calls(pipe.brushnet)
    try:
        pipe("a red ball", **common)
    finally:
        handle.remove()
    kwargs = calls[0][1]
    assert torch.count_nonzero(kwargs["encoder_hidden_states"][0]) == 0
    assert torch.count_nonzero(kwargs["added_cond_kwargs"]["text_embeds"][0]) == 0
    assert torch.count_nonzero(kwargs["encoder_hidden_states"][1]) > 0


def test_clip_skip_takes_an_earlier_layer_of_both_encoders(pipe):
    ids = pipe.tokenizer(["a red ball"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
    second = pipe.text_encoder_2(ids, output_hidden_states=True)
    embeds, _, pooled, _ = pipe.encode_prompt("a red ball", device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, torch.cat([first[-2], second.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(pooled, second.text_embeds)
    skipped, *_ = pipe.encode_prompt(
        "a red ball", device="cpu", do_classifier_free_guidance=False, clip_skip=1
    )
    torch.testing.assert_close(skipped, torch.cat([first[-3], second.hidden_states[-3]], dim=-1))


def _run(pipe, image, mask, **kwargs):
    kwargs = {
        "num_inference_steps": 2,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(0),
        **kwargs,
    }
    return pipe("a red ball", image=image, mask_image=mask, **kwargs).images


@pytest.mark.parametrize(
    "option",
    [
        {"clip_skip": 1},
        {"guess_mode": True},
        {"brushnet_conditioning_scale": 0.3},
        {"control_guidance_end": 0.5},
        {"guidance_rescale": 0.7},
        {"prompt_2": "a blue cube"},
        {"negative_prompt": "blurry", "negative_prompt_2": "dark"},
        {"crops_coords_top_left": (32, 32)},
    ],
)
def test_options_change_the_output(pipe, inputs, option):
    image, mask, _ = inputs
    reference = _run(pipe, image, mask)
    changed = _run(pipe, image, mask, **option)
    assert np.abs(changed - reference).max() > 1e-4, option


def test_denoising_end_timesteps_and_callback(pipe, inputs):
    image, mask, _ = inputs
    steps, seen = [], []

    def callback(p, i, t, kw):
        steps.append(i)
        seen.append({k: tuple(v.shape) for k, v in kw.items()})
        return kw

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    _run(
        pipe, image, mask, num_inference_steps=4, denoising_end=0.5, callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "add_text_embeds", "add_time_ids"],
    )  # fmt: skip
    assert steps == [0, 1] and pipe.num_timesteps == 2
    assert seen[0] == {"latents": (1, 4, 32, 32), "add_text_embeds": (2, 16), "add_time_ids": (2, 6)}
    with pytest.raises(ValueError, match="callback tensor inputs"):
        _run(pipe, image, mask, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])

    custom = _run(pipe, image, mask, timesteps=[901, 501, 101])
    default = _run(pipe, image, mask, num_inference_steps=3)
    assert pipe.num_timesteps == 3 and np.abs(custom - default).max() > 1e-4


def test_eta_reaches_ddim(pipe, inputs):
    image, mask, _ = inputs
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    reference = _run(pipe, image, mask, num_inference_steps=3)
    noisy = _run(pipe, image, mask, num_inference_steps=3, eta=1.0)
    assert np.abs(noisy - reference).max() > 1e-4


def test_batch_equals_single_and_return_types(pipe, inputs):
    image, mask, _ = inputs
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    batch = pipe(
        ["a red ball", "a cat"], image=image, mask_image=mask, negative_prompt=["blurry", ""],
        num_images_per_prompt=2, num_inference_steps=2, output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in range(4)],
    ).images  # fmt: skip
    single = pipe(
        "a cat", image=image, mask_image=mask, negative_prompt="", num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(2),
    ).images  # fmt: skip
    assert batch.shape == (4, 64, 64, 3)
    np.testing.assert_allclose(batch[2], single[0], atol=1e-5)
    as_tuple = pipe(
        "x", image=image, mask_image=mask, num_inference_steps=1, output_type="np", return_dict=False
    )
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and as_tuple[0].shape == (1, 64, 64, 3)
    latents = _run(pipe, image, mask, output_type="latent")
    assert latents.shape == (1, 4, 32, 32)


def test_blending_keeps_pixels_outside_band_exactly(pipe, inputs):
    image, mask, _ = inputs
    out = _run(pipe, image, mask, blending=True, output_type="pil")[0]
    raw = _run(pipe, image, mask, output_type="pil")[0]
    hole = np.asarray(mask.convert("L")) > 127
    band = feather_mask(torch.from_numpy(hole.astype(np.float64))[None, None])[0, 0].numpy() > 0
    out_arr, in_arr, raw_arr = np.asarray(out), np.asarray(image), np.asarray(raw)
    assert np.array_equal(out_arr[~band], in_arr[~band])
    assert np.array_equal(out_arr[hole], raw_arr[hole])
    assert not np.array_equal(raw_arr[~band], in_arr[~band])


def test_bad_inputs_are_errors(pipe, inputs, xl_golden_dir):
    image, mask, _ = inputs
    with pytest.raises(TypeError):
        pipe("x", image=image, mask_image=mask, num_inference_step=2)
    with pytest.raises(ValueError, match="mask"):
        pipe("x", image=image, mask_image=mask, mask=mask, num_inference_steps=1)
    tensors = load_file(xl_golden_dir / "pipeline_level.safetensors")
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        pipe(prompt_embeds=tensors["in.prompt_embeds"], image=image, mask_image=mask)
    with pytest.raises(ValueError, match="multiple of"):
        pipe("x", image=image, mask_image=mask, height=63)
    with pytest.raises(ValueError, match="control_guidance"):
        pipe("x", image=image, mask_image=mask, control_guidance_start=0.9, control_guidance_end=0.1)
    with pytest.raises(ValueError, match="latent"):
        pipe("x", image=image, mask_image=mask, blending=True, output_type="latent")


def test_branch_and_base_of_different_families_are_one_line_errors(pipe, golden_dir):
    sd15_branch = BrushNetModel.from_pretrained(golden_dir / "brushnet")
    with pytest.raises(
        CheckpointError, match=r"^this SD1.5 BrushNet \(.*\) does not fit an SDXL base \(.*\)"
    ) as err:
        StableDiffusionXLBrushNetPipeline(**{**pipe.components, "brushnet": sd15_branch})
    assert "\n" not in str(err.value)
    sd15 = sd15_pipe(golden_dir)
    parts = {**pipe.components, "unet": sd15.unet, "brushnet": sd15.brushnet}
    with pytest.raises(CheckpointError, match="needs an SDXL base; this one is SD1.5"):
        StableDiffusionXLBrushNetPipeline(**parts)
    with pytest.raises(CheckpointError, match=r"^this SDXL BrushNet \(.*\) does not fit an SD1.5 base"):
        StableDiffusionBrushNetPipeline(**{**sd15.components, "brushnet": pipe.brushnet})


def test_save_and_load_round_trip(pipe, inputs, tmp_path):
    image, mask, _ = inputs
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = StableDiffusionXLBrushNetPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.force_zeros_for_empty_prompt is True and loaded.image_encoder is None
    np.testing.assert_array_equal(_run(loaded, image, mask), _run(pipe, image, mask))


def _overflowing_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """The same VAE with its encoder's and decoder's first convs scaled by 1e5: the activations that follow
    exceed float16's range (65504), while in float32 the group norms bring them back."""
    with torch.no_grad():
        for conv in (vae.encoder.conv_in, vae.decoder.conv_in):
            conv.weight.mul_(1e5)
            conv.bias.mul_(1e5)
    return vae


def test_fp16_upcasts_an_overflowing_vae_and_keeps_an_fp16_fixed_one(xl_golden_dir, inputs):
    """fp16 on CPU: with ``force_upcast`` (the stock SDXL VAE's config) the VAE encodes and decodes in float32
    and goes back to float16; the same VAE without it (what an fp16-fix VAE declares) runs in fp16 — here it
    overflows into NaN, which shows the upcast is what keeps the image finite."""
    image, mask, _ = inputs
    pipe = make_pipe(xl_golden_dir)
    _overflowing_vae(pipe.vae)
    assert pipe.vae.config.force_upcast
    reference = _run(pipe, image, mask)
    assert np.isfinite(reference).all()

    pipe.to(torch.float16)
    vae_dtypes = []
    for module in (pipe.vae.encoder, pipe.vae.decoder):
        module.register_forward_pre_hook(lambda m, args: vae_dtypes.append(next(m.parameters()).dtype))
    upcast = _run(pipe, image, mask)
    assert vae_dtypes == [torch.float32, torch.float32] and pipe.vae.dtype == torch.float16
    assert pipe.unet.dtype == pipe.brushnet.dtype == torch.float16
    assert np.isfinite(upcast).all() and np.abs(upcast - reference).max() < 1e-2

    pipe.vae.register_to_config(force_upcast=False)
    vae_dtypes.clear()
    overflowed = _run(pipe, image, mask)
    assert vae_dtypes == [torch.float16, torch.float16]
    assert np.isnan(overflowed).all()

    fixed = make_pipe(xl_golden_dir).to(torch.float16)  # a VAE that is fine in fp16, declared so
    fixed.vae.register_to_config(force_upcast=False)
    out = _run(fixed, image, mask)
    assert fixed.vae.dtype == torch.float16 and np.isfinite(out).all() and 0 < out.mean() < 1


def test_negative_prompt_2_alone_is_used_and_a_lone_negative_size_is_refused(xl_golden_dir, inputs):
    """diffusers' SDXL ``encode_prompt`` zeroes the negative when ``negative_prompt`` is None, so
    ``negative_prompt_2="blurry"`` alone changed nothing (0.0 from the plain run); it is text_encoder_2's negative
    now, with "" for the first encoder. One negative size alone, or a negative crop without the sizes, was dropped
    without a word: a one-line ValueError now."""
    image, mask, _ = inputs
    pipe = make_pipe(xl_golden_dir)
    plain = _run(pipe, image, mask)
    alone = _run(pipe, image, mask, negative_prompt_2="blurry")
    spelled = _run(pipe, image, mask, negative_prompt="", negative_prompt_2="blurry")
    assert np.abs(alone - plain).max() > 1e-3
    np.testing.assert_array_equal(alone, spelled)
    for kwargs, message in (
        ({"negative_original_size": (16, 16)}, "`negative_original_size` alone has no effect"),
        ({"negative_target_size": (16, 16)}, "`negative_target_size` alone has no effect"),
        (
            {"negative_crops_coords_top_left": (7, 7)},
            "`negative_crops_coords_top_left` has no effect without",
        ),
    ):
        with pytest.raises(ValueError, match=message) as info:
            _run(pipe, image, mask, **kwargs)
        assert "\n" not in str(info.value)
    both = _run(pipe, image, mask, negative_original_size=(16, 16), negative_target_size=(16, 16))
    assert np.abs(both - plain).max() > 1e-3
