"""``brushnet data …`` (training-data utilities) and ``brushnet shapes …`` (the procedural shapes world).

Heavy imports (numpy, PIL, the writers) live inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

from .common import guarded

__all__ = ["data_app", "shapes_app"]

data_app = typer.Typer(help="Training data: BrushData-format shards and masks.", no_args_is_help=True)
shapes_app = typer.Typer(
    help="Procedural shapes world: training shards and BrushBench-style evaluation sets.",
    no_args_is_help=True,
)


@data_app.callback()
def _data() -> None:
    """Training data: BrushData-format shards and masks."""


@data_app.command("make-synthetic")
@guarded
def make_synthetic(
    out: Path = typer.Option(..., "--out", help="Folder to write shard-XXXXX.tar files into."),
    shards: int = typer.Option(2, "--shards", help="Number of shards."),
    samples_per_shard: int = typer.Option(16, "--samples-per-shard", help="Samples per shard."),
    size: int = typer.Option(64, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Seed of everything random."),
    malformed: int = typer.Option(0, "--malformed", help="Number of deliberately malformed samples."),
) -> None:
    """Write BrushData-format webdataset shards of random coloured shapes with segmentation masks."""
    from ..data.synthetic import write_synthetic_shards

    written = write_synthetic_shards(
        out, shards, samples_per_shard, size=size, seed=seed, malformed=malformed
    )
    typer.echo(
        f"wrote {len(written.valid_keys) + len(written.malformed)} samples "
        f"({len(written.malformed)} malformed) in {len(written.paths)} shards to {out}"
    )


@shapes_app.command("make-train")
@guarded
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
    from ..data.shapes_writers import write_training_shards

    paths = write_training_shards(
        out_dir, num_scenes, scenes_per_shard=scenes_per_shard, size=size, seed=seed
    )
    typer.echo(f"wrote {num_scenes} scenes in {len(paths)} shards to {out_dir}")


@shapes_app.command("make-eval")
@guarded
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
    removal: bool = typer.Option(
        False,
        "--removal",
        help="Object-removal entries: the prompt names the background (score with --score removal).",
    ),
) -> None:
    """Write a BrushBench-format evaluation set with one object hole per image."""
    from ..data.shapes_writers import write_eval_set

    path = write_eval_set(
        out_dir,
        num_scenes,
        size=size,
        seed=seed,
        different_object_fraction=different_object,
        mask_dilation=mask_dilation,
        removal=removal,
    )
    typer.echo(f"wrote {num_scenes} entries to {path}")
