"""Stage ``finetune`` (recipe v4.2): the three inpainting models of the run trained further, the same way.

Each of the branch, the 9-channel UNet and the ControlNet the run trained is fine-tuned by
:func:`finetune_branch.finetune` for the recipe's ``finetune_steps`` of ``finetune_batch`` at ``finetune_lr``
(constant, no warm-up, no EMA) on the recipe's stream of the first ``finetune_scenes`` training scenes (their own
shards, written here; the same bytes as a data stage of that many scenes): the branch with the kept region's
caption-invariance term (``finetune_kept_invariance``) and the anchor term (``finetune_anchor``), the other two with
the plain loss, so the three stay equally trained. Everything goes under ``work/finetune/``: ``shards/``,
``models/`` (links to the run's trained folders, what the fine-tunes start from) and one folder per model
(``brushnet/brushnet``, ``inpaint/inpaint``, ``controlnet/controlnet``, each with its ``finetune.json``), which
``train_world.export`` ships in place of the run's own. A model whose folder is there is done: a rerun of the stage
after a crash fine-tunes only the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from finetune_branch import Terms, finetune
from recipe import Run, missing_needs
from world_data import write_shards

__all__ = ["FINETUNE_ORDER", "finetuned_dir", "train_finetune"]

FINETUNE_ORDER = ("brushnet", "inpaint", "controlnet")
"""The models the stage fine-tunes, in order."""


def finetuned_dir(work: Path, part: str) -> Path:
    """Where the stage leaves ``part``'s fine-tuned folder in the run folder ``work``."""
    return Path(work) / "finetune" / part / part


def _trained(work: Path) -> dict[str, Path]:
    """The trained folders the stage starts from, by the name of the stage that writes them."""
    return {
        "base": work / "base",
        "brushnet": work / "brushnet_run" / "brushnet",
        "inpaint": work / "inpaint",
        "controlnet": work / "controlnet",
    }


def train_finetune(run: Run) -> dict:
    """Stage ``finetune``: see the module note. Needs the stages ``base``, ``brushnet``, ``inpaint`` and
    ``controlnet`` done in the run folder."""
    cfg = run.cfg
    root = run.work / "finetune"
    trained = _trained(run.work)
    missing = missing_needs(run.work, "finetune")
    if missing:
        raise ValueError(
            f"stage finetune: the run has no trained {', '.join(missing)}; run those stages first"
        )
    scenes = min(cfg.finetune_scenes, cfg.scenes)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "shards").is_dir():
        tmp = root / ".shards.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_shards(tmp, scenes, cfg.seed)
        os.replace(tmp, root / "shards")
    models = root / "models"
    models.mkdir(exist_ok=True)
    for name, path in trained.items():
        if not (models / name).exists():
            (models / name).symlink_to(path.resolve(), target_is_directory=True)
    recipe = dataclasses.replace(cfg, scenes=scenes, kept_invariance=0.0, kept_invariance_margin=0)
    terms = Terms(kept_invariance=cfg.finetune_kept_invariance, anchor=cfg.finetune_anchor)
    info: dict = {"scenes": scenes, "steps": cfg.finetune_steps, "batch": cfg.finetune_batch}
    for part in FINETUNE_ORDER:
        out = root / part
        if not out.is_dir():
            finetune(
                root,
                scenes,
                models,
                out,
                part,
                terms if part == "brushnet" else Terms(),
                steps=cfg.finetune_steps,
                batch=cfg.finetune_batch,
                lr=cfg.finetune_lr,
                device=run.device,
                recipe=recipe,
            )
        summary = json.loads((out / "finetune.json").read_text())
        info[part] = {
            "final_loss": summary["loss_every_50"][-1] if summary["loss_every_50"] else float("nan"),
            "seconds": summary["seconds"],
            "seconds_per_step": summary["seconds_per_step"],
            "model_dir": str(finetuned_dir(run.work, part).relative_to(run.work)),
        }
    return info
