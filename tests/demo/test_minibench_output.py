"""``python -m brushnet.demo.minibench`` writes its results into its work folder, never over the shipped
``assets/demo_world/mini_brushbench.json`` unless ``--results`` names it (issue 19, stumble 3)."""

import json

import pytest

from brushnet.demo import minibench
from brushnet.demo.run import RESULTS_FILE


def test_minibench_writes_into_the_work_folder(tmp_path, capsys):
    shipped = RESULTS_FILE.read_bytes()
    work = tmp_path / "work"
    (work / "run" / "results").mkdir(parents=True)
    (work / "run" / "results" / "per_image.jsonl").write_text(
        ""
    )  # a finished run with no rows: summarise only
    assert minibench.main(["--work", str(work), "--scenes", "2", "--methods", "brushnet", "--skip-run"]) == 0
    record = json.loads((work / "mini_brushbench.json").read_text())
    assert record["images"] == 2 and "mini_brushbench.json" in capsys.readouterr().out
    assert RESULTS_FILE.read_bytes() == shipped  # the shipped table is untouched
    elsewhere = tmp_path / "elsewhere.json"
    minibench.main(
        [
            "--work",
            str(work),
            "--scenes",
            "2",
            "--methods",
            "brushnet",
            "--skip-run",
            "--results",
            str(elsewhere),
        ]
    )
    assert json.loads(elsewhere.read_text())["images"] == 2 and RESULTS_FILE.read_bytes() == shipped


def _row(method, blend, **columns):
    row = {"method": method, "blend": blend, "inside_psnr": None, "colour_acc": None, "removal_images": 0}
    return {**row, "removal_acc": None, "removal_object_fraction": None, **columns}


def test_merge_keeps_the_other_rows_and_takes_only_the_passes_that_ran():
    old = [
        _row("brushnet", False, inside_psnr=14.0, colour_acc=0.385),
        _row("repaint", False, inside_psnr=21.7, colour_acc=0.295),
    ]
    # a removal-only run of brushnet: its main-pass columns are None there and must not wipe the old ones
    removal = [_row("brushnet", False, removal_images=200, removal_acc=0.3, removal_object_fraction=0.4)]
    merged = minibench.merge_rows(old, removal, passes=("removal",))
    assert merged[0] == {**old[0], "removal_images": 200, "removal_acc": 0.3, "removal_object_fraction": 0.4}
    assert merged[1] == old[1]
    # a new method, both passes: added in METHODS order (powerpaint after repaint), every column its own
    both = [_row("powerpaint", False, inside_psnr=15.0, colour_acc=0.5, removal_images=200, removal_acc=0.8)]
    merged = minibench.merge_rows(merged, both)
    assert [row["method"] for row in merged] == ["brushnet", "repaint", "powerpaint"]
    assert merged[2] == both[0] and merged[0]["removal_acc"] == 0.3


def test_merge_refuses_a_table_of_another_size(tmp_path):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"images": 200, "settings": {}, "rows": []}))
    with pytest.raises(SystemExit):
        minibench.main(
            ["--work", str(tmp_path / "w"), "--scenes", "2", "--skip-run", "--merge", str(earlier)]
        )
    assert not (tmp_path / "w").exists()  # refused before writing the eval sets


def test_summary_splits_the_hole_scores_by_what_the_prompt_names(tmp_path):
    """``shape_acc_hole_same`` / ``_different``: the prompts that name the masked object (whose dilated silhouette
    is the hole) apart from those that name another one, the only ones that measure a shape drawn inside a hole
    of another shape."""
    run, dataset = tmp_path / "run", tmp_path / "eval"
    (run / "results").mkdir(parents=True)
    dataset.mkdir()
    variants = {"a": "same", "b": "same", "c": "different", "d": "different"}
    (dataset / "mapping_file.json").write_text(json.dumps({k: {"variant": v} for k, v in variants.items()}))
    shapes = {"a": True, "b": True, "c": False, "d": True}
    rows = [
        {"id": key, "method": "brushnet", "variant": "raw", "mask_kind": "inside", "psnr": 20.0,
         "colour_hole_ok": True, "shape_hole_ok": shapes[key]}
        for key in variants
    ]  # fmt: skip
    (run / "results" / "per_image.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (row,) = minibench.summarise(run, dataset)
    assert row["shape_acc_hole"] == 0.75
    assert row["shape_acc_hole_same"] == 1.0 and row["shape_acc_hole_different"] == 0.5
    assert row["colour_acc_hole_same"] == row["colour_acc_hole_different"] == 1.0


def test_minibench_refuses_bad_arguments_and_another_eval_set_before_writing(tmp_path, capsys):
    """An unknown method or no scenes ended in a traceback after the eval sets were written; a rerun in the same
    --work with another --seed rewrote the eval set, and bench run then reused the other set's results."""
    for args, message in (
        (["--methods", "nosuch"], "--methods: unknown ['nosuch']"),
        (["--scenes", "0"], "--scenes must be at least 1, got 0"),
    ):
        work = tmp_path / args[0].strip("-")
        with pytest.raises(SystemExit) as info:
            minibench.main(["--work", str(work), *args])
        assert info.value.code == 2 and message in capsys.readouterr().err
        assert not work.exists()
    work = tmp_path / "work"
    assert minibench.main(["--work", str(work), "--scenes", "1", "--methods", "brushnet", "--skip-run"]) == 0
    eval_set = (work / "eval" / "mapping_file.json").read_bytes()
    record = json.loads((work / "mini_brushbench.json").read_text())
    assert (record["eval_seed"], record["methods"]) == (0, ["brushnet"])
    table = capsys.readouterr().out
    assert "--scenes 1 --methods brushnet (docs" in " ".join(table.split())
    with pytest.raises(SystemExit):
        minibench.main(["--work", str(work), "--scenes", "1", "--seed", "5", "--methods", "brushnet"])
    assert "holds the results of an eval set of 1 scenes, seed 0" in capsys.readouterr().err
    assert (work / "eval" / "mapping_file.json").read_bytes() == eval_set
