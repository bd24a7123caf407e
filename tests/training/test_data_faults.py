"""Training data faults are one line and exit 2 (issue 19 "Training"): an empty or missing shard path and a
brace pattern that matches nothing are refused before any model loads; shards with no usable sample say so,
with the reasons the samples were skipped."""

import io
import tarfile

import pytest

from brushnet.training.entry import main


def _train(capsys, tmp_path, base, *flags):
    argv = ["--pretrained_model_name_or_path", str(base), "--output_dir", str(tmp_path / "run")]
    argv += ["--resolution", "16", "--train_batch_size", "1", "--max_train_steps", "1", "--report_to", "none"]
    status = main([*argv, *flags])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    return status, errors, err


@pytest.mark.parametrize(
    "shards, message",
    [
        ("", "--train_shards is empty"),
        ("  ", "--train_shards is empty"),
        ("{tmp}/nosuch", "--train_shards {tmp}/nosuch: no such shard file or folder"),
        ("{tmp}/nosuch.tar", "no such shard file or folder"),
        (
            "{tmp}/shards/{{00000..00003}}.tar",
            "matches no existing shard (4 paths, e.g. {tmp}/shards/00000.tar)",
        ),
        ("{tmp}/shards/*.tar", "no shards match"),
        ("{tmp}/shards", "no .tar shards in folder"),
    ],
)
def test_missing_shards_are_refused_before_loading(capsys, tmp_path, shards, message):
    (tmp_path / "shards").mkdir()
    # a base that cannot load: an error found after loading would name it instead
    status, errors, err = _train(
        capsys, tmp_path, tmp_path / "no-base", "--train_shards", shards.format(tmp=tmp_path)
    )
    assert status == 2 and len(errors) == 1, err
    assert message.format(tmp=tmp_path) in errors[0] and "no-base" not in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_some_missing_shards_are_named(capsys, tmp_path, shards):
    present = shards.paths[0]
    spec = f"{present.parent}/{{{present.stem},nosuch}}.tar"
    status, errors, _ = _train(capsys, tmp_path, tmp_path / "no-base", "--train_shards", spec)
    assert status == 2 and "1 of its 2 shards do not exist (first: " in errors[0]


def test_a_missing_image_folder_is_refused_before_loading(capsys, tmp_path):
    status, errors, _ = _train(
        capsys, tmp_path, tmp_path / "no-base", "--train_data_dir", str(tmp_path / "nope")
    )
    assert status == 2 and errors == [f"error: --train_data_dir {tmp_path / 'nope'} is not a folder"]


def test_shards_without_a_usable_sample_say_why(capsys, tmp_path, tiny_base):
    folder = tmp_path / "bad"
    folder.mkdir()
    with tarfile.open(folder / "bad-00000.tar", "w") as tar:
        for index in range(3):
            data = b"not an image"
            info = tarfile.TarInfo(f"{index:05d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    status, errors, err = _train(capsys, tmp_path, tiny_base, "--train_shards", str(folder))
    assert status == 2 and len(errors) == 1, err
    assert "no usable sample: every sample read was malformed (3 missing_field)" in errors[0]
    assert "Traceback" not in err
