"""Write shapes-world scenes as BrushData training shards and as a BrushBench-style evaluation set.

Training shards (:func:`write_training_shards`) are plain tar files readable by ``webdataset``; sample
``<key>`` (8-digit scene index) has the members

- ``<key>.png``: the image, PNG bytes;
- ``<key>.txt``: the caption, UTF-8;
- ``<key>.json``: the segmentation, ``{"mask": [rle_object_1, ...]}`` with BrushData run-length masks
  (column-major, 1-based; :func:`~brushnet.data.rle.encode_brushdata_rle`), one per object;
- ``<key>.height``, ``<key>.width``: decimal text;
- ``<key>.objects``: JSON list of the objects (``shape``, ``colour``, ``rgb``, ``center``, ``radius``,
  ``rotation``), in the order of the masks; ``<key>.background``: JSON ``{kind, colour, rgb}``.

The evaluation set (:func:`write_eval_set`) is ``images/<id>.png`` plus ``mapping_file.json`` in the
BrushBench layout (row-major masks, :func:`~brushnet.data.rle.encode_brushbench_rle`), with extra keys
describing what the hole should be filled with (see :func:`write_eval_set`).

Everything is a pure function of the arguments: the same call writes the same bytes. Scenes come from
:func:`~brushnet.data.shapes.scene_rng` (``"train"`` or ``"eval"`` split), so the two sets never share
a scene.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write, atomic_write_bytes, atomic_write_text, png_bytes
from .rle import encode_brushbench_rle, encode_brushdata_rle
from .shapes import (
    PALETTE,
    SHAPES,
    Scene,
    SceneObject,
    dilate_mask,
    object_phrase,
    render_scene,
    sample_scene,
    scene_rng,
)

__all__ = ["write_eval_set", "write_training_shards"]

logger = logging.getLogger(__name__)

_RING_WIDTH = 2  # matches the default ``ring_width`` of the shapes metrics


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed metadata: identical arguments give identical shard bytes
    tar.addfile(info, io.BytesIO(data))


def _check_counts(num_scenes: int, size: int, seed: int) -> None:
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be at least 1, got {num_scenes}")
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")


def _write_shard(out: Path, shard: int, indices: range, size: int, seed: int) -> Path:
    """Write shard ``shard`` (scenes ``indices``) into ``out``; return its path."""

    def write(file: Any) -> None:
        with tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for index in indices:
                scene = sample_scene(scene_rng("train", seed, index), size=size)
                image, masks = render_scene(scene)
                key = f"{index:08d}"
                segmentation = {"mask": [encode_brushdata_rle(mask) for mask in masks]}
                _add_member(tar, f"{key}.png", png_bytes(image))
                _add_member(tar, f"{key}.txt", scene.caption.encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(segmentation).encode("utf-8"))
                _add_member(tar, f"{key}.height", str(size).encode("ascii"))
                _add_member(tar, f"{key}.width", str(size).encode("ascii"))
                objects = [obj.to_dict() for obj in scene.objects]
                _add_member(tar, f"{key}.objects", json.dumps(objects).encode("utf-8"))
                _add_member(tar, f"{key}.background", json.dumps(scene.background.to_dict()).encode("utf-8"))

    path = out / f"shapes-{shard:06d}.tar"
    atomic_write(path, write)
    logger.info("wrote %s (%d scenes)", path, len(indices))
    return path


def write_training_shards(
    out_dir: str | os.PathLike,
    num_scenes: int,
    scenes_per_shard: int = 1000,
    size: int = 128,
    seed: int = 0,
    processes: int = 1,
) -> list[Path]:
    """Write ``num_scenes`` training scenes as BrushData webdataset shards ``shapes-000000.tar``, ….

    Scene ``i`` is ``sample_scene(scene_rng("train", seed, i), size)``. Each shard is written to a
    temporary file and moved into place, so a shard that exists is complete. The bytes do not depend on
    ``processes``.

    Args:
        out_dir: output folder (created if missing).
        num_scenes: total number of samples.
        scenes_per_shard: samples per tar file (the last one may hold fewer).
        size: image side in pixels.
        seed: dataset seed.
        processes: shards written at once, each by its own process (1: in this process).

    Returns:
        The shard paths, in order.
    """
    _check_counts(num_scenes, size, seed)
    if scenes_per_shard < 1:
        raise ValueError(f"scenes_per_shard must be at least 1, got {scenes_per_shard}")
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (
            out,
            shard,
            range(shard * scenes_per_shard, min(num_scenes, (shard + 1) * scenes_per_shard)),
            size,
            seed,
        )
        for shard in range(math.ceil(num_scenes / scenes_per_shard))
    ]
    if processes == 1 or len(jobs) == 1:
        return [_write_shard(*job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=context) as pool:
        return list(pool.map(_write_shard, *zip(*jobs)))


def _different_object(scene: Scene, masked: SceneObject, rng: np.random.Generator) -> tuple[str, str]:
    """A (shape, colour) other than the masked object's, not the background colour, not already in the scene."""
    taken = {(obj.shape, obj.colour) for obj in scene.objects}
    colours = [c for c in PALETTE if c != scene.background.colour]
    change = ("colour", "shape", "both")[rng.integers(3)]
    candidates = [
        (shape, colour)
        for shape in SHAPES
        for colour in colours
        if (shape, colour) not in taken
        and (shape == masked.shape) == (change == "colour")
        and (colour == masked.colour) == (change == "shape")
    ]
    return candidates[rng.integers(len(candidates))]


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def write_eval_set(
    out_dir: str | os.PathLike,
    num_scenes: int,
    size: int = 128,
    seed: int = 0,
    different_object_fraction: float = 0.0,
    mask_dilation: int | None = None,
    removal: bool = False,
) -> Path:
    """Write a BrushBench-format evaluation set: ``images/<id>.png`` and ``mapping_file.json``.

    Scene ``i`` (id ``f"{i:05d}"``) is drawn from ``scene_rng("eval", seed, i)``; the same generator then
    picks the *masked object* and, with probability ``different_object_fraction``, a different object
    (other colour, other shape, or both; never the background colour nor an object already in the scene)
    for the prompt. Objects are spaced so that the hole and the ring of kept pixels the metrics read
    around it never touch another object.

    Each ``mapping_file.json`` entry has the BrushBench keys

    - ``"image"``: ``"images/<id>.png"`` (relative to ``out_dir``);
    - ``"caption"``: the scene caption with the masked object replaced by the prompted one, i.e. the
      image the inpainting should produce;
    - ``"inpainting_mask"``: row-major 1-based RLE of the hole (the masked object's mask dilated by
      ``mask_dilation`` pixels), 1 = generate;
    - ``"outpainting_mask"``: RLE of the complement of the hole;

    and the extra keys ``"height"``, ``"width"`` (decode the masks at this size, not 512), ``"prompt"``
    (e.g. ``"a red circle"``), ``"target"`` (``{"shape", "colour", "bbox"}`` of what the prompt asks for;
    ``bbox`` = ``[left, top, right, bottom)`` of the hole in pixels), ``"masked_object"``
    (``{"shape", "colour"}`` of what the image shows there), ``"variant"`` (``"same"`` or
    ``"different"``), ``"source_caption"`` (the caption of the image as written) and ``"background"``.

    With ``removal`` the same scenes and holes ask for the masked object to go: ``"prompt"`` is the background's
    phrase (e.g. ``"a plain red background"``: the best a method without a removal mode can be told),
    ``"caption"`` the scene caption without the object, ``"target"`` is ``None``, ``"variant"`` ``"removal"``
    (score with ``brushnet bench run --score removal``).

    Args:
        out_dir: output folder (created if missing).
        num_scenes: number of evaluation images.
        size: image side in pixels.
        seed: dataset seed.
        different_object_fraction: probability in [0, 1] that an entry prompts for a different object.
        mask_dilation: hole dilation in pixels; default ``max(2, round(size / 40))`` (3 at 128).
        removal: write object-removal entries (above); needs ``different_object_fraction`` 0.

    Returns:
        The path of ``mapping_file.json``.
    """
    _check_counts(num_scenes, size, seed)
    if not 0.0 <= different_object_fraction <= 1.0:
        raise ValueError(f"different_object_fraction must be in [0, 1], got {different_object_fraction}")
    if removal and different_object_fraction:
        raise ValueError("a removal set prompts for no object: different_object_fraction must be 0")
    dilation = max(2, round(size / 40)) if mask_dilation is None else mask_dilation
    if dilation < 0:
        raise ValueError(f"mask_dilation must be non-negative, got {mask_dilation}")
    min_gap = max(max(3, round(0.06 * size)), dilation + _RING_WIDTH + 1)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    mapping: dict[str, dict[str, Any]] = {}
    for index in range(num_scenes):
        rng = scene_rng("eval", seed, index)
        scene = sample_scene(rng, size=size, min_gap=min_gap)
        image, masks = render_scene(scene)
        target_index = int(rng.integers(len(scene.objects)))
        masked = scene.objects[target_index]
        different = bool(rng.random() < different_object_fraction)
        shape, colour = _different_object(scene, masked, rng) if different else (masked.shape, masked.colour)
        hole = dilate_mask(masks[target_index], dilation)
        objects = list(scene.objects)
        objects[target_index] = dataclasses.replace(masked, shape=shape, colour=colour)
        caption = Scene(scene.size, scene.background, tuple(objects)).caption

        entry_id = f"{index:05d}"
        relative = f"images/{entry_id}.png"
        atomic_write_bytes(out / relative, png_bytes(image))
        if removal:
            others = tuple(obj for i, obj in enumerate(scene.objects) if i != target_index)
            caption = Scene(scene.size, scene.background, others).caption
        mapping[entry_id] = {
            "image": relative,
            "caption": caption,
            "inpainting_mask": encode_brushbench_rle(hole),
            "outpainting_mask": encode_brushbench_rle(~hole),
            "height": size,
            "width": size,
            "prompt": scene.background.phrase if removal else object_phrase(shape, colour),
            "target": None if removal else {"shape": shape, "colour": colour, "bbox": _bbox(hole)},
            "masked_object": {"shape": masked.shape, "colour": masked.colour},
            "variant": "removal" if removal else ("different" if different else "same"),
            "source_caption": scene.caption,
            "background": scene.background.to_dict(),
        }
    path = out / "mapping_file.json"
    atomic_write_text(path, json.dumps(mapping, indent=1))
    logger.info("wrote %s (%d entries)", path, len(mapping))
    return path
