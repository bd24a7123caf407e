"""``brushnet convert``: a diffusers base folder back to the original single-file layout."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import fail, guarded


@guarded
def convert_command(
    folder: Path = typer.Argument(
        ..., help="A diffusers SD1.5- or SDXL-layout base folder (unet/, vae/, ...)."
    ),
    output: Path = typer.Argument(..., help="The .safetensors file to write (written whole, or not at all)."),
    fp16: bool = typer.Option(
        False,
        "--fp16",
        help="Store floating tensors as float16 (default: each part in the dtype it is stored in).",
    ),
    variant: str | None = typer.Option(
        None,
        "--variant",
        help="Read this variant of the weights (fp16: *.fp16.safetensors) where a part has it, else its plain "
        "weights; default: the variant the folder is stored in (fp16 first), else the plain weights.",
    ),
    allow_pickle: bool = typer.Option(
        False,
        "--allow-pickle",
        help="Read parts whose weights are only pickle files (loading one can run code).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
) -> None:
    """Write a diffusers base folder as one original-layout .safetensors file (what from_single_file reads)."""
    if output.is_dir():
        fail(f"{output} is a folder; OUTPUT is the .safetensors file to write")
    if output.exists() and not overwrite:
        fail(f"{output} exists; choose another OUTPUT or pass --overwrite")

    import torch

    from ..convert import save_single_file

    written = save_single_file(folder, output, torch.float16 if fp16 else None, variant, allow_pickle)
    typer.echo(str(written))
