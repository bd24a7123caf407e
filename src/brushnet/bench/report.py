"""Reports of a benchmark run, regenerated from the per-image rows alone.

``write_reports(RUN_DIR)`` merges ``rows/**.json`` (every shard's) into ``RUN_DIR/results/``:

- ``per_image.jsonl`` and ``per_image.csv``: one row per method × mask kind × variant × image;
- ``summary.csv``: means per method × variant (raw / blended) × mask kind, with the count;
- ``table.md``: the summary in the BrushNet paper's units (IR×10, HPS×100, AS, PSNR, MSE×10³,
  LPIPS×10³, CLIP) with the published rows for the same set and mask kind under it (BrushBench inside from
  the paper; BrushBench outside and EditBench as re-printed by later papers), plus the corrected pixel
  metrics, SSIM, seconds per image and the shapes-world text alignment;
- ``grid_<mask_kind>.png`` and ``grid_<mask_kind>.html``: input, hole and every method's outputs for a
  sample of the set (the HTML embeds its images, so it is one self-contained file).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..io import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "PUBLISHED",
    "PUBLISHED_BRUSHBENCH_INSIDE",
    "load_rows",
    "summarise",
    "markdown_table",
    "write_reports",
]

PUBLISHED_SOURCE = "published, BrushBench, SD1.5, from the paper"
# Reference README §6, inside-inpainting; columns IR×10, HPS, AS, PSNR, MSE×10³, LPIPS×10³, CLIP.
PUBLISHED_BRUSHBENCH_INSIDE: list[tuple[str, tuple[float | None, ...]]] = [
    ("BLD", (9.78, 25.87, 6.17, 21.33, 9.76, 49.26, 26.15)),
    ("SD Inpainting", (11.72, 27.06, 6.50, 21.52, 13.87, 48.39, 26.17)),
    ("HD-Painter", (11.68, 26.90, 6.42, 22.61, 9.95, 43.50, 26.37)),
    ("PowerPaint", (11.46, 27.35, 6.24, 21.43, 32.73, 48.43, 26.48)),
    ("ControlNet-inpaint (blended)", (11.21, 26.92, 6.39, 22.73, 24.58, 43.49, 26.22)),
    ("BrushNet", (12.36, 27.40, 6.53, 21.65, 9.31, 48.28, 26.48)),
    ("BrushNet blended", (12.64, 27.78, 6.51, 31.94, 0.80, 18.67, 26.39)),
]
PUBLISHED_SECONDARY_SOURCE = "published, the paper's values as re-printed by BrushEdit / NTN-Diff"
# Same columns; None = not recovered. Outside-inpainting: BrushBench's masks inverted (BrushEdit Table IV,
# NTN-Diff Table 1); EditBench: 240 images, random masks (BrushEdit Table V, NTN-Diff Table 6).
PUBLISHED_BRUSHBENCH_OUTSIDE: list[tuple[str, tuple[float | None, ...]]] = [
    ("BLD", (7.81, 26.77, None, 15.85, 35.86, 21.40, 26.73)),
    ("SD Inpainting", (None, None, None, 18.04, 19.87, 15.13, 27.21)),
    ("HD-Painter", (9.66, 27.79, None, 18.03, 22.99, 15.22, 26.96)),
    ("PowerPaint", (7.45, 28.01, None, 18.04, 31.78, 15.13, 26.72)),
    ("ControlNet-inpaint (blended)", (9.57, 27.76, None, 17.50, 37.72, 19.95, 26.92)),
    ("BrushNet", (10.82, 28.02, None, 18.06, 22.86, 15.08, 27.33)),
    ("BrushNet blended", (10.88, 28.09, None, 27.82, 2.25, 4.63, 27.22)),
]
PUBLISHED_EDITBENCH: list[tuple[str, tuple[float | None, ...]]] = [
    ("BLD", (None, None, None, 20.89, 10.93, 31.90, 28.62)),
    ("SD Inpainting", (None, None, None, 23.25, 6.94, 24.30, 28.00)),
    ("HD-Painter", (None, None, None, 23.07, 6.70, 24.32, 28.34)),
    ("PowerPaint", (None, None, None, 23.34, 20.12, 24.12, 27.80)),
    ("ControlNet-inpaint (blended)", (None, None, None, 22.61, 35.93, 26.14, 27.74)),
    ("BrushNet random-mask blended", (None, None, None, 33.66, 0.63, 10.12, 28.87)),
]
PUBLISHED: dict[tuple[str, str], tuple[str, str, list[tuple[str, tuple[float | None, ...]]]]] = {
    ("brushbench", "inside"): ("BrushBench", PUBLISHED_SOURCE, PUBLISHED_BRUSHBENCH_INSIDE),
    ("brushbench", "outside"): ("BrushBench", PUBLISHED_SECONDARY_SOURCE, PUBLISHED_BRUSHBENCH_OUTSIDE),
    ("editbench", "inside"): ("EditBench", PUBLISHED_SECONDARY_SOURCE, PUBLISHED_EDITBENCH),
}
"""(dataset kind, mask kind) → (set name, source, rows) printed under a run's own rows for reference."""
# (row column, table header, scale) in the paper's order; PSNR/MSE are the original script's definition.
PAPER_COLUMNS: list[tuple[str, str, float]] = [
    ("image_reward", "IR×10", 10.0),
    ("hps", "HPS", 100.0),
    ("aesthetic", "AS", 1.0),
    ("psnr_orig", "PSNR", 1.0),
    ("mse_orig", "MSE×10³", 1e3),
    ("lpips", "LPIPS×10³", 1e3),
    ("clip_score", "CLIP", 1.0),
]
EXTRA_COLUMNS: list[tuple[str, str, float]] = [
    ("psnr", "PSNR (corrected)", 1.0),
    ("mse", "MSE×10³ (corrected)", 1e3),
    ("ssim", "SSIM×100", 100.0),
    ("colour_ok", "colour acc. %", 100.0),
    ("shape_ok", "shape acc. %", 100.0),
    ("colour_hole_ok", "colour acc. (hole in original) %", 100.0),
    ("shape_hole_ok", "shape acc. (hole in original) %", 100.0),
    ("seconds", "s / image", 1.0),
]
_KEY = ("method", "variant", "mask_kind")


def load_rows(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every per-image row under ``RUN_DIR/rows`` (all shards), sorted by method, mask kind, id, variant."""
    rows = []
    for path in sorted((Path(run_dir) / "rows").glob("*/*/*.json")):
        try:
            rows.extend(json.loads(path.read_text())["rows"])
        except (OSError, json.JSONDecodeError, KeyError):
            logger.warning("ignoring unreadable row file %s", path)
    rows.sort(key=lambda r: (r["method"], r["mask_kind"], r["id"], r["variant"]))
    return rows


def mixed_weights(run_dir: str | os.PathLike) -> dict[str, int]:
    """Metric -> how many different weight files scored it across the run's row files, for the metrics scored
    with more than one (rows kept from a run with other weights, then not re-scored: a rerun on fewer images)."""
    ids: dict[str, set[str]] = defaultdict(set)
    for path in sorted((Path(run_dir) / "rows").glob("*/*/*.json")):
        try:
            weights = json.loads(path.read_text()).get("weights")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(weights, dict):
            for metric, weights_id in weights.items():
                ids[metric].add(str(weights_id))
    return {metric: len(found) for metric, found in sorted(ids.items()) if len(found) > 1}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means of every numeric column per method × variant × mask kind. ``None`` and non-finite values (an
    infinite PSNR of an exact kept region) are left out of a mean; where that leaves fewer rows than the group's
    ``n``, the count behind the mean is ``n_<column>``."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[key] for key in _KEY)].append(row)
    summary = []
    for key, members in sorted(groups.items()):
        entry: dict[str, Any] = dict(zip(_KEY, key))
        entry["n"] = len(members)
        columns = sorted(
            {c for r in members for c, v in r.items() if c not in _KEY and _number(v) is not None}
        )
        for column in columns:
            values = [_number(r.get(column)) for r in members]
            values = [v for v in values if v is not None]
            entry[column] = sum(values) / len(values)
            if len(values) != len(members):
                entry[f"n_{column}"] = len(values)
        summary.append(entry)
    return summary


def _csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _cell(value: Any, scale: float) -> str:
    number = _number(value)
    return "–" if number is None else f"{number * scale:.2f}"


def markdown_table(summary: list[dict[str, Any]], dataset_kind: str | None = "brushbench") -> str:
    """The summary in the paper's units, per mask kind, with the published rows for that set and mask kind
    (:data:`PUBLISHED`) under it for reference; ``dataset_kind=None`` prints none."""
    lines = ["# Benchmark results", ""]
    lines.append(
        "PSNR and MSE in the first table use the original BrushBench script's definition (MSE = 3-channel "
        "sum of squared errors over the 1-channel pixel count); the corrected per-channel values are in the "
        "second table. Kept-region metrics compare the kept pixels only; `raw` = the method's output, "
        "`blended` = the same output pasted back with blurred blending. – = not computed (no weights given)."
    )
    for mask_kind in sorted({s["mask_kind"] for s in summary}):
        part = [s for s in summary if s["mask_kind"] == mask_kind]
        header = ["Method", "Blend", "n", *(title for _, title, _ in PAPER_COLUMNS)]
        lines += ["", f"## {mask_kind}-inpainting", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        for s in part:
            cells = [
                s["method"],
                s["variant"],
                str(s["n"]),
                *(_cell(s.get(c), k) for c, _, k in PAPER_COLUMNS),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if (dataset_kind, mask_kind) in PUBLISHED:
            set_name, source, published = PUBLISHED[(dataset_kind, mask_kind)]
            count = "240" if set_name == "EditBench" else "600"
            for name, values in published:
                cells = [f"{name} ({source})", "blended" if "blended" in name else "raw", count]
                lines.append("| " + " | ".join(cells + [_cell(v, 1.0) for v in values]) + " |")
        header = ["Method", "Blend", *(title for _, title, _ in EXTRA_COLUMNS)]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for s in part:
            cells = [s["method"], s["variant"], *(_cell(s.get(c), k) for c, _, k in EXTRA_COLUMNS)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _thumb(image: Image.Image, size: int) -> Image.Image:
    image = image.convert("RGB")
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))


def _mask_overlay(image: Image.Image, mask) -> Image.Image:
    import numpy as np

    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    rgb[mask] = rgb[mask] * 0.3 + np.asarray([255, 0, 255], dtype=np.float32) * 0.7
    return Image.fromarray(rgb.round().astype(np.uint8))


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_grid(
    run_dir: Path, rows: list[dict[str, Any]], mask_kind: str, sample: int = 8, size: int = 128
) -> None:
    """Image grid of input, hole overlay and every method's raw/blended output for the first ``sample`` ids."""
    run_dir = Path(run_dir)
    part = [r for r in rows if r["mask_kind"] == mask_kind]
    columns = sorted({(r["method"], r["variant"]) for r in part})
    ids = sorted({r["id"] for r in part})[:sample]
    outputs = {(r["id"], r["method"], r["variant"]): run_dir / r["output"] for r in part}
    dataset = None
    try:
        run = json.loads((run_dir / "run.json").read_text())
        from .datasets import load_dataset

        dataset = load_dataset(run["dataset"]["path"], run["dataset"]["kind"], mask_kind)
        positions = {item_id: i for i, item_id in enumerate(dataset.ids)}
    except Exception as exc:  # noqa: BLE001 - the grid is still useful without the inputs
        logger.warning("grid without inputs: cannot reopen the dataset (%s)", exc)
    titles = (["input", "hole"] if dataset is not None else []) + [f"{m} ({v})" for m, v in columns]
    grid_rows: list[tuple[str, list[Image.Image | None]]] = []
    for item_id in ids:
        cells: list[Image.Image | None] = []
        if dataset is not None:
            item = dataset[positions[item_id]] if item_id in positions else None
            cells += [item.image, _mask_overlay(item.image, item.mask)] if item else [None, None]
        for method, variant in columns:
            path = outputs.get((item_id, method, variant))
            cells.append(Image.open(path).convert("RGB") if path is not None and path.is_file() else None)
        grid_rows.append((item_id, [None if c is None else _thumb(c, size) for c in cells]))
    if not grid_rows:
        return
    label_h = 14
    sheet = Image.new("RGB", (size * len(titles), label_h + size * len(grid_rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(titles):
        draw.text((col * size + 2, 1), title[: size // 6], fill="black")
    for row_index, (_, cells) in enumerate(grid_rows):
        for col, cell in enumerate(cells):
            if cell is not None:
                sheet.paste(cell, (col * size, label_h + row_index * size))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write_bytes(run_dir / "results" / f"grid_{mask_kind}.png", buffer.getvalue())
    html = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>brushnet bench: {mask_kind}-inpainting</title>",
        "<style>body{font-family:sans-serif}td,th{padding:2px;text-align:center;font-size:12px}</style>",
        f"</head><body><h1>{mask_kind}-inpainting</h1><table><tr><th>id</th>",
        *(f"<th>{title}</th>" for title in titles),
        "</tr>",
    ]
    for item_id, cells in grid_rows:
        html.append(f"<tr><td>{item_id}</td>")
        for cell in cells:
            html.append(
                "<td>–</td>"
                if cell is None
                else f"<td><img src='data:image/png;base64,{_png_b64(cell)}'></td>"
            )
        html.append("</tr>")
    html.append("</table></body></html>")
    atomic_write_bytes(run_dir / "results" / f"grid_{mask_kind}.html", "\n".join(html).encode())


def write_reports(run_dir: str | os.PathLike, grid_sample: int = 8) -> dict[str, Path]:
    """Merge every shard's rows and (re)write all reports under ``RUN_DIR/results``.

    Returns:
        Report name → path (``per_image_jsonl``, ``per_image_csv``, ``summary_csv``, ``table_md`` and the
        grids).

    Raises:
        FileNotFoundError: when the run folder holds no rows.
    """
    run_dir = Path(run_dir)
    rows = load_rows(run_dir)
    if not rows:
        raise FileNotFoundError(f"no per-image rows under {run_dir / 'rows'}")
    results = run_dir / "results"
    paths = {
        "per_image_jsonl": results / "per_image.jsonl",
        "per_image_csv": results / "per_image.csv",
        "summary_csv": results / "summary.csv",
        "table_md": results / "table.md",
    }
    summary = summarise(rows)
    atomic_write_bytes(paths["per_image_jsonl"], "".join(json.dumps(r) + "\n" for r in rows).encode())
    atomic_write_bytes(paths["per_image_csv"], _csv_bytes(rows))
    atomic_write_bytes(paths["summary_csv"], _csv_bytes(summary))
    try:
        dataset_kind = json.loads((run_dir / "run.json").read_text())["dataset"]["kind"]
    except (OSError, json.JSONDecodeError, KeyError):
        dataset_kind = None
    table = markdown_table(summary, dataset_kind)
    mixed = mixed_weights(run_dir)
    if mixed:
        warning = (
            "rows scored with different weight files: "
            + ", ".join(f"{metric} ({count} files)" for metric, count in mixed.items())
            + "; their means mix them: rerun `bench run` on every image with one set of weights"
        )
        logger.warning("%s: %s", run_dir, warning)
        table += f"\n**Warning:** {warning}.\n"
    atomic_write_bytes(paths["table_md"], table.encode())
    for mask_kind in sorted({r["mask_kind"] for r in rows}):
        write_grid(run_dir, rows, mask_kind, sample=grid_sample)
        paths[f"grid_{mask_kind}_png"] = results / f"grid_{mask_kind}.png"
        paths[f"grid_{mask_kind}_html"] = results / f"grid_{mask_kind}.html"
    return paths
