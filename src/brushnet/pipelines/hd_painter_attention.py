"""HD-Painter's attention changes as diffusers attention processors (Manukyan et al., "HD-Painter:
High-Resolution and Prompt-Faithful Text-Guided Image Inpainting with Diffusion Models", arXiv 2312.14091).

- **PAIntA** (prompt-aware introverted attention, §3.2): in the self-attention of the transformer blocks at
  1/2 and 1/4 of the latent resolution, the pre-softmax scores of a hole query on a known key are multiplied
  by how relevant that key is to the prompt, ``S'_ij = S_ij · c_ij`` with ``c_ij = r_j`` if ``i`` is in the
  hole and ``j`` is not, else 1. The relevance ``r_j`` is the block's own cross-attention probability of
  pixel ``j`` on the prompt's tokens (conditional half, heads averaged), computed on
  ``norm2(x + attn1(x))`` (the unmodified self-attention output), smoothed with a 3×3 kernel and
  normalised to ``clip((r − median r) / max r, 0, 1)``; the same ``c`` serves both CFG halves.
- **RASG** (reweighting attention score guidance, §3.3): the cross-attention scores (pre-softmax) of the
  layers at 1/4 of the latent resolution are collected from the conditional half, for the pipeline's loss.

:func:`hd_painter_attention` installs the processors on a stock ``UNet2DConditionModel`` for the duration of
a ``with`` block and puts the previous processors back afterwards, also when the block raises; layers the
method does not touch (and touched layers while their part is off) run the processor that was there before.
The block input ``x`` that PAIntA needs is read by forward pre-hooks on the ``BasicTransformerBlock`` s,
removed with the processors. The numerics follow the original code (github.com/Picsart-AI-Research/
HD-Painter @ d452186; ``tools/hd_painter_reference/FACTS.md`` §5–6): which layers, the kernel, the median, the
logits (not probabilities) being multiplied.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["HDPainterAttentionState", "PAIntAAttnProcessor", "RASGAttnProcessor", "hd_painter_attention"]


def _smoothing_kernel(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The original's 3×3 smoothing kernel: the outer product of ``[e⁻¹, 1, e⁻¹]``, normalised to sum 1
    (it evaluates ``exp(−((x − μ) / (2σ))²)`` with σ = 0.5: Attend-and-Excite's formula, not a true Gaussian
    of σ = 0.5)."""
    one_d = torch.exp(-((torch.arange(3, dtype=torch.float64) - 1.0) ** 2))
    kernel = one_d[:, None] * one_d[None, :]
    return (kernel / kernel.sum()).to(device=device, dtype=dtype)[None, None]


@dataclass
class HDPainterAttentionState:
    """What the processors share during one pipeline call (set by the pipeline before each UNet call).

    Args:
        latent_size: ``(h, w)`` of the UNet's latent input; a layer's scale is ``√(h·w / tokens)``.
        masks: latent downscale (1, 2, 4, …) → ``(B, tokens)`` float, 1 = hole, at that layer size.
        token_weights: ``(B, text_tokens)`` float, 1 on the prompt tokens PAIntA and RASG look at.
        cfg: whether the UNet batch is ``[unconditional; conditional]`` (else conditional only).
        painta_scales: latent downscales of the self-attention layers PAIntA re-weights (original: 2, 4).
        rasg_scale: latent downscale of the cross-attention layers RASG reads (original: 4).
    """

    latent_size: tuple[int, int]
    masks: dict[int, torch.Tensor]
    token_weights: torch.Tensor
    cfg: bool
    painta_scales: tuple[int, ...] = (2, 4)
    rasg_scale: int = 4
    #: PAIntA re-weights on this UNet call
    painta: bool = False
    #: RASG collects cross-attention scores on this UNet call
    rasg: bool = False
    #: ``(B, heads, tokens, text_tokens)`` conditional-half scores of each RASG layer, in call order
    rasg_scores: list[torch.Tensor] = field(default_factory=list)
    #: names of the cross-attention layers RASG read on this call
    rasg_layers: list[str] = field(default_factory=list)
    #: names of the self-attention layers PAIntA re-weighted on this call (each for both CFG halves)
    painta_layers: list[str] = field(default_factory=list)
    #: block → (its input ``x``, its ``encoder_hidden_states``), read by the pre-hooks
    block_inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def start_call(self, painta: bool, rasg: bool) -> None:
        """Reset the per-call records and switch the two parts for the next UNet call."""
        self.painta, self.rasg = painta, rasg
        self.rasg_scores, self.rasg_layers, self.painta_layers = [], [], []
        self.block_inputs = {}

    def scale(self, tokens: int) -> int | None:
        """The latent downscale of a layer with ``tokens`` positions, or None if it is not a whole one."""
        h, w = self.latent_size
        k = int(round(math.sqrt(h * w / tokens)))
        if k < 1 or h % k or w % k or (h // k) * (w // k) != tokens:
            return None
        return k

    def layer_size(self, scale: int) -> tuple[int, int]:
        return self.latent_size[0] // scale, self.latent_size[1] // scale

    def conditional(self, tensor: torch.Tensor) -> torch.Tensor:
        """The conditional half of a CFG-doubled batch (the whole batch without CFG)."""
        return tensor.chunk(2)[1] if self.cfg else tensor


def _project(attn, hidden_states: torch.Tensor, context: torch.Tensor | None):
    """Queries, keys, values (heads moved into the batch) and the pre-softmax scores ``Q Kᵀ · scale``."""
    if context is None:
        context = hidden_states
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key = attn.head_to_batch_dim(attn.to_k(context))
    value = attn.head_to_batch_dim(attn.to_v(context))
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    scores = torch.bmm(query, key.transpose(-1, -2)) * attn.scale
    return value, scores


def _attend(attn, scores: torch.Tensor, value: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``to_out(softmax(scores) V)``, with the rest of diffusers' ``AttnProcessor`` (residual, rescale)."""
    probs = scores.float().softmax(dim=-1) if attn.upcast_softmax else scores.softmax(dim=-1)
    hidden_states = attn.batch_to_head_dim(torch.bmm(probs.to(value.dtype), value))
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _plain(attn) -> bool:
    """Whether an attention layer is the plain kind these processors reimplement (SD1.x/2.x transformers)."""
    return attn.spatial_norm is None and attn.group_norm is None


class PAIntAAttnProcessor:
    """Self-attention (``attn1``) of one ``BasicTransformerBlock`` with PAIntA (see the module docstring).

    Args:
        state: the call's shared :class:`HDPainterAttentionState`.
        block: the transformer block this layer belongs to (its ``norm2`` and ``attn2`` give the relevance).
        default: the processor that was installed before; it runs whenever PAIntA does not act here.
        name: the layer's name in the UNet (recorded in ``state.painta_layers`` when it acts).
    """

    def __init__(self, state: HDPainterAttentionState, block, default, name: str = ""):
        self.state, self.block, self.default, self.name = state, block, default, name

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
    ):
        state = self.state
        scale = state.scale(hidden_states.shape[1]) if hidden_states.ndim == 3 else None
        if (
            not state.painta
            or scale not in state.painta_scales
            or encoder_hidden_states is not None
            or attention_mask is not None
            or not _plain(attn)
        ):
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        value, scores = _project(attn, hidden_states, None)
        output = _attend(attn, scores, value, hidden_states)

        # prompt relevance r_j from the conditional half, on norm2(x + attn1(x)) with the unmodified output
        x, context = self.block_inputs()
        cross = self.block.attn2
        u = self.block.norm2(state.conditional(x) + state.conditional(output))
        context = state.conditional(context)
        if cross.norm_cross:
            context = cross.norm_encoder_hidden_states(context)
        batch, tokens = u.shape[0], u.shape[1]
        query = cross.head_to_batch_dim(cross.to_q(u)).float()
        key = cross.head_to_batch_dim(cross.to_k(context)).float()
        probs = (torch.bmm(query, key.transpose(-1, -2)) * cross.scale).softmax(dim=-1)
        probs = probs.view(batch, -1, tokens, probs.shape[-1]).mean(
            dim=1
        )  # (B, tokens, text), heads averaged
        relevance = torch.einsum("bnk,bk->bn", probs, state.token_weights.to(probs))
        relevance = F.conv2d(
            relevance.view(batch, 1, *state.layer_size(scale)),
            _smoothing_kernel(relevance.dtype, relevance.device),
            padding=1,
        ).view(batch, tokens)
        median = relevance.median(dim=-1, keepdim=True).values  # the lower middle value for even counts
        maximum = relevance.max(dim=-1, keepdim=True).values
        relevance = ((relevance - median) / maximum).clip(0, 1)

        # c_ij = r_j for a hole query i on a known key j, else 1; the same for every head and both CFG halves
        hole = state.masks[scale].to(relevance.device) > 0.5  # (B, tokens)
        coefficients = torch.where(hole[:, :, None] & ~hole[:, None, :], relevance[:, None, :], 1.0)
        halves = 2 if state.cfg else 1
        scores = scores.view(halves, batch, -1, tokens, tokens) * coefficients[None, :, None].to(scores.dtype)
        state.painta_layers.append(self.name)
        return _attend(attn, scores.view(-1, tokens, tokens), value, hidden_states)

    def block_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.state.block_inputs[id(self.block)]
        except KeyError:
            raise RuntimeError("PAIntA ran outside hd_painter_attention (no block input recorded)") from None


class RASGAttnProcessor:
    """Cross-attention (``attn2``) that records the conditional half's pre-softmax scores for RASG at the
    layers of ``state.rasg_scale``; everywhere else, and while RASG is off, the previous processor runs.

    Args:
        state: the call's shared :class:`HDPainterAttentionState`.
        default: the processor that was installed before.
        name: the layer's name in the UNet (recorded in ``state.rasg_layers`` when it is read).
    """

    def __init__(self, state: HDPainterAttentionState, default, name: str = ""):
        self.state, self.default, self.name = state, default, name

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
    ):
        state = self.state
        scale = state.scale(hidden_states.shape[1]) if hidden_states.ndim == 3 else None
        if (
            not state.rasg
            or scale != state.rasg_scale
            or encoder_hidden_states is None
            or attention_mask is not None
            or not _plain(attn)
        ):
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        value, scores = _project(attn, hidden_states, encoder_hidden_states)
        conditional = state.conditional(scores.view(hidden_states.shape[0], -1, *scores.shape[1:]))
        state.rasg_scores.append(conditional)
        state.rasg_layers.append(self.name)
        return _attend(attn, scores, value, hidden_states)


@contextlib.contextmanager
def hd_painter_attention(unet, state: HDPainterAttentionState) -> Iterator[None]:
    """Install PAIntA on the self-attention and RASG on the cross-attention of every transformer block of
    ``unet`` for the ``with`` block; afterwards (also after an exception) the UNet has exactly the processors
    it had before and no hook of this function is left.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD1.x/2.x layout; blocks without cross-attention keep
            their processors).
        state: shared by the processors; the caller switches the parts with ``state.start_call``.
    """
    from diffusers.models.attention import BasicTransformerBlock

    previous = unet.attn_processors
    blocks = {name: m for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)}
    processors = {}
    for name, processor in previous.items():
        block_name, layer = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
        block = blocks.get(block_name)
        if block is None or block.attn2 is None or block.only_cross_attention:
            processors[name] = processor
        elif layer == "attn1":
            processors[name] = PAIntAAttnProcessor(state, block, processor, name.removesuffix(".processor"))
        elif layer == "attn2":
            processors[name] = RASGAttnProcessor(state, processor, name.removesuffix(".processor"))
        else:
            processors[name] = processor

    def keep_inputs(block, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        state.block_inputs[id(block)] = (hidden_states, context)

    handles = []
    try:
        handles = [
            block.register_forward_pre_hook(keep_inputs, with_kwargs=True) for block in blocks.values()
        ]
        unet.set_attn_processor(processors)
        yield
    finally:
        for handle in handles:
            handle.remove()
        unet.set_attn_processor(previous)
        state.block_inputs, state.rasg_scores = {}, []
