"""What every command does before its work (issue 19, stumbles 1 and 9): bounded CPU threads, and a console
without library noise."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from brushnet.cli import app
from brushnet.cli.common import Runtime, available_cpus

runner = CliRunner()


def _python(code: str, env: dict | None = None) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    environment.update(env or {})
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True
    )
    return result.stdout.strip()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_threads_follow_the_cpus_the_process_may_use():
    # one CPU allowed: one intra-op thread, one inter-op thread, and OpenMP threads that sleep while waiting;
    # OMP_NUM_THREADS wins over the CPU count, --threads over both
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "import brushnet.cli, torch\n"
        "from brushnet.cli.common import Runtime, available_cpus\n"
        "Runtime().apply()\n"
        "found = [available_cpus(), torch.get_num_threads(), torch.get_num_interop_threads()]\n"
        "os.environ['OMP_NUM_THREADS'] = '3'\n"
        "Runtime().apply(); found.append(torch.get_num_threads())\n"
        "Runtime(threads=2).apply(); found.append(torch.get_num_threads())\n"
        "print(*found, os.environ['OMP_WAIT_POLICY'])"
    )
    assert _python(code) == "1 1 1 3 2 PASSIVE"


def test_available_cpus_is_bounded_by_the_affinity_mask():
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


def test_threads_flag_is_checked_and_applied():
    before = torch.get_num_threads()
    try:
        Runtime(threads=2).apply()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        Runtime(threads=0).apply()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        root / "i.png"
    )
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(root / "m.png")
    return root


def test_quiet_command_prints_only_its_result(tiny_models, files, tmp_path):
    """A fresh process (the library warnings fire once per process): no torchvision lines, no loading bars."""
    command = [sys.executable, "-m", "brushnet.cli", "inpaint", "--base", str(tiny_models["base"])]
    command += [
        "--brushnet",
        str(tiny_models["brushnet"]),
        "-i",
        str(files / "i.png"),
        "-m",
        str(files / "m.png"),
    ]
    command += ["-o", str(tmp_path / "o.png"), "--steps", "1", "--seed", "1", "-q"]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "o.png")
    assert result.stderr.strip().startswith("seed 1, ") and result.stderr.count("\n") == 1, result.stderr


def test_library_noise_is_dropped_and_nothing_else():
    from transformers import CLIPTokenizer

    from brushnet.cli.common import silence_library_noise
    from brushnet.random_models import _TOKENIZER_DIR

    silence_library_noise()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    library = logging.getLogger("transformers")
    library.addHandler(handler)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(_TOKENIZER_DIR)
        tokenizer(
            "a red circle " * 40
        )  # longer than the model's 77 tokens, not truncated: transformers warns
        logging.getLogger("transformers.utils.import_utils").warning("something else")
    finally:
        library.removeHandler(handler)
    assert not any("indexing errors" in message for message in seen)
    assert "something else" in seen


def test_no_empty_progress_bar_before_an_error(tiny_models, files, tmp_path):
    """The step bar draws nothing until the first step, so a failure before it is one clean line."""
    args = ["compare", "--methods", "brushnet", "--base", str(tiny_models["base"]), "--brushnet"]
    args += [str(tiny_models["base"] / "unet"), "-i", str(files / "i.png"), "-m", str(files / "m.png")]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "g.png"), "--steps", "1"])
    assert result.exit_code == 1
    assert "step" not in result.output, result.output  # no "brushnet:   0%| 0/1 [...step/s]" glued to it
    assert "failed: brushnet: " in result.output
