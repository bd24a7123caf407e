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


def _demo(tmp_path, *args):
    return runner.invoke(app, ["demo", "--steps", "2", "--no-table", "--threads", "1", *args])


def test_demo_keeps_files_it_did_not_write_and_its_own_inputs(tmp_path):
    """It replaced a user's grid.png or brushnet.png, and its own --image/--mask when they sat at an output path;
    an earlier run's image of a method left out stayed beside the new grid."""
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (8, 8), "red").save(out / "grid.png")
    result = _demo(tmp_path, "--methods", "brushnet", "-o", str(out))
    assert result.exit_code == 2 and "exists without a brushnet record" in result.output
    assert "demo output written before 2026-11-28" in result.output
    assert Image.open(out / "grid.png").size == (8, 8)
    assert _demo(tmp_path, "--methods", "brushnet", "-o", str(out), "--overwrite").exit_code == 0

    scene = demo_scene(DEMO_SCENES[0])
    own = tmp_path / "own"
    own.mkdir()
    scene.image.save(own / "brushnet.png")
    Image.fromarray((scene.hole * 255).astype(np.uint8)).save(own / "mask.png")
    before = (own / "brushnet.png").read_bytes()
    result = _demo(
        tmp_path, "-o", str(own), "-i", str(own / "brushnet.png"), "-m", str(own / "mask.png"),
        "-p", "a red circle", "--methods", "brushnet",
    )  # fmt: skip
    assert result.exit_code == 2 and "would overwrite the input" in result.output
    assert (own / "brushnet.png").read_bytes() == before

    both = tmp_path / "both"
    assert _demo(tmp_path, "-o", str(both), "--methods", "brushnet,blended-latent-diffusion").exit_code == 0
    from brushnet.io import read_png_metadata

    record = read_png_metadata(both / "brushnet.png")
    assert record["command"] == "brushnet demo" and record["method"] == "brushnet"
    Image.new("RGB", (8, 8)).save(both / "repaint.png")  # the user's, not the demo's
    assert _demo(tmp_path, "-o", str(both), "--methods", "brushnet").exit_code == 0
    assert not (both / "blended-latent-diffusion.png").exists() and (both / "repaint.png").is_file()
    # an earlier run's image used as this run's --image is an input, not a stale image: it stays
    result = _demo(
        tmp_path, "-o", str(both), "-i", str(both / "brushnet.png"), "-m", str(own / "mask.png"),
        "-p", "a red circle", "--methods", "blended-latent-diffusion",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (both / "brushnet.png").is_file() and (both / "blended-latent-diffusion.png").is_file()


def test_demo_passes_the_device_and_checks_every_model_folder_first(tmp_path, monkeypatch):
    """--device was checked, then dropped: every method ran on the CPU. A missing model folder failed only when
    its method's turn came (in parallel mode after every other method had run)."""
    import brushnet.methods

    seen = []

    def record(name, models, device="cpu", **kwargs):
        seen.append((name, device))
        raise RuntimeError("stop here")

    monkeypatch.setattr(brushnet.methods, "load_method", record)
    with pytest.raises(RuntimeError, match="stop here"):
        run_demo(tmp_path / "x", methods=["brushnet"], request={"steps": 2}, device="cuda:1")
    assert seen == [("brushnet", "cuda:1")]
    monkeypatch.undo()

    import brushnet.demo.run as demo_run

    calls = []
    monkeypatch.setattr(demo_run, "run_demo", lambda output, **kwargs: calls.append(kwargs) or {"grid": "g"})
    assert (
        _demo(tmp_path, "--methods", "brushnet", "-o", str(tmp_path / "y"), "--device", "cpu").exit_code == 0
    )
    assert calls[0]["device"] == "cpu"
    monkeypatch.undo()

    models = tmp_path / "models"
    models.mkdir()
    for part in DEMO_DIR.iterdir():
        if part.name != "powerpaint":
            (models / part.name).symlink_to(part)
    result = _demo(
        tmp_path, "--models", str(models), "--methods", "brushnet,powerpaint", "-o", str(tmp_path / "z")
    )
    assert result.exit_code == 2 and "lack powerpaint/ (for powerpaint)" in result.output
    assert not (tmp_path / "z").exists()
    # a worker's failure stops the others: the error comes back, the pool is gone
    with pytest.raises(Exception, match="not found"):
        run_demo(
            tmp_path / "w",
            methods=["powerpaint", "brushnet"],
            models_root=models,
            request={"steps": 2},
            workers=2,
        )


def test_demo_table_is_the_models_own_and_small_requests_run(tmp_path):
    """With --models the printed table was the shipped models' whatever the folder; --steps under RePaint's jump
    length failed with advice the demo does not allow; a method named twice ran twice; an oversized image's
    error named --max-pixels, which the demo lacks."""
    models = tmp_path / "models"
    models.mkdir()
    for part in DEMO_DIR.iterdir():
        if part.name != "mini_brushbench.json":
            (models / part.name).symlink_to(part)
    result = runner.invoke(
        app,
        [
            "demo",
            "--models",
            str(models),
            "--methods",
            "repaint,repaint",
            "--steps",
            "3",
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"no mini-BrushBench results for the models in {models}" in result.output
    assert result.output.count("repaint: 4 scene(s)") == 1
    assert demo_options("repaint", steps=3)["jump_length"] == 3
    assert "PowerPaint" not in demo_scene(DEMO_SCENES[-1], powerpaint=False).label

    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    Image.new("L", (300, 300), 255).save(tmp_path / "mask.png")
    result = _demo(
        tmp_path, "-i", str(tmp_path / "big.png"), "-m", str(tmp_path / "mask.png"), "-p", "a red circle"
    )
    assert result.exit_code == 2 and "image is 300x300; the demo models work on 128x128" in result.output
    assert "--max-pixels" not in result.output
