"""``brushnet demo``: the typer command (heavy imports inside, so ``brushnet --help`` stays instant)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from .common import fail, guarded, quiet_library_progress
from .flags import request_flags, runtime_flags

__all__ = ["demo_command", "DEMO_EXCLUDED_FIELDS"]

DEMO_EXCLUDED_FIELDS = (
    "prompt",  # each shipped scene has its own; --prompt with --image/--mask for yours
    "invert_mask",  # its own flag, with --mask
    "blend",  # the grid shows every output raw and blended
    "num_images",  # one image per cell
    "mask_grow",  # shipped scenes come with their holes
    "crop_to_mask",  # the models work on whole 128x128 scenes
    "crop_padding",
    "resolution",
    "options",  # each method runs with the demo's options (RePaint: shorter jumps)
)


@guarded
@request_flags(
    exclude=DEMO_EXCLUDED_FIELDS,
    defaults={"steps": 10, "guidance_scale": 5.0, "seed": 1234, "blend_kernel_size": 5},
    help={
        "blend_kernel_size": "Feathering kernel of the blended view (the paper's 21 px at 512, scaled to 128)."
    },
)
@runtime_flags(quiet=False, dtype=False, compile=False)
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
        "controlnet-inpaint, repaint, hd-painter, powerpaint) or 'all'.",
    ),
    models: Path | None = typer.Option(None, help="Models folder (default: the shipped demo_world)."),
    table: bool = typer.Option(
        True,
        help="Print the mini-BrushBench table of the models (their mini_brushbench.json) after the shipped "
        "scenes' grid (not with --image).",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Let grid.png or <method>.png replace a file brushnet did not write, or an input.",
    ),
    request: dict = None,
    runtime: Any = None,
) -> None:
    """Real inpainting offline in under a minute: every method on small models trained on a shapes world.

    Writes a labelled grid (input, mask, each method raw and blended) of shipped scenes — one asks for a
    different object than the one masked out, the last for an object's removal (PowerPaint's object-removal
    task) — and prints the mini-BrushBench table. With --image, --mask and
    --prompt it inpaints your own 128x128 scene instead. The methods run in parallel worker processes, one per
    CPU thread (--threads; 1 runs them one after another in this process).
    """
    from ..demo.assets import DEMO_DIR, METHODS, method_models
    from ..demo.run import check_demo_request, format_results_table, run_demo, user_scene
    from ..io import check_output_path, is_brushnet_image
    from .common import refuse_overwriting_inputs

    runtime.apply()
    quiet_library_progress()  # the demo prints a line per method; no weight-loading bar per model folder
    given = [
        name
        for name, value in (("--image", image), ("--mask", mask), ("--prompt", prompt))
        if value is not None
    ]
    if given and len(given) != 3:
        fail(f"--image, --mask and --prompt go together (got only {', '.join(given)})")
    if invert_mask and not given:
        fail(
            "--invert-mask applies to your own --mask (with --image and --prompt); the shipped scenes' are set"
        )
    chosen = (
        list(METHODS) if methods.strip() == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    )
    chosen = list(dict.fromkeys(chosen))  # a method named twice runs once
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        fail(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from: {', '.join(METHODS)}")
    root = models if models is not None else DEMO_DIR
    if not (Path(root) / "base" / "model_index.json").is_file():
        fail(
            f"no demo models in {root} (expected base/model_index.json; train them with examples/demo_world)"
        )
    check_demo_request(chosen, request)
    missing = [
        f"{Path(path).name}/ (for {name})"
        for name in chosen
        for path in method_models(name, root).values()
        if not Path(path).is_dir()
    ]
    if missing:  # before any work: a worker would fail only after the others had run
        fail(f"the models in {root} lack {', '.join(missing)}; leave those methods out of --methods")
    outputs = [output / f"{name}.png" for name in ["grid", *chosen]]
    refuse_overwriting_inputs(outputs, [image, mask] if given else [], overwrite)
    for path in outputs if not overwrite else ():
        if (path.is_file() or path.is_symlink()) and not is_brushnet_image(path):
            fail(
                f"{path} exists without a brushnet record (an image of yours, or a demo output written before "
                "2026-11-28): choose another --output, or pass --overwrite to replace it"
            )
    for path in outputs:  # every file it will write, before any work
        check_output_path(path)
    start = time.perf_counter()
    scenes = [user_scene(str(image), str(mask), prompt, invert_mask)] if given else None
    import torch

    # one worker process per CPU thread (up to one per method): on these small models two one-thread processes
    # beat one two-thread process (run_demo); --threads 1 runs everything in this process
    result = run_demo(
        output,
        methods=chosen,
        scenes=scenes,
        models_root=root,
        on_event=lambda message: typer.echo(message, err=True),
        request=request,
        workers=min(torch.get_num_threads(), len(chosen)),
        device=runtime.device,
        keep=[image, mask] if given else [],
    )
    typer.echo(f"wrote {result['grid']} ({time.perf_counter() - start:.1f} s)")
    if table and not given:
        typer.echo("")
        typer.echo(format_results_table(Path(root) / "mini_brushbench.json"))
