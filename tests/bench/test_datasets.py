"""Dataset loaders: BrushBench RLE masks (row-major, decoded at the image's size), inside/outside, folder sets,
and the disjoint shards."""

import json

import numpy as np
import pytest
from PIL import Image

from brushnet.bench.datasets import load_dataset, shard_indices
from brushnet.data.rle import encode_brushbench_rle
from brushnet.errors import InputError


def _write_brushbench(root, with_outpainting=True, extra=None):
    (root / "images").mkdir(parents=True)
    masks = {}
    mapping = {}
    for index, (height, width) in enumerate([(24, 40), (32, 32)]):
        rng = np.random.default_rng(index)
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        image.save(root / "images" / f"{index}.png")
        mask = np.zeros((height, width), dtype=bool)
        mask[3:9, 5 + index : 20] = True  # not symmetric: a column-major decode would differ
        mask[0, width - 1] = True
        masks[str(index)] = mask
        entry = {
            "image": f"images/{index}.png",
            "caption": f"caption {index}",
            "inpainting_mask": encode_brushbench_rle(mask),
        }
        if with_outpainting:
            entry["outpainting_mask"] = encode_brushbench_rle(~mask)
        entry.update(extra or {})
        mapping[str(index)] = entry
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return masks


@pytest.mark.parametrize("with_outpainting", [True, False])
def test_brushbench_masks_round_trip_and_outside_is_inverse(tmp_path, with_outpainting):
    masks = _write_brushbench(tmp_path, with_outpainting)
    inside = load_dataset(tmp_path, "brushbench", "inside")
    outside = load_dataset(tmp_path / "mapping_file.json", "editbench", "outside")
    assert inside.ids == outside.ids == ["0", "1"]
    for index, item in enumerate(inside):
        expected = masks[item.id]
        assert item.mask.dtype == bool and item.mask.shape == expected.shape == item.image.size[::-1]
        np.testing.assert_array_equal(item.mask, expected)
        np.testing.assert_array_equal(outside[index].mask, ~expected)
        assert item.prompt == item.caption == f"caption {item.id}"


def test_prompt_key_overrides_caption_and_extra_keys_are_metadata(tmp_path):
    _write_brushbench(
        tmp_path, extra={"prompt": "a red circle", "target": {"shape": "circle", "colour": "red"}}
    )
    item = load_dataset(tmp_path)[0]
    assert item.prompt == "a red circle" and item.caption == "caption 0"
    assert item.metadata == {"prompt": "a red circle", "target": {"shape": "circle", "colour": "red"}}


def test_shapes_world_set_decodes_at_its_size(shapes_set):
    dataset = load_dataset(shapes_set)
    item = dataset[0]
    assert item.image.size == (64, 64) and item.mask.shape == (64, 64)
    left, top, right, bottom = item.metadata["target"]["bbox"]
    ys, xs = np.nonzero(item.mask)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (left, top, right, bottom)


def test_folder_set(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (16, 8), "red").save(tmp_path / "images" / "a.jpg")
    mask = np.zeros((8, 16), dtype=np.uint8)
    mask[2:5, 3:9] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"id": "a", "caption": "a dog", "source": "x"}) + "\n"
    )
    item = load_dataset(tmp_path, "folder")[0]
    assert (item.id, item.prompt, item.caption, item.metadata) == ("a", "a dog", "a dog", {"source": "x"})
    np.testing.assert_array_equal(item.mask, mask > 0)
    np.testing.assert_array_equal(load_dataset(tmp_path, "folder", "outside")[0].mask, mask == 0)
    # a.jpg and a.png would share the id "a", and with it their outputs and rows
    Image.new("RGB", (16, 8), "blue").save(tmp_path / "images" / "a.png")
    with pytest.raises(InputError, match="a.jpg and a.png have the same id 'a'"):
        load_dataset(tmp_path, "folder")


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(InputError, match="mapping_file.json"):
        load_dataset(tmp_path)
    _write_brushbench(tmp_path / "set")
    with pytest.raises(InputError, match="mask kind"):
        load_dataset(tmp_path / "set", mask_kind="around")
    with pytest.raises(InputError, match="dataset kind"):
        load_dataset(tmp_path / "set", kind="coco")


@pytest.mark.parametrize("total,count", [(0, 1), (7, 1), (7, 3), (10, 4), (3, 8)])
def test_shards_are_disjoint_and_cover_the_set(total, count):
    shards = [shard_indices(total, index, count) for index in range(count)]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(total)) and len(flat) == len(set(flat))
    assert all(i % count == index for index, shard in enumerate(shards) for i in shard)
    with pytest.raises(ValueError):
        shard_indices(total, count, count)
