"""Run a stock ``diffusers.UNet2DConditionModel`` with BrushNet residuals added in-line.

BrushNet adds its residuals to the hidden state *inside* the UNet — after ``conv_in``, after every down
resnet (+ attention) and downsampler, after the mid block, after every up resnet (+ attention) and
upsampler — so they flow on through later layers and into the stored skip connections. Stock diffusers
only offers ControlNet-style residuals on the skips, so this module drives the UNet's own submodules
from plain code, in the same order as ``UNet2DConditionModel.forward``. Nothing is patched: the UNet
object is never modified and stays usable as a plain UNet everywhere else.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.utils.peft_utils import apply_lora_scale  # diffusers >= 0.37 (the floor is 0.39)
from diffusers.utils.torch_utils import apply_freeu

from .hooks import block_hooks, run_hooked, unwrap_compiled

__all__ = ["unet_forward_with_brushnet", "run_unet_with_brushnet", "count_injection_points"]


def count_injection_points(unet: UNet2DConditionModel) -> tuple[int, int]:
    """Number of (down, up) residuals a UNet receives: ``(1 + Σ resnets + downsamplers, Σ resnets + upsamplers)``."""
    n_down = 1 + sum(len(b.resnets) + (1 if b.downsamplers is not None else 0) for b in unet.down_blocks)
    n_up = sum(len(b.resnets) + (1 if b.upsamplers is not None else 0) for b in unet.up_blocks)
    return n_down, n_up


def _run(block, module, *args):
    """Call ``module`` through the block's gradient-checkpointing function when the block has it enabled."""
    if torch.is_grad_enabled() and getattr(block, "gradient_checkpointing", False):
        return block._gradient_checkpointing_func(module, *args)
    return module(*args)


@apply_lora_scale("cross_attention_kwargs")
def unet_forward_with_brushnet(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    down_block_add_samples: Sequence[torch.Tensor] | None = None,
    mid_block_add_sample: torch.Tensor | None = None,
    up_block_add_samples: Sequence[torch.Tensor] | None = None,
    *,
    timestep_cond: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    cross_attention_kwargs: dict | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
    mid_block_additional_residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise with a stock UNet that receives BrushNet residuals at the original's injection points.

    Equivalent to the original fork's ``UNet2DConditionModel.forward(..., down_block_add_samples=...,
    mid_block_add_sample=..., up_block_add_samples=...)``. With all residuals ``None`` (or zero) the result
    equals ``unet(sample, timestep, encoder_hidden_states).sample``.

    Args:
        unet: a stock ``UNet2DConditionModel`` (read, never modified).
        sample: noisy latent ``(B, C, h, w)``.
        timestep: diffusion timestep.
        encoder_hidden_states: text embeddings ``(B, L, D)``.
        down_block_add_samples: one residual per down injection point (see :func:`count_injection_points`).
        mid_block_add_sample: residual added after the mid block.
        up_block_add_samples: one residual per up injection point.
        down_block_additional_residuals, mid_block_additional_residual: optional ControlNet residuals, added
            to the skips / mid output exactly as stock diffusers does (BrushNet + ControlNet together).
        cross_attention_kwargs: passed to attention processors; ``{"scale": s}`` scales LoRA layers.

    Returns:
        The UNet's prediction ``(B, out_channels, h, w)``.
    """
    n_down, n_up = count_injection_points(unet)
    down_add = list(down_block_add_samples) if down_block_add_samples is not None else None
    up_add = list(up_block_add_samples) if up_block_add_samples is not None else None
    if down_add is not None and len(down_add) != n_down:
        raise ValueError(f"this UNet has {n_down} down injection points, got {len(down_add)} residuals")
    if up_add is not None and len(up_add) != n_up:
        raise ValueError(f"this UNet has {n_up} up injection points, got {len(up_add)} residuals")
    if unet.config.addition_embed_type == "image_hint":
        raise NotImplementedError("UNets with addition_embed_type='image_hint' are not supported")

    forward_upsample_size = any(dim % (2**unet.num_upsamplers) != 0 for dim in sample.shape[-2:])
    upsample_size = None

    if attention_mask is not None:
        attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if encoder_attention_mask is not None:
        encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0

    # 1. time (the UNet's own helpers, as its forward uses them)
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=None)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {}
    )
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {}
    )

    attn_kwargs = dict(
        encoder_hidden_states=encoder_hidden_states,
        cross_attention_kwargs=cross_attention_kwargs,
        attention_mask=attention_mask,
        encoder_attention_mask=encoder_attention_mask,
        return_dict=False,
    )

    # 2. conv_in: skip 0 is stored before the first residual is added
    sample = unet.conv_in(sample)
    skips: tuple[torch.Tensor, ...] = (sample,)
    if down_add is not None:
        sample = sample + down_add.pop(0)

    # 3. down: residual after each resnet (+attention) and after the downsampler, then store the skip
    for block in unet.down_blocks:
        with block_hooks(block):  # block-level offloading: the block's weights are on the device in here
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for resnet, attn in zip(block.resnets, attentions):
                sample = _run(block, resnet, sample, emb)
                if attn is not None:
                    sample = attn(sample, **attn_kwargs)[0]
                if down_add is not None:
                    sample = sample + down_add.pop(0)
                skips += (sample,)
            if block.downsamplers is not None:
                for downsampler in block.downsamplers:
                    sample = downsampler(sample)
                if down_add is not None:
                    sample = sample + down_add.pop(0)
                skips += (sample,)

    if down_block_additional_residuals is not None:
        if len(down_block_additional_residuals) != len(skips):
            raise ValueError(
                f"expected {len(skips)} ControlNet down residuals, got {len(down_block_additional_residuals)}"
            )
        skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))

    # 4. mid (the whole block), then its residual
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(
                sample,
                emb,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                cross_attention_kwargs=cross_attention_kwargs,
                encoder_attention_mask=encoder_attention_mask,
            )
        else:
            sample = unet.mid_block(sample, emb)
    if mid_block_additional_residual is not None:
        sample = sample + mid_block_additional_residual
    if mid_block_add_sample is not None:
        sample = sample + mid_block_add_sample

    # 5. up: residual after each resnet (+attention) and after the upsampler
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        res_tuple, skips = skips[-n:], skips[:-n]
        if i < len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        freeu = all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2"))
        attentions = getattr(block, "attentions", None) or [None] * n
        with block_hooks(block):
            for resnet, attn in zip(block.resnets, attentions):
                res_hidden, res_tuple = res_tuple[-1], res_tuple[:-1]
                if freeu:
                    sample, res_hidden = apply_freeu(
                        block.resolution_idx,
                        sample,
                        res_hidden,
                        s1=block.s1,
                        s2=block.s2,
                        b1=block.b1,
                        b2=block.b2,
                    )
                sample = torch.cat([sample, res_hidden], dim=1)
                sample = _run(block, resnet, sample, emb)
                if attn is not None:
                    sample = attn(sample, **attn_kwargs)[0]
                if up_add is not None:
                    sample = sample + up_add.pop(0)
            if block.upsamplers is not None:
                for upsampler in block.upsamplers:
                    sample = upsampler(sample, upsample_size)
                if up_add is not None:
                    sample = sample + up_add.pop(0)

    # 6. post-process
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


# torch.compile(unet) wrappers -> the injected forward compiled with the same settings (one per wrapper)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def run_unet_with_brushnet(unet: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
    """:func:`unet_forward_with_brushnet` as a *call* of ``unet``: what a pipeline should use.

    - The hooks on the UNet's ``forward`` fire around the injected forward (accelerate's model and sequential
      CPU offload, diffusers' group offloading; see :mod:`brushnet.models.hooks`), so an offloaded UNet is on
      the execution device while it runs and the previous model is offloaded, exactly as for ``unet(...)``.
    - A ``torch.compile``-wrapped UNet (``pipe.unet = torch.compile(pipe.unet)``) runs the injected forward
      compiled with the wrapper's own settings (backend, mode, ``fullgraph``), compiled once per wrapper.

    Args and returns: as :func:`unet_forward_with_brushnet` (``unet`` may be compiled).
    """
    module = unwrap_compiled(unet)
    function = unet_forward_with_brushnet
    if module is not unet:
        function = _COMPILED.get(unet)
        if function is None:
            function = _COMPILED[unet] = unet.dynamo_ctx(unet_forward_with_brushnet)
    return run_hooked(module, functools.partial(function, module), *args, **kwargs)
