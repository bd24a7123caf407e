"""A map-style dataset over a plain folder of the user's own images, masks and captions.

Layout::

    images/                 photo1.jpg, photo2.png, ...   (jpg, jpeg, png, webp, bmp; not recursive)
    images/captions.jsonl   {"file": "photo1.jpg", "caption": "..."} per line (optional)
    masks/                  photo1.png, photo2.png, ...   (optional; matched to images by file stem)

Masks are single-channel images, **white = hole** (the region to generate), black = keep, binarised at 0.5
(see :mod:`brushnet.image`), must have their image's size, and are used as they are (an unreadable file or
a size mismatch raises :class:`brushnet.image.InputError`). Without a mask folder, every item gets a fresh
free-form brush mask (:func:`brushnet.data.masks.make_training_mask` in ``"brush"`` mode). Images without a
caption get the empty caption.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..image import load_image, load_mask
from .masks import MaskConfig, make_training_mask
from .transforms import prepare_training_pair

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "FolderDataset", "read_captions"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """Read a ``captions.jsonl`` file: one ``{"file": <image file name>, "caption": <text>}`` object per line.

    Blank lines are ignored. Returns file name → caption. Raises ``ValueError`` naming the line of any
    malformed entry or repeated file.
    """
    captions: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("file"), str)
                and isinstance(entry.get("caption"), str)
            ):
                raise ValueError(f'{path}:{number}: expected {{"file": str, "caption": str}}')
            name = Path(entry["file"]).name
            if name in captions:
                raise ValueError(f"{path}:{number}: second caption for {name}")
            captions[name] = entry["caption"]
    return captions


class FolderDataset(torch.utils.data.Dataset):
    """Images (+ masks) (+ captions) from plain folders, as training samples.

    Items are ``{"pixel_values": float32 (3, R, R) in [-1, 1], "mask": float32 (1, R, R), 1 = hole,
    "caption": str, "key": <image file stem>}``. Item ``i`` of epoch ``e`` draws its brush mask and crop from
    ``numpy.random.default_rng([seed, e, i])``, so it is the same whichever worker loads it.

    Args:
        image_dir: folder of images.
        resolution: side of the square output.
        mask_dir: folder of masks named like the images (any image extension); every image needs one.
            ``None`` → generated brush masks.
        captions_file: JSON-lines captions; default ``image_dir/captions.jsonl`` when it exists.
        mask_config: recipe of generated masks (must be ``"brush"`` mode); default brush with the reference
            opening and swap probabilities. Unused when ``mask_dir`` is given.
        seed: seed of masks and crops.
        random_crop: random crops (training); ``False`` → centre crops.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        resolution: int,
        *,
        mask_dir: str | os.PathLike | None = None,
        captions_file: str | os.PathLike | None = None,
        mask_config: MaskConfig | None = None,
        seed: int = 0,
        random_crop: bool = True,
    ) -> None:
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise ValueError(f"image folder not found: {image_dir}")
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.image_paths = _image_files(image_dir)
        if not self.image_paths:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
        self.mask_paths: list[Path] | None = None
        if mask_dir is not None:
            mask_dir = Path(mask_dir)
            if not mask_dir.is_dir():
                raise ValueError(f"mask folder not found: {mask_dir}")
            by_stem = {path.stem: path for path in _image_files(mask_dir)}
            missing = [path.name for path in self.image_paths if path.stem not in by_stem]
            if missing:
                raise ValueError(f"{len(missing)} image(s) without a mask in {mask_dir}, e.g. {missing[0]}")
            self.mask_paths = [by_stem[path.stem] for path in self.image_paths]
        self.mask_config = mask_config or MaskConfig(mode="brush")
        if self.mask_paths is None and self.mask_config.mode != "brush":
            raise ValueError(
                f'without a mask folder the mask mode must be "brush", got "{self.mask_config.mode}"'
            )
        if captions_file is None and (image_dir / "captions.jsonl").exists():
            captions_file = image_dir / "captions.jsonl"
        captions = read_captions(captions_file) if captions_file is not None else {}
        self.captions = [captions.get(path.name, "") for path in self.image_paths]
        uncaptioned = self.captions.count("")
        if uncaptioned:
            logger.info("%d of %d images have no caption", uncaptioned, len(self.image_paths))
        self.resolution = resolution
        self.seed = seed
        self.random_crop = random_crop
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose masks and crops items are drawn with."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        image_path = self.image_paths[index]
        image = load_image(image_path)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.mask_paths is not None:
            mask = load_mask(self.mask_paths[index], size=image.size, allow_empty=True)
        else:
            mask = make_training_mask([], image.height, image.width, rng, self.mask_config)
        sample = prepare_training_pair(image, mask, self.resolution, rng if self.random_crop else None)
        return {**sample, "caption": self.captions[index], "key": image_path.stem}
