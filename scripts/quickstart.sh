#!/usr/bin/env bash
# Offline tour of the whole tool chain on random-weight models (no downloads, CPU, about a minute):
# builds model folders for every method, renders a shapes-world scene with an object mask, inpaints it
# with BrushNet through the CLI, and runs every available method side by side into a labelled grid.
# The weights are random, so the hole fills with noise-like texture: this shows the code paths and the
# guarantees (kept pixels stay exact), not image quality. Pass real weights with --base/--brushnet.
set -euo pipefail
out=${1:-outputs/quickstart}
mkdir -p "$out"

# one folder per model slot; each line is "<folder>  (--<flag>)": turned into the flags every command takes
model_flags=$(brushnet make-tiny-models "$out/models" --overwrite | sed -E 's/^(.*)  \((--[a-z0-9-]+)\)$/\2 \1/')

python - "$out" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from brushnet.data.shapes import render_scene, sample_scene, scene_rng

out = Path(sys.argv[1])
scene = sample_scene(scene_rng("eval", 0, 0), size=128)
image, masks = render_scene(scene)
image.save(out / "scene.png")
Image.fromarray(masks[0].astype(np.uint8) * 255).save(out / "mask.png")
(out / "caption.txt").write_text(scene.caption + "\n")
print(f"scene: {scene.caption}")
EOF

models="$out/models"
brushnet inpaint --base "$models/base" --brushnet "$models/brushnet" \
    --image "$out/scene.png" --mask "$out/mask.png" --prompt "a red circle" \
    --steps 10 --seed 1234 --output "$out/brushnet.png"

# every method side by side; the tiny random UNet has no cross-attention at 1/4 of the latent size, where
# HD-Painter's RASG reads its maps, so RASG is off for this tour (PAIntA stays on)
methods=$(brushnet methods | grep -v '^ ' | cut -d: -f1 | paste -sd, -)
# shellcheck disable=SC2086  # the flags are words
brushnet compare --image "$out/scene.png" --mask "$out/mask.png" --prompt "a red circle" \
    --methods "$methods" $model_flags --option hd-painter:rasg=false \
    --steps 10 --seed 1234 --output "$out/compare.png"

python - "$out" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from brushnet.image import feather_mask

out = Path(sys.argv[1])
image = np.asarray(Image.open(out / "scene.png").convert("RGB"))
result = np.asarray(Image.open(out / "brushnet.png").convert("RGB"))
hole = np.asarray(Image.open(out / "mask.png")) > 127
band = feather_mask(torch.from_numpy(hole.astype(np.float64))[None, None])[0, 0].numpy() > 0
changed = int((image[~band] != result[~band]).any(-1).sum())
print(f"kept pixels changed outside the feathered band: {changed} of {int((~band).sum())}")
assert changed == 0
print(f"outputs in {out}/")
EOF
