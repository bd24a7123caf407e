"""``brushnet data …``: training-data utilities.

Heavy imports (numpy, PIL, the writers) live inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Training data: BrushData-format shards and masks.", no_args_is_help=True)


@app.callback()
def _data() -> None:
    """Training data: BrushData-format shards and masks."""


@app.command("make-synthetic")
def make_synthetic(
    out: Path = typer.Option(..., "--out", help="Folder to write shard-XXXXX.tar files into."),
    shards: int = typer.Option(2, "--shards", help="Number of shards."),
    samples_per_shard: int = typer.Option(16, "--samples-per-shard", help="Samples per shard."),
    size: int = typer.Option(64, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Seed of everything random."),
    malformed: int = typer.Option(0, "--malformed", help="Number of deliberately malformed samples."),
) -> None:
    """Write BrushData-format webdataset shards of random coloured shapes with segmentation masks."""
    from .synthetic import write_synthetic_shards

    try:
        written = write_synthetic_shards(
            out, shards, samples_per_shard, size=size, seed=seed, malformed=malformed
        )
    except (ValueError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"wrote {len(written.valid_keys) + len(written.malformed)} samples "
        f"({len(written.malformed)} malformed) in {len(written.paths)} shards to {out}"
    )
