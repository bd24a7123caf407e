"""benchmarks/methods_speed.py runs every method side by side and reports the calls each really made."""

import runpy
import sys
from pathlib import Path

from brushnet.methods.builtin.repaint import repaint_schedule

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "methods_speed.py"
# the 9-channel model with attention at 1/2 and 1/4 of the latent size that hd-painter needs (the tiny preset's has
# none at 1/4); sd-inpainting runs on it too
HD_PAINTER_MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "hd_painter" / "model"


def test_methods_speed_table(tmp_path, monkeypatch, capsys, tiny_models):
    prebuilt = tmp_path / "tiny"  # the session's tiny models, where the script looks for them (no rebuild)
    prebuilt.mkdir()
    folders = {"base": "base", "brushnet": "brushnet", "inpaint_model": "inpaint", "controlnet": "controlnet"}
    for field, folder in folders.items():
        (prebuilt / folder).symlink_to(HD_PAINTER_MODEL if field == "inpaint_model" else tiny_models[field])
    argv = [str(SCRIPT), "--preset", "tiny", "--resolution", "64", "--steps", "2", "--repeats", "1"]
    argv += ["--guidance", "2", "--repaint-jump-length", "1", "--repaint-jump-n-sample", "3"]
    argv += ["--models-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[3:9]}
    assert list(rows) == [
        "brushnet",
        "sd-inpainting",
        "blended-latent-diffusion",
        "repaint",
        "controlnet-inpaint",
        "hd-painter",
    ]
    repaint_calls = 2 * sum(m.direction == "down" for m in repaint_schedule(2, 1, 3))
    assert [int(rows[name][1]) for name in rows] == [4, 4, 4, repaint_calls, 4, 4]  # CFG: 2 per step
    assert rows["hd-painter"][2:4] == [
        "rasg_backward",
        "2",
    ]  # one backward pass (of the CFG pair): 2 steps - 1
    assert rows["brushnet"][2:4] == ["brushnet", "2"] and rows["controlnet-inpaint"][2:4] == [
        "controlnet",
        "4",
    ]
    assert all(float(rows[name][-1]) > 0 for name in rows)  # s/image min
