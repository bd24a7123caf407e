"""How close the package's StableDiffusionHDPainterPipeline is to the original's outputs, run by run.

Prints, for every run of ``tests/fixtures/hd_painter/reference.json``, the largest absolute difference of the
output image (in [0, 1], before quantisation, padding cropped), of the returned uint8 image (truncated like the
original), of the final x̂0 and every step's latent, of the guided noise predictions, and the largest difference
of the RASG gradients relative to their largest value. ``tests/pipelines/test_pipeline_hd_painter.py`` asserts
bounds on the same quantities; docs/hd_painter.md quotes this script's output.

    OMP_NUM_THREADS=1 .venv/bin/python tools/hd_painter_reference/compare_package.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hd_painter"


def main() -> None:
    torch.set_num_threads(1)
    from brushnet.loading import load_base_components
    from brushnet.pipelines.pipeline_hd_painter import StableDiffusionHDPainterPipeline

    info = json.loads((FIXTURE / "reference.json").read_text())
    reference = load_file(str(FIXTURE / "reference.safetensors"))
    prompts = info["prompts"]
    pipe = StableDiffusionHDPainterPipeline(**load_base_components(FIXTURE / "model"))
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(FIXTURE / "image.png").convert("RGB")
    mask = Image.open(FIXTURE / "mask.png").convert("L")
    print("| run | image | uint8 | x̂0 | step latents | guided noise | RASG gradient (rel.) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for spec in info["runs"]:
        name, (width, height) = spec["name"], spec["input_size_wh"]
        box = (0, 0, width, height)
        record: dict[str, list] = {"latents": [], "noise_pred": [], "rasg_gradient": []}

        def keep(_pipe, _i, _t, values, record=record):
            for key in record:
                record[key].append(None if values[key] is None else values[key].clone())
            return values

        images = pipe(
            prompts["prompt"],
            torch.from_numpy(np.asarray(image.crop(box), np.float32) / 255).permute(2, 0, 1)[None],
            torch.from_numpy(np.asarray(mask.crop(box), np.float32) / 255)[None, None],
            num_inference_steps=spec["num_steps"],
            guidance_scale=spec["guidance_scale"],
            negative_prompt=prompts["negative_prompt"],
            positive_prompt=prompts["positive_prompt_addition"],
            use_painta=spec["use_painta"],
            use_rasg=spec["use_rasg"],
            rasg_eta=spec["eta"],
            generator=torch.Generator().manual_seed(spec["seed"]),
            output_type="pt",
            callback_on_step_end=keep,
            callback_on_step_end_tensor_inputs=list(record),
        ).images
        steps = len(spec["timesteps"])
        cells = []
        if f"{name}.output_raw" in reference:
            raw = reference[f"{name}.output_raw"].permute(0, 3, 1, 2)[..., :height, :width]
            final = reference[f"{name}.output_final_uint8"].permute(0, 3, 1, 2).float()
            cells += [
                f"{(images - raw).abs().max():.2e}",
                f"{((images * 255).floor() - final).abs().max():.0f}",
            ]
        else:
            cells += ["–", "–"]
        latents = reference[f"{name}.step_latents"]
        cells.append(f"{(record['latents'][-1] - reference[f'{name}.z0']).abs().max():.2e}")
        cells.append(
            f"{max((record['latents'][i] - latents[i + 1]).abs().max() for i in range(steps - 1)):.2e}"
        )
        eps = reference[f"{name}.step_eps_guided"]
        cells.append(f"{max((record['noise_pred'][i] - eps[i]).abs().max() for i in range(steps)):.2e}")
        if spec["use_rasg"]:
            grads = reference[f"{name}.step_rasg_grad"]
            relative = max(
                (record["rasg_gradient"][i] - grads[i]).abs().max() / grads[i].abs().max()
                for i in range(steps - 1)
            )
            cells.append(f"{relative:.2e}")
        else:
            cells.append("–")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
