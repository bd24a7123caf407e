"""No input is lost or overwritten, and no half-written output is left (issue 20, items 6, 7 and 10)."""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brushnet.cli import app

runner = CliRunner()
FAST = ["--steps", "1", "--guidance", "1.0", "--scheduler", "ddim", "--seed", "3", "-q"]


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    mask = np.zeros((32, 40), np.uint8)
    mask[8:24, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path


def _models(tiny_models):
    return ["--base", str(tiny_models["base"]), "--brushnet", str(tiny_models["brushnet"])]


def _inpaint(models, files, output, *extra):
    args = ["inpaint", *models, "-i", str(files / "img.png"), "-m", str(files / "mask.png")]
    return runner.invoke(app, [*args, "-o", str(output), *FAST, *extra])


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("target", ["img.png", "mask.png"])
def test_inpaint_output_naming_an_input_is_refused(tiny_models, files, target):
    before = _snapshot(files)
    result = _inpaint(_models(tiny_models), files, files / target)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "would overwrite the input" in result.output
    assert _snapshot(files) == before  # the input survives, and no sidecar was written


def test_inpaint_overwrite_flag_allows_replacing_the_input(tiny_models, files):
    original = (files / "img.png").read_bytes()
    result = _inpaint(_models(tiny_models), files, files / "img.png", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (files / "img.png").read_bytes() != original and (files / "img.json").is_file()


def test_outpaint_and_compare_refuse_to_overwrite_their_input(tiny_models, files):
    before = _snapshot(files)
    result = runner.invoke(
        app,
        ["outpaint", *_models(tiny_models), "-i", str(files / "img.png"), "-o", str(files / "img.png"),
         "--extend-left", "8", *FAST],
    )  # fmt: skip
    assert result.exit_code == 2 and "would overwrite the input" in result.output
    result = runner.invoke(
        app,
        ["compare", *_models(tiny_models), "-i", str(files / "img.png"), "-m", str(files / "mask.png"),
         "--methods", "brushnet", "-o", str(files / "mask.png"), *FAST],
    )  # fmt: skip
    assert result.exit_code == 2 and "would overwrite the input" in result.output
    assert _snapshot(files) == before


@pytest.fixture
def folders(tmp_path, files):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    image = Image.open(files / "img.png")
    image.save(images / "img0.png")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(images / "img0.jpg", quality=95)
    Image.open(files / "mask.png").save(masks / "img0.png")
    return images, masks


@pytest.mark.parametrize("which", ["images", "masks"])
def test_batch_output_naming_an_input_folder_is_refused(tiny_models, folders, which):
    images, masks = folders
    before = {folder: _snapshot(folder) for folder in folders}
    output = images if which == "images" else masks
    result = runner.invoke(
        app,
        ["batch", *_models(tiny_models), "--images", str(images), "--masks", str(masks), "-o", str(output), *FAST],
    )  # fmt: skip
    assert result.exit_code == 2
    assert f"is the --{which} folder" in result.output and result.output.count("\n") == 1
    assert {folder: _snapshot(folder) for folder in folders} == before


def test_batch_same_stem_inputs_are_both_processed(tiny_models, folders, tmp_path):
    images, masks = folders
    out = tmp_path / "out"
    args = [
        "batch",
        *_models(tiny_models),
        "--images",
        str(images),
        "--masks",
        str(masks),
        "-o",
        str(out),
        *FAST,
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 done, 0 skipped" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "img0_jpg.json",
        "img0_jpg.png",
        "img0_png.json",
        "img0_png.png",
    ]
    records = {name: json.loads((out / f"{name}.json").read_text()) for name in ("img0_jpg", "img0_png")}
    assert records["img0_jpg"]["inputs"]["image"].endswith("img0.jpg")
    assert records["img0_png"]["inputs"]["image"].endswith("img0.png")
    a, b = (np.asarray(Image.open(out / f"{name}.png")) for name in ("img0_jpg", "img0_png"))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5  # two different inputs, two different outputs
    result = runner.invoke(app, args)  # a rerun finds both done
    assert "0 done, 2 skipped" in result.output


def test_output_problems_are_one_line_and_found_before_loading(files, tmp_path):
    # model paths that do not exist: if the output were checked after loading, the error would name them
    missing = ["--base", str(tmp_path / "no-base"), "--brushnet", str(tmp_path / "no-brushnet")]
    (tmp_path / "taken.png").mkdir()
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "side").mkdir()
    (tmp_path / "side" / "out.json").mkdir()  # the sidecar's path is a folder
    cases = {
        tmp_path / "taken.png": "a folder of that name exists",
        tmp_path / "file" / "out.png": "cannot write",
        tmp_path / "side" / "out.png": "a folder of that name exists",
    }
    for output, message in cases.items():
        before = sorted(p.name for p in tmp_path.rglob("*"))
        result = _inpaint(missing, files, output)
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and message in result.output, result.output
        assert "no-base" not in result.output and "no-brushnet" not in result.output
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing left behind


def test_a_failed_image_write_leaves_no_sidecar_and_no_temporary_file(tmp_path, monkeypatch):
    from brushnet import io
    from brushnet.errors import InputError

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full_disk)
    with pytest.raises(InputError, match="no space left on the device"):
        io.save_png_with_metadata(Image.new("RGB", (8, 8)), tmp_path / "out.png", {"seed": 1})
    assert os.listdir(tmp_path) == []  # no image, no sidecar, no .tmp


def _failing_commands(tiny_models, files, target):
    """Commands that fail (each for another reason, before or while loading) with their outputs in ``target``."""
    models = _models(tiny_models)
    inputs = ["-i", str(files / "img.png"), "-m", str(files / "mask.png")]
    empty = ["-i", str(files / "img.png"), "-m", str(files / "empty.png")]
    wrong_kind = ["--base", str(tiny_models["base"]), "--brushnet", str(tiny_models["base"] / "unet")]
    return {
        "inpaint, empty mask": ["inpaint", *models, *empty, "-o", str(target / "o.png")],
        "inpaint, wrong checkpoint": ["inpaint", *wrong_kind, *inputs, "-o", str(target / "o.png")],
        "outpaint, mask grown away": ["outpaint", *models, "-i", str(files / "img.png"), "--extend-left", "8",
                                      "--mask-grow", "-100", "-o", str(target / "o.png")],
        "compare, empty mask": ["compare", "--methods", "brushnet", *models, *empty, "-o", str(target / "g.png")],
        "batch, missing models": ["batch", "--base", str(files / "no-base"), "--brushnet", str(files / "no-brush"),
                                  "--images", str(files / "images"), "--masks", str(files / "mask.png"),
                                  "-o", str(target)],
        "demo, empty mask": ["demo", *empty, "-p", "x", "--no-table", "-o", str(target)],
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        "inpaint, empty mask",
        "inpaint, wrong checkpoint",
        "outpaint, mask grown away",
        "compare, empty mask",
        "batch, missing models",
        "demo, empty mask",
    ],
)
def test_a_failed_run_leaves_no_output_folder(tiny_models, files, case):
    """The output check creates nothing (issue: failed runs left empty ``new/sub/`` folders behind)."""
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(files / "empty.png")
    (files / "images").mkdir()
    Image.open(files / "img.png").save(files / "images" / "a.png")
    before = sorted(str(p) for p in files.rglob("*"))
    args = _failing_commands(tiny_models, files, files / "new" / "sub")[case]
    if args[0] in ("inpaint", "outpaint", "compare"):
        args = [*args, *FAST]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert sorted(str(p) for p in files.rglob("*")) == before  # no `new/`


def test_a_missing_output_folder_is_created_when_the_result_is_written(tiny_models, files):
    out = files / "new" / "sub" / "o.png"
    result = _inpaint(_models(tiny_models), files, out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.json", "o.png"]


def test_the_output_check_creates_nothing_and_names_a_file_in_the_way(tmp_path):
    from brushnet.errors import InputError
    from brushnet.io import check_output_path

    assert check_output_path(tmp_path / "a" / "b" / "o.png") == tmp_path / "a" / "b" / "o.png"
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(InputError, match=r"cannot write .*o\.png: .*file is a file, not a folder"):
        check_output_path(tmp_path / "file" / "sub" / "o.png")
    with pytest.raises(InputError, match="file name too long"):
        check_output_path(tmp_path / ("x" * 300) / "o.png")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_a_json_beside_the_output_that_is_not_a_sidecar_is_refused(tiny_models, files):
    mine = files / "settings.json"
    mine.write_text('{"my": "important settings"}\n')
    missing = ["--base", str(files / "no-base"), "--brushnet", str(files / "no-brushnet")]
    for result in (
        _inpaint(missing, files, files / "settings.png"),
        runner.invoke(app, ["outpaint", *missing, "-i", str(files / "img.png"), "--extend-left", "8",
                            "-o", str(files / "settings.png"), *FAST]),
        runner.invoke(app, ["compare", "--methods", "brushnet", *missing, "-i", str(files / "img.png"),
                            "-m", str(files / "mask.png"), "-o", str(files / "settings.png"), *FAST]),
    ):  # fmt: skip
        assert result.exit_code == 2, result.output
        assert (
            result.output.count("\n") == 1
            and "settings.json exists and is not a brushnet sidecar" in result.output
        )
        assert "no-base" not in result.output  # found before loading
    assert mine.read_text() == '{"my": "important settings"}\n' and not (files / "settings.png").exists()
    # a previous run's sidecar is replaced as before (a rerun); --overwrite replaces another .json
    for seed in ("3", "4"):
        result = _inpaint(_models(tiny_models), files, files / "out.png", "--seed", seed)
        assert result.exit_code == 0, result.output
    assert json.loads((files / "out.json").read_text())["seed"] == 4
    result = _inpaint(_models(tiny_models), files, files / "settings.png", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads(mine.read_text())["seed"] == 3


def test_batch_refuses_to_replace_a_json_it_did_not_write(tiny_models, folders, tmp_path):
    images, masks = folders
    out = tmp_path / "out"
    out.mkdir()
    (out / "img0_png.json").write_text("[1, 2, 3]\n")
    args = ["batch", "--base", str(tmp_path / "no-base"), "--brushnet", str(tmp_path / "no-brushnet"),
            "--images", str(images), "--masks", str(masks), "-o", str(out), *FAST]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "img0_png.json exists and is not a brushnet sidecar" in result.output
    assert [p.name for p in out.iterdir()] == ["img0_png.json"]


def test_is_sidecar_knows_the_records_this_project_writes(tmp_path):
    from brushnet.io import is_sidecar, save_png_with_metadata

    save_png_with_metadata(Image.new("RGB", (8, 8)), tmp_path / "one.png", {"seed": 1, "parameters": {}})
    save_png_with_metadata(Image.new("RGB", (8, 8)), tmp_path / "grid.png", {"seed": 1, "methods": {}})
    assert is_sidecar(tmp_path / "one.json") and is_sidecar(tmp_path / "grid.json")
    for name, text in [("a.json", '{"seed": 1}'), ("b.json", "[1]"), ("c.json", "not json"), ("d.json", "")]:
        (tmp_path / name).write_text(text)
        assert not is_sidecar(tmp_path / name), name
    assert not is_sidecar(tmp_path / "missing.json")


def test_batch_and_outpaint_keep_a_transparent_inputs_alpha(tiny_models, tmp_path):
    """A cut-out (transparent pixels) through ``batch`` and ``outpaint``: the result keeps the input's alpha and
    stored colours away from the hole, as ``inpaint`` does (both flattened it before; review finding 4)."""
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (32, 40, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[24:, 28:] = (10, 200, 30, 0)  # a transparent corner that stores a colour, far from the holes
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    images.mkdir(), masks.mkdir()
    Image.fromarray(rgba, "RGBA").save(images / "cut.png")
    mask = np.zeros((32, 40), np.uint8)
    mask[2:10, 2:12] = 255
    Image.fromarray(mask).save(masks / "cut.png")
    args = ["batch", *_models(tiny_models), "--images", str(images), "--masks", str(masks), "-o", str(out)]
    result = runner.invoke(app, [*args, *FAST, "--blend-kernel-size", "5"])
    assert result.exit_code == 0, result.output
    batch = np.asarray(Image.open(out / "cut.png"))
    assert batch.shape == (32, 40, 4)
    assert np.array_equal(batch[14:, 16:], rgba[14:, 16:])  # away from the hole and its feathered band
    assert (batch[2:10, 2:12, 3] == 255).all()  # generated: opaque

    args = ["outpaint", *_models(tiny_models), "-i", str(images / "cut.png"), "--extend-left", "8"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "wide.png"), *FAST, "--blend-kernel-size", "5"])
    assert result.exit_code == 0, result.output
    wide = np.asarray(Image.open(tmp_path / "wide.png"))
    assert wide.shape == (32, 48, 4)
    assert np.array_equal(wide[:, 8 + 4 :], rgba[:, 4:])  # the input as stored, past the band
    assert (wide[:, :8, 3] == 255).all()


def test_an_existing_image_this_tool_did_not_write_is_refused(tiny_models, files, folders, tmp_path):
    """A user's own PNG at the output path (not an input) was silently replaced by every command."""
    images, masks = folders
    photo = files / "photo.png"
    Image.open(files / "img.png").save(photo)
    original = photo.read_bytes()
    missing = ["--base", str(files / "no-base"), "--brushnet", str(files / "no-brushnet")]
    out = tmp_path / "out"
    out.mkdir()
    Image.open(files / "img.png").save(out / "img0_png.png")  # a non-brushnet image where batch writes
    for result in (
        _inpaint(missing, files, photo),
        runner.invoke(app, ["outpaint", *missing, "-i", str(files / "img.png"), "--extend-left", "8",
                            "-o", str(photo), *FAST]),
        runner.invoke(app, ["compare", "--methods", "brushnet", *missing, "-i", str(files / "img.png"),
                            "-m", str(files / "mask.png"), "-o", str(photo), *FAST]),
    ):  # fmt: skip
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1, result.output
        assert f"{photo} exists and was not written by brushnet" in result.output
        assert "--overwrite" in result.output and "no-base" not in result.output  # found before loading
    result = runner.invoke(
        app,
        ["batch", *missing, "--images", str(images), "--masks", str(masks), "-o", str(out), *FAST],
    )  # fmt: skip
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "img0_png.png exists and was not written by brushnet" in result.output
    assert photo.read_bytes() == original and not photo.with_suffix(".json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["img0_png.png"]
    # brushnet's own output is replaced on a rerun, as before; --overwrite replaces the user's image
    for seed in ("3", "4"):
        result = _inpaint(_models(tiny_models), files, files / "out.png", "--seed", seed)
        assert result.exit_code == 0, result.output
    assert json.loads(Image.open(files / "out.png").text["brushnet"])["seed"] == 4
    result = _inpaint(_models(tiny_models), files, photo, "--overwrite")
    assert result.exit_code == 0, result.output
    assert photo.read_bytes() != original and (files / "photo.json").is_file()


def test_is_brushnet_image_knows_the_images_this_project_writes(tmp_path):
    from brushnet.io import is_brushnet_image, save_png_with_metadata

    save_png_with_metadata(Image.new("RGB", (8, 8)), tmp_path / "ours.png", {"seed": 1, "parameters": {}})
    assert is_brushnet_image(tmp_path / "ours.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    for name in ("photo.png", "photo.jpg", "broken.png", "missing.png", "ours.json"):
        assert not is_brushnet_image(tmp_path / name), name


@pytest.fixture
def batch_run(tiny_models, folders, tmp_path):
    """A finished batch (two images, seed 3, empty prompt) and the arguments that made it."""
    images, masks = folders
    out = tmp_path / "out"
    args = ["batch", "--images", str(images), "--masks", str(masks), "-o", str(out)]
    result = runner.invoke(app, [*args, *_models(tiny_models), *FAST])
    assert result.exit_code == 0 and "2 done" in result.output, result.output
    return args, out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--method": "repaint", "-p": "a dog", "--seed": "7", "--brushnet": None}, "--method 'brushnet' (this run: 'repaint')"),
        ({"-p": "a dog"}, "--prompt '' (this run: 'a dog')"),
        ({"--seed": "7"}, "--seed 3 (this run: 7)"),
        ({"--steps": "2"}, "--steps 1 (this run: 2)"),
        ({"--option": "conditioning_scale=0.5"}, "--option conditioning_scale 1.0 (this run: 0.5)"),
        ({"--base": "elsewhere"}, "--base "),
    ],
)  # fmt: skip
def test_batch_resume_refuses_results_made_with_other_settings(tiny_models, batch_run, change, message):
    """A rerun into a folder of results made with other settings counted them as done (exit 0)."""
    args, out = batch_run
    before = _snapshot(out)
    flags = {"--base": str(tiny_models["base"]), "--brushnet": str(tiny_models["brushnet"])}
    flags.update({"--steps": "1", "--guidance": "1.0", "--scheduler": "ddim", "--seed": "3", **change})
    if change.get("--base"):
        flags["--base"] = str(out.parent / change["--base"])  # a model that does not exist: nothing loads
    extra = [x for flag, value in flags.items() if value is not None for x in (flag, value)]
    result = runner.invoke(app, [*args, *extra, "-q"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "was made with other settings: " + message in result.output, result.output
    assert "--overwrite" in result.output and "--output" in result.output
    assert _snapshot(out) == before


def test_batch_resume_takes_an_unset_guidance_as_the_family_value(tiny_models, folders, tmp_path):
    """The records hold the guidance that ran (SD1.5: 7.5 when unset): a rerun without --guidance, or with the
    value it stands for, is the same run; another value is refused."""
    images, masks = folders
    args = ["batch", "--images", str(images), "--masks", str(masks), "-o", str(tmp_path / "out")]
    unset = [flag for flag in FAST if flag not in ("--guidance", "1.0")]
    first = runner.invoke(app, [*args, *_models(tiny_models), *unset])
    assert first.exit_code == 0 and "2 done" in first.output, first.output
    record = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert record["parameters"]["guidance_scale"] == 7.5
    for guidance in ([], ["--guidance", "7.5"]):
        again = runner.invoke(app, [*args, *_models(tiny_models), *unset, *guidance])
        assert again.exit_code == 0 and "0 done, 2 skipped" in again.output, again.output
    other = runner.invoke(app, [*args, *_models(tiny_models), *unset, "--guidance", "5"])
    assert other.exit_code == 2 and "--guidance 7.5 (this run: 5.0)" in other.output, other.output


def test_batch_resume_skips_results_made_with_the_same_settings(tiny_models, batch_run):
    args, out = batch_run
    before = _snapshot(out)
    result = runner.invoke(app, [*args, *_models(tiny_models), *FAST])
    assert result.exit_code == 0 and "0 done, 2 skipped (already done)" in result.output, result.output
    no_seed = [
        arg for arg in FAST if arg not in ("--seed", "3")
    ]  # no seed asked for: any recorded seed is fine
    result = runner.invoke(app, [*args, *_models(tiny_models), *no_seed])
    assert result.exit_code == 0 and "0 done, 2 skipped" in result.output, result.output
    assert _snapshot(out) == before
    result = runner.invoke(app, [*args, *_models(tiny_models), *FAST, "-p", "a dog", "--overwrite"])
    assert result.exit_code == 0 and "2 done, 0 skipped" in result.output, result.output
    assert json.loads((out / "img0_png.json").read_text())["parameters"]["prompt"] == "a dog"


def test_batch_resume_refuses_results_made_from_other_input_files(tiny_models, batch_run, tmp_path):
    """A rerun over another folder whose files share the stems counted the old results as theirs (exit 0)."""
    args, out = batch_run
    images, masks = Path(args[2]), Path(args[4])
    record = json.loads((out / "img0_png.json").read_text())["inputs"]
    assert record["image"] == str(images / "img0.png") and len(record["image_sha256"]) == 64
    before = _snapshot(out)
    other = tmp_path / "other"  # the same names, other pictures
    other.mkdir()
    for name in ("img0.png", "img0.jpg"):
        Image.open(images / name).rotate(90).save(other / name)
    for folder_args, flag in (
        (["--images", str(other), "--masks", str(masks)], "--images"),
        (["--images", str(images), "--masks", str(other)], "--masks"),
    ):
        result = runner.invoke(app, ["batch", *folder_args, "-o", str(out), *_models(tiny_models), *FAST])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert f"was made from other inputs than this run's {flag} file " in result.output, result.output
        assert "--overwrite" in result.output
    assert _snapshot(out) == before
    # the same files moved elsewhere are the same inputs: the results stand
    moved = tmp_path / "moved"
    shutil.copytree(images, moved)
    result = runner.invoke(app, ["batch", "--images", str(moved), "--masks", str(masks), "-o", str(out),
                                 *_models(tiny_models), *FAST])  # fmt: skip
    assert result.exit_code == 0 and "0 done, 2 skipped (already done)" in result.output, result.output
    assert _snapshot(out) == before


def _fail_on_write(monkeypatch, number):
    """Make the ``number``-th file write (fsync) fail as on a full disk."""
    from brushnet import io

    calls = []
    real_fsync = io.os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == number:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(io.os, "fsync", fsync)


def test_a_full_disk_while_the_sidecar_is_written_leaves_neither(tmp_path, monkeypatch):
    """The image landed, then the sidecar's write failed: an image without its record was left behind."""
    from brushnet import io
    from brushnet.errors import InputError

    _fail_on_write(monkeypatch, 2)
    with pytest.raises(InputError, match=r"cannot write .*out\.json: no space left on the device"):
        io.save_png_with_metadata(Image.new("RGB", (8, 8)), tmp_path / "new" / "out.png", {"seed": 1})
    assert os.listdir(tmp_path) == []  # no image, no sidecar, no .tmp, no folder made for them
    # a rerun's pair is kept as it was when the new pair cannot be written
    monkeypatch.undo()
    io.save_png_with_metadata(Image.new("RGB", (8, 8)), tmp_path / "out.png", {"seed": 1, "parameters": {}})
    before = _snapshot(tmp_path)
    _fail_on_write(monkeypatch, 2)
    with pytest.raises(InputError, match="no space left"):
        io.save_png_with_metadata(
            Image.new("RGB", (9, 9)), tmp_path / "out.png", {"seed": 2, "parameters": {}}
        )
    assert _snapshot(tmp_path) == before


def test_inpaint_on_a_full_disk_leaves_no_image_without_its_sidecar(tiny_models, files, monkeypatch):
    _fail_on_write(monkeypatch, 2)
    result = _inpaint(_models(tiny_models), files, files / "full" / "x.png")
    assert result.exit_code == 2, result.output
    assert "cannot write" in result.output and "x.json: no space left on the device" in result.output
    assert not (files / "full").exists()
