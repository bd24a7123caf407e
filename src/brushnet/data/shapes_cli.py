"""``brushnet shapes …``: write shapes-world training shards and evaluation sets.

Heavy imports live inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Procedural shapes world: training shards and BrushBench-style evaluation sets.")


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


@app.command("make-train")
def make_train(
    out_dir: Path = typer.Argument(..., help="Folder for the shapes-XXXXXX.tar shards."),
    num_scenes: int = typer.Option(10000, "--num-scenes", "-n", help="Number of training samples."),
    scenes_per_shard: int = typer.Option(1000, "--scenes-per-shard", help="Samples per tar shard."),
    size: int = typer.Option(128, "--size", help="Image side in pixels."),
    seed: int = typer.Option(
        0, "--seed", help="Dataset seed (training scenes never coincide with eval scenes)."
    ),
) -> None:
    """Write BrushData-format webdataset shards of random scenes."""
    from .shapes_writers import write_training_shards

    try:
        paths = write_training_shards(
            out_dir, num_scenes, scenes_per_shard=scenes_per_shard, size=size, seed=seed
        )
    except (ValueError, OSError) as error:
        _fail(error)
    typer.echo(f"wrote {num_scenes} scenes in {len(paths)} shards to {out_dir}")


@app.command("make-eval")
def make_eval(
    out_dir: Path = typer.Argument(..., help="Folder for images/ and mapping_file.json."),
    num_scenes: int = typer.Option(200, "--num-scenes", "-n", help="Number of evaluation images."),
    size: int = typer.Option(128, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Dataset seed."),
    different_object: float = typer.Option(
        0.0,
        "--different-object",
        help="Fraction of entries whose prompt asks for a different object than the one masked out.",
    ),
    mask_dilation: int | None = typer.Option(
        None, "--mask-dilation", help="Hole dilation in pixels (default: size / 40, at least 2)."
    ),
) -> None:
    """Write a BrushBench-format evaluation set with one object hole per image."""
    from .shapes_writers import write_eval_set

    try:
        path = write_eval_set(
            out_dir,
            num_scenes,
            size=size,
            seed=seed,
            different_object_fraction=different_object,
            mask_dilation=mask_dilation,
        )
    except (ValueError, OSError) as error:
        _fail(error)
    typer.echo(f"wrote {num_scenes} entries to {path}")
