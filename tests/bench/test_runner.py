"""End to end: a 2-image shapes-world BrushBench set × brushnet and a baseline × the weight-free metrics;
the rows, the summary, the Markdown table, resuming without regenerating, shards, and the CLI."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from brushnet.bench.datasets import load_dataset
from brushnet.bench.report import (
    PUBLISHED_SECONDARY_SOURCE,
    PUBLISHED_SOURCE,
    load_rows,
    markdown_table,
    write_reports,
)
from brushnet.bench.runner import BenchSettings, run_benchmark
from brushnet.errors import InputError
from brushnet.methods import available_methods, load_method

SETTINGS = BenchSettings(steps=2, scorers=["shapes"])
BASELINE = "blended-latent-diffusion"
PIXEL_COLUMNS = ("psnr_orig", "mse_orig", "psnr", "mse", "ssim")


def _methods():
    methods = ["brushnet"]
    if BASELINE in available_methods():
        methods.append(BASELINE)
    return methods


class CountingLoader:
    """``load_method`` that counts every ``generate`` call of the methods it loads."""

    def __init__(self):
        self.generate_calls = 0

    def __call__(self, name, models, device="cpu", dtype="fp32"):
        method = load_method(name, models, device=device, dtype=dtype)
        generate = method.generate

        def counted(*args, **kwargs):
            self.generate_calls += 1
            return generate(*args, **kwargs)

        method.generate = counted
        return method


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_models, shapes_set):
    run_dir = tmp_path_factory.mktemp("run")
    dataset = load_dataset(shapes_set)
    loader = CountingLoader()
    stats = run_benchmark(_methods(), tiny_models, dataset, run_dir, SETTINGS, load=loader)
    return run_dir, dataset, loader, stats


def test_rows_hold_both_variants_of_one_generation(finished_run):
    run_dir, dataset, loader, stats = finished_run
    methods = _methods()
    if len(methods) == 1:
        pytest.skip(f"{BASELINE} not registered: only brushnet ran")
    assert (stats.generated, stats.skipped, loader.generate_calls) == (2 * len(methods), 0, 2 * len(methods))
    rows = load_rows(run_dir)
    assert len(rows) == len(methods) * len(dataset) * 2
    for row in rows:
        for column in PIXEL_COLUMNS + ("colour_ok", "shape_ok", "seconds", "unet_calls"):
            assert column in row, column
        assert not {"lpips", "clip_score", "hps", "image_reward", "aesthetic"} & set(row)
        assert row["unet_calls"] == 2 * SETTINGS.steps  # CFG pair per step
        # the original script's MSE is 3x the per-channel mean on the same kept pixels
        assert row["mse_orig"] == pytest.approx(3 * row["mse"], rel=1e-9)
    for method in methods:
        for item in dataset:
            raw = np.asarray(Image.open(run_dir / f"outputs/{method}/inside/raw/{item.id}.png")).astype(int)
            blended = np.asarray(
                Image.open(run_dir / f"outputs/{method}/inside/blended/{item.id}.png")
            ).astype(int)
            original = np.asarray(item.image).astype(int)
            # blended = the same raw generation inside the hole, the original far from it
            np.testing.assert_array_equal(blended[item.mask], raw[item.mask])
            far = ~np.asarray(
                Image.fromarray(item.mask).filter(__import__("PIL.ImageFilter").ImageFilter.MaxFilter(23))
            )
            np.testing.assert_array_equal(blended[far], original[far])
            pair = {r["variant"]: r for r in rows if r["method"] == method and r["id"] == item.id}
            assert pair["blended"]["mse"] < pair["raw"]["mse"]
            assert pair["raw"]["seconds"] == pair["blended"]["seconds"]


def test_summary_and_markdown(finished_run):
    run_dir, dataset, _, _ = finished_run
    paths = write_reports(run_dir)
    for key in (
        "per_image_jsonl",
        "per_image_csv",
        "summary_csv",
        "table_md",
        "grid_inside_png",
        "grid_inside_html",
    ):
        assert paths[key].is_file(), key
    rows = load_rows(run_dir)
    with open(paths["summary_csv"]) as file:
        summary = list(csv.DictReader(file))
    assert len(summary) == len(_methods()) * 2
    for entry in summary:
        members = [r for r in rows if (r["method"], r["variant"]) == (entry["method"], entry["variant"])]
        assert int(entry["n"]) == len(members) == len(dataset)
        assert float(entry["psnr"]) == pytest.approx(np.mean([r["psnr"] for r in members]))
        assert float(entry["colour_ok"]) == pytest.approx(np.mean([r["colour_ok"] for r in members]))
    table = paths["table_md"].read_text()
    brushnet_blended = next(e for e in summary if (e["method"], e["variant"]) == ("brushnet", "blended"))
    line = next(line for line in table.splitlines() if line.startswith("| brushnet | blended | 2 |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[3:6] == ["–", "–", "–"]  # IR, HPS, AS: no weights
    assert cells[6] == f"{float(brushnet_blended['psnr_orig']):.2f}"
    assert cells[7] == f"{float(brushnet_blended['mse_orig']) * 1e3:.2f}"
    assert (
        f"| BrushNet blended ({PUBLISHED_SOURCE}) | blended | 600 | 12.64 | 27.78 | 6.51 | 31.94 | 0.80 | 18.67 | 26.39 |"
        in table
    )
    assert len(paths["per_image_jsonl"].read_text().splitlines()) == len(rows)
    assert "data:image/png;base64," in paths["grid_inside_html"].read_text()


def test_rerun_resumes_without_generating(finished_run, tiny_models):
    run_dir, dataset, _, _ = finished_run
    outputs = sorted((run_dir / "outputs").rglob("*.png"))
    mtimes = {path: path.stat().st_mtime_ns for path in outputs}
    loader = CountingLoader()
    stats = run_benchmark(_methods(), tiny_models, dataset, run_dir, SETTINGS, load=loader)
    assert (loader.generate_calls, stats.generated, stats.skipped) == (0, 0, len(_methods()) * len(dataset))
    # a lost row file is re-scored from the saved outputs, still without generating
    row_file = run_dir / "rows" / "brushnet" / "inside" / f"{dataset.ids[0]}.json"
    before = json.loads(row_file.read_text())
    row_file.unlink()
    stats = run_benchmark(_methods(), tiny_models, dataset, run_dir, SETTINGS, load=loader)
    assert (loader.generate_calls, stats.rescored) == (0, 1)
    assert json.loads(row_file.read_text()) == before
    assert {path: path.stat().st_mtime_ns for path in outputs} == mtimes
    # another protocol is refused, naming only the settings that differ
    with pytest.raises(InputError) as refused:
        run_benchmark(["brushnet"], tiny_models, dataset, run_dir, BenchSettings(steps=3), load=loader)
    assert str(refused.value) == (
        f"{run_dir} was made with steps=2, scorers=['shapes'] (this run: steps=3, scorers=[]); use another --output"
    )


def test_shards_write_disjoint_parts_of_the_same_run(tmp_path, tiny_models, shapes_set, finished_run):
    dataset = load_dataset(shapes_set)
    for index in range(2):
        stats = run_benchmark(
            ["brushnet"], tiny_models, dataset, tmp_path, SETTINGS, process_index=index, num_processes=2
        )
        assert stats.generated == 1
    sharded = load_rows(tmp_path)
    single = [r for r in load_rows(finished_run[0]) if r["method"] == "brushnet"]
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in sharded] == [
        {k: v for k, v in r.items() if k not in drop} for r in single
    ]


def test_cli_run_outside_and_report(tmp_path, tiny_models, shapes_set):
    from typer.testing import CliRunner

    from brushnet.cli.bench import app

    runner = CliRunner()
    args = ["run", "--methods", "brushnet", "--dataset", str(shapes_set), "--mask-kind", "outside", "--limit", "1",
            "--output", str(tmp_path / "run"), "--steps", "1", "--base", tiny_models.base, "--brushnet", tiny_models.brushnet,
            "--blend-kernel-size", "11", "--device", "cpu"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = load_rows(tmp_path / "run")
    assert [(r["mask_kind"], r["variant"]) for r in rows] == [("outside", "blended"), ("outside", "raw")]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["blend_kernel_size"] == 11
    assert "colour_ok" not in rows[0]  # the target describes the inside hole only
    assert rows[0]["hole_fraction"] > 0.5
    result = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0 and "## outside-inpainting" in result.output
    # the published outside-inpainting rows (secondary source) are printed for reference, AS not recovered
    assert (
        f"| BrushNet blended ({PUBLISHED_SECONDARY_SOURCE}) | blended | 600 | 10.88 | 28.09 | – | 27.82 | 2.25 | 4.63 | 27.22 |"
        in result.output
    )
    assert PUBLISHED_SOURCE not in result.output  # the inside-inpainting rows belong to the other task
    result = runner.invoke(app, ["run", "--dataset", str(tmp_path / "nope"), "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and "error: dataset not found" in result.output


def test_cli_missing_metric_weights_is_one_line(tmp_path, shapes_set):
    from typer.testing import CliRunner

    from brushnet.cli.bench import app

    missing = tmp_path / "ImageReward.pt"
    args = ["run", "--dataset", str(shapes_set), "--output", str(tmp_path / "run"), "--num-shards", "1",
            "--shard-index", "0", "--image-reward-weights", str(missing)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.output == (
        f"error: --image-reward-weights {missing}: not found; expected a local file: ImageReward.pt (v1.0)\n"
    )
    assert not (tmp_path / "run").exists()  # nothing generated before the weights are checked


def test_published_rows_follow_the_set_and_mask_kind():
    summary = [{"method": "brushnet", "variant": "blended", "mask_kind": "inside", "n": 3, "psnr_orig": 30.0}]
    editbench = markdown_table(summary, "editbench")
    assert (
        f"| BrushNet random-mask blended ({PUBLISHED_SECONDARY_SOURCE}) | blended | 240 | – | – | – | 33.66 |"
        in (editbench)
    )
    assert PUBLISHED_SOURCE not in editbench
    folder = markdown_table(summary, "folder")
    assert "published" not in folder and "| brushnet | blended | 3 | – | – | – | 30.00 | – |" in folder


def test_a_run_folder_refusal_names_only_what_differs(tmp_path):
    from brushnet.bench.runner import _check_run_json

    def record(dtype="fp32", path="/data/set", steps=2, **settings):
        settings = BenchSettings(steps=steps, **settings).model_dump()
        return {"settings": settings, "dataset": {"path": path, "kind": "folder", "size": 2}, "methods": ["brushnet"],
                "mask_kinds": ["inside"], "dtype": dtype}  # fmt: skip

    _check_run_json(tmp_path, record(options={"brushnet": {"conditioning_scale": 0.5}}), write=True)
    changed = record(
        dtype="fp16", path="/data/other", steps=3, options={"brushnet": {"conditioning_scale": 0.2}}
    )
    with pytest.raises(InputError) as refused:
        _check_run_json(tmp_path, changed, write=True)
    assert str(refused.value) == (
        f"{tmp_path} was made with steps=2, brushnet:conditioning_scale=0.5, dataset='/data/set', dtype='fp32' "
        "(this run: steps=3, brushnet:conditioning_scale=0.2, dataset='/data/other', dtype='fp16'); "
        "use another --output"
    )
    # an option set on one side only is named as unset on the other
    with pytest.raises(InputError, match=r"brushnet:conditioning_scale=0.5 \(this run: brushnet:conditioning_scale "
                       r"unset\)"):  # fmt: skip
        _check_run_json(tmp_path, record(options={"blended-latent-diffusion": {}}), write=True)

    # a method without options is no setting: the CLI's {"other": {}} for an added method is accepted
    fresh = tmp_path / "fresh"
    _check_run_json(fresh, record(options={"brushnet": {}}), write=True)
    added = {**record(options={"blended-latent-diffusion": {}}), "methods": ["blended-latent-diffusion"]}
    _check_run_json(fresh, added, write=True)
    assert json.loads((fresh / "run.json").read_text())["methods"] == ["blended-latent-diffusion", "brushnet"]


def test_a_grown_mask_is_pasted_back_as_inpaint_does(tmp_path, tiny_models, shapes_set):
    """With --mask-grow the method regenerated the grown ring, but the bench blended with the dataset's mask,
    pasting most of the ring back from the input and cutting the generation at the old edge: the blended
    image was not what `inpaint` gives for the same request."""
    from brushnet.methods import inpaint

    settings = BenchSettings(steps=2, mask_grow=4, blend_kernel_size=5)
    dataset = load_dataset(shapes_set)
    run_benchmark(["brushnet"], tiny_models, dataset, tmp_path, settings)
    method = load_method("brushnet", tiny_models)
    for item in dataset:
        request = settings.request_for(type(method), item.prompt).model_dump()
        expected = inpaint(method, item.image, item.mask, {**request, "blend": True, "blend_kernel_size": 5})
        blended = Image.open(tmp_path / f"outputs/brushnet/inside/blended/{item.id}.png").convert("RGB")
        np.testing.assert_array_equal(np.asarray(blended), np.asarray(expected.images[0]))
        rows = load_rows(tmp_path)
        # the metrics keep the dataset's hole: the regenerated ring counts as kept region
        assert {row["hole_fraction"] for row in rows if row["id"] == item.id} == {float(item.mask.mean())}


class _StubSuite:
    """A metric suite scoring the given metrics with fixed values (the weighted ones need weights offline)."""

    def __init__(self, weights_id=None, **values):
        self.metrics = dict.fromkeys(values)
        self.values = values
        if weights_id is not None:
            self.weights_id = weights_id

    def __call__(self, generated, original, hole, captions):
        import torch

        return {name: torch.full((len(generated),), value) for name, value in self.values.items()}


def test_rescoring_with_other_metrics_keeps_the_ones_scored_before(tmp_path, tiny_models, shapes_set):
    """A rerun that adds a metric (HPS weights given now) but not an earlier one (LPIPS weights left out) dropped
    the earlier metric's values from every row it re-scored."""
    dataset = load_dataset(shapes_set)
    settings = BenchSettings(steps=1)
    run_benchmark(
        ["brushnet"], tiny_models, dataset, tmp_path, settings, metric_suite=_StubSuite(psnr=20.0, lpips=0.25)
    )
    stats = run_benchmark(
        ["brushnet"], tiny_models, dataset, tmp_path, settings, metric_suite=_StubSuite(psnr=21.0, hps=0.5)
    )
    assert stats.rescored == len(dataset) and stats.generated == 0
    rows = load_rows(tmp_path)
    assert rows and all((row["psnr"], row["lpips"], row["hps"]) == (21.0, 0.25, 0.5) for row in rows), rows
    record = json.loads(next((tmp_path / "rows").rglob("*.json")).read_text())
    assert record["metrics"] == ["hps", "lpips", "psnr"]
    # and a third run that asks for what is there already has nothing to do
    stats = run_benchmark(
        ["brushnet"], tiny_models, dataset, tmp_path, settings, metric_suite=_StubSuite(lpips=0.0)
    )
    assert (stats.skipped, stats.rescored) == (len(dataset), 0)


def test_a_shard_that_starts_first_records_the_protocol(tmp_path, tiny_models, shapes_set):
    """Only shard 0 wrote run.json: shards launched by hand with other settings before it were not refused."""
    dataset = load_dataset(shapes_set)
    run_benchmark(
        ["brushnet"], tiny_models, dataset, tmp_path, BenchSettings(steps=1), process_index=1, num_processes=2
    )
    assert json.loads((tmp_path / "run.json").read_text())["settings"]["steps"] == 1
    with pytest.raises(InputError, match="was made with steps=1 .this run: steps=2."):
        run_benchmark(
            ["brushnet"],
            tiny_models,
            dataset,
            tmp_path,
            BenchSettings(steps=2),
            process_index=0,
            num_processes=2,
        )


def test_the_summary_says_how_many_rows_are_behind_a_mean_that_left_some_out():
    """A mean over the rows with a finite value was printed beside the group's n, which counted every row."""
    from brushnet.bench.report import summarise

    rows = [
        {"method": "m", "variant": "raw", "mask_kind": "inside", "id": str(i), "psnr": value, "mse": 1.0}
        for i, value in enumerate([20.0, float("inf"), 30.0, None])
    ]
    [entry] = summarise(rows)
    assert (entry["n"], entry["psnr"], entry["n_psnr"], entry["mse"]) == (4, 25.0, 2, 1.0)
    assert "n_mse" not in entry  # every row counted


def test_rows_scored_with_other_weights_are_re_scored_and_a_mix_is_reported(
    tmp_path, tiny_models, shapes_set
):
    """A rerun with another aesthetic head skipped every row (the metric's name was there) and averaged the two
    heads' scores in one table; the run folder did not say which weights scored a row."""
    from brushnet.bench.report import mixed_weights

    dataset = load_dataset(shapes_set)
    settings = BenchSettings(steps=1)

    def bench(weights_id, value, **shard):
        suite = _StubSuite(weights_id={"aesthetic": weights_id}, psnr=20.0, aesthetic=value)
        return run_benchmark(
            ["brushnet"], tiny_models, dataset, tmp_path, settings, metric_suite=suite, **shard
        )

    bench("head-a", 4.0)
    stats = bench("head-b", 5.0)
    assert (stats.rescored, stats.skipped, stats.generated) == (len(dataset), 0, 0)
    assert {row["aesthetic"] for row in load_rows(tmp_path)} == {5.0}
    record = json.loads(next((tmp_path / "rows").rglob("*.json")).read_text())
    assert record["weights"] == {"aesthetic": "head-b"}
    assert bench("head-b", 5.0).skipped == len(dataset)
    assert mixed_weights(tmp_path) == {}
    # one shard re-scored with a third head: the table says its means mix two heads
    stats = bench("head-c", 6.0, process_index=0, num_processes=2)
    assert 0 < stats.rescored < len(dataset)
    assert mixed_weights(tmp_path) == {"aesthetic": 2}
    table = write_reports(tmp_path)["table_md"].read_text()
    assert "**Warning:** rows scored with different weight files: aesthetic (2 files)" in table


def test_weights_fingerprint_follows_the_contents(tmp_path):
    from brushnet.metrics.suite import weights_fingerprint

    big = tmp_path / "big.pt"
    big.write_bytes(bytes(3 << 20))
    first = weights_fingerprint(big)
    assert weights_fingerprint(big) == first and len(first) == 16
    big.write_bytes(bytes(3 << 20)[:-1] + b"x")  # only the last byte differs
    assert weights_fingerprint(big) != first
    middle = tmp_path / "head.pth"  # between 1 and 2 MiB: the bytes after the first MiB counted too
    middle.write_bytes(bytes(3 << 19))
    before = weights_fingerprint(middle)
    middle.write_bytes(bytes(3 << 19)[:-1] + b"x")
    assert weights_fingerprint(middle) != before
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = weights_fingerprint(folder)
    (folder / "vocab.json").write_text("{}")
    assert weights_fingerprint(folder) != before
    assert weights_fingerprint(big, folder) != weights_fingerprint(folder, big)
