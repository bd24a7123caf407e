"""Issue 18: does a bigger base UNet draw the prompted shapes? Base variants trained side by side on one GPU.

Run on the device machine from the repo root, inside one device call (the wheels in ``.whl``, downloaded here as
``issue14_next.sh``'s header says; the device tool's ``carry [".whl"]``, ``timeout_s 600``):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 \
        python3 benchmarks/gpu_runs/issue18_base_capacity.py --limit 560

then, here, ``python benchmarks/gpu_runs/issue18_compare_bases.py --tars DIR --work W`` on the folder the device
tool put the files in: it unpacks each base, diagnoses it on the CPU (``diagnose.py --words --shape-words 12
--samples 48 --redraw 24``: 6 min 15 s a base on a 2-core VM; on the first call's control it gave the GPU's
figures but for one of the 60 shape-word images, classified differently) and says which variant beats the
control.

CPU rehearsals of every step (2-core VM): ``--device cpu --scenes 64 --steps 3 --batch 4 --shape-words 1 --samples
1 --redraw 1 --variants control,level4 --diagnose-seconds 500 --limit 900`` (264 s), the same with ``frozen_text``
and with ``control,level4_frozen`` (338 s); with the calibration, its startup budget and the defaults otherwise,
``--device cpu --scenes 64 --batch 4 --variants control --limit 250 --min-steps 50`` (195 s, rc 0: 300 steps
fitted and ended 36 s before their deadline; the base packed; 197 s again after the calibration reading moved to
``issue18_demo_world.read_calibration``).

Why (docs/demo.md, "Why the base draws blobs"): the shipped base draws the captioned colours but not the
captioned shapes, and no fine-tune changed that. Two causes were left: the UNet's capacity, or a text encoder that
keeps the shape words together. The first call of this script (2026-11-27, H100, log:
``issue18_base_capacity_h100_logs.txt``) trained the four variants for 1000 steps of 128; the shipped UNet on a
frozen encoder whose words stay apart (``frozen_text``) drew no more shapes than the control, so the encoder alone
is not the cause at that budget. The two 4 × 4-level variants were cut off by the deadline: rendering the scenes
took each process 70–90 s before its first step, twice, which the step budget did not count. Both are fixed: the
scenes render on every core, and the budget subtracts the calibrated time to the first step.

This trains the base stage from scratch (``train_world.py --stages base``, the recipe's own code) for each
variant of ``--variants`` with the same samples, steps, batch and rate. Each differs from the control (the shipped
recipe) in the UNet's layout (``level4``: a 4 × 4 level), the text encoder (``frozen_text``) or both
(``level4_frozen``); the default runs ``control,level4,level4_frozen``:

1. Stage ``data`` (20000 scenes, in parallel; the bytes of a CPU run, checked by hash).
2. One work folder per variant, the shards linked in and ``base/vae`` copied from the shipped base (whose encoder
   is the one the shipped base was trained on; later stages changed only the decoder).
3. Calibration: every variant side by side for ``--cal-steps`` steps; seconds per step from the log times of
   steps 50 and ``--cal-steps``, and the time to the first step.
4. The variants side by side for the same N steps: the shipped base's samples (30000 × 16) at ``--batch``, or
   fewer if that does not fit before the deadline (the control shares the budget, so the comparison stays fair).
5. With ``--diagnose-seconds S`` > 0 (default 0: the time goes to training, and ``diagnose.py`` runs here, on the
   CPU), ``diagnose.py --device cuda --words --shape-words 12 --samples 48 --redraw 24`` on each finished base,
   side by side, inside S seconds (two took 134–146 s on the H100).
6. ``$OUT``: ``summary.json`` (steps, seconds per step, any diagnose output), the logs, and one tar per base
   (its UNet in float16, text encoder, tokenizer and scheduler; the VAE is the shipped one).

What decides: a variant whose redraw at strength 0.7 and text-to-image shape share are well above the control's
(the shipped base: 0.12 and 0.08; the first call's control: 0.04 and 0.00) names what the base lacks; then the
inpainting models are trained on it (``issue18_demo_world.py --base <that base>``). Nothing here is a test; it is
how a lease is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from issue18_demo_world import data_stage, finisher, launch, pack, read_calibration, say  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "demo_world" / "train_world.py"
DIAGNOSE = ROOT / "examples" / "demo_world" / "diagnose.py"
SHIPPED_BASE = ROOT / "src" / "brushnet" / "assets" / "demo_world" / "base"
SHIPPED_SAMPLES = 30000 * 16
# name: the base stage's flags beside the shared ones; "control" is the shipped recipe
VARIANTS = {
    "control": [],
    "level4": ["--unet-channels", "32,64,96,128"],  # a 4 × 4 level
    "frozen_text": ["--base-text-encoder", "frozen"],  # a frozen N(0, 1)-embedding encoder, the shipped UNet
    "level4_frozen": ["--unet-channels", "32,64,96,128", "--base-text-encoder", "frozen"],  # both changes
    "deep": ["--unet-layers", "2"],  # two blocks per level
    "wide": ["--unet-channels", "48,96,144"],
}
T0 = time.time()


def now() -> float:
    return time.time() - T0


def base_command(work: Path, name: str, args, steps: int) -> list[str]:
    return [
        sys.executable, str(SCRIPT), "--work", str(work), "--stages", "base", "--device", args.device,
        "--threads", "2", "--scenes", str(args.scenes), *VARIANTS[name], "--base-steps", str(steps),
        "--base-batch", str(args.batch), "--base-lr", str(args.lr), "--base-warmup-steps", str(args.warmup),
    ]  # fmt: skip


def variant_folder(path: Path, shards: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "shards").exists():
        (path / "shards").symlink_to(shards.resolve())
    if not (path / "base" / "vae").exists():
        shutil.copytree(SHIPPED_BASE / "vae", path / "base" / "vae")
    return path


def wait_all(procs: dict[str, subprocess.Popen]) -> dict[str, int]:
    ended = {}
    while len(ended) < len(procs):
        for name, proc in procs.items():
            if name not in ended and proc.poll() is not None:
                ended[name] = proc.returncode
                say(f"{name} ended, rc {proc.returncode}")
        time.sleep(2)
    return ended


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 benchmarks/gpu_runs/issue18_base_capacity.py")
    parser.add_argument("--limit", type=float, default=540, help="seconds by which everything is packed")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--variants",
        default="control,level4,level4_frozen",
        help=f"some of {', '.join(VARIANTS)} (default: control,level4,level4_frozen)",
    )
    parser.add_argument("--scenes", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=6e-4, help="base learning rate (the recipe: 3e-4 at 16)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--cal-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, help="skip the calibration: this many steps")
    parser.add_argument("--min-steps", type=int, default=1000)
    parser.add_argument("--safety", type=float, default=0.85, help="share of the calibrated speed counted on")
    parser.add_argument(
        "--diagnose-seconds",
        type=float,
        default=0,
        help="kept for step 5 (default 0: skip it and give the time to training; diagnose the packed bases here)",
    )
    parser.add_argument("--shape-words", type=int, default=12)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--redraw", type=int, default=24)
    parser.add_argument("--scratch", default="/tmp/issue18_base")
    parser.add_argument("--pack-seconds", type=float, default=30)
    args = parser.parse_args(argv)
    names = [name for name in args.variants.split(",") if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        parser.error(f"--variants: unknown {unknown}; expected some of {', '.join(VARIANTS)}")
    out = Path(os.environ.get("OUT", "/tmp/issue18_base_out"))
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch)
    logs = scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    summary: dict = {"args": vars(args), "variants": {name: VARIANTS[name] for name in names}}

    finish = finisher(out, scratch, summary)

    # 1. the training scenes
    data = scratch / "data"
    matches = data_stage(data, args.scenes, logs)
    if matches is None:
        return finish(1)
    summary["shard0_matches_cpu_run"] = matches
    say(f"data done ({args.scenes} scenes)")
    shards = data / "shards"

    # 2.-3. calibration
    if args.steps:
        steps = args.steps
    else:
        launched = datetime.now()
        procs = {
            name: launch(
                base_command(variant_folder(scratch / f"cal_{name}", shards), name, args, args.cal_steps),
                logs / f"cal_{name}.log",
                150,
            )
            for name in names
        }
        wait_all(procs)
        calibration = read_calibration(logs, names, args.cal_steps, launched, summary)
        if calibration is None:
            return finish(1)
        speed, startup = calibration  # the time to the first step counts again in the training run
        avail = (args.limit - now() - args.pack_seconds - args.diagnose_seconds - startup) * args.safety
        steps = min(SHIPPED_SAMPLES // args.batch, int(avail / max(speed.values()) // 50 * 50))
        if steps < args.min_steps:
            say(f"only {steps} steps fit: not training")
            summary["steps"] = steps
            return finish(1)
    summary["steps"] = steps
    summary["samples_vs_shipped"] = round(steps * args.batch / SHIPPED_SAMPLES, 3)
    say(
        f"training {steps} steps of batch {args.batch} ({summary['samples_vs_shipped']} of the shipped samples)"
    )

    # 4. the variants side by side
    deadline = args.limit - args.pack_seconds - args.diagnose_seconds
    procs = {
        name: launch(
            base_command(variant_folder(scratch / name, shards), name, args, steps),
            logs / f"{name}.log",
            deadline - now(),
        )
        for name in names
    }
    summary["return_codes"] = wait_all(procs)
    summary["records"] = {}
    for name in names:
        record = scratch / name / "training_record.json"
        if record.exists():
            summary["records"][name] = json.loads(record.read_text()).get("stages", {}).get("base")

    # 5. what each finished base draws (unless --diagnose-seconds 0: then diagnose.py runs on the packed bases)
    finished = [name for name in names if (scratch / name / "base" / "model_index.json").is_file()]
    diag = (
        {}
        if args.diagnose_seconds <= 0
        else {
            name: launch(
                [
                    sys.executable,
                    str(DIAGNOSE),
                    "--base",
                    str(scratch / name / "base"),
                    "--device",
                    args.device,
                    "--threads",
                    "2",
                    "--words",
                    "--shape-words",
                    str(args.shape_words),
                    "--samples",
                    str(args.samples),
                    "--redraw",
                    str(args.redraw),
                ],
                logs / f"diagnose_{name}.log",
                args.limit - args.pack_seconds - now(),
            )  # fmt: skip
            for name in finished
        }
    )
    wait_all(diag)
    summary["diagnose"] = {
        name: (logs / f"diagnose_{name}.log").read_text(errors="replace")[-6000:] for name in diag
    }

    # 6. pack: the UNet in float16 as the recipe ships it (a file that comes back holds at most 16 MiB)
    from diffusers import UNet2DConditionModel

    for name in finished:
        folder = scratch / name / "base"
        UNet2DConditionModel.from_pretrained(folder / "unet").half().save_pretrained(
            scratch / name / "unet16"
        )
        shutil.rmtree(folder / "unet")
        (scratch / name / "unet16").rename(folder / "unet")
        pack(
            out,
            f"base_{name}",
            folder,
            ["unet", "text_encoder", "tokenizer", "scheduler", "model_index.json"],
        )
    ok = finished == names and all(code == 0 for code in summary["return_codes"].values())
    return finish(0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
