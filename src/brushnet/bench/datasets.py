"""Benchmark datasets: BrushBench, EditBench-style sets and a plain folder, behind one item type.

Mask convention (the project's): a boolean ``(H, W)`` array, ``True`` = the region to generate.

**BrushBench / EditBench** (``kind="brushbench"`` / ``"editbench"``): a folder holding
``mapping_file.json`` (or the path of that file), mapping id → entry with

- ``"image"``: image path relative to the mapping file's folder;
- ``"caption"``: the text (the prompt unless the entry has a ``"prompt"`` key);
- ``"inpainting_mask"``: row-major, 1-based run-length list ``[start, length, ...]`` (1 = generate),
  :func:`~brushnet.data.rle.decode_brushbench_rle`; decoded at the entry's ``"height"``/``"width"`` when
  present, else at the image's size (512×512 for the published sets);
- ``"outpainting_mask"``: the same for outside-inpainting; optional — when absent (EditBench) the
  outside mask is the complement of the inside mask.

Every other key (the shapes world's ``prompt``, ``target``, ``variant``, ...) is kept as item metadata.

**Folder** (``kind="folder"``): ``images/<stem>.{png,jpg,jpeg,webp}``, ``masks/<stem>.png`` (white =
generate; binarised at 0.5) and an optional ``captions.jsonl`` with one ``{"id": "<stem>", "caption":
"...", ...}`` object per line (extra keys become metadata, ``"prompt"`` overrides the caption as prompt).
Outside-inpainting inverts the mask.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.rle import decode_brushbench_rle
from ..errors import InputError
from ..image import load_image, load_mask

logger = logging.getLogger(__name__)

__all__ = ["DATASET_KINDS", "MASK_KINDS", "BenchItem", "BenchDataset", "load_dataset", "shard_indices"]

DATASET_KINDS = ("brushbench", "editbench", "folder")
MASK_KINDS = ("inside", "outside")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class BenchItem:
    """One benchmark image.

    Attributes:
        id: the entry's id (file stem for folders).
        image: RGB image.
        mask: boolean ``(H, W)``, ``True`` = generate (already inverted for outside-inpainting).
        prompt: what the methods are asked to paint (``prompt`` key, else the caption).
        caption: the text the whole-image metrics (CLIP, HPS, ImageReward) score against.
        metadata: every other key of the entry (e.g. the shapes world's ``target``).
    """

    id: str
    image: Image.Image
    mask: np.ndarray
    prompt: str
    caption: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Entry:
    id: str
    image_path: Path
    caption: str
    prompt: str
    inside_rle: list[int] | None = None
    outside_rle: list[int] | None = None
    mask_path: Path | None = None
    size: tuple[int, int] | None = None  # (width, height) to decode the RLE at
    metadata: dict[str, Any] = field(default_factory=dict)


class BenchDataset(Sequence[BenchItem]):
    """A lazily loaded benchmark set; ``dataset[i]`` opens image ``i`` and decodes its mask.

    Args:
        kind: one of :data:`DATASET_KINDS`.
        mask_kind: ``"inside"`` (fill the masked object) or ``"outside"`` (regenerate everything else).
        entries: parsed entries (see :func:`load_dataset`).
        root: where the set lives (reported in run settings).
    """

    def __init__(self, kind: str, mask_kind: str, entries: list[_Entry], root: Path):
        if mask_kind not in MASK_KINDS:
            raise InputError(f"unknown mask kind {mask_kind!r}; choose one of: {', '.join(MASK_KINDS)}")
        self.kind = kind
        self.mask_kind = mask_kind
        self.root = root
        self._entries = entries

    @property
    def ids(self) -> list[str]:
        return [entry.id for entry in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> BenchItem:  # type: ignore[override]
        entry = self._entries[index]
        image = load_image(entry.image_path)
        if entry.mask_path is not None:
            mask = load_mask(entry.mask_path, size=image.size, allow_empty=True)
            if self.mask_kind == "outside":
                mask = ~mask
        else:
            width, height = entry.size or image.size
            if (width, height) != image.size:
                raise InputError(
                    f"{entry.id}: masks are {width}x{height} but the image is {image.size[0]}x{image.size[1]}"
                )
            if self.mask_kind == "outside" and entry.outside_rle is not None:
                mask = decode_brushbench_rle(entry.outside_rle, height, width)
            else:
                mask = decode_brushbench_rle(entry.inside_rle or [], height, width)
                if self.mask_kind == "outside":
                    mask = ~mask
        return BenchItem(entry.id, image, mask, entry.prompt, entry.caption, dict(entry.metadata))

    def __iter__(self) -> Iterator[BenchItem]:
        for index in range(len(self)):
            yield self[index]

    def limit(self, count: int | None) -> BenchDataset:
        """The first ``count`` entries (all when ``None``)."""
        if count is None:
            return self
        if count < 1:
            raise InputError(f"--limit must be at least 1, got {count}")
        return BenchDataset(self.kind, self.mask_kind, self._entries[:count], self.root)


def _load_mapping(path: Path, kind: str) -> tuple[list[_Entry], Path]:
    mapping_path = path / "mapping_file.json" if path.is_dir() else path
    if not mapping_path.is_file():
        raise InputError(f"{kind} set: no mapping_file.json at {mapping_path}")
    try:
        mapping = json.loads(mapping_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{mapping_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(mapping, dict):
        raise InputError(f"{mapping_path}: expected an object mapping id -> entry")
    root = mapping_path.parent
    entries = []
    for entry_id, raw in mapping.items():
        missing = [key for key in ("image", "caption", "inpainting_mask") if key not in raw]
        if missing:
            raise InputError(f"{mapping_path}: entry {entry_id!r} lacks {', '.join(missing)}")
        known = {"image", "caption", "inpainting_mask", "outpainting_mask", "height", "width"}
        size = (int(raw["width"]), int(raw["height"])) if "width" in raw and "height" in raw else None
        entries.append(
            _Entry(
                id=str(entry_id),
                image_path=root / raw["image"],
                caption=raw["caption"],
                prompt=raw.get("prompt", raw["caption"]),
                inside_rle=raw["inpainting_mask"],
                outside_rle=raw.get("outpainting_mask"),
                size=size,
                metadata={key: value for key, value in raw.items() if key not in known},
            )
        )
    return entries, root


def _load_folder(path: Path) -> list[_Entry]:
    images_dir, masks_dir = path / "images", path / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise InputError(f"folder set {path}: expected images/ and masks/ subfolders")
    captions: dict[str, dict[str, Any]] = {}
    captions_path = path / "captions.jsonl"
    if captions_path.is_file():
        for number, line in enumerate(captions_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{captions_path}:{number}: not valid JSON") from None
            if "id" not in record:
                raise InputError(f'{captions_path}:{number}: lacks "id"')
            captions[str(record["id"])] = record
    else:
        logger.info("folder set %s has no captions.jsonl: prompts are empty", path)
    entries = []
    seen: dict[str, str] = {}
    for image_path in sorted(images_dir.iterdir()):
        if image_path.suffix.lower() not in _IMAGE_SUFFIXES:
            continue
        stem = image_path.stem
        if stem in seen:  # the id names the outputs and rows: two items would share them
            raise InputError(
                f"folder set: {seen[stem]} and {image_path.name} have the same id {stem!r} (the file name without "
                "its suffix); rename one"
            )
        seen[stem] = image_path.name
        mask_path = masks_dir / f"{stem}.png"
        if not mask_path.is_file():
            raise InputError(f"folder set: image {image_path.name} has no mask {mask_path}")
        record = captions.get(stem, {})
        caption = record.get("caption", "")
        metadata = {key: value for key, value in record.items() if key not in ("id", "caption", "prompt")}
        entries.append(_Entry(stem, image_path, caption, record.get("prompt", caption), mask_path=mask_path,
                              metadata=metadata))  # fmt: skip
    if not entries:
        raise InputError(f"folder set {path}: no images in {images_dir}")
    return entries


def load_dataset(
    path: str | os.PathLike, kind: str = "brushbench", mask_kind: str = "inside"
) -> BenchDataset:
    """Open a benchmark set (see the module docstring for the layouts).

    Args:
        path: the set's folder (or its ``mapping_file.json``).
        kind: ``"brushbench"``, ``"editbench"`` or ``"folder"``.
        mask_kind: ``"inside"`` or ``"outside"``.

    Raises:
        InputError: missing files, malformed entries, unknown kind.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"dataset not found: {path}")
    if kind in ("brushbench", "editbench"):
        entries, root = _load_mapping(path, kind)
    elif kind == "folder":
        entries, root = _load_folder(path), path
    else:
        raise InputError(f"unknown dataset kind {kind!r}; choose one of: {', '.join(DATASET_KINDS)}")
    return BenchDataset(kind, mask_kind, entries, root)


def shard_indices(total: int, process_index: int, num_processes: int) -> list[int]:
    """The items process ``process_index`` of ``num_processes`` handles: ``i`` with ``i % num_processes ==
    process_index``. The slices are disjoint and together cover ``range(total)``."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"bad shard {process_index} of {num_processes}")
    return list(range(process_index, total, num_processes))
