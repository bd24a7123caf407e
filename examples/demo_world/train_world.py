"""Train every demo model from scratch on the shapes world, on a CPU, in one command.

    python examples/demo_world/train_world.py --work /tmp/demo_world_run --export src/brushnet/assets/demo_world

Each stage is one function (:data:`STAGES`) writing into ``--work``; ``--stages`` runs a subset, in the order
given, and a stage that crashed resumes from its last checkpoint when run again. Per-stage figures (steps,
loss, seconds) go to ``training_record.json``, which the export ships beside the models. See docs/demo.md.

1. ``data``: BrushData shards of ``--scenes`` training scenes (:func:`brushnet.data.shapes_writers.write_training_shards`).
2. ``vae``: the autoencoder (:mod:`autoencoder`).
3. ``base``: tokenizer, text encoder and text-to-image UNet (:mod:`text_to_image`).
4. ``brushnet`` (by :func:`brushnet.training.train`), ``inpaint`` (9-channel UNet), ``controlnet``: the
   inpainting models on the frozen base, from the same samples with the same settings (:mod:`inpainting`).
5. ``decoder``: the VAE decoder alone, longer (every latent the other stages used stays the same); then
   ``decoder_local``: more of it, teaching the decoder that the kept pixels must not depend on the hole's latents
   (:mod:`autoencoder`).
6. ``powerpaint``: a PowerPaint v2-style branch and its task words, on per-task samples, warm-started from the
   BrushNet branch (:mod:`powerpaint_stage`).
7. ``finetune`` (recipe v4.2): the three inpainting models trained further, each for the same steps, the branch
   with the kept region's caption-invariance and anchor terms (:mod:`finetune_stage`); the export ships these.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import time
import typing
from pathlib import Path

import torch
from autoencoder import train_decoder, train_decoder_local, train_vae
from finetune_stage import finetuned_dir, train_finetune
from inpainting import train_brushnet, train_controlnet, train_inpaint
from powerpaint_stage import train_powerpaint
from recipe import Run, WorldTrainConfig, check_config, missing_needs, smoke_config
from text_to_image import train_base
from world_data import write_shards

__all__ = ["DEFAULT_STAGES", "STAGES", "check_request", "export", "main", "train_all"]

logger = logging.getLogger("demo_world")


def make_data(run: Run) -> dict:
    """Stage ``data``: the training scenes as BrushData webdataset shards (what the inpainting stages read), written
    by ``--threads`` processes."""
    write_shards(run.shards, run.cfg.scenes, run.cfg.seed)
    return {"scenes": run.cfg.scenes}


STAGES: dict[str, typing.Callable[[Run], dict]] = {
    "data": make_data,
    "vae": train_vae,
    "decoder": train_decoder,
    "decoder_local": train_decoder_local,
    "base": train_base,
    "brushnet": train_brushnet,
    "inpaint": train_inpaint,
    "controlnet": train_controlnet,
    "powerpaint": train_powerpaint,
    "finetune": train_finetune,
}
"""Every stage by name."""

DEFAULT_STAGES: tuple[str, ...] = (
    "data", "vae", "base", "brushnet", "inpaint", "controlnet", "decoder", "decoder_local", "powerpaint",
    "finetune",
)  # fmt: skip
"""The stages of a full run, in order."""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def record_stage(
    record_path: Path, stage: str, info: dict, cfg: WorldTrainConfig, device: str = "cpu"
) -> dict:
    """Add ``stage``'s entry to the training record at ``record_path`` (re-read first, so stages run by other
    processes keep theirs; written atomically) and return the record.

    Each stage's entry keeps the whole config its process ran with (``stages.<name>.config``). The top-level
    ``config`` holds the fields on which every recorded stage agrees; a field on which stages differ (a later stage
    run with another default, say) is left out of it and listed per stage under ``config_conflicts``, so the record
    never claims one value for settings that were not one. A field missing from a stage's config (the stage was
    recorded before the recipe had the field) counts neither way.
    """
    record = json.loads(record_path.read_text()) if record_path.exists() else {"stages": {}}
    record["stages"][stage] = {**info, "config": dataclasses.asdict(cfg)}
    configs = {name: entry["config"] for name, entry in record["stages"].items() if "config" in entry}
    fields = {field for config in configs.values() for field in config}
    agreed, conflicts = {}, {}
    for field in sorted(fields):
        # a stage recorded before the field existed says nothing about it (not a conflict)
        values = {name: config[field] for name, config in configs.items() if field in config}
        if len({json.dumps(value) for value in values.values()}) == 1:
            agreed[field] = next(iter(values.values()))
        else:
            conflicts[field] = values
    record["config"] = agreed
    if conflicts:
        record["config_conflicts"] = conflicts
    else:
        record.pop("config_conflicts", None)
    record["hardware"] = {
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    if torch.device(device).type != "cpu":
        record["hardware"]["accelerator"] = _device_name(device)
    record["total_seconds"] = round(sum(s["seconds"] for s in record["stages"].values()), 1)
    text = json.dumps(record, indent=2)
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, record_path)
    return json.loads(text)


def _chain(work, stages: list[str]) -> list[str]:
    """``stages`` and every stage they read from, directly or not, whose products ``work`` lacks, in the order of
    a full run: a request that can run."""
    chain, todo = set(), list(stages)
    while todo:
        stage = todo.pop()
        if stage not in chain:
            chain.add(stage)
            todo.extend(missing_needs(work, stage))
    return [stage for stage in DEFAULT_STAGES if stage in chain]


def check_request(
    stages: list[str] | None, device: str, cfg: WorldTrainConfig | None = None, work=None
) -> list[str]:
    """The stages to run (default :data:`DEFAULT_STAGES`); ``ValueError`` for an unknown stage, a device this
    machine lacks, a recipe field out of range (:func:`recipe.check_config`) or, given the run folder ``work``, a
    stage that reads what another stage makes (:data:`recipe.NEEDS`: the base reads the VAE, the inpainting stages
    the shards and the base, ...) when that is neither in the run folder nor made earlier in the request."""
    if cfg is not None:
        check_config(cfg)
    stages = list(stages or DEFAULT_STAGES)
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from: {', '.join(STAGES)}")
    for index, stage in enumerate(stages if work is not None else ()):
        missing = missing_needs(work, stage, stages[:index])
        if missing:
            what = f"stage {missing[0]} makes" if len(missing) == 1 else f"stages {', '.join(missing)} make"
            raise ValueError(
                f"stage {stage} reads what {what}, which {work} lacks: run --stages {' '.join(_chain(work, stages))}"
            )
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here")
    return stages


def train_all(
    work: str | os.PathLike, cfg: WorldTrainConfig, stages: list[str] | None = None, device: str = "cpu"
) -> dict:
    """Run ``stages`` (default :data:`DEFAULT_STAGES`) into ``work`` on ``device``; return the training record.

    The record (``work/training_record.json``) is re-read before each write, so stages run by other
    processes on the same folder keep their entries.
    """
    stages = check_request(stages, device, cfg, work)
    run = Run(cfg, Path(work), device=device)
    run.work.mkdir(parents=True, exist_ok=True)
    record_path = run.work / "training_record.json"
    for stage in stages:
        logger.info("stage %s", stage)
        start = time.time()
        info = STAGES[stage](run)
        info["seconds"] = round(time.time() - start, 1)
        info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        info["torch_threads"] = torch.get_num_threads()
        info["device"] = _device_name(device)
        record_stage(record_path, stage, info, cfg, device)
        logger.info("stage %s done: %s", stage, info)
    return json.loads(record_path.read_text())


def _halve(folder: Path) -> None:
    """Store a folder's ``*.safetensors`` weights in float16 (loaders cast them back to the dtype asked for)."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})


def export(work: str | os.PathLike, dest: str | os.PathLike, half: bool = True) -> Path:
    """Copy the trained folders that exist into ``dest`` (``base/``, ``brushnet/``, ``inpaint/``,
    ``controlnet/``, ``powerpaint/``, ``training_record.json``), without run logs or checkpoints; other files
    in ``dest`` (the mini-BrushBench results) are kept. The branch, the 9-channel UNet and the ControlNet are the
    ``finetune`` stage's where it left them, the run's own otherwise. With ``half`` the UNets, branches and
    ControlNet are stored in float16 (VAE and text encoders stay float32)."""
    work, dest = Path(work), Path(dest)
    sources = {
        "base": work / "base",
        "brushnet": work / "brushnet_run" / "brushnet",
        "inpaint": work / "inpaint",
        "controlnet": work / "controlnet",
        "powerpaint": work / "powerpaint",
    }
    for part in ("brushnet", "inpaint", "controlnet"):
        if finetuned_dir(work, part).is_dir():
            sources[part] = finetuned_dir(work, part)
    dest.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        if not source.is_dir():
            continue
        tmp = dest / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("vae") if name == "inpaint" else None)
        if name == "inpaint":
            shutil.copytree(work / "base" / "vae", tmp / "vae")  # the final (decoder-tuned) VAE
        if half:
            halved = {"base": ("unet",), "inpaint": ("unet",), "powerpaint": ("PowerPaint_Brushnet",)}
            for sub in halved.get(name, ("",)):
                _halve(tmp / sub)
        if (dest / name).exists():
            shutil.rmtree(dest / name)
        os.replace(tmp, dest / name)
    shutil.copy(work / "training_record.json", dest / "training_record.json")
    return dest


def _flag_type(field: dataclasses.Field):
    hint = typing.get_type_hints(WorldTrainConfig)[field.name]
    if typing.get_origin(hint) is tuple:
        return lambda text: tuple(int(part) for part in text.split(","))
    if hint is bool:
        return lambda text: {"true": True, "1": True, "false": False, "0": False}[text.lower()]
    return hint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python examples/demo_world/train_world.py",
        description="Train the shapes-world demo models from scratch.",
    )
    parser.add_argument("--work", required=True, help="Working folder (shards, runs, trained folders).")
    parser.add_argument(
        "--export", help="Copy the finished models here (e.g. src/brushnet/assets/demo_world)."
    )
    parser.add_argument(
        "--stages", nargs="+", help=f"Run only these stages, in this order (of: {' '.join(STAGES)})."
    )
    parser.add_argument(
        "--smoke", action="store_true", help="A few steps of everything (checks the code path)."
    )
    parser.add_argument(
        "--snapshot-base",
        metavar="OUT",
        help="Train nothing: write the base stage's last checkpoint in --work (a run still training, given the "
        "same recipe flags) as a base folder at OUT that diagnose.py --base reads (the EMA weights).",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of this process, and processes of the data stage (default 1).",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where the stages train: cpu (default) or cuda (the record names the device of each stage).",
    )
    defaults = WorldTrainConfig()
    for field in dataclasses.fields(WorldTrainConfig):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=_flag_type(field),
            default=None,
            help=f"default {getattr(defaults, field.name)}",
        )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = smoke_config() if args.smoke else WorldTrainConfig()
    for field in dataclasses.fields(cfg):
        value = getattr(args, field.name)
        if value is not None:
            setattr(cfg, field.name, value)
    if args.snapshot_base:
        from text_to_image import snapshot_base

        try:
            step = snapshot_base(Run(cfg, Path(args.work)), args.snapshot_base)
        except (OSError, ValueError, RuntimeError) as error:  # no checkpoint; a recipe that does not fit it
            print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
            return 2
        print(f"{args.snapshot_base}: the base at step {step}")
        return 0
    try:
        check_request(args.stages, args.device, cfg, args.work)
    except ValueError as error:  # before anything is written
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.time()
    record = train_all(args.work, cfg, args.stages, args.device)
    logger.info("stages: %.1f s (record total %s s)", time.time() - start, record.get("total_seconds"))
    if args.export:
        export(args.work, args.export)
        logger.info("exported to %s", args.export)
    return 0


if __name__ == "__main__":
    sys.exit(main())
