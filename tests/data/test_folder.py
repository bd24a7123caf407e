"""Folder dataset: images + masks matched by stem (white = hole) + captions.jsonl, or generated brush masks."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet.data.folder import FolderDataset, read_captions
from brushnet.data.masks import MaskConfig
from brushnet.errors import InputError


@pytest.fixture
def folder(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for index, (name, size) in enumerate([("a.png", (20, 30)), ("b.jpg", (24, 24)), ("c.webp", (30, 20))]):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name)
        hole = np.zeros((size[1], size[0]), np.uint8)
        hole[: size[1] // 2] = 255  # top half white = hole
        Image.fromarray(hole).save(masks / f"{name.split('.')[0]}.png")
        if index == 0:
            (images / "notes.txt").write_text("not an image")
    lines = [{"file": "a.png", "caption": "first"}, {"file": "c.webp", "caption": "third"}]
    (images / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return images, masks


def test_masks_from_folder(folder):
    images, masks = folder
    dataset = FolderDataset(images, 16, mask_dir=masks, random_crop=False)
    assert len(dataset) == 3
    assert [dataset[i]["key"] for i in range(3)] == ["a", "b", "c"]
    assert [dataset[i]["caption"] for i in range(3)] == ["first", "", "third"]
    item = dataset[1]  # 24x24 → 16x16, top half hole
    assert item["pixel_values"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
    expected = torch.zeros(1, 16, 16)
    expected[:, :8] = 1
    assert torch.equal(item["mask"], expected)
    # 20x30 (w x h): resized to 16x24, centre crop rows 4..20 → hole rows 0..8 of the output.
    assert torch.equal(dataset[0]["mask"][0, :, 0], (torch.arange(16) < 8).float())
    assert torch.equal(dataset[-1]["pixel_values"], dataset[2]["pixel_values"])
    with pytest.raises(IndexError):
        dataset[3]


def test_generated_brush_masks_are_deterministic_per_epoch(folder):
    images, _ = folder
    config = MaskConfig(mode="brush", p_swap=0.0, p_open=0.0)
    dataset = FolderDataset(images, 16, mask_config=config, seed=1)
    masks = [dataset[i]["mask"] for i in range(3)]
    assert all(set(mask.unique().tolist()) <= {0.0, 1.0} for mask in masks)
    assert all(torch.equal(mask, dataset[i]["mask"]) for i, mask in enumerate(masks))
    changed = 0
    for epoch in range(1, 4):
        dataset.set_epoch(epoch)
        changed += sum(not torch.equal(mask, dataset[i]["mask"]) for i, mask in enumerate(masks))
    assert changed > 0
    with pytest.raises(ValueError, match="brush"):
        FolderDataset(images, 16, mask_config=MaskConfig(mode="segmentation"))


def test_missing_mask_and_bad_inputs(folder, tmp_path):
    images, masks = folder
    (masks / "b.png").unlink()
    with pytest.raises(ValueError, match="without a mask"):
        FolderDataset(images, 16, mask_dir=masks)
    Image.new("L", (5, 5), 255).save(masks / "b.png")
    dataset = FolderDataset(images, 16, mask_dir=masks)
    with pytest.raises(InputError, match="must match"):
        dataset[1]
    with pytest.raises(ValueError, match="not found"):
        FolderDataset(tmp_path / "nope", 16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        FolderDataset(empty, 16)


def test_read_captions_errors(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"file": "dir/x.png", "caption": "x"}\n')
    assert read_captions(path) == {"x.png": "x"}
    path.write_text('{"file": "x.png", "caption": "x"}\n{"file": "x.png"}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_captions(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=":1:"):
        read_captions(path)
