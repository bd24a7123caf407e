"""Reference outputs of the original HD-Painter code on a tiny random SD1.5-like inpainting model.

HD-Painter: Manukyan et al., "HD-Painter: High-Resolution and Prompt-Faithful Text-Guided Image
Inpainting with Diffusion Models" (arXiv 2312.14091). The original code
(github.com/Picsart-AI-Research/HD-Painter) is imported from a local checkout given with
``--hd-painter-repo``; nothing of it is copied here. Run this in the throw-away virtualenv described in
FACTS.md ("Recreating the fixtures"), not in the project's venv: the original needs
transformers 4.28, open-clip-torch 2.23 and pytorch-lightning 2.1.

What it does:

1. Builds, under a fixed seed, a tiny SD1.5-like 9-channel inpainting model with diffusers
   (UNet2DConditionModel(in_channels=9), AutoencoderKL, a 2-layer CLIPTextModel, a CLIPTokenizer whose
   small vocabulary tokenises the prompts exactly as the real CLIP BPE does, a DDIM scheduler config)
   and saves it as a diffusers pipeline folder ``<out>/model``.
2. Builds the original's own LDM-style modules (``src.smplfusion``) with the same tiny shapes, loads the
   same weights into them (keys renamed by ``diffusers_to_ldm_*`` below) and runs the original's
   ``src.methods.sd.run`` / ``src.methods.rasg.run`` the way ``hd_inpaint.py`` does, for baseline,
   PAIntA, RASG and PAIntA+RASG, recording outputs and per-step tensors with hooks.
3. Runs everything twice and records the largest difference (determinism).

The original is CUDA-only and imports xformers and torchvision; ``install_shims`` makes it run on the
CPU without editing its files (see FACTS.md, "Shims").

Usage (from the repository root):

    OMP_NUM_THREADS=1 /work/scratch/hdp-venv/bin/python tools/hd_painter_reference/make_fixtures.py \
        --hd-painter-repo /work/scratch/HD-Painter --out tests/fixtures/hd_painter
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SEED = 1234  # weights, tokenizer-independent
PROMPT = "a yellow teapot"
IMAGE_SIZE = (192, 128)  # (width, height): non-square, multiple of 64 (the original pads to 64)
PADDED_CROP = (184, 120)  # (width, height) of the crop used by the one run that exercises padding
ATTENTION_QK_GAIN = 4.0  # to_q / to_k of every UNet attention are multiplied by this after init


# --------------------------------------------------------------------------------------------
# 1. Shims: let the CUDA-only original run on the CPU without editing it
# --------------------------------------------------------------------------------------------


def _placeholder_module(name: str, attributes: dict | None = None) -> types.ModuleType:
    """A module whose unknown attributes are inert placeholders that fail loudly when used."""

    module = types.ModuleType(name)

    class _Missing:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"{name} is a stub in this harness; this code path needs the real package")

    class _MissingMeta(type):
        def __getattr__(cls, item):  # e.g. InterpolationMode.BICUBIC used as a default argument
            return cls

    missing = _MissingMeta("Missing", (_Missing,), {})

    def __getattr__(item):
        if item.startswith("__"):
            raise AttributeError(item)
        return missing

    module.__getattr__ = __getattr__
    module.__path__ = []  # behave as a package so submodules can be imported
    for key, value in (attributes or {}).items():
        setattr(module, key, value)
    sys.modules[name] = module
    return module


def _torchvision_pad(img: torch.Tensor, padding, fill=0, padding_mode="constant"):
    """torchvision.transforms.functional.pad for tensors, constant mode only (all the inpainting path uses)."""
    if padding_mode != "constant":
        raise RuntimeError("only constant padding is shimmed (the SR stage's reflect padding is not)")
    if isinstance(padding, int):
        padding = [padding] * 4
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        left = right = padding[0]
        top = bottom = padding[1]
    else:
        left, top, right, bottom = padding
    return F.pad(img, [left, right, top, bottom], mode="constant", value=fill)


def _memory_efficient_attention(query, key, value, attn_bias=None, op=None, p=0.0, scale=None):
    """xformers.ops.memory_efficient_attention on (batch, tokens, dim) tensors: softmax(q k^T / sqrt(d)) v."""
    if attn_bias is not None or p:
        raise RuntimeError("attention bias / dropout is not shimmed")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    weights = (query @ key.transpose(-1, -2) * scale).softmax(dim=-1)
    return weights @ value


def install_shims(hd_painter_repo: Path) -> None:
    """Stub torchvision / xformers / segment_anything, make ``.cuda()`` a no-op, import the original."""
    # Import the real packages first, so their "is torchvision / xformers installed" probes see none.
    import diffusers  # noqa: F401
    import pytorch_lightning  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import StableDiffusionInpaintPipeline  # noqa: F401

    _placeholder_module("torchvision")
    _placeholder_module("torchvision.transforms")
    _placeholder_module("torchvision.transforms.functional", {"pad": _torchvision_pad})
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    _placeholder_module("torchvision.ops")
    _placeholder_module("torchvision.ops.misc")
    _placeholder_module("xformers")
    _placeholder_module("xformers.ops", {"memory_efficient_attention": _memory_efficient_attention})
    sys.modules["xformers"].ops = sys.modules["xformers.ops"]
    _placeholder_module("segment_anything")  # imported by src/models/sam.py, used only by the SR demo

    def _stay_on_cpu(self, *args, **kwargs):
        return self

    torch.Tensor.cuda = _stay_on_cpu
    torch.nn.Module.cuda = _stay_on_cpu
    from lightning_fabric.utilities.device_dtype_mixin import _DeviceDtypeModuleMixin

    _DeviceDtypeModuleMixin.cuda = _stay_on_cpu

    sys.path.insert(0, str(hd_painter_repo))
    from src.utils.iimage import IImage

    IImage.cuda = IImage.cpu  # IImage.torch() moves to its .device; keep it on the CPU


# --------------------------------------------------------------------------------------------
# 2. A CLIP tokenizer with a small vocabulary that splits our prompts exactly like real CLIP BPE
# --------------------------------------------------------------------------------------------


def _bpe_with_trace(symbols: list[str], ranks: dict, used: set) -> list[str]:
    """Greedy BPE (lowest-rank pair first); adds every merge it applies to ``used``."""
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        used.add(best)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_matched_tokenizer(texts: list[str], directory: Path):
    """Write vocab.json/merges.txt holding only the CLIP merges that ``texts`` need, and load it.

    The original picks PAIntA/RASG token positions with open_clip's tokenizer (real CLIP BPE), while the
    text encoder reads the model's own tokenizer, so the two must agree on these prompts. Real CLIP's
    49,408-token vocabulary would make the text encoder alone ~6 MB; keeping only the merges the prompts
    use reproduces the same splits (greedy BPE picks the same merge at every step when unused merges are
    dropped) with ~650 tokens.
    """
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    reference = oct._tokenizer
    ranks = reference.bpe_ranks
    used: set = set()
    for text in texts:
        cleaned = oct.whitespace_clean(oct.basic_clean(text)).lower()
        for word in reference.pat.findall(cleaned):
            encoded = "".join(reference.byte_encoder[b] for b in word.encode("utf-8"))
            pieces = _bpe_with_trace(list(encoded[:-1]) + [encoded[-1] + "</w>"], ranks, used)
            assert " ".join(pieces) == reference.bpe(encoded), (word, pieces, reference.bpe(encoded))
    merges = sorted(used, key=lambda pair: ranks[pair])
    byte_symbols = list(reference.byte_encoder.values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False)
    )
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    (directory / "vocab.json").unlink()
    (directory / "merges.txt").unlink()
    return tokenizer


# --------------------------------------------------------------------------------------------
# 3. The tiny model (diffusers) and the same weights under the original's LDM key names
# --------------------------------------------------------------------------------------------

UNET_LEVELS = 4
UNET_LAYERS_PER_BLOCK = 1
UNET_CHANNELS = 32  # the original's GroupNorm has 32 groups, so 32 is the smallest width
UNET_HEADS = 2
CROSS_DIM = 32


def build_diffusers_components(tokenizer):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=9,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(UNET_CHANNELS,) * UNET_LEVELS,
        layers_per_block=UNET_LAYERS_PER_BLOCK,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=UNET_HEADS,  # SD1.x convention: this is the number of heads
        norm_num_groups=32,
    )
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight")):
                parameter.mul_(ATTENTION_QK_GAIN)

    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32,) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=128,
        scaling_factor=0.18215,
    )

    torch.manual_seed(SEED + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=CROSS_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=CROSS_DIM,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()

    # The original's schedule: SD's scaled-linear betas, timesteps 999, 999-dt, ... (= "trailing" when
    # the step count divides 1000) and the last x0 prediction as output (= set_alpha_to_one=True).
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
        prediction_type="epsilon",
    )
    return unet.eval(), vae.eval(), text_encoder, scheduler


def _resnet_ldm(key: str) -> str:
    for diffusers_name, ldm_name in (
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("conv_shortcut", "skip_connection"),
    ):
        if key.startswith(diffusers_name + "."):
            return ldm_name + key[len(diffusers_name) :]
    raise KeyError(key)


def diffusers_to_ldm_unet(state: dict, levels: int, layers: int, up_attention: list[bool]) -> dict:
    """Rename a diffusers UNet2DConditionModel state dict to the LDM ``UNetModel`` layout."""
    top = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for depth in (1, 2):
            head = ".".join(parts[:depth])
            if head in top:
                out[top[head] + "." + ".".join(parts[depth:])] = value
                break
        else:
            head = None
        if head is not None:
            continue
        if parts[0] == "down_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.L.downsamplers.0.conv.* -> input_blocks.N.0.op.*
                index = 1 + level * (layers + 1) + layers
                out[f"input_blocks.{index}.0.op." + ".".join(parts[5:])] = value
                continue
            index = 1 + level * (layers + 1) + int(parts[3])
            rest = ".".join(parts[4:])
            if kind == "resnets":
                out[f"input_blocks.{index}.0." + _resnet_ldm(rest)] = value
            else:
                out[f"input_blocks.{index}.1." + rest] = value
        elif parts[0] == "up_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":  # up_blocks.B.upsamplers.0.conv.* -> output_blocks.N.(1|2).conv.*
                index = block * (layers + 1) + layers
                slot = 2 if up_attention[block] else 1
                out[f"output_blocks.{index}.{slot}." + ".".join(parts[4:])] = value
                continue
            index = block * (layers + 1) + int(parts[3])
            rest = ".".join(parts[4:])
            if kind == "resnets":
                out[f"output_blocks.{index}.0." + _resnet_ldm(rest)] = value
            else:
                out[f"output_blocks.{index}.1." + rest] = value
        elif parts[0] == "mid_block":
            kind, number, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                out[f"middle_block.{2 * number}." + _resnet_ldm(rest)] = value
            else:
                out["middle_block.1." + rest] = value
        else:
            raise KeyError(key)
    return out


def diffusers_to_ldm_vae(state: dict, levels: int) -> dict:
    """Rename a diffusers AutoencoderKL state dict to the LDM ``AutoencoderKL`` layout."""
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        coder, rest = parts[0], parts[1:]
        if rest[0] in ("conv_in", "conv_out"):
            new = ".".join(rest)
        elif rest[0] == "conv_norm_out":
            new = "norm_out." + ".".join(rest[1:])
        elif rest[0] in ("down_blocks", "up_blocks"):
            block = int(rest[1])
            level = block if rest[0] == "down_blocks" else levels - 1 - block
            prefix = ("down" if rest[0] == "down_blocks" else "up") + f".{level}."
            if rest[2] == "resnets":
                new = (
                    prefix + f"block.{rest[3]}." + ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
                )
            elif rest[2] == "downsamplers":
                new = prefix + "downsample." + ".".join(rest[4:])
            elif rest[2] == "upsamplers":
                new = prefix + "upsample." + ".".join(rest[4:])
            else:
                raise KeyError(key)
        elif rest[0] == "mid_block":
            if rest[1] == "resnets":
                new = f"mid.block_{int(rest[2]) + 1}." + ".".join(rest[3:]).replace(
                    "conv_shortcut", "nin_shortcut"
                )
            else:
                inner = ".".join(rest[3:])
                for diffusers_name, ldm_name in attention.items():
                    if inner.startswith(diffusers_name + "."):
                        inner = ldm_name + inner[len(diffusers_name) :]
                        break
                new = "mid.attn_1." + inner
                if value.ndim == 2:  # linear -> 1x1 conv
                    value = value[:, :, None, None]
        else:
            raise KeyError(key)
        out[f"{coder}.{new}"] = value
    return out


def build_original_model(model_dir: Path, hd_painter_repo: Path, unet, vae, work: Path):
    """The original's DDIM wrapper around its own UNet/VAE/CLIP classes, carrying our weights.

    Mirrors what ``src.models.common.load_sd_inpainting_model`` does after loading weights (float32,
    CPU, eval, no grad); its key converter hard-codes SD's 4 levels x 2 layers, so it cannot be used
    on a model this small (FACTS.md).
    """
    from omegaconf import OmegaConf
    from src.smplfusion import DDIM, scheduler, share
    from src.smplfusion.models.encoders.clip_embedder import FrozenCLIPEmbedder
    from src.smplfusion.models.unet import UNetModel
    from src.smplfusion.models.vae import AutoencoderKL as LdmAutoencoderKL

    config = OmegaConf.load(hd_painter_repo / "config" / "ddpm" / "v1.yaml")

    ldm_unet = UNetModel(
        image_size=32,
        in_channels=9,
        out_channels=4,
        model_channels=UNET_CHANNELS,
        attention_resolutions=[1, 2, 4],
        num_res_blocks=UNET_LAYERS_PER_BLOCK,
        channel_mult=[1] * UNET_LEVELS,
        num_heads=UNET_HEADS,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=CROSS_DIM,
        use_checkpoint=False,
        legacy=False,
    )
    up_attention = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    ldm_unet.load_state_dict(
        diffusers_to_ldm_unet(unet.state_dict(), UNET_LEVELS, UNET_LAYERS_PER_BLOCK, up_attention),
        strict=True,
    )

    ldm_vae = LdmAutoencoderKL(
        ddconfig=dict(
            double_z=True,
            z_channels=4,
            resolution=128,
            in_channels=3,
            out_ch=3,
            ch=32,
            ch_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            attn_resolutions=[],
            dropout=0.0,
        ),
        lossconfig={"target": "torch.nn.Identity"},
        embed_dim=4,
    )
    ldm_vae.load_state_dict(diffusers_to_ldm_vae(vae.state_dict(), 4), strict=True)

    # FrozenCLIPEmbedder loads tokenizer and text model from one folder.
    clip_dir = work / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("tokenizer", "text_encoder"):
        for file in (model_dir / sub).iterdir():
            (clip_dir / file.name).write_bytes(file.read_bytes())
    encoder = FrozenCLIPEmbedder(version=str(clip_dir), device="cpu")

    for module in (ldm_unet, ldm_vae, encoder):
        module.eval().requires_grad_(False).to(dtype=torch.float32)
    ddim = DDIM(config, ldm_vae, encoder, ldm_unet)
    share.schedule = scheduler.linear(config.timesteps, config.linear_start, config.linear_end)
    return ddim, config


# --------------------------------------------------------------------------------------------
# 4. Inputs
# --------------------------------------------------------------------------------------------


def make_inputs(out: Path) -> tuple[Image.Image, Image.Image]:
    width, height = IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [
            0.5 + 0.4 * np.sin(x / 17.0) * np.cos(y / 23.0),
            0.3 + 0.6 * x / width,
            0.8 - 0.6 * y / height,
        ],
        axis=-1,
    )
    image[(x - 40) ** 2 + (y - 40) ** 2 < 18**2] = (0.9, 0.1, 0.1)  # a red disc, kept
    image[80:110, 120:170] = (0.1, 0.2, 0.9)  # a blue bar, half inside the hole
    image = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8), "RGB")
    mask = np.zeros((height, width), np.uint8)
    mask[30:100, 96:160] = 255
    mask[(x - 90) ** 2 + (y - 95) ** 2 < 16**2] = 255
    mask = Image.fromarray(mask, "L")
    image.save(out / "image.png")
    mask.save(out / "mask.png")
    return image, mask


# --------------------------------------------------------------------------------------------
# 5. Running the original with hooks
# --------------------------------------------------------------------------------------------


class Recorder:
    """Counts and records what one call of the original's runner does."""

    def __init__(self, ddim):
        from src.smplfusion import router, share
        from src.smplfusion.patches import attentionpatch

        self.ddim, self.router, self.share, self.attentionpatch = ddim, router, share, attentionpatch
        self.reset()
        ddim.unet.register_forward_hook(self._after_unet, with_kwargs=True)
        original_decode = ddim.vae.decode

        def decode(z):
            image = original_decode(z)
            self.decoded_input, self.decoded = z.detach().clone(), image.detach().clone()
            return image

        ddim.vae.decode = decode
        painta = attentionpatch.painta
        original_rescale = painta.painta_rescale

        def painta_rescale(y, self_v, *args, **kwargs):
            if painta.painta_on and painta.share.painta_mask.get_res_val(self_v) in painta.painta_res:
                self.pending_painta_rescales += 1
            return original_rescale(y, self_v, *args, **kwargs)

        painta.painta_rescale = painta_rescale
        original_backward = torch.Tensor.backward

        def backward(tensor, *args, **kwargs):
            self.backward_calls += 1
            return original_backward(tensor, *args, **kwargs)

        torch.Tensor.backward = backward

    def reset(self):
        self.calls, self.grads = [], []
        self.backward_calls = 0
        self.pending_painta_rescales = 0
        self.decoded = self.decoded_input = None

    def _attention_mode(self) -> str:
        forward = self.router.attention_forward
        if forward is self.attentionpatch.painta.forward:
            return "painta"
        if forward is self.attentionpatch.default.forward_and_save:
            return "save_cross_attention"
        return "default"

    def _after_unet(self, module, args, kwargs, output):
        x = args[0]
        self.calls.append(
            {
                "x": x.detach().clone(),
                "timesteps": kwargs["timesteps"].tolist(),
                "context": kwargs["context"].detach().clone(),
                "output": output.detach().clone(),
                "attention_mode": self._attention_mode(),
                "painta_rescale_calls": self.pending_painta_rescales,
                "crossattn_maps_res16": len(getattr(self.share, "_crossattn_similarity_res16", None) or []),
            }
        )
        self.pending_painta_rescales = 0
        if x.requires_grad:  # RASG: d score / d zt = sum over the CFG halves of the grad w.r.t. channels 0:4
            x.register_hook(lambda grad: self.grads.append(grad[:, :4].sum(0, keepdim=True).detach().clone()))


def run_original(ddim, recorder, method, image, mask, prompt, seed, eta, negative, positive, steps, guidance):
    """Call the runner the way hd_inpaint.get_inpainting_function's inner ``run`` does."""
    from src.methods import rasg, sd
    from src.utils.iimage import IImage

    runner = rasg if "rasg" in method else sd
    recorder.reset()
    result = runner.run(
        ddim=ddim,
        method=method,
        prompt=prompt,
        image=IImage(image),
        mask=IImage(mask),
        seed=seed,
        eta=eta,
        negative_prompt=negative,
        positive_prompt=positive,
        num_steps=steps,
        guidance_scale=guidance,
    ).pil()
    width, height = image.size
    final = np.array(result)[:height, :width]  # hd_inpaint's crop back to the input size
    return runner.__name__.split(".")[-1], final


def token_positions(prompt: str, full_prompt: str) -> dict:
    from src.utils import tokenize

    prompt_tokens, full_tokens = tokenize(prompt), tokenize(full_prompt)
    token_idx = list(range(1, prompt_tokens.index("<end_of_text>"))) + [full_tokens.index("<end_of_text>")]
    return {
        "token_idx": token_idx,
        "prompt_tokens": prompt_tokens[: prompt_tokens.index("<end_of_text>") + 1],
        "full_prompt_tokens": full_tokens[: full_tokens.index("<end_of_text>") + 1],
    }


def check_tokenizer_agrees(tokenizer, positions: dict, full_prompt: str) -> None:
    """The model's tokenizer must split the prompts into the same pieces as open_clip's (see above)."""
    for key, text in (("prompt_tokens", PROMPT), ("full_prompt_tokens", full_prompt)):
        ours = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)[1:-1]
        theirs = positions[key][1:-1]
        assert ours == theirs, (ours, theirs)


RUNS = [
    {"name": "baseline", "method": "baseline"},
    {"name": "painta", "method": "painta"},
    {"name": "rasg", "method": "rasg"},
    {"name": "painta_rasg", "method": "painta+rasg", "demo_blend": True},
    {"name": "painta_rasg_guidance1", "method": "painta+rasg", "guidance_scale": 1.0},
    {"name": "rasg_eta1", "method": "rasg", "eta": 1.0, "latents_only": True},
    {"name": "painta_rasg_padded", "method": "painta+rasg", "crop": PADDED_CROP},
    {"name": "baseline_7steps", "method": "baseline", "num_steps": 7, "latents_only": True},
]


def cli_defaults() -> dict:
    """The original CLI's argparse defaults (hd_inpaint.get_args), read from the original itself."""
    import hd_inpaint

    saved = sys.argv
    sys.argv = [
        "hd_inpaint.py",
        "--image-path",
        "i",
        "--mask-path",
        "m",
        "--prompt",
        "p",
        "--output-dir",
        "o",
    ]
    try:
        defaults = vars(hd_inpaint.get_args())
    finally:
        sys.argv = saved
    return {k: v for k, v in defaults.items() if k not in ("image_path", "mask_path", "prompt", "output_dir")}


def run_all(ddim, recorder, config, image, mask, negative, positive, default_steps):
    from src.utils import poisson_blend

    defaults = cli_defaults()
    tensors, runs = {}, []
    for spec in RUNS:
        name = spec["name"]
        method = spec["method"]
        guidance = spec.get("guidance_scale", defaults["guidance_scale"])
        eta = spec.get("eta", defaults["rasg_eta"])
        steps = spec.get("num_steps", default_steps)
        run_image, run_mask = image, mask
        if "crop" in spec:
            box = (0, 0) + tuple(spec["crop"])
            run_image, run_mask = image.crop(box), mask.crop(box)
        mask_rgb = run_mask.convert("RGB")  # hd_inpaint opens the mask with .convert("RGB")
        runner, final = run_original(
            ddim,
            recorder,
            method,
            run_image,
            mask_rgb,
            PROMPT,
            SEED,
            eta,
            negative,
            positive,
            steps,
            guidance,
        )
        calls = recorder.calls
        latents = torch.stack([c["x"][:1, :4] for c in calls])
        eps_uncond = torch.stack([c["output"][:1] for c in calls])
        eps_cond = torch.stack([c["output"][1:2] for c in calls])
        step_eps_guided = eps_uncond + guidance * (eps_cond - eps_uncond)  # the runners' own formula
        z0 = recorder.decoded_input * config.scale_factor
        expected_noise = torch.randn(latents.shape[1:], generator=torch.Generator("cpu").manual_seed(SEED))
        assert torch.equal(latents[0], expected_noise), "start latent is not randn from manual_seed(SEED)"
        tensors[f"{name}.z0"] = z0.contiguous()
        tensors[f"{name}.step_latents"] = latents.contiguous()
        tensors[f"{name}.step_eps_guided"] = step_eps_guided.contiguous()
        if recorder.grads:
            tensors[f"{name}.step_rasg_grad"] = torch.stack(recorder.grads).contiguous()
        if not spec.get("latents_only"):
            raw = ((recorder.decoded.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).float()
            tensors[f"{name}.output_raw"] = raw.contiguous()
            tensors[f"{name}.output_final_uint8"] = torch.from_numpy(final.copy())[None].contiguous()
        if spec.get("demo_blend"):
            blended = poisson_blend(
                orig_img=np.array(run_image), fake_img=final, mask=np.array(mask_rgb), dilation=12
            )
            tensors[f"{name}.output_demo_blend_uint8"] = torch.from_numpy(blended.copy())[None].contiguous()
        key = "in.unet_condition_padded" if "crop" in spec else "in.unet_condition"
        tensors.setdefault(key, calls[0]["x"][:1, 4:].contiguous())
        tensors.setdefault("in.context", calls[0]["context"].contiguous())
        assert torch.equal(calls[0]["context"], tensors["in.context"])
        runs.append(
            {
                "name": name,
                "method": method,
                "runner": f"src.methods.{runner}.run",
                "use_painta": "painta" in method,
                "use_rasg": "rasg" in method,
                "guidance_scale": guidance,
                "eta": eta,
                "eta_used": runner == "rasg",
                "num_steps": steps,
                "dt": 1000 // steps,
                "seed": SEED,
                "input_size_wh": list(run_image.size),
                "processed_size_wh": [int(latents.shape[-1]) * 8, int(latents.shape[-2]) * 8],
                "timesteps": [c["timesteps"][0] for c in calls],
                "unet_forward_calls": len(calls),
                "unet_batch_per_call": [int(c["x"].shape[0]) for c in calls],
                "attention_mode_per_call": [c["attention_mode"] for c in calls],
                "painta_rescale_calls_per_call": [c["painta_rescale_calls"] for c in calls],
                "rasg_crossattn_maps_res16_per_call": (
                    [c["crossattn_maps_res16"] for c in calls] if runner == "rasg" else None
                ),
                "rasg_backward_passes": recorder.backward_calls,
                "stored": sorted(k[len(name) + 1 :] for k in tensors if k.startswith(name + ".")),
            }
        )
    return tensors, runs


def layer_roles(unet) -> dict:
    """Which diffusers attention modules of the tiny UNet PAIntA and RASG act on (by resolution)."""

    def level(name: str) -> int:  # 0 = latent resolution (the original's "res64" at 512 px)
        if name.startswith("down_blocks."):
            return int(name.split(".")[1])
        if name.startswith("up_blocks."):
            return UNET_LEVELS - 1 - int(name.split(".")[1])
        return UNET_LEVELS - 1  # mid block

    names = [n[: -len(".processor")] for n in unet.attn_processors]
    painta = [n for n in names if n.endswith("attn1") and level(n) in (1, 2)]
    rasg = [n for n in names if n.endswith("attn2") and level(n) == 2]
    return {
        "painta_self_attentions (latent/2 and latent/4; each also reads its block's attn2 to_q/to_k)": painta,
        "rasg_cross_attentions (latent/4)": rasg,
        "untouched": [n for n in names if n not in painta + rasg],
    }


def describe(commit, config, positions, negative, positive, full_prompt, runs, unet):
    import cv2
    import diffusers
    import transformers

    return {
        "what": "Outputs of the original HD-Painter code on a tiny random SD1.5-like 9-channel inpainting model.",
        "original": {
            "repository": "https://github.com/Picsart-AI-Research/HD-Painter",
            "commit": commit,
            "entry_point": "hd_inpaint.py: get_inpainting_function -> src.methods.{sd,rasg}.run",
            "cli_defaults": cli_defaults(),
        },
        "generated_by": "tools/hd_painter_reference/make_fixtures.py (see tools/hd_painter_reference/FACTS.md)",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "diffusers_used_to_build_the_model": diffusers.__version__,
            "open_clip_torch": importlib.metadata.version("open_clip_torch"),
            "numpy": np.__version__,
            "opencv": cv2.__version__,
        },
        "device": "cpu, float32 everywhere (the original runs fp16 under CUDA autocast; autocast is off on CPU)",
        "model": {
            "folder": "model/ (diffusers StableDiffusionInpaintPipeline layout; loads with diffusers 0.42)",
            "unet": "UNet2DConditionModel(in_channels=9, block_out_channels=(32,)*4, layers_per_block=1, "
            "down=(CrossAttnDown x3, Down), up=(Up, CrossAttnUp x3), cross_attention_dim=32, 2 heads); "
            f"torch.manual_seed({SEED}); then every attn1/attn2 to_q and to_k weight x{ATTENTION_QK_GAIN}",
            "vae": f"AutoencoderKL(block_out_channels=(32,)*4, layers_per_block=1, scaling_factor=0.18215); "
            f"torch.manual_seed({SEED + 1})",
            "text_encoder": f"CLIPTextModel(hidden 32, 2 layers, 4 heads, quick_gelu); torch.manual_seed({SEED + 2})",
            "tokenizer": "CLIPTokenizer with only the CLIP BPE merges the prompts need: splits these prompts "
            "exactly like the real CLIP tokenizer and open_clip.tokenize",
            "scheduler": "DDIMScheduler config equivalent to the original's loop when num_steps divides 1000 "
            "(scaled_linear 0.00085..0.012, trailing spacing, set_alpha_to_one, eta=0)",
            "original_side": "the original's own UNetModel / AutoencoderKL / FrozenCLIPEmbedder built with the "
            "same shapes, weights renamed from the diffusers files, loaded with strict=True",
        },
        "schedule": {
            "betas": f"linspace(sqrt({config.linear_start}), sqrt({config.linear_end}), 1000, float64) ** 2",
            "scale_factor": config.scale_factor,
        },
        "prompts": {
            "prompt": PROMPT,
            "positive_prompt_addition": positive,
            "full_prompt_sent_to_text_encoder": full_prompt,
            "negative_prompt": negative,
            "context_batch": "[negative_prompt, full_prompt] -> in.context (2, 77, 32)",
            **positions,
        },
        "inputs": {
            "image": "image.png (RGB, 192x128)",
            "mask": "mask.png (L, 0/255, white = inpaint); passed to the original as .convert('RGB')",
            "padded_run_crop_box": [0, 0, *PADDED_CROP],
            "not_applied": "hd_inpaint.py first resizes image and mask so the longer side is 512 (bicubic); "
            "skipped here to keep the run small: the runner functions get the PNGs as they are",
            "preprocessing_in_the_runner": [
                "image.padx(64): zero-pad right/bottom to a multiple of 64 (tensor in [0,1], fill 0 = black)",
                "mask.dilate(1): scipy binary_dilation (any nonzero -> 1, one 4-neighbour step) -> x255",
                "mask.alpha(): keep the last channel; then padx(64) with zeros",
                "masked image = image in [-1,1] * (mask == 0): hole set to 0 (mid grey)",
                "masked latent = vae.encode(masked image).mean * 0.18215",
                "latent mask = PIL bicubic resize of the 0/255 mask to (H/8, W/8), then != 0 -> 1",
                "UNet input = cat([z_t, latent mask, masked latent], dim=1) (4 + 1 + 4 channels)",
                "PAIntA / RASG masks: PIL bicubic resize of the dilated mask to H/16, H/32 (etc.), then > 0.5",
            ],
        },
        "outputs": {
            "<run>.output_raw": "(1, H, W, 3) float32 = (clip(vae.decode(z0 / 0.18215), -1, 1) + 1) / 2 over the "
            "padded size, before any paste-back (the original has none at this stage)",
            "<run>.output_final_uint8": "(1, h, w, 3) uint8: what the original returns: uint8(255 * raw) "
            "(truncation, torch .to(uint8)) cropped to the input size; divide by 255 for [0, 1]",
            "<run>.output_demo_blend_uint8": "the Gradio demo's post-processing: poisson_blend(image, final, "
            "mask, dilation=12) (cv2.seamlessClone; opencv-dependent)",
            "<run>.z0": "(1, 4, H/8, W/8) the last x0 prediction, the latent that is decoded",
            "<run>.step_latents": "(S, 1, 4, H/8, W/8) z_t fed to the UNet at each step (step 0 = start noise)",
            "<run>.step_eps_guided": "(S, 1, 4, H/8, W/8) eps_uncond + guidance * (eps_cond - eps_uncond) per step",
            "<run>.step_rasg_grad": "(S, 1, 4, H/8, W/8) d(score)/d(z_t) before the division by its std",
            "in.context": "(2, 77, 32) text-encoder output for [negative, full prompt]",
            "in.unet_condition(_padded)": "(1, 5, H/8, W/8) latent mask + masked-image latent (UNet channels 4:9)",
        },
        "layers": layer_roles(unet),
        "counting": "unet_forward_calls: calls of the UNet (each on the CFG-doubled batch of 2); "
        "rasg_backward_passes: Tensor.backward calls; painta_rescale_calls: PAIntA re-weightings per UNet "
        "call, one per (PAIntA layer, CFG half), so 2 x 6 layers here (2 x 10 in SD1.5); "
        "rasg_crossattn_maps_res16: cross-attention maps averaged by RASG (3 here, 5 in SD1.5)",
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hd-painter-repo", type=Path, required=True, help="checkout of the original code")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hd_painter"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hd-painter-commit", default="unknown", help="recorded in reference.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repo = args.hd_painter_repo.resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    install_shims(repo)
    import hd_inpaint  # the original CLI: its default negative / positive prompts
    from diffusers import StableDiffusionInpaintPipeline
    from safetensors.torch import save_file

    negative, positive = hd_inpaint.negative_prompt, hd_inpaint.positive_prompt
    commit = args.hd_painter_commit
    full_prompt = f"{PROMPT}, {positive}"

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = build_matched_tokenizer([PROMPT, full_prompt, negative], work / "tokenizer_src")
        unet, vae, text_encoder, scheduler = build_diffusers_components(tokenizer)
        model_dir = out / "model"
        pipeline = StableDiffusionInpaintPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(model_dir, safe_serialization=True)
        ddim, config = build_original_model(model_dir, repo, unet, vae, work)
        recorder = Recorder(ddim)
        image, mask = make_inputs(out)
        positions = token_positions(PROMPT, full_prompt)
        check_tokenizer_agrees(tokenizer, positions, full_prompt)

        passes = [
            run_all(ddim, recorder, config, image, mask, negative, positive, args.steps) for _ in range(2)
        ]

    tensors, runs = passes[0]
    second, _ = passes[1]
    for run in runs:
        prefix = run["name"] + "."
        run["determinism_max_abs_diff"] = max(
            float((tensors[k].double() - second[k].double()).abs().max())
            for k in tensors
            if k.startswith(prefix)
        )
    for run in runs:  # how far each method moves the output: the margin a test has over its tolerance
        if run["name"] in ("baseline", "painta_rasg_padded", "baseline_7steps"):
            continue
        run["max_abs_diff_to_baseline"] = {
            part: float((tensors[f"{run['name']}.{part}"] - tensors[f"baseline.{part}"]).abs().max())
            for part in ("output_raw", "z0")
            if f"{run['name']}.{part}" in tensors
        }
    save_file(tensors, str(out / "reference.safetensors"))
    info = describe(commit, config, positions, negative, positive, full_prompt, runs, unet)
    (out / "reference.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({r["name"]: r["determinism_max_abs_diff"] for r in runs}, indent=1))


if __name__ == "__main__":
    main()
