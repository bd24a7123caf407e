"""``brushnet train`` bounds torch's threads like the other commands, sharing the CPUs among the processes of
one machine (issue 19, stumble 1)."""

import torch

from brushnet.cli import common
from brushnet.training.entry import bound_threads


def test_training_threads_share_the_cpus_among_local_processes(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(common, "available_cpus", lambda: 8)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert bound_threads() == 2 and torch.get_num_threads() == 2
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        assert bound_threads() == 8
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert bound_threads() == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
