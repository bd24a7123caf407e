"""Few-step sampling with BrushNet on the shapes world (issue 15): kept-region PSNR (after the demo's paste-back and
before it), colour and shape accuracy of the shipped demo models at 10 steps and at 4 with the schedulers the pipeline takes, and, with ``--lora``, with an
LCM-LoRA of the demo base (``tools/distill_lcm_lora.py``) under ``LCMScheduler`` at 2, 4 and 8 steps (guidance 1:
the teacher's guidance is distilled in), also at other BrushNet conditioning scales (see docs/composing.md).

    OMP_NUM_THREADS=1 python tools/few_step_brushnet.py --scenes 24 --out /tmp/few_step.json
    OMP_NUM_THREADS=1 python tools/few_step_brushnet.py --scenes 24 --lora tests/fixtures/lcm_lora_demo \\
        --runs unipc-10 lcm-4 lcm-4-g1 lora-2 lora-4 lora-8 --out /tmp/few_step_lora.json
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

BASE_RUNS = {  # label: (scheduler, steps, LoRA on, guidance scale or None for the demo's, conditioning scale)
    "unipc-10": ("unipc", 10, False, None, 1.0),
    "unipc-4": ("unipc", 4, False, None, 1.0),
    "ddim-4": ("ddim", 4, False, None, 1.0),
    "lcm-4": ("lcm", 4, False, None, 1.0),
    "tcd-4": ("tcd", 4, False, None, 1.0),
}
LORA_RUNS = {
    "lcm-4-g1": ("lcm", 4, False, 1.0, 1.0),
    "lora-2": ("lcm", 2, True, 1.0, 1.0),
    "lora-4": ("lcm", 4, True, 1.0, 1.0),
    "lora-8": ("lcm", 8, True, 1.0, 1.0),
    "lora-4-g2": ("lcm", 4, True, 2.0, 1.0),
    "lora-4-cs0.8": ("lcm", 4, True, 1.0, 0.8),
    "lora-4-cs1.2": ("lcm", 4, True, 1.0, 1.2),
}


def _uint8(images) -> np.ndarray:
    """``(1, 3, H, W)`` in [0, 1] → ``(H, W, 3)`` uint8."""
    return (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def main() -> None:
    from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler, UniPCMultistepScheduler

    from brushnet.data.rle import rle_decode
    from brushnet.data.shapes_metrics import colour_accuracy, shape_accuracy
    from brushnet.data.shapes_writers import write_eval_set
    from brushnet.demo.assets import DEMO_DIR
    from brushnet.demo.run import DEMO_REQUEST
    from brushnet.image import blend
    from brushnet.loading import load_base_components, load_brushnet
    from brushnet.pipelines import StableDiffusionBrushNetPipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--lora", type=Path, default=None, help="an LCM-LoRA folder (load_lora_weights reads it)"
    )
    parser.add_argument(
        "--runs", nargs="+", default=None,
        help=f"labels to run (default: all base runs, and every LoRA run with --lora): {', '.join(BASE_RUNS)}, "
        f"{', '.join(LORA_RUNS)}",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    known = {**BASE_RUNS, **LORA_RUNS}
    labels = args.runs or list(BASE_RUNS) + (list(LORA_RUNS) if args.lora else [])
    unknown = [label for label in labels if label not in known]
    if unknown:
        parser.error(f"unknown runs: {', '.join(unknown)}")
    if args.lora is None and any(known[label][2] for label in labels):
        parser.error("LoRA runs need --lora")
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
    if args.lora is not None:
        pipe.load_lora_weights(args.lora, adapter_name="lcm")
    base_config = dict(pipe.scheduler.config)
    results = {}
    for label in labels:
        name, steps, lora, guidance, conditioning_scale = known[label]
        pipe.scheduler = schedulers[name].from_config(base_config)
        if args.lora is not None:
            (pipe.enable_lora if lora else pipe.disable_lora)()
        psnrs, raw_psnrs, colours, shapes, start = [], [], [], [], time.perf_counter()
        for entry in mapping.values():
            image = Image.open(folder / entry["image"]).convert("RGB")
            hole = rle_decode(entry["inpainting_mask"], entry["height"], entry["width"], "C").astype(bool)
            raw = pipe(
                entry["prompt"], image, Image.fromarray(hole.astype(np.uint8) * 255),
                num_inference_steps=steps,
                guidance_scale=DEMO_REQUEST["guidance_scale"] if guidance is None else guidance,
                brushnet_conditioning_scale=conditioning_scale,
                generator=torch.Generator().manual_seed(DEMO_REQUEST["seed"]), output_type="pt",
            ).images  # fmt: skip
            # the pipeline's blending=True, done here so the unblended output is scored too
            original = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255
            out = blend(
                original, raw, torch.from_numpy(hole)[None, None].float(), DEMO_REQUEST["blend_kernel_size"]
            )
            kept = ~hole
            for output, scores in ((out, psnrs), (raw, raw_psnrs)):
                mse = np.mean(
                    (_uint8(output)[kept].astype(float) - np.asarray(image)[kept].astype(float)) ** 2
                )
                scores.append(10 * np.log10(255**2 / max(mse, 1e-10)))
            result, target = _uint8(out), entry["target"]
            colours.append(colour_accuracy(result, hole, target["colour"]))
            shapes.append(shape_accuracy(result, hole, target["shape"], target["colour"]))
        results[label] = {
            "scheduler": name,
            "steps": steps,
            "lora": lora,
            "guidance_scale": DEMO_REQUEST["guidance_scale"] if guidance is None else guidance,
            "brushnet_conditioning_scale": conditioning_scale,
            "kept_psnr": float(np.mean(psnrs)),
            "raw_kept_psnr": float(np.mean(raw_psnrs)),
            "colour_accuracy": float(np.mean(colours)),
            "shape_accuracy": float(np.mean(shapes)),
            "seconds_per_image": (time.perf_counter() - start) / len(mapping),
        }
        print(label, results[label], flush=True)
    report = {"scenes": args.scenes, "device": "cpu, 1 thread", "lora": str(args.lora), "runs": results}
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
