"""train, make-tiny-models, data/shapes writers and bench: bad input is one ``error:`` line (exit 2) found before
any model is built or loaded, no user file is replaced, and a refused run leaves nothing behind."""

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from brushnet.cli import app

runner = CliRunner()


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _one_error(result) -> str:
    """The single ``error:`` line of a refused command (exit 2, nothing else on its output)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "in" / "img.png"
    path.parent.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(path)
    return path


# -- train -----------------------------------------------------------------------------------------------


def _train(capsys, base, output_dir, *flags):
    from brushnet.training.entry import main

    argv = ["--pretrained_model_name_or_path", str(base), "--output_dir", str(output_dir)]
    argv += ["--train_batch_size", "1", "--max_train_steps", "1", "--report_to", "none", *flags]
    status = main(argv)
    err = capsys.readouterr().err
    return status, _errors(err), err


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory):
    from brushnet.data.synthetic import write_synthetic_shards

    return write_synthetic_shards(tmp_path_factory.mktemp("ds"), 1, 2, size=24, seed=0).paths[0].parent


def test_train_resolution_the_vae_cannot_encode_is_refused_before_loading(
    capsys, tmp_path, tiny_models, train_shards
):
    status, errors, err = _train(
        capsys,
        tiny_models["base"],
        tmp_path / "run",
        "--train_shards",
        str(train_shards),
        "--resolution",
        "7",
    )
    assert status == 2 and len(errors) == 1, err
    assert "--resolution 7 is not a multiple of 8" in errors[0] and "smallest valid value is 8" in errors[0]
    assert "Traceback" not in err and "Loading" not in err and not (tmp_path / "run").exists()


def test_train_resolution_rule_follows_the_vae(tmp_path, golden_dir):
    from brushnet.training.config import ConfigError, check_resolution, make_config, vae_scale_factor

    def config(base, resolution):
        return make_config(
            {"pretrained_model_name_or_path": str(base), "train_shards": "s", "resolution": resolution}
        )

    assert vae_scale_factor(golden_dir) == 2  # a two-level VAE
    check_resolution(config(golden_dir, 6))
    with pytest.raises(ConfigError, match="not a multiple of 2"):
        check_resolution(config(golden_dir, 7))
    assert vae_scale_factor(tmp_path / "nowhere") == 8  # unreadable here (hub id, single file): SD's factor
    with pytest.raises(ConfigError, match=r"nearest 496 or 504"):
        check_resolution(config(tmp_path / "nowhere", 500))


def test_the_training_functions_check_the_resolution_too(tmp_path, tiny_models):
    """``brushnet.training.loop.train`` (the Python API, what the demo world's stages call) refuses the resolution
    the command refuses, before the output folder is made."""
    from brushnet.training.config import ConfigError, make_config
    from brushnet.training.loop import train

    config = make_config(
        {
            "pretrained_model_name_or_path": str(tiny_models["base"]),
            "train_shards": "s",
            "resolution": 7,
            "output_dir": str(tmp_path / "run"),
        }
    )
    with pytest.raises(ConfigError, match="--resolution 7 is not a multiple of"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_train_at_the_smallest_valid_resolution_runs(capsys, tmp_path, tiny_models, train_shards):
    status, errors, err = _train(
        capsys,
        tiny_models["base"],
        tmp_path / "run",
        "--train_shards",
        str(train_shards),
        "--resolution",
        "8",
    )
    assert status == 0 and not errors, err
    assert (tmp_path / "run" / "brushnet").is_dir()


@pytest.mark.parametrize("case", ["empty folder", "no images, brush masks"])
def test_train_folder_data_errors_leave_no_output_folder(capsys, tmp_path, train_shards, case):
    data = tmp_path / "empty"
    data.mkdir()
    flags = (
        ["--train_data_dir", str(data)] if case == "empty folder" else ["--train_data_dir", str(train_shards)]
    )
    if case != "empty folder":
        flags += ["--mask_mode", "brush"]
    # a base that cannot load: the data error must come first
    status, errors, err = _train(capsys, tmp_path / "no-base", tmp_path / "run", "--resolution", "16", *flags)
    assert status == 2 and len(errors) == 1 and errors[0].startswith("error: --train_data_dir: "), err
    assert ("--mask_mode brush" if case == "empty folder" else "no images") in errors[0]
    assert "no-base" not in err and not (tmp_path / "run").exists()


def test_train_error_after_startup_removes_only_what_the_run_wrote(capsys, tmp_path, tiny_models):
    """Shards with no usable sample are found only when read (after train_config.yaml and the tracker folder are
    written): a run that created its output folder removes it; a folder that held files keeps exactly those."""
    from brushnet.data.synthetic import write_synthetic_shards

    bad = write_synthetic_shards(tmp_path / "bad", 1, 2, size=24, seed=0, malformed=2).paths[0].parent
    flags = ["--train_shards", str(bad), "--resolution", "16", "--report_to", "tensorboard"]
    status, errors, err = _train(capsys, tiny_models["base"], tmp_path / "new" / "run", *flags)
    assert status == 2 and len(errors) == 1 and "yielded no batch" in errors[0], err
    assert not (tmp_path / "new").exists()

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    status, errors, err = _train(capsys, tiny_models["base"], kept, *flags)
    assert status == 2 and "yielded no batch" in errors[0], err
    assert [p.name for p in kept.iterdir()] == ["notes.txt"] and (kept / "notes.txt").read_text() == "mine"


def test_a_resume_refused_at_startup_puts_back_the_config_it_replaced(capsys, tmp_path, tiny_models):
    """The loop writes the resolved config before it reads the checkpoint; a resume refused then (here: the
    checkpoint's training state is malformed) left the folder's train_config.yaml replaced by this run's."""
    from brushnet.data.synthetic import write_synthetic_shards

    shards = write_synthetic_shards(tmp_path / "shards", 1, 8, size=24, seed=0).paths[0].parent
    run = tmp_path / "run"
    flags = ["--train_shards", str(shards), "--resolution", "16", "--max_train_steps", "2",
             "--checkpointing_steps", "2", "--seed", "5"]  # fmt: skip
    status, errors, err = _train(capsys, tiny_models["base"], run, *flags)
    assert status == 0, err
    before = (run / "train_config.yaml").read_bytes()
    (run / "checkpoint-2" / "training_state.json").write_text("{}")
    status, errors, err = _train(capsys, tiny_models["base"], run, *flags[:-2], "--seed", "6",
                                 "--learning_rate", "0.5", "--resume_from_checkpoint", "latest")  # fmt: skip
    assert status == 2 and "malformed" in errors[0], err
    assert (run / "train_config.yaml").read_bytes() == before


def _fake_train(output: Path, error: BaseException, checkpoint: bool = False, start: bool = False):
    def train(config, on_start=None):
        output.mkdir(parents=True, exist_ok=True)
        (output / "train_config.yaml").write_text("x: 1\n")
        (output / "logs").mkdir()
        if checkpoint:
            (output / "checkpoint-1").mkdir()
        if start:  # the startup checks passed: the loop says so, then fails in training
            on_start()
        raise error

    return train


def test_train_unexpected_error_is_one_line_and_leaves_no_output_folder(monkeypatch, tmp_path, train_shards):
    import brushnet.training.loop as loop

    monkeypatch.setattr(loop, "train", _fake_train(tmp_path / "run", RuntimeError("Calculated padded\nsize")))
    monkeypatch.delenv("BRUSHNET_DEBUG", raising=False)
    result = runner.invoke(app, ["train", "--pretrained_model_name_or_path", "b", "--output_dir",
                                 str(tmp_path / "run"), "--train_shards", str(train_shards)])  # fmt: skip
    assert result.exit_code == 1
    assert _errors(result.output) == [
        "error: internal error: RuntimeError: Calculated padded (set BRUSHNET_DEBUG=1 for details)"
    ]
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_train_error_after_a_checkpoint_keeps_the_output_folder(capsys, monkeypatch, tmp_path, train_shards):
    import brushnet.training.loop as loop
    from brushnet.errors import InputError

    run = tmp_path / "run"
    monkeypatch.setattr(loop, "train", _fake_train(run, InputError("late"), checkpoint=True))
    status, errors, _ = _train(capsys, "b", run, "--train_shards", str(train_shards))
    assert status == 2 and errors == ["error: late"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1", "logs", "train_config.yaml"]


def test_train_error_after_the_start_keeps_the_output_folder(capsys, monkeypatch, tmp_path, train_shards):
    import brushnet.training.loop as loop
    from brushnet.errors import InputError

    run = tmp_path / "run"
    monkeypatch.setattr(loop, "train", _fake_train(run, InputError("late"), start=True))
    status, errors, _ = _train(capsys, "b", run, "--train_shards", str(train_shards))
    assert status == 2 and errors == ["error: late"]
    assert sorted(p.name for p in run.iterdir()) == ["logs", "train_config.yaml"]  # a failed run's logs stay


def test_the_loop_calls_on_start_once_after_its_checks(tmp_path, tiny_models, train_shards):
    from brushnet.training.config import make_config
    from brushnet.training.loop import train

    calls = []
    config = {
        "pretrained_model_name_or_path": str(tiny_models["base"]),
        "train_shards": str(train_shards),
        "resolution": 8,
        "max_train_steps": 1,
        "train_batch_size": 1,
        "output_dir": str(tmp_path / "run"),
    }
    train(make_config(config), on_start=lambda: calls.append("started"))
    assert calls == ["started"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--bogus", "1"], "error: unknown flag --bogus (--help lists the flags)"),
        (["--learnig_rate", "1"], "error: unknown flag --learnig_rate (did you mean --learning_rate?)"),
        (
            ["--mixed_precision", "fp8"],
            "error: argument --mixed_precision: invalid choice: 'fp8' (choose from 'no', 'fp16', 'bf16')",
        ),
        (["--resolution", "big"], "error: argument --resolution: invalid int value: 'big'"),
    ],
)
def test_train_usage_errors_are_one_line(tmp_path, flags, message):
    result = runner.invoke(app, ["train", "--output_dir", str(tmp_path / "run"), *flags])
    assert _one_error(result).startswith(message)
    assert "usage:" not in result.output and not (tmp_path / "run").exists()


def test_train_help_stays_full():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "--mixed_precision" in result.output and result.output.count("\n") > 50


@pytest.mark.parametrize("inside", [False, True])
def test_train_output_dir_that_is_a_file_is_refused(capsys, tmp_path, image_file, train_shards, inside):
    output = image_file / "run" if inside else image_file
    status, errors, _ = _train(capsys, "b", output, "--train_shards", str(train_shards))
    assert status == 2 and len(errors) == 1 and errors[0].startswith(f"error: --output_dir {output}")
    assert "is a file, not a folder" in errors[0]


# -- make-tiny-models ------------------------------------------------------------------------------------


def test_make_tiny_models_refuses_a_folder_holding_models(tmp_path):
    weights = tmp_path / "tiny" / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"my weights")
    line = _one_error(runner.invoke(app, ["make-tiny-models", str(tmp_path / "tiny")]))
    assert f"{tmp_path / 'tiny'} already holds base/" in line and "new or empty folder" in line
    assert weights.read_bytes() == b"my weights"
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["base"]  # nothing else was built
    assert "or pass --overwrite" in line
    result = runner.invoke(app, ["make-tiny-models", str(tmp_path / "tiny"), "--overwrite"])
    assert result.exit_code == 0 and weights.read_bytes() != b"my weights"  # asked for: replaced


@pytest.mark.parametrize("below", ["", "sub"])
def test_make_tiny_models_into_a_file_names_the_problem(image_file, below):
    target = image_file / below if below else image_file
    line = _one_error(runner.invoke(app, ["make-tiny-models", str(target)]))
    assert line.startswith(f"error: cannot write models into {target}: not a folder")
    assert "Errno" not in line


def test_build_model_set_failure_leaves_nothing_and_overwrite_replaces(monkeypatch, tmp_path):
    import brushnet.random_models as random_models

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(random_models, "build_random_brushnet", broken)
    with pytest.raises(OSError, match="disk full"):
        random_models.build_model_set(tmp_path / "new" / "set", ["base", "brushnet"])
    assert not (tmp_path / "new").exists()  # the base built before the failure is gone too

    monkeypatch.undo()
    folder = tmp_path / "set"
    (folder / "base").mkdir(parents=True)
    (folder / "base" / "stale.bin").write_bytes(b"old")
    paths = random_models.build_model_set(folder, ["base"], overwrite=True)
    assert (Path(paths["base"]) / "model_index.json").is_file() and not (
        folder / "base" / "stale.bin"
    ).exists()


# -- data make-synthetic / shapes make-train / make-eval ----------------------------------------------


SYNTHETIC = ["data", "make-synthetic", "--samples-per-shard", "2", "--size", "16"]


def test_make_eval_refuses_a_folder_holding_a_set_and_overwrite_replaces_it(tmp_path):
    """A second eval set into the same folder replaced mapping_file.json and left the first set's other images
    beside the new ones."""
    out = tmp_path / "eval"
    make = ["shapes", "make-eval", str(out), "--size", "64"]
    assert runner.invoke(app, [*make, "-n", "3"]).exit_code == 0
    first = sorted(p.name for p in (out / "images").iterdir())
    mapping = (out / "mapping_file.json").read_bytes()
    line = _one_error(runner.invoke(app, [*make, "-n", "1", "--seed", "5"]))
    assert "already holds an evaluation set (mapping_file.json, images)" in line and "--overwrite" in line
    assert (out / "mapping_file.json").read_bytes() == mapping
    assert runner.invoke(app, [*make, "-n", "1", "--seed", "5", "--overwrite"]).exit_code == 0
    assert len(list((out / "images").iterdir())) < len(first)  # none of the first set's images is left
    assert (out / "mapping_file.json").read_bytes() != mapping


def test_make_synthetic_refuses_a_folder_with_shards_and_overwrite_replaces_them(tmp_path):
    out = tmp_path / "ds"
    assert runner.invoke(app, [*SYNTHETIC, "--out", str(out), "--shards", "3"]).exit_code == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    line = _one_error(runner.invoke(app, [*SYNTHETIC, "--out", str(out), "--shards", "1", "--seed", "5"]))
    assert "already holds 3 .tar shards" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # untouched

    result = runner.invoke(
        app, [*SYNTHETIC, "--out", str(out), "--shards", "1", "--seed", "5", "--overwrite"]
    )
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["shard-00000.tar"]  # no shard of the first set is left
    assert (out / "shard-00000.tar").read_bytes() != first["shard-00000.tar"]


def test_make_synthetic_checks_flags_before_touching_old_shards(tmp_path):
    out = tmp_path / "ds"
    assert runner.invoke(app, [*SYNTHETIC, "--out", str(out), "--shards", "2"]).exit_code == 0
    line = _one_error(runner.invoke(app, [*SYNTHETIC, "--out", str(out), "--malformed", "99", "--overwrite"]))
    assert line.startswith("error: --malformed must be between 0 and 4")
    assert len(list(out.glob("*.tar"))) == 2
    assert _one_error(runner.invoke(app, [*SYNTHETIC, "--out", str(tmp_path / "n"), "--shards", "0"])) == (
        "error: --shards must be at least 1, got 0"
    )
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize("below", ["", "sub"])
def test_make_synthetic_into_a_file_names_the_problem(image_file, below):
    target = image_file / below if below else image_file
    line = _one_error(runner.invoke(app, [*SYNTHETIC, "--out", str(target)]))
    assert line.startswith(f"error: --out {target} is not a folder") and "Errno" not in line


def test_make_synthetic_failure_removes_what_it_wrote(monkeypatch, tmp_path):
    import brushnet.data.synthetic as synthetic

    real, calls = synthetic._write_tar, []

    def second_fails(path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real(path, *args)

    monkeypatch.setattr(synthetic, "_write_tar", second_fails)
    line = _one_error(runner.invoke(app, [*SYNTHETIC, "--out", str(tmp_path / "a" / "ds"), "--shards", "3"]))
    assert "No space left" in line and not (tmp_path / "a").exists()


def test_shapes_make_train_refuses_a_folder_with_shards(tmp_path):
    out = tmp_path / "s"
    args = ["shapes", "make-train", str(out), "--size", "32", "--scenes-per-shard", "1"]
    assert runner.invoke(app, [*args, "-n", "3"]).exit_code == 0
    line = _one_error(runner.invoke(app, [*args, "-n", "1"]))
    assert "already holds 3 .tar shards" in line and len(list(out.iterdir())) == 3
    assert runner.invoke(app, [*args, "-n", "1", "--overwrite"]).exit_code == 0
    assert [p.name for p in out.iterdir()] == ["shapes-000000.tar"]
    (out / "mine.tar").write_bytes(b"")
    line = _one_error(runner.invoke(app, [*args, "-n", "1", "--overwrite"]))
    assert "did not write (mine.tar)" in line and (out / "shapes-000000.tar").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["make-train", "{out}", "-n", "0"], "error: --num-scenes must be at least 1, got 0"),
        (["make-train", "{out}", "--scenes-per-shard", "0"], "error: --scenes-per-shard must be at least 1"),
        (["make-eval", "{out}", "--different-object", "2"], "error: --different-object must be in [0, 1]"),
        (["make-eval", "{out}", "--size", "8"], "error: --size must be at least 32, got 8"),
        (
            ["make-eval", "{out}", "--removal", "--different-object", "0.5"],
            "error: --removal prompts for no object",
        ),
    ],
)
def test_shapes_errors_name_the_flags(tmp_path, args, message):
    line = _one_error(runner.invoke(app, ["shapes", *[a.format(out=tmp_path / "o") for a in args]]))
    assert line.startswith(message) and not (tmp_path / "o").exists()


# -- bench -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resolutions", "abc"], "error: --resolutions takes comma-separated whole numbers, got 'abc'"),
        (["--resolutions", "0"], "error: --resolutions must be whole numbers of at least 1, got 0"),
        (["--steps", "2,-1"], "error: --steps must be whole numbers of at least 1, got -1"),
        (["--repeats", "0"], "error: --repeats must be at least 1, got 0"),
        (["--dtype", "fp8"], "error: --dtype: unknown dtype 'fp8'"),
        (["--cfg-branch", "twice"], "error: --cfg-branch: unknown mode 'twice'"),
        (
            ["--output", "{img}/x.json"],
            "error: --output: cannot write {img}/x.json: {img} is a file, not a folder",
        ),
    ],
)
def test_bench_speed_bad_flags_are_refused_before_building(tmp_path, image_file, flags, message):
    flags = [flag.format(img=image_file) for flag in flags]
    args = [
        "bench",
        "speed",
        "--methods",
        "brushnet",
        "--random-weights",
        "tiny",
        "--weights-dir",
        str(tmp_path / "w"),
    ]
    line = _one_error(runner.invoke(app, [*args, *flags]))
    assert line.startswith(message.format(img=image_file))
    assert not (tmp_path / "w").exists()  # nothing was built


@pytest.mark.parametrize("fails", [False, True])
def test_bench_speed_removes_its_temporary_weights(monkeypatch, tmp_path, fails):
    import tempfile

    import brushnet.bench.speed as speed
    from brushnet.errors import InputError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    def measure(names, paths, **kwargs):
        seen.append(Path(paths.base))
        assert Path(paths.base, "model_index.json").is_file()  # the models were built in the temp folder
        if fails:
            raise InputError("measuring failed")
        return []

    monkeypatch.setattr(speed, "measure_speed", measure)
    args = ["bench", "speed", "--methods", "brushnet", "--random-weights", "tiny", "--resolutions", "16"]
    result = runner.invoke(app, args)
    assert result.exit_code == (2 if fails else 0), result.output
    assert seen and seen[0].is_relative_to(tmp_path) and seen[0].parts[-3].startswith("brushnet-speed-")
    assert not list(tmp_path.glob("brushnet-speed-*"))


def test_bench_speed_output_replaces_only_its_own_records(monkeypatch, tmp_path):
    """``--output`` over a file that is not an earlier ``bench speed`` record is refused before anything is built
    (it was replaced); an earlier record is replaced, and ``--overwrite`` replaces anything."""
    import brushnet.bench.speed as speed

    monkeypatch.setattr(speed, "measure_speed", lambda names, paths, **kwargs: [])
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    args = ["bench", "speed", "--methods", "brushnet", "--random-weights", "tiny", "--resolutions", "16"]
    args += ["--weights-dir", str(tmp_path / "w")]
    line = _one_error(runner.invoke(app, [*args, "--output", str(mine)]))
    assert line.startswith(f"error: --output {mine} exists and is not a `bench speed` record")
    assert mine.read_text() == '{"my": "notes"}' and not (tmp_path / "w").exists()
    record = tmp_path / "speed.json"
    assert runner.invoke(app, [*args, "--output", str(record)]).exit_code == 0
    assert runner.invoke(app, [*args, "--output", str(record)]).exit_code == 0  # its own record: replaced
    assert runner.invoke(app, [*args, "--output", str(mine), "--overwrite"]).exit_code == 0
    assert json.loads(mine.read_text())["records"] == []


def test_bench_run_bad_shard_is_refused_first(tmp_path):
    args = ["bench", "run", "--dataset", str(tmp_path), "--output", str(tmp_path / "run")]
    line = _one_error(runner.invoke(app, [*args, "--shard-index", "-1", "--num-shards", "2"]))
    assert line == "error: --shard-index must be between 0 and 1 (--num-shards 2), got -1"
    line = _one_error(runner.invoke(app, [*args, "--shard-index", "0", "--num-shards", "0"]))
    assert line == "error: --num-shards must be at least 1, got 0"
    assert not (tmp_path / "run").exists()


def test_bench_run_dataset_that_is_an_image_names_the_flag(tmp_path, image_file):
    args = ["bench", "run", "--dataset", str(image_file), "--output", str(tmp_path / "run")]
    line = _one_error(runner.invoke(app, args))
    assert line.startswith(f"error: --dataset {image_file}: {image_file} is not a brushbench mapping file")
    assert "codec" not in line and not (tmp_path / "run").exists()


def test_make_tiny_models_says_how_to_run_hd_painter_on_the_tiny_unet(tmp_path):
    """The tiny UNet has no cross-attention at 1/4 of the latent size, which HD-Painter's RASG reads: a note on
    stderr says so (stdout keeps one ``<folder>  (--flag)`` line per model, which scripts parse)."""
    import re

    result = runner.invoke(app, ["make-tiny-models", str(tmp_path / "tiny")])
    assert result.exit_code == 0, result.output
    assert all(re.fullmatch(r"\S+  \(--[a-z-]+\)", line) for line in result.stdout.splitlines())
    assert "run hd-painter on these models with --option rasg=false" in result.stderr
