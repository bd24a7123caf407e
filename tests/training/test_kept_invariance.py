"""The kept region's caption-invariance term (``kept_invariance_weight``): what it adds to the loss, which latent
cells it looks at, that it leaves the samples alone, and that training with it makes the kept region's
prediction depend less on the caption; and the terms tried beside it (the guided term, the hole's anchor term)."""

import copy

import pytest
import torch

from brushnet.data.brushdata import BrushDataStream
from brushnet.models.brushnet import BrushNetModel
from brushnet.models.unet_injection import unet_forward_with_brushnet
from brushnet.training import loop
from brushnet.training.config import ConfigError, make_config, parse_train_args
from brushnet.training.data import build_train_dataloader, iterate_batches


def _batch(config):
    dataset = BrushDataStream(config.train_shards, config.resolution, config.mask, seed=0, shuffle_buffer=0)
    return next(iterate_batches(build_train_dataloader(config, dataset), dataset, epoch=0))


def _branch_with_taps(components, seed: int = 0) -> BrushNetModel:
    """A branch whose zero-initialised taps are drawn non-zero (from ``seed``), so its features reach the UNet."""
    brushnet = BrushNetModel.from_unet(components.unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in brushnet.named_parameters():
            if name.startswith(("brushnet_down_blocks", "brushnet_mid_block", "brushnet_up_blocks")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return brushnet


def _by_hand(brushnet, components, batch, seed):
    """The draws of ``brushnet_training_loss`` from a generator seeded ``seed`` (posterior samples, noise, timesteps,
    in its order), made here, and the branch's two predictions on them: ``([ε̂(caption), ε̂(empty)], ε, t)``."""
    from brushnet.models.conditioning import brushnet_conditioning, encode_latents

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        texts, _ = components.family.encode(batch["caption"], "cpu", torch.float32)
        empty, _ = components.family.encode([""] * len(batch["caption"]), "cpu", torch.float32)
        pixels, hole = batch["pixel_values"], batch["mask"]
        latents = encode_latents(components.vae, pixels, generator)
        cond = brushnet_conditioning(components.vae, pixels, hole, generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
        noisy = components.noise_scheduler.add_noise(latents, noise, timesteps)
        down, mid, up = brushnet(
            noisy, timesteps, encoder_hidden_states=texts, brushnet_cond=cond, return_dict=False
        )
        predictions = [
            unet_forward_with_brushnet(components.unet, noisy, timesteps, states, down, mid, up)
            for states in (texts, empty)
        ]
    return predictions, noise, timesteps


def test_kept_cells_are_those_no_hole_pixel_touches():
    hole = torch.zeros(2, 1, 8, 8)
    hole[0, 0, 5, 2] = 1  # one pixel: cell (2, 1) of a 4 × 4 grid of 2 × 2 cells
    hole[1] = 1
    kept = loop.kept_cells(hole, (4, 4))
    assert kept.shape == (2, 1, 4, 4) and kept.dtype == torch.bool
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[2, 1] = False
    assert torch.equal(kept[0, 0], expected)
    assert not kept[1].any()
    with pytest.raises(ValueError, match="not a multiple"):
        loop.kept_cells(torch.zeros(1, 1, 9, 8), (4, 4))


def test_a_margin_keeps_only_cells_that_far_from_the_hole():
    """``margin`` m: a cell counts as kept only at Chebyshev distance > m from every touched cell."""
    hole = torch.zeros(1, 1, 16, 16)
    hole[0, 0, 5, 2] = 1  # cell (2, 1) of an 8 × 8 grid of 2 × 2 cells
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    distance = torch.maximum((rows - 2).abs(), (cols - 1).abs())
    for margin in (0, 1, 2):
        assert torch.equal(loop.kept_cells(hole, (8, 8), margin)[0, 0], distance > margin), margin
    with pytest.raises(ValueError, match="margin must be non-negative"):
        loop.kept_cells(hole, (8, 8), -1)


def test_the_term_is_the_weighted_kept_difference_of_the_two_predictions(base_config, tiny_base):
    """loss(λ) − loss(0) = λ · mean over kept cells of ‖ε̂(caption) − ε̂(empty)‖², recomputed here from the same
    draws; the generator is left in the same state (the samples of a run do not change). The guided term
    (``guided_loss_weight`` γ, ``guided_loss_scale`` w) adds γ · MSE(ε̂(empty) + w (ε̂(caption) − ε̂(empty)), ε)."""
    components = loop.load_components(str(tiny_base))
    brushnet = _branch_with_taps(components)
    config = make_config({**base_config, "train_batch_size": 4})
    batch = _batch(config)
    assert 0 < batch["mask"].mean() < 1

    def loss(weight):
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            value = loop.brushnet_training_loss(
                brushnet, components, batch, generator, kept_invariance_weight=weight
            )
        return value.item(), generator.get_state()

    (plain, state0), (with_term, state1) = loss(0.0), loss(2.5)
    assert torch.equal(state0, state1)

    def term_loss(**terms):
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            return loop.brushnet_training_loss(brushnet, components, batch, generator, **terms).item()

    with_margin = term_loss(kept_invariance_weight=2.5, kept_invariance_margin=1)
    guided = term_loss(guided_loss_weight=0.5, guided_loss_scale=4.0)
    both = term_loss(kept_invariance_weight=2.5, guided_loss_weight=0.5, guided_loss_scale=4.0)

    predictions, noise, timesteps = _by_hand(brushnet, components, batch, seed=7)
    hole = batch["mask"]
    factor = hole.shape[-1] // noise.shape[-1]
    kept = (torch.nn.functional.avg_pool2d(hole, factor) == 0).float()  # no hole pixel in the cell
    assert 0 < kept.mean() < 1
    difference = (predictions[0] - predictions[1]).pow(2).mean(dim=1, keepdim=True)
    term = ((difference * kept).sum() / kept.sum()).item()
    assert term > 0
    assert plain == pytest.approx(torch.nn.functional.mse_loss(predictions[0], noise).item(), rel=1e-5)
    assert with_term - plain == pytest.approx(2.5 * term, rel=1e-4)
    # with a margin of one cell: the kept cells with no hole pixel in their 3 × 3 neighbourhood of cells
    far = (torch.nn.functional.avg_pool2d(kept, 3, stride=1, padding=1, count_include_pad=False) == 1).float()
    assert 0 < far.sum() < kept.sum()
    far_term = ((difference * far).sum() / far.sum()).item()
    assert with_margin - plain == pytest.approx(2.5 * far_term, rel=1e-4)
    # a minimum timestep: only the samples noised to it or above count (here the upper half of the batch's draws)
    threshold = int(timesteps.sort().values[2])
    chosen = (timesteps >= threshold).float().view(-1, 1, 1, 1)
    assert 0 < chosen.sum() < len(timesteps)
    high_term = ((difference * kept * chosen).sum() / (kept * chosen).sum()).item()
    with_min = term_loss(kept_invariance_weight=2.5, kept_invariance_min_timestep=threshold)
    assert with_min - plain == pytest.approx(2.5 * high_term, rel=1e-4)
    assert high_term != pytest.approx(term, rel=1e-3)
    # the guided term: γ · MSE(u + w (c − u), target) over the whole latent, added to whatever else is on
    guided_prediction = predictions[1] + 4.0 * (predictions[0] - predictions[1])
    guided_term = torch.nn.functional.mse_loss(guided_prediction, noise).item()
    assert guided_term > plain  # guidance at w = 4 multiplies the error of c − u
    assert guided - plain == pytest.approx(0.5 * guided_term, rel=1e-4)
    assert both - plain == pytest.approx(2.5 * term + 0.5 * guided_term, rel=1e-4)


def test_the_anchor_term_holds_the_holes_caption_pull_to_the_anchor_branchs(base_config, tiny_base):
    """loss(μ, anchor) − loss(0) = μ · mean over the cells a hole pixel touches of ‖(c − u) − (cᴬ − uᴬ)‖², c and u
    the predictions with the caption and the empty one, recomputed here from the same draws with each branch; 0 when
    the anchor is the branch itself; the generator ends in the same state; no anchor is a clear error."""
    components = loop.load_components(str(tiny_base))
    brushnet, anchor = _branch_with_taps(components, seed=0), _branch_with_taps(components, seed=1)
    config = make_config({**base_config, "train_batch_size": 4})
    batch = _batch(config)

    def loss(**terms):
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            value = loop.brushnet_training_loss(brushnet, components, batch, generator, **terms).item()
        return value, generator.get_state()

    (plain, state0), (anchored, state1) = loss(), loss(hole_pull_anchor_weight=3.0, anchor=anchor)
    assert torch.equal(state0, state1)
    same, _ = loss(hole_pull_anchor_weight=3.0, anchor=copy.deepcopy(brushnet))
    assert same == pytest.approx(plain, rel=1e-6)
    both, _ = loss(hole_pull_anchor_weight=3.0, anchor=anchor, kept_invariance_weight=2.5)
    kept_only, _ = loss(kept_invariance_weight=2.5)

    (c, u), _, _ = _by_hand(brushnet, components, batch, seed=7)
    (c_anchor, u_anchor), _, _ = _by_hand(anchor, components, batch, seed=7)
    hole = batch["mask"]
    touched = (torch.nn.functional.avg_pool2d(hole, hole.shape[-1] // c.shape[-1]) > 0).float()
    assert 0 < touched.mean() < 1
    difference = ((c - u) - (c_anchor - u_anchor)).pow(2).mean(dim=1, keepdim=True)
    term = ((difference * touched).sum() / touched.sum()).item()
    assert term > 0
    assert anchored - plain == pytest.approx(3.0 * term, rel=1e-4)
    assert both - kept_only == pytest.approx(3.0 * term, rel=1e-4)
    with pytest.raises(ValueError, match="needs the anchor branch"):
        loss(hole_pull_anchor_weight=1.0)


def test_training_with_the_term_makes_the_kept_prediction_depend_less_on_the_caption(
    base_config, tiny_base, overfit
):
    """The same 15 steps on one batch with and without the term: with it, the kept cells' ‖c − u‖² ends well
    below where the paper's loss leaves it, and the denoising loss still falls. With the guided term instead, the
    guided prediction's error ends below where the paper's loss leaves it. With the anchor term (anchored to the
    starting branch) beside the invariance term, the hole's caption pull stays far closer to the starting branch's
    than with the invariance term alone, and the kept cells' ‖c − u‖² still falls."""
    components = loop.load_components(str(tiny_base))
    for module in components.frozen_modules.values():
        module.requires_grad_(False).eval()
    config = make_config({**base_config, "train_batch_size": 4})
    batch = _batch(config)
    with torch.no_grad():
        start = _branch_with_taps(components)
        first = loop.brushnet_training_loss(start, components, batch, torch.Generator().manual_seed(3)).item()

    def train(**terms):
        brushnet = _branch_with_taps(components).train()
        overfit(brushnet, components, batch, 15, **terms)
        with torch.no_grad():

            def measured(**terms):
                generator = torch.Generator().manual_seed(3)
                return loop.brushnet_training_loss(brushnet, components, batch, generator, **terms).item()

            denoising = measured()
            drift = measured(kept_invariance_weight=1.0) - denoising
            guided_error = measured(guided_loss_weight=1.0) - denoising
            hole_change = measured(hole_pull_anchor_weight=1.0, anchor=start) - denoising
        # after training: the denoising loss, the kept ‖c − u‖², the guided prediction's error and how far the
        # hole's c − u moved from the starting branch's
        return denoising, drift, guided_error, hole_change

    plain_loss, plain_drift, plain_guided, _ = train()
    term_loss, term_drift, _, term_hole = train(kept_invariance_weight=50.0)
    assert term_drift < 0.5 * plain_drift, (term_drift, plain_drift)
    assert term_loss < 0.8 * first, (term_loss, first)
    _, _, guided_error, _ = train(guided_loss_weight=1.0)
    assert guided_error < 0.8 * plain_guided, (guided_error, plain_guided)
    anchored_loss, anchored_drift, _, anchored_hole = train(
        kept_invariance_weight=50.0, hole_pull_anchor_weight=50.0, anchor=copy.deepcopy(start)
    )
    assert anchored_hole < 0.3 * term_hole, (anchored_hole, term_hole)
    assert anchored_drift < 0.5 * plain_drift, (anchored_drift, plain_drift)
    assert anchored_loss < 0.9 * first, (anchored_loss, first)


def test_sdxl_term_runs_the_branch_on_both_halves_of_guidance_as_the_pipeline_does(
    base_config, tiny_xl_models, monkeypatch
):
    """The SDXL branch reads the pooled text (its added embedding): the unconditional prediction used its features
    for the caption, and the unconditional half was the encoded empty caption where the pipeline passes zeros
    (``force_zeros_for_empty_prompt``). Now the branch runs once on [caption; zeros], as when sampling."""
    components = loop.load_components(str(tiny_xl_models["base"]))
    brushnet = _branch_with_taps(components)
    config = make_config({**base_config, "pretrained_model_name_or_path": str(tiny_xl_models["base"])})
    batch = _batch(config)
    calls = []

    def record(module, args, kwargs):
        calls.append((args[0].shape[0], kwargs["added_cond_kwargs"], kwargs["encoder_hidden_states"]))

    brushnet.register_forward_pre_hook(record, with_kwargs=True)
    unet_inputs = []
    forward = loop.unet_forward_with_brushnet

    def record_unet(unet, sample, timestep, hidden_states, *rest, **kwargs):
        unet_inputs.append(hidden_states)
        return forward(unet, sample, timestep, hidden_states, *rest, **kwargs)

    monkeypatch.setattr(loop, "unet_forward_with_brushnet", record_unet)
    with torch.no_grad():
        plain, term = (
            loop.brushnet_training_loss(
                brushnet, components, batch, torch.Generator().manual_seed(1), kept_invariance_weight=w
            ).item()
            for w in (0.0, 1.0)
        )
    assert torch.isfinite(torch.tensor(term)) and term > plain
    size = len(batch["caption"])
    assert [call[0] for call in calls] == [size, 2 * size]  # once per loss, both halves in the second
    _, added, hidden = calls[1]
    caption_hidden, caption_added = components.family.encode(batch["caption"], "cpu", torch.float32, batch)
    torch.testing.assert_close(added["text_embeds"][:size], caption_added["text_embeds"])
    assert not added["text_embeds"][size:].any() and not hidden[size:].any()
    torch.testing.assert_close(added["time_ids"][size:], added["time_ids"][:size])
    unet_hidden = unet_inputs[-1]
    torch.testing.assert_close(unet_hidden[:size], caption_hidden)
    assert not unet_hidden[size:].any()


def test_the_option_is_a_flag_and_refuses_negative_weights(base_config):
    assert make_config(base_config).kept_invariance_weight == 0.0
    flags = [
        "--pretrained_model_name_or_path",
        "base",
        "--train_shards",
        "s",
        "--kept_invariance_weight",
        "0.5",
    ]
    assert parse_train_args(flags).kept_invariance_weight == 0.5
    with pytest.raises(ConfigError, match="kept_invariance_weight"):
        make_config({**base_config, "kept_invariance_weight": -1})
    assert make_config(base_config).kept_invariance_margin == 0
    assert parse_train_args([*flags, "--kept_invariance_margin", "2"]).kept_invariance_margin == 2
    with pytest.raises(ConfigError, match="kept_invariance_margin"):
        make_config({**base_config, "kept_invariance_margin": -1})
    assert make_config(base_config).kept_invariance_min_timestep == 0
    assert (
        parse_train_args([*flags, "--kept_invariance_min_timestep", "800"]).kept_invariance_min_timestep
        == 800
    )
    with pytest.raises(ConfigError, match="kept_invariance_min_timestep"):
        make_config({**base_config, "kept_invariance_min_timestep": -1})
    assert make_config(base_config).guided_loss_weight == 0.0
    guided = parse_train_args([*flags, "--guided_loss_weight", "1", "--guided_loss_scale", "7.5"])
    assert (guided.guided_loss_weight, guided.guided_loss_scale) == (1.0, 7.5)
    with pytest.raises(ConfigError, match="guided_loss_weight"):
        make_config({**base_config, "guided_loss_weight": -1})
    with pytest.raises(ConfigError, match="guided_loss_scale"):
        make_config({**base_config, "guided_loss_scale": 0.5})
    assert make_config(base_config).hole_pull_anchor_weight == 0.0
    assert parse_train_args([*flags, "--hole_pull_anchor_weight", "16"]).hole_pull_anchor_weight == 16.0
    with pytest.raises(ConfigError, match="hole_pull_anchor_weight"):
        make_config({**base_config, "hole_pull_anchor_weight": -1})
