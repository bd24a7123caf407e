"""The shipped-model test's figures for BrushNet, measured on the weights that ship, to set its thresholds from.

    python tools/measure_shipped_brushnet.py

Runs the loops of ``tests/demo/test_shipped_models.py`` (its 16 held-out scenes, the demo's settings) with the
branch at preservation scale 1.0 and switched off (0.0), and prints, per scale, the mean and worst blended
kept-region PSNR, the mean raw kept-region PSNR and how many holes got the prompted colour and shape. CPU, about
a minute.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    sys.path.insert(0, str(ROOT / "tests" / "demo"))
    import test_shipped_models as shipped

    from brushnet.bench.datasets import load_dataset
    from brushnet.data.shapes_writers import write_eval_set

    with tempfile.TemporaryDirectory() as root:
        write_eval_set(Path(root), shipped.SCENES, seed=0, different_object_fraction=0.25)
        held_out = load_dataset(root, "brushbench", "inside")
        for scale in (1.0, 0.0):
            outputs = list(shipped._outputs("brushnet", held_out, options={"conditioning_scale": scale}))
            blended, raw, colour, shape = shipped._scores(outputs)  # the means the test asserts on
            worst = min(shipped._kept_psnr(pasted, item.image, item.mask) for item, _, pasted in outputs)
            n = len(outputs)
            print(
                f"scale {scale}: blended {blended:.2f} dB (worst {worst:.2f}), raw {raw:.2f} dB, "
                f"colour {round(colour * n)}/{n}, shape {round(shape * n)}/{n}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
