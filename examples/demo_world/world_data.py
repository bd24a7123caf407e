"""The training data of the demo world: scenes in memory, the offline tokenizer, captions that name the hole.

Everything here is a pure function of its arguments (scenes are pure functions of ``(seed, index)``, see
:mod:`brushnet.data.shapes`); nothing touches the global random state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

__all__ = [
    "SIZE",
    "TEXT_MAX_LENGTH",
    "HolePromptStream",
    "build_tokenizer",
    "join_phrases",
    "load_scene_images",
    "subset_caption",
    "to_unit",
    "write_shards",
]

SIZE = 128
"""Side of every scene, in pixels (the size the demo models work at)."""
TEXT_MAX_LENGTH = 32
"""Tokens per caption (the longest world caption is 21 with its start and end tokens)."""


# -- tokenizer ------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable character table (the byte-level alphabet of its BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_tokenizer(out_dir: str | os.PathLike, words: list[str] | None = None):
    """Write a ``CLIPTokenizer`` whose BPE merges make every world word one token; return it loaded.

    The vocabulary is CLIP's 512 byte-level symbols (each byte alone and word-final), then one entry per
    merge (each word is merged left to right), then ``<|startoftext|>`` / ``<|endoftext|>``. Any text still
    tokenizes (unknown words fall back to bytes); ``model_max_length`` is :data:`TEXT_MAX_LENGTH`.
    """
    from transformers import CLIPTokenizer

    from brushnet.data.shapes import caption_vocabulary

    words = sorted(set(words if words is not None else caption_vocabulary()))
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = CLIPTokenizer(
            str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=TEXT_MAX_LENGTH
        )
        # A merge of one word can pre-empt another word's chain ("pl" of "plain" inside "purple"): chain the
        # pieces left over with new, lowest-priority merges (they never fire inside a word that merges fully).
        stuck = [pieces for pieces in (tokenizer.tokenize(word) for word in words) if len(pieces) > 1]
        if not stuck:
            break
        for pieces in stuck:
            while len(pieces) > 1:
                if (pieces[0], pieces[1]) not in merges:
                    merges.append((pieces[0], pieces[1]))
                vocab.setdefault(pieces[0] + pieces[1], len(vocab))
                pieces = [pieces[0] + pieces[1]] + pieces[2:]
    else:
        raise RuntimeError(f"could not make every word one token: {stuck}")
    tokenizer.save_pretrained(out)
    return CLIPTokenizer.from_pretrained(out)


# -- captions -------------------------------------------------------------------------------------------


def join_phrases(phrases: list[str]) -> str:
    """``["a red circle", "a blue star"]`` → ``"a red circle and a blue star"`` (the scene captions' style)."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def subset_caption(scene, rng: np.random.Generator) -> str:
    """A caption naming a random non-empty subset of the scene's objects (no background), e.g. "a red circle"."""
    objects = list(scene.objects)
    count = int(rng.integers(1, len(objects) + 1))
    chosen = sorted(rng.choice(len(objects), size=count, replace=False).tolist())
    return join_phrases([objects[i].phrase for i in chosen])


class HolePromptStream(IterableDataset):
    """Wrap a BrushData stream of shapes-world shards: holes around objects, captions that name the hole.

    The scene of sample ``key`` is regenerated from the shard seed (shapes-world scenes are pure functions of
    ``(seed, index)``). With probability ``object_holes`` the sample's hole is replaced by one around a random
    object — its silhouette dilated by 0–6 px (the mini-BrushBench's holes are dilated by 3), or, a third of
    the time, the disk that holds it (a hole whose outline does not give the shape away, so the shape must
    come from the prompt) — and, a quarter of those times, inverted (outpainting around the object). Then a
    sample whose hole covers at least half of some objects is captioned, with probability ``probability``,
    with just those objects' phrase ("a red circle"). Images are already at the training resolution, so masks
    align without cropping. ``set_epoch`` and ``skipped`` are forwarded (the training loop resumes it by
    skipping batches).

    With ``preload=N`` the scenes and visible masks of indices ``0 … N-1`` are computed once, when the stream
    is made (in ``processes`` processes), and kept as packed bits in one array: DataLoader workers, which are
    forked again every epoch, inherit the table instead of regenerating every scene they read (about half
    of a sample's cost). The samples are the same either way.

    Args:
        stream: a :class:`brushnet.data.brushdata.BrushDataStream` (or anything yielding its sample dicts).
        world_seed: the seed the shards were written with.
        size: scene side in pixels.
        probability: how often a sample whose hole covers some objects is captioned with just them.
        seed: seed of these choices (per epoch and sample).
        object_holes: how often the stream's hole is replaced by a hole around an object.
        preload: number of scenes (from index 0) to compute up front; 0: none (each sample regenerates its own).
        processes: processes that compute the preloaded scenes.
    """

    def __init__(
        self,
        stream,
        world_seed: int,
        size: int = SIZE,
        probability: float = 0.5,
        seed: int = 0,
        object_holes: float = 0.0,
        preload: int = 0,
        processes: int = 1,
    ):
        self.stream = stream
        self.world_seed = world_seed
        self.size = size
        self.probability = probability
        self.seed = seed
        self.object_holes = object_holes
        self.skipped = getattr(stream, "skipped", None)
        self._epoch = 0
        self._table = _scene_table(world_seed, size, preload, processes) if preload > 0 else None

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self.stream.set_epoch(epoch)

    def _scene(self, index: int):
        """``(scene, visible masks)`` of training scene ``index``, from the preloaded table when it holds it."""
        from brushnet.data.shapes import sample_scene, scene_rng, visible_masks

        if self._table is not None and index < len(self._table[0]):
            scenes, packed = self._table
            scene = scenes[index]
            pixels = self.size * self.size
            return scene, [
                np.unpackbits(packed[index, k], count=pixels).view(bool).reshape(self.size, self.size)
                for k in range(len(scene.objects))
            ]
        scene = sample_scene(scene_rng("train", self.world_seed, index), size=self.size)
        return scene, visible_masks(scene)

    def _object_hole(self, scene, masks: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        from brushnet.data.shapes import dilate_mask

        target = int(rng.integers(len(scene.objects)))
        margin = int(rng.integers(0, 7))
        if rng.random() < 1 / 3:
            obj = scene.objects[target]
            ys, xs = np.mgrid[0 : self.size, 0 : self.size] + 0.5
            hole = np.hypot(xs - obj.center[0], ys - obj.center[1]) <= obj.radius + margin + 1
        else:
            hole = dilate_mask(masks[target], margin)
        return ~hole if rng.random() < 0.25 else hole

    def __iter__(self):
        for sample in self.stream:
            index = int(sample["key"])
            scene, masks = self._scene(index)
            hole = sample["mask"][0].numpy() > 0.5
            hole_rng = np.random.default_rng([self.seed, self._epoch, index, 1])
            if self.object_holes and hole_rng.random() < self.object_holes:
                hole = self._object_hole(scene, masks, hole_rng)
                sample = {**sample, "mask": torch.from_numpy(hole.astype(np.float32))[None]}
            covered = [
                obj.phrase
                for obj, mask in zip(scene.objects, masks)
                if mask.any() and (hole & mask).sum() >= 0.5 * mask.sum()
            ]
            rng = np.random.default_rng([self.seed, self._epoch, index])
            if covered and rng.random() < self.probability:
                sample = {**sample, "caption": join_phrases(covered)}
            yield sample


_TABLE_CHUNK = 500  # scenes per task of the preloading processes


def _map_chunks(function, leading: tuple, count: int, processes: int) -> tuple[list[range], list]:
    """``function(*leading, chunk)`` for the chunks of :data:`_TABLE_CHUNK` indices of ``0 … count-1``, in
    ``processes`` forked processes: ``(chunks, results)`` in index order."""
    chunks = [range(start, min(start + _TABLE_CHUNK, count)) for start in range(0, count, _TABLE_CHUNK)]
    if processes > 1 and len(chunks) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(processes, len(chunks))) as pool:
            return chunks, pool.starmap(function, [(*leading, chunk) for chunk in chunks])
    return chunks, [function(*leading, chunk) for chunk in chunks]


def _scene_rows(world_seed: int, size: int, indices: range) -> tuple[list, np.ndarray]:
    """Scenes ``indices`` of the training split and their visible masks as packed bits ``(n, objects, bytes)``."""
    from brushnet.data.shapes import sample_scene, scene_rng, visible_masks

    scenes = [sample_scene(scene_rng("train", world_seed, index), size=size) for index in indices]
    packed = np.zeros(
        (len(scenes), max((len(s.objects) for s in scenes), default=0), -(-size * size // 8)), np.uint8
    )
    for row, scene in enumerate(scenes):
        for k, mask in enumerate(visible_masks(scene)):
            packed[row, k] = np.packbits(mask)
    return scenes, packed


def _scene_table(world_seed: int, size: int, count: int, processes: int) -> tuple[list, np.ndarray]:
    """:func:`_scene_rows` of indices ``0 … count-1``, computed in ``processes`` processes."""
    chunks, parts = _map_chunks(_scene_rows, (world_seed, size), count, processes)
    scenes = [scene for part, _ in parts for scene in part]
    width = max(packed.shape[1] for _, packed in parts)
    table = np.zeros((count, width, parts[0][1].shape[2]), np.uint8)
    for (_, packed), chunk in zip(parts, chunks):
        table[chunk.start : chunk.stop, : packed.shape[1]] = packed
    return scenes, table


# -- scenes in memory -----------------------------------------------------------------------------------


def _scene_images(seed: int, indices: range) -> tuple[np.ndarray, list]:
    """Training scenes ``indices`` of world ``seed``, rendered: ``(uint8 (n, H, W, 3), scenes)``."""
    from brushnet.data.shapes import render_scene, sample_scene, scene_rng

    scenes = [sample_scene(scene_rng("train", seed, index), size=SIZE) for index in indices]
    return np.stack([np.asarray(render_scene(scene)[0]) for scene in scenes]), scenes


def load_scene_images(num_scenes: int, seed: int, processes: int = 1) -> tuple[torch.Tensor, list]:
    """The first ``num_scenes`` training scenes of world ``seed``: ``(uint8 (N, 3, H, W) images, scenes)``.

    Rendered in ``processes`` forked processes, :data:`_TABLE_CHUNK` scenes a task (each scene is a function of
    its index alone, so any count gives the same bytes). The base and autoencoder stages read all 20000 scenes of
    a run this way; one process renders them in about 110 s on a 2-core VM."""
    _, parts = _map_chunks(_scene_images, (seed,), num_scenes, processes)
    images = torch.from_numpy(np.concatenate([part for part, _ in parts])).permute(0, 3, 1, 2).contiguous()
    return images, [scene for _, part in parts for scene in part]


def write_shards(folder: str | os.PathLike, scenes: int, seed: int) -> None:
    """The first ``scenes`` training scenes of world ``seed`` as BrushData webdataset shards in ``folder``, 1000
    scenes a shard (:func:`brushnet.data.shapes_writers.write_training_shards`), written by as many processes as
    this process has torch threads (the bytes are the same for any number)."""
    from brushnet.data.shapes_writers import write_training_shards

    write_training_shards(
        folder, scenes, scenes_per_shard=1000, size=SIZE, seed=seed, processes=torch.get_num_threads()
    )


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images → float in [−1, 1] (what the VAE reads)."""
    return images_uint8.float() / 127.5 - 1.0
