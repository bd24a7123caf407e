"""Reference outputs of the original PowerPaint code on tiny random weights.

Runs the *original* implementation (open-mmlab/PowerPaint, imported from a local checkout given with
``--powerpaint-repo``) on tiny seeded random models and writes test fixtures for this project's own
re-implementation:

- the tiny models, saved in the folder/file layout the released PowerPaint v1 and v2 checkpoints use;
- pipeline-level reference outputs of both original pipelines for every task the original app exposes,
  with and without classifier-free guidance, plus the prompt strings, token ids and prompt embeddings;
- app-level records of what the original Gradio app (``app.py``) hands to the pipeline for each task
  (prompt strings, resized/blacked-out/outpainting-canvas image and mask, sizes, seed handling).

This file is our own code: it only *calls* the original classes and functions. It must run in the
throw-away environment described in ``FACTS.md`` (diffusers 0.27.0, transformers 4.28.0, ...), never in
the project's own virtualenv. Two shims are applied, both only in this process:

1. ``app.py`` imports ``gradio`` and ``controlnet_aux`` at module level (UI / ControlNet annotators, not
   used by the code paths recorded here): empty stand-in modules are put in ``sys.modules`` first.
2. For the app-level records only, ``app.py``'s ``torch.Generator("cuda")`` is mapped to a CPU generator
   (no GPU here); the recorded pipeline stand-in never draws from it.

A third, clearly labelled shim is needed because the original v2 pipeline raises a ``TypeError`` when
guidance is off (see FACTS.md, "Known bugs"): for the ``cfg_off`` v2 runs the error is recorded, and the
output is *additionally* produced with ``encode_prompt`` wrapped so that it returns only the positive
UNet embeddings (what a fixed pipeline would compute). Those runs carry ``"patched": true``.

Usage (see FACTS.md for the environment)::

    /work/scratch/pp-venv/bin/python tools/powerpaint_reference/make_fixtures.py \\
        --powerpaint-repo /work/scratch/PowerPaint
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import shutil
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]

SEED = 1234
STEPS = 4
GUIDANCE_ON = 7.5
IMAGE_SIZE = 48
TASK_TOKENS = ["P_ctxt", "P_shape", "P_obj"]  # order used by the original app.py when adding them
VECTORS_PER_TOKEN = 10  # num_vectors_per_token in every loader of the original (app.py, main branch)

# Tiny SD1.5-like UNet: same block types as SD1.5 (three cross-attention levels, one plain level), because
# the original BrushNetModel.from_unet hard-codes exactly these four block types.
TINY_UNET = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}
TINY_TEXT = {
    "vocab_size": 514,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "bos_token_id": 512,
    "eos_token_id": 513,
    "pad_token_id": 513,
}
# scheduler_config.json of runwayml/stable-diffusion-inpainting and runwayml/stable-diffusion-v1-5
PNDM_SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

USER_PROMPT = "a red ball"
USER_NEGATIVE = "ugly"

# (task id, app task name, user prompt, user negative prompt, fitting degree)
TASKS = [
    ("text-guided", "text-guided", USER_PROMPT, USER_NEGATIVE, 1.0),
    ("shape-guided_fd0.5", "shape-guided", USER_PROMPT, USER_NEGATIVE, 0.5),
    ("shape-guided_fd1.0", "shape-guided", USER_PROMPT, USER_NEGATIVE, 1.0),
    ("object-removal", "object-removal", "", "", 1.0),
    ("image-outpainting", "image-outpainting", "", "", 1.0),
]
# Not a task of the original app.py: the prompt rule of ComfyUI-BrushNet's "context aware" function
# (positive P_ctxt, empty negative task prompt), run through the original v2 pipeline.
CONTEXT_AWARE = {
    "promptA": "P_ctxt",
    "promptB": "P_ctxt",
    "negative_promptA": "",
    "negative_promptB": "",
    "promptU": " empty scene",
    "negative_promptU": "",
}


# ----------------------------------------------------------------------------------------------------
# importing the original


def import_original(repo: Path) -> types.SimpleNamespace:
    """Import the original package and app.py from a local checkout (shim 1: stub UI-only imports)."""
    sys.path.insert(0, str(repo))
    for name, attrs in {
        "gradio": {},
        "controlnet_aux": {"HEDdetector": object, "OpenposeDetector": object},
    }.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
    app = importlib.import_module("app")
    from powerpaint.models.BrushNet_CA import BrushNetModel
    from powerpaint.models.unet_2d_condition import UNet2DConditionModel as ForkUNet
    from powerpaint.pipelines.pipeline_PowerPaint import StableDiffusionInpaintPipeline
    from powerpaint.pipelines.pipeline_PowerPaint_Brushnet_CA import StableDiffusionPowerPaintBrushNetPipeline
    from powerpaint.utils.utils import TokenizerWrapper, add_tokens

    return types.SimpleNamespace(
        app=app,
        BrushNetModel=BrushNetModel,
        ForkUNet=ForkUNet,
        V1Pipeline=StableDiffusionInpaintPipeline,
        V2Pipeline=StableDiffusionPowerPaintBrushNetPipeline,
        TokenizerWrapper=TokenizerWrapper,
        add_tokens=add_tokens,
    )


# ----------------------------------------------------------------------------------------------------
# tiny models


def perturb_(module: torch.nn.Module, seed: int, rel: float = 0.5, floor: float = 0.05) -> None:
    """Add seeded Gaussian noise to every parameter (zero-initialised ones included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in module.named_parameters():
            std = float(param.std()) if param.numel() > 1 else 0.0
            param.add_(torch.randn(param.shape, generator=generator) * max(rel * std, floor))


def make_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE)
    perturb_(vae, seed + 1)
    with torch.no_grad():
        # posterior log-variance fixed at -30 (std ~3e-7): encoding is deterministic whatever RNG it draws from
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -30.0
        # keep decoded values mostly inside [-1, 1] so the final clamp does not hide differences
        vae.decoder.conv_out.weight.mul_(0.6)
        vae.decoder.conv_out.bias.mul_(0.6)
    return vae.eval()


def make_text_encoder(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    perturb_(model, seed + 1)
    return model.eval()


def set_task_vectors_(text_encoder, seed: int, scale: float = 0.5) -> dict:
    """Give each task token its own distinct random vectors; returns {token: (10, hidden)}."""
    layer = text_encoder.text_model.embeddings.token_embedding
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in TASK_TOKENS:
            vectors = layer.trainable_embeddings[name]
            vectors.copy_(torch.randn(vectors.shape, generator=generator) * scale)
    return {name: layer.trainable_embeddings[name].detach().clone() for name in TASK_TOKENS}


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def model_index(pipeline_class: str) -> dict:
    import diffusers

    return {
        "_class_name": pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_config_only(model, folder: Path) -> None:
    """Write only config.json (weights that the original loader overwrites completely are not shipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_config"):
        model.save_config(folder)
    else:  # transformers model
        model.config.save_pretrained(folder)


def wrap_with_task_tokens(orig, text_encoder, tokenizer_dir: Path):
    """Apply the original add_tokens to a text encoder (as app.py does), with the original tokenizer wrapper."""
    tokenizer = orig.TokenizerWrapper(from_pretrained=str(tokenizer_dir))
    orig.add_tokens(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        placeholder_tokens=list(TASK_TOKENS),
        initialize_tokens=["a", "a", "a"],
        num_vectors_per_token=VECTORS_PER_TOKEN,
    )
    return tokenizer


def build_and_save_models(orig, out: Path, tokenizer_src: Path) -> dict:
    """Build the tiny seeded models and save them in the released layouts. Returns facts for the JSON."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_model

    facts = {}

    def copy_tokenizer(dst: Path):
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer_src / name, dst / name)

    # ---------------- v1: checkpoint_dir = ppt-v1 (JunhaoZhuang/PowerPaint-v1), base = SD-inpainting
    v1_base = out / "v1" / "stable-diffusion-inpainting"
    v1_ckpt = out / "v1" / "ppt-v1"
    write_json(v1_base / "model_index.json", model_index("StableDiffusionInpaintPipeline"))
    write_json(v1_base / "scheduler" / "scheduler_config.json", PNDM_SD15)
    copy_tokenizer(v1_base / "tokenizer")
    make_vae(100).save_pretrained(v1_base / "vae")

    torch.manual_seed(110)
    v1_unet = UNet2DConditionModel(**{**TINY_UNET, "in_channels": 9})
    perturb_(v1_unet, 111)
    save_config_only(v1_unet, v1_base / "unet")  # base weights are fully overwritten by unet.safetensors
    (v1_ckpt / "unet").mkdir(parents=True, exist_ok=True)
    save_model(v1_unet, str(v1_ckpt / "unet" / "unet.safetensors"))

    v1_text = make_text_encoder(120)
    save_config_only(v1_text, v1_base / "text_encoder")
    wrap_with_task_tokens(orig, v1_text, v1_base / "tokenizer")
    facts["v1_task_vectors"] = set_task_vectors_(v1_text, 121)
    (v1_ckpt / "text_encoder").mkdir(parents=True, exist_ok=True)
    save_model(v1_text, str(v1_ckpt / "text_encoder" / "text_encoder.safetensors"))

    # ---------------- v2: checkpoint_dir = ppt-v2 (JunhaoZhuang/PowerPaint_v2 or PowerPaint-v2-1)
    sd15 = out / "v2" / "stable-diffusion-v1-5"  # stands for runwayml/stable-diffusion-v1-5 (configs only)
    v2_ckpt = out / "v2" / "ppt-v2"
    rv = v2_ckpt / "realisticVisionV60B1_v51VAE"
    write_json(rv / "model_index.json", model_index("StableDiffusionPipeline"))
    write_json(rv / "scheduler" / "scheduler_config.json", PNDM_SD15)
    copy_tokenizer(rv / "tokenizer")
    make_vae(200).save_pretrained(rv / "vae")
    torch.manual_seed(210)
    rv_unet = UNet2DConditionModel(**TINY_UNET)
    perturb_(rv_unet, 211)
    rv_unet.save_pretrained(rv / "unet")
    rv_text = make_text_encoder(220)
    rv_text.save_pretrained(rv / "text_encoder", safe_serialization=True)

    torch.manual_seed(230)
    sd15_unet = orig.ForkUNet(**TINY_UNET)
    save_config_only(sd15_unet, sd15 / "unet")
    brushnet = orig.BrushNetModel.from_unet(sd15_unet)
    perturb_(brushnet, 231)
    with torch.no_grad():
        # the zero-initialised taps and the mask channel of the input conv: clearly non-zero, so that the
        # branch (and the text it reads through its cross-attention) moves the output visibly
        generator = torch.Generator().manual_seed(232)
        taps = [*brushnet.brushnet_down_blocks, brushnet.brushnet_mid_block, *brushnet.brushnet_up_blocks]
        for tap in taps:
            tap.weight.add_(torch.randn(tap.weight.shape, generator=generator) * 0.3)
        mask_weight = brushnet.conv_in_condition.weight[:, 8]
        mask_weight.add_(torch.randn(mask_weight.shape, generator=generator) * 0.2)
    brushnet.save_pretrained(v2_ckpt / "PowerPaint_Brushnet")

    branch_text = make_text_encoder(240)
    save_config_only(branch_text, sd15 / "text_encoder")
    wrap_with_task_tokens(orig, branch_text, rv / "tokenizer")
    facts["v2_task_vectors"] = set_task_vectors_(branch_text, 241)
    torch.save(
        {k: v.contiguous() for k, v in branch_text.state_dict().items()},
        v2_ckpt / "PowerPaint_Brushnet" / "pytorch_model.bin",
    )
    return facts


# ----------------------------------------------------------------------------------------------------
# loading the tiny models the way app.py loads the released ones


def load_v1(orig, out: Path) -> dict:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_model
    from transformers import CLIPTextConfig, CLIPTextModel

    base = out / "v1" / "stable-diffusion-inpainting"
    ckpt = out / "v1" / "ppt-v1"
    torch.manual_seed(0)  # skeleton values are irrelevant: both are overwritten by strict loads below
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(base / "text_encoder"))
    pipe = orig.V1Pipeline.from_pretrained(
        str(base),
        unet=unet,
        text_encoder=text_encoder,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        torch_dtype=torch.float32,
        local_files_only=True,
    )
    pipe.tokenizer = orig.TokenizerWrapper(
        from_pretrained=str(base), subfolder="tokenizer", revision=None, local_files_only=True
    )
    orig.add_tokens(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        placeholder_tokens=list(TASK_TOKENS),
        initialize_tokens=["a", "a", "a"],
        num_vectors_per_token=VECTORS_PER_TOKEN,
    )
    load_model(pipe.unet, str(ckpt / "unet" / "unet.safetensors"))  # strict
    load_model(pipe.text_encoder, str(ckpt / "text_encoder" / "text_encoder.safetensors"))  # strict
    pipe.set_progress_bar_config(disable=True)
    return {"pipe": pipe, "load_report": {"unet": "strict ok", "text_encoder": "strict ok"}}


def load_v2(orig, out: Path) -> dict:
    from diffusers import UniPCMultistepScheduler
    from safetensors.torch import load_model
    from transformers import CLIPTextConfig, CLIPTextModel

    sd15 = out / "v2" / "stable-diffusion-v1-5"
    ckpt = out / "v2" / "ppt-v2"
    rv = ckpt / "realisticVisionV60B1_v51VAE"
    torch.manual_seed(0)  # skeleton values are irrelevant: overwritten by the loads below
    unet_sd15 = orig.ForkUNet.from_config(orig.ForkUNet.load_config(sd15 / "unet"))
    text_encoder_brushnet = CLIPTextModel(CLIPTextConfig.from_pretrained(sd15 / "text_encoder"))
    brushnet = orig.BrushNetModel.from_unet(unet_sd15)
    pipe = orig.V2Pipeline.from_pretrained(
        str(rv),
        brushnet=brushnet,
        text_encoder_brushnet=text_encoder_brushnet,
        torch_dtype=torch.float32,
        low_cpu_mem_usage=False,
        safety_checker=None,
        local_files_only=True,
    )
    pipe.unet = orig.ForkUNet.from_pretrained(
        str(rv), subfolder="unet", revision=None, torch_dtype=torch.float32, local_files_only=True
    )
    pipe.tokenizer = orig.TokenizerWrapper(
        from_pretrained=str(rv),
        subfolder="tokenizer",
        revision=None,
        torch_type=torch.float32,
        local_files_only=True,
    )
    orig.add_tokens(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder_brushnet,
        placeholder_tokens=list(TASK_TOKENS),
        initialize_tokens=["a", "a", "a"],
        num_vectors_per_token=VECTORS_PER_TOKEN,
    )
    load_model(pipe.brushnet, str(ckpt / "PowerPaint_Brushnet" / "diffusion_pytorch_model.safetensors"))
    result = pipe.text_encoder_brushnet.load_state_dict(
        torch.load(ckpt / "PowerPaint_Brushnet" / "pytorch_model.bin"), strict=False
    )
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return {
        "pipe": pipe,
        "load_report": {
            "brushnet": "strict ok",
            "text_encoder_brushnet_missing_keys": list(result.missing_keys),
            "text_encoder_brushnet_unexpected_keys": list(result.unexpected_keys),
        },
    }


# ----------------------------------------------------------------------------------------------------
# inputs


def make_inputs(out: Path) -> dict:
    """48x48 scene + hole mask, and an outpainting canvas built with app.py's rule at small scale."""
    size = IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    image = np.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.8 - 0.5 * xx * yy], axis=-1)
    image[(yy > 0.12) & (yy < 0.46) & (xx > 0.56) & (xx < 0.9)] = [0.9, 0.15, 0.1]  # red square
    image[((yy - 0.7) ** 2 + (xx - 0.3) ** 2) < 0.03] = [0.1, 0.2, 0.85]  # blue disc
    image = (image * 255).round().astype(np.uint8)
    mask = np.zeros((size, size, 3), np.uint8)
    mask[size * 5 // 16 : size * 11 // 16, size // 4 : size * 3 // 4] = 255  # white = region to generate

    # outpainting canvas: original content (2/3 of the side) centred on the canvas (expansion 1.5 both
    # ways), canvas filled with 127, mask 255 except the original area shrunk by app.py's 10-px gap
    side = size * 2 // 3
    content = np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC))
    canvas = np.full((size, size, 3), 127, np.uint8)
    offset = (size - side) // 2
    canvas[offset : offset + side, offset : offset + side] = content
    out_mask = np.full((size, size, 3), 255, np.uint8)
    gap = 10
    out_mask[offset + gap : offset + side - gap, offset + gap : offset + side - gap] = 0

    files = {
        "image.png": image,
        "mask.png": mask,
        "outpaint_image.png": canvas,
        "outpaint_mask.png": out_mask,
    }
    for name, array in files.items():
        Image.fromarray(array).save(out / name)
    # what app.py hands to the v2 pipeline: image * (1 - mask/255), truncated to uint8
    for src, msk, name in (
        ("image.png", "mask.png", "v2_masked_image.png"),
        ("outpaint_image.png", "outpaint_mask.png", "v2_masked_outpaint_image.png"),
    ):
        blacked = (files[src] * (1 - files[msk] / 255.0)).astype(np.uint8)
        Image.fromarray(blacked).save(out / name)
    return {
        "inpaint": (
            Image.open(out / "image.png").convert("RGB"),
            Image.open(out / "mask.png").convert("RGB"),
        ),
        "outpaint": (
            Image.open(out / "outpaint_image.png").convert("RGB"),
            Image.open(out / "outpaint_mask.png").convert("RGB"),
        ),
        "v2_inpaint_image": Image.open(out / "v2_masked_image.png").convert("RGB"),
        "v2_outpaint_image": Image.open(out / "v2_masked_outpaint_image.png").convert("RGB"),
    }


# ----------------------------------------------------------------------------------------------------
# app-level records: what app.py passes to the pipeline


class RecordingPipe:
    """Stands in for the pipeline inside app.py; records the call and returns a flat image."""

    def __init__(self):
        self.calls = []
        self.returned = None

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        self.returned = Image.new("RGB", (kwargs["width"], kwargs["height"]), (10, 200, 30))
        return types.SimpleNamespace(images=[self.returned])


class _CpuGeneratorTorch(types.ModuleType):
    """Shim 2: torch, except that Generator('cuda') gives a CPU generator (app.py hard-codes cuda)."""

    def __init__(self):
        super().__init__("torch_cpu_generator_proxy")
        self.requested_devices = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def Generator(self, device="cpu"):  # noqa: N802 - mirrors torch.Generator
        self.requested_devices.append(str(device))
        return torch.Generator("cpu")


def png_record(image: Image.Image, folder: Path, stem: str, seen: dict) -> dict:
    array = np.asarray(image)
    digest = hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()
    if digest not in seen:
        name = f"{stem}_{len(seen):02d}.png"
        image.save(folder / name)
        seen[digest] = name
    return {"file": seen[digest], "sha256_of_array": digest, "mode": image.mode, "size_wh": list(image.size)}


def record_app(orig, out: Path) -> dict:
    """Call the original app's PowerPaintController.infer with a recording pipeline for every task."""
    app = orig.app
    folder = out / "app_level"
    folder.mkdir(parents=True, exist_ok=True)
    # 37x23 landscape input: exercises the aspect-ratio resize and the crop-to-multiple-of-8
    rgb = np.zeros((23, 37, 3), np.uint8)
    rgb[:] = (40, 90, 160)
    rgb[4:14, 20:33] = (220, 40, 30)
    rgb[15:21, 3:12] = (240, 220, 60)
    msk = np.zeros((23, 37, 3), np.uint8)
    msk[3:15, 18:35] = 255
    Image.fromarray(rgb).save(folder / "input_image.png")
    Image.fromarray(msk).save(folder / "input_mask.png")

    scenarios = []
    for task_id, task, prompt, negative, fitting in TASKS:
        if task == "image-outpainting":
            for h_ratio, v_ratio in ((1.5, 1.0), (1.0, 1.5), (1.25, 1.25), (1.0, 1.0)):
                scenarios.append(
                    (f"{task_id}_h{h_ratio}_v{v_ratio}", task, prompt, negative, fitting, h_ratio, v_ratio)
                )
        else:
            scenarios.append((task_id, task, prompt, negative, fitting, None, None))

    proxy = _CpuGeneratorTorch()
    real_torch = app.torch
    records, seen = [], {}
    try:
        app.torch = proxy
        for version in ("ppt-v1", "ppt-v2"):
            for name, task, prompt, negative, fitting, h_ratio, v_ratio in scenarios:
                controller = object.__new__(app.PowerPaintController)
                controller.version = version
                controller.pipe = RecordingPipe()
                proxy.requested_devices.clear()
                user_input = {
                    "image": Image.open(folder / "input_image.png"),
                    "mask": Image.open(folder / "input_mask.png"),
                }
                fields = {  # every prompt box filled with the same text; infer picks the task's own boxes
                    "text_guided_prompt": prompt,
                    "text_guided_negative_prompt": negative,
                    "shape_guided_prompt": prompt,
                    "shape_guided_negative_prompt": negative,
                    "outpaint_prompt": prompt,
                    "outpaint_negative_prompt": negative,
                    "removal_prompt": prompt,
                    "removal_negative_prompt": negative,
                }
                dict_out, dict_res = controller.infer(
                    user_input,
                    fields["text_guided_prompt"],
                    fields["text_guided_negative_prompt"],
                    fields["shape_guided_prompt"],
                    fields["shape_guided_negative_prompt"],
                    fitting,
                    45,  # app default steps
                    GUIDANCE_ON,
                    SEED,
                    task,
                    v_ratio,
                    h_ratio,
                    fields["outpaint_prompt"],
                    fields["outpaint_negative_prompt"],
                    fields["removal_prompt"],
                    fields["removal_negative_prompt"],
                )
                (call,) = controller.pipe.calls
                global_seed_after = torch.initial_seed()
                entry = {
                    "id": f"{version}.{name}",
                    "version": version,
                    "task": task,
                    "user_prompt": prompt,
                    "user_negative_prompt": negative,
                    "fitting_degree": fitting,
                    "horizontal_expansion_ratio": h_ratio,
                    "vertical_expansion_ratio": v_ratio,
                    "steps": 45,
                    "guidance_scale": GUIDANCE_ON,
                    "seed": SEED,
                    "global_torch_seed_after_call": global_seed_after,
                    "generator_devices_requested": list(proxy.requested_devices),
                    "pipeline_kwargs": {},
                    "returned_image_is_pipeline_output_unchanged": dict_out[0] is controller.pipe.returned,
                    "returned_gallery_len": len(dict_out),
                }
                for key, value in sorted(call.items()):
                    if key in ("image", "mask"):
                        entry["pipeline_kwargs"][key] = png_record(value, folder, key, seen)
                    elif key == "generator":
                        entry["pipeline_kwargs"][key] = {
                            "type": type(value).__name__,
                            "initial_seed": value.initial_seed(),
                        }
                    else:
                        entry["pipeline_kwargs"][key] = value
                # second gallery of the UI: the mask as passed to the pipeline (plus a red overlay, not kept)
                entry["returned_mask_image"] = png_record(dict_res[0], folder, "mask", seen)
                records.append(entry)
    finally:
        app.torch = real_torch
    return {
        "input_image": "app_level/input_image.png",
        "input_mask": "app_level/input_mask.png",
        "how": "app.PowerPaintController.infer(...) called with a recording stand-in for self.pipe "
        "(the real pipeline is not run at this size); image/mask files are the exact PIL images app.py "
        "passed to the pipeline, stored as PNG (lossless).",
        "records": records,
    }


# ----------------------------------------------------------------------------------------------------
# pipeline-level runs


class FirstCallCapture:
    """Forward pre-hook that keeps the keyword tensors (and the sample) of a module's first call."""

    def __init__(self, module, keys):
        self.keys = keys
        self.value = None
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.value is None:
            self.value = {k: kwargs[k].detach().clone() for k in self.keys if torch.is_tensor(kwargs.get(k))}
            self.value["sample"] = (args[0] if args else kwargs["sample"]).detach().clone()

    def close(self):
        self.handle.remove()


@contextlib.contextmanager
def positive_only_encode_prompt(pipe):
    """Shim 3 (v2, guidance off only): original encode_prompt concatenates None with a tensor and raises.

    The wrapper asks the original for both halves and returns the positive one, which is what the UNet
    receives once that concatenation is guarded by `if do_classifier_free_guidance`.
    """
    original = pipe.encode_prompt

    def wrapped(prompt, device, num_images_per_prompt, do_classifier_free_guidance, *args, **kwargs):
        embeds = original(prompt, device, num_images_per_prompt, True, *args, **kwargs)
        return embeds if do_classifier_free_guidance else embeds.chunk(2)[1]

    pipe.encode_prompt = wrapped
    try:
        yield
    finally:
        del pipe.encode_prompt


def app_prompts(app_records: dict, version: str, task_id: str) -> dict:
    """The exact prompt kwargs app.py passed to the pipeline for this task (from the app-level records).

    Outpainting prompts do not depend on the expansion ratios; the 1.25 x 1.25 record is used.
    """
    record_id = f"{version}.{task_id}" + ("_h1.25_v1.25" if task_id == "image-outpainting" else "")
    (record,) = [r for r in app_records["records"] if r["id"] == record_id]
    keys = ["promptA", "promptB", "negative_promptA", "negative_promptB", "tradoff", "tradoff_nag"]
    if version == "ppt-v2":
        keys += ["promptU", "negative_promptU"]
    return {k: record["pipeline_kwargs"][k] for k in keys}


def token_ids(tokenizer, text: str) -> list:
    return [int(i) for i in tokenizer(text).input_ids]


def run_all(pipes: dict, inputs: dict, app_records: dict) -> tuple[dict, list]:
    """Run every (version, task, guidance) through the original pipelines. Returns tensors and run records."""
    tensors, runs = {}, []
    for version, pipe in (("ppt-v1", pipes["v1"]), ("ppt-v2", pipes["v2"])):
        short = "v1" if version == "ppt-v1" else "v2"
        task_list = [(t[0], t[1], t[4]) for t in TASKS]
        if version == "ppt-v2":
            task_list.append(("context-aware", "context-aware", 1.0))
        for task_id, task, fitting in task_list:
            if task_id == "context-aware":
                prompts = {**CONTEXT_AWARE, "tradoff": fitting, "tradoff_nag": fitting}
                origin = "not in original app.py; ComfyUI-BrushNet 'context aware' rule, original v2 pipeline"
            else:
                prompts = app_prompts(app_records, version, task_id)
                origin = "original app.py (prompt kwargs recorded from PowerPaintController.infer)"
            outpaint = task == "image-outpainting"
            image, mask = inputs["outpaint" if outpaint else "inpaint"]
            if version == "ppt-v2":
                image = inputs["v2_outpaint_image" if outpaint else "v2_inpaint_image"]
            for cfg_name, guidance in (("cfg_on", GUIDANCE_ON), ("cfg_off", 1.0)):
                run_id = f"{short}.{task_id}.{cfg_name}"
                record = {
                    "id": run_id,
                    "version": version,
                    "task": task,
                    "task_origin": origin,
                    "guidance_scale": guidance,
                    "num_inference_steps": STEPS,
                    "fitting_degree": fitting,
                    "seed": SEED,
                    "image": "outpaint_image.png" if outpaint else "image.png",
                    "mask": "outpaint_mask.png" if outpaint else "mask.png",
                    "image_passed_to_pipeline": (
                        ("v2_masked_outpaint_image.png" if outpaint else "v2_masked_image.png")
                        if version == "ppt-v2"
                        else ("outpaint_image.png" if outpaint else "image.png")
                    ),
                    "prompts": prompts,
                    "token_ids": {
                        k: token_ids(pipe.tokenizer, v) for k, v in prompts.items() if isinstance(v, str)
                    },
                    "patched": False,
                }
                kwargs = dict(
                    image=image,
                    mask=mask,
                    width=IMAGE_SIZE,
                    height=IMAGE_SIZE,
                    guidance_scale=guidance,
                    num_inference_steps=STEPS,
                    generator=torch.Generator("cpu").manual_seed(SEED),
                    output_type="np",
                    **prompts,
                )
                if version == "ppt-v2":
                    kwargs["brushnet_conditioning_scale"] = 1.0
                captures = {"unet": FirstCallCapture(pipe.unet, ["encoder_hidden_states"])}
                if version == "ppt-v2":
                    captures["brushnet"] = FirstCallCapture(
                        pipe.brushnet, ["encoder_hidden_states", "brushnet_cond"]
                    )
                try:
                    torch.manual_seed(SEED)  # app.py's set_seed(seed) before every call
                    try:
                        images = pipe(**kwargs).images
                    except TypeError as error:
                        if version != "ppt-v2" or guidance > 1.0:
                            raise
                        record["original_error"] = f"TypeError: {error}"
                        record["patched"] = True
                        for capture in captures.values():
                            capture.value = None
                        kwargs["generator"] = torch.Generator("cpu").manual_seed(SEED)
                        torch.manual_seed(SEED)
                        with positive_only_encode_prompt(pipe):
                            images = pipe(**kwargs).images
                finally:
                    for capture in captures.values():
                        capture.close()
                output = torch.from_numpy(np.ascontiguousarray(images[0])).float()
                assert torch.isfinite(output).all(), run_id
                tensors[f"out.{run_id}"] = output
                record["output_key"] = f"out.{run_id}"
                record["output_shape"] = list(output.shape)
                record["output_stats"] = {
                    "mean": float(output.mean()),
                    "std": float(output.std()),
                    "fraction_clamped": float(((output <= 0) | (output >= 1)).float().mean()),
                }
                emb_prefix = f"emb.{short}.{task_id}"
                unet_emb = captures["unet"].value["encoder_hidden_states"]
                if cfg_name == "cfg_on":
                    tensors[f"{emb_prefix}.unet"] = unet_emb
                    if version == "ppt-v2":
                        branch = captures["brushnet"].value["encoder_hidden_states"]
                        tensors[f"{emb_prefix}.brushnet"] = branch
                else:  # guidance off: the positive halves of the cfg_on embeddings, checked here
                    record["unet_embeds_equal_positive_half_of_cfg_on_max_abs_diff"] = float(
                        (unet_emb - tensors[f"{emb_prefix}.unet"][1:]).abs().max()
                    )
                    if version == "ppt-v2":
                        branch = captures["brushnet"].value["encoder_hidden_states"]
                        record["brushnet_embeds_equal_positive_half_of_cfg_on_max_abs_diff"] = float(
                            (branch - tensors[f"{emb_prefix}.brushnet"][1:]).abs().max()
                        )
                record["embeddings"] = {
                    "unet_encoder_hidden_states": f"{emb_prefix}.unet"
                    + ("" if cfg_name == "cfg_on" else " [1:] (positive half)"),
                }
                if version == "ppt-v2":
                    record["embeddings"]["brushnet_encoder_hidden_states"] = f"{emb_prefix}.brushnet" + (
                        "" if cfg_name == "cfg_on" else " [1:] (positive half)"
                    )
                # conditioning inputs, once per (version, image)
                cond_key = f"in.{short}.{'outpaint' if outpaint else 'inpaint'}"
                if cfg_name == "cfg_on" and f"{cond_key}.cond" not in tensors:
                    # v1: channels 4:9 of the UNet input = mask (1) + masked-image latent (4);
                    # v2: the branch's conditioning = masked-image latent (4) + keep-mask (1)
                    if version == "ppt-v1":
                        tensors[f"{cond_key}.cond"] = captures["unet"].value["sample"][:1, 4:]
                    else:
                        tensors[f"{cond_key}.cond"] = captures["brushnet"].value["brushnet_cond"][:1]
                record["conditioning"] = f"{cond_key}.cond"
                runs.append(record)
    return tensors, runs


def sensitivity(pipes: dict, inputs: dict, app_records: dict, tensors: dict) -> dict:
    """How much the v2 output moves when the branch is switched off (a wrong routing must show up)."""
    pipe = pipes["v2"]
    prompts = app_prompts(app_records, "ppt-v2", "text-guided")
    torch.manual_seed(SEED)
    images = pipe(
        image=inputs["v2_inpaint_image"],
        mask=inputs["inpaint"][1],
        width=IMAGE_SIZE,
        height=IMAGE_SIZE,
        guidance_scale=GUIDANCE_ON,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        brushnet_conditioning_scale=0.0,
        **prompts,
    ).images
    off = torch.from_numpy(np.ascontiguousarray(images[0])).float()
    branch_effect = float((off - tensors["out.v2.text-guided.cfg_on"]).abs().max())
    result = {"v2.text-guided.cfg_on: brushnet_conditioning_scale 0 vs 1, max abs diff": branch_effect}
    pairs = [
        ("out.v1.shape-guided_fd0.5.cfg_on", "out.v1.shape-guided_fd1.0.cfg_on"),
        ("out.v2.shape-guided_fd0.5.cfg_on", "out.v2.shape-guided_fd1.0.cfg_on"),
        ("out.v1.text-guided.cfg_on", "out.v1.text-guided.cfg_off"),
        ("out.v2.text-guided.cfg_on", "out.v2.object-removal.cfg_on"),
        ("out.v2.object-removal.cfg_on", "out.v2.context-aware.cfg_on"),
    ]
    for a, b in pairs:
        result[f"{a} vs {b}, max abs diff"] = float((tensors[a] - tensors[b]).abs().max())
    return result


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--powerpaint-repo", type=Path, required=True, help="checkout of open-mmlab/PowerPaint"
    )
    parser.add_argument("--powerpaint-commit", default="5b4c3d52291709fcec2a1870d987da693fd3549c")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests" / "fixtures" / "powerpaint")
    parser.add_argument(
        "--tokenizer", type=Path, default=REPO_ROOT / "src" / "brushnet" / "assets" / "tiny_tokenizer"
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    orig = import_original(args.powerpaint_repo.resolve())
    out = args.out.resolve()
    for sub in ("v1", "v2", "app_level"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    model_facts = build_and_save_models(orig, out, args.tokenizer)
    inputs = make_inputs(out)
    app_records = record_app(orig, out)
    write_json(out / "app_level.json", app_records)

    loaded = {"v1": load_v1(orig, out), "v2": load_v2(orig, out)}
    pipes = {k: v["pipe"] for k, v in loaded.items()}
    tensors, runs = run_all(pipes, inputs, app_records)

    # determinism: load everything again from disk into fresh objects and rerun every case
    reloaded = {"v1": load_v1(orig, out)["pipe"], "v2": load_v2(orig, out)["pipe"]}
    tensors2, _ = run_all(reloaded, inputs, app_records)
    diffs = {k: float((tensors[k] - tensors2[k]).abs().max()) for k in tensors}
    for record in runs:
        record["rerun_from_disk_max_abs_diff"] = diffs[record["output_key"]]

    v1_tok, v2_tok = pipes["v1"].tokenizer, pipes["v2"].tokenizer
    token_table = {
        name: {
            "expanded_to": v1_tok.token_map[name],
            "ids": [v1_tok.wrapped.convert_tokens_to_ids(t) for t in v1_tok.token_map[name]],
        }
        for name in TASK_TOKENS
    }
    assert token_table == {
        name: {
            "expanded_to": v2_tok.token_map[name],
            "ids": [v2_tok.wrapped.convert_tokens_to_ids(t) for t in v2_tok.token_map[name]],
        }
        for name in TASK_TOKENS
    }
    for short in ("v1", "v2"):
        for name, vectors in model_facts[f"{short}_task_vectors"].items():
            tensors[f"task_vectors.{short}.{name}"] = vectors

    import diffusers
    import safetensors
    import transformers
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in sorted(tensors.items())}, str(out / "pipeline_level.safetensors")
    )

    def plain_config(scheduler) -> dict:  # "_use_default_values" comes from a set: sort it for stable output
        return {k: sorted(v) if k == "_use_default_values" else v for k, v in scheduler.config.items()}

    scheduler_v1 = plain_config(pipes["v1"].scheduler)
    scheduler_v2 = plain_config(pipes["v2"].scheduler)
    meta = {
        "generated_by": "tools/powerpaint_reference/make_fixtures.py",
        "original": {
            "repository": "open-mmlab/PowerPaint",
            "commit": args.powerpaint_commit,
            "branch": "main",
            "versions": {
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "safetensors": safetensors.__version__,
                "numpy": np.__version__,
            },
            "shims": [
                "gradio and controlnet_aux replaced by empty modules before importing app.py (UI/annotator only)",
                "app-level records only: app.py's torch.Generator('cuda') mapped to a CPU generator",
                "v2 cfg_off runs: original raises TypeError in encode_prompt; output produced with encode_prompt "
                "returning only the positive UNet embeddings (records with patched=true)",
            ],
        },
        "models": {
            "layout": "see README.md in this folder",
            "unet_config": TINY_UNET,
            "vae_config": TINY_VAE,
            "text_encoder_config": TINY_TEXT,
            "vae_note": "posterior log-variance fixed at -30 (quant_conv rows 4:8 zero, bias -30): encoding is "
            "deterministic to ~3e-7 whatever generator the sample draws from",
            "task_tokens": TASK_TOKENS,
            "vectors_per_token": VECTORS_PER_TOKEN,
            "token_table": token_table,
            "task_vectors_keys": "task_vectors.{v1,v2}.{P_ctxt,P_shape,P_obj} in pipeline_level.safetensors",
            "load_report": {k: v["load_report"] for k, v in loaded.items()},
        },
        "scheduler": {
            "v1": {"class": type(pipes["v1"].scheduler).__name__, "config": scheduler_v1},
            "v2": {
                "class": type(pipes["v2"].scheduler).__name__,
                "config": scheduler_v2,
                "how": "UniPCMultistepScheduler.from_config(<PNDM config of the base folder>) as app.py does; "
                "diffusers 0.27 UniPC has no final_sigmas_type (behaves as 'sigma_min')",
            },
        },
        "seed": {
            "generator": "torch.Generator('cpu').manual_seed(1234) passed as generator=; torch.manual_seed(1234) "
            "called before every pipeline call (app.py's set_seed)",
            "v1_app_note": "app.py passes no generator to the v1 pipeline (global RNG after set_seed); on CPU that "
            "draws the same numbers as the CPU generator used here",
            "v2_app_note": "app.py passes torch.Generator('cuda').manual_seed(seed); the VAE sample of the masked "
            "image uses the global RNG (no generator) - irrelevant here (fixed log-variance)",
        },
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "latent": IMAGE_SIZE // 2},
        "inputs": {
            "image.png/mask.png": "48x48 RGB; mask white (255) = region to generate, passed as RGB",
            "outpaint_image.png/outpaint_mask.png": "canvas built with app.py's outpainting rule at small scale: "
            "32x32 original (bicubic resize of image.png) centred on 48x48 (expansion 1.5 both ways), fill 127, "
            "mask 255 except the original area shrunk by a 10-px gap on every expanded side",
            "v1": "image and mask passed unchanged (the v1 pipeline blacks the hole out itself)",
            "v2": "image passed as uint8(image * (1 - mask/255)) = v2_masked_*.png (done by app.py), mask as RGB",
        },
        "runs": runs,
        "sensitivity": sensitivity(pipes, inputs, app_records, tensors),
        "tolerance_hint": "a faithful re-implementation should match every output to ~1e-4 (rerun here: "
        + f"{max(diffs.values()):.1e})",
    }
    write_json(out / "pipeline_level.json", meta)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(
        f"wrote {out} ({total / 1e6:.2f} MB), {len(runs)} runs, rerun max abs diff {max(diffs.values()):.2e}"
    )


if __name__ == "__main__":
    main()
