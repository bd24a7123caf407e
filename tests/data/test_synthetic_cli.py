"""Synthetic shard writer and the ``data make-synthetic`` command."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from brushnet.cli.data import data_app as app
from brushnet.data.rle import decode_brushdata_rle
from brushnet.data.synthetic import MALFORMED_KINDS, write_synthetic_shards


def test_writer_is_deterministic_and_segmentations_match_pixels(tmp_path):
    first = write_synthetic_shards(tmp_path / "a", 2, 3, size=(20, 28), seed=9)
    second = write_synthetic_shards(tmp_path / "b", 2, 3, size=(20, 28), seed=9)
    assert [p.read_bytes() for p in first.paths] == [p.read_bytes() for p in second.paths]
    assert not list((tmp_path / "a").glob(".*tmp"))  # no temporary file left behind
    with tarfile.open(first.paths[0]) as tar:
        files = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
    key = "s00000_000000"
    assert {name.split(".", 1)[1] for name in files if name.startswith(key)} == {
        "image", "caption", "height", "width", "segmentation", "aesthetic_score", "url", "original_key"
    }  # fmt: skip
    image = np.asarray(Image.open(io.BytesIO(files[f"{key}.image"])))
    height, width = int(files[f"{key}.height"]), int(files[f"{key}.width"])
    assert image.shape == (20, 28, 3) and (height, width) == (20, 28)
    rles = json.loads(files[f"{key}.segmentation"])["mask"]
    assert rles
    for rle in rles:
        mask = decode_brushdata_rle(rle, height, width)
        assert mask.any() and len(np.unique(image[mask], axis=0)) == 1  # each object one flat colour


def test_malformed_injection(tmp_path):
    written = write_synthetic_shards(tmp_path, 3, 4, size=16, seed=0, malformed=7)
    assert len(written.malformed) == 7 and len(written.valid_keys) == 5
    assert sorted(set(written.malformed.values())) == sorted(MALFORMED_KINDS)


def test_cli_make_synthetic(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["make-synthetic", "--out", str(tmp_path), "--shards", "2", "--samples-per-shard", "3", "--size", "16",
         "--malformed", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "6 samples (2 malformed) in 2 shards" in result.output
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-00000.tar", "shard-00001.tar"]
    bad = runner.invoke(app, ["make-synthetic", "--out", str(tmp_path), "--malformed", "1000"])
    assert bad.exit_code == 2 and "error:" in bad.output and "Traceback" not in bad.output
    assert "make-synthetic" in runner.invoke(app, ["--help"]).output


def test_cli_import_is_light_and_package_exports_lazily():
    code = (
        "import sys, brushnet.cli.data, brushnet.data as data; "
        "heavy = [m for m in ('torch', 'webdataset', 'PIL', 'numpy') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "assert data.MaskConfig().mode == 'segmentation' and callable(data.BrushDataStream)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_synthetic_captions_name_the_visible_objects_with_their_articles():
    """A shape drawn over completely stayed in the caption (7 of 300 samples at 32x32 named more objects than
    they had masks), and every phrase began "a" ("a orange ellipse")."""
    import re

    import numpy as np

    from brushnet.data.synthetic import _render_sample

    rng = np.random.default_rng(0)
    for _ in range(300):
        _, caption, masks = _render_sample(32, 32, rng)
        objects, background = caption.rsplit(" on ", 1)
        assert len(objects.split(", ")) == len(masks), caption
        for phrase in [*objects.split(", "), background]:
            article, word = phrase.split()[:2]
            assert article == ("an" if re.match("[aeiou]", word) else "a"), caption
