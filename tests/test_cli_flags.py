"""Every command's flags come from the schemas: each request field and each declared model has a flag (shown in
``--help``) on every command that takes a request or loads models, and the values reach the request."""

from __future__ import annotations

import json

import click
import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from brushnet.bench.protocol import BENCH_EXCLUDED_FIELDS
from brushnet.cli import app
from brushnet.cli.demo import DEMO_EXCLUDED_FIELDS
from brushnet.cli.flags import request_field_flags
from brushnet.methods import InpaintRequest, model_slots

runner = CliRunner()

REQUEST_COMMANDS = {
    ("inpaint",): set(),
    ("batch",): set(),
    ("compare",): set(),
    ("outpaint",): {"invert_mask"},  # the mask is built from the extents
    ("bench", "run"): set(BENCH_EXCLUDED_FIELDS),
    ("demo",): set(DEMO_EXCLUDED_FIELDS),
}
MODEL_COMMANDS = [
    ("inpaint",),
    ("batch",),
    ("compare",),
    ("outpaint",),
    ("serve",),
    ("bench", "run"),
    ("bench", "speed"),
]


def _command(path: tuple[str, ...]) -> click.Command:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def _flags(command: click.Command) -> set[str]:
    return {flag for param in command.params for flag in (*param.opts, *param.secondary_opts)}


def _help(path: tuple[str, ...]) -> str:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("path", list(REQUEST_COMMANDS), ids=" ".join)
def test_every_request_field_has_a_flag(path):
    flags, text = _flags(_command(path)), _help(path)
    excluded = REQUEST_COMMANDS[path]
    assert excluded <= set(InpaintRequest.model_fields)
    for name, field in InpaintRequest.model_fields.items():
        long = request_field_flags(name, field)[0]
        if name in excluded:  # set by the command itself (it may have a flag of its own for it)
            continue
        assert long in flags, f"{' '.join(path)} lacks {long} ({name})"
        assert long in text, f"{' '.join(path)} --help does not show {long}"


@pytest.mark.parametrize("path", MODEL_COMMANDS, ids=" ".join)
def test_every_declared_model_has_a_flag(path):
    flags, text = _flags(_command(path)), _help(path)
    for slot in model_slots().values():
        assert slot.flag in flags and slot.flag in text, f"{' '.join(path)} lacks {slot.flag}"
    assert "--allow-pickle" in flags


@pytest.mark.parametrize("path", MODEL_COMMANDS, ids=" ".join)
def test_every_model_loading_command_has_compile(path):
    """``--compile`` (issue 14) is a runtime flag: every command that loads models takes it, serve included."""
    assert "--compile" in _flags(_command(path)) and "--compile" in _help(path)


# a non-default command-line value for every request field, and what the request then holds
FIELD_VALUES = {
    "prompt": (["-p", "a dog"], "a dog"),
    "negative_prompt": (["-n", "blur"], "blur"),
    "seed": (["--seed", "11"], 11),
    "steps": (["--steps", "2"], 2),
    "guidance_scale": (["--guidance", "2.5"], 2.5),
    "scheduler": (["--scheduler", "ddim"], "ddim"),
    "num_images": (["--num-images", "2"], 2),
    "blend": (["--no-blend"], False),
    "blend_kernel_size": (["--blend-kernel-size", "7"], 7),
    "mask_grow": (["--mask-grow", "1"], 1),
    "invert_mask": (["--invert-mask"], True),
    "crop_to_mask": (["--crop-to-mask"], True),
    "crop_padding": (["--crop-padding", "4"], 4),
    "resolution": (["--resolution", "64"], 64),
    "options": (["--option", "conditioning_scale=0.5"], {"conditioning_scale": 0.5}),
}


def test_flag_values_reach_the_request(tiny_models, tmp_path):
    """Every request field's flag reaches the request. ``--no-blend`` runs on its own: with it
    ``--blend-kernel-size`` has no effect and is refused (tests/test_options.py)."""
    assert set(FIELD_VALUES) == set(InpaintRequest.model_fields), "a new request field needs a value here"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    mask = np.full((64, 64), 255, np.uint8)
    mask[20:40, 20:40] = 0  # inverted by --invert-mask: the centre square is the hole
    Image.fromarray(mask).save(tmp_path / "m.png")

    def run(output: str, fields) -> dict:
        args = [
            "inpaint",
            "-i",
            str(tmp_path / "i.png"),
            "-m",
            str(tmp_path / "m.png"),
            "-o",
            str(tmp_path / output),
        ]
        args += ["--base", tiny_models["base"], "--brushnet", tiny_models["brushnet"], "-q"]
        for name in fields:
            args += FIELD_VALUES[name][0]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        stem = output.removesuffix(".png") + ("-1" if "num_images" in fields else "")  # the second of two
        return json.loads((tmp_path / f"{stem}.json").read_text())["parameters"]

    together = [name for name in FIELD_VALUES if name != "blend"]
    for parameters, names in ((run("o.png", together), together), (run("p.png", ["blend"]), ["blend"])):
        for name in names:
            value = FIELD_VALUES[name][1]
            if name == "options":  # the recorded options are the method's full, validated set
                assert parameters[name].items() >= value.items()
            else:
                assert parameters[name] == value, name


@pytest.mark.parametrize(
    "args, message",
    [
        (["inpaint", "--nosuch"], "error: No such option: --nosuch (see brushnet inpaint --help)"),
        (
            ["inpaint", "--steps", "abc"],
            "error: Invalid value for '--steps': Input should be a valid integer, unable to parse string as an "
            "integer (see brushnet inpaint --help)",
        ),
        (
            ["shapes", "make-eval"],
            "error: Missing argument 'out_dir'. (see brushnet shapes make-eval --help)",
        ),
    ],
)
def test_the_command_prints_a_usage_error_as_one_line(args, message, monkeypatch, capsys):
    """``brushnet`` itself (``main``): an unknown option, a value of the wrong type or a missing argument is one
    ``error:`` line and exit 2 (was click's usage text and a framed box of four to six lines)."""
    import sys

    from brushnet.cli import main

    monkeypatch.setattr(sys, "argv", ["brushnet", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == message


def test_the_command_without_arguments_shows_the_help_and_help_exits_0(monkeypatch, capsys):
    import sys

    from brushnet.cli import main

    for args in (["bench"], []):  # the help once (it was printed twice: once as the error was made)
        monkeypatch.setattr(sys, "argv", ["brushnet", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out = capsys.readouterr().out
        assert exit_info.value.code == 2 and out.count(" ".join(["Usage: brushnet", *args])) == 1, out
    monkeypatch.setattr(sys, "argv", ["brushnet", "methods"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0 and "blended-latent-diffusion" in capsys.readouterr().out


def test_python_m_brushnet_convert_prints_a_usage_error_as_one_line(capsys):
    """``python -m brushnet.convert`` is ``brushnet convert``, usage errors included (they were click's usage text
    and framed box there)."""
    from brushnet.convert import main

    for args, message in (
        (["a", "b", "--bogus"], "error: No such option: --bogus (see python -m brushnet.convert --help)"),
        (["a"], "error: Missing argument 'output'. (see python -m brushnet.convert --help)"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == message


def test_the_pixel_limit_help_names_the_default_limit():
    """The help is written out (the CLI imports no torch for --help); it must say the limit the code uses."""
    import math

    from brushnet.cli.inpaint import MAX_PIXELS_HELP
    from brushnet.image import DEFAULT_MAX_PIXELS

    side = math.isqrt(DEFAULT_MAX_PIXELS)
    assert side * side == DEFAULT_MAX_PIXELS and f"default {side} x {side}" in MAX_PIXELS_HELP


def _all_commands(group: click.Group, path=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _all_commands(command, (*path, name))
        elif command.add_help_option:  # `train` hands --help to its own parser
            yield (*path, name), command


@pytest.mark.parametrize("columns", ["80", "100", "300"])
def test_help_shows_every_flag_whole_at_any_width(columns):
    """At 80 columns typer's rich panels cut long flag names (``--image-reward-toke…``, ``--guidance,--guidanc…``):
    a command whose panels would cut anything prints click's plain list instead."""
    for path, command in _all_commands(typer.main.get_command(app)):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": columns, "TERMINAL_WIDTH": columns})
        assert result.exit_code == 0, result.output
        assert "\u2026" not in result.output, f"{' '.join(path)} at {columns} columns:\n{result.output}"
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                for flag in (*param.opts, *param.secondary_opts):
                    assert flag in result.output, f"{' '.join(path)} --help at {columns} lacks {flag}"
    # the panels stay where they fit
    assert "╭─ Runtime" in _help(("inpaint",))


def test_a_second_long_name_is_a_hidden_alias_of_the_same_setting():
    """``--guidance-scale`` (diffusers' word) sets what ``--guidance`` sets; both with different values is refused."""
    from brushnet.cli.flags import request_flags

    one = typer.Typer()

    @one.command()
    @request_flags()
    def show(request: dict) -> None:
        print(request["guidance_scale"])

    assert runner.invoke(one, []).output.strip() == "None"  # the base family decides (FAMILY_GUIDANCE)
    assert runner.invoke(one, ["--guidance", "3"]).output.strip() == "3.0"
    assert runner.invoke(one, ["--guidance-scale", "2.5"]).output.strip() == "2.5"
    assert runner.invoke(one, ["--guidance-scale", "4", "--guidance", "4"]).output.strip() == "4.0"
    # through the real commands (their error handling): one line, exit 2, whatever the command's default
    for command in (
        ["inpaint", "-i", "x.png", "-m", "y.png", "-o", "o.png", "--guidance", "3"],
        ["demo", "--guidance", "5"],  # the demo's default, given under both names
        ["bench", "run", "--dataset", "d", "--output", "o", "--guidance", "7.5"],
    ):
        result = runner.invoke(app, [*command, "--guidance-scale", "2.5"])
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and "and --guidance-scale 2.5 are one setting" in result.output
    text = runner.invoke(one, ["--help"]).output
    assert "--guidance,--guidance-scale" not in text and "--guidance-scale" in text.split("Also", 1)[1]
    assert "[default: 50]" in text  # defaults shown; guidance's is the family's, said in its help
    assert "usual value, 7.5 for SD1.5 and 5.0 for SDXL" in " ".join(text.replace("│", " ").split())


def test_every_command_with_a_guidance_flag_takes_diffusers_word_too():
    """``--guidance-scale`` is diffusers' name; ``bench speed`` took only ``--guidance`` (a typo'd guess exited 2)."""
    for path, command in _all_commands(typer.main.get_command(app)):
        names = {name for param in command.params for name in getattr(param, "opts", [])}
        if "--guidance" in names:
            assert "--guidance-scale" in names, " ".join(path)
    assert any(
        "--guidance" in p.opts for p in typer.main.get_command(app).commands["bench"].commands["speed"].params
    )


def test_a_command_with_its_own_guidance_default_does_not_describe_the_family_default():
    """``bench run`` (the paper's 7.5) and ``demo`` (5.0) said "unset: the base family's usual value" beside their
    own [default: ...]."""
    root = typer.main.get_command(app)
    for command in (root.commands["bench"].commands["run"], root.commands["demo"], root.commands["inpaint"]):
        (guidance,) = [p for p in command.params if "--guidance" in getattr(p, "opts", [])]
        family = "usual value" in guidance.help
        assert family == (guidance.default is None), (command.name, guidance.default, guidance.help)
