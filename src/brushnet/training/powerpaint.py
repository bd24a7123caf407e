"""Training a PowerPaint v2-style model (Zhuang et al., ECCV 2024, §3): a BrushNet branch that keeps
cross-attention, and the learned vectors of the task words it reads through its own text encoder.

What trains, as in PowerPaint's own training: the branch, and the rows of the branch text encoder's
token-embedding table that belong to the task words (``P_ctxt``, ``P_shape``, ``P_obj``, ten vectors each,
initialised as copies of the embedding of ``"a"``, as the original adds them). The rest of that text encoder
and the whole base (VAE, UNet, its text encoder) are frozen; the other embedding rows get no gradient and are
restored before every step (weight decay would otherwise move them), as the original restores them after
every step. One step, per sample with task ``τ`` and the user's text ``p`` (``task_prompts(τ, p)``: the
branch reads the task words ``A``, the UNet reads ``U`` = ``p`` plus the task's suffix):

    z₀ = E(x)·s,   c = [E(x ⊙ (1−m) − m)·s, 1 − resize_nearest(m)]     as BrushNet (models.conditioning)
    ε̂  = UNet(z_t, t, T_base(U); Branch(z_t, t, c, T_branch(A)))
    loss = ‖ε̂ − ε‖²  (or the v target)

The task decides what ``x`` and ``m`` are (the data's job, not this module's): e.g. an object's hole with its
phrase for ``text-guided``, its exact silhouette for ``shape-guided``, the scene *without* the object for
``object-removal``. The branch's inputs are the same as BrushNet's, so this module reuses the branch loop's
pieces (:mod:`brushnet.training.loop`); it does not change how a BrushNet branch trains.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from ..models.brushnet import BrushNetModel
from ..models.task_tokens import add_task_tokens, task_token_ids
from ..pipelines.powerpaint_prompts import TASKS, encode_text, task_prompts
from .loop import Components, branch_denoising_loss, drop_texts

__all__ = ["PowerPaintModel", "powerpaint_training_loss"]


class PowerPaintModel(nn.Module):
    """The trained parts of a PowerPaint v2-style model: ``brushnet`` (a :class:`BrushNetModel` with
    cross-attention) and ``text_encoder`` (the branch's ``CLIPTextModel``, vocabulary extended by the 30 task
    rows; only those rows learn). ``tokenizer`` is the base tokenizer with the task placeholders added.

    Build one with :meth:`from_base`; write it with :meth:`save_pretrained` (the layout
    :func:`brushnet.loading_powerpaint.load_powerpaint_pipeline` loads).
    """

    def __init__(self, brushnet: BrushNetModel, text_encoder: nn.Module, tokenizer):
        super().__init__()
        if not brushnet.uses_text:
            raise ValueError(
                "a PowerPaint branch needs cross-attention (BrushNetModel.from_unet(..., cross_attention=True))"
            )
        self.brushnet = brushnet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        ids = task_token_ids(tokenizer)
        self.first_task_id = min(i for row in ids.values() for i in row)
        table = text_encoder.get_input_embeddings().weight
        if table.shape[0] != len(tokenizer):
            raise ValueError(
                f"the text encoder has {table.shape[0]} rows for a tokenizer of {len(tokenizer)}"
            )
        text_encoder.requires_grad_(False)
        table.requires_grad_(True)
        self.register_buffer("base_rows", table.detach()[: self.first_task_id].clone(), persistent=False)

        def only_task_rows(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[: self.first_task_id] = 0
            return grad

        table.register_hook(only_task_rows)

    @classmethod
    def from_base(cls, unet, text_encoder, tokenizer, init_word: str = "a") -> PowerPaintModel:
        """A fresh model for a base: the branch ``from_unet`` with cross-attention (every UNet weight copied,
        taps zero), and a copy of the base text encoder whose 30 new task rows are each the embedding of
        ``init_word`` (the original's initialisation)."""
        brushnet = BrushNetModel.from_unet(unet, cross_attention=True)
        tokenizer = copy.deepcopy(tokenizer)
        add_task_tokens(tokenizer)
        encoder = copy.deepcopy(text_encoder).float()
        base_rows = encoder.get_input_embeddings().weight.shape[0]
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        init_id = tokenizer(init_word).input_ids[1]
        with torch.no_grad():
            table = encoder.get_input_embeddings().weight
            table[base_rows:] = table[init_id]
        return cls(brushnet.float(), encoder, tokenizer)

    def restore_base_rows(self) -> None:
        """Put back the base vocabulary's rows of the embedding table (only the task rows are trained)."""
        with torch.no_grad():
            self.text_encoder.get_input_embeddings().weight[: self.first_task_id] = self.base_rows

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write ``PowerPaint_Brushnet/`` and ``text_encoder_brushnet/`` (safetensors)."""
        from ..loading_powerpaint import save_powerpaint

        self.restore_base_rows()
        return save_powerpaint(out_dir, self.brushnet, self.text_encoder)


def powerpaint_training_loss(
    model: PowerPaintModel,
    components: Components,
    batch: dict,
    generator: torch.Generator,
    *,
    weight_dtype: torch.dtype = torch.float32,
    prediction_type: str = "epsilon",
    caption_dropout: float = 0.0,
    task_dropout: float = 0.0,
) -> torch.Tensor:
    """The loss of one micro-batch (see the module docstring).

    Args:
        model: the trained parts.
        components: the frozen base (:func:`brushnet.training.loop.load_components`), on the model's device.
        batch: ``{"pixel_values": (B, 3, H, W) in [-1, 1] (the target image), "mask": (B, 1, H, W) 1 = hole,
            "caption": [the user's text per sample], "task": [a task of TASKS per sample]}``.
        generator: CPU generator for dropout, posterior samples, noise and timesteps.
        weight_dtype: dtype of the frozen parts.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        caption_dropout: probability of replacing the user's text by ``""``.
        task_dropout: probability of replacing the branch's task text by ``""`` (the unconditional branch
            text context-aware guidance uses).

    Returns:
        Scalar float32 MSE over the whole latent.
    """
    device = next(components.unet.parameters()).device
    unknown = [task for task in batch["task"] if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown PowerPaint task {unknown[0]!r}; choose one of: {', '.join(TASKS)}")

    captions = drop_texts(batch["caption"], caption_dropout, generator)
    prompts = [task_prompts(task, caption, "", "v2") for task, caption in zip(batch["task"], captions)]
    branch_texts = drop_texts([p.prompt_a for p in prompts], task_dropout, generator)

    model.restore_base_rows()
    branch_hidden = encode_text(model.text_encoder, model.tokenizer, branch_texts, device)
    with torch.no_grad():
        unet_hidden, _ = components.family.encode(
            [p.unet_prompt for p in prompts], device, weight_dtype, batch
        )
    return branch_denoising_loss(
        model.brushnet,
        components,
        batch,
        generator,
        branch_hidden,
        unet_hidden,
        weight_dtype=weight_dtype,
        prediction_type=prediction_type,
    )
