"""``brushnet demo``: every method on shipped shapes-world scenes (or the user's own), as one labelled grid.

The scenes are drawn from the shapes world (:mod:`brushnet.data.shapes`) by fixed seeds, so nothing but the
model weights is shipped. Each method generates once per scene; the grid shows the raw output and the
same output pasted back with the feathered blend (the paper's "with blending"). The last row asks for the
first row's object to be removed: the prompt is the background's phrase, and PowerPaint runs its
object-removal task (:data:`REMOVAL_OPTIONS`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .assets import DEMO_DIR, METHODS, method_models

__all__ = [
    "DEMO_SCENES",
    "DEMO_REQUEST",
    "DemoScene",
    "RESULTS_FILE",
    "check_demo_request",
    "demo_options",
    "demo_scene",
    "format_results_table",
    "run_demo",
    "SLOWEST_FIRST",
]

SIZE = 128
RESULTS_FILE = DEMO_DIR / "mini_brushbench.json"
"""The mini-BrushBench summary shipped with the weights (written by ``python -m brushnet.demo.minibench``)."""

DEMO_REQUEST = {"steps": 10, "guidance_scale": 5.0, "seed": 1234, "blend_kernel_size": 5}
"""Request fields of the demo and of the mini-BrushBench (the rest are :class:`~brushnet.methods.InpaintRequest`'s
defaults; the scheduler is each method's default: UniPC, RePaint DDIM). The blend kernel is the paper's 21 px at
512 scaled to 128 px (5 px), so the feather reaches 2 px outside the hole. ``brushnet demo``'s flags start from
these values."""

METHOD_OPTIONS = {
    "repaint": {"jump_length": 5, "jump_n_sample": 2},
    "hd-painter": {"positive_prompt": "", "default_negative_prompt": ""},
}
"""Per-method options of the demo and the mini-BrushBench: RePaint resamples each 5-step segment twice
(its paper uses 10 and 10, ten times the cost of the other methods; here about twice). HD-Painter runs without
its photo prompt additions ("Full HD, 4K, ...", its long negative prompt): the demo's text encoder knows only
shapes-world words, and those additions turn its output into noise (docs/hd_painter.md)."""

REMOVAL_OPTIONS = {"powerpaint": {"task": "object-removal"}}
"""Per-method options of the mini-BrushBench's object-removal pass (over :data:`METHOD_OPTIONS`): PowerPaint
uses its removal task; the other methods have none and get the removal set's prompt (the background's
phrase) like any prompt."""

METHOD_LABELS = {
    "brushnet": "BrushNet",
    "blended-latent-diffusion": "BLD",
    "sd-inpainting": "SD-inpaint",
    "controlnet-inpaint": "CN-inpaint",
    "repaint": "RePaint",
    "hd-painter": "HD-Painter",
    "powerpaint": "PowerPaint",
}


@dataclass(frozen=True)
class DemoSpec:
    """A shipped scene: eval-split scene ``index`` of world seed ``seed``; hole = object ``target`` dilated by
    3 px; ``prompt`` = what to paint (default: the masked object itself). With ``removal`` the object is to go:
    the prompt is the background's phrase (as in the mini-BrushBench's removal pass) and methods with a
    removal mode use it (:data:`REMOVAL_OPTIONS`)."""

    seed: int
    index: int
    target: int = 0
    prompt: str | None = None
    removal: bool = False


DEMO_SCENES: tuple[DemoSpec, ...] = (
    DemoSpec(seed=7, index=0, target=0),
    DemoSpec(seed=7, index=1, target=0),
    DemoSpec(seed=7, index=2, target=0, prompt="a yellow square"),
    DemoSpec(seed=7, index=0, target=0, removal=True),
)
"""The grid's rows; the third asks for a different object than the one masked out, the last for the first
row's object to be removed."""


@dataclass
class DemoScene:
    """An input of the demo: image, hole (``True`` = generate), prompt, a one-line description, and whether
    the object in the hole is to be removed."""

    image: Image.Image
    hole: np.ndarray
    prompt: str
    label: str
    removal: bool = False


def demo_scene(spec: DemoSpec, powerpaint: bool = True) -> DemoScene:
    """Render a :class:`DemoSpec` (deterministic); ``powerpaint``: whether PowerPaint is among the methods (a
    removal scene's label then names its removal task)."""
    from ..data.shapes import dilate_mask, render_scene, sample_scene, scene_rng

    scene = sample_scene(scene_rng("eval", spec.seed, spec.index), size=SIZE, min_gap=8)
    image, masks = render_scene(scene)
    target = scene.objects[spec.target % len(scene.objects)]
    hole = dilate_mask(masks[spec.target % len(scene.objects)], 3)
    if spec.removal:
        prompt = spec.prompt or scene.background.phrase
        label = f'remove {target.phrase}: prompt "{prompt}"'
        if powerpaint:
            label += "  (PowerPaint: task object-removal)"
    else:
        prompt = spec.prompt or target.phrase
        label = f'prompt "{prompt}"  (masked: {target.phrase})'
    return DemoScene(image, hole, prompt, label, spec.removal)


def demo_options(method: str, removal: bool = False, steps: int | None = None) -> dict:
    """The options ``method`` runs with in the demo (:data:`METHOD_OPTIONS`, and for a removal scene
    :data:`REMOVAL_OPTIONS` over them). With ``steps`` fewer than RePaint's jump length, the jumps are that
    long (``brushnet demo --steps 3`` failed on RePaint's jump length, which the demo does not let one set)."""
    options = {**METHOD_OPTIONS.get(method, {}), **(REMOVAL_OPTIONS.get(method, {}) if removal else {})}
    if steps is not None and "jump_length" in options:
        options["jump_length"] = min(options["jump_length"], steps)
    return options


def _mask_view(image: Image.Image, hole: np.ndarray) -> Image.Image:
    """The input with the hole shown in grey-checked white (what the methods do not see)."""
    pixels = np.asarray(image.convert("RGB")).copy()
    ys, xs = np.nonzero(hole)
    checker = ((ys // 4 + xs // 4) % 2).astype(np.uint8)
    pixels[ys, xs] = np.where(checker[:, None] == 1, 255, 200).astype(np.uint8)
    return Image.fromarray(pixels)


RESULTS_LEGEND = (
    "PSNR in / out: how well the pixels outside the hole are kept (dB, higher is better); in: holes over one "
    "object, out: holes covering everything but it",
    "colour / shape: share of object holes painted in the prompted colour / shape (colour by chance: about 1/7), "
    "judged against the output's own pixels around the hole; colour* / shape*: the hole pasted into the "
    "original, which does not count an object painted over the hole's edge as background. The hole is the "
    "object's outline, dilated: painted flat in the prompted colour it scores shape* 0.870 on the 200 "
    "scenes (docs/mini_brushbench.md)",
    "removal: share of holes left with no object colour when the prompt asks for the object to go",
    "blended: the output pasted back through the feathered mask (the paper's 'with blending'); raw: as generated",
    "BLD: Blended Latent Diffusion; SD-inpaint: the 9-channel SD inpainting UNet; CN-inpaint: ControlNet-inpaint",
)
"""What each column of :func:`format_results_table` means (printed under the table)."""


def format_results_table(path: str | os.PathLike = RESULTS_FILE, width: int = 80) -> str:
    """The mini-BrushBench table from its results file, as plain text that fits a ``width``-column terminal:
    one row per method and variant, then a legend and how to reproduce it (docs/mini_brushbench.md). The
    removal column appears when the file has the removal pass."""
    import textwrap

    path = Path(path)
    if not path.is_file():
        return (
            f"(no mini-BrushBench results for the models in {path.parent}: measure them with python -m "
            f"brushnet.demo.minibench --models {path.parent} --work WORK --results {path})"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return f"(unreadable mini-BrushBench results file {path}: {error})"

    def number(value, digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    results = data.get("rows", [])
    removal = any(row.get("removal_acc") is not None for row in results)
    columns = ["method", "variant", "PSNR in", "PSNR out", "colour", "shape", "colour*", "shape*"] + [
        "removal"
    ] * removal
    rows = [
        [
            METHOD_LABELS.get(row["method"], row["method"]),
            "blended" if row["blend"] else "raw",
            number(row.get("inside_psnr"), 2),
            number(row.get("outside_psnr"), 2),
            number(row.get("colour_acc"), 3),
            number(row.get("shape_acc"), 3),
            number(row.get("colour_acc_hole"), 3),
            number(row.get("shape_acc_hole"), 3),
        ]
        + [number(row.get("removal_acc"), 3)] * removal
        for row in results
    ]
    sizes = [max(len(text) for text in column) for column in zip(columns, *rows)]

    def line(cells) -> str:
        return "  ".join(
            cell.ljust(size) if i < 2 else cell.rjust(size)
            for i, (cell, size) in enumerate(zip(cells, sizes))
        ).rstrip()

    def wrap(text: str) -> list[str]:
        return textwrap.wrap(text, width, subsequent_indent="  ", break_on_hyphens=False)

    settings = data.get("settings", {})
    lines = wrap(
        f"Mini-BrushBench: {data.get('images', '?')} held-out shapes-world scenes, {settings.get('steps', '?')} "
        f"steps, seed {settings.get('seed', '?')} (results file {path.name})"
    )
    lines += ["", line(columns), line(["-" * size for size in sizes]), *(line(row) for row in rows), ""]
    for text in RESULTS_LEGEND:
        if removal or not text.startswith("removal:"):
            lines += wrap(text)
    eval_seed = f" --seed {data['eval_seed']}" if data.get("eval_seed") not in (None, 0) else ""
    methods = data.get("methods")
    subset = f" --methods {','.join(methods)}" if methods and list(methods) != list(METHODS) else ""
    lines += wrap(
        f"Reproduce: python -m brushnet.demo.minibench --work WORK --scenes {data.get('images', 200)}"
        f"{eval_seed}{subset} (docs/mini_brushbench.md)"
    )
    return "\n".join(lines)


def check_demo_request(methods: Sequence[str], request: dict | None = None) -> None:
    """Check the request fields over :data:`DEMO_REQUEST` for every method (a scheduler a method lacks, ...)
    without loading a model.

    Raises:
        RequestError: one line naming the first problem.
    """
    from ..methods import InpaintRequest, check_request, get_method_class

    fields = {**DEMO_REQUEST, **{k: v for k, v in (request or {}).items() if v is not None}}
    # the kernel is the grid's own paste-back, not the generation's (which is unblended): checked on its own
    InpaintRequest.build(blend_kernel_size=fields.pop("blend_kernel_size"))
    for name in methods:
        for removal in (False, True):
            check_request(
                get_method_class(name),
                {**fields, "prompt": "", "blend": False, "resolution": SIZE},
                options=demo_options(name, removal, fields["steps"]),
            )


SLOWEST_FIRST = (
    "powerpaint",
    "repaint",
    "hd-painter",
    "controlnet-inpaint",
    "sd-inpainting",
    "blended-latent-diffusion",
    "brushnet",
)
"""The order in which parallel workers take the methods: the longest first, so that no worker is left with a long
one at the end (``brushnet demo`` in one process of two threads on a slow 2-core VM, four scenes, loading included:
PowerPaint 7.8–8.3 s, RePaint 7.0–7.2, HD-Painter 6.3–7.3, ControlNet-inpaint 6.8–6.9, SD-inpainting 3.8–4.3,
BLD 4.2, BrushNet 3.5 without the first method's library imports)."""


def _generate(
    name: str, scenes: Sequence[DemoScene], models_root, request: dict, device: str = "cpu"
) -> tuple[list, float]:
    """One method's raw output for every scene (unblended; the grid pastes back with its own kernel), and the
    seconds it took, loading included."""
    import torch

    from ..methods import inpaint, load_method

    generation = {key: value for key, value in request.items() if key != "blend_kernel_size"}
    start = time.perf_counter()
    with torch.no_grad():
        method = load_method(name, method_models(name, models_root), device=device)
        raws = [
            inpaint(
                method,
                scene.image,
                scene.hole,
                {**generation, "prompt": scene.prompt, "blend": False, "resolution": SIZE},
                options=demo_options(name, scene.removal, request["steps"]),
            ).images[0]
            for scene in scenes
        ]
    return raws, time.perf_counter() - start


def _generate_task(args: tuple) -> tuple[str, list, float]:
    """:func:`_generate` in a worker process, with the method's name for the parent."""
    name = args[0]
    return (name, *_generate(*args))


def _worker_init(threads: int, progress_bars: bool) -> None:
    """A demo worker process: ``threads`` torch threads, the CLI's filter of library noise, and the library
    progress bars as in the parent process. It ignores Ctrl-C: the terminal sends it to the whole process group,
    and the parent, which stops the workers, is the one that reports it."""
    import signal

    import torch

    from ..cli.common import quiet_library_progress, silence_library_noise

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    silence_library_noise()
    if not progress_bars:
        quiet_library_progress()


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (if it is not running) with its "leaked semaphore" warning off:
    workers stopped on Ctrl-C leave their semaphores registered, and the tracker's two-line warning followed the
    demo's "interrupted". The tracker takes its warning filters from this process's ``sys.warnoptions``."""
    import sys
    from multiprocessing import resource_tracker

    quiet = "ignore:resource_tracker:UserWarning"
    added = quiet not in sys.warnoptions
    if added:
        sys.warnoptions.append(quiet)
    try:
        resource_tracker.ensure_running()
    finally:
        if added:
            sys.warnoptions.remove(quiet)


def _library_bars_enabled() -> bool:
    import transformers.utils.logging

    return transformers.utils.logging.is_progress_bar_enabled()


def run_demo(
    output: str | os.PathLike,
    methods: Sequence[str] = METHODS,
    scenes: Sequence[DemoScene] | None = None,
    models_root: str | os.PathLike | None = None,
    on_event: Callable[[str], None] | None = None,
    request: dict | None = None,
    workers: int = 1,
    device: str = "cpu",
    keep: Sequence[str | os.PathLike] = (),
) -> dict:
    """Inpaint ``scenes`` (default: :data:`DEMO_SCENES`) with every method and write ``grid.png`` (and, for
    each method, ``<method>.png`` of the first scene, blended) under ``output``, all at once when every image is
    made. Each PNG carries the demo's record (method, request); a ``<method>.png`` a previous demo run wrote there
    for a method this run leaves out is removed, so the folder holds one run's images.

    Args:
        request: request fields over :data:`DEMO_REQUEST` (steps, guidance, seed, scheduler, ...); the prompt,
            the working size and each method's options are the demo's.
        device: where the methods run (``cpu``, ``cuda``, ...).
        keep: files never removed as an earlier run's images (the scene's own image and mask).
        workers: with more than one, the methods run in that many worker processes (spawned; each with
            ``torch.get_num_threads() // workers`` threads, at least one), the longest first
            (:data:`SLOWEST_FIRST`). These small models keep a core busy with Python as much as with arithmetic,
            so on two cores two processes of one thread take about three quarters of the time one process of two
            threads takes. Each image is the same as from one process with the workers' thread count.

    Returns:
        ``{"grid": path, "images": {method: path}, "seconds": {...}}``; ``seconds`` per method, loading included.
    """
    import torch

    from ..image import blend_pil
    from ..io import atomic_write_together, make_grid, png_bytes

    request = {**DEMO_REQUEST, **{k: v for k, v in (request or {}).items() if v is not None}}
    say = on_event or (lambda message: None)
    if scenes is None:
        scenes = [demo_scene(spec, powerpaint="powerpaint" in methods) for spec in DEMO_SCENES]
    scenes = list(scenes)
    output = Path(output)
    check_demo_request(methods, request)
    raws: dict[str, list] = {}
    seconds: dict[str, float] = {}

    def done(name: str, outputs: list, took: float) -> None:
        raws[name], seconds[name] = outputs, round(took, 2)
        say(f"{name}: {len(scenes)} scene(s) in {took:.1f} s")

    workers = max(1, min(int(workers), len(methods)))
    if workers == 1:
        for name in methods:
            done(name, *_generate(name, scenes, models_root, request, device))
    else:
        import multiprocessing

        order = sorted(methods, key=lambda m: SLOWEST_FIRST.index(m) if m in SLOWEST_FIRST else -1)
        threads = max(1, torch.get_num_threads() // workers)
        _quiet_resource_tracker()
        pool = multiprocessing.get_context("spawn").Pool(
            workers, initializer=_worker_init, initargs=(threads, _library_bars_enabled())
        )
        tasks = [(name, scenes, models_root, request, device) for name in order]
        try:
            # in the order they finish; a method that fails (a missing model) stops the demo at once
            for name, outputs, took in pool.imap_unordered(_generate_task, tasks):
                done(name, outputs, took)
        except BaseException:  # Ctrl-C, a failed method: the workers stop now, not after the queued methods
            pool.terminate()
            pool.join()
            raise
        pool.close()
        pool.join()

    tiles: list[list[tuple[str, Image.Image]]] = [
        [("input", scene.image), ("mask", _mask_view(scene.image, scene.hole))] for scene in scenes
    ]
    record = {"command": "brushnet demo", "request": request, "scenes": [scene.label for scene in scenes]}
    files: list[tuple[Path, bytes]] = []
    for name in methods:
        label = METHOD_LABELS.get(name, name)
        for row, (scene, raw) in enumerate(zip(scenes, raws[name], strict=True)):
            blended = blend_pil(scene.image, raw, scene.hole, kernel_size=request["blend_kernel_size"])
            tiles[row] += [(label, raw), (f"{label} +blend", blended)]
            if row == 0:
                options = demo_options(name, scene.removal, request["steps"])
                metadata = {**record, "method": name, "options": options}
                files.append((output / f"{name}.png", png_bytes(blended, metadata)))
    grid = make_grid(
        [[image for _, image in row] for row in tiles],
        tile=SIZE,
        labels=[[label for label, _ in row] for row in tiles],
        row_titles=[scene.label for scene in scenes],
        title=f"shapes-world demo models; {request['steps']} steps, guidance {request['guidance_scale']}, "
        f"seed {request['seed']}",
        pad=4,
        resample="nearest",
    )
    files.append((output / "grid.png", png_bytes(grid, {**record, "methods": list(methods)})))
    written = atomic_write_together(files)
    kept = {Path(path).resolve() for path in keep}
    for (
        name
    ) in METHODS:  # a previous demo run's image of a method this run left out (not an input of this one)
        stale = output / f"{name}.png"
        if name not in methods and stale.resolve() not in kept and _written_by_demo(stale):
            stale.unlink(missing_ok=True)
    images = {name: str(path) for name, path in zip(methods, written)}
    return {"grid": str(written[-1]), "images": images, "seconds": {name: seconds[name] for name in methods}}


def _written_by_demo(path: Path) -> bool:
    """Whether ``path`` is an image ``brushnet demo`` wrote (its PNG record says so)."""
    from ..io import is_brushnet_image, read_png_metadata

    if not path.is_file() or not is_brushnet_image(path):
        return False
    try:
        return read_png_metadata(path).get("command") == "brushnet demo"
    except (OSError, ValueError):
        return False


def user_scene(image_path: str, mask_path: str, prompt: str, invert_mask: bool = False) -> DemoScene:
    """The user's own scene; it must be 128×128 (the size the demo models were trained at).

    Raises:
        InputError: unreadable files, size mismatch, not 128×128, empty mask.
    """
    from ..errors import InputError
    from ..image import load_image, load_mask

    try:  # more than 128 x 128 pixels is refused from the header, before decoding, in the demo's words
        image = load_image(image_path, max_pixels=SIZE * SIZE)
    except InputError as error:
        if "(--max-pixels)" not in str(error):
            raise
        with Image.open(image_path) as header:
            width, height = header.size
        raise InputError(
            f"image is {width}x{height}; the demo models work on {SIZE}x{SIZE} scenes (resize or crop it first)"
        ) from None
    if image.size != (SIZE, SIZE):
        raise InputError(
            f"image is {image.size[0]}x{image.size[1]}; the demo models work on {SIZE}x{SIZE} scenes "
            f"(resize or crop it first)"
        )
    hole = load_mask(mask_path, size=image.size, invert=invert_mask)
    return DemoScene(image, hole, prompt, f'your image, prompt "{prompt}"')
