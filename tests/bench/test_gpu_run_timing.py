"""The timing the GPU scripts of benchmarks/gpu_runs budget a device call with: seconds per step and the time to
the first step, read from the training loops' logs."""

import sys
from datetime import datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_runs"))
from issue18_demo_world import seconds_per_step, startup_seconds  # noqa: E402

# the two loops' step lines (demo_world.fit and brushnet.training.loop), as the device logs have them
LOG = """2026-11-27 18:48:32,592 demo_world stage base
2026-11-27 18:50:09,318 demo_world.fit base step 50/100 loss 0.7440 lr 1.50e-04 (0.18 s/step)
2026-11-27 18:50:17,051 demo_world.fit base step 100/100 loss 0.5221 lr 3.00e-04 (0.17 s/step)
"""
BRANCH_LOG = """2026-11-27 03:07:09,833 brushnet.training.loop training steps 1 to 4000: batch 32 per device
2026-11-27 03:07:16,486 brushnet.training.loop step 50: loss=0.08554, lr=0.0009999, skipped_samples=0
2026-11-27 03:08:03,988 brushnet.training.loop step 500: loss=0.1344, lr=0.0009645, skipped_samples=0
"""


def test_seconds_per_step_and_startup_from_a_log(tmp_path):
    log = tmp_path / "cal.log"
    log.write_text(LOG)
    speed = seconds_per_step(log, 50, 100)
    assert speed == pytest.approx(7.733 / 50)
    launched = datetime(2026, 11, 27, 18, 48, 30)
    # 99.318 s to step 50, of which 50 steps at the measured speed
    assert startup_seconds(log, launched, speed) == pytest.approx(99.318 - 7.733)
    assert startup_seconds(log, launched, speed, step=150) is None
    assert seconds_per_step(log, 50, 150) is None

    branch = tmp_path / "branch.log"
    branch.write_text(BRANCH_LOG)
    speed = seconds_per_step(branch, 50, 500)
    assert speed == pytest.approx(47.502 / 450)
    assert startup_seconds(branch, datetime(2026, 11, 27, 3, 7, 0), speed) == pytest.approx(
        16.486 - 50 * speed
    )
    # a clock that says the step came first is counted as no startup, never as negative time
    assert startup_seconds(branch, datetime(2026, 11, 27, 3, 7, 16), speed) == 0.0


def test_read_calibration_records_speed_and_startup_or_refuses_a_short_log(tmp_path):
    from issue18_demo_world import read_calibration

    (tmp_path / "cal_control.log").write_text(LOG)
    (tmp_path / "cal_level4.log").write_text(LOG.replace("18:50:17,051", "18:50:19,551"))
    summary = {}
    speed, startup = read_calibration(
        tmp_path, ["control", "level4"], 100, datetime(2026, 11, 27, 18, 48, 30), summary
    )
    assert speed == pytest.approx({"control": 7.733 / 50, "level4": 10.233 / 50})
    assert startup == pytest.approx(99.318 - 7.733)  # the longer of the two times to a first step
    assert summary["calibration_seconds_per_step"] == speed
    assert summary["calibration_startup_seconds"] == round(startup, 1)
    (tmp_path / "cal_short.log").write_text(LOG.splitlines()[0] + "\n")
    assert read_calibration(tmp_path, ["control", "short"], 100, datetime(2026, 11, 27), {}) is None
