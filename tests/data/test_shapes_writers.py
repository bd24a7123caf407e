"""Shapes-world writers: BrushData training shards, BrushBench-style eval set, and the CLI."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brushnet.cli.data import shapes_app as app
from brushnet.data.rle import decode_brushbench_rle, decode_brushdata_rle
from brushnet.data.shapes import PALETTE, dilate_mask, object_phrase, render_scene, sample_scene, scene_rng
from brushnet.data.shapes_writers import write_eval_set, write_training_shards


def _members(path):
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def test_training_shards_layout_and_round_trip(tmp_path):
    paths = write_training_shards(tmp_path, num_scenes=7, scenes_per_shard=3, size=96, seed=4)
    assert [p.name for p in paths] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]  # no temp files left
    keys = []
    for path in paths:
        members = _members(path)
        shard_keys = sorted({name.split(".", 1)[0] for name in members})
        keys += shard_keys
        for key in shard_keys:
            extensions = {name.split(".", 1)[1] for name in members if name.startswith(key + ".")}
            assert extensions == {"png", "txt", "json", "height", "width", "objects", "background"}
            scene = sample_scene(scene_rng("train", 4, int(key)), size=96)
            image, masks = render_scene(scene)
            stored = Image.open(io.BytesIO(members[f"{key}.png"]))
            assert stored.format == "PNG" and stored.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(stored), np.asarray(image))
            assert members[f"{key}.txt"].decode() == scene.caption
            assert members[f"{key}.height"] == b"96" and members[f"{key}.width"] == b"96"
            segmentation = json.loads(members[f"{key}.json"])
            assert len(segmentation["mask"]) == len(masks)
            for rle, mask in zip(segmentation["mask"], masks, strict=True):
                np.testing.assert_array_equal(decode_brushdata_rle(rle, 96, 96), mask)
            objects = json.loads(members[f"{key}.objects"])
            assert [(o["shape"], o["colour"]) for o in objects] == [
                (o.shape, o.colour) for o in scene.objects
            ]
            background = json.loads(members[f"{key}.background"])
            assert (background["kind"], background["colour"]) == (
                scene.background.kind,
                scene.background.colour,
            )
    assert keys == [f"{i:08d}" for i in range(7)]


def test_training_shards_are_deterministic(tmp_path):
    first = write_training_shards(tmp_path / "a", num_scenes=4, scenes_per_shard=4, size=64, seed=1)
    second = write_training_shards(tmp_path / "b", num_scenes=4, scenes_per_shard=4, size=64, seed=1)
    other = write_training_shards(tmp_path / "c", num_scenes=4, scenes_per_shard=4, size=64, seed=2)
    assert first[0].read_bytes() == second[0].read_bytes()
    assert first[0].read_bytes() != other[0].read_bytes()


def test_training_shards_in_processes_are_the_same_bytes(tmp_path):
    serial = write_training_shards(tmp_path / "a", num_scenes=5, scenes_per_shard=2, size=64, seed=3)
    parallel = write_training_shards(
        tmp_path / "b", num_scenes=5, scenes_per_shard=2, size=64, seed=3, processes=2
    )
    assert [p.name for p in parallel] == [p.name for p in serial] == [f"shapes-{i:06d}.tar" for i in range(3)]
    assert [p.read_bytes() for p in parallel] == [p.read_bytes() for p in serial]
    with pytest.raises(ValueError, match="processes"):
        write_training_shards(tmp_path / "c", num_scenes=2, processes=0)


def test_training_shards_read_with_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    write_training_shards(tmp_path, num_scenes=3, scenes_per_shard=2, size=64, seed=0)
    dataset = wds.WebDataset(str(tmp_path / "shapes-{000000..000001}.tar"), shardshuffle=False).decode("pil")
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == ["00000000", "00000001", "00000002"]
    assert samples[0]["png"].size == (64, 64) and isinstance(samples[0]["json"]["mask"], list)


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    path = write_eval_set(out, num_scenes=24, size=128, seed=3, different_object_fraction=0.5)
    return out, path, json.loads(path.read_text())


def test_eval_set_structure(eval_set):
    out, path, mapping = eval_set
    assert path == out / "mapping_file.json"
    assert sorted(mapping) == [f"{i:05d}" for i in range(24)]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}.png" for i in range(24)]
    assert {"same", "different"} == {e["variant"] for e in mapping.values()}
    for entry_id, entry in mapping.items():
        assert {"image", "caption", "inpainting_mask", "outpainting_mask"} <= set(entry)
        assert entry["image"] == f"images/{entry_id}.png" and (entry["height"], entry["width"]) == (128, 128)
        inside = decode_brushbench_rle(entry["inpainting_mask"], 128, 128)
        outside = decode_brushbench_rle(entry["outpainting_mask"], 128, 128)
        np.testing.assert_array_equal(outside, ~inside)
        target, masked = entry["target"], entry["masked_object"]
        assert entry["prompt"] == object_phrase(target["shape"], target["colour"])
        assert entry["prompt"] in entry["caption"]
        assert target["colour"] != entry["background"]["colour"]
        ys, xs = np.nonzero(inside)
        assert target["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        if entry["variant"] == "same":
            assert (target["shape"], target["colour"]) == (masked["shape"], masked["colour"])
            assert entry["caption"] == entry["source_caption"]
        else:
            assert (target["shape"], target["colour"]) != (masked["shape"], masked["colour"])
            assert object_phrase(masked["shape"], masked["colour"]) in entry["source_caption"]
            assert entry["prompt"] not in entry["source_caption"]


def test_eval_holes_are_dilated_object_masks(eval_set):
    out, _, mapping = eval_set
    for index, entry in enumerate(mapping.values()):
        rng = scene_rng("eval", 3, index)
        scene = sample_scene(rng, size=128, min_gap=8)
        image, masks = render_scene(scene)
        stored = np.asarray(Image.open(out / entry["image"]))
        np.testing.assert_array_equal(stored, np.asarray(image))
        assert entry["source_caption"] == scene.caption
        inside = decode_brushbench_rle(entry["inpainting_mask"], 128, 128)
        matches = [i for i, mask in enumerate(masks) if np.array_equal(dilate_mask(mask, 3), inside)]
        assert len(matches) == 1
        masked = scene.objects[matches[0]]
        assert (masked.shape, masked.colour) == (
            entry["masked_object"]["shape"],
            entry["masked_object"]["colour"],
        )
        # The hole and the 2-pixel ring the metrics read around it touch no other object.
        around = dilate_mask(inside, 2)
        assert all(not (around & mask).any() for i, mask in enumerate(masks) if i != matches[0])


def test_eval_set_deterministic_and_fractions(tmp_path):
    a = write_eval_set(tmp_path / "a", num_scenes=6, size=64, seed=0, different_object_fraction=1.0)
    b = write_eval_set(tmp_path / "b", num_scenes=6, size=64, seed=0, different_object_fraction=1.0)
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a/images/00003.png").read_bytes() == (tmp_path / "b/images/00003.png").read_bytes()
    assert {e["variant"] for e in json.loads(a.read_text()).values()} == {"different"}
    same = write_eval_set(tmp_path / "c", num_scenes=6, size=64, seed=0)
    entries = json.loads(same.read_text()).values()
    assert {e["variant"] for e in entries} == {"same"}
    assert all(e["target"]["colour"] in PALETTE for e in entries)
    with pytest.raises(ValueError, match="different_object_fraction"):
        write_eval_set(tmp_path / "d", num_scenes=1, different_object_fraction=1.5)


def test_eval_images_differ_from_training_images(tmp_path):
    write_training_shards(tmp_path / "train", num_scenes=10, scenes_per_shard=10, size=64, seed=0)
    write_eval_set(tmp_path / "eval", num_scenes=10, size=64, seed=0)
    train = {v for k, v in _members(tmp_path / "train/shapes-000000.tar").items() if k.endswith(".png")}
    evaluation = {p.read_bytes() for p in (tmp_path / "eval/images").iterdir()}
    assert len(train) == 10 and len(evaluation) == 10 and not train & evaluation


def test_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app, ["make-train", str(tmp_path / "t"), "-n", "3", "--scenes-per-shard", "2", "--size", "64"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["shapes-000000.tar", "shapes-000001.tar"]
    result = runner.invoke(
        app, ["make-eval", str(tmp_path / "e"), "-n", "2", "--size", "64", "--different-object", "1"]
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "e/mapping_file.json").read_text())) == 2
    result = runner.invoke(app, ["make-train", str(tmp_path / "x"), "-n", "0"])
    assert result.exit_code == 2
    assert "--num-scenes must be at least 1" in result.output  # the flag, not the parameter


def test_removal_eval_set_asks_for_the_masked_object_to_go(tmp_path):
    """Same scenes and holes as the plain set; the prompt names the background, the caption lacks the object."""
    write_eval_set(tmp_path / "plain", 6, seed=4)
    write_eval_set(tmp_path / "removal", 6, seed=4, removal=True)
    plain = json.loads((tmp_path / "plain" / "mapping_file.json").read_text())
    removal = json.loads((tmp_path / "removal" / "mapping_file.json").read_text())
    for key, entry in removal.items():
        same = plain[key]
        assert entry["inpainting_mask"] == same["inpainting_mask"]
        assert (tmp_path / "removal" / entry["image"]).read_bytes() == (
            tmp_path / "plain" / same["image"]
        ).read_bytes()
        assert entry["variant"] == "removal" and entry["target"] is None
        assert entry["prompt"].endswith("background") and entry["prompt"] in entry["caption"]
        assert same["prompt"] not in entry["caption"] and same["prompt"] in same["source_caption"]
    with pytest.raises(ValueError, match="different_object_fraction must be 0"):
        write_eval_set(tmp_path / "bad", 2, removal=True, different_object_fraction=0.5)
