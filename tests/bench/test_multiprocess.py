"""Sharding across real processes: `accelerate launch --multi_gpu --num_processes 2` (on a CPU-only machine
it starts two torchrun processes that join a gloo group), and two independent
`--num-shards 2 --shard-index k` processes running at the same time, each give the rows and images that
one process gives. Both start fresh Python processes (torch + diffusers imports on a 2-core machine take
over 5 s), so they are marked slow: `python -m pytest -m slow tests/bench/test_multiprocess.py`."""

import os
import subprocess
import sys

import pytest
from PIL import Image

from brushnet.bench.datasets import load_dataset
from brushnet.bench.report import load_rows
from brushnet.bench.runner import BenchSettings, run_benchmark

pytestmark = pytest.mark.slow

METHODS = ["brushnet", "blended-latent-diffusion"]
STEPS = 2


@pytest.fixture(scope="module")
def three_image_set(tmp_path_factory):
    from brushnet.data.shapes_writers import write_eval_set

    out = tmp_path_factory.mktemp("shapes3")
    write_eval_set(out, num_scenes=3, size=64, seed=5)  # 3 images: shards of 2 and 1
    return out


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, tiny_models, three_image_set):
    run_dir = tmp_path_factory.mktemp("single")
    run_benchmark(METHODS, tiny_models, load_dataset(three_image_set), run_dir, BenchSettings(steps=STEPS))
    return run_dir


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    return env


def _run_args(dataset, run_dir, models):
    return ["--methods", ",".join(METHODS), "--dataset", str(dataset), "--output", str(run_dir),
            "--steps", str(STEPS), "--base", models.base, "--brushnet", models.brushnet]  # fmt: skip


def _assert_same_as_single(run_dir, single_dir):
    def comparable(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    rows = load_rows(run_dir)
    assert len(rows) == len(METHODS) * 3 * 2
    assert comparable(rows) == comparable(load_rows(single_dir))
    for row in rows:  # same pixels (the raw PNGs' metadata differ in their timings)
        with Image.open(run_dir / row["output"]) as ours, Image.open(single_dir / row["output"]) as single:
            assert ours.tobytes() == single.tobytes(), row["output"]


def test_accelerate_launch_two_processes(tmp_path, tiny_models, three_image_set, single_process_run):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "brushnet.bench.run", *_run_args(three_image_set, run_dir, tiny_models)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # each process took its own slice (items 0, 2 and item 1), for every method
    assert "inside: shard 0/2: 4 generated, 0 skipped" in result.stderr
    assert "inside: shard 1/2: 2 generated, 0 skipped" in result.stderr
    # the main process merged both shards into one report, after both were done
    assert result.stdout.count("## inside-inpainting") == 1
    assert "| brushnet | raw | 3 |" in result.stdout
    assert (run_dir / "results" / "per_image.jsonl").read_text().count("\n") == len(METHODS) * 3 * 2
    _assert_same_as_single(run_dir, single_process_run)


def test_two_independent_shard_processes(tmp_path, tiny_models, three_image_set, single_process_run):
    run_dir = tmp_path / "run"
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "brushnet.bench.run",
                *_run_args(three_image_set, run_dir, tiny_models),
                "--num-shards",
                "2",
                "--shard-index",
                str(index),
                "--no-report",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )  # fmt: skip
        for index in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    assert not (run_dir / "results").exists()  # --no-report: nothing merged yet
    _assert_same_as_single(run_dir, single_process_run)
