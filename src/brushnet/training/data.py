"""The training data stream: the data package's datasets, batched, sharded by process, resumable.

Samples are dicts ``{"pixel_values": (3, R, R) in [-1, 1], "mask": (1, R, R) 1 = hole, "caption": str,
"key": str}``. The stream of a process is a pure function of (seed, epoch, process index), so resuming
re-creates it and skips the micro-batches already consumed.
"""

from __future__ import annotations

import itertools
import logging

import torch
from torch.utils.data import DataLoader

__all__ = ["collate", "build_train_dataset", "build_train_dataloader", "iterate_batches"]

logger = logging.getLogger(__name__)


def collate(samples: list[dict]) -> dict:
    """Stack tensors, keep captions and keys as lists."""
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s.get("key", "") for s in samples],
    }


def build_train_dataset(config, process_index: int, num_processes: int, seed: int):
    """The dataset ``config`` names, sharded for this process (see :mod:`brushnet.data`)."""
    raise NotImplementedError  # filled in against brushnet.data below


def build_train_dataloader(config, dataset) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` with the config's batch size and workers (no shuffling here:
    map-style datasets are shuffled per epoch by :func:`iterate_batches`, streams by the data package)."""
    return DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        num_workers=config.dataloader_num_workers,
        collate_fn=collate,
        drop_last=True,
        persistent_workers=False,
    )


def iterate_batches(dataloader: DataLoader, dataset, epoch: int, skip: int = 0):
    """Batches of ``epoch``, skipping the first ``skip`` (already consumed before a resume).

    Calls ``dataset.set_epoch(epoch)`` when the dataset has it, so each epoch has its own order and masks.
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    if skip:
        logger.info("skipping %d micro-batches already consumed in epoch %d", skip, epoch)
    count = 0
    for batch in itertools.islice(dataloader, skip, None):
        count += 1
        yield batch
    if count == 0 and skip == 0:
        raise RuntimeError(
            "the training data yielded no batch (empty dataset, or fewer samples than a batch)"
        )
