"""Bench runs never write outside their run folder, one bad entry never stops a run, and a bad option is refused
before the run folder is touched (issue 20, items 1 and 12)."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from brushnet.bench.datasets import load_dataset
from brushnet.bench.runner import BenchSettings, check_item_id, run_benchmark
from brushnet.errors import InputError

SETTINGS = BenchSettings(steps=1)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def hostile_set(tmp_path, shapes_set):
    """The 2-scene shapes set plus a traversal id (``../../x``, a good entry otherwise) and an entry with a
    broken run-length mask, inside ``tmp_path/data/set``."""
    root = tmp_path / "data" / "set"
    shutil.copytree(shapes_set, root)
    mapping = json.loads((root / "mapping_file.json").read_text())
    good = next(iter(mapping.values()))
    mapping["../../x"] = dict(good)
    mapping["bad-rle"] = {**good, "inpainting_mask": "[1, 999999999]"}
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


@pytest.mark.parametrize(
    "item_id", ["../../x", "..", "a/b", "a\\b", ".hidden", "", "x" * 201, "new\nline", "/abs"]
)
def test_unsafe_ids_are_refused(item_id):
    with pytest.raises(InputError, match="not a plain file name"):
        check_item_id(item_id)


@pytest.mark.parametrize("item_id", ["00001", "a b", "img.v2", "ünïcode"])
def test_plain_ids_pass(item_id):
    assert check_item_id(item_id) == item_id


def test_traversal_id_and_bad_entry_are_skipped_and_recorded(tmp_path, tiny_models, hostile_set):
    before = _files(tmp_path)
    run_dir = tmp_path / "data" / "runs" / "run"
    dataset = load_dataset(hostile_set)
    stats = run_benchmark(["brushnet"], tiny_models, dataset, run_dir, SETTINGS)

    # the two good entries ran; the hostile id and the broken mask were skipped, named and counted
    assert stats.generated == 2 and stats.failed == 2
    failures = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert {f["id"] for f in failures} == {"../../x", "bad-rle"}
    assert "not a plain file name" in next(f["error"] for f in failures if f["id"] == "../../x")
    # nothing was written outside the run folder (the id would have put x.png two levels up)
    after = _files(tmp_path)
    outside = [p for p in after if p not in before and not p.startswith("data/runs/run/")]
    assert outside == []
    assert not (tmp_path / "data" / "x.png").exists() and not list(tmp_path.rglob("x.png"))

    # a rerun skips the done entries and records the bad ones again, without stopping, each listed once
    again = run_benchmark(["brushnet"], tiny_models, dataset, run_dir, SETTINGS)
    assert (again.generated, again.skipped, again.failed) == (0, 2, 2)
    listed = [json.loads(line)["id"] for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert sorted(listed) == ["../../x", "bad-rle"]  # was: each twice
    # the broken mask mended, a rerun generates that entry and no longer lists it
    mapping = json.loads((hostile_set / "mapping_file.json").read_text())
    mapping["bad-rle"] = dict(next(iter(mapping.values())))
    (hostile_set / "mapping_file.json").write_text(json.dumps(mapping))
    mended = run_benchmark(["brushnet"], tiny_models, load_dataset(hostile_set), run_dir, SETTINGS)
    assert (mended.generated, mended.failed) == (1, 1)
    listed = [json.loads(line)["id"] for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert listed == ["../../x"]  # was: bad-rle still listed as failed


def test_bad_scheduler_is_refused_before_the_run_folder_exists(tmp_path, tiny_models, shapes_set):
    from brushnet.cli.bench import app

    run_dir = tmp_path / "run"
    args = ["run", "--methods", "brushnet", "--dataset", str(shapes_set), "--limit", "1", "--output",
            str(run_dir), "--steps", "1", "--base", tiny_models.base, "--brushnet", tiny_models.brushnet,
            "--num-shards", "1", "--shard-index", "0", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--scheduler", "nosuch"])
    assert result.exit_code == 2, result.output
    assert "nosuch" in result.output and "Traceback" not in result.output
    assert not run_dir.exists()  # nothing written: no run.json to refuse the corrected command
    # the same through the library: the request is checked before run.json is written
    with pytest.raises((InputError, ValueError)):
        run_benchmark(
            ["brushnet"],
            tiny_models,
            load_dataset(shapes_set),
            run_dir,
            BenchSettings(steps=1, scheduler="nosuch"),
        )
    assert not run_dir.exists()

    result = CliRunner().invoke(app, [*args, "--scheduler", "ddim", "--no-report"])
    assert result.exit_code == 0, result.output
    assert (run_dir / "run.json").is_file()


def test_method_options_for_a_method_not_run_are_refused_before_the_run_folder_exists(
    tmp_path, tiny_models, shapes_set
):
    from brushnet.cli.bench import app

    run_dir = tmp_path / "run"
    args = ["run", "--methods", "brushnet", "--dataset", str(shapes_set), "--limit", "1", "--output",
            str(run_dir), "--steps", "1", "--base", tiny_models.base, "--brushnet", tiny_models.brushnet,
            "--num-shards", "1", "--shard-index", "0", "--device", "cpu"]  # fmt: skip
    option = CliRunner().invoke(app, [*args, "--option", "brushnett:conditioning_scale=0.2"])
    assert option.exit_code == 2
    assert option.output == (
        "error: --option 'brushnett:conditioning_scale=0.2' names method 'brushnett', which is not among brushnet\n"
    )
    result = CliRunner().invoke(
        app, [*args, "--method-options", '{"brushnett": {"conditioning_scale": 0.2}}']
    )
    assert result.exit_code == 2
    assert result.output == "error: --method-options names method 'brushnett', which is not among brushnet\n"
    result = CliRunner().invoke(app, [*args, "--method-options", '{"brushnet": 0.2}'])
    assert result.exit_code == 2
    assert result.output == 'error: --method-options must be a JSON object {"method": {option: value}}\n'
    assert not run_dir.exists()
    # the same through the library, for a name that is no method at all
    with pytest.raises(InputError, match="settings.options names method 'brushnett', which is not a method"):
        settings = BenchSettings(steps=1, options={"brushnett": {"conditioning_scale": 0.2}})
        run_benchmark(["brushnet"], tiny_models, load_dataset(shapes_set), run_dir, settings)
    assert not run_dir.exists()


@pytest.fixture
def half_bad_set(tmp_path, shapes_set):
    """One good shapes-world entry and one with a broken run-length mask."""
    root = tmp_path / "half_bad"
    shutil.copytree(shapes_set, root)
    mapping = json.loads((root / "mapping_file.json").read_text())
    good_id, good = next(iter(mapping.items()))
    mapping = {good_id: good, "bad-rle": {**good, "inpainting_mask": "[1, 999999999]"}}
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


def test_cli_exits_1_after_writing_everything_when_an_entry_failed(tmp_path, tiny_models, half_bad_set):
    from brushnet.cli.bench import app

    run_dir = tmp_path / "run"
    args = ["run", "--methods", "brushnet", "--dataset", str(half_bad_set), "--output", str(run_dir),
            "--steps", "1", "--base", tiny_models.base, "--brushnet", tiny_models.brushnet,
            "--num-shards", "1", "--shard-index", "0", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "1 generated, 0 skipped (done), 0 re-scored, 1 failed" in result.output
    assert "failed: brushnet/inside/bad-rle: " in result.output and "Traceback" not in result.output
    # the good entry, the failure record and the reports were all written before the exit
    assert [json.loads(line)["id"] for line in (run_dir / "failures.jsonl").read_text().splitlines()] == [
        "bad-rle"
    ]
    assert len(list((run_dir / "outputs" / "brushnet" / "inside").rglob("*.png"))) == 2
    assert (run_dir / "results" / "table.md").is_file() and "## inside-inpainting" in result.output


def test_a_generation_error_skips_its_entry_and_the_run_goes_on(
    tmp_path, tiny_models, shapes_set, monkeypatch
):
    """A NaN image (GenerationError) stopped the whole run; it is one failed entry, as a bad input is."""
    from brushnet.errors import GenerationError
    from brushnet.methods import api

    calls = []

    def refuse_first(method, images):
        calls.append(1)
        if len(calls) == 1:
            raise GenerationError("brushnet produced NaN or infinite values in image(s) 0 (float32)")

    monkeypatch.setattr(api, "_refuse_non_finite", refuse_first)
    run_dir = tmp_path / "runs" / "run"
    stats = run_benchmark(["brushnet"], tiny_models, load_dataset(shapes_set), run_dir, SETTINGS)
    assert stats.failed == 1 and stats.generated == len(calls) - 1 >= 1
    failures = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert [f["error"] for f in failures] == [
        "brushnet produced NaN or infinite values in image(s) 0 (float32)"
    ]
