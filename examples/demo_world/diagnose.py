"""How well a base model predicts the clean latent at each noise level, on held-out shapes-world scenes.

    python examples/demo_world/diagnose.py --base src/brushnet/assets/demo_world/base

Prints, per timestep, the mean squared error of the model's x₀ estimate (from ε or v, whichever its scheduler
declares) against the VAE latent of the scene, next to the variance of the latents (the error of always
predicting the data mean). An x₀ error above that variance at high noise means the sampler's first steps
start from worse than nothing: the failure that made the demo fine-tune its ε base to v-prediction.

    python examples/demo_world/diagnose.py --base src/brushnet/assets/demo_world/base --samples 24

also draws ``--samples`` images from held-out one-object captions ("a red circle on a striped white
background"; DDIM 25 steps, guidance 5) and prints the share whose dominant colour is the captioned background's
and the share that show the captioned object's colour: what the base draws, which is what every inpainting
model of the demo starts from.

    python examples/demo_world/diagnose.py --base src/brushnet/assets/demo_world/base --redraw 24

redraws ``--redraw`` rendered held-out one-object scenes from their captions after noising them to a share of
the schedule (SDEdit: strength 0.3 keeps most of the image, 1.0 is text-to-image) and prints, per strength, the
share whose object keeps its shape: the noise level at which the base decides an object's shape, and whether it
can draw one there.

    python examples/demo_world/diagnose.py --base src/brushnet/assets/demo_world/base --words --shape-words 12

``--words`` prints how far apart the text encoder keeps the world's words: the cosine similarity of its output
state at the shape word of "a red <shape> on a plain white background" for each pair of shapes (and the same
for colour words). ``--shape-words N`` draws N seeds × the five shape words, each seed with one colour and
background and only the shape word changed, and prints which shape comes out for which word (a confusion
matrix) and how much the shape word changes the image next to how much the seed does: whether the base reads
the shape word at all.

``--json PATH`` also writes every figure printed to ``PATH`` (what
``benchmarks/gpu_runs/issue18_compare_bases.py`` reads to compare bases side by side).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from brushnet.training.family import _token_ids  # how the training loops tokenize a caption

__all__ = ["x0_errors", "redraw_check", "sample_check", "word_states", "shape_word_check", "main"]

TIMESTEPS = (100, 300, 500, 700, 900, 990)
STRENGTHS = (0.3, 0.5, 0.7, 0.85, 1.0)


@torch.no_grad()
def x0_errors(
    base: str, scenes: int = 16, seed: int = 0, timesteps=TIMESTEPS, device: str = "cpu"
) -> tuple[dict[int, float], float]:
    """``({t: x₀ MSE}, latent variance)`` over ``scenes`` eval-split scenes (world seed 3), captioned."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from brushnet.data.shapes import render_scene, sample_scene, scene_rng

    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32).eval()
    text_encoder = CLIPTextModel.from_pretrained(
        base, subfolder="text_encoder", torch_dtype=torch.float32
    ).eval()
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    images, captions = [], []
    for index in range(scenes):
        scene = sample_scene(scene_rng("eval", 3, index), size=128, min_gap=8)
        images.append(np.asarray(render_scene(scene)[0]))
        captions.append(scene.caption)
    pixels = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae, unet, text_encoder = vae.to(device), unet.to(device), text_encoder.to(device)
    latents = vae.encode(pixels.to(device)).latent_dist.mean * vae.config.scaling_factor
    hidden = text_encoder(_token_ids(tokenizer, captions, device))[0]
    generator = torch.Generator().manual_seed(seed)
    errors = {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator).to(device)
        steps = torch.full((scenes,), t, device=device)
        noisy = scheduler.add_noise(latents, noise, steps)
        out = unet(noisy, steps, hidden).sample
        alpha = scheduler.alphas_cumprod[t].to(device)
        if scheduler.config.prediction_type == "v_prediction":
            x0 = alpha.sqrt() * noisy - (1 - alpha).sqrt() * out
        else:
            x0 = (noisy - (1 - alpha).sqrt() * out) / alpha.sqrt()
        errors[t] = float(((x0 - latents) ** 2).mean())
    return errors, float(latents.var())


def _ddim_pipeline(pipeline_class, base: str, device: str = "cpu"):
    """``pipeline_class`` (text-to-image or image-to-image) from ``base`` in float32 with a DDIM sampler, on
    ``device`` (the noise is drawn on the CPU, so a seed gives the same start on any device)."""
    from diffusers import DDIMScheduler

    with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype; the pin allows 0.32
        warnings.simplefilter("ignore", FutureWarning)
        pipe = pipeline_class.from_pretrained(  # the UNet is stored in float16
            base, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
        )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def redraw_check(
    base: str,
    count: int = 24,
    strengths=STRENGTHS,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 5.0,
    device: str = "cpu",
) -> dict[float, float]:
    """SDEdit (Meng et al. 2022) on ``count`` rendered held-out one-object scenes (the captions of
    :func:`sample_check`): each scene is noised to ``strength`` of the schedule and redrawn by the base from its
    caption (DDIM, ``strength × steps`` steps, guidance ``guidance``); returns ``{strength: share whose largest
    blob of the object's colour keeps the object's shape}`` (:func:`brushnet.data.shapes_metrics.classify_shape`
    over the whole image, which passes 37 of 40 of these scenes as rendered). Strength 1.0 starts from pure
    noise (zero terminal SNR), so it is text-to-image."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from brushnet.data.shapes import render_scene, sample_scene, scene_rng
    from brushnet.data.shapes_metrics import classify_shape

    pipe = _ddim_pipeline(StableDiffusionImg2ImgPipeline, base, device)
    scenes = [sample_scene(scene_rng("eval", 3, index), max_objects=1) for index in range(count)]
    kept = {}
    for strength in strengths:
        hits = 0
        for index, scene in enumerate(scenes):
            image = pipe(
                scene.caption,
                image=render_scene(scene)[0],
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed + index),
            ).images[0]
            whole = np.ones((image.height, image.width), dtype=bool)
            hits += classify_shape(image, whole, scene.objects[0].colour) == scene.objects[0].shape
        kept[strength] = hits / count
    return kept


@torch.no_grad()
def sample_check(
    base: str, count: int = 24, seed: int = 0, steps: int = 25, guidance: float = 5.0, device: str = "cpu"
) -> dict:
    """Text-to-image from ``count`` held-out one-object captions (eval split, world seed 3): the shares of images
    whose nearest-palette majority colour is the captioned background (``background``), that have at least
    1.5 % of their pixels within 60 RGB units of the captioned object's colour (``object``), and whose largest
    blob of that colour has the captioned shape (``shape``, :func:`brushnet.data.shapes_metrics.classify_shape`
    over the whole image; 37 of 40 rendered scenes of these captions pass it)."""
    from diffusers import StableDiffusionPipeline

    from brushnet.data.shapes import PALETTE, sample_scene, scene_rng
    from brushnet.data.shapes_metrics import classify_shape

    pipe = _ddim_pipeline(StableDiffusionPipeline, base, device)
    names = list(PALETTE)
    palette = np.array([PALETTE[name] for name in names], dtype=np.float64)
    background = present = shaped = 0
    for index in range(count):
        scene = sample_scene(scene_rng("eval", 3, index), max_objects=1)
        image = pipe(
            scene.caption,
            height=128,
            width=128,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed + index),
        ).images[0]
        pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
        nearest = np.linalg.norm(pixels[:, None] - palette[None], axis=-1).argmin(1)
        background += names[np.bincount(nearest, minlength=len(names)).argmax()] == scene.background.colour
        target = np.asarray(PALETTE[scene.objects[0].colour], dtype=np.float64)
        present += (np.linalg.norm(pixels - target, axis=1) < 60).mean() >= 0.015
        whole = np.ones((image.height, image.width), dtype=bool)
        shaped += classify_shape(image, whole, scene.objects[0].colour) == scene.objects[0].shape
    return {
        "samples": count,
        "background": background / count,
        "object": present / count,
        "shape": shaped / count,
    }


def _state_cosines(text_encoder, tokenizer, captions: list[str], position: int) -> np.ndarray:
    """Cosine similarity matrix of the text encoder's output states at token ``position`` of ``captions``."""
    states = torch.nn.functional.normalize(
        text_encoder(_token_ids(tokenizer, captions, "cpu"))[0][:, position].float(), dim=-1
    )
    return (states @ states.T).numpy()


@torch.no_grad()
def word_states(base: str) -> dict:
    """How far apart the base's text encoder keeps the world's words. ``shapes``: ``{(a, b): cosine}`` of the
    output states at the shape word of ``"a red <a> on a plain white background"`` and of ``<b>`` (the state a
    cross-attention layer reads for that word); ``colours``: the same at the colour word of ``"a <colour>
    circle ..."``. A cosine near 1 means the UNet is told nearly the same thing for both words."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from brushnet.data.shapes import PALETTE, SHAPES, object_phrase

    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    out = {}
    for kind, words, phrase in (
        ("shapes", list(SHAPES), lambda word: object_phrase(word, "red")),
        ("colours", list(PALETTE), lambda word: object_phrase("circle", word)),
    ):
        captions = [f"{phrase(word)} on a plain white background" for word in words]
        # the word's position: after <bos> and the article, and for shapes after the colour
        position = 3 if kind == "shapes" else 2
        words_of = len(captions[0].split())
        if len(tokenizer(captions[0]).input_ids) != words_of + 2:  # <bos> ... <eos>, one token per word
            raise ValueError(f"{base}: the tokenizer does not make each word of {captions[0]!r} one token")
        cosines = _state_cosines(text_encoder, tokenizer, captions, position)
        out[kind] = {
            (a, b): float(cosines[i, j]) for i, a in enumerate(words) for j, b in enumerate(words) if i < j
        }
    return out


@torch.no_grad()
def shape_word_check(
    base: str, count: int = 12, seed: int = 0, steps: int = 25, guidance: float = 5.0, device: str = "cpu"
) -> dict:
    """Text-to-image from ``"<colour> <shape> on a plain <background> background"`` for ``count`` seeds × the five
    shapes: each seed keeps its colour, background and noise, only the shape word changes. Returns
    ``confusion`` (``{prompted: {classified or "none": n}}``, :func:`brushnet.data.shapes_metrics.classify_shape`
    over the whole image), ``diagonal`` (share classified as prompted), ``word_change`` (mean absolute pixel
    difference, 0–255, between a seed's image for ``circle`` and for each other word) and ``seed_change`` (the
    same between consecutive seeds' ``circle`` images): a base that reads the shape word has ``word_change``
    well above 0."""
    from diffusers import StableDiffusionPipeline

    from brushnet.data.shapes import SHAPES, object_phrase
    from brushnet.data.shapes_metrics import classify_shape

    pipe = _ddim_pipeline(StableDiffusionPipeline, base, device)
    colours = ("red", "blue", "orange", "purple", "green", "yellow", "white", "black")
    backgrounds = ("white", "yellow", "green", "black")
    confusion = {shape: {name: 0 for name in (*SHAPES, "none")} for shape in SHAPES}
    word_change, seed_change, previous = [], [], None
    whole = np.ones((128, 128), dtype=bool)
    for index in range(count):
        colour = colours[index % len(colours)]
        background = [name for name in backgrounds if name != colour][index % 3]
        images = []
        for shape in SHAPES:
            image = pipe(
                f"{object_phrase(shape, colour)} on a plain {background} background",
                height=128,
                width=128,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed + index),
            ).images[0]
            confusion[shape][classify_shape(image, whole, colour) or "none"] += 1
            images.append(np.asarray(image, dtype=np.float64))
        word_change += [float(np.abs(other - images[0]).mean()) for other in images[1:]]
        if previous is not None:
            seed_change.append(float(np.abs(images[0] - previous).mean()))
        previous = images[0]
    return {
        "seeds": count,
        "confusion": confusion,
        "diagonal": sum(confusion[shape][shape] for shape in SHAPES) / (count * len(SHAPES)),
        "word_change": float(np.mean(word_change)),
        "seed_change": float(np.mean(seed_change)) if seed_change else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python examples/demo_world/diagnose.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--base", required=True, help="A diffusers Stable Diffusion folder (vae, unet, ...).")
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (default 1).")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="Where the models run (default cpu)."
    )
    parser.add_argument(
        "--samples", type=int, default=0, help="Also draw this many captioned images and score their colours."
    )
    parser.add_argument(
        "--redraw",
        type=int,
        default=0,
        help="Also redraw this many rendered one-object scenes from their captions at each noise strength "
        "and score whether the object keeps its shape.",
    )
    parser.add_argument(
        "--words",
        action="store_true",
        help="Also print how far apart the text encoder keeps the world's words.",
    )
    parser.add_argument(
        "--shape-words",
        type=int,
        default=0,
        help="Also draw this many seeds × the five shape words (only the word changing) and print which shape "
        "comes out for which word.",
    )
    parser.add_argument(
        "--guidance", type=float, default=5.0, help="Guidance of --samples, --redraw and --shape-words (5)."
    )
    parser.add_argument(
        "--sample-steps",
        type=int,
        default=25,
        help="DDIM steps of --samples, --redraw and --shape-words (25).",
    )
    parser.add_argument("--json", type=Path, help="Also write every figure to this JSON file.")
    args = parser.parse_args(argv)
    if (
        args.guidance < 1
        or args.sample_steps < 1
        or min(args.samples, args.redraw, args.shape_words) < 0
        or args.scenes < 1
    ):
        parser.error(
            "--guidance must be at least 1, --sample-steps and --scenes positive, --samples, --redraw and "
            "--shape-words not negative"
        )
    if not all((Path(args.base) / part).is_dir() for part in ("unet", "vae", "text_encoder", "tokenizer")):
        parser.error(
            f"--base {args.base}: not a Stable Diffusion folder (needs unet/, vae/, text_encoder/, tokenizer/)"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch has no CUDA device")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: no folder {args.json.parent}")
    torch.set_num_threads(args.threads)
    errors, variance = x0_errors(args.base, args.scenes, device=args.device)
    drawing = {"steps": args.sample_steps, "guidance": args.guidance, "device": args.device}
    figures: dict = {
        "base": str(args.base),
        "drawing": drawing,
        "latent_variance": variance,
        "x0_mse": errors,
    }
    print(f"{args.base}: latent variance {variance:.3f} (the error of predicting the mean)")
    print("| t | x0 MSE |\n| --- | --- |")
    for t, error in errors.items():
        print(f"| {t} | {error:.3f} |")
    if args.samples:
        check = figures["text_to_image"] = sample_check(args.base, args.samples, **drawing)
        print(
            f"text-to-image, {check['samples']} one-object captions (DDIM {args.sample_steps} steps, guidance "
            f"{args.guidance:g}): captioned background colour "
            f"{check['background']:.2f}, captioned object colour present {check['object']:.2f}, captioned shape "
            f"{check['shape']:.2f}"
        )
    if args.redraw:
        kept = figures["redraw"] = redraw_check(args.base, args.redraw, **drawing)
        print(
            f"redrawn from the caption, {args.redraw} one-object scenes (DDIM {args.sample_steps} steps × strength, "
            f"guidance {args.guidance:g}):"
        )
        print("| strength | object keeps its shape |\n| --- | --- |")
        for strength, share in kept.items():
            print(f"| {strength} | {share:.2f} |")
    if args.words:
        states = word_states(args.base)
        figures["words"] = {
            kind: {f"{a}/{b}": value for (a, b), value in pairs.items()} for kind, pairs in states.items()
        }
        for kind, pairs in states.items():
            closest = max(pairs, key=pairs.get)
            print(
                f"text encoder, {kind}: mean cosine of the word states {np.mean(list(pairs.values())):.3f}, "
                f"closest {closest[0]}/{closest[1]} {pairs[closest]:.3f}"
            )
        print("| shapes | " + " | ".join(f"{a}/{b}" for a, b in states["shapes"]) + " |")
        print("| --- " * (len(states["shapes"]) + 1) + "|")
        print("| cosine | " + " | ".join(f"{value:.3f}" for value in states["shapes"].values()) + " |")
    if args.shape_words:
        check = figures["shape_words"] = shape_word_check(args.base, args.shape_words, **drawing)
        print(
            f"shape words, {check['seeds']} seeds × 5 (DDIM {args.sample_steps} steps, guidance {args.guidance:g}): "
            f"classified as prompted {check['diagonal']:.2f}; mean pixel change for another shape word "
            f"{check['word_change']:.1f}, for another seed {check['seed_change']:.1f}"
        )
        names = list(next(iter(check["confusion"].values())))
        print("| prompted \\ drawn | " + " | ".join(names) + " |\n" + "| --- " * (len(names) + 1) + "|")
        for shape, row in check["confusion"].items():
            print(f"| {shape} | " + " | ".join(str(row[name]) for name in names) + " |")
    if args.json is not None:
        _write_json(args.json, figures)
    return 0


def _write_json(path: Path, figures: dict) -> None:
    """``figures`` as JSON at ``path``, written whole or not at all (NaN, as for one seed's seed change: null)."""

    def plain(value):
        if isinstance(value, dict):
            return {str(key): plain(item) for key, item in value.items()}
        if isinstance(value, float) and value != value:
            return None
        return value

    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(plain(figures), indent=2))
    partial.replace(path)


if __name__ == "__main__":
    sys.exit(main())
