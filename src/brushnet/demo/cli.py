"""``brushnet demo``: the typer command (heavy imports inside, so ``brushnet --help`` stays instant)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

__all__ = ["demo_command"]


def demo_command(
    output: Path = typer.Option(
        Path("outputs/demo"), "--output", "-o", help="Folder for grid.png and per-method PNGs."
    ),
    image: Path | None = typer.Option(
        None, "--image", "-i", help="Your own 128x128 scene (with --mask and --prompt)."
    ),
    mask: Path | None = typer.Option(None, "--mask", "-m", help="Its mask, white = inpaint."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="What to paint, e.g. 'a red circle'."),
    invert_mask: bool = typer.Option(False, "--invert-mask", help="The mask is white = keep."),
    methods: str = typer.Option(
        "all",
        help="Comma-separated methods (brushnet, blended-latent-diffusion, sd-inpainting, "
        "controlnet-inpaint, repaint) or 'all'.",
    ),
    steps: int = typer.Option(10, min=1, max=200, help="Denoising steps (UniPC)."),
    guidance: float = typer.Option(5.0, min=0.0, max=50.0, help="Guidance scale."),
    seed: int = typer.Option(1234, min=0, help="Seed."),
    models: Path | None = typer.Option(None, help="Models folder (default: the shipped demo_world)."),
    table: bool = typer.Option(True, help="Print the mini-BrushBench table after the grid."),
) -> None:
    """Real inpainting offline in under a minute: every method on small models trained on a shapes world.

    Writes a labelled grid (input, mask, each method raw and blended) of shipped scenes — one asks for a
    different object than the one masked out — and prints the mini-BrushBench table. With --image/--mask/
    --prompt it inpaints your own 128x128 scene instead.
    """
    from ..image import InputError
    from .assets import DEMO_DIR, METHODS
    from .run import DEMO_SETTINGS, format_results_table, run_demo, user_scene

    def fail(message: str) -> None:
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2)

    given = [
        name
        for name, value in (("--image", image), ("--mask", mask), ("--prompt", prompt))
        if value is not None
    ]
    if given and len(given) != 3:
        fail(f"--image, --mask and --prompt go together (got only {', '.join(given)})")
    chosen = (
        list(METHODS) if methods.strip() == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    )
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        fail(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from: {', '.join(METHODS)}")
    root = models if models is not None else DEMO_DIR
    if not (Path(root) / "base" / "model_index.json").is_file():
        fail(
            f"no demo models in {root} (expected base/model_index.json; train them with "
            "python -m brushnet.demo.train_world)"
        )
    start = time.perf_counter()
    try:
        scenes = [user_scene(str(image), str(mask), prompt, invert_mask)] if given else None
        result = run_demo(
            output,
            methods=chosen,
            scenes=scenes,
            models_root=root,
            on_event=lambda message: typer.echo(message, err=True),
            settings={**DEMO_SETTINGS, "steps": steps, "guidance_scale": guidance, "seed": seed},
        )
    except InputError as error:
        fail(str(error))
    typer.echo(f"wrote {result['grid']} ({time.perf_counter() - start:.1f} s)")
    if table and not given:
        typer.echo("")
        typer.echo(format_results_table())
