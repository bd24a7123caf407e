"""The benchmark runner: methods × dataset under one protocol, resumable and shardable.

Run-folder layout (``RUN_DIR``)::

    run.json                                  protocol + dataset; a rerun must match it
    outputs/<method>/<mask_kind>/raw/<id>.png      the method's output as generated (no paste-back)
    outputs/<method>/<mask_kind>/blended/<id>.png  the same output pasted into the original with the
                                                   paper's blurred blending (reference §4)
    rows/<method>/<mask_kind>/<id>.json       {"metrics": [...], "weights": {metric: id}, "rows": [raw, blended]}
    failures.jsonl                            entries that could not be run (bad image, RLE, id), one a line
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import GenerationError, InputError, first_line
from ..io import atomic_write_bytes, png_bytes, read_png_metadata
from .datasets import BenchDataset, BenchItem, shard_indices
from .protocol import BenchSettings

logger = logging.getLogger(__name__)

__all__ = [
    "METRIC_COLUMNS",
    "BenchSettings",
    "check_item_id",
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
_UNSET = object()


@dataclass
class RunStats:
    """What a call of :func:`run_benchmark` did, per (method, item)."""

    generated: int = 0
    skipped: int = 0
    rescored: int = 0
    failed: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.generated} generated, {self.skipped} skipped (done), {self.rescored} re-scored, "
            f"{self.failed} failed"
        )


def _record_failures(run_dir: Path, failures: list[dict[str, str]], process_index: int) -> None:
    """Add this call's failed entries to ``failures.jsonl`` (one file per process), and drop the earlier ones
    that have rows now (a rerun that succeeded) or failed again (listed once, with this call's error)."""
    path = run_dir / ("failures.jsonl" if process_index == 0 else f"failures.{process_index}.jsonl")
    if not path.is_file() and not failures:
        return
    kept = []
    again = {(f["method"], f["mask_kind"], f["id"]) for f in failures}
    for line in (path.read_text() if path.is_file() else "").splitlines():
        try:
            entry = json.loads(line)
            key = (entry["method"], entry["mask_kind"], entry["id"])
        except (ValueError, KeyError, TypeError):
            kept.append(line)  # not a record this function wrote: kept as it was
            continue
        if key in again:
            continue
        try:
            done = output_paths(run_dir, *key)["rows"].is_file()
        except InputError:  # an unsafe id never has rows
            done = False
        if not done:
            kept.append(line)
    lines = kept + [json.dumps(f) for f in failures]
    if lines:
        atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())
    else:
        path.unlink()


def check_item_id(item_id: str) -> str:
    """An entry id becomes a file name only if it is a plain one: no path separator, no leading dot (``..``),
    no control character, at most 200 characters. Anything else is refused (the entry is skipped and recorded),
    so no output is ever written outside the run folder.

    Raises:
        InputError: an unsafe id.
    """
    if (
        not item_id
        or len(item_id) > 200
        or item_id.startswith(".")
        or any(c in item_id for c in "/\\")
        or any(ord(c) < 32 for c in item_id)
    ):
        raise InputError(f"entry id {item_id!r} is not a plain file name; refused")
    return item_id


def output_paths(run_dir: Path, method: str, mask_kind: str, item_id: str) -> dict[str, Path]:
    """Where one entry's outputs and row file go (the id is checked by :func:`check_item_id`)."""
    check_item_id(item_id)
    base = run_dir / "outputs" / method / mask_kind
    return {
        "raw": base / "raw" / f"{item_id}.png",
        "blended": base / "blended" / f"{item_id}.png",
        "rows": run_dir / "rows" / method / mask_kind / f"{item_id}.json",
    }


def score_item(
    suite, item: BenchItem, outputs: Mapping[str, Image.Image], mask_kind: str, scorers: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """Score each variant of one generation.

    Args:
        suite: a :class:`~brushnet.metrics.MetricSuite` (its active metrics are computed).
        item: the benchmark item (original image, mask = hole, caption).
        outputs: variant name → output image at the item's size.
        mask_kind: ``"inside"`` or ``"outside"``.
        scorers: names of extra per-image scorers (:mod:`brushnet.bench.scorers`).

    Returns:
        variant → {column: value} (see :data:`METRIC_COLUMNS`, plus the extra scorers' columns).
    """
    import torch

    from ..image import pil_to_tensor
    from .scorers import get_scorer

    names = list(outputs)
    generated = torch.cat([pil_to_tensor(outputs[name]) for name in names])
    original = pil_to_tensor(item.image).expand_as(generated)
    hole = torch.from_numpy(item.mask.astype(np.float32))[None, None].expand(len(names), 1, *item.mask.shape)
    scores = suite(generated, original, hole, [item.caption] * len(names)) if suite.metrics else {}
    result: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(names):
        row = {METRIC_COLUMNS[metric]: float(values[index]) for metric, values in scores.items()}
        for scorer in scorers:
            row.update(get_scorer(scorer)(outputs[name], item, mask_kind))
        result[name] = row
    return result


def _protocol(record: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a ``run.json`` record a rerun must match, flat: each request setting by name, each method
    option as ``method:key`` (a method without options is no setting), the scorers, the dataset's path and kind,
    the dtype."""
    settings = dict(record.get("settings") or {})
    flat = {key: value for key, value in settings.items() if key not in ("options", "scorers")}
    for method, options in (settings.get("options") or {}).items():
        for key, value in (options or {}).items():
            flat[f"{method}:{key}"] = value
    if "scorers" in settings:
        flat["scorers"] = settings["scorers"]
    for key, value in (record.get("dataset") or {}).items():
        if key != "size":  # a later call may run on more of the set
            flat["dataset" if key == "path" else f"dataset_{key}"] = value
    flat["dtype"] = record.get("dtype")
    return flat


def _describe(protocol: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{key}={protocol[key]!r}" if key in protocol else f"{key} unset" for key in keys)


def _check_run_json(run_dir: Path, record: dict[str, Any], write: bool) -> None:
    """Refuse to mix outputs of another protocol, dataset or dtype into ``run_dir`` (naming the settings that
    differ); merge method and mask-kind lists (a later call may add methods, or run on more of the set)."""
    path = run_dir / "run.json"
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise InputError(f"{path}: not valid JSON; use another --output") from None
        if not isinstance(previous, dict):
            raise InputError(f"{path}: not a run record (a JSON object); use another --output")
        before, now = _protocol(previous), _protocol(json.loads(json.dumps(record)))  # as read back
        differ = [key for key in {**before, **now} if before.get(key, _UNSET) != now.get(key, _UNSET)]
        if differ:
            raise InputError(
                f"{run_dir} was made with {_describe(before, differ)} (this run: {_describe(now, differ)}); "
                "use another --output"
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


def _same_weights(rows: dict[str, Any], weights_id: Mapping[str, str]) -> bool:
    """Whether a row file's metrics were scored with the weights given now (its ``weights``: metric -> id). A row
    file without them (written before they were recorded) counts as scored with other weights: re-scored once."""
    recorded = rows.get("weights")
    if not weights_id:
        return True
    return isinstance(recorded, dict) and all(recorded.get(m) == i for m, i in weights_id.items())


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
    from ..methods import ModelPaths, available_methods, get_method_class, load_method, prepare, run
    from ..metrics import MetricSuite

    settings = settings or BenchSettings()
    run_dir = Path(run_dir)
    if isinstance(models, dict):
        models = ModelPaths(**models)
    load = load or load_method
    classes = {name: get_method_class(name) for name in methods}
    for cls in classes.values():  # every request and option is checked before anything is written
        settings.request_for(cls, "")
    unknown = [name for name in settings.options if name not in available_methods()]
    if unknown:  # a misspelt method name would leave its options unused
        raise InputError(
            f"settings.options names method {unknown[0]!r}, which is not a method; "
            f"choose from: {', '.join(available_methods())}"
        )
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
    # shard 0 merges what it adds; another shard that starts first records the protocol the others are held to
    _check_run_json(run_dir, record, write=process_index == 0 or not (run_dir / "run.json").is_file())
    suite = metric_suite if metric_suite is not None else MetricSuite(metric_weights or {})
    active = sorted(suite.metrics)
    weights_id = dict(getattr(suite, "weights_id", {}))  # metric -> id of the weights it scores with now
    indices = shard_indices(len(dataset), process_index, num_processes)
    stats = RunStats()
    mask_kind = dataset.mask_kind
    for name in methods:
        todo, rescore = [], []
        earlier: dict[int, dict[str, Any]] = {}  # re-scored items' rows: their other metrics are kept
        for index in indices:
            try:
                paths = output_paths(run_dir, name, mask_kind, dataset.ids[index])
            except InputError:
                todo.append(index)  # refused below, recorded with the other failures
                continue
            have_outputs = paths["raw"].is_file() and paths["blended"].is_file()
            rows = _read_rows(paths["rows"]) if have_outputs else None
            if (
                rows is not None
                and set(active) <= set(rows.get("metrics", []))
                and _same_weights(rows, weights_id)
            ):
                stats.skipped += 1
            elif have_outputs:
                rescore.append(index)
                if rows is not None:
                    earlier[index] = rows
            else:
                todo.append(index)
        logger.info(
            "%s/%s: %d to generate, %d to re-score, %d done (shard %d/%d)",
            name, mask_kind, len(todo), len(rescore), len(indices) - len(todo) - len(rescore),
            process_index, num_processes,
        )  # fmt: skip
        method = load(name, models, device=device, dtype=dtype) if todo else None
        for index in sorted(todo + rescore):
            item_id = dataset.ids[index]
            try:
                paths = output_paths(run_dir, name, mask_kind, item_id)
                item = dataset[index]
                if index in todo:
                    request = settings.request_for(classes[name], item.prompt)
                    job = prepare(classes[name], item.image, item.mask, request)
                    result = run(method, job)
                    raw = result.images[0]
                    # pasted back around the hole the method was given (grown by mask_grow), as inpaint() does
                    blended = blend_pil(item.image, raw, job.hole, kernel_size=settings.blend_kernel_size)
                    metadata = result.metadata()
                    atomic_write_bytes(paths["raw"], png_bytes(raw, metadata))
                    atomic_write_bytes(paths["blended"], png_bytes(blended))
                    stats.generated += 1
                else:
                    raw = Image.open(paths["raw"]).convert("RGB")
                    blended = Image.open(paths["blended"]).convert("RGB")
                    metadata = read_png_metadata(paths["raw"])
                    stats.rescored += 1
            # one bad entry never stops the run (a NaN image included)
            except (InputError, OSError, ValueError, GenerationError) as exc:
                message = first_line(exc)
                logger.warning("%s/%s/%s: skipped: %s", name, mask_kind, item_id, message)
                stats.failed += 1
                stats.failures.append(
                    {"method": name, "mask_kind": mask_kind, "id": item_id, "error": message}
                )
                continue
            scores = score_item(suite, item, {"raw": raw, "blended": blended}, mask_kind, settings.scorers)
            timing = _timing(metadata)
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
            metrics, weights = active, dict(weights_id)
            if index in earlier:  # metrics scored before and not now (weights not given this time) stay
                before = {
                    row.get("variant"): row for row in earlier[index].get("rows", []) if isinstance(row, dict)
                }
                for row in rows:
                    for key, value in before.get(row["variant"], {}).items():
                        row.setdefault(key, value)
                metrics = sorted(set(active) | set(earlier[index].get("metrics", [])))
                kept = earlier[index].get("weights")
                if isinstance(kept, dict):
                    weights = {**{k: v for k, v in kept.items() if k not in active}, **weights}
            payload = {"metrics": metrics, "weights": weights, "rows": rows}
            atomic_write_bytes(paths["rows"], json.dumps(payload, indent=1).encode())
        del method
    _record_failures(run_dir, stats.failures, process_index)
    return stats
