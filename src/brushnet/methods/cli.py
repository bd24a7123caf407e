"""``brushnet batch``, ``brushnet compare`` and ``brushnet outpaint``: plain functions registered on the top-level
app in :mod:`brushnet.cli`. Only typer and the standard library are imported here at module level.

The flags shared with ``brushnet inpaint`` (models, prompt, sampling, processing, device) are defined once below
as option objects and reused by every command here.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer

__all__ = ["batch_command", "compare_command", "outpaint_command", "StepBar", "IMAGE_SUFFIXES"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# ---- flags shared with `brushnet inpaint` (same names and defaults) -------------------------------------------
METHOD = typer.Option("brushnet", "--method", help="Inpainting method (see `brushnet methods`).")
BASE = typer.Option(None, "--base", help="SD1.5 base: diffusers folder, hub id or .safetensors file.")
BASE_CONFIG = typer.Option(None, "--base-config", help="Config folder for a single-file base.")
BRUSHNET = typer.Option(None, "--brushnet", help="BrushNet checkpoint folder or hub id.")
INPAINT_MODEL = typer.Option(None, "--inpaint-model", help="9-channel SD inpainting model.")
CONTROLNET = typer.Option(None, "--controlnet", help="SD1.5 inpaint ControlNet.")
PROMPT = typer.Option("", "--prompt", "-p", help="What to paint in the hole.")
NEGATIVE_PROMPT = typer.Option("", "--negative-prompt", "-n")
STEPS = typer.Option(50, "--steps", min=1, help="Denoising steps.")
GUIDANCE = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale.")
SEED = typer.Option(None, "--seed", help="Random seed (default: random, reported).")
SCHEDULER = typer.Option("unipc", "--scheduler", help="unipc, unipc-original, ddim, dpm++2m, euler, ...")
BLEND = typer.Option(True, "--blend/--no-blend", help="Feathered paste-back (kept pixels exact).")
CROP_TO_MASK = typer.Option(False, "--crop-to-mask", help="Work on a padded box around the mask.")
CROP_PADDING = typer.Option(32, "--crop-padding")
MASK_GROW = typer.Option(0, "--mask-grow", help="Grow (>0) or shrink (<0) the mask, pixels.")
INVERT_MASK = typer.Option(False, "--invert-mask", help="Black = inpaint instead.")
RESOLUTION = typer.Option(None, "--resolution", help="Working size (area ~ N^2).")
OPTION = typer.Option(None, "--option", help="Method option key=value (repeatable).")
DEVICE = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps.")
DTYPE = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16.")
ALLOW_PICKLE = typer.Option(False, "--allow-pickle", help="Allow .bin/.ckpt weights (runs pickle).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class StepBar:
    """A tqdm bar on stderr driven by a method's ``on_step(done, total)`` callback (methods count steps their own
    way: RePaint counts schedule moves, the diffusers-backed ones count over all images)."""

    def __init__(self, desc: str, quiet: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=None, desc=desc, unit="step", disable=quiet, file=sys.stderr)

    def __call__(self, done: int, total: int) -> None:
        if self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _models(base, base_config, brushnet, inpaint_model, controlnet, allow_pickle) -> dict[str, Any]:
    return dict(
        base=base,
        base_config=base_config,
        brushnet=brushnet,
        inpaint_model=inpaint_model,
        controlnet=controlnet,
        allow_pickle=allow_pickle,
    )


def _find_mask(masks: Path, stem: str) -> Path | None:
    if masks.is_file():
        return masks
    for suffix in IMAGE_SUFFIXES:
        for candidate in (masks / f"{stem}{suffix}", masks / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _read_prompts(path: Path) -> dict[str, dict[str, Any]]:
    """``prompts.jsonl``: one ``{"image": "<file name or stem>", "prompt": ..., "negative_prompt": ...}`` a line."""
    table: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key = str(entry["image"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: expected a JSON object with an 'image' key") from None
        unknown = set(entry) - {"image", "prompt", "negative_prompt"}
        if unknown:
            raise ValueError(f"{path}:{number}: unknown keys {sorted(unknown)}")
        table[key] = entry
        table.setdefault(Path(key).stem, entry)
    return table


def batch_command(
    images: Path = typer.Option(..., "--images", help="Folder of input images."),
    masks: Path = typer.Option(
        ..., "--masks", help="Folder of masks matched by file stem, or one mask for all."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (<stem>.png + <stem>.json)."),
    prompts: Path = typer.Option(None, "--prompts", help="JSONL: {image, prompt, negative_prompt} per line."),
    prompt: str = PROMPT,
    negative_prompt: str = NEGATIVE_PROMPT,
    method: str = METHOD,
    base: str = BASE,
    base_config: str = BASE_CONFIG,
    brushnet: str = BRUSHNET,
    inpaint_model: str = INPAINT_MODEL,
    controlnet: str = CONTROLNET,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    seed: int = SEED,
    scheduler: str = SCHEDULER,
    blend: bool = BLEND,
    crop_to_mask: bool = CROP_TO_MASK,
    crop_padding: int = CROP_PADDING,
    mask_grow: int = MASK_GROW,
    invert_mask: bool = INVERT_MASK,
    resolution: int = RESOLUTION,
    option: list[str] = OPTION,
    device: str = DEVICE,
    dtype: str = DTYPE,
    allow_pickle: bool = ALLOW_PICKLE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo images whose output already exists."),
    quiet: bool = QUIET,
) -> None:
    """Inpaint every image of a folder. Resumable: an image whose <stem>.png and <stem>.json both exist is
    skipped. A bad file is reported and skipped; exit code 1 if any image failed."""
    from ..cli_common import parse_options

    if not images.is_dir():
        _fail(f"--images must be a folder: {images}")
    if not masks.exists():
        _fail(f"--masks not found: {masks}")
    try:
        options = parse_options(option)
        table = _read_prompts(prompts) if prompts is not None else {}
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    files = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        _fail(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")

    from tqdm.auto import tqdm

    from ..cli_common import save_png_with_metadata
    from ..image import InputError, load_image
    from .base import inpaint
    from .registry import load_method

    try:
        loaded = load_method(
            method,
            _models(base, base_config, brushnet, inpaint_model, controlnet, allow_pickle),
            device,
            dtype,
        )
    except (InputError, ValueError) as exc:
        _fail(str(exc))

    done, skipped, failures = 0, 0, []
    for path in tqdm(files, desc=f"batch {method}", unit="image", disable=quiet, file=sys.stderr):
        target = output / f"{path.stem}.png"
        if not overwrite and target.is_file() and target.with_suffix(".json").is_file():
            skipped += 1
            continue
        try:
            # The image first: a corrupt image is reported as such, whether or not its mask exists.
            original = load_image(path)
            mask_path = _find_mask(masks, path.stem)
            if mask_path is None:
                raise InputError(f"no mask named {path.stem}.<png|jpg|...> in {masks}")
            entry = table.get(path.name) or table.get(path.stem) or {}
            result = inpaint(
                loaded,
                original,
                str(mask_path),
                dict(
                    prompt=entry.get("prompt", prompt),
                    negative_prompt=entry.get("negative_prompt", negative_prompt),
                    seed=seed,
                    steps=steps,
                    guidance_scale=guidance,
                    scheduler=scheduler,
                    blend=blend,
                    crop_to_mask=crop_to_mask,
                    crop_padding=crop_padding,
                    mask_grow=mask_grow,
                    invert_mask=invert_mask,
                    resolution=resolution,
                    options=options,
                ),
            )
            metadata = result.metadata()
            metadata["inputs"] = {"image": str(path), "mask": str(mask_path)}
            save_png_with_metadata(result.images[0], target, metadata)
            done += 1
        except Exception as exc:  # one bad file never stops the batch
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            kind = "" if isinstance(exc, InputError) else f"{exc.__class__.__name__}: "
            failures.append((path.name, kind + message))
            logger.debug("batch: %s failed", path, exc_info=True)
    typer.echo(f"{done} done, {skipped} skipped (already done), {len(failures)} failed", err=True)
    for name, message in failures:
        typer.echo(f"failed: {name}: {message}", err=True)
    if failures:
        raise typer.Exit(1)


def _split_options(pairs: list[str] | None, names: list[str]) -> dict[str, list[str]]:
    """``--option key=value`` applies to every method; ``--option method:key=value`` to that method only."""
    per_method: dict[str, list[str]] = {name: [] for name in names}
    for pair in pairs or []:
        head, _, _ = pair.partition("=")
        if ":" in head:
            name, _, rest = pair.partition(":")
            if name not in per_method:
                raise ValueError(f"--option {pair!r} names method {name!r}, which is not in --methods")
            per_method[name].append(rest)
        else:
            for name in names:
                per_method[name].append(pair)
    return per_method


def _label(tile, text: str):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    strip = 14
    canvas = Image.new("RGB", (tile.width, tile.height + strip), (255, 255, 255))
    canvas.paste(tile.convert("RGB"), (0, strip))
    ImageDraw.Draw(canvas).text((2, 1), text, fill=(0, 0, 0), font=font)
    return canvas


def compare_command(
    image: Path = typer.Option(..., "--image", "-i", help="Input image."),
    mask: Path = typer.Option(..., "--mask", "-m", help="Mask, white = inpaint."),
    methods: str = typer.Option(
        ..., "--methods", help="Comma-separated methods, e.g. brushnet,blended-latent-diffusion,repaint."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Grid .png (a .json sidecar is written too)."),
    prompt: str = PROMPT,
    negative_prompt: str = NEGATIVE_PROMPT,
    base: str = BASE,
    base_config: str = BASE_CONFIG,
    brushnet: str = BRUSHNET,
    inpaint_model: str = INPAINT_MODEL,
    controlnet: str = CONTROLNET,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    seed: int = SEED,
    scheduler: str = SCHEDULER,
    blend: bool = BLEND,
    crop_to_mask: bool = CROP_TO_MASK,
    crop_padding: int = CROP_PADDING,
    mask_grow: int = MASK_GROW,
    invert_mask: bool = INVERT_MASK,
    resolution: int = RESOLUTION,
    option: list[str] = typer.Option(
        None, "--option", help="key=value for every method, or method:key=value for one (repeatable)."
    ),
    device: str = DEVICE,
    dtype: str = DTYPE,
    allow_pickle: bool = ALLOW_PICKLE,
    quiet: bool = QUIET,
) -> None:
    """Run several methods with the same seed and settings; write a labelled grid: input, mask, each output.
    A method that fails gets a grey tile; the exit code is then 1."""
    from ..cli_common import parse_options

    names = [name.strip() for name in methods.split(",") if name.strip()]
    if not names:
        _fail("--methods is empty")
    if output.suffix.lower() != ".png":
        _fail(f"--output must be a .png file, got {output.name}")
    try:
        per_method = {name: parse_options(pairs) for name, pairs in _split_options(option, names).items()}
    except ValueError as exc:
        _fail(str(exc))

    import secrets

    from PIL import Image

    from ..cli_common import save_png_with_metadata
    from ..image import InputError, load_image, load_mask
    from .base import inpaint
    from .registry import load_method

    try:
        original = load_image(image)
        hole = load_mask(mask, size=original.size, invert=invert_mask)
    except InputError as exc:
        _fail(str(exc))
    seed = seed if seed is not None else secrets.randbelow(2**32)  # one seed shared by every method
    models = _models(base, base_config, brushnet, inpaint_model, controlnet, allow_pickle)
    tiles = [_label(original, "input"), _label(Image.fromarray(hole.astype("uint8") * 255), "mask")]
    report: dict[str, Any] = {"seed": seed, "inputs": {"image": str(image), "mask": str(mask)}, "methods": {}}
    failed = False
    for name in names:
        bar = StepBar(name, quiet)
        try:
            loaded = load_method(name, models, device, dtype)
            result = inpaint(
                loaded,
                original,
                str(mask),  # read again inside, so `invert_mask` is applied there and recorded
                dict(
                    prompt=prompt,
                    negative_prompt=negative_prompt,
                    seed=seed,
                    steps=steps,
                    guidance_scale=guidance,
                    scheduler=scheduler,
                    blend=blend,
                    crop_to_mask=crop_to_mask,
                    crop_padding=crop_padding,
                    mask_grow=mask_grow,
                    invert_mask=invert_mask,
                    resolution=resolution,
                    options=per_method[name],
                ),
                on_step=bar,
            )
            bar.close()
            tiles.append(_label(result.images[0], name))
            report["methods"][name] = result.metadata()
            typer.echo(
                f"{name}: {result.timings['generate_s']:.2f} s, {result.unet_calls} UNet calls", err=True
            )
        except Exception as exc:  # one failing method still leaves a grid of the others
            bar.close()
            failed = True
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            typer.echo(f"failed: {name}: {message}", err=True)
            tiles.append(_label(Image.new("RGB", original.size, (128, 128, 128)), f"{name} (failed)"))
            report["methods"][name] = {"error": message}
    width = sum(tile.width for tile in tiles)
    grid = Image.new("RGB", (width, tiles[0].height), (255, 255, 255))
    x = 0
    for tile in tiles:
        grid.paste(tile, (x, 0))
        x += tile.width
    report["method"] = "compare:" + ",".join(names)
    report["parameters"] = {"prompt": prompt}
    save_png_with_metadata(grid, output, report)
    typer.echo(str(output))
    if failed:
        raise typer.Exit(1)


def outpaint_command(
    image: Path = typer.Option(..., "--image", "-i", help="Input image."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .png (a .json sidecar is written too)."),
    extend_left: int = typer.Option(0, "--extend-left", min=0, help="Pixels added on the left."),
    extend_right: int = typer.Option(0, "--extend-right", min=0, help="Pixels added on the right."),
    extend_top: int = typer.Option(0, "--extend-top", min=0, help="Pixels added at the top."),
    extend_bottom: int = typer.Option(0, "--extend-bottom", min=0, help="Pixels added at the bottom."),
    overlap: int = typer.Option(
        0, "--overlap", min=0, help="Also repaint this many original pixels per side."
    ),
    fill: str = typer.Option("edge", "--fill", help="Pre-fill of the new area: edge or black."),
    prompt: str = PROMPT,
    negative_prompt: str = NEGATIVE_PROMPT,
    method: str = METHOD,
    base: str = BASE,
    base_config: str = BASE_CONFIG,
    brushnet: str = BRUSHNET,
    inpaint_model: str = INPAINT_MODEL,
    controlnet: str = CONTROLNET,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    seed: int = SEED,
    scheduler: str = SCHEDULER,
    blend: bool = BLEND,
    resolution: int = RESOLUTION,
    option: list[str] = OPTION,
    device: str = DEVICE,
    dtype: str = DTYPE,
    allow_pickle: bool = ALLOW_PICKLE,
    quiet: bool = QUIET,
) -> None:
    """Extend the canvas by the given pixels per side and paint the new area (outpainting)."""
    from ..cli_common import parse_options, save_png_with_metadata
    from ..image import InputError
    from .base import outpaint
    from .registry import load_method

    if fill not in ("edge", "black"):
        _fail(f"--fill must be edge or black, got {fill!r}")
    if extend_left + extend_right + extend_top + extend_bottom == 0:
        _fail("give at least one of --extend-left/--extend-right/--extend-top/--extend-bottom")
    try:
        options = parse_options(option)
        loaded = load_method(
            method,
            _models(base, base_config, brushnet, inpaint_model, controlnet, allow_pickle),
            device,
            dtype,
        )
        bar = StepBar(f"outpaint {method}", quiet)
        result = outpaint(
            loaded,
            str(image),
            left=extend_left,
            top=extend_top,
            right=extend_right,
            bottom=extend_bottom,
            overlap=overlap,
            fill=fill,
            request=dict(
                prompt=prompt,
                negative_prompt=negative_prompt,
                seed=seed,
                steps=steps,
                guidance_scale=guidance,
                scheduler=scheduler,
                blend=blend,
                resolution=resolution,
                options=options,
            ),
            on_step=bar,
        )
        bar.close()
    except (InputError, ValueError) as exc:
        _fail(str(exc))
    metadata = result.metadata()
    metadata["inputs"] = {"image": str(image)}
    save_png_with_metadata(result.images[0], output, metadata)
    typer.echo(str(output))
