"""StableDiffusionHDPainterPipeline against the original HD-Painter's outputs (tests/fixtures/hd_painter, made by
tools/hd_painter_reference/make_fixtures.py from Picsart-AI-Research/HD-Painter @ d452186 on a tiny 9-channel
model), and the attention processors' contract: the UNet is left as it was.

Tolerances. Images (in [0, 1], before quantisation, padding cropped): 1e-4, the issue's bar; measured ≤ 8.0e-5.
Latents (each step's z, the final x̂0) reach |z| ≈ 80 with this random UNet, and diffusers' UNet differs from
the original's by ~1e-5 relative, amplified by 1/√ᾱ in early steps: 2e-2 absolute (≈ 2.5e-4 relative);
measured ≤ 7.8e-3. Guided noise predictions: 5e-3 (measured ≤ 1.8e-3). RASG gradients (before normalisation):
1e-2 of their largest value (measured ≤ 2.1e-3).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from brushnet.errors import InputError
from brushnet.loading import load_base_components
from brushnet.pipelines.hd_painter_attention import HDPainterAttentionState, hd_painter_attention
from brushnet.pipelines.pipeline_hd_painter import (
    StableDiffusionHDPainterPipeline,
    hd_painter_timesteps,
    hd_painter_token_indices,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hd_painter"
INFO = json.loads((FIXTURE / "reference.json").read_text())
RUNS = {run["name"]: run for run in INFO["runs"]}
PROMPTS = INFO["prompts"]


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module")
def pipe():
    pipe = StableDiffusionHDPainterPipeline(**load_base_components(FIXTURE / "model"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(size_wh=None):
    image = Image.open(FIXTURE / "image.png").convert("RGB")
    mask = Image.open(FIXTURE / "mask.png").convert("L")
    if size_wh is not None and tuple(size_wh) != image.size:
        image, mask = image.crop((0, 0, *size_wh)), mask.crop((0, 0, *size_wh))
    image_t = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None]
    mask_t = torch.from_numpy(np.asarray(mask, np.float32) / 255)[None, None]
    return image_t, mask_t


def call(pipe, spec, **overrides):
    """Run one fixture setting; return the output images and the per-step callback records."""
    record = {"latents": [], "noise_pred": [], "rasg_gradient": [], "timesteps": []}

    def callback(_pipe, _i, t, values):
        record["timesteps"].append(int(t))
        for key in ("latents", "noise_pred", "rasg_gradient"):
            record[key].append(None if values[key] is None else values[key].clone())
        return values

    image, mask = inputs(spec["input_size_wh"])
    arguments = dict(
        prompt=PROMPTS["prompt"],
        image=image,
        mask_image=mask,
        negative_prompt=PROMPTS["negative_prompt"],
        positive_prompt=PROMPTS["positive_prompt_addition"],
        num_inference_steps=spec["num_steps"],
        guidance_scale=spec["guidance_scale"],
        use_painta=spec["use_painta"],
        use_rasg=spec["use_rasg"],
        rasg_eta=spec["eta"],
        generator=torch.Generator().manual_seed(spec["seed"]),
        output_type="pt",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "noise_pred", "rasg_gradient"],
    )
    arguments.update(overrides)
    return pipe(**arguments).images, record


@pytest.mark.parametrize("name", list(RUNS))
def test_matches_the_original(pipe, reference, name):
    spec = RUNS[name]
    images, record = call(pipe, spec)
    steps = len(spec["timesteps"])
    assert (
        record["timesteps"] == spec["timesteps"]
    )  # the original's grid, also its extra step for 7 requested

    width, height = spec["input_size_wh"]
    if f"{name}.output_raw" in reference:
        raw = reference[f"{name}.output_raw"].permute(0, 3, 1, 2)[..., :height, :width]
        assert images.shape == raw.shape
        assert (images - raw).abs().max() <= 1e-4
        # what the original returns: truncated to uint8; the same within one level
        final = reference[f"{name}.output_final_uint8"].permute(0, 3, 1, 2).float()
        assert ((images * 255).floor() - final).abs().max() <= 1

    # after the last step `latents` is the x̂0 that is decoded
    assert (record["latents"][-1] - reference[f"{name}.z0"]).abs().max() <= 2e-2
    step_latents = reference[f"{name}.step_latents"]
    for i in range(steps - 1):
        assert (record["latents"][i] - step_latents[i + 1]).abs().max() <= 2e-2, i
    for i in range(steps):
        assert (record["noise_pred"][i] - reference[f"{name}.step_eps_guided"][i]).abs().max() <= 5e-3, i

    if spec["use_rasg"]:
        gradients = reference[f"{name}.step_rasg_grad"]
        for i in range(steps - 1):
            error = (record["rasg_gradient"][i] - gradients[i]).abs().max() / gradients[i].abs().max()
            assert error <= 1e-2, i
        # the last step's backward pass is skipped: the original computes it and throws the result away
        assert record["rasg_gradient"][-1] is None
    else:
        assert all(g is None for g in record["rasg_gradient"])


def test_methods_move_the_output_as_the_original(pipe, reference):
    """PAIntA and RASG act on this model: their outputs differ from the baseline by what the original's differ."""
    baseline, _ = call(pipe, RUNS["baseline"])
    for name in ("painta", "rasg"):
        ours, _ = call(pipe, RUNS[name])
        expected = RUNS[name]["max_abs_diff_to_baseline"]["output_raw"]
        assert abs((ours - baseline).abs().max().item() - expected) < 2e-4


def test_unet_inputs_are_the_originals(pipe, reference):
    """The start noise is torch.randn from the seed (exactly); mask and masked-image latent channels match."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        call(pipe, RUNS["baseline"])
        call(pipe, RUNS["painta_rasg_padded"])
    finally:
        handle.remove()
    first, padded = seen[0], seen[len(RUNS["baseline"]["timesteps"])]
    assert first.shape[0] == 2 and torch.equal(first[0], first[1])  # [unconditional; conditional]
    assert torch.equal(first[:1, :4], reference["baseline.step_latents"][0])
    assert (first[:1, 4:] - reference["in.unet_condition"]).abs().max() <= 1e-4
    assert torch.equal(first[:1, 4], reference["in.unet_condition"][:, 0])  # the latent mask: exact, 0/1
    assert (padded[:1, 4:] - reference["in.unet_condition_padded"]).abs().max() <= 1e-4


def test_prompt_embeddings_and_token_indices(pipe, reference):
    assert (
        PROMPTS["full_prompt_sent_to_text_encoder"]
        == f"{PROMPTS['prompt']}, {PROMPTS['positive_prompt_addition']}"
    )
    indices = hd_painter_token_indices(
        pipe.tokenizer, PROMPTS["prompt"], PROMPTS["full_prompt_sent_to_text_encoder"]
    )
    assert indices == PROMPTS["token_idx"] == [1, 2, 3, 16]
    assert hd_painter_token_indices(pipe.tokenizer, "", "") == [1]  # no prompt: the end token alone
    positive, negative = pipe.encode_prompt(
        PROMPTS["full_prompt_sent_to_text_encoder"], "cpu", 1, True, PROMPTS["negative_prompt"]
    )
    assert (torch.cat([negative, positive]) - reference["in.context"]).abs().max() <= 1e-5


def test_timestep_grids():
    assert hd_painter_timesteps(5) == RUNS["baseline"]["timesteps"] == [999, 799, 599, 399, 199]
    assert hd_painter_timesteps(7) == RUNS["baseline_7steps"]["timesteps"]  # 8 steps: the original's grid
    assert len(hd_painter_timesteps(7, spacing="trailing")) == 7
    for steps in (1, 2, 4, 5, 10, 20, 25, 50, 100):  # where the count divides 1000, the grid is DDIM trailing
        trailing = DDIMScheduler(timestep_spacing="trailing")
        trailing.set_timesteps(steps)
        assert (
            hd_painter_timesteps(steps)
            == trailing.timesteps.tolist()
            == hd_painter_timesteps(steps, 1000, "trailing")
        )
    with pytest.raises(ValueError, match="timestep_spacing"):
        hd_painter_timesteps(5, spacing="leading")


def test_attention_layers(pipe, reference):
    """PAIntA re-weights the self-attention at 1/2 and 1/4 of the latent size (6 layers here, 10 in SD1.5), RASG
    reads the cross-attention at 1/4 (3 here, 5 in SD1.5): the fixture's layer lists and per-call counts."""
    image, mask = inputs()
    condition, masks = pipe.prepare_conditions(image, mask, (2, 4))
    weights = torch.zeros(1, 77)
    weights[0, PROMPTS["token_idx"]] = 1
    state = HDPainterAttentionState(tuple(condition.shape[-2:]), masks, weights, cfg=True)
    sample = torch.cat([reference["painta_rasg.step_latents"][0], condition], 1).repeat(2, 1, 1, 1)
    painta_layers, rasg_layers = (
        next(v for k, v in INFO["layers"].items() if k.startswith(p)) for p in ("painta", "rasg")
    )
    with hd_painter_attention(pipe.unet, state), torch.no_grad():
        state.start_call(painta=True, rasg=True)
        pipe.unet(sample, torch.tensor([999, 999]), encoder_hidden_states=reference["in.context"])
        assert state.painta_layers == painta_layers
        assert state.rasg_layers == rasg_layers
        assert [s.shape for s in state.rasg_scores] == [
            (1, 2, 4 * 6, 77)
        ] * 3  # conditional half, 2 heads, 4×6
        state.start_call(painta=False, rasg=False)
        pipe.unet(sample, torch.tensor([999, 999]), encoder_hidden_states=reference["in.context"])
        assert state.painta_layers == [] and state.rasg_layers == []
    # the original counts a re-weighting per layer and CFG half, on the steps with t > 500
    assert RUNS["painta_rasg"]["painta_rescale_calls_per_call"] == [2 * len(painta_layers)] * 3 + [0, 0]
    assert RUNS["painta_rasg"]["rasg_crossattn_maps_res16_per_call"] == [len(rasg_layers)] * 5


def _snapshot(unet):
    return (
        dict(unet.attn_processors),
        {name: p.detach().clone() for name, p in unet.named_parameters()},
        sum(
            len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) for m in unet.modules()
        ),
    )


def _assert_unchanged(unet, before):
    processors, parameters, hooks = before
    after = unet.attn_processors
    assert after.keys() == processors.keys()
    assert all(after[name] is processors[name] for name in processors)  # the very same processor objects
    assert all(torch.equal(p, parameters[name]) for name, p in unet.named_parameters())
    assert all(p.grad is None for p in unet.parameters())
    assert (
        sum(
            len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) for m in unet.modules()
        )
        == hooks
    )


def test_unet_is_unchanged_after_a_call_and_after_a_failing_call(pipe):
    before = _snapshot(pipe.unet)
    call(pipe, RUNS["painta_rasg"])
    _assert_unchanged(pipe.unet, before)

    class Stop(Exception):
        pass

    def fail(_pipe, i, _t, values):
        raise Stop

    with pytest.raises(Stop):
        call(pipe, RUNS["painta_rasg"], callback_on_step_end=fail)
    _assert_unchanged(pipe.unet, before)


# ---- other layouts: SD2 (linear projections, per-level heads, upcast attention), v-prediction, few levels ----


def _sd2_like(prediction_type="epsilon"):
    """The fixture's VAE and tokenizer with an SD2-style 9-channel UNet and a GELU text encoder (random)."""
    components = load_base_components(FIXTURE / "model")
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(
        sample_size=8,
        in_channels=9,
        out_channels=4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(2, 4, 4, 8),
        use_linear_projection=True,
        upcast_attention=True,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    config = CLIPTextConfig(**{**components["text_encoder"].config.to_dict(), "hidden_act": "gelu"})
    components["text_encoder"] = CLIPTextModel(config)
    components["scheduler"] = DDIMScheduler.from_config(
        components["scheduler"].config, prediction_type=prediction_type
    )
    pipe = StableDiffusionHDPainterPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd2_layout_runs_both_parts():
    pipe = _sd2_like()
    image, mask = inputs()
    image, mask = image[..., :64, :64], mask[..., 32:96, 64:128]
    before = _snapshot(pipe.unet)
    outputs = {}
    for painta, rasg in [(False, False), (True, False), (False, True)]:
        outputs[painta, rasg] = pipe(
            "a yellow teapot",
            image,
            mask,
            num_inference_steps=4,
            use_painta=painta,
            use_rasg=rasg,
            rasg_eta=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
    _assert_unchanged(pipe.unet, before)
    assert (outputs[True, False] - outputs[False, False]).abs().max() > 1e-3
    assert (outputs[False, True] - outputs[False, False]).abs().max() > 1e-5


def test_v_prediction_baseline_is_ddim():
    """Without PAIntA and RASG the loop is DDIM (η = 0) on its grid, decoding the last x̂0: diffusers' DDIMScheduler
    with trailing spacing and set_alpha_to_one reaches the same latent (v-prediction here)."""
    pipe = _sd2_like("v_prediction")
    image, mask = inputs()
    image, mask = image[..., :64, :64], mask[..., 32:96, 64:128]
    final = {}

    def keep(_pipe, _i, _t, values):
        final["latents"] = values["latents"].clone()
        return values

    pipe(
        "a teapot",
        image,
        mask,
        num_inference_steps=4,
        guidance_scale=3.0,
        use_painta=False,
        use_rasg=False,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
        callback_on_step_end=keep,
    )
    scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True
    )
    scheduler.set_timesteps(4)
    condition, _ = pipe.prepare_conditions(image, mask, ())
    positive, negative = pipe.encode_prompt("a teapot", "cpu", 1, True, "")
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = torch.cat([latents, condition], 1).repeat(2, 1, 1, 1)
            uncond, cond = pipe.unet(
                x, t, encoder_hidden_states=torch.cat([negative, positive])
            ).sample.chunk(2)
            step = scheduler.step(uncond + 3.0 * (cond - uncond), t, latents)
            latents = step.prev_sample
    assert (step.pred_original_sample - final["latents"]).abs().max() < 1e-4


def test_a_unet_without_the_layers_is_refused_and_left_unchanged(tmp_path):
    """The tiny preset has attention at the latent size and in the mid block (1/2): PAIntA acts there, RASG finds no
    cross-attention at 1/4 and refuses in one line; a model without any PAIntA layer is refused the same way."""
    from brushnet.random_models import build_base, build_inpaint_model

    folder = build_inpaint_model(tmp_path / "inpaint", build_base(tmp_path / "base", "tiny"), "tiny")
    components = load_base_components(folder)
    image, mask = torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    for mid_block in ("UNetMidBlock2DCrossAttn", None):
        if mid_block is None:  # no mid-block attention: nothing at 1/2 or 1/4 either
            components["unet"] = UNet2DConditionModel.from_config(
                components["unet"].config, mid_block_type=None
            )
        pipe = StableDiffusionHDPainterPipeline(**components)
        pipe.set_progress_bar_config(disable=True)
        before = _snapshot(pipe.unet)
        with pytest.raises(InputError, match="RASG found no cross-attention layer at 1/4"):
            pipe("x", image, mask, num_inference_steps=2, use_painta=False, output_type="pt")
        _assert_unchanged(pipe.unet, before)
        run = dict(num_inference_steps=2, use_rasg=False, output_type="pt")
        if mid_block is None:
            with pytest.raises(InputError, match="PAIntA found no self-attention layer"):
                pipe("x", image, mask, **run)
            _assert_unchanged(pipe.unet, before)
        else:
            assert pipe("x", image, mask, **run).images.shape == (1, 3, 64, 64)
    assert pipe("x", image, mask, **dict(run, use_painta=False)).images.shape == (1, 3, 64, 64)


def test_diffusers_call_conventions(pipe):
    """What diffusers users rely on, missing here until 2026-11-28: ``pipe._interrupt`` from a callback stops
    the loop; ``prompt_embeds`` a callback returns are used; ``output_type`` is checked before any step and
    "latent" returns the last x̂0; a uint8 tensor is refused and a [-1, 1] tensor read as diffusers reads it; one
    image per prompt with ``num_images_per_prompt``."""
    spec = RUNS["baseline"]
    plain, _ = call(pipe, spec)
    steps = []

    def stop(p, i, t, values):
        steps.append(i)
        p._interrupt = True
        return values

    stopped, _ = call(pipe, spec, callback_on_step_end=stop, callback_on_step_end_tensor_inputs=["latents"])
    assert steps == [0] and (stopped - plain).abs().max() > 1e-3

    def mute(p, i, t, values):
        return {"prompt_embeds": values["prompt_embeds"] * 0}

    muted, _ = call(
        pipe, spec, callback_on_step_end=mute, callback_on_step_end_tensor_inputs=["prompt_embeds"]
    )
    assert (muted - plain).abs().max() > 1e-3

    with pytest.raises(ValueError, match="output_type"):
        pipe(
            prompt="x",
            image=inputs()[0],
            mask_image=inputs()[1],
            output_type="jpeg",
            callback_on_step_end=stop,
        )
    assert steps == [0]  # refused before the first step
    latent = call(pipe, spec, output_type="latent")[0]
    assert latent.shape[1] == 4
    image, mask = inputs(spec["input_size_wh"])
    with pytest.raises(ValueError, match="float"):
        call(pipe, spec, image=(image * 255).to(torch.uint8))
    signed, _ = call(pipe, spec, image=image * 2 - 1)
    assert (signed - plain).abs().max() < 1e-5

    two = call(pipe, spec, prompt=[PROMPTS["prompt"]] * 2, image=image.expand(2, -1, -1, -1),
               mask_image=mask.expand(2, -1, -1, -1), num_images_per_prompt=2, num_inference_steps=2,
               generator=[torch.Generator().manual_seed(i) for i in range(4)])[0]  # fmt: skip
    assert two.shape[0] == 4


def _fresh():
    pipe = StableDiffusionHDPainterPipeline(**load_base_components(FIXTURE / "model"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _quick(pipe, prompt="a cat", **overrides):
    image, mask = inputs()
    return pipe(
        prompt=prompt, image=image, mask_image=mask, num_inference_steps=3, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0), output_type="pt", **overrides,
    ).images  # fmt: skip


def test_lora_and_its_scale_act_as_in_diffusers(tmp_path):
    """HD-Painter had no LoRA loader and no ``cross_attention_kwargs``: a diffusers user's LoRA could not be
    compared with the other methods."""
    pytest.importorskip("peft")
    import copy

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _fresh()
    donor = copy.deepcopy(pipe.unet)
    torch.manual_seed(1)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(donor))
    plain = _quick(pipe)
    pipe.load_lora_weights(tmp_path)
    with_lora, off = _quick(pipe), _quick(pipe, cross_attention_kwargs={"scale": 0.0})
    pipe.unload_lora_weights()
    assert (with_lora - plain).abs().max() > 1e-3
    assert (off - plain).abs().max() < 1e-5 and (_quick(pipe) - plain).abs().max() < 1e-5


def test_textual_inversion_tokens_expand_and_painta_reads_every_vector(monkeypatch):
    import brushnet.pipelines.pipeline_hd_painter as module

    pipe = _fresh()
    vectors = torch.randn(2, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pipe.load_textual_inversion({"<tok>": vectors * 5})
    pipe.load_textual_inversion({"<one>": vectors[:1] * 5})
    seen = []
    indices = module.hd_painter_token_indices
    monkeypatch.setattr(
        module, "hd_painter_token_indices", lambda t, bare, full: seen.append(bare) or indices(t, bare, full)
    )
    two, one = _quick(pipe, "a <tok> cat"), _quick(pipe, "a <one> cat")
    assert seen == ["a <tok> <tok>_1 cat", "a <one> cat"]
    assert (two - one).abs().max() > 1e-4


# ---- diffusers' CFG-cutoff callbacks ----


def _unet_outputs(pipe):
    """Record each UNet call's output (detached) while the returned hook is registered."""
    outputs = []
    handle = pipe.unet.register_forward_hook(
        lambda m, a, k, o: outputs.append(o.sample.detach().clone()), with_kwargs=True
    )
    return outputs, handle


def test_cfg_cutoff_callback_turns_guidance_off():
    """diffusers' ``SDCFGCutoffCallback`` sets ``pipe._guidance_scale = 0`` and returns the conditional row of
    ``prompt_embeds``: the pipeline read its own ``guidance_scale`` and crashed on the one-row text with a doubled
    batch. Now the steps after the cutoff run the conditional half only, the output differs from full guidance,
    the UNet's processors are put back, and the next call guides again."""
    from diffusers.callbacks import SDCFGCutoffCallback

    pipe = _fresh()
    before = _snapshot(pipe.unet)
    full = _quick(pipe)
    batches = []
    handle = pipe.unet.conv_in.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    try:
        cut = _quick(pipe, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    finally:
        handle.remove()
    assert batches == [2, 2, 1]  # 3 steps: the callback after step int(3 · 0.5) = 1 switches guidance off
    assert torch.isfinite(cut).all() and (cut - full).abs().max() > 1e-3
    _assert_unchanged(pipe.unet, before)
    assert (_quick(pipe) - full).abs().max() < 1e-6


def test_cfg_cutoff_keeps_the_conditional_half_through_painta_and_rasg():
    """Guidance off from step 1 (t = 666: PAIntA and RASG both act) on an un-doubled batch: the UNet's
    prediction and RASG's gradient at that step equal the conditional half's under full guidance (the same
    latents go in, PAIntA and RASG read only the conditional half). Dropping guidance by hand — only
    ``_guidance_scale``, the doubled ``prompt_embeds`` left as they are — gives the callback's result."""
    from diffusers.callbacks import SDCFGCutoffCallback

    pipe = _fresh()
    records = {}
    for name, callback in (
        ("full", None),
        ("cut", SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)),
        ("by_hand", lambda p, i, t, values: setattr(p, "_guidance_scale", 1.0) or values),
    ):
        gradients = []

        def record(p, i, t, values, callback=callback, gradients=gradients):
            gradients.append(values["rasg_gradient"])
            return values if callback is None else callback(p, i, t, values)

        outputs, handle = _unet_outputs(pipe)
        try:
            images = _quick(
                pipe,
                callback_on_step_end=record,
                callback_on_step_end_tensor_inputs=["prompt_embeds", "rasg_gradient"],
            )
        finally:
            handle.remove()
        records[name] = images, outputs, gradients
    full, cut, by_hand = records["full"], records["cut"], records["by_hand"]
    assert [o.shape[0] for o in full[1]] == [2, 2, 2] and [o.shape[0] for o in cut[1]] == [2, 1, 1]
    conditional = full[1][1].chunk(2)[1]
    assert (cut[1][1] - conditional).abs().max() <= 1e-4 * conditional.abs().max()
    assert cut[2][1] is not None and (cut[2][1] - full[2][1]).abs().max() <= 1e-4 * full[2][1].abs().max()
    assert (cut[0] - full[0]).abs().max() > 1e-3
    assert (by_hand[0] - cut[0]).abs().max() < 1e-6


def test_cfg_cutoff_with_a_batch():
    """``SDCFGCutoffCallback`` keeps one row of ``prompt_embeds``. With two images of one prompt that row stands for
    both (each image as it comes out alone); with two prompts it would replace the first, so that is one line
    (it would otherwise reach the UNet as a shape error)."""
    from diffusers.callbacks import SDCFGCutoffCallback

    image, mask = inputs()
    pipe = _fresh()
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)
    common = dict(
        image=image, mask_image=mask, num_inference_steps=3, callback_on_step_end=cutoff, output_type="pt"
    )
    both = pipe(prompt="a cat", num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                **common).images  # fmt: skip
    for index, seed in enumerate((0, 1)):
        alone = pipe(prompt="a cat", generator=torch.Generator().manual_seed(seed), **common).images
        assert (both[index] - alone[0]).abs().max() < 1e-4
    with pytest.raises(
        ValueError, match="returned prompt_embeds with 1 row for 2 images of different prompts"
    ):
        pipe(prompt=["a cat", "a dog"], **common)
