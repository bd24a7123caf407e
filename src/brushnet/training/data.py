"""The training data stream: the data package's datasets, batched, sharded by process, resumable.

Samples are dicts ``{"pixel_values": (3, R, R) in [-1, 1], "mask": (1, R, R) 1 = hole, "caption": str,
"key": str}``, with ``"original_size"`` and ``"crop_top_left"`` (2,) where the dataset knows them (SDXL's
time ids). The stream of a process is a pure function of (seed, epoch, process index), so resuming
re-creates it and skips the micro-batches already consumed.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

__all__ = [
    "EpochShardSampler",
    "collate",
    "check_training_data",
    "build_train_dataset",
    "build_train_dataloader",
    "iterate_batches",
]

logger = logging.getLogger(__name__)


def collate(samples: list[dict]) -> dict:
    """Stack tensors, keep captions and keys as lists; sizes and crops are stacked when every sample has them."""
    batch = {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s.get("key", "") for s in samples],
    }
    for name in ("original_size", "crop_top_left"):
        if all(name in s for s in samples):
            batch[name] = torch.stack([torch.as_tensor(s[name]) for s in samples])
    return batch


def _is_remote(shard: str) -> bool:
    return "://" in shard or shard.startswith("pipe:")


def check_training_data(config) -> None:
    """Check that the data ``config`` names exists, before any model is loaded: ``train_shards`` is not empty
    and every local shard it expands to (folder, brace pattern, glob) is a file; ``train_data_dir`` is a folder.
    and holds images (with a mask each when it has ``masks/``; without, ``--mask_mode brush``) and readable
    captions. The held-out validation data (``validation_shards``, ``validation_data_dir``) is checked the same
    way. Whether the shards hold usable samples is known only when they are read (:func:`iterate_batches`).

    Raises:
        InputError: one line naming the flag, the problem and what was given.
    """
    for flag in ("train_shards", "validation_shards"):
        if getattr(config, flag, None) is not None:
            _check_shards(getattr(config, flag), flag)
    for flag in ("train_data_dir", "validation_data_dir"):
        if getattr(config, flag, None) is not None:
            _check_folder(config, getattr(config, flag), flag)


def _check_shards(spec, flag: str) -> None:
    from ..data.brushdata import expand_shards
    from ..errors import InputError

    spec = str(spec).strip()
    if not spec:
        raise InputError(
            f"--{flag} is empty: give a folder of .tar shards, a brace pattern (data/{{00000..00009}}.tar) "
            "or a glob (data/*.tar)"
        )
    try:
        shards = expand_shards(spec)
    except ValueError as exc:
        raise InputError(f"--{flag} {spec}: {exc}") from None
    missing = [shard for shard in shards if not _is_remote(shard) and not Path(shard).is_file()]
    if len(shards) == 1 and missing:
        raise InputError(f"--{flag} {spec}: no such shard file or folder")
    if missing and len(missing) == len(shards):
        raise InputError(
            f"--{flag} {spec} matches no existing shard ({len(shards)} paths, e.g. {missing[0]})"
        )
    if missing:
        raise InputError(
            f"--{flag} {spec}: {len(missing)} of its {len(shards)} shards do not exist (first: {missing[0]})"
        )


def _check_folder(config, root, flag: str) -> None:
    from ..errors import InputError

    if not Path(root).is_dir():
        raise InputError(f"--{flag} {root} is not a folder")
    try:  # lists the images (and masks, captions) and checks the mask mode; reads no image
        folder_dataset(config, seed=0, root=root)
    except ValueError as exc:
        raise InputError(f"--{flag}: {exc}") from None


def build_train_dataset(config, process_index: int, num_processes: int, seed: int):
    """The dataset ``config`` names.

    ``train_shards``: a :class:`brushnet.data.brushdata.BrushDataStream` reading only this process's shards
    (divided among processes and DataLoader workers), masks from ``config.mask``. ``train_data_dir``: a
    :class:`brushnet.data.folder.FolderDataset` over ``images/`` (or the folder itself), the optional
    ``masks/`` (white = hole) and ``images/captions.jsonl``; it is divided among processes by the sampler
    of :func:`build_train_dataloader`.
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
    return folder_dataset(config, seed)


def folder_dataset(config, seed: int, root=None, random_crop: bool = True):
    """The :class:`brushnet.data.folder.FolderDataset` of ``root`` (default ``config.train_data_dir``): ``images/``
    (or the folder itself), the optional ``masks/``; without masks the mask mode must be ``brush``.

    Raises:
        ValueError: no images, a missing mask, unreadable captions, or masks to generate in another mode.
    """
    from ..data.folder import FolderDataset

    root = Path(config.train_data_dir if root is None else root)
    image_dir = root / "images" if (root / "images").is_dir() else root
    mask_dir = root / "masks" if (root / "masks").is_dir() else None
    if mask_dir is None and config.mask.mode != "brush":
        raise ValueError(
            f"{root} has no masks/ folder, so masks must be generated: pass --mask_mode brush "
            f"(mask mode {config.mask.mode!r} needs segmentation masks)"
        )
    return FolderDataset(
        image_dir,
        config.resolution,
        mask_dir=mask_dir,
        mask_config=config.mask,
        seed=seed,
        random_crop=random_crop,
    )


class EpochShardSampler(Sampler[int]):
    """Indices of a map-style dataset for one process: a per-epoch permutation (seeded by ``(seed, epoch)``,
    the same in every process), split round-robin among processes, truncated to equal length.

    ``set_epoch(epoch, skip)`` selects the epoch and drops its first ``skip`` indices (already consumed).
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int):
        self.num_samples, self.rank, self.world_size, self.seed = num_samples, rank, world_size, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.num_samples // self.world_size - self.skip

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        mine = order[self.rank :: self.world_size][: self.num_samples // self.world_size]
        return iter(mine[self.skip :].tolist())


def build_train_dataloader(config, dataset, process_index: int = 0, num_processes: int = 1) -> DataLoader:
    """A ``DataLoader`` with the config's batch size and workers, dropping incomplete batches, its batches in
    page-locked memory when CUDA is available.

    A shard stream divides itself among processes; a map-style dataset gets an :class:`EpochShardSampler`.
    Do not pass it through ``accelerator.prepare`` (that would split the batches a second time).
    """
    sampler = None
    if not isinstance(dataset, IterableDataset):
        sampler = EpochShardSampler(len(dataset), process_index, num_processes, config.seed or 0)
    return DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        sampler=sampler,
        num_workers=config.dataloader_num_workers,
        collate_fn=collate,
        drop_last=True,
        # batches land in page-locked memory (in the loader's pinning thread) when a GPU may read them, so the
        # copy to it does not block (brushnet.devices.to_device)
        pin_memory=torch.cuda.is_available(),
    )


def iterate_batches(dataloader: DataLoader, dataset, epoch: int, skip: int = 0):
    """Batches of ``epoch``, skipping the first ``skip`` (already consumed before a resume).

    A map-style dataset is resumed by its :class:`EpochShardSampler`; any other dataset (the BrushData stream)
    gets ``set_epoch(epoch)`` if it has it, and the consumed batches are drawn and dropped. That reads and
    transforms them again, but it is exact whatever the DataLoader workers do: the stream's own
    ``batches_consumed`` skip assumes each worker delivers every ``num_workers``-th batch, which stops being
    true once one worker's shards run out before the others'.
    """
    if skip:
        logger.info("skipping %d micro-batches already consumed in epoch %d", skip, epoch)
    set_epoch = getattr(dataset, "set_epoch", None)
    if isinstance(dataloader.sampler, EpochShardSampler):
        if set_epoch is not None:
            set_epoch(epoch)
        dataloader.sampler.set_epoch(epoch, skip=skip * dataloader.batch_size)
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
        from ..errors import InputError

        skipped = getattr(dataset, "skipped", None)
        counts = {k: v for k, v in skipped.as_dict().items() if v} if hasattr(skipped, "as_dict") else {}
        if counts:
            reasons = ", ".join(f"{count} {reason}" for reason, count in counts.items())
            detail = f"no usable sample: every sample read was malformed ({reasons})"
        else:
            detail = "empty dataset, fewer samples than a batch, or fewer shards than processes × dataloader workers"
        raise InputError(f"the training data yielded no batch for this process ({detail})")
