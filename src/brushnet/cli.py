"""The ``brushnet`` command line.

Heavy imports (torch, diffusers) happen inside each command, so ``brushnet --help`` is instant. Every
expected failure (bad input, wrong checkpoint, unknown option) prints one line on stderr and exits 2.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

app = typer.Typer(
    name="brushnet",
    help="BrushNet inpainting and the methods it is compared against. Masks: white = inpaint.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def inpaint(
    image: Path = typer.Option(..., "--image", "-i", help="Input image (PNG/JPEG/WebP, any size)."),
    mask: Path = typer.Option(..., "--mask", "-m", help="Mask, white = inpaint (L, RGB, or RGBA strokes)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .png (several images: out-0.png, ...)."),
    prompt: str = typer.Option("", "--prompt", "-p", help="What to paint in the hole."),
    negative_prompt: str = typer.Option("", "--negative-prompt", "-n"),
    method: str = typer.Option("brushnet", "--method", help="Inpainting method (see `brushnet methods`)."),
    base: str = typer.Option(
        None, "--base", help="SD1.5 base: diffusers folder, hub id or .safetensors file."
    ),
    base_config: str = typer.Option(None, "--base-config", help="Config folder for a single-file base."),
    brushnet: str = typer.Option(None, "--brushnet", help="BrushNet checkpoint folder or hub id."),
    inpaint_model: str = typer.Option(None, "--inpaint-model", help="9-channel SD inpainting model."),
    controlnet: str = typer.Option(None, "--controlnet", help="SD1.5 inpaint ControlNet."),
    steps: int = typer.Option(50, "--steps", min=1, help="Denoising steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    scale: float = typer.Option(
        None, "--scale", help="BrushNet preservation scale (option conditioning_scale)."
    ),
    seed: int = typer.Option(None, "--seed", help="Random seed (default: random, reported)."),
    scheduler: str = typer.Option(
        "unipc", "--scheduler", help="unipc, unipc-original, ddim, dpm++2m, euler, ..."
    ),
    num_images: int = typer.Option(1, "--num-images", min=1, max=16),
    blend: bool = typer.Option(True, "--blend/--no-blend", help="Feathered paste-back (kept pixels exact)."),
    crop_to_mask: bool = typer.Option(False, "--crop-to-mask", help="Work on a padded box around the mask."),
    crop_padding: int = typer.Option(32, "--crop-padding"),
    mask_grow: int = typer.Option(0, "--mask-grow", help="Grow (>0) or shrink (<0) the mask, pixels."),
    invert_mask: bool = typer.Option(False, "--invert-mask", help="Black = inpaint instead."),
    resolution: int = typer.Option(None, "--resolution", help="Working size (area ~ N^2)."),
    option: list[str] = typer.Option(None, "--option", help="Method option key=value (repeatable)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Allow .bin/.ckpt weights (runs pickle)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Inpaint IMAGE where MASK is white and write OUTPUT (PNG with parameters + JSON sidecar)."""
    from .cli_common import output_paths, parse_options
    from .image import InputError, load_image, load_mask

    try:
        options = parse_options(option)
        if scale is not None:
            options["conditioning_scale"] = scale
        outputs = output_paths(output, num_images)
        original = load_image(image)
        load_mask(mask, size=original.size, invert=invert_mask)  # fail early: size, empty mask
    except (InputError, ValueError) as exc:
        fail(str(exc))

    from .cli_common import save_png_with_metadata
    from .methods import ModelPaths, inpaint, load_method
    from .methods.cli import StepBar

    try:
        models = ModelPaths(
            base=base,
            base_config=base_config,
            brushnet=brushnet,
            inpaint_model=inpaint_model,
            controlnet=controlnet,
            allow_pickle=allow_pickle,
        )
        loaded = load_method(method, models, device=device, dtype=dtype)
        bar = StepBar(method, quiet)  # methods count steps their own way (RePaint: schedule moves)
        result = inpaint(
            loaded,
            original,
            str(mask),  # read again inside (validated above), so `invert_mask` is applied there and recorded
            dict(
                prompt=prompt,
                negative_prompt=negative_prompt,
                seed=seed,
                steps=steps,
                guidance_scale=guidance,
                scheduler=scheduler,
                num_images=num_images,
                blend=blend,
                crop_to_mask=crop_to_mask,
                crop_padding=crop_padding,
                mask_grow=mask_grow,
                invert_mask=invert_mask,
                resolution=resolution,
                options=options,
            ),
            on_step=bar,
        )
        bar.close()
    except (InputError, ValueError) as exc:
        fail(str(exc))

    metadata = result.metadata()
    metadata["inputs"] = {"image": str(image), "mask": str(mask)}
    for i, (img, path) in enumerate(zip(result.images, outputs)):
        meta = {**metadata, "seed": result.seed + i, "index": i}
        save_png_with_metadata(img, path, meta)
        typer.echo(str(path))
    typer.echo(f"seed {result.seed}, {result.timings['total_s']:.1f} s", err=True)


@app.command()
def methods() -> None:
    """List the available methods and their options."""
    from .methods import available_methods, get_method_class

    for name in available_methods():
        cls = get_method_class(name)
        typer.echo(f"{name}: {cls.description}")
        for field, info in cls.Options.model_fields.items():
            typer.echo(f"    {field} = {info.default!r}  {info.description or ''}")


@app.command("make-tiny-models")
def make_tiny_models(
    out_dir: Path = typer.Argument(..., help="Folder to write base/, brushnet/, inpaint/, controlnet/ into."),
    preset: str = typer.Option("tiny", "--preset", help="tiny, small or sd15 (the real SD1.5 sizes)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write random-weight model folders for every method (offline; for trying the tools, not for quality)."""
    from .random_models import PRESETS, build_base, build_brushnet, build_controlnet, build_inpaint_model

    if preset not in PRESETS:
        fail(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    base = build_base(out_dir / "base", preset, seed=seed)
    build_brushnet(out_dir / "brushnet", base, seed=seed)
    build_inpaint_model(out_dir / "inpaint", base, preset, seed=seed)
    build_controlnet(out_dir / "controlnet", base, seed=seed)
    for name in ("base", "brushnet", "inpaint", "controlnet"):
        typer.echo(str(out_dir / name))


# Sub-commands that live next to their code; each module imports only typer at its top.
_SUB_APPS = {
    "data": ("brushnet.data.cli", "app", "Training data: synthetic shards."),
    "shapes": ("brushnet.data.shapes_cli", "app", "The procedural shapes world."),
    "bench": ("brushnet.bench.cli", "app", "Benchmarks: BrushBench-style evaluation and speed."),
}
for _name, (_module, _attr, _help) in _SUB_APPS.items():
    try:
        app.add_typer(getattr(importlib.import_module(_module), _attr), name=_name, help=_help)
    except ModuleNotFoundError as _exc:  # a part not installed in this tree
        if _exc.name not in (_module, _module.rsplit(".", 1)[0]):
            raise

# `brushnet train <flags>`: one command whose flags all go to the training parser (not a group)
importlib.import_module("brushnet.training.cli").register(app)

_COMMANDS = {
    "batch": ("brushnet.methods.cli", "batch_command"),
    "compare": ("brushnet.methods.cli", "compare_command"),
    "outpaint": ("brushnet.methods.cli", "outpaint_command"),
    "serve": ("brushnet.service.cli", "serve_command"),
    "demo": ("brushnet.demo", "demo_command"),
}
for _name, (_module, _attr) in _COMMANDS.items():
    try:
        app.command(_name)(getattr(importlib.import_module(_module), _attr))
    except ModuleNotFoundError as _exc:
        if _exc.name not in (_module, _module.rsplit(".", 1)[0]):
            raise


def main() -> None:
    app()


if __name__ == "__main__":
    main()
