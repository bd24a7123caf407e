"""Where a method loses the kept region against a reference, per background kind and hole size, from a
mini-BrushBench run's per-image rows.

    python examples/demo_world/kept_gap.py WORK/run/results/per_image.jsonl [MORE.jsonl ...] \
        --reference blended-latent-diffusion --methods brushnet,sd-inpainting

For every method, the mean over scenes of (reference's raw kept-region PSNR − the method's), on the inside masks,
grouped by the background the scene's caption names (plain, gradient, striped, checkered, noisy) and by hole size
(thirds of the scenes by the hole's share of the image). Rows of a later file replace a method's rows of an
earlier one, so the runs of a split benchmark (``minibench --methods ...`` in two processes) can be read together.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

__all__ = [
    "BACKGROUNDS",
    "background_kind",
    "kept_gaps",
    "main",
    "missing_files",
    "per_image_file",
    "resolve",
    "resolve_reference",
]

BACKGROUNDS = ("plain", "gradient", "striped", "checkered", "noisy")


def background_kind(caption: str) -> str:
    """The background kind a shapes-world caption names ("... on a striped white background" → "striped")."""
    match = re.search(r"on an? (.+?) background", caption)
    words = match.group(1).split() if match else []
    return next((kind for kind in BACKGROUNDS if kind in words), "other")


def per_image_file(path: str | Path) -> tuple[str, Path]:
    """``LABEL=FILE`` → ``(LABEL, FILE)``; a plain path (or an existing file whose name holds "=") → ``("", path)``."""
    text = str(path)
    label, equals, file = text.partition("=")
    if not equals or Path(text).is_file():
        return "", Path(text)
    if not label:
        raise ValueError(f"{text!r}: an empty label (give LABEL=FILE or FILE)")
    return label, Path(file)


def missing_files(paths: list[str]) -> list[str]:
    """The arguments of ``paths`` (``FILE`` or ``LABEL=FILE``) whose file does not exist."""
    return [path for path in paths if not per_image_file(path)[1].is_file()]


def _rows(paths: list[str | Path]) -> dict[str, dict[str, dict]]:
    """``{method: {scene id: row}}`` of the inside, raw rows; a later file's method replaces an earlier one's.

    A path given as ``LABEL=FILE`` names its methods ``METHOD@LABEL``, so two runs of one method (two branches
    through ``--brushnet``, say) can be compared and paired instead of one replacing the other.
    """
    methods: dict[str, dict[str, dict]] = {}
    for path in paths:
        label, file = per_image_file(path)
        found: dict[str, dict[str, dict]] = {}
        for line in file.read_text().splitlines():
            row = json.loads(line)
            if (
                row.get("mask_kind") == "inside"
                and row.get("variant") == "raw"
                and row.get("psnr") is not None
            ):
                name = f"{row['method']}@{label}" if label else row["method"]
                found.setdefault(name, {})[row["id"]] = row
        methods.update(found)
    return methods


def resolve(rows: dict[str, dict], name: str) -> list[str]:
    """The runs of :func:`_rows` that ``name`` selects: itself if present, else, for a name without a label, every
    ``name@LABEL`` (so ``--methods brushnet`` compares each labelled file's BrushNet)."""
    if name in rows:
        return [name]
    return [] if "@" in name else [run for run in rows if run.partition("@")[0] == name]


def resolve_reference(rows: dict[str, dict], name: str) -> str:
    """The one run ``name`` selects (:func:`resolve`); ``ValueError`` listing the runs found if none or several."""
    runs = resolve(rows, name)
    if len(runs) != 1:
        raise ValueError(f"--reference {name!r} names {len(runs)} runs; give one of: {', '.join(rows)}")
    return runs[0]


def kept_gaps(paths: list[str | Path], reference: str, methods: list[str]) -> dict[str, dict[str, tuple]]:
    """``{method: {group: (scenes, mean gap dB)}}`` with groups "all", each background kind and "holes: small /
    middle / large" (thirds by hole fraction); gap = reference's PSNR − the method's, on the scenes both have."""
    rows = _rows(paths)
    reference = resolve_reference(rows, reference)
    selected = [run for name in methods for run in resolve(rows, name)]
    for name in methods:
        if not resolve(rows, name):
            raise ValueError(
                f"no inside raw rows of {name!r} in {', '.join(map(str, paths))} (found: {', '.join(rows)})"
            )
    result = {}
    for name in selected:
        ids = sorted(set(rows[name]) & set(rows[reference]))
        gap = {i: rows[reference][i]["psnr"] - rows[name][i]["psnr"] for i in ids}
        groups: dict[str, list[str]] = {"all": ids}
        for i in ids:
            groups.setdefault(background_kind(rows[name][i].get("caption", "")), []).append(i)
        by_size = sorted(ids, key=lambda i: rows[name][i]["hole_fraction"])
        third = len(by_size) // 3
        for label, part in (("small", by_size[:third]), ("middle", by_size[third : 2 * third]),
                            ("large", by_size[2 * third :])):  # fmt: skip
            groups[f"holes: {label}"] = part
        result[name] = {
            group: (len(part), sum(gap[i] for i in part) / len(part))
            for group, part in groups.items()
            if part
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python examples/demo_world/kept_gap.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "per_image",
        nargs="+",
        help="per_image.jsonl of a bench run (later files override); LABEL=FILE names its methods METHOD@LABEL.",
    )
    parser.add_argument(
        "--reference",
        default="blended-latent-diffusion",
        help="The method the others are measured against; without @LABEL, the one labelled run of it.",
    )
    parser.add_argument(
        "--methods",
        default="brushnet",
        help="Comma-separated methods to compare; a name without @LABEL selects each labelled file's run of it.",
    )
    args = parser.parse_args(argv)
    try:
        missing = missing_files(args.per_image)
    except ValueError as error:
        parser.error(str(error))
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    try:
        gaps = kept_gaps(args.per_image, args.reference, list(filter(None, args.methods.split(","))))
    except ValueError as error:
        parser.error(str(error))
    groups = list(dict.fromkeys(group for table in gaps.values() for group in table))
    print(
        f"{args.reference}'s raw kept-region PSNR minus each method's (dB; inside masks; scenes in brackets)"
    )
    print("| group | " + " | ".join(gaps) + " |")
    print("| --- |" + " ---: |" * len(gaps))
    for group in groups:
        cells = [
            f"{table[group][1]:.2f} ({table[group][0]})" if group in table else "" for table in gaps.values()
        ]
        print(f"| {group} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
