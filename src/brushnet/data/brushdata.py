"""Streaming reader of BrushData-style webdataset shards, sharded over processes and DataLoader workers.

**Format.** A shard is a tar of samples; the files of one sample share a key (the file name up to its first
dot). The writer format (:mod:`brushnet.data.synthetic`, and the real BrushData) is::

    <key>.image          encoded image bytes (JPEG / PNG / WebP)
    <key>.caption        UTF-8 caption
    <key>.height         original height, decimal text
    <key>.width          original width, decimal text
    <key>.segmentation   JSON {"mask": [rle, ...]}; each rle a flat [start, length, ...] list, 1-based,
                         column-major over the ORIGINAL height × width (see brushnet.data.rle)

The reader also accepts ``.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` for the image, ``.txt`` for the caption
and ``.json`` for the segmentation (a bare JSON list of rles is accepted too). Any other file
(``aesthetic_score``, ``url``, ``original_key``, ...) is ignored.

**Malformed samples** are skipped, never raised: each is counted under one of :data:`SKIP_REASONS` in the
stream's :class:`SkipCounter`, which the training loop can log (``stream.skipped.as_dict()``). The counter
lives in shared memory, so counts made inside DataLoader worker processes are visible in the main process.

**Sharding.** Shard files are divided among ``world_size`` processes × ``num_workers`` DataLoader workers:
slot ``rank * num_workers + worker_id`` reads shards ``slot, slot + slots, ...`` of the (per-epoch shuffled)
shard list (:func:`shards_for_worker`), so the slots read disjoint shards that together cover them all. Use
at least ``world_size * num_workers`` shards; slots without a shard yield nothing. ``rank`` and
``world_size`` are given explicitly (e.g. ``accelerator.process_index`` / ``accelerator.num_processes``) or
read from ``torch.distributed`` or the ``RANK`` / ``WORLD_SIZE`` environment variables. Since every process
reads its own part, do not pass the DataLoader through ``accelerator.prepare`` (it would re-split or
dispatch the batches); move batches to the device yourself.

**Determinism and resuming.** The shard order and the in-worker shuffle depend on ``(seed, epoch, rank,
worker)``; each sample's mask and crop depend only on ``(seed, epoch, shard name, key)``. So an epoch is
replayed exactly, and training resumes mid-epoch by skipping the batches its DataLoader already delivered::

    stream.set_epoch(epoch, batches_consumed=batches_done_this_epoch, batch_size=train_batch_size)
    loader = DataLoader(stream, batch_size=train_batch_size, num_workers=num_workers)

A DataLoader takes batch ``i`` from worker ``i % num_workers``; on resuming, worker ``w`` takes the part of
worker ``(w + batches_consumed) % num_workers`` and skips what that one had delivered
(:func:`per_worker_skip`), so the resumed loader continues the interrupted batch sequence exactly as long as
every worker still had batches to deliver up to ``batches_consumed``. Once one worker's shards run out before
the others' (unequal shards, near an epoch's end), the DataLoader takes the next batches from the remaining
workers only and that mapping no longer holds; the trainer therefore draws and drops the consumed batches
instead (:func:`brushnet.training.data.iterate_batches`), which is always exact. Skipped samples are read and
validated (malformed ones are not miscounted) but not transformed. Resuming requires the same shards, seed,
resolution, mask config, ``world_size``, ``num_workers`` and ``shuffle_buffer``.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .masks import MaskConfig, make_training_mask
from .transforms import prepare_training_pair

logger = logging.getLogger(__name__)

__all__ = [
    "FIELD_EXTENSIONS",
    "SKIP_REASONS",
    "BrushDataStream",
    "SkipCounter",
    "expand_shards",
    "per_worker_skip",
    "resolve_rank_and_world_size",
    "shards_for_worker",
]

FIELD_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": ("image", "jpg", "jpeg", "png", "webp"),
    "caption": ("caption", "txt"),
    "height": ("height",),
    "width": ("width",),
    "segmentation": ("segmentation", "json"),
}
"""Accepted tar extensions of each field, in order of preference."""

SKIP_REASONS: tuple[str, ...] = (
    "missing_field",
    "invalid_size",
    "invalid_caption",
    "invalid_segmentation",
    "empty_segmentation",
    "undecodable_image",
    "size_mismatch",
    "unreadable_shard",
)
"""Why a sample (or a whole shard, for ``unreadable_shard``) was skipped."""

_MAX_WORKERS = 64


class SkipCounter:
    """Counts skipped samples by reason, across DataLoader worker processes (shared memory).

    Each process writes only its own row (main process: row 0, worker ``i``: row ``i + 1``), so increments
    never race. Read it from the main process with :meth:`as_dict` / :attr:`total`.
    """

    def __init__(self, max_workers: int = _MAX_WORKERS) -> None:
        self._counts = torch.zeros(max_workers + 1, len(SKIP_REASONS), dtype=torch.int64).share_memory_()

    def add(self, reason: str) -> None:
        """Count one skip for ``reason`` (one of :data:`SKIP_REASONS`)."""
        info = torch.utils.data.get_worker_info()
        row = 0 if info is None else 1 + info.id % (self._counts.shape[0] - 1)
        self._counts[row, SKIP_REASONS.index(reason)] += 1

    def as_dict(self) -> dict[str, int]:
        """Counts of every reason (zeros included), summed over processes."""
        return dict(zip(SKIP_REASONS, self._counts.sum(0).tolist()))

    @property
    def total(self) -> int:
        """All skipped samples (and unreadable shards)."""
        return int(self._counts.sum())

    def reset(self) -> None:
        self._counts.zero_()

    def __repr__(self) -> str:
        nonzero = {reason: count for reason, count in self.as_dict().items() if count}
        return f"SkipCounter({nonzero})"


class _Skip(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Turn a shard specification into a list of shard paths.

    Args:
        shards: a folder (all ``*.tar`` in it, sorted), a brace pattern (``data/{00000..00009}.tar``), a glob
            (``data/*.tar``, sorted), a single file, or a list of any of these (concatenated in order).
    """
    import braceexpand

    if isinstance(shards, (str, os.PathLike)):
        spec = os.fspath(shards)
        if os.path.isdir(spec):
            found = sorted(str(path) for path in Path(spec).glob("*.tar"))
            if not found:
                raise ValueError(f"no .tar shards in folder {spec}")
            return found
        expanded = []
        for item in braceexpand.braceexpand(spec):
            if any(char in item for char in "*?[") and not os.path.exists(item):
                matched = sorted(glob.glob(item))
                if not matched:
                    raise ValueError(f"no shards match {item}")
                expanded.extend(matched)
            else:
                expanded.append(item)
        return expanded
    return [path for item in shards for path in expand_shards(item)]


def resolve_rank_and_world_size(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """The process's ``(rank, world_size)``: explicit values, else ``torch.distributed``, else the
    ``RANK`` / ``WORLD_SIZE`` environment variables, else ``(0, 1)``."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def shards_for_worker(
    shards: Sequence[str],
    rank: int,
    world_size: int,
    worker_id: int = 0,
    num_workers: int = 1,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
) -> list[str]:
    """The shards one DataLoader worker of one process reads in an epoch.

    The shard list is permuted by ``numpy.random.default_rng([seed, epoch])`` (when ``shuffle``) — the same
    permutation in every process — and slot ``rank * num_workers + worker_id`` takes every
    ``world_size * num_workers``-th shard from its slot index on.
    """
    if not 0 <= worker_id < num_workers:
        raise ValueError(f"need 0 <= worker_id < num_workers, got {worker_id}, {num_workers}")
    order = list(shards)
    if shuffle:
        order = [order[i] for i in np.random.default_rng([seed, epoch]).permutation(len(order))]
    slots = world_size * num_workers
    return order[rank * num_workers + worker_id :: slots]


def per_worker_skip(batches_consumed: int, batch_size: int, num_workers: int) -> list[int]:
    """Samples each worker's stream yielded for ``batches_consumed`` batches of a DataLoader.

    A DataLoader over an iterable dataset takes batch ``i`` from worker ``i % num_workers`` (all of a batch
    from one worker); with ``num_workers == 0`` the main process is the only stream. Entry ``w`` is what the
    stream of worker ``w`` of the interrupted run delivered.
    """
    if batches_consumed < 0 or batch_size < 1 or num_workers < 0:
        raise ValueError("need batches_consumed >= 0, batch_size >= 1, num_workers >= 0")
    if num_workers == 0:
        return [batches_consumed * batch_size]
    return [max(0, math.ceil((batches_consumed - w) / num_workers)) * batch_size for w in range(num_workers)]


def _field(raw: dict[str, Any], name: str) -> bytes:
    for extension in FIELD_EXTENSIONS[name]:
        if extension in raw:
            return raw[extension]
    raise _Skip("missing_field")


def _parse_size(value: bytes) -> int:
    try:
        size = int(value.decode().strip())
    except (UnicodeDecodeError, ValueError, AttributeError):
        raise _Skip("invalid_size") from None
    if size < 1:
        raise _Skip("invalid_size")
    return size


def _parse_segmentation(value: bytes, height: int, width: int) -> list[list[int]]:
    """The run-length lists of a segmentation field, checked to be well-formed for ``height × width``."""
    try:
        parsed = json.loads(value)
    except (UnicodeDecodeError, ValueError):
        raise _Skip("invalid_segmentation") from None
    rles = parsed.get("mask") if isinstance(parsed, dict) else parsed
    if not isinstance(rles, list):
        raise _Skip("invalid_segmentation")
    total = height * width
    for rle in rles:
        if not isinstance(rle, list) or len(rle) % 2 or not all(type(v) is int for v in rle):
            raise _Skip("invalid_segmentation")
        if rle:
            values = np.asarray(rle, dtype=np.int64)
            starts, lengths = values[0::2], values[1::2]
            if starts.min() < 1 or lengths.min() < 0 or (starts + lengths - 1).max() > total:
                raise _Skip("invalid_segmentation")
    return rles


class BrushDataStream(torch.utils.data.IterableDataset):
    """BrushData webdataset shards → training samples, streamed.

    Yields ``{"pixel_values": float32 (3, R, R) in [-1, 1], "mask": float32 (1, R, R), 1 = hole,
    "caption": str, "key": str}`` (see :func:`brushnet.data.transforms.prepare_training_pair`). See the module
    docstring for the format, sharding, skipping of malformed samples and resuming.

    Args:
        shards: shard specification (see :func:`expand_shards`).
        resolution: side of the square output.
        mask_config: how masks are made; default :class:`~brushnet.data.masks.MaskConfig` (segmentation).
        seed: seed of the shard order, the shuffle buffer, masks and crops.
        epoch: initial epoch (see :meth:`set_epoch`).
        rank, world_size: this process's place; ``None`` → :func:`resolve_rank_and_world_size`.
        random_crop: random crops (training); ``False`` → centre crops (evaluation).
        shuffle_shards: permute the shard list each epoch.
        shuffle_buffer: shuffle samples within a worker through a buffer of this many raw samples (0: off).
        require_segmentation: skip samples without segmentation masks (``empty_segmentation``); default:
            only in ``"segmentation"`` mode. In ``"brush"`` mode the segmentation field is not read at all.
        batches_consumed, batch_size: resume after this many batches of ``batch_size`` samples of the epoch
            were consumed (see :meth:`set_epoch`).
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        resolution: int,
        mask_config: MaskConfig | None = None,
        *,
        seed: int = 0,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        random_crop: bool = True,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        require_segmentation: bool | None = None,
        batches_consumed: int = 0,
        batch_size: int = 1,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError("no shards given")
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.resolution = resolution
        self.mask_config = mask_config or MaskConfig()
        self.seed = seed
        self.rank, self.world_size = resolve_rank_and_world_size(rank, world_size)
        self.random_crop = random_crop
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        if require_segmentation is None:
            require_segmentation = self.mask_config.mode == "segmentation"
        self.require_segmentation = require_segmentation
        self.skipped = SkipCounter()
        self.set_epoch(epoch, batches_consumed, batch_size)

    def set_epoch(self, epoch: int, batches_consumed: int = 0, batch_size: int = 1) -> None:
        """Select the epoch to stream next (shard order, shuffle, masks and crops) and where to start in it.

        Call before each epoch's ``iter(dataloader)``; workers are started from this object, so they see it.

        Args:
            epoch: the epoch number.
            batches_consumed: batches of this epoch already consumed (resuming); 0 for a fresh epoch.
            batch_size: the DataLoader's batch size (only matters when ``batches_consumed > 0``).
        """
        if batches_consumed < 0 or batch_size < 1:
            raise ValueError(
                f"need batches_consumed >= 0 and batch_size >= 1, got {batches_consumed}, {batch_size}"
            )
        self.epoch = epoch
        self.batches_consumed = batches_consumed
        self.batch_size = batch_size

    def _parse(self, raw: dict[str, Any]) -> tuple[Image.Image, str, list[list[int]], int, int]:
        """Validate a raw sample; raises :class:`_Skip` with the reason when it is malformed."""
        image_bytes = _field(raw, "image")
        caption_bytes = _field(raw, "caption")
        height, width = _parse_size(_field(raw, "height")), _parse_size(_field(raw, "width"))
        rles: list[list[int]] = []
        if self.mask_config.mode != "brush":
            rles = _parse_segmentation(_field(raw, "segmentation"), height, width)
            if not rles and self.require_segmentation:
                raise _Skip("empty_segmentation")
        try:
            caption = caption_bytes.decode("utf-8").strip()
        except (UnicodeDecodeError, AttributeError):
            raise _Skip("invalid_caption") from None
        try:
            with Image.open(io.BytesIO(image_bytes)) as opened:
                image = opened.convert("RGB")
        except Exception:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
            raise _Skip("undecodable_image") from None
        if image.size != (width, height):
            raise _Skip("size_mismatch")
        return image, caption, rles, height, width

    def _raw_samples(self, shards: list[str], rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import tarfile_samples

        def handler(exception: Exception) -> bool:
            logger.warning("skipping unreadable shard data: %s", exception)
            self.skipped.add("unreadable_shard")
            return True

        samples = tarfile_samples(({"url": shard} for shard in shards), handler=handler)
        if not self.shuffle_buffer:
            yield from samples
            return
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            index = int(rng.integers(len(buffer)))
            buffer[index], sample = sample, buffer[index]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        num_workers = 1 if info is None else info.num_workers
        # Resuming: this worker delivers batch `batches_consumed` first, so it plays the part of the worker
        # that would have delivered it.
        worker_id = (0 if info is None else info.id + self.batches_consumed) % num_workers
        shards = shards_for_worker(
            self.shards,
            self.rank,
            self.world_size,
            worker_id,
            num_workers,
            self.seed,
            self.epoch,
            self.shuffle_shards,
        )
        if not shards:
            logger.warning(
                "rank %d worker %d has no shard (%d shards for %d processes x %d workers)",
                self.rank, worker_id, len(self.shards), self.world_size, num_workers,
            )  # fmt: skip
        to_skip = per_worker_skip(self.batches_consumed, self.batch_size, num_workers)[worker_id]
        worker_rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker_id])
        for raw in self._raw_samples(shards, worker_rng):
            try:
                image, caption, rles, height, width = self._parse(raw)
            except _Skip as skip:
                self.skipped.add(skip.reason)
                continue
            if to_skip > 0:
                to_skip -= 1
                continue
            key = raw["__key__"]
            name = f"{os.path.basename(str(raw.get('__url__', '')))}/{key}"
            rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(name.encode())])
            mask = make_training_mask(rles, height, width, rng, self.mask_config)
            sample = prepare_training_pair(image, mask, self.resolution, rng if self.random_crop else None)
            yield {**sample, "caption": caption, "key": key}
