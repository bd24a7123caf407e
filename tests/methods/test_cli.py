"""`brushnet batch`, `compare` and `outpaint` on tiny models, through typer's test runner."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brushnet.cli import app

runner = CliRunner()
FAST_FLAGS = ["--steps", "2", "--guidance", "2.0", "--scheduler", "ddim", "--seed", "5", "--quiet"]


def _flags(models):
    return ["--base", models["base"], "--brushnet", models["brushnet"]]


@pytest.fixture
def folder(tmp_path, scene):
    image, mask = scene
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    image.save(images / "a.png")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(images / "b.png")
    for stem in ("a", "b"):
        mask.save(masks / f"{stem}.png")
    return images, masks


def test_batch_equals_single_and_resumes(tiny_models, folder, tmp_path):
    images, masks = folder
    out = tmp_path / "out"
    args = ["batch", "--images", str(images), "--masks", str(masks), "--output", str(out), "--prompt", "x"]
    result = runner.invoke(app, args + _flags(tiny_models) + FAST_FLAGS)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.png", "b.json", "b.png"]
    single = tmp_path / "single.png"
    args_single = [
        "inpaint",
        "-i",
        str(images / "b.png"),
        "-m",
        str(masks / "b.png"),
        "-o",
        str(single),
        "-p",
        "x",
    ]
    result = runner.invoke(app, args_single + _flags(tiny_models) + FAST_FLAGS)
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(single)), np.asarray(Image.open(out / "b.png")))
    assert json.loads((out / "b.json").read_text())["seed"] == 5
    # resume: finished outputs are skipped (not rewritten)
    stamp = (out / "a.png").stat().st_mtime_ns
    (out / "b.json").unlink()  # b is unfinished: its sidecar is missing
    result = runner.invoke(app, args + _flags(tiny_models) + FAST_FLAGS)
    assert result.exit_code == 0
    assert "1 done, 1 skipped" in result.output
    assert (out / "a.png").stat().st_mtime_ns == stamp and (out / "b.json").is_file()


def test_batch_reports_corrupt_and_missing_and_continues(tiny_models, folder, tmp_path, scene):
    images, masks = folder
    (images / "broken.png").write_bytes(b"not a png at all")
    scene[0].save(images / "nomask.png")
    (images / "prompts.jsonl").write_text("")  # not an image suffix: ignored
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"image": "a.png", "prompt": "a red cube"}) + "\n")
    out = tmp_path / "out"
    args = [
        "batch",
        "--images",
        str(images),
        "--masks",
        str(masks),
        "--output",
        str(out),
        "--prompts",
        str(prompts),
    ]
    result = runner.invoke(app, args + _flags(tiny_models) + FAST_FLAGS)
    assert result.exit_code == 1
    assert "2 done, 0 skipped (already done), 2 failed" in result.output
    assert "failed: broken.png: image file is not a readable image" in result.output
    assert "failed: nomask.png: no mask named nomask" in result.output
    assert json.loads((out / "a.json").read_text())["parameters"]["prompt"] == "a red cube"
    assert json.loads((out / "b.json").read_text())["parameters"]["prompt"] == ""


def test_batch_one_mask_for_all(tiny_models, folder, tmp_path):
    images, masks = folder
    out = tmp_path / "out"
    args = ["batch", "--images", str(images), "--masks", str(masks / "a.png"), "--output", str(out)]
    result = runner.invoke(app, args + _flags(tiny_models) + FAST_FLAGS)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "b.json").read_text())["inputs"]["mask"].endswith("a.png")


def test_compare_writes_labelled_grid(tiny_models, folder, tmp_path):
    images, masks = folder
    grid = tmp_path / "grid.png"
    args = [
        "compare", "-i", str(images / "a.png"), "-m", str(masks / "a.png"), "-o", str(grid),
        "--methods", "brushnet,blended-latent-diffusion,repaint,sd-inpainting,controlnet-inpaint",
        "--inpaint-model", tiny_models["inpaint_model"], "--controlnet", tiny_models["controlnet"],
        "--option", "repaint:jump_length=1", "--option", "repaint:jump_n_sample=1",
    ]  # fmt: skip
    result = runner.invoke(app, args + _flags(tiny_models) + FAST_FLAGS)
    assert result.exit_code == 0, result.output
    img = Image.open(grid)
    assert img.size == (64 * 7, 64 + 14)
    report = json.loads(grid.with_suffix(".json").read_text())
    assert {m["seed"] for m in report["methods"].values()} == {5}
    # the label strip holds dark text pixels above every tile
    strip = np.asarray(img.convert("L"))[:14]
    assert all(strip[:, 64 * k : 64 * (k + 1)].min() < 100 for k in range(7))


def test_compare_failing_method_gets_grey_tile(tiny_models, folder, tmp_path):
    """A method that fails when loaded (a UNet folder as its 9-channel model) gets a grey tile and exit 1; the
    others run. (A missing model flag is refused before anything loads: test_cli.py.)"""
    images, masks = folder
    grid = tmp_path / "grid.png"
    args = ["compare", "-i", str(images / "a.png"), "-m", str(masks / "a.png"), "-o", str(grid)]
    args += ["--methods", "blended-latent-diffusion,sd-inpainting", "--base", tiny_models["base"]]
    args += ["--inpaint-model", str(Path(tiny_models["base"]) / "unet")]  # the wrong kind: fails when loaded
    result = runner.invoke(app, args + FAST_FLAGS)
    assert result.exit_code == 1
    assert "failed: sd-inpainting: " in result.output and "holds a UNet2DConditionModel" in result.output
    tile = np.asarray(Image.open(grid))[14:, 64 * 3 :]
    assert (tile == 128).all()


def test_outpaint_command_extends_canvas(tiny_models, scene, tmp_path):
    src = tmp_path / "in.png"
    scene[0].crop((0, 0, 40, 48)).save(src)
    out = tmp_path / "out.png"
    args = ["outpaint", "-i", str(src), "-o", str(out), "--extend-left", "8", "--extend-right", "16"]
    result = runner.invoke(
        app, args + ["--method", "blended-latent-diffusion", "--base", tiny_models["base"]] + FAST_FLAGS
    )
    assert result.exit_code == 0, result.output
    img = np.asarray(Image.open(out))
    assert img.shape == (48, 64, 3)
    # blend on: the original pixels away from the new strips are untouched
    assert np.array_equal(img[:, 8 + 10 : 8 + 40 - 10], np.asarray(Image.open(src))[:, 10:30])
    recorded = json.loads(out.with_suffix(".json").read_text())["parameters"]["outpaint"]
    assert recorded == {"left": 8, "top": 0, "right": 16, "bottom": 0, "overlap": 0, "fill": "edge"}
    result = runner.invoke(
        app, ["outpaint", "-i", str(src), "-o", str(out)] + _flags(tiny_models) + FAST_FLAGS
    )
    assert result.exit_code == 2 and "--extend-left" in result.output


def test_inpaint_method_flag_and_invert_mask_recorded(tiny_models, folder, tmp_path):
    images, masks = folder
    out = tmp_path / "out.png"
    args = ["inpaint", "-i", str(images / "a.png"), "-m", str(masks / "a.png"), "-o", str(out)]
    args += [
        "--method",
        "repaint",
        "--option",
        "jump_length=1",
        "--option",
        "jump_n_sample=2",
        "--invert-mask",
    ]
    result = runner.invoke(
        app, args + ["--base", tiny_models["base"]] + FAST_FLAGS
    )  # repaint reads no branch
    assert result.exit_code == 0, result.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["method"] == "repaint" and meta["parameters"]["invert_mask"] is True
    assert meta["parameters"]["options"]["jump_n_sample"] == 2
    assert meta["unet_calls"] == 2 * 4  # 2 steps, one resampling jump of 1 level twice: 4 down moves, CFG
