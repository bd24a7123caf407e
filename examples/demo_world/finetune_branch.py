"""Fine-tune a demo BrushNet branch, with or without the kept region's caption-invariance term or the guided term.

    python examples/demo_world/train_world.py --work /tmp/ft --stages data --scenes 4000
    python examples/demo_world/finetune_branch.py --work /tmp/ft --out /tmp/ft/inv16 --kept-invariance 16
    python examples/demo_world/finetune_branch.py --work /tmp/ft --out /tmp/ft/inv0 --kept-invariance 0
    python examples/demo_world/evaluate.py --models /tmp/ft/inv16/models --scenes 48 --methods brushnet
    python examples/demo_world/guidance_drift.py --models /tmp/ft/inv16/models --scenes 48

An experiment on BrushNet's raw kept-region gap to Blended Latent Diffusion (docs/demo.md, "Why more samples may
not close BrushNet's part of it"): classifier-free guidance adds ``(w − 1)(c − u)`` to every latent cell, and the
branch, which reads no text, was never asked to make the kept region's prediction the same with and without the
caption. ``--kept-invariance λ`` trains it with :func:`brushnet.training.train`'s ``kept_invariance_weight``:
λ × the mean over the kept latent cells of ``‖c − u‖²`` added to the loss; λ = (w − 1)² = 16 weighs it as
guidance at w = 5 does. ``--kept-invariance 0`` is the same fine-tune without it, the control: the two see the
same samples, noise and timesteps (the term draws nothing). ``--margin M`` leaves the M rings of latent cells
around the hole out of the term (``kept_invariance_margin``); ``--min-timestep T`` counts only the samples noised to
timestep T or above in it (``kept_invariance_min_timestep``). ``--guided γ`` adds the training loop's guided term
instead (``guided_loss_weight``): γ × the error of the guided prediction ``u + w (c − u)`` at ``--guided-scale w``
against the target, over the whole latent, so the branch is trained for sampling with guidance. ``--anchor μ``
adds the anchor term (``hole_pull_anchor_weight``): μ × the mean over the hole's latent cells of the squared
difference between the caption's pull ``c − u`` with the branch being trained and with the starting branch, kept
frozen; beside ``--kept-invariance`` it holds the hole's pull where it was while the kept cells' is turned down.

The run starts from the shipped branch (``--models``), on the recipe's stream of the first ``--scenes`` training
scenes (the shards of ``train_world.py --stages data`` in ``--work``, whose scene count it reads from the work
folder's training record), with the recipe's masks, object holes and hole-naming captions, at a constant rate
without warm-up or EMA. ``--out`` gets ``brushnet/`` (the fine-tuned branch, float32), ``models/`` (the model set of
``--models`` with that branch in place of its own, as links, for ``evaluate.py``, ``guidance_drift.py`` and
``brushnet bench``) and ``finetune.json`` (the settings, the loss every 50 steps and the time). The command is for
experiments; its function :func:`finetune` is what the recipe's stage ``finetune`` runs (recipe v4.2,
:mod:`finetune_stage`).

``--model inpaint`` (or ``controlnet``) fine-tunes the 9-channel UNet (or the ControlNet) of ``--models`` instead,
by the recipe's own loop for it (:func:`inpainting.finetune_on`), with the plain loss (every term 0), on the same
samples in the same order and with the same steps, batch and rate: the matching fine-tune for a fine-tuned branch,
so the three architectures stay equally trained. ``--out`` then gets ``inpaint/`` (an SD-inpainting pipeline
folder, float32) or ``controlnet/`` (float32) and ``models/`` with it in place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Terms", "finetune", "main"]

DEMO_MODELS = Path(__file__).resolve().parents[2] / "src" / "brushnet" / "assets" / "demo_world"
MODEL_PARTS = ("base", "brushnet", "inpaint", "controlnet", "powerpaint")


def _scenes_of(work: Path) -> int:
    """The number of scenes the data stage wrote into ``work`` (from its training record)."""
    record = work / "training_record.json"
    try:
        return int(json.loads(record.read_text())["stages"]["data"]["scenes"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(
            f"--work {work}: no data stage recorded there; run train_world.py --work {work} --stages data first"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python examples/demo_world/finetune_branch.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--work", required=True, help="Folder with the data stage's shards (train_world.py).")
    parser.add_argument("--out", required=True, help="New folder for the fine-tuned branch (must not exist).")
    parser.add_argument(
        "--models", default=str(DEMO_MODELS), help="The model set to start from (default: the shipped one)."
    )
    parser.add_argument(
        "--model",
        choices=("brushnet", "inpaint", "controlnet"),
        default="brushnet",
        help="what to fine-tune: the branch (default), the 9-channel UNet or the ControlNet (these two with the "
        "plain loss: the terms are 0).",
    )
    parser.add_argument(
        "--kept-invariance", type=float, required=True, help="λ of the invariance term (0: the control)."
    )
    parser.add_argument(
        "--margin",
        type=int,
        default=0,
        help="rings of latent cells around the hole left out of the term (default 0).",
    )
    parser.add_argument(
        "--min-timestep",
        type=int,
        default=0,
        help="only samples noised to this timestep or above count in the invariance term (default 0: all).",
    )
    parser.add_argument(
        "--guided",
        type=float,
        default=0.0,
        help="γ of the guided term: the guided prediction's error against the target (default 0: off).",
    )
    parser.add_argument(
        "--guided-scale", type=float, default=None, help="the guidance scale of that prediction (default 5)."
    )
    parser.add_argument(
        "--anchor",
        type=float,
        default=0.0,
        help="μ of the anchor term: the hole's caption pull held to the starting branch's (default 0: off).",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (default 1).")
    args = parser.parse_args(argv)
    work, out, models = Path(args.work), Path(args.out), Path(args.models)
    missing = [part for part in MODEL_PARTS if not (models / part).is_dir()]
    if missing:
        parser.error(f"--models {models}: not a demo model set (no {', '.join(missing)})")
    if out.exists():
        parser.error(f"--out {out}: exists; give a new folder")
    bad = [
        f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}"
        for names, rule, ok in [
            (
                ("kept_invariance", "margin", "min_timestep", "guided", "anchor"),
                "non-negative",
                lambda v: v >= 0,
            ),
            (("guided_scale",), "at least 1", lambda v: v is None or v >= 1),
            (("steps", "batch", "threads", "lr"), "positive", lambda v: v > 0),
        ]
        for name in names
        if not ok(getattr(args, name))
    ]
    if bad:
        parser.error("; ".join(bad))
    unused = [
        f"--{flag} has no effect without --{needs}"
        for flag, given, needs, on in [
            ("margin", args.margin, "kept-invariance", args.kept_invariance),
            ("min-timestep", args.min_timestep, "kept-invariance", args.kept_invariance),
            ("guided-scale", args.guided_scale is not None, "guided", args.guided),
        ]
        if given and not on
    ]
    if unused and args.model == "brushnet":
        parser.error("; ".join(unused))
    if args.guided_scale is None:
        args.guided_scale = Terms.guided_scale
    terms = Terms(
        args.kept_invariance, args.margin, args.min_timestep, args.guided, args.guided_scale, args.anchor
    )
    if args.model != "brushnet" and terms != Terms():
        given = [
            f"--{field.name.replace('_', '-')} {getattr(terms, field.name)}"
            for field in dataclasses.fields(Terms)
            if getattr(terms, field.name) != field.default
        ]
        parser.error(
            f"--model {args.model} fine-tunes with the plain loss; {', '.join(given)} "
            f"{'is' if len(given) == 1 else 'are'} for the branch only (give --kept-invariance 0 and no other term)"
        )
    try:
        scenes = _scenes_of(work)
    except ValueError as error:
        parser.error(str(error))

    import torch

    torch.set_num_threads(args.threads)
    summary = finetune(
        work,
        scenes,
        models,
        out,
        args.model,
        terms,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
    )
    print(json.dumps(summary))
    return 0


@dataclass(frozen=True)
class Terms:
    """The terms a branch fine-tune adds to its loss (the flags of the same names; all 0: the plain loss)."""

    kept_invariance: float = 0.0
    margin: int = 0
    min_timestep: int = 0
    guided: float = 0.0
    guided_scale: float = 5.0
    anchor: float = 0.0


def finetune(
    work: Path,
    scenes: int,
    models: Path,
    out: Path,
    model: str = "brushnet",
    terms: Terms = Terms(),
    *,
    steps: int,
    batch: int,
    lr: float,
    device: str = "cpu",
    recipe=None,
) -> dict:
    """Fine-tune ``model`` (``brushnet``, ``inpaint`` or ``controlnet``) of the model set ``models`` (folders
    ``base``, ``brushnet``, ``inpaint``, ``controlnet``) on the recipe's stream of the ``scenes`` scenes whose shards
    are in ``work/shards``, at a constant rate without warm-up or EMA, on ``device``; the branch with ``terms``, the
    other two with the plain loss. ``recipe``: the :class:`recipe.WorldTrainConfig` whose seed, masks and captions
    the stream follows (default: the recipe's defaults). Writes ``out`` (``<model>/``, ``models/``,
    ``finetune.json``) at once when done, nothing if it fails; returns the summary written to ``finetune.json``."""
    import torch
    from inpainting import _branch_config, finetune_on, train_branch_on
    from recipe import Run, WorldTrainConfig

    if model != "brushnet" and terms != Terms():
        raise ValueError(f"{model} fine-tunes with the plain loss: no terms")
    base = work / "base"
    if not base.exists():  # the branch config reads the run's base; the model set's
        base.symlink_to((models / "base").resolve(), target_is_directory=True)
    cfg = dataclasses.replace(
        recipe if recipe is not None else WorldTrainConfig(),
        scenes=scenes,
        branch_steps=steps,
        branch_batch=batch,
        branch_lr=lr,
        branch_lr_scheduler="constant",
        branch_ema_decay=0.0,
        loader_workers=0,
    )
    run = Run(cfg, work, device=device)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    config = _branch_config(run, tmp / "run")
    config = config.model_copy(
        update={
            "brushnet_model_name_or_path": str(models / "brushnet"),
            "kept_invariance_weight": terms.kept_invariance,
            "kept_invariance_margin": terms.margin,
            "kept_invariance_min_timestep": terms.min_timestep,
            "guided_loss_weight": terms.guided,
            "guided_loss_scale": terms.guided_scale,
            "hole_pull_anchor_weight": terms.anchor,
            "lr_warmup_steps": 0,
            "checkpointing_steps": 10**9,
            "resume_from_checkpoint": None,
        }
    )
    start = time.perf_counter()
    try:
        if model == "brushnet":
            result = train_branch_on(run, config)
            done = result.global_step
            shutil.copytree(result.final_model_dir, tmp / "brushnet")
        else:
            result = finetune_on(run, config, model, models / model, tmp / model)
            done = result.steps
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left
        raise
    seconds = time.perf_counter() - start

    shutil.rmtree(tmp / "run", ignore_errors=True)
    (tmp / "models").mkdir()
    for part in MODEL_PARTS:
        if part == model:
            (tmp / "models" / part).symlink_to(Path("..") / part, target_is_directory=True)
        elif (models / part).is_dir():
            (tmp / "models" / part).symlink_to((models / part).resolve(), target_is_directory=True)
    losses = result.losses
    summary = {
        "model": model,
        **dataclasses.asdict(terms),
        "steps": done,
        "batch": batch,
        "lr": lr,
        "scenes": scenes,
        "threads": torch.get_num_threads(),
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(len(losses), 1), 3),
        "loss_every_50": [
            round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 5) for i in range(0, len(losses), 50)
        ],
        "from": str(models),
    }
    (tmp / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out)
    return summary


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
