"""Synthetic BrushData shards: small valid webdataset tars for tests, smoke runs and demos.

Each sample is a picture of a few flat-coloured rectangles and ellipses on a flat background, a caption
naming them, and one BrushData run-length mask per visible object. The shards use the writer format of
:mod:`brushnet.data.brushdata` (``<key>.image``, ``.caption``, ``.height``, ``.width``, ``.segmentation``
plus the ignored ``.aesthetic_score``, ``.url``, ``.original_key``), so they read exactly like the real
BrushData. Optionally some samples are deliberately malformed, one of :data:`MALFORMED_KINDS` each, to test
that readers skip and count them.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..io import atomic_write
from .rle import encode_brushdata_rle

__all__ = ["MALFORMED_KINDS", "SyntheticShards", "write_synthetic_shards"]

MALFORMED_KINDS: tuple[str, ...] = (
    "missing_field",
    "undecodable_image",
    "size_mismatch",
    "invalid_segmentation",
    "empty_segmentation",
    "invalid_size",
)
"""How injected malformed samples are broken, in the order they are used; the names are the skip reasons
of :class:`brushnet.data.brushdata.SkipCounter` they should be counted under (``empty_segmentation`` only
when segmentation masks are required)."""

_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 215, 50),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
}


@dataclass
class SyntheticShards:
    """What :func:`write_synthetic_shards` wrote."""

    paths: list[Path]
    """The shard files, in order."""
    valid_keys: list[str]
    """Keys of the well-formed samples."""
    malformed: dict[str, str] = field(default_factory=dict)
    """Key → kind (one of :data:`MALFORMED_KINDS`) of each malformed sample."""


def _render_sample(
    height: int, width: int, rng: np.random.Generator
) -> tuple[Image.Image, str, list[np.ndarray]]:
    """A random picture, its caption and the boolean visible-region mask of each object."""
    names = list(_COLOURS)
    background = names[int(rng.integers(len(names)))]
    image = Image.new("RGB", (width, height), _COLOURS[background])
    labels = Image.new("L", (width, height), 0)
    draw, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    phrases = []
    num_objects = int(rng.integers(1, 5))
    for index in range(num_objects):
        colour = names[int(rng.integers(len(names)))]
        while colour == background:
            colour = names[int(rng.integers(len(names)))]
        shape = "rectangle" if rng.random() < 0.5 else "ellipse"
        box_width = int(rng.integers(max(2, width // 6), max(3, width // 2)))
        box_height = int(rng.integers(max(2, height // 6), max(3, height // 2)))
        left = int(rng.integers(0, width - box_width + 1))
        top = int(rng.integers(0, height - box_height + 1))
        box = (left, top, left + box_width - 1, top + box_height - 1)
        getattr(draw, shape)(box, fill=_COLOURS[colour])
        getattr(draw_labels, shape)(box, fill=index + 1)
        phrases.append(f"{_article(colour)} {colour} {shape}")
    label_array = np.asarray(labels)
    masks = [label_array == index + 1 for index in range(num_objects)]
    # an object drawn over completely is neither in the masks nor in the caption
    shown = [index for index, mask in enumerate(masks) if mask.any()]
    caption = f"{', '.join(phrases[i] for i in shown)} on {_article(background)} {background} background"
    return image, caption, [masks[i] for i in shown]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _encode_image(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **({"quality": 95} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]], extensions: dict[str, str]) -> None:
    """Write ``samples`` as a tar at ``path`` atomically (:func:`brushnet.io.atomic_write`)."""

    def write(handle) -> None:
        with tarfile.open(fileobj=handle, mode="w") as tar:
            for key, fields in samples:
                for name, payload in fields.items():
                    info = tarfile.TarInfo(f"{key}.{extensions.get(name, name)}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))

    atomic_write(path, write)


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    num_shards: int,
    samples_per_shard: int,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
    malformed: int = 0,
    image_format: str = "png",
    extensions: dict[str, str] | None = None,
) -> SyntheticShards:
    """Write BrushData-format webdataset shards of random coloured shapes.

    Shards are named ``shard-00000.tar``, ``shard-00001.tar``, ...; sample keys are ``s<shard>_<index>``
    (unique across shards). The output is a pure function of the arguments.

    Args:
        out_dir: folder to write into (created if missing); existing shards of the same name are replaced.
        num_shards: number of tar files, ≥ 1.
        samples_per_shard: samples per tar, ≥ 1 (malformed ones included).
        size: image size, ``side`` or ``(height, width)``.
        seed: seed of everything random.
        malformed: how many samples to break (spread evenly over the whole set, cycling through
            :data:`MALFORMED_KINDS`); at most ``num_shards * samples_per_shard``.
        image_format: ``"png"`` (lossless, masks match the pixels exactly) or ``"jpeg"``.
        extensions: rename field extensions in the tar, e.g. ``{"image": "jpg", "caption": "txt",
            "segmentation": "json"}``, to produce the variants the reader also accepts.

    Returns:
        A :class:`SyntheticShards` with the shard paths, the valid keys and the malformed keys by kind.
    """
    if num_shards < 1 or samples_per_shard < 1:
        raise ValueError(
            f"need at least one shard and one sample per shard, got {num_shards}, {samples_per_shard}"
        )
    total = num_shards * samples_per_shard
    if not 0 <= malformed <= total:
        raise ValueError(f"malformed must be between 0 and {total}, got {malformed}")
    height, width = (size, size) if isinstance(size, int) else size
    if height < 4 or width < 4:
        raise ValueError(f"size must be at least 4x4, got {height}x{width}")
    pil_format = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG"}.get(image_format.lower())
    if pil_format is None:
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Indices of malformed samples, spread evenly over the set.
    broken = {n * total // malformed: MALFORMED_KINDS[n % len(MALFORMED_KINDS)] for n in range(malformed)}
    result = SyntheticShards(paths=[], valid_keys=[])
    for shard in range(num_shards):
        samples = []
        for index in range(samples_per_shard):
            key = f"s{shard:05d}_{index:06d}"
            rng = np.random.default_rng([seed, shard, index])
            image, caption, masks = _render_sample(height, width, rng)
            segmentation = {"mask": [encode_brushdata_rle(mask) for mask in masks]}
            fields = {
                "image": _encode_image(image, pil_format),
                "caption": caption.encode(),
                "height": str(height).encode(),
                "width": str(width).encode(),
                "segmentation": json.dumps(segmentation).encode(),
                "aesthetic_score": f"{5 + rng.random():.3f}".encode(),
                "url": f"https://example.invalid/{key}.png".encode(),
                "original_key": key.encode(),
            }
            kind = broken.get(shard * samples_per_shard + index)
            if kind == "missing_field":
                del fields["caption"]
            elif kind == "undecodable_image":
                fields["image"] = b"\x89PNG\r\n\x1a\n this is not an image"
            elif kind == "size_mismatch":
                fields["height"] = str(height + 1).encode()
            elif kind == "invalid_segmentation":
                fields["segmentation"] = json.dumps({"mask": [[height * width, 5]]}).encode()
            elif kind == "empty_segmentation":
                fields["segmentation"] = json.dumps({"mask": []}).encode()
            elif kind == "invalid_size":
                fields["width"] = b"wide"
            if kind is None:
                result.valid_keys.append(key)
            else:
                result.malformed[key] = kind
            samples.append((key, fields))
        path = out_dir / f"shard-{shard:05d}.tar"
        _write_tar(path, samples, extensions or {})
        result.paths.append(path)
    return result
