"""``brushnet train``: the typer face of :mod:`brushnet.train`.

The flags are parsed by the one argparse parser built from :class:`~brushnet.training.config.TrainConfig`
(so ``brushnet train``, ``python -m brushnet.train`` and ``accelerate launch -m brushnet.train`` accept
exactly the same options); typer only forwards them. Heavy imports happen inside the command.

Mounting: ``register(main_app)`` adds the command as ``brushnet train <flags>``. (``main_app.add_typer(app,
name="train")`` would work too but, typer making a group of it, the command would be ``brushnet train run``.)
"""

from __future__ import annotations

import typer

__all__ = ["app", "train_command", "register", "COMMAND_SETTINGS"]

# every argument goes to the argparse parser, --help included
COMMAND_SETTINGS = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    "add_help_option": False,
}

app = typer.Typer(help="Train a BrushNet branch on a frozen Stable Diffusion base.", add_completion=False)


def train_command(ctx: typer.Context) -> None:
    """Train a BrushNet branch (flags as in diffusers' train_controlnet.py; --help lists them)."""
    from ..train import main

    status = main(list(ctx.args))
    if status:
        raise typer.Exit(status)


app.command("run", **COMMAND_SETTINGS)(train_command)


def register(parent: typer.Typer, name: str = "train") -> None:
    """Add :func:`train_command` to ``parent`` as the command ``name``."""
    parent.command(name, **COMMAND_SETTINGS)(train_command)
