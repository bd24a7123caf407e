"""``brushnet train``: the typer face of :func:`brushnet.training.entry.main`.

The flags are parsed by the one argparse parser built from :class:`~brushnet.training.config.TrainConfig` (so
``brushnet train``, ``python -m brushnet.train`` and ``accelerate launch -m brushnet.train`` accept exactly the
same options); typer only forwards them. Heavy imports happen inside the command. As every command, an
unexpected error is one line and exit status 1 (``BRUSHNET_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import typer

from .common import guarded

__all__ = ["train_command", "COMMAND_SETTINGS"]

# every argument goes to the argparse parser, --help included
COMMAND_SETTINGS = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    "add_help_option": False,
}


@guarded
def train_command(ctx: typer.Context) -> None:
    """Train a BrushNet branch (flags as in diffusers' train_controlnet.py; --help lists them)."""
    from ..training.entry import main

    status = main(list(ctx.args))
    if status:
        raise typer.Exit(status)
