"""``brushnet inpaint | batch | compare | outpaint | methods | make-tiny-models``.

Their request, model and runtime flags are generated from the schemas (:mod:`brushnet.cli.flags`). Each
command checks everything it can — request, options, models, files, output paths — before loading a model, and
writes its outputs only after generating (each image and its ``.json`` sidecar together, or neither). An existing
output that this tool did not write (an image without its ``brushnet`` record, a foreign ``.json``) is replaced
only with ``--overwrite``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import typer

from .common import (
    IMAGE_SUFFIXES,
    StepBar,
    fail,
    guarded,
    output_paths,
    refuse_models_no_method_reads,
    refuse_overwriting_inputs,
    refuse_replacing_other_images,
    refuse_replacing_other_json,
    refuse_unused_models,
    set_flag_help,
    split_options,
)
from .flags import model_flags, request_flags, runtime_flags

__all__ = [
    "inpaint_command",
    "batch_command",
    "compare_command",
    "outpaint_command",
    "methods_command",
    "make_tiny_models_command",
]

logger = logging.getLogger(__name__)

METHOD_HELP = "Inpainting method (see `brushnet methods`)."
MAX_PIXELS_HELP = "Largest input image, width x height (checked before decoding; default 8192 x 8192)."
OVERWRITE_HELP = (
    "Allow --output (or its .json sidecar) to replace an input file, or an image or .json this tool did not "
    "write."
)
NO_CONTROL_IMAGE_HELP = (
    "Not taken by this command: a guide ControlNet needs a control image, which only `brushnet inpaint` takes "
    "(--control-image)."
)


def _load(method: str, models: dict[str, Any], runtime) -> Any:
    return runtime.load_method(method, models)


def _model_paths(models: dict[str, Any], method_cls) -> Any:
    """The model paths, checked for what ``method_cls`` needs before anything loads."""
    from ..methods import ModelPaths

    paths = ModelPaths(**models)
    paths.require(method_cls)
    return paths


def _refuse_guide_controlnet(models: dict[str, Any], command: str) -> None:
    """``--guide-controlnet`` for a command without ``--control-image``: the guide ControlNet would fail on every
    image after loading, so it is refused before anything loads."""
    if models.get("guide_controlnet") is not None:
        fail(
            f"{command} takes no control image, which --guide-controlnet needs: run it with `brushnet inpaint "
            "--guide-controlnet ... --control-image ...` (or drop --guide-controlnet)"
        )


def _checked_outputs(output: Path, count: int, inputs: list[Path], overwrite: bool) -> list[Path]:
    """The output paths of ``count`` images, refused before any work when one would replace an input, or an
    image or a ``.json`` file this tool did not write, or cannot be written (the image and its ``.json``
    sidecar). Nothing is created here: a missing folder is made when the first file is written."""
    from ..io import check_output_path

    outputs = output_paths(output, count)
    refuse_overwriting_inputs(outputs, inputs, overwrite)
    refuse_replacing_other_json(outputs, overwrite)
    refuse_replacing_other_images(outputs, overwrite)
    for path in outputs:
        check_output_path(path)
        check_output_path(path.with_suffix(".json"))
    return outputs


def _generate_and_write(
    method: str, job, models: dict, runtime, outputs: list[Path], inputs: dict, label: str
):
    """Load ``method``, run the prepared ``job`` with a progress bar, and write image i (seed + i) and its
    sidecar to ``outputs[i]``; returns the result."""
    from ..io import save_png_with_metadata
    from ..methods import run

    loaded = _load(method, models, runtime)
    with StepBar(label, runtime.quiet) as bar:
        result = run(loaded, job, on_step=bar)
    metadata = {**result.metadata(), "inputs": inputs}
    for i, (img, path) in enumerate(zip(result.images, outputs)):
        save_png_with_metadata(img, path, {**metadata, "seed": result.seed + i, "index": i})
        typer.echo(str(path))
    return result


@guarded
@request_flags()
@model_flags()
@runtime_flags()
def inpaint_command(
    image: Path = typer.Option(
        ..., "--image", "-i", help="Input image (PNG/JPEG/WebP/TIFF/GIF/BMP, any size up to --max-pixels)."
    ),
    mask: Path = typer.Option(..., "--mask", "-m", help="Mask, white = inpaint (L, RGB, or RGBA strokes)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .png (several images: out-0.png, ...)."),
    method: str = typer.Option("brushnet", "--method", help=METHOD_HELP),
    scale: float | None = typer.Option(
        None, "--scale", help="Shorthand for --option conditioning_scale=N (BrushNet's preservation scale)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    max_pixels: int | None = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP),
    control_image: Path | None = typer.Option(
        None,
        "--control-image",
        help="Control image for --guide-controlnet (pose, depth, ...), the image's size.",
    ),
    request: dict = None,
    models: dict = None,
    runtime: Any = None,
) -> None:
    """Inpaint IMAGE where MASK is white and write OUTPUT (PNG with parameters + JSON sidecar)."""
    from ..methods import get_method_class, prepare

    runtime.apply()
    if scale is not None:
        given = request["options"].get("conditioning_scale")
        if given is not None and given != scale:
            fail(f"--scale {scale:g} and --option conditioning_scale={given} disagree; give one of them")
        request["options"] = {**request["options"], "conditioning_scale": scale}
    cls = get_method_class(method)
    refuse_unused_models(models, cls)
    if models.get("guide_controlnet") is not None and control_image is None:
        fail("--guide-controlnet needs a control image (--control-image): the image that steers it")
    guided = "guide_controlnet" in {slot.name for slot in cls.optional_models}
    if control_image is not None and guided and models.get("guide_controlnet") is None:
        fail("--control-image needs a guide ControlNet (--guide-controlnet) to read it")
    read = [image, mask] + ([control_image] if control_image is not None else [])
    outputs = _checked_outputs(output, request["num_images"], read, overwrite)
    job = prepare(cls, image, mask, request, max_pixels=max_pixels, control_image=control_image)  # reads once
    _model_paths(models, cls)
    inputs = {"image": str(image), "mask": str(mask)}
    if control_image is not None:
        inputs["control_image"] = str(control_image)
    result = _generate_and_write(method, job, models, runtime, outputs, inputs, method)
    typer.echo(f"seed {result.seed}, {result.timings['total_s']:.1f} s", err=True)


def _find_mask(masks: Path, stem: str) -> Path | None:
    if masks.is_file():
        return masks
    for suffix in IMAGE_SUFFIXES:
        for candidate in (masks / f"{stem}{suffix}", masks / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _read_prompts(path: Path, files: list[Path], images: Path) -> dict[str, tuple[int, dict[str, Any]]]:
    """``prompts.jsonl``: one ``{"image": "<file name or stem>", "prompt": ..., "negative_prompt": ...}`` a line.
    Returns ``{name or stem: (line number, entry)}``.

    An entry whose image matches none of ``files`` (by file name or stem, as the batch looks entries up) is an
    error naming the file, the line and the name: a typo would otherwise run that image with the default prompt.
    A prompt that is not text, and a file that cannot be read (missing, a folder, not UTF-8), are errors naming
    the flag, the file (and the line).
    """
    import json

    from ..errors import InputError

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"--prompts {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"--prompts {path} is a folder, not a JSONL file") from None
    except UnicodeDecodeError:
        raise InputError(
            f"--prompts {path} is not UTF-8 text: expected JSONL, one "
            '{"image": ..., "prompt": ..., "negative_prompt": ...} object a line'
        ) from None
    except OSError as exc:
        raise InputError(f"--prompts {path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    names = {f.name for f in files} | {f.stem for f in files}
    stems = {f.stem for f in files}
    table: dict[str, tuple[int, dict[str, Any]]] = {}
    unmatched: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key = str(entry["image"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}:{number}: expected a JSON object with an 'image' key") from None
        unknown = set(entry) - {"image", "prompt", "negative_prompt"}
        if unknown:
            raise InputError(f"{path}:{number}: unknown keys {sorted(unknown)}")
        for field in ("prompt", "negative_prompt"):
            if field in entry and not isinstance(entry[field], str):
                raise InputError(
                    f"{path}:{number}: {field!r} must be text (a JSON string), got {entry[field]!r}"
                )
        if key not in names and Path(key).stem not in stems:
            unmatched.append((number, key))
        table[key] = (number, entry)
        table.setdefault(Path(key).stem, (number, entry))
    if unmatched:
        number, key = unmatched[0]
        more = f" (and {len(unmatched) - 1} more entries)" if len(unmatched) > 1 else ""
        raise InputError(f"{path}:{number}: {key!r} matches no image in {images}{more}")
    return table


def _same_model(recorded: Any, given: Any) -> bool:
    """Whether a model path recorded in a sidecar names the model given now: the same text, or two paths that
    resolve to the same existing file or folder (``tiny/base`` and ``./tiny/base``)."""
    if recorded == given:
        return True
    if not (isinstance(recorded, str) and isinstance(given, str)):
        return False
    try:
        return Path(recorded).exists() and Path(recorded).resolve() == Path(given).resolve()
    except OSError:
        return False


def _first_difference(
    record: dict[str, Any], method: str, models: dict[str, Any], request: Any, options: Any
) -> tuple[str, Any, Any] | None:
    """The first setting in which a previous result's ``record`` (its sidecar) differs from this run's — the
    method, a model, a request field (``seed`` only when one is given), a method option — as ``(flag, recorded,
    wanted)``; None when it was made with these settings. What the record lacks (an older sidecar) is not
    compared."""
    import json

    from ..methods.base import FAMILY_GUIDANCE, InpaintRequest
    from ..methods.registry import model_slots
    from .flags import request_field_flags

    if record.get("method") not in (None, method):
        return "--method", record.get("method"), method
    parameters = record.get("parameters") or {}
    recorded_models = parameters.get("models")
    if isinstance(recorded_models, dict):
        slots = model_slots()
        for name in [*models, *(n for n in recorded_models if n not in models)]:
            if name == "allow_pickle":
                continue
            if not _same_model(recorded_models.get(name), models.get(name)):
                flag = slots[name].flag if name in slots else {"loras": "--lora"}.get(name, name)
                return flag, recorded_models.get(name), models.get(name)
    if parameters.get("family") in FAMILY_GUIDANCE:  # an unset guidance ran at the family's value
        request = request.for_family(parameters["family"])
    wanted = json.loads(json.dumps(request.model_dump(), default=str))
    for name, value in wanted.items():
        if name == "options" or name not in parameters or (name == "seed" and value is None):
            continue
        if parameters[name] != value:
            flag = request_field_flags(name, InpaintRequest.model_fields[name])[0]
            return flag, parameters[name], value
    recorded_options = parameters.get("options")
    if isinstance(recorded_options, dict):
        for name, value in json.loads(json.dumps(options.model_dump(), default=str)).items():
            if name in recorded_options and recorded_options[name] != value:
                return f"--option {name}", recorded_options[name], value
    return None


def _sha256(file: Path, known: dict[Path, str] | None = None) -> str:
    """The SHA-256 of ``file``'s bytes, read once per batch run when ``known`` holds the ones computed so far."""
    import hashlib

    if known is not None and file in known:
        return known[file]
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    if known is not None:
        known[file] = digest
    return digest


def _input_record(image: Path, mask: Path) -> dict[str, str]:
    """What a batch result's sidecar records of its inputs: their paths and the SHA-256 of their bytes, so that a
    resumed run can tell a result of these inputs from one of other files with the same stems."""
    return {
        "image": str(image),
        "mask": str(mask),
        "image_sha256": _sha256(image),
        "mask_sha256": _sha256(mask),
    }


def _other_input(
    record: dict[str, Any], image: Path, mask: Path | None, known: dict[Path, str] | None = None
) -> tuple[str, str] | None:
    """``(flag, file)`` of the first input of this run that differs from the one a previous result's ``record``
    was made from (by content where the sidecar records its hash, else by path); None when they are the same or
    the record has none (an older sidecar). ``known``: the digests computed so far in this run (a mask shared by
    every image, or an image with several outputs, is read once)."""
    inputs = record.get("inputs")
    if not isinstance(inputs, dict):
        return None
    for name, flag, file in (("image", "--images", image), ("mask", "--masks", mask)):
        if file is None:  # the mask was removed since: the result stands
            continue
        digest = inputs.get(f"{name}_sha256")
        try:
            if digest is not None:
                same = _sha256(file, known) == digest
            elif inputs.get(name) is not None:
                same = Path(inputs[name]).resolve() == file.resolve()
            else:
                continue
        except OSError:
            same = False
        if not same:
            return flag, str(file)
    return None


def batch_output_names(files: list[Path]) -> dict[Path, str]:
    """Output stem per input: the file's stem, or ``<stem>_<suffix>`` for inputs whose stems collide
    (``a.jpg`` and ``a.png`` → ``a_jpg``, ``a_png``), so no two inputs write the same output."""
    stems: dict[str, int] = {}
    for path in files:
        stems[path.stem.lower()] = stems.get(path.stem.lower(), 0) + 1
    return {
        path: path.stem if stems[path.stem.lower()] == 1 else f"{path.stem}_{path.suffix.lstrip('.').lower()}"
        for path in files
    }


@guarded
@request_flags(help={"prompt": "Prompt for images without an entry in --prompts."})
@model_flags()
@runtime_flags()
def batch_command(
    images: Path = typer.Option(..., "--images", help="Folder of input images."),
    masks: Path = typer.Option(
        ..., "--masks", help="Folder of masks matched by file stem, or one mask for all."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (<stem>.png + <stem>.json)."),
    prompts: Path = typer.Option(None, "--prompts", help="JSONL: {image, prompt, negative_prompt} per line."),
    method: str = typer.Option("brushnet", "--method", help=METHOD_HELP),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Redo images whose output exists (also one made with other settings); allow --output to be an input "
        "folder, and <stem>.png / <stem>.json to replace an image or .json this tool did not write.",
    ),
    max_pixels: int | None = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP),
    request: dict = None,
    models: dict = None,
    runtime: Any = None,
) -> None:
    """Inpaint every image of a folder.

    Resumable: an image whose <stem>.png and <stem>.json both exist, made with the same method, models, settings
    and input files, is skipped (one made with others is refused: --overwrite redoes it). A bad file is reported
    and skipped; exit code 1 if any image failed."""
    import json

    from ..errors import InputError, first_line
    from ..io import check_output_path, save_png_with_metadata
    from ..methods import ModelPaths, check_request, get_method_class, prepare, run

    runtime.apply()
    if not images.is_dir():
        fail(f"--images must be a folder: {images}")
    if not masks.exists():
        fail(f"--masks not found: {masks}")
    if output.exists() and not output.is_dir():
        fail(f"--output must be a folder: {output} is a file")
    if max_pixels is not None and max_pixels < 1:
        fail(f"--max-pixels must be at least 1, got {max_pixels}")
    if not overwrite:
        for folder, flag in ((images, "--images"), (masks, "--masks")):
            if folder.is_dir() and output.resolve() == folder.resolve():
                fail(
                    f"--output {output} is the {flag} folder: outputs would mix with the inputs (pass --overwrite)"
                )
    files = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        fail(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")
    table = _read_prompts(prompts, files, images) if prompts is not None else {}
    cls = get_method_class(method)
    refuse_unused_models(models, cls)
    _refuse_guide_controlnet(models, "batch")
    check_request(cls, request)
    # every image's request (its prompts from --prompts) checked now, each resolved once per distinct prompt pair
    fields: dict[Path, dict[str, Any]] = {}
    resolved: dict[tuple[str, str], tuple[Any, Any]] = {}
    resolved_of: dict[Path, tuple[Any, Any]] = {}
    for path in files:
        number, entry = table.get(path.name) or table.get(path.stem) or (None, {})
        fields[path] = {
            **request,
            "prompt": entry.get("prompt", request["prompt"]),
            "negative_prompt": entry.get("negative_prompt", request["negative_prompt"]),
        }
        key = (fields[path]["prompt"], fields[path]["negative_prompt"])
        if key not in resolved:
            try:
                resolved[key] = check_request(cls, fields[path])
            except (InputError, ValueError) as exc:
                if number is None:
                    raise
                raise InputError(f"{prompts}:{number}: {first_line(exc)}") from None
        resolved_of[path] = resolved[key]
    names = batch_output_names(files)
    targets = {path: output_paths(output / f"{names[path]}.png", request["num_images"]) for path in files}
    every_target = [t for paths in targets.values() for t in paths]
    refuse_replacing_other_json(every_target, overwrite)
    refuse_replacing_other_images(every_target, overwrite)
    # resume: an image whose outputs all exist is done, if its sidecars record this run's settings
    used = {k: v for k, v in ModelPaths(**models).used_by(cls).items() if k != "allow_pickle"}
    pending: list[Path] = []
    digests: dict[Path, str] = {}
    for path in files:
        if overwrite or not all(t.is_file() and t.with_suffix(".json").is_file() for t in targets[path]):
            pending.append(path)
            continue
        for target in targets[path]:
            try:
                record = json.loads(target.with_suffix(".json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                record = {}
            request_now, options_now = resolved_of[path]
            difference = _first_difference(record, method, used, request_now, options_now)
            if difference is not None:
                flag, before, now = difference
                fail(
                    f"{target} was made with other settings: {flag} {before!r} (this run: {now!r}); pass "
                    "--overwrite to redo it, or choose another --output"
                )
            other = _other_input(record, path, _find_mask(masks, path.stem), digests)
            if other is not None:
                flag, now = other
                fail(
                    f"{target} was made from other inputs than this run's {flag} file {now}; pass --overwrite to "
                    "redo it, or choose another --output"
                )
    skipped = len(files) - len(pending)
    mask_of = {path: _find_mask(masks, path.stem) for path in pending}
    if pending and not any(mask_of.values()):
        example = pending[0].stem
        fail(
            f"no mask in {masks} for any of the {len(pending)} images to do (masks are matched by file stem: "
            f"{example}.png, {example}.jpg, ...)"
        )
    check_output_path(output / "probe.png")
    _model_paths(models, cls)
    if not pending:
        typer.echo(f"0 done, {skipped} skipped (already done), 0 failed", err=True)
        return

    from tqdm.auto import tqdm

    loaded = _load(method, models, runtime)
    done, failures = 0, []
    for path in tqdm(pending, desc=f"batch {method}", unit="image", disable=runtime.quiet, file=sys.stderr):
        try:
            # the image first: a corrupt image is reported as such, whether or not its mask exists; opened as
            # stored, so that a transparent input keeps its alpha (prepare flattens it for the model)
            from ..image import open_image

            original = open_image(path, max_pixels=max_pixels)
            mask_path = mask_of[path]
            if mask_path is None:
                raise InputError(f"no mask named {path.stem}.<png|jpg|...> in {masks}")
            job = prepare(cls, original, mask_path, fields[path], max_pixels=max_pixels)
            result = run(loaded, job)
            metadata = result.metadata()
            metadata["inputs"] = _input_record(path, mask_path)
            for i, (img, target) in enumerate(zip(result.images, targets[path])):
                save_png_with_metadata(img, target, {**metadata, "seed": result.seed + i, "index": i})
            done += 1
        except Exception as exc:  # one bad file never stops the batch
            kind = "" if isinstance(exc, InputError) else f"{exc.__class__.__name__}: "
            failures.append((path.name, kind + first_line(exc)))
            logger.debug("batch: %s failed", path, exc_info=True)
    typer.echo(f"{done} done, {skipped} skipped (already done), {len(failures)} failed", err=True)
    for name, message in failures:
        typer.echo(f"failed: {name}: {message}", err=True)
    if failures:
        raise typer.Exit(1)


@guarded
@request_flags(
    help={
        "options": "key=value for every method, or method:key=value for one (repeatable).",
        "num_images": "Images per method (one tile each).",
    },
    per_method_options=True,
)
@model_flags()
@runtime_flags()
def compare_command(
    image: Path = typer.Option(..., "--image", "-i", help="Input image."),
    mask: Path = typer.Option(..., "--mask", "-m", help="Mask, white = inpaint."),
    methods: str = typer.Option(
        ..., "--methods", help="Comma-separated methods, e.g. brushnet,blended-latent-diffusion,repaint."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Grid .png (a .json sidecar is written too)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    max_pixels: int | None = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP),
    request: dict = None,
    models: dict = None,
    runtime: Any = None,
) -> None:
    """Run several methods with the same seed and settings; write a labelled grid: input, mask, each output.

    A method that fails gets a grey tile; the exit code is then 1."""
    import secrets

    from PIL import Image

    from ..errors import first_line
    from ..io import check_output_path, make_grid, save_png_with_metadata
    from ..methods import ModelPaths, get_method_class, prepare, run

    runtime.apply()
    names = [name.strip() for name in methods.split(",") if name.strip()]
    if not names:
        fail("--methods is empty")
    classes = [get_method_class(name) for name in names]
    # the whole set of model flags is given to every method: each listed method must find the ones it needs, and
    # every flag must be read by one of them (checked before anything loads)
    paths = ModelPaths(**models)
    for cls in classes:
        paths.require(cls)
    refuse_models_no_method_reads(models, classes)
    _refuse_guide_controlnet(models, "compare")
    [grid_path] = output_paths(output, 1)
    refuse_overwriting_inputs([grid_path], [image, mask], overwrite)
    refuse_replacing_other_json([grid_path], overwrite)
    refuse_replacing_other_images([grid_path], overwrite)
    check_output_path(grid_path)
    check_output_path(grid_path.with_suffix(".json"))
    per_method = split_options(request.pop("options"), names)
    if request["seed"] is None:
        request["seed"] = secrets.randbelow(2**32)  # one seed shared by every method
    jobs = {name: prepare(get_method_class(name), image, mask, {**request, "options": per_method[name]},
                          max_pixels=max_pixels) for name in names}  # fmt: skip
    first = next(iter(jobs.values()))
    tiles = [first.image, Image.fromarray(first.hole.astype("uint8") * 255)]
    labels = ["input", "mask"]
    report: dict[str, Any] = {
        "seed": request["seed"],
        "inputs": {"image": str(image), "mask": str(mask)},
        "methods": {},
    }
    failed = False
    for name in names:
        try:
            with StepBar(name, runtime.quiet) as bar:
                # the whole set of model flags is given; each method gets the ones it reads
                used = _model_paths(models, get_method_class(name)).used_by(get_method_class(name))
                result = run(_load(name, used, runtime), jobs[name], on_step=bar)
            for i, img in enumerate(result.images):
                tiles.append(img)
                labels.append(name if len(result.images) == 1 else f"{name} #{i}")
            report["methods"][name] = result.metadata()
            typer.echo(
                f"{name}: {result.timings['generate_s']:.2f} s, {result.unet_calls} UNet calls", err=True
            )
        except Exception as exc:  # noqa: BLE001 - one failing method still leaves a grid of the others
            failed = True
            message = first_line(exc)
            tiles.append(Image.new("RGB", first.image.size, (128, 128, 128)))
            labels.append(f"{name} (failed)")
            report["methods"][name] = {"error": message}
            typer.echo(f"failed: {name}: {message}", err=True)
    grid = make_grid([tiles], labels=[labels])
    save_png_with_metadata(grid, grid_path, report)
    typer.echo(str(grid_path))
    if failed:
        raise typer.Exit(1)


@guarded
@request_flags(exclude=["invert_mask"])  # the mask is built from the extents
@model_flags()
@runtime_flags()
def outpaint_command(
    image: Path = typer.Option(..., "--image", "-i", help="Input image."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .png (several images: out-0.png, ...)."),
    extend_left: int = typer.Option(0, "--extend-left", min=0, help="Pixels added on the left."),
    extend_right: int = typer.Option(0, "--extend-right", min=0, help="Pixels added on the right."),
    extend_top: int = typer.Option(0, "--extend-top", min=0, help="Pixels added at the top."),
    extend_bottom: int = typer.Option(0, "--extend-bottom", min=0, help="Pixels added at the bottom."),
    overlap: int = typer.Option(
        0, "--overlap", min=0, help="Also repaint this many original pixels per side."
    ),
    fill: str = typer.Option("edge", "--fill", help="Pre-fill of the new area: edge or black."),
    method: str = typer.Option("brushnet", "--method", help=METHOD_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    max_pixels: int | None = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP),
    request: dict = None,
    models: dict = None,
    runtime: Any = None,
) -> None:
    """Extend the canvas by the given pixels per side and paint the new area (outpainting)."""
    from ..methods import get_method_class, prepare_outpaint

    runtime.apply()
    if fill not in ("edge", "black"):
        fail(f"--fill must be edge or black, got {fill!r}")
    if extend_left + extend_right + extend_top + extend_bottom == 0:
        fail("give at least one of --extend-left/--extend-right/--extend-top/--extend-bottom")
    cls = get_method_class(method)
    refuse_unused_models(models, cls)
    _refuse_guide_controlnet(models, "outpaint")
    outputs = _checked_outputs(output, request["num_images"], [image], overwrite)
    job = prepare_outpaint(
        cls,
        image,
        extend_left,
        extend_top,
        extend_right,
        extend_bottom,
        overlap,
        fill,
        request,
        max_pixels=max_pixels,
    )
    _model_paths(models, cls)
    _generate_and_write(method, job, models, runtime, outputs, {"image": str(image)}, f"outpaint {method}")


@guarded
def methods_command() -> None:
    """List the methods: what each needs, the families it runs on, its default scheduler and options."""
    from ..methods import method_classes

    for name, cls in method_classes().items():
        info = cls.describe()
        models = " ".join(f"--{m.replace('_', '-')}" for m in info["models"]) or "(none)"
        optional = " ".join(f"[--{m.replace('_', '-')}]" for m in info["optional_models"])
        schedulers = ", ".join(info["schedulers"]) if info["schedulers"] else "any"
        typer.echo(f"{name}: {cls.description}")
        typer.echo(f"    models: {models} {optional}".rstrip())
        typer.echo(f"    families: {', '.join(info['families'])}; scheduler: {info['default_scheduler']} "
                   f"(takes {schedulers})")  # fmt: skip
        for field, spec in cls.Options.model_fields.items():
            typer.echo(f"    --option {field}={spec.default!r}  {spec.description or ''}")


@guarded
def make_tiny_models_command(
    out_dir: Path = typer.Argument(
        ..., help="Folder to write the model set into (base/, brushnet/, inpaint/, ...)."
    ),
    preset: str = typer.Option(
        "tiny",
        "--preset",
        help="tiny, small, sd15 (the real SD1.5 sizes), tiny-xl or sdxl (the real SDXL sizes).",
    ),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace model folders already in OUT_DIR (otherwise they are refused)."
    ),
) -> None:
    """Write random-weight model folders for every method (offline; for trying the tools, not for quality)."""
    from ..methods import method_classes, model_slots
    from ..random_models import PRESETS, build_model_set, preset_family

    if preset not in PRESETS:
        fail(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    family = preset_family(preset)
    # only the models some method runs on this family (no PowerPaint folder for SDXL: it has no SDXL form)
    used = {
        slot.name
        for cls in method_classes().values()
        if family in cls.families
        for slot in (*cls.models, *cls.optional_models)
    }
    slots = [slot for slot in model_slots().values() if slot.random_builder is not None and slot.name in used]
    built = build_model_set(out_dir, slots, preset, seed=seed, overwrite=overwrite)
    for name, path in built.items():
        typer.echo(f"{path}  (--{name.replace('_', '-')})")
    if "inpaint_model" in built:  # HD-Painter's RASG reads cross-attention at 1/4 of the latent size
        import json

        blocks = json.loads((Path(built["inpaint_model"]) / "unet" / "config.json").read_text())[
            "down_block_types"
        ]
        if len(blocks) < 3 or "CrossAttn" not in blocks[2]:
            typer.echo(
                "note: this UNet has no cross-attention at 1/4 of the latent size, which HD-Painter's RASG reads: "
                "run hd-painter on these models with --option rasg=false",
                err=True,
            )


# batch, compare and outpaint take the model flags of every method, but no --control-image: the guide ControlNet's
# shared help (which points to --control-image) would point to a flag they lack
for _command in (batch_command, compare_command, outpaint_command):
    set_flag_help(_command, "guide_controlnet", NO_CONTROL_IMAGE_HELP)
del _command
