"""BrushData stream: reading, skipping and counting malformed samples, sharding, determinism, resuming."""

import json
import tarfile

import numpy as np
import pytest
import torch

from brushnet.data.brushdata import (
    SKIP_REASONS,
    BrushDataStream,
    expand_shards,
    per_worker_skip,
    resolve_rank_and_world_size,
    shards_for_worker,
)
from brushnet.data.masks import MaskConfig
from brushnet.data.rle import decode_brushdata_rle
from brushnet.data.synthetic import MALFORMED_KINDS, write_synthetic_shards

SIZE = (24, 32)  # height, width: resize + crop both happen at resolution 16
FIXED = MaskConfig(mode="segmentation", p_open=0.0, p_swap=0.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return write_synthetic_shards(folder, num_shards=8, samples_per_shard=5, size=SIZE, seed=3, malformed=6)


def keys(samples):
    return [sample["key"] for sample in samples]


def loader_keys(stream, num_workers, batch_size=2):
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=num_workers)
    return [key for batch in loader for key in batch["key"]]


def test_reads_valid_samples_and_counts_each_malformed_one(shards):
    stream = BrushDataStream(shards.paths[0].parent, 16, FIXED, require_segmentation=True)
    samples = list(stream)
    assert sorted(keys(samples)) == sorted(shards.valid_keys)
    assert stream.skipped.as_dict() == {reason: int(reason in MALFORMED_KINDS) for reason in SKIP_REASONS}
    assert stream.skipped.total == 6
    sample = samples[0]
    assert set(sample) == {"pixel_values", "mask", "caption", "key", "original_size", "crop_top_left"}
    assert sample["pixel_values"].shape == (3, 16, 16) and sample["pixel_values"].dtype == torch.float32
    assert sample["mask"].shape == (1, 16, 16) and set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
    assert isinstance(sample["caption"], str) and "background" in sample["caption"]


def test_empty_segmentation_is_kept_unless_required(shards):
    (empty_key,) = [key for key, kind in shards.malformed.items() if kind == "empty_segmentation"]
    stream = BrushDataStream(shards.paths, 16, FIXED, require_segmentation=False)
    samples = {sample["key"]: sample for sample in stream}
    assert set(samples) == {*shards.valid_keys, empty_key}
    assert (samples[empty_key]["mask"] == 0).all()  # no segmentation: nothing hidden
    assert stream.skipped.as_dict()["empty_segmentation"] == 0


def test_brush_mode_does_not_read_segmentation(shards):
    segmentation_kinds = {"empty_segmentation", "invalid_segmentation"}
    extra = {key for key, kind in shards.malformed.items() if kind in segmentation_kinds}
    stream = BrushDataStream(shards.paths, 16, MaskConfig(mode="brush"))
    assert sorted(keys(stream)) == sorted({*shards.valid_keys, *extra})
    assert stream.skipped.total == 4


def test_segmentation_masks_land_on_their_objects(shards):
    """At the original size (no resize, no crop, no opening or swap) a mask is exactly one object's mask."""
    height, width = SIZE
    stream = BrushDataStream(shards.paths[:2], height, FIXED, random_crop=False)
    rles = {}
    for path in shards.paths[:2]:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".segmentation"):
                    rles[member.name.split(".")[0]] = json.load(tar.extractfile(member))["mask"]
    count = 0
    for sample in stream:
        # The crop is centred on the long side: columns (width - height) // 2 ... + height.
        left = (width - height) // 2
        objects = [
            decode_brushdata_rle(rle, height, width)[:, left : left + height] for rle in rles[sample["key"]]
        ]
        mask = sample["mask"][0].numpy() == 1
        assert any(np.array_equal(mask, candidate) for candidate in objects)
        colours = sample["pixel_values"].permute(1, 2, 0).numpy()[mask]
        if len(colours):
            assert np.ptp(colours, axis=0).max() < 1e-6  # a visible object is one flat colour
        count += 1
    assert count >= 8


def test_accepts_extension_variants_and_jpeg(tmp_path):
    variants = {"image": "jpg", "caption": "txt", "segmentation": "json"}
    written = write_synthetic_shards(
        tmp_path, 1, 4, size=20, seed=0, image_format="jpeg", extensions=variants
    )
    with tarfile.open(written.paths[0]) as tar:
        assert {name.split(".", 1)[1] for name in tar.getnames()} >= {"jpg", "txt", "json", "height", "width"}
    stream = BrushDataStream(written.paths, 16, FIXED)
    assert sorted(keys(stream)) == sorted(written.valid_keys)
    assert stream.skipped.total == 0


def test_unreadable_shards_are_counted_and_the_rest_is_read(shards, tmp_path):
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"definitely not a tar file" * 50)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(shards.paths[1].read_bytes()[:3000])
    stream = BrushDataStream(
        [str(broken), str(tmp_path / "missing.tar"), str(truncated), str(shards.paths[0])],
        16,
        FIXED,
        shuffle_shards=False,
    )
    got = set(keys(stream))
    assert {key for key in shards.valid_keys if key.startswith("s00000_")} <= got
    assert stream.skipped.as_dict()["unreadable_shard"] >= 2


def test_shards_for_worker_partitions_shards():
    shards = [f"shard-{i}.tar" for i in range(10)]
    for epoch in (0, 1):
        parts = [
            shards_for_worker(shards, rank, 2, worker, 2, seed=1, epoch=epoch)
            for rank in range(2)
            for worker in range(2)
        ]
        flat = [shard for part in parts for shard in part]
        assert sorted(flat) == sorted(shards) and len(set(flat)) == 10
        assert [len(part) for part in parts] == [3, 3, 2, 2]
    first = shards_for_worker(shards, 0, 2, 0, 2, seed=1, epoch=0)
    assert first == shards_for_worker(shards, 0, 2, 0, 2, seed=1, epoch=0)
    assert any(shards_for_worker(shards, 0, 2, 0, 2, seed=1, epoch=e) != first for e in range(1, 5))
    assert shards_for_worker(shards, 1, 2, 1, 2, shuffle=False) == ["shard-3.tar", "shard-7.tar"]
    with pytest.raises(ValueError):
        shards_for_worker(shards, 0, 1, 2, 2)


def test_two_ranks_two_workers_read_disjoint_samples_covering_everything(shards):
    streams = [BrushDataStream(shards.paths, 16, FIXED, rank=rank, world_size=2, seed=5) for rank in range(2)]
    per_rank = [loader_keys(stream, num_workers=2) for stream in streams]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert all(len(keys_) == len(set(keys_)) for keys_ in per_rank)
    assert sorted(per_rank[0] + per_rank[1]) == sorted(shards.valid_keys)
    # Skips counted inside worker processes are visible here.
    total = {reason: sum(stream.skipped.as_dict()[reason] for stream in streams) for reason in SKIP_REASONS}
    assert total == {reason: int(reason in MALFORMED_KINDS) for reason in SKIP_REASONS}


def test_same_epoch_replays_exactly_and_epochs_differ(shards):
    config = MaskConfig(mode="mix")
    first = list(BrushDataStream(shards.paths, 16, config, seed=2, shuffle_buffer=4))
    again = list(BrushDataStream(shards.paths, 16, config, seed=2, shuffle_buffer=4))
    assert keys(first) == keys(again)
    for a, b in zip(first, again):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["mask"], b["mask"])
    stream = BrushDataStream(shards.paths, 16, config, seed=2, shuffle_buffer=4)
    stream.set_epoch(1)
    other = {sample["key"]: sample for sample in stream}
    assert keys(first) != list(other)
    assert sorted(other) == sorted(keys(first))
    assert sum(not torch.equal(s["mask"], other[s["key"]]["mask"]) for s in first) > len(first) // 4


def test_shuffle_buffer_reorders_within_worker(shards):
    plain = keys(BrushDataStream(shards.paths, 16, FIXED, shuffle_shards=False))
    shuffled = keys(BrushDataStream(shards.paths, 16, FIXED, shuffle_shards=False, shuffle_buffer=8))
    assert sorted(plain) == sorted(shuffled) and plain != shuffled


def test_skip_resumes_single_stream(shards):
    full = list(BrushDataStream(shards.paths, 16, MaskConfig(mode="mix"), seed=4))
    resumed = BrushDataStream(shards.paths, 16, MaskConfig(mode="mix"), seed=4, batches_consumed=7)
    tail = list(resumed)
    assert keys(tail) == keys(full)[7:]
    assert all(torch.equal(a["mask"], b["mask"]) for a, b in zip(tail, full[7:]))


def test_resume_with_dataloader_workers_continues_the_batch_sequence(shards):
    def batches(stream):
        loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2)
        return [list(batch["key"]) for batch in loader]

    stream = BrushDataStream(shards.paths, 16, FIXED, seed=6)
    full = batches(stream)
    assert len(full) > 8
    for consumed in (0, 3, 4, len(full) - 1):
        stream.set_epoch(0, batches_consumed=consumed, batch_size=2)
        assert batches(stream) == full[consumed:]


def test_per_worker_skip():
    assert per_worker_skip(0, 4, 2) == [0, 0]
    assert per_worker_skip(5, 4, 2) == [12, 8]
    assert per_worker_skip(5, 4, 3) == [8, 8, 4]
    assert per_worker_skip(5, 4, 0) == [20]
    assert per_worker_skip(1, 1, 4) == [1, 0, 0, 0]


def test_expand_shards(shards):
    folder = shards.paths[0].parent
    names = [str(path) for path in shards.paths]
    assert expand_shards(folder) == names
    assert expand_shards(str(folder / "shard-{00000..00002}.tar")) == names[:3]
    assert expand_shards(str(folder / "shard-0000[0-1].tar")) == names[:2]
    assert expand_shards([names[3], folder / "shard-{00000..00001}.tar"]) == [names[3], *names[:2]]
    with pytest.raises(ValueError):
        expand_shards(str(folder / "nothing-*.tar"))


def test_resolve_rank_and_world_size(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank_and_world_size() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank_and_world_size() == (3, 4)
    assert resolve_rank_and_world_size(1, 2) == (1, 2)
    with pytest.raises(ValueError):
        resolve_rank_and_world_size(2, 2)
