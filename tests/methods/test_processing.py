"""Shared pre/post-processing (mask grow/shrink, crop-to-mask, working size, paste-back, blending, outpainting)
through :func:`brushnet.methods.inpaint`, with a probe method that records what it was given and paints the
hole one flat colour — so where the pixels went is checkable exactly. The probe is not a model: these tests are
about the processing every method shares, which runs the same whatever ``generate`` does."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet.errors import InputError
from brushnet.image import tensor_to_pil
from brushnet.methods import GenerateOutput, InpaintMethod, inpaint, outpaint
from brushnet.methods.processing import (
    crop_box,
    grow_mask,
    outpaint_canvas,
    plan_region,
    processing_size,
)

GREEN = (0, 255, 0)


class Probe(InpaintMethod):
    """Records the region and hole it receives; paints the hole pure green and leaves the rest as received (or,
    with ``invert_outside``, inverted: a model that also changes kept pixels, as VAE round trips do)."""

    name = "probe"
    native_resolution = 64

    def __init__(self, invert_outside: bool = False):
        super().__init__()
        self.invert_outside = invert_outside
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    @classmethod
    def load(cls, models, device="cpu", dtype="fp32"):
        return cls()

    def generate(self, task):
        image, hole = task.image, task.hole
        self.seen.append((image.clone(), hole.clone()))
        green = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
        out = torch.where(hole > 0.5, green, 1 - image if self.invert_outside else image)
        return GenerateOutput(images=out.expand(task.num_images, -1, -1, -1).clone(), unet_calls=0)


def _image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _mask(width, height, box):
    arr = np.zeros((height, width), np.uint8)
    left, top, right, bottom = box
    arr[top:bottom, left:right] = 255
    return Image.fromarray(arr)


# ---- pure functions ----------------------------------------------------------------------------------------


def test_grow_and_shrink_mask():
    hole = np.zeros((20, 20), bool)
    hole[10, 10] = True
    grown = grow_mask(hole, 2)
    assert grown.sum() == 25 and grown[8:13, 8:13].all()
    assert np.array_equal(grow_mask(grown, -2), hole)  # a 5×5 square shrinks back to its centre
    assert not grow_mask(grown, -3).any()
    assert grow_mask(hole, 0) is hole
    # shrinking does not eat a hole from the image border (outpainting strips stay whole)
    strip = np.zeros((20, 20), bool)
    strip[:, :4] = True
    assert np.array_equal(grow_mask(strip, -1)[:, 0], np.ones(20, bool))
    assert grow_mask(strip, -1)[:, :3].all() and not grow_mask(strip, -1)[:, 3].any()


def test_crop_box_pads_and_clips():
    hole = np.zeros((200, 300), bool)
    hole[100:120, 150:170] = True
    assert crop_box(hole, 32) == (118, 68, 202, 152)
    hole[:5, :5] = True  # a second blob in the corner: clipped at 0
    assert crop_box(hole, 32) == (0, 0, 202, 152)
    with pytest.raises(InputError, match="mask is empty"):
        crop_box(np.zeros((8, 8), bool), 32)


def test_processing_size_multiples_and_area():
    assert processing_size(61, 45, None) == (64, 48)  # same size, rounded to multiples of 8
    assert processing_size(3, 3, None) == (8, 8)  # never zero
    w, h = processing_size(84, 84, 512)  # a crop box scaled to the native resolution
    assert (w, h) == (512, 512)
    w, h = processing_size(200, 100, 512)  # aspect kept, area ≈ 512²
    assert w % 8 == 0 and h % 8 == 0 and abs(w / h - 2) < 0.03 and abs(w * h / 512**2 - 1) < 0.02


def test_plan_region_crop_uses_native_resolution_and_default_padding():
    hole = np.zeros((300, 400), bool)
    hole[100:140, 200:260] = True
    plan = plan_region(hole, crop_to_mask=True, padding=32, resolution=None, native_resolution=512)
    assert plan.box == (168, 68, 292, 172) and not plan.whole_image
    assert plan.resized and abs(plan.size[0] * plan.size[1] / 512**2 - 1) < 0.03
    whole = plan_region(hole, crop_to_mask=False, padding=32, resolution=None, native_resolution=512)
    assert whole.box == (0, 0, 400, 300) and whole.size == (400, 304) and whole.resized
    assert whole.as_dict() == {
        "box": [0, 0, 400, 300],
        "size": [400, 304],
        "whole_image": True,
        "resized": True,
    }


def test_outpaint_canvas():
    image = _image(10, 6)
    canvas, hole = outpaint_canvas(image, left=4, right=2, top=0, bottom=3)
    assert canvas.size == (16, 9) and hole.shape == (9, 16)
    arr, src = np.asarray(canvas), np.asarray(image)
    assert np.array_equal(arr[0:6, 4:14], src)  # the original, in place
    assert np.array_equal(arr[0:6, 0], src[:, 0]) and np.array_equal(arr[8, 4:14], src[5])  # edge fill
    assert not hole[0:6, 4:14].any() and hole[:, :4].all() and hole[:, 14:].all() and hole[6:].all()
    _, with_overlap = outpaint_canvas(image, left=4, overlap=2)
    assert with_overlap[:, :6].all() and not with_overlap[:, 6:].any()  # 2 original columns repainted
    black, _ = outpaint_canvas(image, top=2, fill="black")
    assert not np.asarray(black)[:2].any()
    for bad in (dict(), dict(left=-1), dict(left=2, fill="mirror")):
        with pytest.raises(InputError):
            outpaint_canvas(image, **bad)
    # an overlap that reaches across the original would repaint all of it
    with pytest.raises(
        InputError, match="overlap 10 reaches across the original's width of 10 px from the extended"
    ):
        outpaint_canvas(image, left=4, overlap=10)
    with pytest.raises(InputError, match="overlap 5 reaches across .* from both extended sides.*below 5$"):
        outpaint_canvas(image, left=4, right=4, overlap=5)
    with pytest.raises(InputError, match="overlap 6 reaches across the original's height of 6 px"):
        outpaint_canvas(image, bottom=2, overlap=6)
    _, kept_one = outpaint_canvas(image, left=4, right=4, overlap=4)  # 10 - 2·4 = 2 columns kept
    assert (~kept_one).sum() == 2 * 6


# ---- through inpaint(): every method gets exactly this --------------------------------------------------------


def test_any_size_in_same_size_out_without_cropping():
    image = _image(61, 45)
    arr = np.asarray(image).copy()
    arr[:4, :4] = (255, 0, 0)  # corner marks that must reach the model (no silent cropping)
    arr[-4:, -4:] = (0, 0, 255)
    image = Image.fromarray(arr)
    method = Probe()
    result = inpaint(method, image, _mask(61, 45, (20, 15, 40, 30)), seed=1, blend=False)
    assert result.images[0].size == (61, 45)
    region, hole = method.seen[0]
    assert tuple(region.shape[-2:]) == (48, 64)  # multiples of 8 inside
    assert result.parameters["region"] == {
        "box": [0, 0, 61, 45],
        "size": [64, 48],
        "whole_image": True,
        "resized": True,
    }
    assert result.parameters["image_size"] == [61, 45]
    assert region[0, 0, 0, 0] > 0.9 and region[0, 2, -1, -1] > 0.9  # both corners survived
    # the resized hole never under-covers: every hole pixel maps into the model's hole
    scaled = np.asarray(Image.fromarray(hole[0, 0].numpy() > 0.5).resize((61, 45), Image.Resampling.NEAREST))
    assert scaled[15:30, 20:40].all()


def test_crop_to_mask_pastes_back_into_the_box_only():
    image, mask = _image(200, 160), _mask(200, 160, (90, 70, 110, 90))
    method = Probe()
    result = inpaint(method, image, mask, seed=1, blend=False, crop_to_mask=True)
    box = (58, 38, 142, 122)  # the hole grown by the default 32 px padding
    assert result.parameters["crop_to_mask"] and result.parameters["crop_padding"] == 32
    assert result.parameters["region"]["box"] == list(box) and not result.parameters["region"]["whole_image"]
    region, _ = method.seen[0]
    assert tuple(region.shape[-2:]) == (64, 64)  # the probe's native resolution
    out, src = np.asarray(result.images[0]), np.asarray(image)
    outside = np.ones((160, 200), bool)
    outside[box[1] : box[3], box[0] : box[2]] = False
    assert np.array_equal(out[outside], src[outside])  # untouched outside the box
    assert (out[75:85, 95:105] == GREEN).all()  # the hole's inside is the model's output

    padded = inpaint(Probe(), image, mask, seed=1, blend=False, crop_to_mask=True, crop_padding=8)
    assert padded.parameters["region"]["box"] == [82, 62, 118, 98]


def test_crop_to_mask_at_native_size_is_exact_when_no_resize():
    image, mask = _image(200, 160), _mask(200, 160, (100, 60, 124, 84))
    method = Probe()  # box 24+2·20 = 64 px: the native size, no resampling
    result = inpaint(method, image, mask, seed=1, blend=False, crop_to_mask=True, crop_padding=20)
    assert result.parameters["region"] == {
        "box": [80, 40, 144, 104],
        "size": [64, 64],
        "whole_image": False,
        "resized": False,
    }
    region, hole = method.seen[0]
    assert np.array_equal(np.asarray(tensor_to_pil(region)[0]), np.asarray(image)[40:104, 80:144])
    assert hole[0, 0].sum() == 24 * 24


@pytest.mark.parametrize("grow", [3, -3])
def test_mask_grow_shrink_reaches_the_model_and_is_recorded(grow):
    image, mask = _image(64, 64), _mask(64, 64, (20, 20, 40, 40))
    method = Probe()
    result = inpaint(method, image, mask, seed=1, blend=False, mask_grow=grow)
    side = 20 + 2 * grow
    _, hole = method.seen[0]
    assert hole.sum() == side * side
    assert result.parameters["mask_grow"] == grow
    out = np.asarray(result.images[0])
    assert (out[20 - grow : 40 + grow, 20 - grow : 40 + grow] == GREEN).all()


def test_invert_mask_is_applied_once_and_recorded():
    image, mask = _image(64, 64), _mask(64, 64, (16, 16, 48, 48))
    method = Probe()
    result = inpaint(method, image, mask, seed=1, invert_mask=True)
    _, hole = method.seen[0]
    assert hole[0, 0, 32, 32] == 0 and hole[0, 0, 2, 2] == 1
    assert result.parameters["invert_mask"] is True


def test_blend_on_off_and_kernel():
    image, mask = _image(64, 64), _mask(64, 64, (24, 24, 40, 40))
    src = np.asarray(image)
    probe = Probe(invert_outside=True)
    raw = np.asarray(inpaint(probe, image, mask, seed=1, blend=False).images[0])
    assert np.array_equal(raw[:24], 255 - src[:24])  # no blending: the model's output everywhere
    sharp = np.asarray(inpaint(probe, image, mask, seed=1, blend=True, blend_kernel_size=1).images[0])
    assert np.array_equal(sharp[:24], src[:24]) and (sharp[24:40, 24:40] == GREEN).all()
    feathered = inpaint(probe, image, mask, seed=1, blend=True, blend_kernel_size=21)
    out = np.asarray(feathered.images[0])
    assert (out[24:40, 24:40] == GREEN).all()  # the hole itself: the model's pixels
    assert np.array_equal(out[:13], src[:13])  # 11+ px away from the hole: exact
    band = out[20:24, 24:40].astype(int)
    assert (band != src[20:24, 24:40]).any() and (band != 255 - src[20:24, 24:40]).any()  # the band mixes
    assert feathered.parameters["blend"] and feathered.parameters["blend_kernel_size"] == 21


def test_outpaint_helper_records_extents():
    image = _image(40, 48)
    method = Probe()
    result = outpaint(method, image, left=8, right=16, seed=3, blend=False)
    assert result.images[0].size == (64, 48)
    assert result.parameters["outpaint"] == {
        "left": 8,
        "top": 0,
        "right": 16,
        "bottom": 0,
        "overlap": 0,
        "fill": "edge",
    }
    out = np.asarray(result.images[0])
    assert (out[:, :8] == GREEN).all() and (out[:, 48:] == GREEN).all()
    assert np.array_equal(out[:, 8:48], np.asarray(image))
    with pytest.raises(InputError, match="invert_mask"):
        outpaint(method, image, left=8, invert_mask=True)
    for extents, message in [
        ({"left": 8.5}, "left must be a whole number of pixels, got 8.5"),
        ({"right": "8"}, "right must be a whole number of pixels, got '8'"),
        ({"top": True}, "top must be a whole number of pixels, got True"),
        ({"left": 8, "overlap": 2.0}, "overlap must be a whole number of pixels, got 2.0"),
    ]:
        with pytest.raises(InputError, match="^" + re.escape(message) + "$"):
            outpaint(method, image, **extents)
    assert outpaint(method, image, left=np.int64(8), seed=3).parameters["outpaint"]["left"] == 8


def test_bad_inputs_are_one_line_errors():
    image = _image(64, 64)
    with pytest.raises(InputError, match="mask is 32x32 but the image is 64x64"):
        inpaint(Probe(), image, _mask(32, 32, (0, 0, 8, 8)))
    with pytest.raises(InputError, match="mask is empty"):
        inpaint(Probe(), image, _mask(64, 64, (10, 10, 14, 14)), mask_grow=-2)  # shrunk to nothing
    with pytest.raises(InputError, match="blend_kernel_size"):
        inpaint(Probe(), image, _mask(64, 64, (10, 10, 20, 20)), blend_kernel_size=4)
    with pytest.raises(InputError, match="bad request: steps"):
        inpaint(Probe(), image, _mask(64, 64, (10, 10, 20, 20)), steps=0)
    with pytest.raises(InputError, match="bad request: unknown field 'colour'"):
        inpaint(Probe(), image, _mask(64, 64, (10, 10, 20, 20)), colour="red")


def test_a_mask_emptied_by_a_shrink_says_so_with_the_grow_value():
    image = _image(64, 64)
    with pytest.raises(InputError) as error:
        inpaint(Probe(), image, _mask(64, 64, (10, 10, 16, 14)), mask_grow=-2)
    assert str(error.value) == (
        "mask is empty after mask_grow -2 (--mask-grow): shrinking by 2 px erased the whole hole "
        "(24 pixels in a 6x4 box); shrink less"
    )
    empty = _mask(64, 64, (0, 0, 0, 0))  # empty before the grow: the grow is not blamed
    with pytest.raises(InputError, match="^mask is empty: no white pixel"):
        inpaint(Probe(), image, empty, mask_grow=-2)


def test_the_outpainted_canvas_is_held_to_the_pixel_limit(monkeypatch):
    """The canvas, not only the input file, is checked against ``max_pixels`` (review finding 5), before it is
    built: a mistyped extent is one line, not minutes and gigabytes."""
    import brushnet.methods.api as api

    image = _image(32, 32)
    with pytest.raises(InputError) as error:
        outpaint(Probe(), image, right=40, max_pixels=2000)
    assert str(error.value) == (
        "outpainted canvas 72x32 = 2304 pixels exceeds the limit of 2000 (--max-pixels); extend less"
    )
    within = outpaint(Probe(), image, right=30, max_pixels=2000, seed=1)  # 62x32 = 1984 pixels
    assert within.images[0].size == (62, 32)
    monkeypatch.setattr(api, "DEFAULT_MAX_PIXELS", 2000)  # the default limit, as for the input file
    with pytest.raises(InputError, match="^outpainted canvas 32x72 = 2304 pixels exceeds the limit of 2000"):
        outpaint(Probe(), image, top=20, bottom=20)


def _transparent_image(width=64, height=64):
    """RGBA: a fully transparent corner whose stored colours are not black, a half-transparent strip, the rest
    opaque."""
    rgba = np.asarray(_image(width, height).convert("RGBA")).copy()
    rgba[:12, :12] = (10, 200, 30, 0)
    rgba[50:, :, 3] = 128
    return rgba


@pytest.mark.parametrize("from_file", [False, True])
def test_a_transparent_input_keeps_its_alpha_and_stored_colours(tmp_path, from_file):
    """Review finding 4: the model sees the image flattened onto black, the result keeps the input's alpha and
    stored colours wherever it keeps the input (here a probe that changes every kept pixel it is given)."""
    rgba = _transparent_image()
    image = Image.fromarray(rgba, "RGBA")
    if from_file:
        image.save(tmp_path / "t.png")
        image = tmp_path / "t.png"
    mask = _mask(64, 64, (24, 24, 40, 40))
    probe = Probe(invert_outside=True)
    out = np.asarray(inpaint(probe, image, mask, seed=1, blend_kernel_size=21).images[0])
    assert out.shape == (64, 64, 4)
    far = np.ones((64, 64), bool)
    far[14:50, 14:50] = False  # 10 px around the hole: the feathered band of kernel 21
    assert np.array_equal(
        out[far], rgba[far]
    )  # colours and alpha, the transparent corner's stored colours too
    assert (out[24:40, 24:40] == (*GREEN, 255)).all()  # generated pixels are opaque
    seen = np.asarray(tensor_to_pil(probe.seen[0][0])[0])
    assert (seen[:12, :12] == 0).all()  # the model saw the transparent corner as black
    flat = (rgba[50:, :, :3].astype(int) * 128 + 127) // 255
    assert np.abs(seen[50:].astype(int) - flat).max() <= 1  # and the strip composited on black

    raw = np.asarray(inpaint(Probe(), image, mask, seed=1, blend=False).images[0])  # no blend: sharp alpha
    assert (raw[24:40, 24:40, 3] == 255).all()
    hole = np.asarray(mask) > 0
    assert np.array_equal(raw[~hole][:, 3], rgba[~hole][:, 3])


@pytest.mark.parametrize("from_file", [False, True])
def test_an_outpainted_transparent_input_keeps_its_alpha_where_it_is_kept(tmp_path, from_file):
    """Outpainting a transparent input: the model sees it flattened onto black inside the extended canvas, the
    result keeps the input's alpha and stored colours where it keeps the input, and the new area is opaque."""
    rgba = _transparent_image()
    rgba[52:, 52:] = (10, 200, 30, 0)  # a transparent corner away from the new area and its feathered band
    image = Image.fromarray(rgba, "RGBA")
    if from_file:
        image.save(tmp_path / "t.png")
        image = tmp_path / "t.png"
    probe = Probe(invert_outside=True)
    out = np.asarray(outpaint(probe, image, left=16, top=8, seed=1, blend_kernel_size=21).images[0])
    assert out.shape == (72, 80, 4)
    # 10 px from the new area (the feathered band of kernel 21): the input as stored, colours and alpha
    assert np.array_equal(out[18:, 26:], rgba[10:, 10:])
    assert (out[:8, :, 3] == 255).all() and (out[:, :16, 3] == 255).all()  # generated: opaque
    assert (out[:8, :, :3] == GREEN).all()
    seen = np.asarray(tensor_to_pil(probe.seen[0][0])[0])
    assert (seen[8 + 52 :, 16 + 52 :] == 0).all()  # the model saw the transparent corner as black
    raw = np.asarray(outpaint(Probe(), image, left=16, top=8, seed=1, blend=False).images[0])
    assert np.array_equal(raw[8:, 16:, 3], rgba[..., 3])  # without blending too: the input's alpha
    opaque = Image.fromarray(rgba[..., :3])  # an input without alpha gives an RGB result
    assert outpaint(Probe(), opaque, left=16, seed=1).images[0].mode == "RGB"


def test_an_opaque_rgba_input_gives_an_rgb_result():
    image = Image.fromarray(np.asarray(_image(32, 32).convert("RGBA")), "RGBA")
    result = inpaint(Probe(), image, _mask(32, 32, (8, 8, 16, 16)), seed=1)
    assert result.images[0].mode == "RGB"


def test_seed_recorded_and_drawn_when_missing():
    image, mask = _image(32, 32), _mask(32, 32, (8, 8, 16, 16))
    result = inpaint(Probe(), image, mask, num_images=3)
    assert isinstance(result.seed, int) and result.parameters["seeds"] == [result.seed + i for i in range(3)]
    assert len(result.images) == 3 and set(result.timings) == {
        "prepare_s",
        "generate_s",
        "paste_back_s",
        "total_s",
    }


def test_the_crop_box_holds_the_feathered_edge():
    """With crop_padding below blend_kernel_size // 2 the feather was cut at the crop box's edge: pixels of the
    band outside the box were the untouched input, a hard seam. The box now reaches the band's end."""
    image, mask = _image(64, 64), _mask(64, 64, (22, 22, 42, 42))
    common = {"crop_to_mask": True, "blend_kernel_size": 21, "seed": 0}
    narrow = inpaint(Probe(invert_outside=True), image, mask, {**common, "crop_padding": 4})
    wide = inpaint(Probe(invert_outside=True), image, mask, {**common, "crop_padding": 10})
    assert narrow.parameters["region"]["box"] == wide.parameters["region"]["box"] == [12, 12, 52, 52]
    assert np.array_equal(np.asarray(narrow.images[0]), np.asarray(wide.images[0]))
    # without blending nothing is feathered: the padding asked for is the box
    raw = inpaint(
        Probe(), image, mask, {**common, "crop_padding": 4, "blend": False, "blend_kernel_size": 21}
    )
    assert raw.parameters["region"]["box"] == [18, 18, 46, 46]


def test_a_colour_keyed_or_pa_image_is_transparent_too(tmp_path):
    """A PNG with a tRNS colour key (RGB or L) and a PA image were read with their keyed/transparent pixels as
    stored colours (green, white), and the result lost the transparency, where PIL shows them transparent."""
    rgb = np.asarray(_image(64, 64)).copy()
    rgb[:8, :8] = (0, 255, 0)
    keyed = Image.fromarray(rgb)
    keyed.info["transparency"] = (0, 255, 0)
    keyed.save(tmp_path / "keyed.png", transparency=(0, 255, 0))
    pa = Image.fromarray(rgb).convert("RGBA")
    pa.putalpha(Image.fromarray(np.where(np.arange(64)[:, None] < 8, 0, 255).astype(np.uint8).repeat(64, 1)))
    pa = pa.convert("PA")
    mask = _mask(64, 64, (24, 24, 40, 40))
    for image in (tmp_path / "keyed.png", Image.open(tmp_path / "keyed.png"), pa):
        probe = Probe()
        out = np.asarray(inpaint(probe, image, mask, seed=1).images[0])
        assert out.shape == (64, 64, 4), type(image)
        seen = np.asarray(tensor_to_pil(probe.seen[0][0])[0])
        assert (seen[:8, :8] == 0).all()  # the model saw the transparent pixels as black
        assert (out[:8, :8, 3] == 0).all()  # and the result keeps them transparent
