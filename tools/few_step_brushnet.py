"""Few-step sampling with BrushNet on the shapes world (issue 15): kept-region PSNR, colour and shape accuracy of
the shipped demo models at 10 steps and at 4, with the schedulers the pipeline takes (no LCM / TCD / Hyper-SD LoRA
exists for the demo base, so the few-step schedulers run the plain UNet; see docs/composing.md).

    OMP_NUM_THREADS=1 python tools/few_step_brushnet.py --scenes 48 --out /tmp/few_step.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

RUNS = [("unipc", 10), ("unipc", 4), ("ddim", 4), ("lcm", 4), ("tcd", 4)]


def main() -> None:
    from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler, UniPCMultistepScheduler

    from brushnet.data.rle import rle_decode
    from brushnet.data.shapes_metrics import colour_accuracy, shape_accuracy
    from brushnet.data.shapes_writers import write_eval_set
    from brushnet.demo.assets import DEMO_DIR
    from brushnet.demo.run import DEMO_REQUEST
    from brushnet.loading import load_base_components, load_brushnet
    from brushnet.pipelines import StableDiffusionBrushNetPipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    schedulers = {
        "unipc": UniPCMultistepScheduler,
        "ddim": DDIMScheduler,
        "lcm": LCMScheduler,
        "tcd": TCDScheduler,
    }

    folder = Path(tempfile.mkdtemp())
    mapping = json.loads(
        write_eval_set(folder, args.scenes, seed=0, different_object_fraction=0.25).read_text()
    )
    components = load_base_components(DEMO_DIR / "base")
    pipe = StableDiffusionBrushNetPipeline(
        **components, brushnet=load_brushnet(DEMO_DIR / "brushnet"), safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    base_config = dict(pipe.scheduler.config)
    results = {}
    for name, steps in RUNS:
        pipe.scheduler = schedulers[name].from_config(base_config)
        psnrs, colours, shapes, start = [], [], [], time.perf_counter()
        for entry in mapping.values():
            image = Image.open(folder / entry["image"]).convert("RGB")
            hole = rle_decode(entry["inpainting_mask"], entry["height"], entry["width"], "C").astype(bool)
            out = pipe(
                entry["prompt"], image, Image.fromarray(hole.astype(np.uint8) * 255),
                num_inference_steps=steps, guidance_scale=DEMO_REQUEST["guidance_scale"],
                generator=torch.Generator().manual_seed(DEMO_REQUEST["seed"]), output_type="np",
                blending=True, blending_kernel_size=DEMO_REQUEST["blend_kernel_size"],
            ).images[0]  # fmt: skip
            result = (out * 255).round().astype(np.uint8)
            kept = ~hole
            mse = np.mean((result[kept].astype(float) - np.asarray(image)[kept].astype(float)) ** 2)
            psnrs.append(10 * np.log10(255**2 / max(mse, 1e-10)))
            target = entry["target"]
            colours.append(colour_accuracy(result, hole, target["colour"]))
            shapes.append(shape_accuracy(result, hole, target["shape"], target["colour"]))
        results[f"{name}-{steps}"] = {
            "kept_psnr": float(np.mean(psnrs)),
            "colour_accuracy": float(np.mean(colours)),
            "shape_accuracy": float(np.mean(shapes)),
            "seconds_per_image": (time.perf_counter() - start) / len(mapping),
        }
        print(name, steps, results[f"{name}-{steps}"], flush=True)
    args.out.write_text(
        json.dumps({"scenes": args.scenes, "device": "cpu, 1 thread", "runs": results}, indent=2)
    )


if __name__ == "__main__":
    main()
