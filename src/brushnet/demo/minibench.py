"""Mini-BrushBench: every method on held-out shapes-world scenes through ``brushnet bench run``.

    python -m brushnet.demo.minibench --work /tmp/minibench --scenes 200

1. writes the evaluation set (:func:`brushnet.data.shapes_writers.write_eval_set`, BrushBench layout, a quarter
   of the prompts asking for a different object than the one masked out);
2. runs ``brushnet bench run`` on it, inside and outside masks, for every method of :data:`~.assets.METHODS`
   with the shipped models and :data:`~.run.DEMO_REQUEST`;
3. runs the object-removal pass: the same scenes and holes with prompts that ask for the masked object to go
   (:func:`~brushnet.data.shapes_writers.write_eval_set` with ``removal=True``; PowerPaint with its
   object-removal task, :data:`~.run.REMOVAL_OPTIONS`), inside masks, scored by ``--score removal``;
4. summarises the per-image rows into ``mini_brushbench.json`` (the file ``brushnet demo`` prints): PSNR / MSE
   over the kept region, for inside masks the fraction of holes whose dominant colour is the prompted
   one and whose blob of that colour has the prompted shape, and the fraction of removal holes left with no
   object colour (:mod:`brushnet.data.shapes_metrics`).

A method added later is measured alone and merged into the shipped table, leaving the other rows as they
were: ``--methods powerpaint --merge src/brushnet/assets/demo_world/mini_brushbench.json --results ...``
(``--passes removal`` runs only the removal pass, e.g. for methods whose other columns are already there).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ..io import atomic_write_text
from .assets import DEMO_DIR, METHODS, method_models
from .run import DEMO_REQUEST, METHOD_OPTIONS, REMOVAL_OPTIONS, RESULTS_FILE, format_results_table

__all__ = ["PASSES", "bench_command", "merge_rows", "summarise", "main"]


def bench_command(
    dataset: Path,
    run_dir: Path,
    models_root: Path,
    methods=METHODS,
    limit: int | None = None,
    removal: bool = False,
) -> list[str]:
    """The ``brushnet bench run`` command line of the mini-BrushBench (``removal``: of its object-removal pass)."""
    paths = {slot: path for method in methods for slot, path in method_models(method, models_root).items()}
    options = {name: dict(values) for name, values in METHOD_OPTIONS.items()}
    if removal:
        for name, values in REMOVAL_OPTIONS.items():
            options[name] = {**options.get(name, {}), **values}
    command = [
        "brushnet", "bench", "run",
        "--methods", ",".join(methods),
        "--dataset", str(dataset),
        "--mask-kind", "inside" if removal else "inside,outside",
        "--output", str(run_dir),
        *[part for slot, path in paths.items() for part in ("--" + slot.replace("_", "-"), path)],
        "--steps", str(DEMO_REQUEST["steps"]),
        "--guidance", str(DEMO_REQUEST["guidance_scale"]),
        "--seed", str(DEMO_REQUEST["seed"]),
        "--blend-kernel-size", str(DEMO_REQUEST["blend_kernel_size"]),
        "--score", "removal" if removal else "shapes",
        *[f"--option={name}:{key}={value}" for name, values in options.items() if name in methods
          for key, value in values.items()],
        "--device", "cpu",
    ]  # fmt: skip
    if limit is not None:
        command += ["--limit", str(limit)]
    return command


PASSES = ("main", "removal")
"""The two passes: ``main`` (inside and outside masks, prompt-following scores) and ``removal``."""

REMOVAL_FIELDS = ("removal_images", "removal_acc", "removal_object_fraction")
"""The summary columns the removal pass fills; every other column comes from the main pass."""


def _mean(values: list) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _per_image(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "results" / "per_image.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def summarise(
    run_dir: str | os.PathLike, dataset: str | os.PathLike, removal_run_dir: str | os.PathLike | None = None
) -> list[dict]:
    """One summary row per (method, blend) from the run's ``results/per_image.jsonl``.

    Columns: ``inside_psnr``/``inside_mse``/``outside_psnr``/``outside_mse`` (kept region, mean over images),
    ``colour_acc``/``shape_acc`` (inside masks), ``colour_acc_same``/``colour_acc_different`` split by
    whether the prompt asks for the masked object or another one, the same four scored on the hole pasted into
    the original (``colour_acc_hole``, ``shape_acc_hole`` and their ``_same`` / ``_different`` splits;
    :func:`brushnet.data.shapes_metrics.text_alignment`; on the ``_same`` prompts the hole, the masked object's
    dilated silhouette, already has the prompted shape, so only ``shape_acc_hole_different`` measures a shape the
    method drew inside a hole of another shape), and from the removal pass
    ``removal_acc`` (holes left with no object colour) and ``removal_object_fraction`` (mean share of hole
    pixels with an object colour); ``None`` where a pass did not run.
    """
    rows = _per_image(run_dir)
    removal_rows = _per_image(removal_run_dir) if removal_run_dir is not None else []
    mapping = json.loads((Path(dataset) / "mapping_file.json").read_text())
    summary = []
    for method in METHODS:
        for variant in ("raw", "blended"):
            mine = [r for r in rows if r["method"] == method and r["variant"] == variant]
            removed = [r for r in removal_rows if r["method"] == method and r["variant"] == variant]
            if not mine and not removed:
                continue
            inside = [r for r in mine if r["mask_kind"] == "inside"]
            outside = [r for r in mine if r["mask_kind"] == "outside"]
            same = [r for r in inside if mapping[r["id"]]["variant"] == "same"]
            different = [r for r in inside if mapping[r["id"]]["variant"] == "different"]
            summary.append(
                {
                    "method": method,
                    "blend": variant == "blended",
                    "inside_images": len(inside),
                    "outside_images": len(outside),
                    "inside_psnr": _mean([r.get("psnr") for r in inside]),
                    "inside_mse": _mean([r.get("mse") for r in inside]),
                    "outside_psnr": _mean([r.get("psnr") for r in outside]),
                    "outside_mse": _mean([r.get("mse") for r in outside]),
                    "colour_acc": _mean([r.get("colour_ok") for r in inside]),
                    "shape_acc": _mean([r.get("shape_ok") for r in inside]),
                    "colour_acc_same": _mean([r.get("colour_ok") for r in same]),
                    "colour_acc_different": _mean([r.get("colour_ok") for r in different]),
                    "colour_acc_hole": _mean([r.get("colour_hole_ok") for r in inside]),
                    "shape_acc_hole": _mean([r.get("shape_hole_ok") for r in inside]),
                    "colour_acc_hole_same": _mean([r.get("colour_hole_ok") for r in same]),
                    "colour_acc_hole_different": _mean([r.get("colour_hole_ok") for r in different]),
                    "shape_acc_hole_same": _mean([r.get("shape_hole_ok") for r in same]),
                    "shape_acc_hole_different": _mean([r.get("shape_hole_ok") for r in different]),
                    "seconds_per_image": _mean([r.get("seconds") for r in mine]),
                    "removal_images": len(removed),
                    "removal_acc": _mean([r.get("removed") for r in removed]),
                    "removal_object_fraction": _mean([r.get("object_fraction") for r in removed]),
                }
            )
    return summary


def merge_rows(old: list[dict], new: list[dict], passes=PASSES) -> list[dict]:
    """Merge the summary rows of a run of some methods and ``passes`` into an earlier table's rows.

    A (method, blend) row present in both takes the new run's columns of the passes it ran and keeps its
    other columns; a row only in ``new`` is added with its columns of the passes that ran (the others
    ``None``); rows of methods the new run did not measure are kept unchanged. Rows come out in the order
    of :data:`~.assets.METHODS` (unknown methods last, in their old order).
    """

    def columns(row: dict, which) -> dict:
        keep = set(REMOVAL_FIELDS) if which == "removal" else set(row) - set(REMOVAL_FIELDS)
        return {k: v for k, v in row.items() if k in keep and k not in ("method", "blend")}

    merged = {(row["method"], row["blend"]): dict(row) for row in old}
    for row in new:
        key = (row["method"], row["blend"])
        if key not in merged:
            merged[key] = {"method": row["method"], "blend": row["blend"]}
            merged[key].update({k: None for k in row if k not in ("method", "blend")})
        for which in passes:
            merged[key].update(columns(row, which))
    order = {method: i for i, method in enumerate(METHODS)}
    keys = sorted(merged, key=lambda key: (order.get(key[0], len(order)), key[1]))
    return [merged[key] for key in keys]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m brushnet.demo.minibench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--work", required=True, type=Path, help="Folder for the eval set and the bench run.")
    parser.add_argument("--scenes", type=int, default=200, help="Held-out scenes (each inside and outside).")
    parser.add_argument("--seed", type=int, default=0, help="Eval-set seed.")
    parser.add_argument("--models", type=Path, default=DEMO_DIR, help="Models folder.")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help=f"Where to write the summary JSON (default: WORK/mini_brushbench.json; the shipped table is {RESULTS_FILE})",
    )
    parser.add_argument("--skip-run", action="store_true", help="Only summarise an existing run.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset to run.")
    parser.add_argument(
        "--passes", default=",".join(PASSES), help=f"Comma-separated passes to run (of: {', '.join(PASSES)})."
    )
    parser.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="An earlier results file: keep its rows and settings, replace or add the columns this run "
        "measured (its run is recorded under 'additions'); the result goes to --results.",
    )
    args = parser.parse_args(argv)
    if args.results is None:
        args.results = args.work / "mini_brushbench.json"
    passes = args.passes.split(",")
    unknown = [name for name in passes if name not in PASSES]
    if unknown:
        parser.error(f"unknown pass {unknown[0]!r}; choose from: {', '.join(PASSES)}")
    if args.merge is not None:
        earlier = json.loads(args.merge.read_text())
        # a scheduler recorded there is each method's default, which the request now leaves unset
        settings = earlier.get("settings", {})
        if earlier.get("images") != args.scenes or any(settings.get(k) != v for k, v in DEMO_REQUEST.items()):
            parser.error(
                f"{args.merge} has {earlier.get('images')} scenes and settings {earlier.get('settings')}; "
                f"this run {args.scenes} and {DEMO_REQUEST}: not the same benchmark"
            )
    if args.scenes < 1:
        parser.error(f"--scenes must be at least 1, got {args.scenes}")
    methods = [name for name in dict.fromkeys(args.methods.split(",")) if name]
    unknown = [name for name in methods if name not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown or '(none given)'}; choose from: {', '.join(METHODS)}")
    # a work folder holds one eval set: bench run resumes by image id, so another set's results would be reused
    eval_record = args.work / "eval_set.json"
    wanted = {"scenes": args.scenes, "seed": args.seed}
    if eval_record.is_file():
        made = json.loads(eval_record.read_text())
        if made != wanted:
            parser.error(
                f"{args.work} holds the results of an eval set of {made.get('scenes')} scenes, seed "
                f"{made.get('seed')}; this run asks for {args.scenes} scenes, seed {args.seed}: use another --work"
            )
    elif not args.skip_run and (args.work / "run").exists():
        parser.error(
            f"{args.work} holds a bench run whose eval set is not recorded; use another --work (or remove "
            f"{args.work / 'run'} and {args.work / 'run_removal'})"
        )
    from ..data.shapes_writers import write_eval_set

    dataset, run_dir = args.work / "eval", args.work / "run"
    removal_set, removal_dir = args.work / "eval_removal", args.work / "run_removal"
    write_eval_set(dataset, args.scenes, seed=args.seed, different_object_fraction=0.25)
    write_eval_set(removal_set, args.scenes, seed=args.seed, removal=True)
    atomic_write_text(eval_record, json.dumps(wanted))
    commands = {
        "main": bench_command(dataset, run_dir, args.models, methods=methods),
        "removal": bench_command(removal_set, removal_dir, args.models, methods=methods, removal=True),
    }
    commands = [commands[name] for name in dict.fromkeys(passes)]  # in the order given
    start = time.time()
    if not args.skip_run:
        for command in commands:
            print("+", shlex.join(command), flush=True)
            subprocess.run(command, check=True)
    seconds = time.time() - start
    shipped = Path("src/brushnet/assets/demo_world")
    reproduce = (
        f"python -m brushnet.demo.minibench --work WORK --scenes {args.scenes} --seed {args.seed} "
        f"(= shapes make-eval WORK/eval -n {args.scenes} --seed {args.seed} --different-object 0.25, then "
        + shlex.join(bench_command(Path("WORK/eval"), Path("WORK/run"), shipped))
        + f"; and the removal pass: shapes make-eval WORK/eval_removal -n {args.scenes} --seed {args.seed} "
        "--removal, then "
        + shlex.join(
            bench_command(Path("WORK/eval_removal"), Path("WORK/run_removal"), shipped, removal=True)
        )
        + ")"
    )
    record = {
        "images": args.scenes,
        "eval_seed": args.seed,
        "methods": methods,
        "command": reproduce,
        "settings": DEMO_REQUEST,
        "bench_seconds": None if args.skip_run else round(seconds, 1),
        "colour_chance": 1 / 7,
        "rows": summarise(
            run_dir if "main" in passes else args.work / "_none",
            dataset,
            removal_dir if "removal" in passes else None,
        ),
    }
    if args.merge is not None:
        addition = {
            "methods": methods,
            "passes": passes,
            "command": f"python -m brushnet.demo.minibench --work WORK --scenes {args.scenes} --seed "
            f"{args.seed} --methods {','.join(methods)} --passes {','.join(passes)} --merge {args.merge}",
            "bench_seconds": record["bench_seconds"],
        }
        record = {
            **earlier,
            "additions": [*earlier.get("additions", []), addition],
            "rows": merge_rows(earlier.get("rows", []), record["rows"], passes),
        }
    atomic_write_text(args.results, json.dumps(record, indent=1))
    print(format_results_table(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
