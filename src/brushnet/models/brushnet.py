"""The BrushNet branch (Ju et al., "BrushNet: A Plug-and-Play Image Inpainting Model with Decomposed
Dual-Branch Diffusion", ECCV 2024, arXiv:2403.06976).

The branch is a copy of the Stable Diffusion UNet without cross-attention (for SD1.5/SDXL; PowerPaint v2's
branch keeps it and reads its own text, see :mod:`brushnet.pipelines.pipeline_powerpaint`). It reads the
concatenation of the noisy latent, the VAE latent of the masked image and the keep-mask at latent size,
and returns one residual per layer of the frozen base UNet, each through a zero-initialised 1×1 conv.
Those residuals are added into the base UNet by :func:`brushnet.models.unet_injection.unet_forward_with_brushnet`.

Weight-compatible with the released checkpoints: the module names, config keys and state-dict keys are
those of the original implementation (see ``tests/fixtures/manifests``).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import (
    ADDED_KV_ATTENTION_PROCESSORS,
    CROSS_ATTENTION_PROCESSORS,
    AttnAddedKVProcessor,
    AttnProcessor,
)
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import (
    UNetMidBlock2D,
    UNetMidBlock2DCrossAttn,
    get_down_block,
    get_up_block,
)
from diffusers.utils import BaseOutput
from torch import nn

from .hooks import block_hooks

__all__ = ["BrushNetModel", "BrushNetOutput"]


@dataclass
class BrushNetOutput(BaseOutput):
    """Residuals of the branch, already multiplied by the conditioning scale.

    Args:
        down_block_res_samples: one tensor per down tap (conv_in, every down resnet, every downsampler).
        mid_block_res_sample: the mid-block tap.
        up_block_res_samples: one tensor per up tap (every up resnet, every upsampler).
    """

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor
    up_block_res_samples: tuple[torch.Tensor, ...]


def _zero_module(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class BrushNetModel(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    """The BrushNet branch.

    Config keys mirror the released checkpoints' ``config.json``. Keys that build nothing in the original
    (``conditioning_embedding_out_channels``, ``brushnet_conditioning_channel_order``, ``global_pool_conditions``
    is honoured, ``addition_embed_type_num_heads``, ...) are accepted and kept so a checkpoint round-trips.
    ``mid_block_type="MidBlock2D"`` (the original's name) is a mid block of two plain resnets.

    Like diffusers' ControlNet it has ``attn_processors`` / ``set_attn_processor`` / fused QKV projections (for
    a branch with cross-attention, e.g. PowerPaint's) and PEFT adapters (``add_adapter``, ``load_lora_adapter``).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 5,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"),
        mid_block_type: str | None = "MidBlock2D",
        up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool | None = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: int | None = None,
        brushnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        # The original inherits this naming bug from diffusers' UNet: `attention_head_dim` holds the number of heads.
        num_attention_heads = num_attention_heads or attention_head_dim
        n_blocks = len(block_out_channels)
        if len(down_block_types) != n_blocks or len(up_block_types) != n_blocks:
            raise ValueError(
                f"down_block_types ({len(down_block_types)}), up_block_types ({len(up_block_types)}) and "
                f"block_out_channels ({n_blocks}) must have the same length"
            )
        if encoder_hid_dim_type is not None or class_embed_type is not None or num_class_embeds is not None:
            raise ValueError(
                "BrushNetModel supports neither encoder_hid_dim_type nor class embeddings "
                f"(got encoder_hid_dim_type={encoder_hid_dim_type!r}, class_embed_type={class_embed_type!r}, "
                f"num_class_embeds={num_class_embeds!r})"
            )
        if addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type must be None or 'text_time', got {addition_embed_type!r}")

        def per_block(value, name):
            if isinstance(value, (list, tuple)):
                if len(value) != n_blocks:
                    raise ValueError(f"{name} has {len(value)} entries for {n_blocks} blocks")
                return list(value)
            return [value] * n_blocks

        only_cross_attention = per_block(only_cross_attention, "only_cross_attention")
        num_attention_heads = per_block(num_attention_heads, "num_attention_heads")
        transformer_layers_per_block = per_block(transformer_layers_per_block, "transformer_layers_per_block")
        head_dims = per_block(attention_head_dim, "attention_head_dim")

        # input: noisy latent (in_channels) + masked-image latent and keep-mask (conditioning_channels)
        self.conv_in_condition = nn.Conv2d(
            in_channels + conditioning_channels, block_out_channels[0], kernel_size=3, padding=1
        )

        # time
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)
        if addition_embed_type == "text_time":
            if addition_time_embed_dim is None or projection_class_embeddings_input_dim is None:
                raise ValueError(
                    "addition_embed_type='text_time' needs addition_time_embed_dim and "
                    "projection_class_embeddings_input_dim"
                )
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)

        # down
        self.down_blocks = nn.ModuleList()
        self.brushnet_down_blocks = nn.ModuleList()
        output_channel = block_out_channels[0]
        self.brushnet_down_blocks.append(_zero_module(nn.Conv2d(output_channel, output_channel, 1)))
        for i, down_block_type in enumerate(down_block_types):
            input_channel = output_channel
            output_channel = block_out_channels[i]
            is_final_block = i == n_blocks - 1
            self.down_blocks.append(
                get_down_block(
                    down_block_type,
                    num_layers=layers_per_block,
                    transformer_layers_per_block=transformer_layers_per_block[i],
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    add_downsample=not is_final_block,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=num_attention_heads[i],
                    attention_head_dim=head_dims[i] if head_dims[i] is not None else output_channel,
                    downsample_padding=downsample_padding,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=only_cross_attention[i],
                    upcast_attention=bool(upcast_attention),
                    resnet_time_scale_shift=resnet_time_scale_shift,
                )
            )
            for _ in range(layers_per_block):
                self.brushnet_down_blocks.append(_zero_module(nn.Conv2d(output_channel, output_channel, 1)))
            if not is_final_block:
                self.brushnet_down_blocks.append(_zero_module(nn.Conv2d(output_channel, output_channel, 1)))

        # mid
        mid_channel = block_out_channels[-1]
        if mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(
                transformer_layers_per_block=transformer_layers_per_block[-1],
                in_channels=mid_channel,
                temb_channels=time_embed_dim,
                resnet_eps=norm_eps,
                resnet_act_fn=act_fn,
                output_scale_factor=mid_block_scale_factor,
                resnet_time_scale_shift=resnet_time_scale_shift,
                cross_attention_dim=cross_attention_dim,
                num_attention_heads=num_attention_heads[-1],
                resnet_groups=norm_num_groups,
                use_linear_projection=use_linear_projection,
                upcast_attention=bool(upcast_attention),
            )
        elif mid_block_type in ("MidBlock2D", "UNetMidBlock2D"):
            self.mid_block = UNetMidBlock2D(
                in_channels=mid_channel,
                temb_channels=time_embed_dim,
                num_layers=1,  # two resnets
                resnet_eps=norm_eps,
                resnet_act_fn=act_fn,
                output_scale_factor=mid_block_scale_factor,
                resnet_groups=norm_num_groups,
                resnet_time_scale_shift=resnet_time_scale_shift,
                add_attention=False,
            )
        else:
            raise ValueError(
                f"mid_block_type must be 'MidBlock2D' or 'UNetMidBlock2DCrossAttn', got {mid_block_type!r}"
            )
        self.brushnet_mid_block = _zero_module(nn.Conv2d(mid_channel, mid_channel, 1))

        # up: the branch's own decoder, tapped after every resnet and every upsampler
        self.up_blocks = nn.ModuleList()
        self.brushnet_up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        reversed_heads = list(reversed(num_attention_heads))
        reversed_layers = list(reversed(transformer_layers_per_block))
        reversed_cross_only = list(reversed(only_cross_attention))
        reversed_head_dims = list(reversed(head_dims))
        output_channel = reversed_channels[0]
        for i, up_block_type in enumerate(up_block_types):
            is_final_block = i == n_blocks - 1
            prev_output_channel = output_channel
            output_channel = reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, n_blocks - 1)]
            self.up_blocks.append(
                get_up_block(
                    up_block_type,
                    num_layers=layers_per_block + 1,
                    transformer_layers_per_block=reversed_layers[i],
                    in_channels=input_channel,
                    out_channels=output_channel,
                    prev_output_channel=prev_output_channel,
                    temb_channels=time_embed_dim,
                    add_upsample=not is_final_block,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resolution_idx=i,
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=reversed_heads[i],
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=reversed_cross_only[i],
                    upcast_attention=bool(upcast_attention),
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    attention_head_dim=reversed_head_dims[i]
                    if reversed_head_dims[i] is not None
                    else output_channel,
                )
            )
            for _ in range(layers_per_block + 1):
                self.brushnet_up_blocks.append(_zero_module(nn.Conv2d(output_channel, output_channel, 1)))
            if not is_final_block:
                self.brushnet_up_blocks.append(_zero_module(nn.Conv2d(output_channel, output_channel, 1)))

        self.num_upsamplers = n_blocks - 1
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------------------------------------
    @property
    def uses_text(self) -> bool:
        """Whether the residuals depend on the prompt (cross-attention blocks or an SDXL text_time embedding).

        When False (SD1.5 BrushNet), the pipeline runs the branch once per step even with classifier-free
        guidance, since both halves of the guidance batch give identical residuals.
        """
        return self.config.addition_embed_type is not None or any(
            getattr(block, "has_cross_attention", False) for block in [*self.down_blocks, self.mid_block]
        )

    def set_default_attn_processor(self) -> None:
        """Reset every attention layer to diffusers' default processor (as ``UNet2DConditionModel`` does)."""
        processors = self.attn_processors.values()
        if all(proc.__class__ in ADDED_KV_ATTENTION_PROCESSORS for proc in processors):
            processor = AttnAddedKVProcessor()
        elif all(proc.__class__ in CROSS_ATTENTION_PROCESSORS for proc in processors):
            processor = AttnProcessor()
        else:
            raise ValueError(
                "cannot reset attention processors of mixed types: "
                f"{sorted({type(p).__name__ for p in processors})}"
            )
        self.set_attn_processor(processor)

    @property
    def num_down_residuals(self) -> int:
        return len(self.brushnet_down_blocks)

    @property
    def num_up_residuals(self) -> int:
        return len(self.brushnet_up_blocks)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> BrushNetModel:
        """diffusers' ``ModelMixin.from_pretrained`` (every argument the same), after a check of the source that
        reads nothing but its config: a missing path, a file, a pipeline folder (loaded with
        ``subfolder="brushnet"``), a folder of another model (a UNet, a ControlNet, a PowerPaint checkpoint) and,
        offline, a hub id not in the cache are each a one-line :class:`~brushnet.errors.CheckpointError`
        (:func:`brushnet.loading.check_brushnet_source`) instead of a multi-line diffusers error or, for a UNet
        folder, a branch of random weights."""
        from ..loading import check_brushnet_source, is_local_path
        from ..model_files import check_model_folder

        hub = {
            k: kwargs[k] for k in ("cache_dir", "revision", "local_files_only") if kwargs.get(k) is not None
        }
        check_brushnet_source(pretrained_model_name_or_path, kwargs.get("subfolder"), **hub)
        if is_local_path(pretrained_model_name_or_path):
            # "~/branch" passes the check (it expands the path); diffusers does not expand it
            pretrained_model_name_or_path = os.path.expanduser(str(pretrained_model_name_or_path))
            # a weight file missing some of the branch's weights would load them as random (or meta) tensors
            # with only diffusers' warning; pickle files are diffusers' to read (their names are not checked)
            folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
            names = ("BrushNetModel", cls.__name__)  # a subclass loads a BrushNetModel folder
            check_model_folder(folder, cls, expected=names, allow_pickle=True, variant=kwargs.get("variant"))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @staticmethod
    def config_from_unet(unet_config, conditioning_channels: int = 5, cross_attention: bool = False) -> dict:
        """The config of a branch made for a UNet (see :meth:`from_unet`), without building anything.

        Args:
            unet_config: a ``UNet2DConditionModel`` config (``unet.config`` or the dict of its config.json).
            conditioning_channels: channels of ``brushnet_cond`` (masked-image latent + mask).
            cross_attention: keep the UNet's cross-attention block types (PowerPaint v2's branch).
        """

        defaults = {}
        if isinstance(
            unet_config, dict
        ):  # a config.json of an older diffusers lacks later keys: their defaults
            from diffusers import UNet2DConditionModel

            parameters = inspect.signature(UNet2DConditionModel.__init__).parameters.values()
            defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}

        def get(key):
            if isinstance(unet_config, dict):
                return unet_config.get(key, defaults.get(key))
            return getattr(unet_config, key)

        def block(block_type: str, kind: str) -> str:
            if cross_attention:
                return block_type
            return f"{kind}Block2D" if "CrossAttn" in block_type else block_type

        mid_block_type = "MidBlock2D"
        if cross_attention:
            if get("mid_block_type") not in (None, "UNetMidBlock2DCrossAttn"):
                raise ValueError(f"cannot keep cross-attention with a {get('mid_block_type')!r} mid block")
            mid_block_type = "UNetMidBlock2DCrossAttn"
        return dict(
            in_channels=get("in_channels"),
            conditioning_channels=conditioning_channels,
            flip_sin_to_cos=get("flip_sin_to_cos"),
            freq_shift=get("freq_shift"),
            down_block_types=tuple(block(t, "Down") for t in get("down_block_types")),
            mid_block_type=mid_block_type,
            up_block_types=tuple(block(t, "Up") for t in get("up_block_types")),
            block_out_channels=tuple(get("block_out_channels")),
            layers_per_block=get("layers_per_block"),
            downsample_padding=get("downsample_padding"),
            mid_block_scale_factor=get("mid_block_scale_factor"),
            act_fn=get("act_fn"),
            norm_num_groups=get("norm_num_groups"),
            norm_eps=get("norm_eps"),
            cross_attention_dim=get("cross_attention_dim"),
            transformer_layers_per_block=get("transformer_layers_per_block"),
            attention_head_dim=get("attention_head_dim"),
            num_attention_heads=get("num_attention_heads"),
            use_linear_projection=get("use_linear_projection"),
            addition_embed_type=get("addition_embed_type"),
            addition_time_embed_dim=get("addition_time_embed_dim"),
            upcast_attention=get("upcast_attention"),
            resnet_time_scale_shift=get("resnet_time_scale_shift"),
            projection_class_embeddings_input_dim=get("projection_class_embeddings_input_dim"),
        )

    @classmethod
    def from_unet(
        cls,
        unet,
        conditioning_channels: int = 5,
        copy_add_embedding: bool = True,
        cross_attention: bool = False,
    ) -> BrushNetModel:
        """Initialise a branch from a ``UNet2DConditionModel``, as the original does.

        Time embedding and every resnet / downsampler / upsampler weight are copied by name (attention
        weights are dropped for the attention-free branch; with ``cross_attention`` the branch keeps the
        UNet's block types and copies every attention weight too, as PowerPaint v2's branch).
        ``conv_in_condition`` gets the UNet's ``conv_in`` kernel on both the noisy-latent channels (0:4) and
        the masked-image-latent channels (4:8), zero on the mask channel, and the UNet's conv_in bias. All
        taps are zero, so a fresh branch changes nothing.

        Args:
            unet: the base UNet (SD1.5 or SDXL layout).
            conditioning_channels: channels of ``brushnet_cond`` (masked-image latent + mask).
            copy_add_embedding: copy SDXL's ``add_embedding`` too. The original leaves it random (a known
                weakness); pass False to reproduce that.
            cross_attention: keep the cross-attention blocks (PowerPaint v2: the branch reads its own text).
        """
        ucfg = unet.config
        n_blocks = len(ucfg.block_out_channels)
        brushnet = cls(**cls.config_from_unet(ucfg, conditioning_channels, cross_attention))
        if n_blocks != len(brushnet.down_blocks):
            raise ValueError("unexpected UNet layout")
        if unet.dtype != torch.float32:
            brushnet = brushnet.to(dtype=unet.dtype)

        with torch.no_grad():
            in_ch = ucfg.in_channels
            weight = torch.zeros_like(brushnet.conv_in_condition.weight)
            weight[:, :in_ch] = unet.conv_in.weight
            weight[:, in_ch : 2 * in_ch] = unet.conv_in.weight
            brushnet.conv_in_condition.weight.copy_(weight)
            brushnet.conv_in_condition.bias.copy_(unet.conv_in.bias)

            brushnet.time_proj.load_state_dict(unet.time_proj.state_dict())
            # an LCM-distilled UNet's guidance embedding (``cond_proj``) has no counterpart in the branch
            time_embedding = {
                k: v for k, v in unet.time_embedding.state_dict().items() if not k.startswith("cond_proj.")
            }
            brushnet.time_embedding.load_state_dict(time_embedding)
            if copy_add_embedding and hasattr(brushnet, "add_embedding") and hasattr(unet, "add_embedding"):
                brushnet.add_embedding.load_state_dict(unet.add_embedding.state_dict())

            for name in ("down_blocks", "mid_block", "up_blocks"):
                target = getattr(brushnet, name)
                source = {k: v for k, v in getattr(unet, name).state_dict().items()}
                own = target.state_dict()
                copied = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
                target.load_state_dict(copied, strict=False)
        return brushnet

    # ------------------------------------------------------------------------------------------------
    def _time_embedding(self, sample, timestep, added_cond_kwargs, timestep_cond):
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            if sample.device.type in ("mps", "npu"):
                dtype = torch.float32 if isinstance(timestep, float) else torch.int32
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(sample.shape[0])
        t_emb = self.time_proj(timesteps).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb, timestep_cond)

        if self.config.addition_embed_type == "text_time":
            if (
                not added_cond_kwargs
                or "text_embeds" not in added_cond_kwargs
                or "time_ids" not in added_cond_kwargs
            ):
                raise ValueError(
                    "this BrushNet has an SDXL text_time embedding: pass "
                    "added_cond_kwargs={'text_embeds': ..., 'time_ids': ...}"
                )
            text_embeds = added_cond_kwargs["text_embeds"]
            time_ids = added_cond_kwargs["time_ids"]
            time_embeds = self.add_time_proj(time_ids.flatten())
            time_embeds = time_embeds.reshape((text_embeds.shape[0], -1))
            add_embeds = torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
            emb = emb + self.add_embedding(add_embeds)
        return emb

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None,
        brushnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> BrushNetOutput | tuple:
        """Compute the residuals for the base UNet.

        Args:
            sample: noisy latent, ``(B, 4, h, w)``.
            timestep: diffusion timestep (scalar or ``(B,)``).
            encoder_hidden_states: text embeddings ``(B, L, D)``. Read only by cross-attention branches
                (PowerPaint); the SD1.5 branch ignores it.
            brushnet_cond: ``(B, 5, h, w)``: VAE latent of the masked image (4) and the keep-mask
                (1 = keep, 0 = hole) at latent size.
            conditioning_scale: multiplies every residual (the preservation scale).
            guess_mode: instead scale by ``logspace(-1, 0, n_down + 1 + n_up)`` times ``conditioning_scale``.
            added_cond_kwargs: SDXL ``{"text_embeds", "time_ids"}``.

        Returns:
            :class:`BrushNetOutput` or ``(down residuals, mid residual, up residuals)``.
        """
        if brushnet_cond.shape[1] != self.config.conditioning_channels:
            raise ValueError(
                f"brushnet_cond has {brushnet_cond.shape[1]} channels; this branch expects "
                f"{self.config.conditioning_channels} (masked-image latent + keep-mask)"
            )
        if brushnet_cond.shape[0] != sample.shape[0] or brushnet_cond.shape[-2:] != sample.shape[-2:]:
            raise ValueError(
                f"brushnet_cond {tuple(brushnet_cond.shape)} does not match sample {tuple(sample.shape)}"
            )
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)

        # upsample sizes must be forwarded when the latent is not a multiple of the total downsampling
        forward_upsample_size = any(dim % (2**self.num_upsamplers) != 0 for dim in sample.shape[-2:])
        emb = self._time_embedding(sample, timestep, added_cond_kwargs, timestep_cond)
        sample = self.conv_in_condition(torch.cat([sample, brushnet_cond], dim=1))

        cross_kwargs = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
        )

        # down: the stock blocks already return every resnet output and the downsampler output
        down_samples: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, **cross_kwargs)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            down_samples += res

        # mid
        if getattr(self.mid_block, "has_cross_attention", False):
            sample = self.mid_block(sample, emb, **cross_kwargs)
        else:
            sample = self.mid_block(sample, emb)
        mid_sample = sample

        # up: iterate the stock blocks' submodules to tap after every resnet and upsampler
        upsample_size = None
        skips = down_samples
        up_samples: tuple[torch.Tensor, ...] = ()
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            res_tuple, skips = skips[-n:], skips[:-n]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            attentions = getattr(block, "attentions", None) or [None] * n
            with block_hooks(block):  # block-level offloading: it is run resnet by resnet
                for resnet, attn in zip(block.resnets, attentions):
                    res_hidden, res_tuple = res_tuple[-1], res_tuple[:-1]
                    sample = torch.cat([sample, res_hidden], dim=1)
                    if torch.is_grad_enabled() and self.gradient_checkpointing:
                        sample = self._gradient_checkpointing_func(resnet, sample, emb)
                    else:
                        sample = resnet(sample, emb)
                    if attn is not None:
                        sample = attn(
                            sample,
                            encoder_hidden_states=encoder_hidden_states,
                            cross_attention_kwargs=cross_attention_kwargs,
                            attention_mask=attention_mask,
                            return_dict=False,
                        )[0]
                    up_samples += (sample,)
                if block.upsamplers is not None:
                    for upsampler in block.upsamplers:
                        sample = upsampler(sample, upsample_size)
                    up_samples += (sample,)

        down_residuals = tuple(tap(s) for s, tap in zip(down_samples, self.brushnet_down_blocks, strict=True))
        mid_residual = self.brushnet_mid_block(mid_sample)
        up_residuals = tuple(tap(s) for s, tap in zip(up_samples, self.brushnet_up_blocks, strict=True))

        if guess_mode and not self.config.global_pool_conditions:
            n_down, n_up = len(down_residuals), len(up_residuals)
            scales = torch.logspace(-1, 0, n_down + 1 + n_up, device=sample.device) * conditioning_scale
            down_residuals = tuple(r * s for r, s in zip(down_residuals, scales[:n_down]))
            mid_residual = mid_residual * scales[n_down]
            up_residuals = tuple(r * s for r, s in zip(up_residuals, scales[n_down + 1 :]))
        else:
            down_residuals = tuple(r * conditioning_scale for r in down_residuals)
            mid_residual = mid_residual * conditioning_scale
            up_residuals = tuple(r * conditioning_scale for r in up_residuals)

        if self.config.global_pool_conditions:
            down_residuals = tuple(r.mean(dim=(2, 3), keepdim=True) for r in down_residuals)
            mid_residual = mid_residual.mean(dim=(2, 3), keepdim=True)
            up_residuals = tuple(r.mean(dim=(2, 3), keepdim=True) for r in up_residuals)

        if not return_dict:
            return down_residuals, mid_residual, up_residuals
        return BrushNetOutput(
            down_block_res_samples=down_residuals,
            mid_block_res_sample=mid_residual,
            up_block_res_samples=up_residuals,
        )
