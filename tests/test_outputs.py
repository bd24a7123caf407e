"""Output faults (issue 19 "Outputs", stumble 7): a read-only folder, a full disk or a folder in the way is one
line and exit 2 for ``inpaint``, ``compare`` and ``demo``, with no stray temporary file; outputs get the
permissions the umask gives (0644 with umask 022), not a temporary file's 0600.

The read-only folder and the full disk are real file systems (small tmpfs mounts) where this process may
mount them (root); elsewhere the read-only case uses a folder without write permission and the full-disk case
is skipped (``tests/test_cli_data_safety.py`` covers a failed write with an injected ENOSPC everywhere)."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brushnet.cli import app

runner = CliRunner()
FAST = ["--steps", "1", "--seed", "3", "-q"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        root / "i.png"
    )
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(root / "m.png")
    return root


def _mount(path: Path, options: str) -> Path:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    return path


@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be written into: a read-only tmpfs (root), else a folder without write permission."""
    path = tmp_path / "read-only"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path, "permission denied"
        path.chmod(0o755)
        return
    yield _mount(path, "ro,size=16k"), "read-only file system"
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def full_disk(tmp_path):
    """A file system with no byte left (a filled 64 kB tmpfs)."""
    path = _mount(tmp_path / "full", "size=64k")
    try:
        with open(path / "filler", "wb") as handle:
            while True:
                handle.write(b"\0" * 1024)
                handle.flush()
    except OSError:
        pass
    yield path
    subprocess.run(["umount", str(path)], check=True)


def _commands(tiny_models, files, folder: Path) -> dict[str, list[str]]:
    models = ["--base", str(tiny_models["base"]), "--brushnet", str(tiny_models["brushnet"])]
    inputs = ["-i", str(files / "i.png"), "-m", str(files / "m.png")]
    return {
        "inpaint": ["inpaint", *models, *inputs, "-o", str(folder / "out.png"), *FAST],
        "compare": [
            "compare",
            "--methods",
            "brushnet",
            *models,
            *inputs,
            "-o",
            str(folder / "grid.png"),
            *FAST,
        ],
        "demo": ["demo", "--methods", "brushnet", "--steps", "1", "--no-table", "-o", str(folder / "demo")],
    }


def _assert_one_line(result, message):
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write" in errors[0] and message in errors[0], result.output
    assert "Traceback" not in result.output


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name != "filler")


@pytest.mark.parametrize("command", ["inpaint", "compare", "demo"])
def test_read_only_folder(tiny_models, files, read_only, command):
    folder, message = read_only
    _assert_one_line(runner.invoke(app, _commands(tiny_models, files, folder)[command]), message)
    assert _leftovers(folder) == []


@pytest.mark.parametrize("command", ["inpaint", "compare", "demo"])
def test_full_disk(tiny_models, files, full_disk, command):
    _assert_one_line(runner.invoke(app, _commands(tiny_models, files, full_disk)[command]), "no space left")
    assert [name for name in _leftovers(full_disk) if name.endswith(".tmp")] == []  # no stray temporary file


@pytest.mark.parametrize("command", ["inpaint", "compare", "demo"])
def test_a_folder_where_the_output_goes(tiny_models, files, tmp_path, command):
    targets = {"inpaint": "out.png", "compare": "grid.png", "demo": "demo/brushnet.png"}
    (tmp_path / targets[command]).mkdir(parents=True)
    before = _leftovers(tmp_path)
    _assert_one_line(
        runner.invoke(app, _commands(tiny_models, files, tmp_path)[command]), "a folder of that name"
    )
    assert _leftovers(tmp_path) == before


def test_outputs_get_the_umask_permissions(tiny_models, files, tmp_path):
    previous = os.umask(0o022)
    try:
        for command in ("inpaint", "demo"):
            result = runner.invoke(app, _commands(tiny_models, files, tmp_path)[command])
            assert result.exit_code == 0, result.output
    finally:
        os.umask(previous)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"out.png", "out.json", "grid.png", "brushnet.png"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o644" for p in written}


@pytest.mark.parametrize("command", ["inpaint", "compare", "demo"])
def test_a_new_folder_under_a_read_only_one(tiny_models, files, read_only, command):
    """The missing folders are not made during the check: the nearest existing one must be writable."""
    folder, message = read_only
    _assert_one_line(
        runner.invoke(app, _commands(tiny_models, files, folder / "new" / "sub")[command]), message
    )
    assert _leftovers(folder) == []
