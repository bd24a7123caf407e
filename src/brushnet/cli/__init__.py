"""The ``brushnet`` command line: every command, in one package.

Heavy imports (torch, diffusers) happen inside each command, so ``brushnet --help`` is instant. Every expected
failure (bad input, wrong checkpoint, unknown option, a file that cannot be written) prints one line on stderr
and exits 2; an unexpected one prints one line and exits 1 (``BRUSHNET_DEBUG=1`` shows the traceback).

The flags that describe a request, the models and the runtime are generated from the schemas
(:mod:`brushnet.cli.flags`), so every command that takes a request takes every field of it.
"""

from __future__ import annotations

import os
import sys

# OpenMP threads that spin while waiting burn the CPU another process needs; passive waiting costs nothing
# measurable on an idle machine and avoids the collapse on a busy one. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402
import typer.core  # noqa: E402

from .common import silence_library_noise  # noqa: E402

silence_library_noise()

from .bench import app as bench_app  # noqa: E402
from .convert import convert_command  # noqa: E402
from .data import data_app, shapes_app  # noqa: E402
from .demo import demo_command  # noqa: E402
from .env import env_command  # noqa: E402
from .inpaint import (  # noqa: E402
    batch_command,
    compare_command,
    inpaint_command,
    make_tiny_models_command,
    methods_command,
    outpaint_command,
)
from .serve import serve_command  # noqa: E402
from .train import COMMAND_SETTINGS, train_command  # noqa: E402

__all__ = ["app", "main", "run_app"]

app = typer.Typer(
    name="brushnet",
    help="BrushNet inpainting and the methods it is compared against. Masks: white = inpaint.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

app.command("inpaint")(inpaint_command)
app.command("batch")(batch_command)
app.command("compare")(compare_command)
app.command("outpaint")(outpaint_command)
app.command("methods")(methods_command)
app.command("make-tiny-models")(make_tiny_models_command)
app.command("convert")(convert_command)
app.command("env")(env_command)
app.command("demo")(demo_command)
app.command("serve")(serve_command)
app.command("train", **COMMAND_SETTINGS)(train_command)
app.add_typer(bench_app, name="bench", help="Benchmarks: BrushBench-style evaluation and speed.")
app.add_typer(data_app, name="data", help="Training data: synthetic shards.")
app.add_typer(shapes_app, name="shapes", help="The procedural shapes world.")


class FittingHelpCommand(typer.core.TyperCommand):
    """A command whose ``--help`` is typer's rich panels where they fit the terminal, and click's plain list where
    they would not: on an 80-column terminal rich cut long flag names to ``--image-reward-toke…``, so a user could
    not read which flag was meant. Whether anything is cut is read from a rendering of the rich help (rich marks
    every cut with ``…``)."""

    def format_help(self, ctx, formatter) -> None:
        import contextlib
        import io

        if self.rich_markup_mode is not None:
            rendered = io.StringIO()
            with contextlib.redirect_stdout(rendered):
                super().format_help(ctx, formatter)
            if "\u2026" in rendered.getvalue():
                mode, self.rich_markup_mode = self.rich_markup_mode, None
                try:
                    return super().format_help(ctx, formatter)
                finally:
                    self.rich_markup_mode = mode
        return super().format_help(ctx, formatter)


def _reflow_help(typer_app: typer.Typer) -> None:
    """Give every command of ``typer_app`` (and of its sub-apps) its docstring with each paragraph's lines joined,
    so the terminal wraps it: typer's rich help keeps a docstring's line breaks after the first paragraph, which
    leaves orphan words on a terminal narrower than the source. Each command's help also falls back to the plain
    list where the rich panels would cut something (:class:`FittingHelpCommand`)."""
    import inspect

    for info in typer_app.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            paragraphs = inspect.cleandoc(info.callback.__doc__).split("\n\n")
            info.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)
        if info.cls in (None, typer.core.TyperCommand):
            info.cls = FittingHelpCommand
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


_reflow_help(app)


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Click's usage errors and "no arguments: show the help" errors, from the click typer vendors (typer >= 0.2x)
    and from click itself (older typer), whichever are installed."""
    import importlib

    usage, no_args = [], []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(module.UsageError)
        if hasattr(module, "NoArgsIsHelpError"):
            no_args.append(module.NoArgsIsHelpError)
    return tuple(usage), tuple(no_args)


def run_app(typer_app: typer.Typer, args: list[str] | None = None, prog_name: str = "brushnet") -> int:
    """Run ``typer_app`` on ``args`` (None: ``sys.argv[1:]``) and return its exit code, with a usage error (an unknown
    option, a value of the wrong type, a missing argument) as one ``error:`` line, code 2, instead of click's usage
    text and framed box."""
    usage_errors, no_args_errors = _click_errors()
    try:
        code = typer_app(args=args, standalone_mode=False, prog_name=prog_name)
    except no_args_errors as exc:  # bare ``brushnet`` or ``brushnet bench``: the help, once
        # the error's message is the help; typer's rich help is printed as the error is made, and its text is ""
        # (asking the context again printed it twice)
        if exc.format_message():
            typer.echo(exc.format_message())
        return 2
    except usage_errors as exc:
        command = exc.ctx.command_path if exc.ctx else prog_name
        message = " ".join(exc.format_message().split())
        typer.echo(f"error: {message} (see {command} --help)", err=True)
        return 2
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        return 130
    return code if isinstance(code, int) else 0


def main() -> None:
    """The ``brushnet`` command: :data:`app` through :func:`run_app` (a usage error is one line, exit 2)."""
    sys.exit(run_app(app))
