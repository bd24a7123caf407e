"""``brushnet data …`` (training-data utilities) and ``brushnet shapes …`` (the procedural shapes world).

Heavy imports (numpy, PIL, the writers) live inside the commands so ``--help`` is instant.

Every flag is checked, naming the flag, before anything is written. A shard writer refuses an output folder that
already holds ``.tar`` shards (a second set written there would mix with the first, since training reads every
shard of a folder) unless ``--overwrite``, which removes this command's old shards first; a run that fails
removes the shards it wrote (and the folder, when it made it).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ..errors import InputError
from .common import guarded

__all__ = ["data_app", "shapes_app"]

data_app = typer.Typer(help="Training data: BrushData-format shards and masks.", no_args_is_help=True)
shapes_app = typer.Typer(
    help="Procedural shapes world: training shards and BrushBench-style evaluation sets.",
    no_args_is_help=True,
)


OVERWRITE_HELP = "Replace the shards a previous run of this command wrote there (removed first)."


def _at_least(value: int, minimum: int, flag: str) -> None:
    if value < minimum:
        raise InputError(f"{flag} must be at least {minimum}, got {value}")


def _check_output_folder(out: Path, name: str) -> None:
    """Refuse an output folder that is a file, or lies under one (``name``: the flag or argument)."""
    from ..io import file_in_the_way

    existing = file_in_the_way(out)
    if existing is not None:
        where = "" if existing == out else f" ({existing} is a file)"
        raise InputError(f"{name} {out} is not a folder{where}")


def _prepare_shard_folder(out: Path, name: str, pattern: str, overwrite: bool) -> list[Path]:
    """Check that the shard folder ``out`` can take a new set: it holds no ``.tar`` file, or (``overwrite``) only
    shards named ``pattern`` (this command's), which are returned for removal."""
    _check_output_folder(out, name)
    if not out.is_dir():
        return []
    shards = sorted(path for path in out.glob("*.tar") if path.is_file())
    ours = sorted(out.glob(pattern))
    others = [path for path in shards if path not in ours]
    if others and overwrite:
        raise InputError(
            f"{name} {out} holds .tar files this command did not write ({others[0].name}"
            f"{', ...' if len(others) > 1 else ''}), which training would read with the new shards; choose a "
            "new or empty folder"
        )
    if shards and not overwrite:
        raise InputError(
            f"{name} {out} already holds {len(shards)} .tar shard{'s' if len(shards) > 1 else ''} "
            f"({shards[0].name}{', ...' if len(shards) > 1 else ''}): a new set would mix with them; choose a new "
            "or empty folder, or pass --overwrite to replace them"
        )
    return ours


def _write_shards(out: Path, name: str, pattern: str, overwrite: bool, write: Callable[[], Any]) -> Any:
    """Run ``write`` (which writes shards named ``pattern`` into ``out``) after :func:`_prepare_shard_folder`
    and the removal of the old shards (``overwrite``); if it fails, the shards it wrote are removed, and the
    folders it made."""
    old = _prepare_shard_folder(out, name, pattern, overwrite)
    top = None  # the top-most folder this run makes
    path = out.absolute()
    while not path.exists() and path != path.parent:
        top, path = path, path.parent
    for shard in old:
        shard.unlink()
    try:
        return write()
    except BaseException:
        for shard in out.glob(pattern) if out.is_dir() else []:
            shard.unlink(missing_ok=True)
        if top is not None:
            path = out.absolute()
            while path.is_dir() and not any(path.iterdir()):
                path.rmdir()
                if path == top:
                    break
                path = path.parent
        raise


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
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Write BrushData-format webdataset shards of random coloured shapes with segmentation masks."""
    from ..data.synthetic import write_synthetic_shards

    _at_least(shards, 1, "--shards")
    _at_least(samples_per_shard, 1, "--samples-per-shard")
    _at_least(size, 4, "--size")
    _at_least(seed, 0, "--seed")
    if not 0 <= malformed <= shards * samples_per_shard:
        raise InputError(
            f"--malformed must be between 0 and {shards * samples_per_shard} (--shards × --samples-per-shard), "
            f"got {malformed}"
        )
    written = _write_shards(
        out,
        "--out",
        "shard-*.tar",
        overwrite,
        lambda: write_synthetic_shards(
            out, shards, samples_per_shard, size=size, seed=seed, malformed=malformed
        ),
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
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Write BrushData-format webdataset shards of random scenes."""
    from ..data.shapes_writers import write_training_shards

    _at_least(num_scenes, 1, "--num-scenes")
    _at_least(scenes_per_shard, 1, "--scenes-per-shard")
    _at_least(size, 32, "--size")
    _at_least(seed, 0, "--seed")
    paths = _write_shards(
        out_dir,
        "OUT_DIR",
        "shapes-*.tar",
        overwrite,
        lambda: write_training_shards(
            out_dir, num_scenes, scenes_per_shard=scenes_per_shard, size=size, seed=seed
        ),
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
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace an evaluation set already in OUT_DIR (its images/ and mapping file).",
    ),
) -> None:
    """Write a BrushBench-format evaluation set with one object hole per image."""
    from ..data.shapes_writers import write_eval_set

    _at_least(num_scenes, 1, "--num-scenes")
    _at_least(size, 32, "--size")
    _at_least(seed, 0, "--seed")
    if not 0.0 <= different_object <= 1.0:
        raise InputError(f"--different-object must be in [0, 1], got {different_object}")
    if removal and different_object:
        raise InputError("--removal prompts for no object: leave --different-object at 0")
    if mask_dilation is not None:
        _at_least(mask_dilation, 0, "--mask-dilation")
    _check_output_folder(out_dir, "OUT_DIR")
    images = out_dir / "images"
    held = [p for p in (out_dir / "mapping_file.json", images) if p.exists()]
    if held and not overwrite:
        raise InputError(
            f"OUT_DIR {out_dir} already holds an evaluation set ({', '.join(p.name for p in held)}): a new one "
            "would mix with it; choose a new or empty folder, or pass --overwrite to replace it"
        )
    if held:  # asked for: the old set goes first, so none of its images is left beside the new ones
        (out_dir / "mapping_file.json").unlink(missing_ok=True)
        if images.is_dir():
            shutil.rmtree(images)
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
