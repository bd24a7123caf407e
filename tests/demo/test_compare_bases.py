"""benchmarks/gpu_runs/issue18_compare_bases.py: the bases a device call returned, unpacked, diagnosed on the CPU
(``examples/demo_world/diagnose.py --json``) and compared with the control."""

import json
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_runs"))
from issue18_compare_bases import SHIPPED_VAE, compare, main, unpack  # noqa: E402


def figures(redraw07: float, t2i_shape: float, diagonal: float) -> dict:
    """What ``diagnose.py --json`` writes, with the three deciding shares given."""
    return {
        "redraw": {"0.3": 0.8, "0.5": 0.4, "0.7": redraw07, "0.85": 0.0, "1.0": 0.0},
        "text_to_image": {"samples": 48, "background": 0.9, "object": 0.5, "shape": t2i_shape},
        "shape_words": {"seeds": 12, "diagonal": diagonal, "word_change": 3.2, "seed_change": None},
        "words": {"shapes": {"circle/square": 0.9, "triangle/star": 0.7}},
    }


def test_a_variant_beats_the_control_only_when_every_deciding_share_is_a_margin_above():
    table, verdicts = compare(
        {
            "control": figures(0.04, 0.00, 0.02),
            "level4": figures(0.30, 0.25, 0.40),  # all three well above
            "level4_frozen": figures(0.30, 0.25, 0.10),  # shape words only 0.08 above
            "frozen_text": figures(0.04, 0.00, 0.03),
        }
    )
    assert verdicts == {"level4": True, "level4_frozen": False, "frozen_text": False}
    rows = table.splitlines()
    assert rows[0].startswith("| base | redraw 0.7 | t2i shape | word → shape |")
    assert rows[3] == "| level4 | 0.30 | 0.25 | 0.40 | 0.90 | 0.40 | 3.20 | – | 0.80 |"
    assert compare({"level4": figures(1, 1, 1)})[1] == {}  # no control: nothing to compare with


def _pack(tmp_path: Path, name: str, members: dict[str, str]) -> Path:
    folder = tmp_path / f"src_{name}"
    for member, text in members.items():
        (folder / member).parent.mkdir(parents=True, exist_ok=True)
        (folder / member).write_text(text)
    tar = tmp_path / "tars" / f"base_{name}.tgz"
    tar.parent.mkdir(exist_ok=True)
    with tarfile.open(tar, "w:gz") as archive:
        for member in members:
            archive.add(folder / member, arcname=member)
    return tar


def test_unpack_puts_the_shipped_vae_beside_the_base_and_refuses_another_archive(tmp_path):
    good = _pack(tmp_path, "level4", {"model_index.json": "{}", "unet/config.json": "{}"})
    folder = unpack(good, tmp_path / "work")
    assert folder == tmp_path / "work" / "level4"
    assert (folder / "unet" / "config.json").is_file()
    assert sorted(p.name for p in (folder / "vae").iterdir()) == sorted(p.name for p in SHIPPED_VAE.iterdir())
    bad = _pack(tmp_path, "odd", {"notes.txt": "not a base"})
    with pytest.raises(ValueError, match="base_odd.tgz: not a base packed by issue18_base_capacity.py"):
        unpack(bad, tmp_path / "work")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["level4"]  # nothing half-unpacked left


def test_main_compares_the_diagnosed_bases_and_refuses_a_folder_without_tars(tmp_path, capsys):
    work = tmp_path / "work"
    for name, figure in (("control", figures(0.04, 0.0, 0.02)), ("level4", figures(0.3, 0.3, 0.3))):
        (work / name).mkdir(parents=True)
        (work / name / "model_index.json").write_text("{}")
        (work / f"{name}.json").write_text(json.dumps(figure))  # diagnosed already: not run again
    assert main(["--work", str(work)]) == 0
    out = capsys.readouterr().out
    assert "level4 beats the control (every deciding share at least 0.1 above it)" in out
    assert "| control | 0.04 | 0.00 | 0.02 |" in out
    (work / "control.json").rename(work / "control.json.old")
    (work / "control" / "model_index.json").unlink()
    assert main(["--work", str(work)]) == 1
    assert "no base named 'control'" in capsys.readouterr().out
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "base_level4.tgz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(SystemExit) as exit_info:
        main(["--tars", str(corrupt), "--work", str(tmp_path / "work2")])
    assert exit_info.value.code == 2
    assert f"{corrupt / 'base_level4.tgz'}: cannot unpack" in capsys.readouterr().err
    assert list((tmp_path / "work2").iterdir()) == []  # nothing half-unpacked left
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["--tars", str(tmp_path / "empty"), "--work", str(work)])
    assert exit_info.value.code == 2
    assert f"--tars {tmp_path / 'empty'}: no base_*.tgz there" in capsys.readouterr().err


def test_diagnose_json_has_every_figure_the_comparison_reads(tmp_path):
    """The real contract between the two scripts: ``diagnose.py --json`` on the shipped base (tiny counts, four
    sampler steps) gives what :func:`compare` reads, and prints and writes the same figures."""
    from diagnose import main as diagnose  # examples/demo_world (conftest.py)

    from brushnet.demo.assets import DEMO_DIR

    out = tmp_path / "base.json"
    args = ["--base", str(DEMO_DIR / "base"), "--scenes", "1", "--samples", "1", "--redraw", "1"]
    assert diagnose([*args, "--shape-words", "1", "--words", "--sample-steps", "4", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert set(written) >= {"x0_mse", "latent_variance", "text_to_image", "redraw", "words", "shape_words"}
    assert written["shape_words"]["seed_change"] is None  # one seed: no seed change, null rather than NaN
    assert set(written["redraw"]) == {"0.3", "0.5", "0.7", "0.85", "1.0"}
    table, verdicts = compare({"control": written, "same": written})
    assert verdicts == {"same": False}  # equal is not a margin above
    assert len(table.splitlines()) == 4
    assert not list(tmp_path.glob("*.partial"))


def test_bad_options_are_one_usage_line_before_anything_is_loaded_or_written(tmp_path, capsys):
    from diagnose import main as diagnose  # examples/demo_world (conftest.py)
    from issue18_base_capacity import main as base_capacity

    from brushnet.demo.assets import DEMO_DIR

    with pytest.raises(SystemExit) as exit_info:
        diagnose(["--base", str(DEMO_DIR / "base"), "--json", str(tmp_path / "missing" / "base.json")])
    assert exit_info.value.code == 2
    assert (
        f"--json {tmp_path / 'missing' / 'base.json'}: no folder {tmp_path / 'missing'}"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as exit_info:
        base_capacity(["--variants", "control,huge", "--scratch", str(tmp_path / "scratch")])
    assert exit_info.value.code == 2
    assert "--variants: unknown ['huge']" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither wrote anything
