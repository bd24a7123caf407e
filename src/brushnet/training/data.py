"""The training data stream: the data package's datasets, batched, sharded by process, resumable.

Samples are dicts ``{"pixel_values": (3, R, R) in [-1, 1], "mask": (1, R, R) 1 = hole, "caption": str,
"key": str}``. The stream of a process is a pure function of (seed, epoch, process index), so resuming
re-creates it and skips the micro-batches already consumed.
"""

from __future__ import annotations

import inspect
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
    """The dataset ``config`` names, reading only this process's part of the data.

    ``train_shards``: a :class:`brushnet.data.brushdata.BrushDataStream` (shards divided among processes
    and DataLoader workers, masks from ``config.mask``). ``train_data_dir``: the folder dataset of
    :mod:`brushnet.data.folder`.
    """
    if config.train_shards is not None:
        from ..data.brushdata import BrushDataStream

        return BrushDataStream(
            config.train_shards,
            config.resolution,
            config.mask,
            seed=seed,
            rank=process_index,
            world_size=num_processes,
            shuffle_buffer=config.shuffle_buffer,
        )
    return _folder_dataset(config, process_index, num_processes, seed)


def _folder_dataset(config, process_index: int, num_processes: int, seed: int):
    raise NotImplementedError("train_data_dir: the folder dataset (brushnet.data.folder) is not wired in yet")


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

    A dataset with ``set_epoch(epoch, skip=...)`` (the BrushData stream) selects the epoch's shard order,
    masks and crops and skips the consumed samples itself (validated, not transformed); any other
    dataset gets ``set_epoch(epoch)`` if it has it, and the consumed batches are drawn and dropped.
    """
    if skip:
        logger.info("skipping %d micro-batches already consumed in epoch %d", skip, epoch)
    set_epoch = getattr(dataset, "set_epoch", None)
    if set_epoch is not None and "skip" in inspect.signature(set_epoch).parameters:
        from ..data.brushdata import per_worker_skip

        set_epoch(epoch, skip=per_worker_skip(skip, dataloader.batch_size, dataloader.num_workers))
        batches = iter(dataloader)
    else:
        if set_epoch is not None:
            set_epoch(epoch)
        batches = itertools.islice(dataloader, skip, None)
    count = 0
    for batch in batches:
        count += 1
        yield batch
    if count == 0 and skip == 0:
        raise RuntimeError(
            "the training data yielded no batch for this process (empty dataset, fewer samples than a batch, "
            "or fewer shards than processes × dataloader workers)"
        )
