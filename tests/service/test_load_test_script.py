"""benchmarks/load_test.py (the load figures in docs/serving.md) runs: it imported a module that no longer
exists (``brushnet.service.cli``) and failed at once."""

import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_test.py"


def test_load_test_runs_both_phases(monkeypatch, capsys):
    argv = [str(SCRIPT), "--requests", "4", "--clients", "2", "--steps", "1", "--size", "32"]
    argv += ["--max-queue", "1", "--burst", "3"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    assert "completed 4, failed 0" in out, out
    assert "images checked against direct calls with the same seed: 1/1 equal" in out, out
    assert "202 queued 1, 429 refused 2, other 0" in out, out
    assert "finished: 2/2 done" in out, out
