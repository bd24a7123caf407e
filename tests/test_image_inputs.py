"""Image inputs that crashed or came out wrong (issue 19 "Images", issue 20 item 9): a decompression bomb is
refused from its header against the project's own pixel limit; 16-bit greyscale is scaled by its range; EXIF
orientation is applied to images and masks alike, so a mask drawn on the displayed photo fits it."""

import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brushnet.cli import app
from brushnet.errors import InputError
from brushnet.image import DEFAULT_MAX_PIXELS, load_image, load_mask

runner = CliRunner()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A valid 20000 x 20000 1-bit PNG of 48 kB: 400 M pixels (1.2 GB as RGB) once decoded."""
    side = 20000
    row = b"\x00" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
    )
    return path


def test_a_decompression_bomb_is_refused_from_its_header(bomb):
    start = time.perf_counter()
    for load in (load_image, load_mask):
        with pytest.raises(InputError, match=f"has 400000000 pixels; the limit is {DEFAULT_MAX_PIXELS}"):
            load(bomb)
    assert time.perf_counter() - start < 1.0  # decoding it would take seconds and 1.2 GB


def test_the_pixel_limit_is_the_projects_own(tmp_path, monkeypatch):
    Image.new("RGB", (64, 48)).save(tmp_path / "img.png")
    with pytest.raises(InputError, match="is 64x48 = 3072 pixels; the limit is 3000 \\(--max-pixels\\)"):
        load_image(tmp_path / "img.png", max_pixels=3000)
    # a limit above PIL's own decompression-bomb limit is honoured, and PIL's setting is left as it was
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(tmp_path / "img.png", max_pixels=4000).size == (64, 48)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_cli_refuses_a_bomb_in_one_line(bomb, tmp_path):
    mask = tmp_path / "mask.png"
    Image.new("L", (8, 8), 255).save(mask)
    args = ["inpaint", "--base", str(tmp_path / "b"), "--brushnet", str(tmp_path / "n"), "-i", str(bomb)]
    result = runner.invoke(app, [*args, "-m", str(mask), "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "has 400000000 pixels; the limit is" in result.output and not (tmp_path / "o.png").exists()
    result = runner.invoke(
        app, [*args[:-1], str(mask), "-m", str(mask), "-o", str(tmp_path / "o.png")] + ["--max-pixels", "10"]
    )
    assert result.exit_code == 2 and "is 8x8 = 64 pixels; the limit is 10" in result.output


def test_sixteen_bit_greyscale_is_scaled_by_its_range(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "photo16.png")
    assert Image.open(tmp_path / "photo16.png").mode.startswith("I;16")
    photo = np.asarray(load_image(tmp_path / "photo16.png"))[..., 0].astype(int)
    assert np.abs(photo - np.round(ramp / 65535 * 255)).max() == 0  # not clipped to white
    assert (photo == 255).mean() < 0.01
    hole = np.zeros((64, 64), np.uint16)
    hole[16:48, 8:40] = 65535
    hole[0:4, 0:4] = 20000  # below half of the 16-bit range: kept
    Image.fromarray(hole).save(tmp_path / "mask16.png")
    assert np.array_equal(load_mask(tmp_path / "mask16.png"), hole >= 32768)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_exif_orientation_applies_to_images_and_masks(tmp_path):
    stored = np.zeros(
        (40, 60, 3), np.uint8
    )  # stored landscape 60x40; orientation 6 displays it portrait 40x60
    stored[:, :30] = (200, 30, 30)
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=_exif(6))
    upright = load_image(tmp_path / "photo.png")
    assert upright.size == (40, 60)
    assert np.array_equal(np.asarray(upright), np.rot90(stored, k=-1))  # rotated 90 degrees clockwise
    mask = np.zeros((40, 60), np.uint8)
    mask[5:15, 10:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png", exif=_exif(6))
    assert np.array_equal(load_mask(tmp_path / "mask.png"), np.rot90(mask, k=-1) > 127)


def test_an_array_mask_beside_an_exif_oriented_image_is_named_or_warned(tmp_path, logged):
    """An array mask made from the stored pixels of an EXIF-rotated photo lay turned against the upright image:
    on a non-square photo a bare "mask is 40x60 but the image is 60x40"; on a square one nothing at all."""
    from brushnet.methods import get_method_class, prepare

    brushnet = get_method_class("brushnet")
    for size, orientation in (((60, 40), 6), ((48, 48), 6)):
        path = tmp_path / f"photo_{size[0]}.png"
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(path, exif=_exif(orientation))
        stored_mask = np.zeros((size[1], size[0]), np.uint8)
        stored_mask[:10, :10] = 255
        with logged("brushnet.methods.api") as messages:
            if size[0] != size[1]:
                with pytest.raises(InputError, match="turned: if the image has an EXIF orientation"):
                    prepare(brushnet, path, stored_mask, {"prompt": ""})
            else:
                prepare(brushnet, Image.open(path), stored_mask, {"prompt": ""})
                prepare(brushnet, path, stored_mask, {"prompt": ""})
                assert len(messages) == 2 and "EXIF orientation 6" in messages[0], messages
    with logged("brushnet.methods.api") as messages:  # no orientation, or a PIL mask: nothing to say
        plain = tmp_path / "plain.png"
        Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(plain)
        prepare(brushnet, plain, stored_mask, {"prompt": ""})
        prepare(brushnet, tmp_path / "photo_48.png", Image.fromarray(stored_mask), {"prompt": ""})
    assert messages == []


def test_a_mask_drawn_on_the_displayed_photo_is_accepted_and_aligned(tiny_models, tmp_path):
    """A phone JPEG stored sideways with EXIF orientation 6, and a mask drawn on it as a viewer shows it."""
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(stored).save(tmp_path / "photo.jpg", quality=95, exif=_exif(6))
    displayed = np.asarray(load_image(tmp_path / "photo.jpg"))
    assert displayed.shape == (48, 32, 3)
    mask = np.zeros((48, 32), np.uint8)
    mask[4:14, 4:14] = 255  # top-left of the displayed photo
    Image.fromarray(mask).save(tmp_path / "mask.png")
    args = ["inpaint", "--base", str(tiny_models["base"]), "--brushnet", str(tiny_models["brushnet"])]
    args += [
        "-i",
        str(tmp_path / "photo.jpg"),
        "-m",
        str(tmp_path / "mask.png"),
        "-o",
        str(tmp_path / "o.png"),
    ]
    result = runner.invoke(app, [*args, "--steps", "1", "--seed", "1", "-q"])
    assert result.exit_code == 0, result.output
    out = np.asarray(Image.open(tmp_path / "o.png"))
    assert out.shape == displayed.shape
    far = np.ones((48, 32), bool)
    far[0:25, 0:25] = False  # the hole and its feathered band
    assert np.array_equal(out[far], displayed[far])  # kept pixels are the displayed photo's, upright
    assert not np.array_equal(out[4:14, 4:14], displayed[4:14, 4:14])  # the hole is where it was drawn


def _photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)


def test_an_image_may_be_a_numpy_array_or_a_torch_tensor():
    """Like the mask (it said "TypeError: expected str, bytes or os.PathLike object, not ndarray")."""
    import torch

    photo = _photo()
    as_float = photo.astype(np.float32) / 255.0
    tensor = torch.from_numpy(as_float.copy()).permute(2, 0, 1)
    rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    for image in (photo, as_float, as_float.astype(np.float64), rgba, tensor, tensor[None], tensor.half()):
        loaded = load_image(image)
        assert loaded.mode == "RGB" and loaded.size == (10, 12)
        assert np.array_equal(np.asarray(loaded), photo), type(image)
    grey = photo[..., 0]
    assert np.array_equal(np.asarray(load_image(grey)), np.repeat(grey[..., None], 3, -1))
    see_through = rgba.copy()
    see_through[:2, :2, 3] = 0  # transparent pixels: on black, as for a file
    assert (np.asarray(load_image(see_through))[:2, :2] == 0).all()


@pytest.mark.parametrize(
    "image, message",
    [
        (
            np.zeros((2, 12, 10, 3), np.uint8),
            r"image array must be \(H, W, 3\), \(H, W, 4\) or \(H, W\), got shape",
        ),
        (
            np.zeros((12, 10, 3), np.int64),
            "image array must be uint8 \\(0-255\\), bool or float in \\[0, 1\\], got int64",
        ),
        (np.full((12, 10, 3), 2.0), r"a float image array must hold values in \[0, 1\], got 2..2"),
        ("tensor-batch", r"image tensor holds a batch of 2 images \(2, 3, 12, 10\); pass one"),
        ("tensor-minus-one", r"a float image tensor must hold values in \[0, 1\], got -1..1"),
        ([[0, 1]], "image must be a path, a PIL image, a numpy array or a torch tensor, got list"),
    ],
)
def test_other_in_memory_images_are_one_line_errors(image, message):
    import torch

    if isinstance(image, str) and image == "tensor-batch":
        image = torch.zeros(2, 3, 12, 10)
    elif isinstance(image, str) and image == "tensor-minus-one":
        image = torch.linspace(-1, 1, 3 * 12 * 10).reshape(3, 12, 10)
    with pytest.raises(InputError, match=message):
        load_image(image)


def test_the_api_runs_on_an_array_image(tiny_models):
    """``inpaint(method, array, mask)`` gives the same result as the same pixels as a PIL image."""
    import torch

    from brushnet.methods import inpaint, load_method

    method = load_method("brushnet", {"base": tiny_models["base"], "brushnet": tiny_models["brushnet"]})
    photo = np.asarray(Image.new("RGB", (32, 32), (90, 120, 30))).copy()
    photo[:8] = (200, 10, 10)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    kwargs = dict(prompt="x", steps=1, seed=3)
    want = np.asarray(inpaint(method, Image.fromarray(photo), mask, **kwargs).images[0])
    for image in (photo, torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255.0):
        assert np.array_equal(np.asarray(inpaint(method, image, mask, **kwargs).images[0]), want)
