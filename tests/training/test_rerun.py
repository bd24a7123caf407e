"""Rerunning a finished run says it is finished and trains nothing (issue 19, stumble 10: it logged
"training 6 steps" and then did nothing)."""

import logging

from brushnet.training import loop
from brushnet.training.config import make_config


def test_a_rerun_of_a_finished_run_says_already_finished(base_config, caplog):
    config = make_config({**base_config, "max_train_steps": 2, "resume_from_checkpoint": "latest"})
    with caplog.at_level(logging.INFO, logger="brushnet.training.loop"):
        first = loop.train(config)
    assert first.global_step == 2 and len(first.losses) == 2
    assert "training steps 1 to 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="brushnet.training.loop"):
        again = loop.train(config)
    assert again.global_step == 2 and again.losses == []  # nothing trained
    assert "already finished" in caplog.text and "at step 2 of 2" in caplog.text
    assert "training steps" not in caplog.text
