"""Shape accuracy of a mini-BrushBench run by what the prompt names, by prompted shape, and paired against one
method, from the run's per-image rows.

    python examples/demo_world/shape_scores.py WORK/eval WORK/run/results/per_image.jsonl [MORE.jsonl ...] \
        --reference brushnet

For every method: shape* (``shape_hole_ok``, the hole pasted into the original; inside masks, raw outputs) over
all scenes, on the prompts that name the masked object ("same") and on those that name another object
("different"; the eval set's ``mapping_file.json`` says which), and per prompted shape; then, against
``--reference``, how many scenes only one of the two got right and the exact two-sided McNemar p-value of that
split (a sign test on the discordant pairs). Rows of a later file replace a method's rows of an earlier one, as in
``kept_gap.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from kept_gap import _rows, missing_files, resolve_reference

__all__ = ["mcnemar_p", "paired", "shape_scores", "main"]


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value of ``only_a`` against ``only_b`` discordant pairs (binomial, p = 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _outcomes(paths: list[str | Path]) -> dict[str, dict[str, bool]]:
    """``{method: {scene id: shape_hole_ok}}`` of the inside, raw rows that were scored for shape."""
    return {
        name: {
            i: bool(row["shape_hole_ok"]) for i, row in rows.items() if row.get("shape_hole_ok") is not None
        }
        for name, rows in _rows(paths).items()
    }


def shape_scores(eval_dir: str | Path, paths: list[str | Path]) -> dict[str, dict[str, tuple[int, float]]]:
    """``{method: {group: (scenes, accuracy)}}`` with groups "all", "same", "different" and each prompted shape."""
    mapping = json.loads((Path(eval_dir) / "mapping_file.json").read_text())
    result = {}
    for name, outcome in _outcomes(paths).items():
        groups: dict[str, list[bool]] = {"all": [], "same": [], "different": []}
        for i, ok in sorted(outcome.items()):
            entry = mapping[i]
            for group in ("all", entry["variant"], entry["target"]["shape"]):
                groups.setdefault(group, []).append(ok)
        result[name] = {group: (len(v), sum(v) / len(v)) for group, v in groups.items() if v}
    return result


def paired(paths: list[str | Path], reference: str) -> dict[str, tuple[int, int, float]]:
    """``{method: (only the reference right, only the method right, McNemar p)}`` over the scenes both have."""
    outcomes = _outcomes(paths)
    reference = resolve_reference(outcomes, reference)
    ref = outcomes[reference]
    result = {}
    for name, outcome in outcomes.items():
        if name == reference:
            continue
        ids = set(ref) & set(outcome)
        only_ref = sum(ref[i] and not outcome[i] for i in ids)
        only_other = sum(outcome[i] and not ref[i] for i in ids)
        result[name] = (only_ref, only_other, mcnemar_p(only_ref, only_other))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python examples/demo_world/shape_scores.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("eval", help="The eval set folder (its mapping_file.json).")
    parser.add_argument(
        "per_image",
        nargs="+",
        help="per_image.jsonl of a bench run (later files override); LABEL=FILE names its methods METHOD@LABEL.",
    )
    parser.add_argument(
        "--reference",
        default="brushnet",
        help="The method the others are paired with; without @LABEL, the one labelled run of it.",
    )
    args = parser.parse_args(argv)
    if not (Path(args.eval) / "mapping_file.json").is_file():
        parser.error(f"{args.eval}: no mapping_file.json (the eval set the run read)")
    try:
        missing = missing_files(args.per_image)
    except ValueError as error:
        parser.error(str(error))
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    try:
        pairs = paired(args.per_image, args.reference)
    except ValueError as error:
        parser.error(str(error))
    try:
        scores = shape_scores(args.eval, args.per_image)
    except (ValueError, KeyError) as error:
        parser.error(f"{error} (is {args.eval} the eval set of this run?)")
    groups = list(dict.fromkeys(group for table in scores.values() for group in table))
    print("shape* (hole pasted into the original; inside masks, raw; scenes in brackets)")
    print("| method | " + " | ".join(groups) + " |")
    print("| --- |" + " ---: |" * len(groups))
    for name, table in scores.items():
        cells = [f"{table[g][1]:.3f} ({table[g][0]})" if g in table else "" for g in groups]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\npaired with {args.reference}: scenes only it got right / only the other did, exact McNemar p")
    for name, (only_ref, only_other, p) in pairs.items():
        print(f"{name}: {only_ref} / {only_other}, p = {p:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
