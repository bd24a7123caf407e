"""``bench speed`` reports progress as one short line per combination, not raw Python dicts before its table
(issue 19, stumble 9)."""

import logging

from brushnet.bench.speed import measure_speed


def test_progress_lines_are_short_and_readable(tiny_models, caplog):
    with caplog.at_level(logging.INFO, logger="brushnet.bench.speed"):
        records = measure_speed(["brushnet"], tiny_models, resolutions=[32], steps=[2], repeats=1)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == [
        f"brushnet fp32 32px 2 steps (branch once): {records[0]['seconds_per_image']:.2f} s/image"
    ]
    assert not any("{" in line for line in lines)
