"""``brushnet demo`` end to end on the shipped weights (offline), and its input errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from brushnet.cli import app
from brushnet.data.shapes import dilate_mask, render_scene, sample_scene, scene_rng
from brushnet.demo.assets import DEMO_DIR
from brushnet.demo.run import (
    DEMO_REQUEST,
    DEMO_SCENES,
    demo_options,
    demo_scene,
    format_results_table,
    run_demo,
)

runner = CliRunner()


def test_demo_grid_for_shipped_scenes(tmp_path):
    result = runner.invoke(
        app, ["demo", "--output", str(tmp_path), "--methods", "brushnet,powerpaint", "--steps", "2"]
    )
    assert result.exit_code == 0, result.output
    grid = Image.open(tmp_path / "grid.png")
    # input, mask, then raw + blended per method; one row per shipped scene
    assert grid.width > 6 * 128 and grid.height > len(DEMO_SCENES) * 128
    assert (tmp_path / "brushnet.png").is_file() and (tmp_path / "powerpaint.png").is_file()
    assert "Mini-BrushBench" in result.output and "\nBrushNet    blended " in result.output
    # the demo's own lines, not one weight-loading progress bar per model folder from the libraries
    assert "Loading weights" not in result.output and "brushnet: 4 scene(s) in" in result.output
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


def test_the_last_shipped_scene_asks_to_remove_the_first_rows_object():
    first, last = demo_scene(DEMO_SCENES[0]), demo_scene(DEMO_SCENES[-1])
    assert last.removal and not first.removal and "remove" in last.label
    assert last.image.tobytes() == first.image.tobytes() and (last.hole == first.hole).all()
    assert last.prompt.endswith("background") and last.prompt != first.prompt
    assert demo_options("powerpaint", removal=True) == {"task": "object-removal"}
    assert demo_options("powerpaint") == {} and demo_options("repaint", removal=True)["jump_length"] == 5


def test_powerpaint_runs_its_removal_task_on_the_removal_row(tmp_path):
    from brushnet.demo.assets import method_models
    from brushnet.image import blend_pil
    from brushnet.methods import inpaint, load_method

    scene = demo_scene(DEMO_SCENES[-1])
    request = {"steps": 2}
    run_demo(tmp_path, methods=["powerpaint"], scenes=[scene], request=request)
    shown = np.asarray(Image.open(tmp_path / "powerpaint.png"))
    method = load_method("powerpaint", method_models("powerpaint"))
    fields = {**DEMO_REQUEST, **request, "prompt": scene.prompt, "blend": False, "resolution": 128}
    del fields["blend_kernel_size"]  # the grid's own paste-back below; an unblended request refuses it

    def blended(task):
        raw = inpaint(method, scene.image, scene.hole, fields, options={"task": task}).images[0]
        return np.asarray(
            blend_pil(scene.image, raw, scene.hole, kernel_size=DEMO_REQUEST["blend_kernel_size"])
        )

    np.testing.assert_array_equal(shown, blended("object-removal"))
    assert not np.array_equal(shown, blended("text-guided"))


def test_parallel_workers_give_the_same_grid_as_one_process(tmp_path):
    """``run_demo(workers=2)`` (what ``brushnet demo`` does on two cores): the methods run in two spawned
    processes of one torch thread each, and the grid is byte-identical to one process with one thread."""
    threads = torch.get_num_threads()
    methods = ["brushnet", "blended-latent-diffusion"]
    torch.set_num_threads(1)
    try:
        one = run_demo(tmp_path / "one", methods=methods, request={"steps": 2})
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(2)
    try:
        events = []
        two = run_demo(
            tmp_path / "two", methods=methods, request={"steps": 2}, workers=2, on_event=events.append
        )
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "one" / "grid.png").read_bytes() == (tmp_path / "two" / "grid.png").read_bytes()
    for name in methods:
        assert Path(one["images"][name]).read_bytes() == Path(two["images"][name]).read_bytes()
    assert sorted(event.split(":")[0] for event in events) == sorted(methods)
    assert list(two["seconds"]) == methods
