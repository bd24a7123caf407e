"""`bench speed` on tiny random-weight models: the records, the CFG branch modes (call counts and identical
images), failed combinations recorded instead of crashing, and the CLI's JSON and table."""

import json

import numpy as np
import pytest

from brushnet.bench.speed import _set_branch_on_doubled_batch, format_table, measure_speed
from brushnet.methods import inpaint, load_method


def test_records_and_cfg_branch_modes(tiny_models):
    records = measure_speed(
        ["brushnet", "sd-inpainting"], tiny_models, resolutions=[32], steps=[3], repeats=2,
        cfg_branch=["once", "doubled"],
    )  # fmt: skip
    assert [(r["method"], r["cfg_branch"]) for r in records] == [
        ("brushnet", "once"),
        ("brushnet", "doubled"),
        ("sd-inpainting", None),
    ]
    for record in records:
        assert "error" not in record
        assert len(record["seconds"]) == 2 and record["seconds_per_image"] == float(
            np.median(record["seconds"])
        )
        # a step is part of the image: text encoding, VAE and paste-back are outside the step timer
        assert 0 < record["seconds_per_step"] * record["steps"] < record["seconds_per_image"] * 1.5
        assert record["unet_calls"] == 2 * 3  # CFG pair per step
        assert record["memory"] == "cpu_peak_rss" and record["peak_memory_mib"] > 100
        assert 0 <= record["rss_increase_mib"] <= record["peak_memory_mib"]
    once, doubled = records[0], records[1]
    assert once["extra_calls"] == {"brushnet": 3} and doubled["extra_calls"] == {"brushnet": 6}
    table = format_table(records)
    assert table.count("\n") == 4 and "| brushnet " in table and "doubled" in table


def test_doubled_branch_gives_the_same_image_and_is_undone(tiny_models):
    from PIL import Image

    method = load_method("brushnet", tiny_models)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    hole = np.zeros((32, 32), dtype=bool)
    hole[8:24, 8:24] = True
    request = {"prompt": "a cat", "seed": 1, "steps": 2, "blend": False}
    once = inpaint(method, image, hole, request)
    _set_branch_on_doubled_batch(method, True)
    assert method.pipeline.branch_batch == "doubled"
    doubled = inpaint(method, image, hole, request)
    _set_branch_on_doubled_batch(method, False)
    assert method.pipeline.branch_batch is None
    assert (
        type(method.pipeline.brushnet).__name__ == "BrushNetModel" and not method.pipeline.brushnet.uses_text
    )
    again = inpaint(method, image, hole, request)
    assert again.extra_calls["brushnet"] == once.extra_calls["brushnet"]  # undone: once per step again
    assert doubled.extra_calls["brushnet"] == 2 * once.extra_calls["brushnet"]
    difference = np.abs(np.asarray(once.images[0], dtype=int) - np.asarray(doubled.images[0], dtype=int))
    assert difference.max() <= 1  # same computation in another batch layout: at most 1/255 rounding


def test_branch_once_at_strict_fp32_puts_back_the_pipeline_before_the_fix(tiny_models, monkeypatch):
    """The benchmarks' before/after switch: at strict fp32 the pipeline runs the branch on the doubled batch;
    inside ``branch_once_at_strict_fp32`` it runs once, as before issue 14's fix, and the rule is back after."""
    from PIL import Image

    from brushnet.bench.speed import branch_once_at_strict_fp32
    from brushnet.methods import inpaint, load_method
    from brushnet.pipelines import common

    method = load_method("brushnet", tiny_models)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    hole = np.zeros((32, 32), dtype=bool)
    hole[8:24, 8:24] = True
    request = {"prompt": "a cat", "seed": 1, "steps": 2, "blend": False}
    batches = []
    method.pipeline.brushnet.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    monkeypatch.setattr(common, "strict_fp32_cudnn", lambda device, dtype: True)  # as on CUDA with TF32 off
    inpaint(method, image, hole, request)
    with branch_once_at_strict_fp32(method.pipeline):
        inpaint(method, image, hole, request)
    inpaint(method, image, hole, request)
    assert batches == [2, 2, 1, 1, 2, 2]


def test_a_combination_that_cannot_run_is_recorded(tiny_models, monkeypatch):
    import brushnet.methods as methods

    calls = []

    def failing_inpaint(method, *args, **kwargs):
        calls.append(method.name)
        raise RuntimeError("\"slow_conv2d_cpu\" not implemented for 'Half'\nmore detail")

    monkeypatch.setattr(methods, "inpaint", failing_inpaint)
    records = measure_speed(["brushnet"], tiny_models, resolutions=[32], steps=[1], repeats=1)
    assert records == [
        {"method": "brushnet", "device": "cpu", "dtype": "fp32", "resolution": 32, "steps": 1,
         "cfg_branch": "once", "compile": False, "repeats": 1, "scheduler": "unipc-original", "options": {},
         "error": "RuntimeError: \"slow_conv2d_cpu\" not implemented for 'Half'"}
    ]  # fmt: skip
    assert "not run: RuntimeError" in format_table(records)
    with pytest.raises(ValueError, match="cfg_branch"):
        measure_speed(["brushnet"], tiny_models, cfg_branch=["twice"])


def test_cli_speed_writes_json_and_table(tmp_path, tiny_models):
    from typer.testing import CliRunner

    from brushnet.cli.bench import app

    out = tmp_path / "speed.json"
    args = ["speed", "--methods", "brushnet", "--resolutions", "32", "--steps", "2", "--repeats", "1",
            "--base", tiny_models.base, "--brushnet", tiny_models.brushnet, "--output", str(out), "--threads", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["command"].startswith("brushnet bench speed")
    assert payload["environment"]["threads"] == 1
    [record] = payload["records"]
    assert (record["method"], record["steps"], record["unet_calls"]) == ("brushnet", 2, 4)
    assert "| brushnet" in result.output
    result = CliRunner().invoke(app, ["speed", "--methods", "nope", "--random-weights", "tiny",
                                      "--weights-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "error:" in result.output


def test_cli_speed_random_sdxl_weights_every_method(tmp_path):
    """`--random-weights tiny-xl` builds an SDXL model set for every method; RePaint keeps its DDIM schedule."""
    from typer.testing import CliRunner

    from brushnet.cli.bench import app

    out = tmp_path / "speed.json"
    args = ["speed", "--methods", "all", "--resolutions", "32", "--steps", "2", "--repeats", "1",
            "--random-weights", "tiny-xl", "--weights-dir", str(tmp_path / "w"), "--output", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = {r["method"]: r for r in json.loads(out.read_text())["records"]}
    assert {"brushnet", "sd-inpainting", "blended-latent-diffusion", "repaint", "controlnet-inpaint"} <= set(
        records
    )
    assert all("error" not in r for r in records.values()), records
    assert records["repaint"]["scheduler"] == "ddim" and records["brushnet"]["scheduler"] == "unipc-original"
    assert records["brushnet"]["extra_calls"] == {"brushnet": 4}  # the SDXL branch on both CFG halves


def test_cli_speed_records_a_method_that_refuses_its_models_and_takes_options(tmp_path):
    """HD-Painter on the tiny UNet (no cross-attention at 1/4 of the latent) refuses RASG with an InputError,
    which ended the whole command: no table, no record file. Now the combination is an error record, and
    ``--option hd-painter:rasg=false`` runs it."""
    from typer.testing import CliRunner

    from brushnet.cli.bench import app

    base = ["speed", "--resolutions", "32", "--steps", "2", "--repeats", "1", "--random-weights", "tiny",
            "--weights-dir", str(tmp_path / "w"), "--threads", "1"]  # fmt: skip
    out = tmp_path / "speed.json"
    result = CliRunner().invoke(app, [*base, "--methods", "brushnet,hd-painter", "--output", str(out)])
    assert result.exit_code == 0, result.output
    records = {r["method"]: r for r in json.loads(out.read_text())["records"]}
    assert "error" not in records["brushnet"] and records["brushnet"]["options"] == {}
    assert records["hd-painter"]["error"].startswith("InputError: RASG found no cross-attention")
    result = CliRunner().invoke(
        app,
        [
            *base,
            "--methods",
            "brushnet,hd-painter",
            "--option",
            "hd-painter:rasg=false",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    records = {r["method"]: r for r in json.loads(out.read_text())["records"]}
    assert "error" not in records["hd-painter"] and records["hd-painter"]["options"] == {"rasg": False}
    assert records["brushnet"]["options"] == {}
    for bad, message in (
        ("nosuch=1", "bad option for method 'brushnet'"),
        ("repaint:x=1", "names method 'repaint'"),
    ):
        fresh = tmp_path / "never"
        result = CliRunner().invoke(
            app, [*base, "--methods", "brushnet", "--option", bad, "--weights-dir", str(fresh)]
        )
        assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, (
            result.output
        )
        assert not fresh.exists()  # refused before any model was built


def test_speed_help_names_every_random_weight_preset():
    from typer.testing import CliRunner

    from brushnet.cli.bench import app
    from brushnet.random_models import PRESETS

    text = " ".join(CliRunner().invoke(app, ["speed", "--help"], env={"COLUMNS": "200"}).output.split())
    assert all(f" {preset} " in text.replace("|", " | ").replace(".", " ") for preset in PRESETS), text


def test_the_recorded_branch_mode_is_the_one_that_ran(tiny_xl_models, tiny_models):
    """SDXL's branch reads text, so it runs on the doubled batch whatever is asked: it was timed twice and
    labelled "once" and "doubled". Without guidance there is no doubled batch at all."""
    xl = {"base": tiny_xl_models["base"], "brushnet": tiny_xl_models["brushnet"]}
    records = measure_speed(["brushnet"], xl, resolutions=[32], steps=[2], repeats=1,
                            cfg_branch=["once", "doubled"])  # fmt: skip
    assert [r["cfg_branch"] for r in records] == ["doubled"]
    assert records[0]["extra_calls"] == {"brushnet": 4}
    records = measure_speed(["brushnet"], tiny_models, resolutions=[32], steps=[2], repeats=1,
                            cfg_branch=["once", "doubled"], guidance_scale=1.0)  # fmt: skip
    assert [r["cfg_branch"] for r in records] == [None]


def test_no_guidance_scale_times_each_method_at_its_familys_value(tiny_xl_models, tiny_models, monkeypatch):
    """``guidance_scale=None`` (what an unset request means) failed with ``None <= 1``; it is each method's family
    value, as in a request (SDXL 5.0, SD1.5 7.5)."""
    from brushnet.methods import api

    seen = []
    real_run = api.run
    monkeypatch.setattr(
        api,
        "run",
        lambda method, job, *a, **k: (
            seen.append(job.request.guidance_scale) or real_run(method, job, *a, **k)
        ),
    )
    xl = {"base": tiny_xl_models["base"], "brushnet": tiny_xl_models["brushnet"]}
    for models, expected in ((xl, 5.0), (tiny_models, 7.5)):
        seen.clear()
        records = measure_speed(
            ["brushnet"], models, resolutions=[32], steps=[1], repeats=1, guidance_scale=None
        )
        assert "error" not in records[0] and set(seen) == {expected}, (records[0], seen)
