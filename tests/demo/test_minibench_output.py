"""``python -m brushnet.demo.minibench`` writes its results into its work folder, never over the shipped
``assets/demo_world/mini_brushbench.json`` unless ``--results`` names it (issue 19, stumble 3)."""

import json

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
