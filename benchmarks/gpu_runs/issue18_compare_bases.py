"""Issue 18: the bases ``issue18_base_capacity.py`` brought back, diagnosed here on the CPU and compared with the
control.

    python benchmarks/gpu_runs/issue18_compare_bases.py --tars DIR --work W

For each ``base_NAME.tgz`` in ``DIR`` (the files a device call returned): unpack it into ``W/NAME``, copy the
shipped ``base/vae`` beside it (the variants were trained on that VAE's latents), and run ``diagnose.py --words
--shape-words 12 --samples 48 --redraw 24 --json W/NAME.json`` (about 6 min a base with two threads on a 2-core
VM; a base whose JSON is already there is not diagnosed again, so a stopped run goes on where it stopped). Then it
prints the figures that decide side by side, and for each variant whether it **beats the control**: at least
``--margin`` (0.1) above it on all three shares of drawn shapes:

- ``redraw 0.7``: held-out one-object scenes noised to strength 0.7 and redrawn from their captions, share whose
  object keeps its shape (where the shipped base decides a shape and fails: 0.12);
- ``t2i shape``: text-to-image from one-object captions, share in the captioned shape (the shipped base: 0.08);
- ``word → shape``: the shape-word images classified as their prompted shape (the shipped base: 0.05).

A variant that beats the control names what the base lacks; the inpainting models are then trained on it
(``issue18_demo_world.py --base W/NAME``). ``--work`` alone compares the bases already unpacked there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DIAGNOSE = ROOT / "examples" / "demo_world" / "diagnose.py"
SHIPPED_VAE = ROOT / "src" / "brushnet" / "assets" / "demo_world" / "base" / "vae"
# (label, how to read it from diagnose.py --json): the shares of drawn shapes that decide
DECIDING = (
    ("redraw 0.7", lambda f: f["redraw"]["0.7"]),
    ("t2i shape", lambda f: f["text_to_image"]["shape"]),
    ("word → shape", lambda f: f["shape_words"]["diagonal"]),
)
# (label, how to read it): shown beside them
CONTEXT = (
    ("t2i background", lambda f: f["text_to_image"]["background"]),
    ("redraw 0.5", lambda f: f["redraw"]["0.5"]),
    ("word change", lambda f: f["shape_words"]["word_change"]),
    ("seed change", lambda f: f["shape_words"]["seed_change"]),
    ("shape-word cosine", lambda f: sum(f["words"]["shapes"].values()) / len(f["words"]["shapes"])),
)


def unpack(tar: Path, work: Path) -> Path:
    """``base_NAME.tgz`` → ``work/NAME`` with the shipped VAE beside its UNet; returns the folder."""
    name = tar.name.removeprefix("base_").removesuffix(".tgz")
    folder = work / name
    if not (folder / "model_index.json").is_file():
        partial = work / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            with tarfile.open(tar) as archive:
                archive.extractall(partial, filter="data")
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if not (partial / "model_index.json").is_file() or not (partial / "unet").is_dir():
            shutil.rmtree(partial)
            raise ValueError(
                f"{tar}: not a base packed by issue18_base_capacity.py (no model_index.json or unet/)"
            )
        shutil.copytree(SHIPPED_VAE, partial / "vae", dirs_exist_ok=True)
        partial.replace(folder)
    return folder


def compare(figures: dict[str, dict], control: str = "control", margin: float = 0.1) -> tuple[str, dict]:
    """A markdown table of ``figures`` (``{name: diagnose.py --json}``) and ``{variant: beats the control}``: every
    deciding share at least ``margin`` above the control's."""
    columns = DECIDING + CONTEXT
    lines = [
        "| base | " + " | ".join(label for label, _ in columns) + " |",
        "| --- " + "| ---: " * len(columns) + "|",
    ]
    for name, figure in figures.items():
        values = []
        for _, read in columns:
            value = read(figure)
            values.append("–" if value is None else f"{value:.2f}" if value < 10 else f"{value:.1f}")
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    verdicts = {}
    if control in figures:
        base = figures[control]
        for name, figure in figures.items():
            if name != control:
                verdicts[name] = all(read(figure) >= read(base) + margin for _, read in DECIDING)
    return "\n".join(lines), verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_runs/issue18_compare_bases.py")
    parser.add_argument("--tars", type=Path, help="the folder with the returned base_NAME.tgz files")
    parser.add_argument("--work", type=Path, required=True, help="where the bases and their JSONs go")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--control", default="control")
    parser.add_argument("--margin", type=float, default=0.1)
    parser.add_argument("--shape-words", type=int, default=12)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--redraw", type=int, default=24)
    args = parser.parse_args(argv)
    if args.tars is not None and not sorted(args.tars.glob("base_*.tgz")):
        parser.error(f"--tars {args.tars}: no base_*.tgz there")
    if min(args.shape_words, args.samples, args.redraw) < 1 or args.threads < 1:
        parser.error("--shape-words, --samples, --redraw and --threads must be positive")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.tars is not None:
        for tar in sorted(args.tars.glob("base_*.tgz")):
            try:
                unpack(tar, args.work)
            except ValueError as error:  # an archive, but not of a base
                parser.error(str(error))
            except (tarfile.TarError, EOFError) as error:
                parser.error(f"{tar}: cannot unpack ({error})")
    bases = sorted(path.parent for path in args.work.glob("*/model_index.json"))
    if not bases:
        parser.error(f"--work {args.work}: no unpacked base there (give --tars)")
    figures = {}
    for folder in bases:
        result = args.work / f"{folder.name}.json"
        if not result.is_file():
            command = [
                sys.executable, str(DIAGNOSE), "--base", str(folder), "--threads", str(args.threads), "--words",
                "--shape-words", str(args.shape_words), "--samples", str(args.samples), "--redraw",
                str(args.redraw), "--json", str(result),
            ]  # fmt: skip
            print(f"diagnosing {folder.name} ...", flush=True)
            with (args.work / f"diagnose_{folder.name}.log").open("w") as log:
                if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode:
                    print(f"{folder.name}: diagnose.py failed (its log: {log.name})", file=sys.stderr)
                    continue
        figures[folder.name] = json.loads(result.read_text())
    table, verdicts = compare(figures, args.control, args.margin)
    print(table)
    if args.control not in figures:
        print(f"no base named {args.control!r}: nothing to compare with")
        return 1
    for name, beats in verdicts.items():
        verdict = "beats" if beats else "does not beat"
        print(f"{name} {verdict} the control (every deciding share at least {args.margin:g} above it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
