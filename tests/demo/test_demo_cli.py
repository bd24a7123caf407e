"""``brushnet demo`` end to end on the shipped weights (offline), and its input errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from brushnet.cli import app
from brushnet.data.shapes import dilate_mask, render_scene, sample_scene, scene_rng
from brushnet.demo.assets import DEMO_DIR
from brushnet.demo.run import DEMO_SCENES, demo_scene, format_results_table

runner = CliRunner()


def test_demo_grid_for_shipped_scenes(tmp_path):
    result = runner.invoke(
        app, ["demo", "--output", str(tmp_path), "--methods", "brushnet,sd-inpainting", "--steps", "2"]
    )
    assert result.exit_code == 0, result.output
    grid = Image.open(tmp_path / "grid.png")
    # input, mask, then raw + blended per method; one row per shipped scene
    assert grid.width > 6 * 128 and grid.height > len(DEMO_SCENES) * 128
    assert (tmp_path / "brushnet.png").is_file() and (tmp_path / "sd-inpainting.png").is_file()
    assert "Mini-BrushBench" in result.output and "\nBrushNet    blended " in result.output
    assert torch.is_grad_enabled()  # the demo must not switch autograd off for the rest of the process


def test_demo_on_a_users_scene_keeps_the_kept_pixels(tmp_path):
    scene = sample_scene(scene_rng("eval", 99, 0))
    image, masks = render_scene(scene)
    hole = dilate_mask(masks[0], 3)
    image.save(tmp_path / "in.png")
    Image.fromarray((hole * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    result = runner.invoke(
        app,
        [
            "demo",
            "--image",
            str(tmp_path / "in.png"),
            "--mask",
            str(tmp_path / "mask.png"),
            "--prompt",
            "a red circle",
            "--methods",
            "brushnet",
            "--steps",
            "2",
            "--output",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    out = np.asarray(Image.open(tmp_path / "out" / "brushnet.png"))
    far = ~dilate_mask(hole, 3)  # the 5 px blend feathers 2 px outside the hole
    np.testing.assert_array_equal(out[far], np.asarray(image)[far])
    assert "Mini-BrushBench" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "x.png"], "go together"),
        (["--methods", "dalle"], "unknown method"),
        (["--models", "/nonexistent"], "no demo models"),
    ],
)
def test_demo_usage_errors(tmp_path, args, message):
    result = runner.invoke(app, ["demo", "--output", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_demo_rejects_a_scene_of_the_wrong_size(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    result = runner.invoke(
        app,
        [
            "demo",
            "--image",
            str(tmp_path / "in.png"),
            "--mask",
            str(tmp_path / "mask.png"),
            "--prompt",
            "a red circle",
            "--output",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 2 and "128x128" in result.output


def test_shipped_scenes_are_deterministic_and_one_asks_for_another_object():
    first = [demo_scene(spec) for spec in DEMO_SCENES]
    second = [demo_scene(spec) for spec in DEMO_SCENES]
    for a, b in zip(first, second):
        assert a.image.tobytes() == b.image.tobytes() and (a.hole == b.hole).all() and a.prompt == b.prompt
    assert any("masked: " + s.prompt + ")" not in s.label for s in first)


def test_results_table_reads_the_committed_file():
    table = format_results_table()
    assert table.startswith("Mini-BrushBench") and "brushnet.demo.minibench" in table
    assert (DEMO_DIR / "training_record.json").is_file()
