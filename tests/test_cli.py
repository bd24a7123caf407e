import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brushnet.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)).save(root / "img.png")
    mask = np.zeros((48, 72), np.uint8)
    mask[10:30, 20:50] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(np.zeros((48, 72), np.uint8)).save(root / "empty.png")
    Image.fromarray(mask[:40]).save(root / "small.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG broken")
    return root


def _io(files, output):
    """``-i``/``-m``/``-o`` for the module's image and mask, writing ``output``."""
    return ["-i", str(files / "img.png"), "-m", str(files / "mask.png"), "-o", str(output)]


def run(tiny_models, files, *extra):
    args = ["inpaint", "--base", str(tiny_models["base"]), "--brushnet", str(tiny_models["brushnet"])]
    args += ["-i", str(files / "img.png"), "--steps", "2", "-q", *extra]
    return runner.invoke(app, args)


def test_happy_path_writes_png_with_metadata_and_sidecar(tiny_models, files, tmp_path):
    out = tmp_path / "out.png"
    result = run(
        tiny_models, files, "-m", str(files / "mask.png"), "-o", str(out), "-p", "a cat", "--seed", "7"
    )
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.size == (72, 48)
    meta = json.loads(image.text["brushnet"])
    assert image.text["seed"] == "7" and meta["parameters"]["prompt"] == "a cat"
    assert meta["parameters"]["blend"] is True and meta["method"] == "brushnet"
    assert json.loads(out.with_suffix(".json").read_text())["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.png"]  # no temp files left
    # kept pixels far from the hole are the input's (blend on by default)
    kept = np.ones((48, 72), bool)
    kept[0:41, 9:61] = False
    assert np.array_equal(np.asarray(image)[kept], np.asarray(Image.open(files / "img.png"))[kept])


def test_same_seed_same_image(tiny_models, files, tmp_path):
    for name in ("a.png", "b.png"):
        result = run(
            tiny_models, files, "-m", str(files / "mask.png"), "-o", str(tmp_path / name), "--seed", "3"
        )
        assert result.exit_code == 0, result.output
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    )


@pytest.mark.parametrize(
    "mask, extra, message",
    [
        ("empty.png", [], "mask is empty"),
        ("small.png", [], "must match"),
        ("corrupt.png", [], "not a readable image"),
        ("missing.png", [], "not found"),
        ("mask.png", ["--scheduler", "nope"], "unknown scheduler"),
        ("mask.png", ["--option", "bogus=1"], "bogus"),
        ("mask.png", ["--option", "conditioning_scale=9"], "conditioning_scale"),
        ("mask.png", ["--method", "nope"], "unknown method"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tiny_models, files, tmp_path, mask, extra, message):
    out = tmp_path / "out.png"
    result = run(tiny_models, files, "-m", str(files / mask), "-o", str(out), *extra)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_wrong_checkpoint_kind(tiny_models, files, tmp_path):
    args = ["inpaint", "--base", str(tiny_models["base"]), "--brushnet", str(tiny_models["base"] / "unet")]
    args += _io(files, tmp_path / "o.png")
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "not a BrushNetModel" in result.output


def test_missing_model_flag(files, tmp_path):
    args = ["inpaint", *_io(files, tmp_path / "o.png")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--base" in result.output


def test_help_is_fast_and_lists_commands():
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "brushnet.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "inpaint" in out.stdout
    code = "import sys, brushnet.cli; print('torch' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False", "the CLI must not import torch for --help"
    assert time.perf_counter() - start < 30


def test_single_file_base_gives_the_same_image_as_its_folder(tiny_models, files, tmp_path):
    from brushnet.convert import save_single_file

    single = save_single_file(tiny_models["base"], tmp_path / "base.safetensors")
    common = ["--brushnet", str(tiny_models["brushnet"]), "-i", str(files / "img.png"), "--steps", "2", "-q"]
    common += ["-m", str(files / "mask.png"), "--seed", "5"]
    folder_run = runner.invoke(
        app, ["inpaint", "--base", str(tiny_models["base"]), *common, "-o", str(tmp_path / "a.png")]
    )
    assert folder_run.exit_code == 0, folder_run.output
    file_run = runner.invoke(
        app,
        [
            "inpaint",
            "--base",
            str(single),
            "--base-config",
            str(tiny_models["base"]),
            *common,
            "-o",
            str(tmp_path / "b.png"),
        ],
    )
    assert file_run.exit_code == 0, file_run.output
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    )


def _one_error_line(result, message):
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: "), result.output
    assert message in result.output, result.output


@pytest.fixture
def batch_folder(files, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("one.png", "two.png"):
        Image.open(files / "img.png").save(images / name)
    return images


def test_batch_prompts_entry_matching_no_image_is_refused_before_loading(files, batch_folder, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    missing = ["--base", str(tmp_path / "no-base"), "--brushnet", str(tmp_path / "no-brushnet")]
    args = ["batch", *missing, "--images", str(batch_folder), "--masks", str(files / "mask.png")]
    args += ["-o", str(tmp_path / "out"), "--prompts", str(prompts), "-q"]
    prompts.write_text(
        '{"image": "one.png", "prompt": "a red circle"}\n\n{"image": "tow.png", "prompt": "a cat"}\n'
    )
    result = runner.invoke(app, args)
    _one_error_line(result, f"{prompts}:3: 'tow.png' matches no image in {batch_folder}")
    assert not (tmp_path / "out").exists()
    prompts.write_text('{"image": "x.png"}\n{"image": "one"}\n{"image": "y"}\n')
    _one_error_line(
        runner.invoke(app, args), f"{prompts}:1: 'x.png' matches no image in {batch_folder} (and 1 more"
    )
    # entries naming a file, a stem, or the stem with another suffix all match: the error is the missing model
    prompts.write_text('{"image": "one.png"}\n{"image": "two"}\n{"image": "two.jpg"}\n')
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "no-base" in result.output and "matches no image" not in result.output


@pytest.mark.parametrize(
    "command, extra, message",
    [
        ("inpaint", ["--controlnet", "c"], "--controlnet is not used by method 'brushnet' (it reads --base, --brushnet"),
        ("inpaint", ["--method", "repaint", "--controlnet", "c", "--inpaint-model", "i"],
         "--brushnet, --controlnet, --inpaint-model are not used by method 'repaint' (it reads --base, [--base-config])"),
        ("outpaint", ["--method", "blended-latent-diffusion"], "--brushnet is not used by method 'blended-latent-"),
        ("batch", ["--powerpaint", "p"], "--powerpaint is not used by method 'brushnet'"),
    ],
)  # fmt: skip
def test_a_model_flag_the_method_does_not_read_is_refused(
    files, batch_folder, tmp_path, command, extra, message
):
    missing = ["--base", str(tmp_path / "no-base"), "--brushnet", str(tmp_path / "no-brushnet")]
    inputs = {
        "inpaint": [
            "-i",
            str(files / "img.png"),
            "-m",
            str(files / "mask.png"),
            "-o",
            str(tmp_path / "o.png"),
        ],
        "outpaint": ["-i", str(files / "img.png"), "--extend-left", "8", "-o", str(tmp_path / "o.png")],
        "batch": [
            "--images",
            str(batch_folder),
            "--masks",
            str(files / "mask.png"),
            "-o",
            str(tmp_path / "b"),
        ],
    }[command]
    _one_error_line(runner.invoke(app, [command, *missing, *inputs, *extra, "-q"]), message)


def test_compare_takes_the_whole_set_of_model_flags(tiny_models, files, tmp_path):
    # --brushnet is read by brushnet, not by repaint: fine, each method gets the flags it reads
    args = ["compare", "--methods", "brushnet,repaint", "--base", str(tiny_models["base"])]
    args += ["--brushnet", str(tiny_models["brushnet"])]
    args += _io(files, tmp_path / "g.png")
    result = runner.invoke(app, [*args, "--steps", "1", "-q"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "methods, extra, message",
    [
        ("brushnet,repaint", [], "error: method 'brushnet' needs --brushnet"),
        ("repaint,brushnet", [], "error: method 'brushnet' needs --brushnet"),
        ("repaint", ["--controlnet", "nonexist_cn"],
         "error: --controlnet is not used by any of the methods repaint (they read --base, [--base-config]); drop"),
        ("repaint,blended-latent-diffusion", ["--brushnet", "b", "--powerpaint", "p"],
         "error: --brushnet, --powerpaint are not used by any of the methods repaint, blended-latent-diffusion"),
    ],
)  # fmt: skip
def test_compare_checks_every_methods_models_before_loading(files, tmp_path, methods, extra, message):
    """compare loaded (and ran) the methods it could, wrote a grid with a grey tile for one missing its model
    and exited 1; a flag no listed method reads was silently dropped (exit 0)."""
    args = ["compare", "--methods", methods, "--base", str(tmp_path / "no-base"), *extra]
    args += _io(files, tmp_path / "g.png")
    _one_error_line(runner.invoke(app, [*args, "--steps", "1", "-q"]), message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["batch", "outpaint", "compare"])
def test_guide_controlnet_is_refused_where_there_is_no_control_image(files, batch_folder, tmp_path, command):
    """batch, outpaint and compare took --guide-controlnet, loaded it, then failed every image: "needs a control
    image (--control-image)", a flag they do not have."""
    missing = ["--base", str(tmp_path / "no-base"), "--brushnet", str(tmp_path / "no-brushnet")]
    inputs = {
        "batch": ["--images", str(batch_folder), "--masks", str(files / "mask.png"), "-o", str(tmp_path / "b")],
        "outpaint": ["-i", str(files / "img.png"), "--extend-left", "8", "-o", str(tmp_path / "o.png")],
        "compare": ["--methods", "brushnet", "-i", str(files / "img.png"), "-m", str(files / "mask.png"),
                    "-o", str(tmp_path / "g.png")],
    }[command]  # fmt: skip
    guide = ["--guide-controlnet", str(tmp_path / "no-guide")]
    result = runner.invoke(app, [command, *missing, *guide, *inputs, "-q"])
    _one_error_line(result, f"error: {command} takes no control image, which --guide-controlnet needs")
    assert "no-base" not in result.output and "no-guide" not in result.output  # nothing loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
    # its help says so, rather than pointing to a flag the command lacks
    help_text = " ".join(runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"}).output.split())
    assert (
        "Not taken by this command" in help_text
        and "needs a control image (--control-image)" not in help_text
    )


def test_inpaint_pairs_a_guide_controlnet_and_a_control_image_before_loading(files, tmp_path):
    """Either one alone was refused by the loaded method, after loading."""
    missing = ["--base", str(tmp_path / "no-base"), "--brushnet", str(tmp_path / "no-brushnet")]
    args = ["inpaint", *missing, "-i", str(files / "img.png"), "-m", str(files / "mask.png")]
    args += ["-o", str(tmp_path / "o.png"), "-q"]
    result = runner.invoke(app, [*args, "--guide-controlnet", str(tmp_path / "no-guide")])
    _one_error_line(result, "error: --guide-controlnet needs a control image (--control-image)")
    result = runner.invoke(app, [*args, "--control-image", str(files / "img.png")])
    _one_error_line(result, "error: --control-image needs a guide ControlNet (--guide-controlnet)")
    assert list(tmp_path.iterdir()) == []


def test_serve_help_says_how_a_guide_controlnet_gets_its_control_image():
    help_text = " ".join(runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "400"}).output.split())
    assert "the request's control_image field" in help_text
    assert "(--control-image)" not in help_text  # serve has no such flag


def test_scale_and_the_option_it_stands_for_must_agree(files, tmp_path):
    """``--scale`` is shorthand for ``--option conditioning_scale=N``: both given with other values is refused
    (the shorthand won, silently); the same value twice passes the check (it then fails on the missing models)."""
    args = ["inpaint", *_io(files, tmp_path / "o.png")]
    args += ["--base", str(tmp_path / "no-base"), "--brushnet", str(tmp_path / "no-brushnet")]
    result = runner.invoke(app, [*args, "--scale", "0.5", "--option", "conditioning_scale=0.8"])
    _one_error_line(result, "--scale 0.5 and --option conditioning_scale=0.8 disagree; give one of them")
    result = runner.invoke(app, [*args, "--scale", "0.5", "--option", "conditioning_scale=0.5"])
    assert result.exit_code == 2 and "disagree" not in result.output and "no-base" in result.output


def test_batch_reads_gif_images_as_inpaint_does(files, tmp_path):
    """``inpaint -i x.gif`` works; ``batch`` skipped ``.gif`` files silently ("no images ... in" for a folder of
    them)."""
    images = tmp_path / "images"
    images.mkdir()
    Image.open(files / "img.png").convert("RGB").save(images / "one.gif")
    args = ["batch", "--images", str(images), "--masks", str(files / "mask.png"), "-o", str(tmp_path / "out")]
    args += ["--base", str(tmp_path / "no-base"), "--brushnet", str(tmp_path / "no-brushnet"), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "no images" not in result.output and "no-base" in result.output


def test_every_commands_help_paragraphs_wrap_to_the_terminal():
    """typer's help kept a docstring's line breaks after its first paragraph: on an 80-column terminal the
    demo's and batch's help left orphan words on lines of their own."""
    from typer.main import get_command

    def commands(group, path):
        for name, command in getattr(group, "commands", {}).items():
            yield f"{path} {name}", command
            yield from commands(command, f"{path} {name}")

    checked = 0
    for path, command in commands(get_command(app), "brushnet"):
        if getattr(command, "commands", None) or path == "brushnet train":  # groups; train prints its own
            continue
        for paragraph in (command.help or "").split("\n\n"):
            assert "\n" not in paragraph, (path, paragraph)
        checked += 1
    assert checked >= 10
    # in a process of its own: typer's CliRunner forces click's plain help to 80 columns, and at 60 the rich
    # panels would cut flag names, so the help is click's plain list (brushnet.cli.FittingHelpCommand)
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "60"}
    output = subprocess.run(
        [sys.executable, "-m", "brushnet.cli", "demo", "--help"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    prose = [line.rstrip() for line in re.split(r"╭|\n\S[^\n]*:\n", output)[0].splitlines()]
    assert max(map(len, prose)) <= 60, prose
    # a line followed by more of its paragraph is filled (was: "With --image/--mask/" alone, then the rest)
    filled = [line for line, after in zip(prose, prose[1:]) if line and after and "Usage" not in line]
    assert len(filled) >= 8 and min(map(len, filled)) >= 45, prose


def test_convert_is_a_brushnet_command_and_keeps_an_existing_output(tiny_models, tmp_path):
    """``brushnet convert`` (it was only ``python -m brushnet.convert``, which `brushnet --help` does not list) writes
    what ``save_single_file`` writes; an existing OUTPUT is kept unless --overwrite (it was replaced without a
    word); bad arguments are one line, exit 2, nothing written."""
    from brushnet.convert import save_single_file

    reference = save_single_file(tiny_models["base"], tmp_path / "reference.safetensors").read_bytes()
    out = tmp_path / "base.safetensors"
    done = runner.invoke(app, ["convert", str(tiny_models["base"]), str(out)])
    assert done.exit_code == 0 and done.output.strip().endswith("base.safetensors"), done.output
    assert out.read_bytes() == reference
    out.write_bytes(b"mine")
    for command in (["convert", str(tiny_models["base"]), str(out)],
                    ["convert", str(tiny_models["base"]), str(tmp_path / "x.ckpt")],
                    ["convert", str(tmp_path / "missing"), str(tmp_path / "y.safetensors")],
                    ["convert", str(tiny_models["base"]), str(tmp_path / "d.safetensors")]):  # fmt: skip
        (tmp_path / "d.safetensors").mkdir(exist_ok=True)
        refused = runner.invoke(app, [*command, "--overwrite"] if "d.safetensors" in command[2] else command)
        assert refused.exit_code == 2 and refused.output.count("\n") == 1, refused.output
    assert "is a folder; OUTPUT is the .safetensors file" in refused.output
    config = str(tiny_models["base"] / "unet" / "config.json")
    assert "is a file" in runner.invoke(app, ["convert", config, str(tmp_path / "z.safetensors")]).output
    assert (
        "exists; choose another OUTPUT or pass --overwrite"
        in runner.invoke(app, ["convert", str(tiny_models["base"]), str(out)]).output
    )
    assert out.read_bytes() == b"mine" and not (tmp_path / "y.safetensors").exists()
    assert runner.invoke(app, ["convert", str(tiny_models["base"]), str(out), "--overwrite"]).exit_code == 0
    assert out.read_bytes() == reference
    with pytest.raises(SystemExit):
        from brushnet.convert import main

        main([str(tiny_models["base"]), str(out)])  # the module's entry point keeps it too
    assert out.read_bytes() == reference


def test_python_m_brushnet_convert_refuses_a_folder_output_before_loading(
    tiny_models, tmp_path, capsys, monkeypatch
):
    """It is the ``brushnet convert`` command itself, so the folder check comes first there too (the module's own
    copy loaded the whole base and then failed on the rename, "[Errno 21] Is a directory")."""
    import brushnet.convert
    from brushnet.convert import main

    def loads(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(brushnet.convert, "save_single_file", loads)
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(SystemExit) as info:
        main([str(tiny_models["base"]), str(tmp_path / "d.safetensors"), "--overwrite"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert "is a folder; OUTPUT is the .safetensors file to write" in err
