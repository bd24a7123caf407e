"""benchmarks/cfg_branch_once.py and benchmarks/branch_window.py: both variants of a step run and give the same
prediction, and the table has a row per variant."""

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize(
    "script, rows, same",
    [
        ("cfg_branch_once.py", ["branch on doubled batch", "branch once per step"], "outputs: 0.00e+00"),
        ("branch_window.py", ["branch run, zero residuals added", "branch skipped"], "bit for bit: True"),
    ],
)
def test_step_benchmark(monkeypatch, capsys, script, rows, same):
    path = BENCHMARKS / script
    argv = [str(path), "--preset", "tiny", "--resolution", "64", "--repeats", "2", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    runpy.run_path(str(path), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("preset=tiny resolution=64")
    for line, label in zip(lines[1:3], rows):
        assert line.startswith(label) and line.count("s/step") >= 1, line
        assert len(line.split("[")[1].split(",")) == 2  # one time per repeat
    assert lines[3].startswith("speed-up") and lines[3].endswith(same), lines[3]
