"""The mini-BrushBench table ``brushnet demo`` prints fits a terminal and explains its columns (issue 19,
stumble 11: it was one ~900-character line with unexplained columns)."""

import json

from brushnet.demo.run import METHOD_LABELS, RESULTS_FILE, format_results_table


def test_the_shipped_table_fits_80_columns_and_has_a_legend():
    table = format_results_table()
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = json.loads(RESULTS_FILE.read_text())["rows"]
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    body = lines[header + 2 : header + 2 + len(rows)]
    for line, row in zip(body, rows):  # one line per method and variant, with its numbers
        assert line.startswith(METHOD_LABELS[row["method"]]) and f"{row['inside_psnr']:.2f}" in line
        assert ("blended" if row["blend"] else "raw") in line and f"{row['colour_acc']:.3f}" in line
    legend = "\n".join(lines[header + 2 + len(rows) :])
    for term in (
        "PSNR in / out",
        "colour / shape",
        "colour* / shape*",
        "blended",
        "BLD",
        "CN-inpaint",
        "python -m brushnet.demo.minibench",
    ):
        assert term in legend


def test_the_removal_column_appears_with_the_removal_pass(tmp_path):
    data = json.loads(RESULTS_FILE.read_text())
    for row in data["rows"]:
        row.pop("removal_acc", None)
    (tmp_path / "r.json").write_text(json.dumps(data))
    assert "removal" not in format_results_table(tmp_path / "r.json")
    data["rows"][0]["removal_acc"] = 0.625
    (tmp_path / "r.json").write_text(json.dumps(data))
    table = format_results_table(tmp_path / "r.json")
    header = next(line for line in table.splitlines() if line.startswith("method"))
    assert "removal" in header and "0.625" in table and "removal: share of holes" in table
    assert max(len(line) for line in table.splitlines()) <= 80
