"""Quick held-out scores of a trained model set: the yardstick of the recipe's pilots.

    python examples/demo_world/evaluate.py --models /tmp/demo_world_run/export --scenes 48 --methods brushnet,sd-inpainting

On the first ``--scenes`` scenes of the mini-BrushBench's evaluation set (``write_eval_set(..., seed=0,
different_object_fraction=0.25)``, inside masks) it reports, with the demo's settings (10 UniPC steps,
guidance 5, seed 1234, no blending, each method's default scheduler and the demo's method options
(``brushnet.demo.run.METHOD_OPTIONS``: RePaint's resampling, HD-Painter without its photo prompt additions);
``--guidance-scale`` and ``--steps`` change the first two):

- the VAE's ceiling: PSNR of ``decode(encode(x))`` against ``x`` on the kept region of the inside and the
  outside masks (what a method that keeps the known latent exactly would score) and on the whole image, and
  the shape accuracy of the reconstruction's hole on the prompts that name the masked object (the object as it
  was, through the decoder every method's output goes through: what a method that redraws it exactly would
  score), overall and per shape;
- the flat fill: ``colour_acc_hole`` / ``shape_acc_hole`` of the hole painted flat in the prompted colour
  (what a method scores that gets the colour and draws no shape of its own: the hole's outline, the masked
  object's silhouette dilated by 3 px, has that object's shape, so on the prompts that name it the flat fill
  scores nearly every shape; only the prompts that name a different object measure a shape drawn inside the
  hole);
- per method: raw kept-region PSNR (``brushnet.metrics.pixel.psnr``, region "kept", as the benchmark), and
  colour / shape accuracy of the hole (``brushnet.data.shapes_metrics``), split by whether the prompt names
  the masked object or a different one, and shape accuracy per prompted shape. The metrics take the background's colours from the 2 px ring around
  the hole; on a raw output that ring is the output's, so an object painted a little over the hole's edge puts
  its own colour in the ring and counts as background. ``colour_acc_hole`` / ``shape_acc_hole`` score the
  hole's content pasted into the original instead (the ring then is the original's), which separates what the
  method put in the hole from how well it kept the rest (the kept PSNR).

``--holes box`` or ``--holes disk`` replaces each hole by the box or disk that holds it: an outline that does not
give the object's shape away, so that shape accuracy measures a shape the method drew (the flat fill then scores
only the prompts for squares, or circles).

The mini-BrushBench (``python -m brushnet.demo.minibench``) is the full measurement; this is its first
scenes, inside masks only, in one process, to compare training settings in minutes, with the demo's scheduler
rather than the benchmark's (:data:`SETTINGS`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from brushnet.demo.run import DEMO_REQUEST

__all__ = ["HOLES", "SETTINGS", "eval_items", "flat_fill", "main", "method_scores", "vae_ceiling"]

SETTINGS = {key: value for key, value in DEMO_REQUEST.items() if key != "blend_kernel_size"}
"""The demo's request for raw outputs (no blend, so no blend kernel; each method's default scheduler: UniPC,
DDIM for RePaint and HD-Painter). The mini-BrushBench differs in one thing: it gives the methods that take any
scheduler the paper's (``unipc-original``, UniPC ending at sigma_min; ``brushnet.bench.protocol.PAPER_SCHEDULER``),
so its images differ by a few levels and its kept PSNR by a few hundredths of a dB (BrushNet on the first 48 scenes:
24.55 dB there, 24.61 here)."""


HOLES = ("silhouette", "box", "disk")
"""Hole shapes of :func:`eval_items`: the mini-BrushBench's (the masked object's silhouette dilated by 3 px), the
smallest box holding that, or the smallest disk around the box's centre holding it. The last two do not give the
object's shape away: a method must draw it."""


def _reshaped_hole(hole: np.ndarray, kind: str) -> np.ndarray:
    """``hole`` (the dilated silhouette) as the :data:`HOLES` kind ``kind``."""
    if kind == "silhouette":
        return hole
    ys, xs = np.nonzero(hole)
    if kind == "box":
        box = np.zeros_like(hole)
        box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
        return box
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    radius = np.hypot(ys - cy, xs - cx).max()
    grid_y, grid_x = np.mgrid[0 : hole.shape[0], 0 : hole.shape[1]]
    return np.hypot(grid_y - cy, grid_x - cx) <= radius + 0.5


def eval_items(count: int, seed: int = 0, holes: str = "silhouette") -> list[dict]:
    """The first ``count`` entries of the mini-BrushBench set: ``{"image", "hole", "prompt", "target",
    "variant"}`` with ``hole`` boolean ``(128, 128)``, True = inpaint: the inside mask, or with ``holes`` "box" /
    "disk" the box or disk that holds it (:data:`HOLES`)."""
    from brushnet.data.rle import decode_brushbench_rle
    from brushnet.data.shapes_writers import write_eval_set

    if holes not in HOLES:
        raise ValueError(f"holes must be one of {', '.join(HOLES)}, got {holes!r}")
    with tempfile.TemporaryDirectory() as folder:
        mapping = json.loads(
            write_eval_set(folder, count, seed=seed, different_object_fraction=0.25).read_text()
        )
        items = []
        for entry in mapping.values():
            hole = decode_brushbench_rle(entry["inpainting_mask"], entry["height"], entry["width"])
            items.append(
                {
                    "image": Image.open(Path(folder) / entry["image"]).convert("RGB"),
                    "hole": _reshaped_hole(hole, holes),
                    "prompt": entry["prompt"],
                    "target": entry["target"],
                    "variant": entry["variant"],
                }
            )
    return items


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _kept_psnr(generated: Image.Image, original: Image.Image, hole: np.ndarray) -> float:
    from brushnet.metrics.pixel import psnr

    mask = torch.from_numpy(hole.astype(np.float32))[None, None]
    return float(psnr(_tensor(generated), _tensor(original), mask, region="kept")[0])


@torch.no_grad()
def vae_ceiling(vae_dir: str | Path, items: list[dict]) -> dict:
    """Mean PSNR (dB) of the VAE's reconstruction (posterior mode) on the kept region of the inside masks,
    of the outside masks (the kept region is then the dilated object) and on the whole image; and the shape
    accuracy of the reconstruction's hole pasted into the original (``shape_acc_hole_same``, per shape
    ``shape_acc_hole_<shape>``) on the items whose prompt names the masked object."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval()
    inside, outside, whole, rows = [], [], [], []
    for item in items:
        x = _tensor(item["image"]) * 2 - 1
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        array = ((recon[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        generated = Image.fromarray(array)
        inside.append(_kept_psnr(generated, item["image"], item["hole"]))
        outside.append(_kept_psnr(generated, item["image"], ~item["hole"]))
        whole.append(_kept_psnr(generated, item["image"], np.zeros_like(item["hole"])))
        if item["variant"] == "same":
            rows.append(_scored(array, item))
    return {
        "inside_kept_psnr": np.mean(inside),
        "outside_kept_psnr": np.mean(outside),
        "psnr": np.mean(whole),
        "shape_acc_hole_same": _mean(rows, "shape_hole_ok"),
        **_by_shape(rows),
    }


def _mean(rows: list[dict], key: str, variant: str | None = None, shape: str | None = None) -> float:
    """Mean of ``key`` over ``rows`` (of one ``variant`` and / or prompted ``shape``, or all); NaN when none has
    it."""
    values = [float(r[key]) for r in rows if variant in (None, r["variant"]) and shape in (None, r["shape"])]
    return float(np.mean(values)) if values else float("nan")


def _by_shape(rows: list[dict]) -> dict:
    """``shape_acc_hole_<shape>``: the hole's shape accuracy per prompted shape."""
    from brushnet.data.shapes import SHAPES

    return {f"shape_acc_hole_{shape}": _mean(rows, "shape_hole_ok", shape=shape) for shape in SHAPES}


def _scored(output, item: dict) -> dict:
    """``prompted_scores`` of ``output`` for ``item`` (hole pasted into its original for the ``_hole`` pair), with
    the item's variant and prompted shape."""
    from brushnet.data.shapes_metrics import prompted_scores

    target = item["target"]
    scores = prompted_scores(output, item["image"], item["hole"], target["colour"], target["shape"])
    return {**scores, "variant": item["variant"], "shape": target["shape"]}


def flat_fill(items: list[dict]) -> dict:
    """Colour / shape accuracy of the hole painted flat in the prompted colour (its palette value) and pasted
    into the original, overall and by variant: the shape score a method gets without drawing a shape."""
    from brushnet.data.shapes import PALETTE

    rows = []
    for item in items:
        filled = np.array(item["image"].convert("RGB"))
        filled[item["hole"]] = PALETTE[item["target"]["colour"]]
        rows.append(_scored(filled, item))

    mean = functools.partial(_mean, rows)
    return {
        "colour_acc_hole": mean("colour_hole_ok"),
        "shape_acc_hole": mean("shape_hole_ok"),
        "shape_acc_hole_same": mean("shape_hole_ok", "same"),
        "shape_acc_hole_different": mean("shape_hole_ok", "different"),
    }


def method_scores(
    models: str | Path,
    method_name: str,
    items: list[dict],
    options: dict | None = None,
    settings: dict | None = None,
) -> dict:
    """Raw kept PSNR and colour / shape accuracy of one method (loaded with ``brushnet.methods``), with the
    demo's :data:`SETTINGS` updated by ``settings`` (e.g. ``{"guidance_scale": 1.0}``) and the demo's options
    for the method updated by ``options``."""
    from brushnet.demo.assets import method_models
    from brushnet.demo.run import demo_options
    from brushnet.methods import inpaint, load_method

    method = load_method(method_name, method_models(method_name, models))
    options = {**demo_options(method_name), **(options or {})}
    rows = []
    start = time.perf_counter()
    for item in items:
        raw = inpaint(
            method, item["image"], item["hole"], prompt=item["prompt"], blend=False, options=options,
            **{**SETTINGS, **(settings or {})},
        ).images[0]  # fmt: skip
        rows.append({"psnr": _kept_psnr(raw, item["image"], item["hole"]), **_scored(raw, item)})

    mean = functools.partial(_mean, rows)
    return {
        "kept_psnr": mean("psnr"),
        "colour_acc": mean("colour_ok"),
        "colour_acc_same": mean("colour_ok", "same"),
        "colour_acc_different": mean("colour_ok", "different"),
        "shape_acc": mean("shape_ok"),
        "colour_acc_hole": mean("colour_hole_ok"),
        "shape_acc_hole": mean("shape_hole_ok"),
        "shape_acc_hole_same": mean("shape_hole_ok", "same"),
        "shape_acc_hole_different": mean("shape_hole_ok", "different"),
        **_by_shape(rows),
        "seconds_per_image": (time.perf_counter() - start) / len(items),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python examples/demo_world/evaluate.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--models", required=True, help="A model set (base/, brushnet/, inpaint/, controlnet/)."
    )
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument(
        "--methods",
        default="brushnet",
        help="Comma-separated; '' for the references only (VAE ceiling, flat fill).",
    )
    parser.add_argument(
        "--holes",
        choices=HOLES,
        default="silhouette",
        help="The hole: the mini-BrushBench's dilated silhouette (default), or the box or disk that holds it, "
        "whose outline does not give the shape away.",
    )
    parser.add_argument("--json", help="Also write the scores here.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (default 1).")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="A method option for every method listed (e.g. conditioning_scale=2.0 for brushnet); repeatable.",
    )
    parser.add_argument(
        "--guidance-scale", type=float, default=SETTINGS["guidance_scale"],
        help=f"Classifier-free guidance of every method (default {SETTINGS['guidance_scale']}, the demo's).",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=int, default=SETTINGS["steps"], help=f"Sampling steps (default {SETTINGS['steps']})."
    )
    args = parser.parse_args(argv)
    if args.guidance_scale < 0 or args.steps < 1:
        parser.error("--guidance-scale must be >= 0 and --steps >= 1")
    if not (Path(args.models) / "base" / "vae").is_dir():
        parser.error(f"--models {args.models}: not a demo model set (no base/vae folder)")
    from brushnet.methods.registry import available_methods

    unknown = [name for name in filter(None, args.methods.split(",")) if name not in available_methods()]
    if unknown:
        parser.error(
            f"--methods: unknown method(s) {', '.join(unknown)}; choose from {', '.join(available_methods())}"
        )
    options = {}
    for text in args.option:
        key, sep, value = text.partition("=")
        if not sep or not key:
            parser.error(f"--option {text!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)  # numbers, true/false, lists
        except json.JSONDecodeError:
            options[key] = value  # a word such as text-guided
    torch.set_num_threads(args.threads)
    items = eval_items(args.scenes, holes=args.holes)
    settings = {**SETTINGS, "guidance_scale": args.guidance_scale, "steps": args.steps}
    report = {
        "scenes": args.scenes,
        "holes": args.holes,
        "settings": settings,
        "options": options,
        "vae": vae_ceiling(Path(args.models) / "base" / "vae", items),
    }
    report["flat_fill"] = flat_fill(items)
    print(f"VAE ceiling: {json.dumps({k: round(v, 2) for k, v in report['vae'].items()})}", flush=True)
    print(f"flat fill: {json.dumps({k: round(v, 3) for k, v in report['flat_fill'].items()})}", flush=True)
    for name in filter(None, args.methods.split(",")):
        scores = method_scores(args.models, name, items, options=options, settings=settings)
        report[name] = scores
        print(f"{name}: {json.dumps({k: round(v, 3) for k, v in scores.items()})}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
