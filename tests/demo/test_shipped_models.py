"""The shipped shapes-world weights really inpaint: held-out scenes, kept region, prompted colour, and
PowerPaint's object removal.

Thresholds come from measurements on these weights (see docs/demo.md, "Tests"), with a margin; they fail
if the weights, the tokenizer or the BrushNet pipeline break (a random branch, an inverted mask or a
mangled prompt all fall far below them).
"""

import numpy as np
import pytest

from brushnet.data.shapes_metrics import text_alignment
from brushnet.data.shapes_writers import write_eval_set
from brushnet.demo.assets import DEMO_DIR, method_models
from brushnet.demo.run import DEMO_REQUEST
from brushnet.image import blend_pil

SCENES = 16
# Measured on these 16 scenes (10 UniPC steps, guidance 5, seed 1234, 5 px blend) with the shipped weights
# (recipe v4.2: recipe v4.1 with the branch fine-tuned with the caption-invariance and anchor terms, docs/demo.md):
# blended kept-region PSNR 46.12 dB mean (41.20 dB worst), raw kept-region PSNR 26.49 dB, the prompted colour in
# 16/16 holes and the prompted shape in 12/16 (scored on the hole pasted into the original, ``colour_hole_ok`` /
# ``shape_hole_ok``; chance about 1/7 for the colour). With the branch switched off (conditioning_scale 0) the same
# loop measured raw kept-region PSNR 7.57 dB (blended 37.61 dB), the colour in 3/16 holes and the shape in 5/16
# (test_a_switched_off_branch_fails_the_thresholds). (``python tools/measure_shipped_brushnet.py``; the loops are
# the ones below.) The shape counts are the outline-symmetry classifier's (2026-11-27). Recipe v4.1: 43.80 dB
# (40.06 worst), 24.90 dB, 16/16, 12/16; recipe v4: 43.77, 24.75 dB, 16/16, 11/16 (the (solidity, fill) classifier
# before it); recipe v3's weights: 42.96, 23.87 dB, 16/16, 10/16 (old classifier).
MIN_BLENDED_KEPT_PSNR = 43.0
MIN_RAW_KEPT_PSNR = 24.5
MIN_COLOUR_ACCURACY = 13 / 16
MIN_SHAPE_ACCURACY = 8 / 16
# PowerPaint (the shipped v2-style branch), same 16 scenes and settings. With the removal set's prompts (the
# background's phrase): holes left with no object colour, blended, 14/16 with its object-removal task (recipe v3:
# 9/16); told to paint the background, the text-guided task and BrushNet empty 16/16, so no margin over BrushNet is
# asserted. With the object's own phrase as the prompt, object-removal still empties 4/16 holes, text-guided 0/16:
# the task word does that. Text-guided on the object prompts: the colour in 16/16 holes, kept-region PSNR 45.51 dB
# blended, 25.64 dB raw (recipe v4.1; v4: 45.46 and 25.22 dB, the same counts).
MIN_POWERPAINT_REMOVED = 11 / 16
MIN_TASK_WORD_MARGIN = 2 / 16  # object-removal over text-guided with the object's phrase as the prompt
MIN_POWERPAINT_COLOUR_ACCURACY = 13 / 16
MIN_POWERPAINT_RAW_KEPT_PSNR = 23.0


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """The first scenes of the mini-BrushBench eval set (eval split: never seen in training)."""
    from brushnet.bench.datasets import load_dataset

    root = tmp_path_factory.mktemp("eval")
    write_eval_set(root, SCENES, seed=0, different_object_fraction=0.25)
    return load_dataset(root, "brushbench", "inside")


def _kept_psnr(output, original, hole):
    kept = ~hole
    diff = (
        np.asarray(output, dtype=np.float64)[kept] / 255 - np.asarray(original, dtype=np.float64)[kept] / 255
    )
    return 10 * np.log10(1.0 / max(float((diff**2).mean()), 1e-10))


def _outputs(method_name, dataset, prompt_of=lambda item: item.prompt, options=None):
    """``(item, raw, blended)`` per scene: the method's output at the demo's settings, and pasted back."""
    from brushnet.methods import inpaint, load_method

    method = load_method(method_name, method_models(method_name))
    for index in range(len(dataset)):
        item = dataset[index]
        raw = inpaint(
            method,
            item.image,
            item.mask,
            prompt=prompt_of(item),
            seed=DEMO_REQUEST["seed"],
            steps=10,
            guidance_scale=DEMO_REQUEST["guidance_scale"],
            blend=False,
            options=options or {},
        ).images[0]
        yield item, raw, blend_pil(item.image, raw, item.mask, kernel_size=DEMO_REQUEST["blend_kernel_size"])


def _run(method_name, dataset, prompt_of=lambda item: item.prompt, options=None):
    """Mean blended and raw kept-region PSNR, and the shares of raw holes with the prompted colour and shape (the
    hole pasted into the original: ``--score shapes``' ``colour_hole_ok`` and ``shape_hole_ok``)."""
    return _scores(_outputs(method_name, dataset, prompt_of, options))


def _scores(outputs):
    """:func:`_run`'s figures from ``(item, raw, blended)`` triples."""
    psnrs, raw_psnrs, colours, shapes = [], [], [], []
    for item, raw, blended in outputs:
        psnrs.append(_kept_psnr(blended, item.image, item.mask))
        raw_psnrs.append(_kept_psnr(raw, item.image, item.mask))
        scores = text_alignment(raw, item, "inside")
        colours.append(scores["colour_hole_ok"])
        shapes.append(scores["shape_hole_ok"])
    return float(np.mean(psnrs)), float(np.mean(raw_psnrs)), float(np.mean(colours)), float(np.mean(shapes))


def test_brushnet_inpaints_held_out_scenes(held_out):
    assert (DEMO_DIR / "brushnet" / "config.json").is_file()
    psnr, raw_psnr, colour_accuracy, shape_accuracy = _run("brushnet", held_out)
    assert psnr > MIN_BLENDED_KEPT_PSNR, psnr
    assert raw_psnr > MIN_RAW_KEPT_PSNR, (
        raw_psnr
    )  # the branch, not only the paste-back, keeps the surroundings
    assert colour_accuracy >= MIN_COLOUR_ACCURACY, colour_accuracy
    assert shape_accuracy >= MIN_SHAPE_ACCURACY, shape_accuracy


def test_a_switched_off_branch_fails_the_thresholds(held_out):
    """Negative control: the base alone (branch scale 0) must fall below the raw-PSNR, colour and shape
    thresholds, so the test above measures the trained branch and not the base or the blend."""
    _, raw_psnr, colour_accuracy, shape_accuracy = _run(
        "brushnet", held_out, options={"conditioning_scale": 0.0}
    )
    assert raw_psnr < MIN_RAW_KEPT_PSNR, raw_psnr
    assert colour_accuracy < MIN_COLOUR_ACCURACY, colour_accuracy
    assert shape_accuracy < MIN_SHAPE_ACCURACY, shape_accuracy


@pytest.fixture(scope="module")
def removal_set(tmp_path_factory):
    """The same first scenes and holes, with prompts asking for the object to go (the background's phrase)."""
    from brushnet.bench.datasets import load_dataset

    root = tmp_path_factory.mktemp("eval_removal")
    write_eval_set(root, SCENES, seed=0, removal=True)
    return load_dataset(root, "brushbench", "inside")


def _removed(method_name, dataset, options=None):
    """Share of the blended outputs whose hole holds no object colour (``--score removal``)."""
    return _removed_share(_outputs(method_name, dataset, options=options))


def _removed_share(outputs):
    """:func:`_removed` from ``(item, raw, blended)`` triples."""
    from brushnet.data.shapes_metrics import REMOVAL_MAX_OBJECT_FRACTION, object_fraction

    removed = [
        object_fraction(np.asarray(blended), item.mask) < REMOVAL_MAX_OBJECT_FRACTION
        for item, _, blended in outputs
    ]
    return float(np.mean(removed))


def test_powerpaint_object_removal_empties_holes(removal_set):
    """With the background's phrase as the prompt, at the demo's guidance 5 (what its removal row runs). (Recipe
    v2's BrushNet painted the object back in 9 of these 16 holes and this test asserted a margin over it; since
    recipe v3 it follows that prompt and empties all 16 at guidance 5, more than PowerPaint's removal task does
    there: docs/powerpaint.md.) The removal task's own guidance overshoots at high scales: 16/16 at guidance 3,
    14/16 at 5, 9/16 at 7.5; the mini-BrushBench measures guidance 3 on all 200 scenes (docs/powerpaint.md)."""
    removed = _removed("powerpaint", removal_set, {"task": "object-removal"})
    assert removed >= MIN_POWERPAINT_REMOVED, removed


def test_powerpaint_text_guided_paints_the_prompted_colour_and_its_removal_word_empties_holes(held_out):
    """Text-guided (the default task) paints the prompted colour and keeps the surroundings. Negative control
    on the same outputs: with the object's own phrase as the prompt, the object-removal word still empties holes
    that the text-guided word fills (the same model, prompt, holes and seed)."""
    text_guided = list(_outputs("powerpaint", held_out))
    psnr, raw_psnr, colour_accuracy, _ = _scores(text_guided)
    assert psnr > MIN_BLENDED_KEPT_PSNR and raw_psnr > MIN_POWERPAINT_RAW_KEPT_PSNR, (psnr, raw_psnr)
    assert colour_accuracy >= MIN_POWERPAINT_COLOUR_ACCURACY, colour_accuracy
    removed = _removed("powerpaint", held_out, {"task": "object-removal"})
    filled = _removed_share(text_guided)
    assert removed - filled >= MIN_TASK_WORD_MARGIN, (removed, filled)


def test_shipped_base_beats_the_data_mean_at_high_noise():
    """The v-prediction base's x0 estimate at t=990 is better than predicting the mean latent (measured 0.43
    against a variance of 1.02 on these 8 scenes with recipe v3's base, 0.45 with v2's); an ε base of the first
    recipe scored 2.03 (against 0.76) there and sampled noise."""
    from diagnose import x0_errors  # examples/demo_world (conftest.py)

    errors, variance = x0_errors(str(DEMO_DIR / "base"), scenes=8, timesteps=(990,))
    assert errors[990] < 0.6 * variance, (errors, variance)


def test_shipped_base_draws_the_captioned_colours():
    """Text-to-image from held-out one-object captions: the background has the captioned colour and the object's
    colour appears (measured on 24 captions: 23/24 and 21/24 with recipe v3's base, 6/6 and 6/6 on these 6; the
    first recipe's base drew the captioned background in 1/24)."""
    from diagnose import sample_check  # examples/demo_world (conftest.py)

    check = sample_check(str(DEMO_DIR / "base"), count=6)
    assert check["background"] >= 5 / 6 and check["object"] >= 4 / 6, check


def test_shipped_base_redraws_a_lightly_noised_object_in_its_shape():
    """``diagnose.py --redraw``: noised to strength 0.3 and redrawn from its caption, the object keeps its shape
    (measured on 24 scenes: 0.79 at strength 0.3, 0.67 at 0.5, 0.12 at 0.7, 0.04 from pure noise; 9/12 on
    these 12, 0/6 of the first 6 from pure noise). An image-to-image path that ignored the image would score what
    text-to-image scores."""
    from diagnose import redraw_check  # examples/demo_world (conftest.py)

    kept = redraw_check(str(DEMO_DIR / "base"), count=12, strengths=(0.3,))
    assert kept[0.3] >= 6 / 12, kept


def test_shape_word_check_counts_every_image_and_measures_the_word_against_the_seed():
    """``diagnose.py --shape-words``: every prompted shape is counted once per seed, and the pixel change a
    shape word makes is measured next to the change another seed (another colour and background) makes. The
    shipped base barely reads the shape word (12 seeds: 9.9 against 108.5 of 255, 3 of 60 images in the
    prompted shape; docs/demo.md, "Why the base draws blobs")."""
    from diagnose import shape_word_check  # examples/demo_world (conftest.py)

    check = shape_word_check(str(DEMO_DIR / "base"), count=2, steps=8)
    assert all(sum(row.values()) == 2 for row in check["confusion"].values()), check
    assert 0 <= check["diagonal"] <= 1
    assert 0 < check["word_change"] < check["seed_change"], check
