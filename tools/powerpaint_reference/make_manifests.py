"""Key manifests (every state-dict key and shape) of the released PowerPaint weight files.

Instantiates the *original* classes (open-mmlab/PowerPaint, imported from ``--powerpaint-repo``) with the
released configurations on the meta device (no weights, no downloads) and writes, per released file, the
state dict the original loader expects, one ``key [shape]`` per line in state-dict order. Which manifests
are certain and which inferred is written to ``manifests/README.md`` (and FACTS.md).

Run in the throw-away environment of FACTS.md (diffusers 0.27.0, transformers 4.28.0)::

    /work/scratch/pp-venv/bin/python tools/powerpaint_reference/make_manifests.py \\
        --powerpaint-repo /work/scratch/PowerPaint
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
TASK_TOKENS = ["P_ctxt", "P_shape", "P_obj"]

# runwayml/stable-diffusion-v1-5 unet/config.json (RealisticVision V6.0 B1 uses the same architecture)
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
}
CLIP_L_TEXT = {  # openai/clip-vit-large-patch14 text tower, as in every SD1.5 text_encoder/config.json
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def import_original(repo: Path) -> types.SimpleNamespace:
    sys.path.insert(0, str(repo))
    from powerpaint.models.BrushNet_CA import BrushNetModel
    from powerpaint.models.unet_2d_condition import UNet2DConditionModel as ForkUNet
    from powerpaint.utils.utils import TokenizerWrapper, add_tokens

    return types.SimpleNamespace(
        BrushNetModel=BrushNetModel,
        ForkUNet=ForkUNet,
        TokenizerWrapper=TokenizerWrapper,
        add_tokens=add_tokens,
    )


def write_manifest(path: Path, module: torch.nn.Module) -> dict:
    state = module.state_dict()
    lines = [f"{key} {list(tensor.shape)}" for key, tensor in state.items()]
    path.write_text("\n".join(lines) + "\n")
    return {"tensors": len(state), "elements": int(sum(t.numel() for t in state.values()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--powerpaint-repo", type=Path, required=True)
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "tests" / "fixtures" / "powerpaint" / "manifests"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=REPO_ROOT / "src" / "brushnet" / "assets" / "tiny_tokenizer",
        help="any CLIP tokenizer: add_tokens needs one to register the names; ids do not affect the keys",
    )
    parser.add_argument(
        "--reference-config",
        type=Path,
        default=Path("/work/shared/reference/configs/powerpaint_v2_brushnet_config.json"),
    )
    args = parser.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    orig = import_original(args.powerpaint_repo.resolve())
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    def task_token_text_encoder(vocab_size: int = 49408):
        model = CLIPTextModel(CLIPTextConfig(**{**CLIP_L_TEXT, "vocab_size": vocab_size}))
        orig.add_tokens(
            tokenizer=orig.TokenizerWrapper(from_pretrained=str(args.tokenizer)),
            text_encoder=model,
            placeholder_tokens=list(TASK_TOKENS),
            initialize_tokens=["a", "a", "a"],
            num_vectors_per_token=10,
        )
        return model

    counts = {}
    with torch.device("meta"):
        # v1 (JunhaoZhuang/PowerPaint-v1): unet/unet.safetensors and text_encoder/text_encoder.safetensors,
        # both loaded with safetensors.torch.load_model (strict) into the SD-inpainting components
        counts["v1_unet.txt"] = write_manifest(
            out / "v1_unet.txt", UNet2DConditionModel(**{**SD15_UNET, "in_channels": 9})
        )
        counts["v1_text_encoder.txt"] = write_manifest(out / "v1_text_encoder.txt", task_token_text_encoder())

        # v2 / v2-1: PowerPaint_Brushnet/diffusion_pytorch_model.safetensors, strict into
        # BrushNetModel.from_unet(<SD1.5 unet>); PowerPaint_Brushnet/pytorch_model.bin, strict=False into the
        # SD1.5 text encoder after add_tokens
        sd15_unet = orig.ForkUNet(**SD15_UNET)
        brushnet = orig.BrushNetModel.from_unet(sd15_unet)
        counts["v2_brushnet.txt"] = write_manifest(out / "v2_brushnet.txt", brushnet)
        counts["v2_text_encoder_brushnet.txt"] = write_manifest(
            out / "v2_text_encoder_brushnet.txt", task_token_text_encoder()
        )
        # v2 base folder realisticVisionV60B1_v51VAE/{unet,vae,text_encoder}: standard SD1.5 diffusers layout
        counts["v2_base_unet.txt"] = write_manifest(out / "v2_base_unet.txt", orig.ForkUNet(**SD15_UNET))
        counts["v2_base_vae.txt"] = write_manifest(out / "v2_base_vae.txt", AutoencoderKL(**SD15_VAE))
        counts["v2_base_text_encoder.txt"] = write_manifest(
            out / "v2_base_text_encoder.txt", CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        )
        # third-party repackaging (IOPaint, Sanster/PowerPaint_v2): plain CLIPTextModel with 30 extra rows
        counts["iopaint_v2_text_encoder_brushnet.txt"] = write_manifest(
            out / "iopaint_v2_text_encoder_brushnet.txt",
            CLIPTextModel(CLIPTextConfig(**{**CLIP_L_TEXT, "vocab_size": 49438})),
        )

    config = dict(brushnet.config)
    comparison = {}
    if args.reference_config.exists():
        reference = json.loads(args.reference_config.read_text())
        for key, value in reference.items():
            if key.startswith("_"):
                continue
            ours = config.get(key)
            ours = list(ours) if isinstance(ours, tuple) else ours
            if ours != value:
                comparison[key] = {"from_unet": ours, "reference_config": value}
    (out / "counts.json").write_text(
        json.dumps({"files": counts, "brushnet_from_unet_vs_reference_config": comparison}, indent=2) + "\n"
    )
    for name, count in counts.items():
        print(f"{name}: {count['tensors']} tensors, {count['elements']:,} elements")
    print("from_unet config differs from reference config in:", comparison or "nothing")


if __name__ == "__main__":
    main()
