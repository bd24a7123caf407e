"""The benchmark runner: methods × dataset under one protocol, resumable and shardable.

Run-folder layout (``RUN_DIR``)::

    run.json                                  protocol + dataset; a rerun must match it
    outputs/<method>/<mask_kind>/raw/<id>.png      the method's output as generated (no paste-back)
    outputs/<method>/<mask_kind>/blended/<id>.png  the same output pasted into the original with the
                                                   paper's blurred blending (reference §4)
    rows/<method>/<mask_kind>/<id>.json       {"metrics": [...], "rows": [raw row, blended row]}
    results/                                  the merged reports (see :mod:`brushnet.bench.report`)

Each image is generated **once**; "with blending" and "without blending" are two views of that single
generation, scored separately. Every file is written atomically (temporary file + ``os.replace``), so a
killed run leaves only whole files, and a rerun skips every image whose two outputs and row file exist
(it re-scores from the saved PNGs when outputs exist without rows, or when metrics were added).

Sharding: process ``k`` of ``n`` handles items ``i`` with ``i % n == k`` (from accelerate's
``PartialState`` under ``accelerate launch``); any process, or ``brushnet bench report``, can merge.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..cli_common import atomic_write_bytes
from ..image import InputError
from .datasets import BenchDataset, BenchItem, shard_indices

logger = logging.getLogger(__name__)

__all__ = [
    "METRIC_COLUMNS",
    "BenchSettings",
    "RunStats",
    "run_benchmark",
    "score_item",
    "output_paths",
]

# MetricSuite name -> per-image row column. "_orig" = the original BrushBench script's definition.
METRIC_COLUMNS: dict[str, str] = {
    "image_reward": "image_reward",
    "hps": "hps",
    "aesthetic": "aesthetic",
    "psnr_brushbench": "psnr_orig",
    "mse_brushbench": "mse_orig",
    "lpips": "lpips",
    "clip_score": "clip_score",
    "psnr": "psnr",
    "mse": "mse",
    "ssim": "ssim",
}
VARIANTS = ("raw", "blended")
GENERATION_CHUNK = "brushnet"
"""PNG text chunk of every raw output: the generation's JSON (method, seed, parameters, timings, UNet calls),
so that rows can be rebuilt from the outputs alone."""


class BenchSettings(BaseModel):
    """The generation protocol; defaults are the BrushNet paper's (reference §3, §6)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0)
    seed: int = Field(1234, ge=0, description="The same seed for every image (the paper's protocol).")
    scheduler: str = "unipc-original"
    negative_prompt: str = ""
    blend_kernel_size: int = Field(21, ge=1, description="Blurred-blending kernel (paper: 21).")
    resolution: int | None = Field(
        None, description="Working size; None = the image's size (512 on BrushBench)."
    )
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Method name -> options.")


@dataclass
class RunStats:
    """What a call of :func:`run_benchmark` did, per (method, item)."""

    generated: int = 0
    skipped: int = 0
    rescored: int = 0
    failed: int = 0


def _atomic_png(path: Path, image: Image.Image, metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``image`` as PNG atomically; ``metadata`` goes into its ``brushnet`` text chunk as JSON."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = None
    if metadata is not None:
        info = PngInfo()
        info.add_text(GENERATION_CHUNK, json.dumps(metadata, sort_keys=True, default=str))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buffer.getvalue())


def _generation_record(path: Path) -> dict[str, Any]:
    """The generation metadata a raw output carries (empty when missing or unreadable)."""
    try:
        with Image.open(path) as image:
            return json.loads(image.text.get(GENERATION_CHUNK, "{}"))
    except (OSError, ValueError, AttributeError):
        return {}


def output_paths(run_dir: Path, method: str, mask_kind: str, item_id: str) -> dict[str, Path]:
    base = run_dir / "outputs" / method / mask_kind
    return {
        "raw": base / "raw" / f"{item_id}.png",
        "blended": base / "blended" / f"{item_id}.png",
        "rows": run_dir / "rows" / method / mask_kind / f"{item_id}.json",
    }


def _text_alignment(
    image: Image.Image, mask: np.ndarray, target: Mapping[str, Any]
) -> dict[str, bool | None]:
    """Shapes-world text alignment: does the prompted colour dominate the hole, is its blob the prompted shape."""
    from ..data.shapes_metrics import classify_shape, dominant_colour

    colour, shape = target.get("colour"), target.get("shape")
    rgb = np.asarray(image.convert("RGB"))
    return {
        "colour_ok": None if colour is None else dominant_colour(rgb, mask) == colour,
        "shape_ok": None if shape is None or colour is None else classify_shape(rgb, mask, colour) == shape,
    }


def score_item(
    suite, item: BenchItem, outputs: Mapping[str, Image.Image], mask_kind: str
) -> dict[str, dict[str, Any]]:
    """Score each variant of one generation.

    Args:
        suite: a :class:`~brushnet.metrics.MetricSuite` (its active metrics are computed).
        item: the benchmark item (original image, mask = hole, caption).
        outputs: variant name → output image at the item's size.
        mask_kind: ``"inside"`` or ``"outside"``; text alignment is scored for inside-inpainting only
            (the target describes the hole's object).

    Returns:
        variant → {column: value} (see :data:`METRIC_COLUMNS`, plus ``colour_ok``/``shape_ok``).
    """
    import torch

    from ..image import pil_to_tensor

    names = list(outputs)
    generated = torch.cat([pil_to_tensor(outputs[name]) for name in names])
    original = pil_to_tensor(item.image).expand_as(generated)
    hole = torch.from_numpy(item.mask.astype(np.float32))[None, None].expand(len(names), 1, *item.mask.shape)
    scores = suite(generated, original, hole, [item.caption] * len(names)) if suite.metrics else {}
    result: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(names):
        row = {METRIC_COLUMNS[metric]: float(values[index]) for metric, values in scores.items()}
        target = item.metadata.get("target")
        if mask_kind == "inside" and isinstance(target, Mapping):
            row.update(_text_alignment(outputs[name], item.mask, target))
        result[name] = row
    return result


def _check_run_json(run_dir: Path, record: dict[str, Any], write: bool) -> None:
    """Refuse to mix outputs of another protocol, dataset or dtype into ``run_dir``; merge method and mask-kind
    lists (a later call may add methods, or run on more of the set)."""
    path = run_dir / "run.json"
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise InputError(f"{path}: not valid JSON; use another --output") from None
        checks = {
            "settings": (previous.get("settings"), record["settings"]),
            "dataset": (
                {k: v for k, v in previous.get("dataset", {}).items() if k != "size"},
                {k: v for k, v in record["dataset"].items() if k != "size"},
            ),
            "dtype": (previous.get("dtype"), record["dtype"]),
        }
        for key, (before, now) in checks.items():
            if before != now:
                raise InputError(
                    f"{run_dir} was made with different {key} ({before} vs {now}); use another --output"
                )
        merged = dict(previous)
        merged["methods"] = sorted(set(previous.get("methods", [])) | set(record["methods"]))
        merged["mask_kinds"] = sorted(set(previous.get("mask_kinds", [])) | set(record["mask_kinds"]))
        merged["dataset"]["size"] = max(previous["dataset"].get("size", 0), record["dataset"]["size"])
        record = merged
    if write:
        atomic_write_bytes(path, json.dumps(record, indent=2).encode())


def _timing(generation: Mapping[str, Any]) -> dict[str, Any]:
    """Row columns from a generation record: wall-clock seconds and UNet calls per image."""
    timing: dict[str, Any] = {}
    if "total_s" in generation.get("timings", {}):
        timing["seconds"] = generation["timings"]["total_s"]
    if "unet_calls" in generation:
        timing["unet_calls"] = generation["unet_calls"]
    return timing


def _read_rows(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_benchmark(
    methods: Sequence[str],
    models,
    dataset: BenchDataset,
    run_dir: str | os.PathLike,
    settings: BenchSettings | None = None,
    metric_weights: Mapping[str, str] | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    process_index: int = 0,
    num_processes: int = 1,
    load: Callable[..., Any] | None = None,
    metric_suite=None,
) -> RunStats:
    """Generate and score this process's slice of ``dataset`` with every method; resumable.

    Args:
        methods: registered method names (see :func:`brushnet.methods.available_methods`).
        models: :class:`~brushnet.methods.ModelPaths` (or a dict of its fields).
        dataset: the benchmark set (its ``mask_kind`` decides inside/outside-inpainting).
        run_dir: the run folder (created; see the module docstring for its layout).
        settings: the protocol (default: the paper's).
        metric_weights: :data:`brushnet.metrics.WEIGHT_KEYS` key → path; metrics without weights are
            skipped with one log line each.
        device, dtype: where and in which precision the methods run.
        process_index, num_processes: this process's shard.
        load: ``load(name, models, device, dtype) -> InpaintMethod`` (default
            :func:`brushnet.methods.load_method`).
        metric_suite: an already built :class:`~brushnet.metrics.MetricSuite` (else built from
            ``metric_weights``).

    Returns:
        Counts of generated, skipped (already done), re-scored and failed items.
    """
    from ..image import blend_pil
    from ..methods import InpaintRequest, ModelPaths, inpaint, load_method
    from ..metrics import MetricSuite

    settings = settings or BenchSettings()
    run_dir = Path(run_dir)
    if isinstance(models, dict):
        models = ModelPaths(**models)
    load = load or load_method
    record = {
        "protocol": "generate once; score the raw output and its blurred-blended paste-back",
        "settings": settings.model_dump(),
        "dataset": {"path": str(Path(dataset.root).resolve()), "kind": dataset.kind, "size": len(dataset)},
        "methods": list(methods),
        "mask_kinds": [dataset.mask_kind],
        "safety_checker": "off",
        "device": device,
        "dtype": dtype,
    }
    _check_run_json(run_dir, record, write=process_index == 0)
    suite = metric_suite if metric_suite is not None else MetricSuite(metric_weights or {})
    active = sorted(suite.metrics)
    indices = shard_indices(len(dataset), process_index, num_processes)
    stats = RunStats()
    mask_kind = dataset.mask_kind
    for name in methods:
        todo, rescore = [], []
        for index in indices:
            paths = output_paths(run_dir, name, mask_kind, dataset.ids[index])
            have_outputs = paths["raw"].is_file() and paths["blended"].is_file()
            rows = _read_rows(paths["rows"]) if have_outputs else None
            if rows is not None and set(active) <= set(rows.get("metrics", [])):
                stats.skipped += 1
            elif have_outputs:
                rescore.append(index)
            else:
                todo.append(index)
        logger.info(
            "%s/%s: %d to generate, %d to re-score, %d done (shard %d/%d)",
            name, mask_kind, len(todo), len(rescore), len(indices) - len(todo) - len(rescore),
            process_index, num_processes,
        )  # fmt: skip
        method = load(name, models, device=device, dtype=dtype) if todo else None
        for index in sorted(todo + rescore):
            item = dataset[index]
            paths = output_paths(run_dir, name, mask_kind, item.id)
            timing: dict[str, Any] = {}
            if index in todo:
                request = InpaintRequest(
                    prompt=item.prompt,
                    negative_prompt=settings.negative_prompt,
                    seed=settings.seed,
                    steps=settings.steps,
                    guidance_scale=settings.guidance_scale,
                    scheduler=settings.scheduler,
                    blend=False,
                    blend_kernel_size=settings.blend_kernel_size,
                    resolution=settings.resolution,
                    options=settings.options.get(name, {}),
                )
                try:
                    result = inpaint(method, item.image, item.mask, request)
                except InputError as exc:
                    logger.warning("%s/%s/%s: skipped: %s", name, mask_kind, item.id, exc)
                    stats.failed += 1
                    continue
                raw = result.images[0]
                blended = blend_pil(item.image, raw, item.mask, kernel_size=settings.blend_kernel_size)
                _atomic_png(paths["blended"], blended)
                _atomic_png(paths["raw"], raw, result.metadata())
                timing = _timing(result.metadata())
                stats.generated += 1
            else:
                raw = Image.open(paths["raw"]).convert("RGB")
                blended = Image.open(paths["blended"]).convert("RGB")
                timing = _timing(_generation_record(paths["raw"]))
                stats.rescored += 1
            scores = score_item(suite, item, {"raw": raw, "blended": blended}, mask_kind)
            rows = []
            for variant, image_path in (("raw", paths["raw"]), ("blended", paths["blended"])):
                rows.append(
                    {
                        "method": name,
                        "mask_kind": mask_kind,
                        "variant": variant,
                        "id": item.id,
                        "prompt": item.prompt,
                        "caption": item.caption,
                        "output": str(image_path.relative_to(run_dir)),
                        "hole_fraction": float(item.mask.mean()),
                        **timing,
                        **scores[variant],
                    }
                )
            payload = {"metrics": active, "rows": rows}
            atomic_write_bytes(paths["rows"], json.dumps(payload, indent=1).encode())
        del method
    return stats
