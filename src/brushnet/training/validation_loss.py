"""The held-out validation loss: the training loss of a fixed set of samples the run never trains on, at fixed masks,
noise and timesteps, so that two evaluations differ only in the branch's weights (a convergence curve; the per-step
training loss is of other samples, noise and timesteps at every step).

**The set** (:func:`load_held_out_set`): ``--validation_loss_samples`` N samples, the first N usable ones of
``--validation_shards`` / ``--validation_data_dir`` (in the order the shards expand to and each shard holds them; a
folder's images sorted by name), or, when neither is given, N samples held out of the training data and dropped from
its stream (:meth:`HeldOutSet.exclude_from`):

- ``--train_shards``: the first N usable samples of the shards in that order, known by their key; the training stream
  drops every sample of those keys (a sample of another shard that repeats one of them is left out too);
- ``--train_data_dir``: the N images whose file names have the smallest CRC-32, known by their file name.

The choice depends only on the data and N, not on ``--seed``, the number of processes or the step, so every process
and every resume holds out the same samples. Masks follow the run's mask recipe drawn from a fixed seed (given masks
as they are), crops are centred and captions are never dropped (so ``--caption_dropout_embeds`` changes it only
through the guidance terms' unconditional half, ``--unconditional_embeds``, which it sets by default; both are passed
on, with the run's other loss options).

**The draws.** The schedule's T timesteps are cut into ``--validation_loss_buckets`` K ranges of equal width; sample i
is evaluated once in each range b, at a timestep drawn uniformly in it from a fixed seed, with the noise and the VAE
posterior samples of its own fixed-seed generator. An evaluation is therefore a pure function of the weights.

**The number.** Each (sample, range) pair is the loss the run optimises
(:func:`brushnet.training.loop.brushnet_training_loss` with its prediction type and extra terms) of a batch of that one
sample, in eval mode without gradients, with the EMA weights when the run keeps an EMA (as image validation and the
final export). The validation loss is the mean over the N·K pairs, a stratified estimate of the training objective's
expectation over t ~ U{0, …, T−1}; each range's loss is the mean over its N pairs. With several processes each
evaluates every P-th pair and the pairs are summed across processes, so the number does not depend on P.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

__all__ = [
    "RECORD_FILE",
    "HeldOutSet",
    "ValidationLossResult",
    "ValidationLoss",
    "load_held_out_set",
    "timestep_buckets",
    "evaluate_validation_loss",
]

logger = logging.getLogger(__name__)

VALIDATION_LOSS_SEED = 1234
RECORD_FILE = "validation_loss.json"


def timestep_buckets(num_train_timesteps: int, count: int) -> list[tuple[int, int]]:
    """``count`` ranges ``(first, last)`` of equal width (±1) covering the timesteps ``0 … num_train_timesteps − 1``.

    Raises:
        ValueError: more ranges than timesteps (naming ``--validation_loss_buckets``).
    """
    if not 0 < count <= num_train_timesteps:
        raise ValueError(
            f"--validation_loss_buckets {count}: the base's schedule has {num_train_timesteps} timesteps; give 1 to "
            f"{num_train_timesteps}"
        )
    edges = [b * num_train_timesteps // count for b in range(count + 1)]
    return [(edges[b], edges[b + 1] - 1) for b in range(count)]


@dataclass
class HeldOutSet:
    """The samples of the validation loss and their fixed timesteps.

    Attributes:
        source: where the samples come from, in words (the flag and its value).
        keys: one name per sample (shard key or image file name).
        samples: one collated batch of one sample each (:func:`brushnet.training.data.collate`).
        timesteps: ``(N, K)`` int64, sample i's timestep in range b.
        buckets: the K ranges ``(first, last)``.
        held_out_of_training: the samples were taken out of the training data, which must then drop them.
        settings: the run's settings the numbers depend on besides the weights (resolution, mask recipe, loss).
        implied: settings a record written before they were recorded held implicitly, with the value it held (a run
            recorded before ``unconditional_embeds`` was: the family's fixed half); such a record still matches.
    """

    source: str
    keys: list[str]
    samples: list[dict]
    timesteps: torch.Tensor
    buckets: list[tuple[int, int]]
    held_out_of_training: bool = False
    settings: dict = field(default_factory=dict)
    implied: dict = field(default_factory=dict)

    def description(self) -> dict:
        """What identifies the set and the loss (JSON-ready): the numbers of two records of the same description
        are comparable."""
        return {
            "source": self.source,
            "samples": list(self.keys),
            "timestep_buckets": [list(bucket) for bucket in self.buckets],
            "timesteps": self.timesteps.tolist(),
            "settings": self.settings,
        }

    def exclude_from(self, dataset):
        """``dataset`` (the training data this set was held out of) without the held-out samples: a stream filtered
        by key, or a folder dataset without those images."""
        if isinstance(dataset, IterableDataset):
            return WithoutKeys(dataset, self.keys)
        names = [path.name for path in dataset.image_paths]
        return WithoutIndices(dataset, [index for index, name in enumerate(names) if name in set(self.keys)])


class WithoutKeys(IterableDataset):
    """A sample stream (:class:`brushnet.data.brushdata.BrushDataStream`) without the samples whose ``key`` is held
    out. Keeps the stream's ``skipped`` counter and ``set_epoch`` (the epoch only: the stream's own mid-epoch skip
    counts the dropped samples, so the loop's draw-and-drop resume is the exact one)."""

    def __init__(self, stream, keys) -> None:
        super().__init__()
        self.stream = stream
        self.keys = frozenset(keys)

    @property
    def skipped(self):
        return getattr(self.stream, "skipped", None)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self):
        return (sample for sample in self.stream if sample.get("key") not in self.keys)


class WithoutIndices(Dataset):
    """A map-style dataset (:class:`brushnet.data.folder.FolderDataset`) without some of its items; an item keeps its
    own index's masks and crops."""

    def __init__(self, dataset, dropped) -> None:
        self.dataset = dataset
        dropped = set(dropped)
        self.indices = [index for index in range(len(dataset)) if index not in dropped]

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def load_held_out_set(config, num_train_timesteps: int, implied: dict | None = None) -> HeldOutSet:
    """The held-out set of ``config`` (see the module docstring): read the samples, fix their timesteps.
    ``implied``: :attr:`HeldOutSet.implied`.

    Raises:
        InputError: the validation data yields no usable sample, or holding the samples out would leave the training
            data empty (one line naming the flag).
        ValueError: more timestep ranges than the schedule has timesteps.
    """
    from ..data.brushdata import BrushDataStream
    from ..errors import InputError
    from .data import collate, folder_dataset

    buckets = timestep_buckets(num_train_timesteps, config.validation_loss_buckets)
    count = config.validation_loss_samples
    split = config.validation_shards is None and config.validation_data_dir is None
    shards = config.validation_shards if not split else config.train_shards
    if shards is not None:
        flag = "validation_shards" if not split else "train_shards"
        stream = BrushDataStream(
            shards,
            config.resolution,
            config.mask,
            seed=VALIDATION_LOSS_SEED,
            rank=0,
            world_size=1,
            random_crop=False,
            shuffle_shards=False,
            shuffle_buffer=0,
        )
        # held out of the training data: one more, to tell whether any sample is left to train on
        samples = list(itertools.islice(iter(stream), count + 1 if split else count))
        if split and len(samples) <= count:
            raise InputError(
                f"--validation_loss_samples {count} would hold out every usable sample of --train_shards "
                f"({len(samples)}): lower it or give --validation_shards"
            )
        samples = samples[:count]
        keys = [sample["key"] for sample in samples]
    else:
        flag = "validation_data_dir" if not split else "train_data_dir"
        dataset = folder_dataset(
            config,
            seed=VALIDATION_LOSS_SEED,
            root=config.validation_data_dir if not split else None,
            random_crop=False,
        )
        names = [path.name for path in dataset.image_paths]
        if split:
            if len(names) <= count:
                raise InputError(
                    f"--validation_loss_samples {count} would hold out every image of --train_data_dir "
                    f"({len(names)}): lower it or give --validation_data_dir"
                )
            order = sorted(range(len(names)), key=lambda i: (zlib.crc32(names[i].encode()), names[i]))
            indices = sorted(order[:count])
        else:
            indices = list(range(min(count, len(names))))
        samples = [dataset[index] for index in indices]
        keys = [names[index] for index in indices]
    if not samples:
        raise InputError(f"--{flag} {getattr(config, flag)}: no usable sample for the validation loss")
    if len(samples) < count:
        logger.info("the validation loss uses all %d usable samples of --%s", len(samples), flag)
    generator = torch.Generator().manual_seed(VALIDATION_LOSS_SEED)
    timesteps = torch.stack(
        [torch.randint(first, last + 1, (len(samples),), generator=generator) for first, last in buckets],
        dim=1,
    )
    source = f"--{flag} {getattr(config, flag)}"
    settings = {name: getattr(config, name) for name in _SETTINGS}
    settings["mask"] = config.mask.model_dump(mode="json")
    from .loop import uses_empty_caption  # (loop imports this module)

    if uses_empty_caption(
        config.kept_invariance_weight, config.guided_loss_weight, config.hole_pull_anchor_weight
    ):
        settings["unconditional_embeds"] = (
            config.unconditional_embeds
        )  # the terms' half changes their numbers
    return HeldOutSet(
        source=f"held out of {source}" if split else source,
        keys=keys,
        samples=[collate([sample]) for sample in samples],
        timesteps=timesteps,
        buckets=buckets,
        held_out_of_training=split,
        settings=settings,
        implied={k: v for k, v in (implied or {}).items() if k in settings},
    )


_SETTINGS = (
    "resolution",
    "mixed_precision",
    "prediction_type",
    "kept_invariance_weight",
    "kept_invariance_margin",
    "kept_invariance_min_timestep",
    "guided_loss_weight",
    "guided_loss_scale",
    "hole_pull_anchor_weight",
)
"""The options besides the data and the weights that change the numbers (with the mask recipe; and
``unconditional_embeds`` when a term beyond the paper's loss is on)."""


def _pair_generator(sample: int, bucket: int) -> torch.Generator:
    """The generator of one (sample, range) pair: its VAE posterior samples and noise."""
    seed = int(np.random.SeedSequence([VALIDATION_LOSS_SEED, sample, bucket]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


@dataclass
class ValidationLossResult:
    """One evaluation: the mean over every (sample, range) pair and the mean of each range."""

    loss: float
    bucket_losses: list[float]


LossFunction = Callable[[torch.nn.Module, dict, torch.Generator, torch.Tensor], torch.Tensor]


@torch.no_grad()
def evaluate_validation_loss(
    accelerator,
    held_out: HeldOutSet,
    loss: LossFunction,
    branch: torch.nn.Module,
    *,
    ema=None,
    model: torch.nn.Module | None = None,
) -> ValidationLossResult:
    """The validation loss of ``branch`` (its EMA weights when ``ema`` is given) on ``held_out``. Call on every
    process: each evaluates every P-th (sample, range) pair and the pairs are summed across processes.

    Args:
        accelerator: the run's accelerator (device, processes, autocast).
        held_out: the set.
        loss: ``loss(model, batch, generator, timesteps) -> scalar``, the training loss with the given timesteps.
        branch: the branch's own module (unwrapped): eval mode and the EMA weights are set on it for the evaluation,
            and put back afterwards.
        ema: the run's ``EMAModel``, or ``None``.
        model: what to call, when not ``branch`` (a sharded FSDP module: then every process runs as many passes).
    """
    samples, buckets = len(held_out.samples), len(held_out.buckets)
    pairs = samples * buckets
    processes, rank = accelerator.num_processes, accelerator.process_index
    same_passes = (
        model is not None and model is not branch
    )  # sharded weights: every process takes part in each pass
    model = branch if model is None else model
    parameters = list(branch.parameters())
    if ema is not None:
        ema.store(parameters)
        ema.copy_to(parameters)
    was_training = branch.training
    branch.eval()
    try:
        values = torch.zeros(pairs, dtype=torch.float64, device=accelerator.device)
        for round_index in range(math.ceil(pairs / processes)):
            pair = round_index * processes + rank
            if pair >= pairs and not same_passes:
                break
            sample, bucket = divmod(min(pair, pairs - 1), buckets)
            with accelerator.autocast():
                value = loss(
                    model,
                    held_out.samples[sample],
                    _pair_generator(sample, bucket),
                    held_out.timesteps[sample, bucket : bucket + 1],
                )
            if pair < pairs:
                values[pair] = value.detach().double()
        if processes > 1:
            values = accelerator.reduce(values, reduction="sum")
    finally:
        branch.train(was_training)
        if ema is not None:
            ema.restore(parameters)
    table = values.view(samples, buckets).cpu()
    return ValidationLossResult(table.mean().item(), table.mean(dim=0).tolist())


class ValidationLoss:
    """The run's held-out loss: evaluates, logs to the trackers and the log, and keeps ``output_dir/`` +
    :data:`RECORD_FILE`, a JSON object with the set's description (:meth:`HeldOutSet.description`) and
    ``"evaluations": [{"step", "loss", "bucket_losses"}, …]``.

    The record keeps the evaluations of earlier steps of the same set: a resumed run drops those after its
    checkpoint's step (an abandoned run's), and a record of another set is moved aside to
    ``validation_loss.before-step-<N>.json`` (its numbers are not comparable)."""

    def __init__(
        self,
        accelerator,
        held_out: HeldOutSet,
        loss: LossFunction,
        branch: torch.nn.Module,
        output_dir: str | os.PathLike,
        *,
        ema=None,
        model: torch.nn.Module | None = None,
        start_step: int = 0,
    ) -> None:
        self.accelerator, self.held_out, self.loss = accelerator, held_out, loss
        self.branch, self.ema, self.model = branch, ema, model
        self.path = Path(output_dir) / RECORD_FILE
        self.last_step: int | None = None
        if (
            accelerator.is_main_process and self.path.exists()
        ):  # a resumed run: forget an abandoned run's later steps
            self._write(self._kept(start_step, inclusive=True))

    def evaluate(self, step: int) -> ValidationLossResult:
        """Evaluate at ``step`` (on every process), log it and record it (the main process)."""
        result = evaluate_validation_loss(
            self.accelerator, self.held_out, self.loss, self.branch, ema=self.ema, model=self.model
        )
        self.last_step = step
        names = [f"t{first}-{last}" for first, last in self.held_out.buckets]
        logs = {"validation_loss": result.loss}
        logs.update({f"validation_loss/{name}": value for name, value in zip(names, result.bucket_losses)})
        self.accelerator.log(logs, step=step)
        if self.accelerator.is_main_process:
            logger.info(
                "step %d: validation_loss=%.4g (%d held-out samples × %d timesteps); by timestep: %s",
                step,
                result.loss,
                len(self.held_out.samples),
                len(self.held_out.buckets),
                ", ".join(f"{name[1:]} {value:.4g}" for name, value in zip(names, result.bucket_losses)),
            )
            evaluations = self._kept(step, inclusive=False)
            evaluations.append({"step": step, "loss": result.loss, "bucket_losses": result.bucket_losses})
            self._write(evaluations)
        return result

    def _kept(self, step: int, inclusive: bool) -> list[dict]:
        """The recorded evaluations of this set before ``step`` (up to it with ``inclusive``); a record of another
        set is moved aside."""
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            record = None
        description = self.held_out.description()
        if isinstance(record, dict) and isinstance(record.get("settings"), dict):
            # a record from before a setting was recorded held it implicitly
            record["settings"] = {**self.held_out.implied, **record["settings"]}
        if not isinstance(record, dict) or {k: record.get(k) for k in description} != description:
            aside = self.path.with_name(f"validation_loss.before-step-{step}.json")
            os.replace(self.path, aside)
            logger.warning(
                "%s records the validation loss of another held-out set (or is unreadable): moved to %s",
                self.path,
                aside.name,
            )
            return []
        evaluations = record.get("evaluations")
        return [
            entry
            for entry in (evaluations if isinstance(evaluations, list) else [])
            if isinstance(entry, dict)
            and isinstance(entry.get("step"), int)
            and (entry["step"] <= step if inclusive else entry["step"] < step)
        ]

    def _write(self, evaluations: list[dict]) -> None:
        from ..io import atomic_write_text

        record = {**self.held_out.description(), "evaluations": evaluations}
        atomic_write_text(self.path, json.dumps(record, indent=1) + "\n")
