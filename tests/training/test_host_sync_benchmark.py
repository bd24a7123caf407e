"""``benchmarks/train_host_sync.py`` on the CPU: both modes timed, the operators of a step counted per phase (the
EMA on ``foreach`` issuing far fewer than one update per parameter), and usage errors."""

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_host_sync.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_host_sync", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_modes_timed_and_operators_counted(capsys):
    script = _script()
    flags = [
        "--device",
        "cpu",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--batch",
        "2",
        "--warmup",
        "0",
        "--count-ops",
    ]
    assert script.main(flags) == 0
    out = capsys.readouterr().out
    assert "device=cpu" in out and re.search(r"overlap / wait speed: [\d.]+×", out)
    rows = dict(re.findall(r"^\| (wait|overlap) \| ([\d.]+) \|", out, re.M))
    assert set(rows) == {"wait", "overlap"} and all(float(v) > 0 for v in rows.values())
    counts = {
        (mode, phase): int(n)
        for mode, phase, n in re.findall(r"^\| (wait|overlap) \| ([^|]+?) \| (\d+) \|", out, re.M)
    }
    per_parameter, foreach = counts[("wait", "ema (per parameter)")], counts[("overlap", "ema (foreach)")]
    assert per_parameter >= 100 and foreach < 10, (
        per_parameter,
        foreach,
    )  # one update per parameter, or a few
    assert counts[("wait", "forward")] == counts[("overlap", "forward")] > 100
    total = sum(n for (mode, phase), n in counts.items() if mode == "wait" and phase != "all")
    assert counts[("wait", "all")] == total


def test_usage_errors(tmp_path):
    script = _script()
    with pytest.raises(SystemExit, match="at least 1"):
        script.main(["--steps", "0"])
    with pytest.raises(SystemExit, match="no model_index.json"):
        script.main(["--base", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown device"):
        script.main(["--device", "tpu"])
