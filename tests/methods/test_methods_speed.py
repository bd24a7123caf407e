"""benchmarks/methods_speed.py runs every method side by side and reports the calls each really made."""

import runpy
import sys
from pathlib import Path

from brushnet.methods.builtin.repaint import repaint_schedule

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "methods_speed.py"


def test_methods_speed_table(tmp_path, monkeypatch, capsys, tiny_models):
    prebuilt = tmp_path / "tiny"  # the session's tiny models, where the script looks for them (no rebuild)
    prebuilt.mkdir()
    folders = {"base": "base", "brushnet": "brushnet", "inpaint_model": "inpaint", "controlnet": "controlnet"}
    for field, folder in folders.items():
        (prebuilt / folder).symlink_to(tiny_models[field])
    argv = [str(SCRIPT), "--preset", "tiny", "--resolution", "64", "--steps", "2", "--repeats", "1"]
    argv += ["--guidance", "2", "--repaint-jump-length", "1", "--repaint-jump-n-sample", "3"]
    argv += ["--models-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[3:8]}
    assert list(rows) == [
        "brushnet",
        "sd-inpainting",
        "blended-latent-diffusion",
        "repaint",
        "controlnet-inpaint",
    ]
    repaint_calls = 2 * sum(m.direction == "down" for m in repaint_schedule(2, 1, 3))
    assert [int(rows[name][1]) for name in rows] == [4, 4, 4, repaint_calls, 4]  # CFG: 2 per step
    assert rows["brushnet"][2:4] == ["brushnet", "2"] and rows["controlnet-inpaint"][2:4] == [
        "controlnet",
        "4",
    ]
    assert all(float(rows[name][-1]) > 0 for name in rows)  # s/image min
