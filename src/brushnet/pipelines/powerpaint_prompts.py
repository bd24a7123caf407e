"""PowerPaint's tasks as prompts (Zhuang et al., ECCV 2024, §3.2–3.3): which text each model reads for each
task, and the fitting-degree interpolation between two prompt embeddings.

The original builds these strings in its demo app (open-mmlab/PowerPaint ``app.py``, commit 5b4c3d5), not in
its pipelines, with different rules for v1 and v2; :func:`task_prompts` reproduces them character for
character (``tests/pipelines/test_powerpaint_prompts.py`` checks every string against the recorded ones).

- **v1** has one text encoder: the user's words and the task word go through it together (prompt A and B),
  with a fixed quality suffix on the negatives of the object tasks.
- **v2 / v2-1** have two: the branch's own encoder reads *only* task words (A and B), the base UNet reads
  *only* the user's words (plus "empty scene blur" / "empty scene" for removal / outpainting).

**Fitting degree** (the original's ``tradoff``): the embedding the model gets is
``t · E(A) + (1 − t) · E(B)`` with ``E`` the text encoder's last hidden state (all 77 positions), and the
same for the negatives with ``t_nag`` (the app passes the same value). Only shape-guided has A ≠ B
(``P_shape`` vs ``P_ctxt``), so only there does it matter: 1 fills the mask's shape, lower values let the
object ignore it.

``context-aware`` is not a task of the original app: it follows ComfyUI-BrushNet's "context aware" use of
PowerPaint (``P_ctxt`` with no negative task word), i.e. fill the hole from its surroundings without pushing
objects away as object-removal does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.task_tokens import expand_task_tokens, task_token_ids

__all__ = [
    "TASKS",
    "QUALITY_NEGATIVE",
    "TaskPrompts",
    "task_prompts",
    "encode_text",
    "encode_task_prompts",
    "encode_task_prompt_pair",
    "check_task_arguments",
]

TASKS: tuple[str, ...] = ("text-guided", "shape-guided", "object-removal", "context-aware", "outpainting")
"""PowerPaint's tasks (the original app calls outpainting ``image-outpainting``)."""

QUALITY_NEGATIVE = ", worst quality, low quality, normal quality, bad quality, blurry "
"""The suffix the original v1 app puts after the user's negative prompt for the object tasks."""


@dataclass(frozen=True)
class TaskPrompts:
    """The texts one task sends to the models (the original's argument names in brackets).

    Args:
        prompt_a, prompt_b: the two prompts interpolated by the fitting degree (``promptA``, ``promptB``);
            v1: read by the one text encoder, v2: by the branch's text encoder.
        negative_a, negative_b: their negatives (``negative_promptA``, ``negative_promptB``).
        unet_prompt, unet_negative: v2 only, what the base UNet reads through the base text encoder
            (``promptU``, ``negative_promptU``); ``None`` for v1.
    """

    prompt_a: str
    prompt_b: str
    negative_a: str
    negative_b: str
    unet_prompt: str | None = None
    unet_negative: str | None = None


def task_prompts(task: str, prompt: str = "", negative_prompt: str = "", version: str = "v2") -> TaskPrompts:
    """The prompts the original builds for ``task`` from the user's two text boxes.

    Args:
        task: one of :data:`TASKS`.
        prompt, negative_prompt: the user's texts (empty for none).
        version: ``"v1"`` or ``"v2"`` (v2-1 uses the v2 rules).

    Raises:
        ValueError: unknown task or version.
    """
    if task not in TASKS:
        raise ValueError(f"unknown PowerPaint task {task!r}; choose one of: {', '.join(TASKS)}")
    if version not in ("v1", "v2"):
        raise ValueError(f"unknown PowerPaint version {version!r}; choose v1 or v2")
    if version == "v1":
        if task == "text-guided":
            a = prompt + " P_obj"
            na = negative_prompt + QUALITY_NEGATIVE + "P_obj"
            return TaskPrompts(a, a, na, na)
        if task == "shape-guided":
            return TaskPrompts(
                prompt + " P_shape",
                prompt + " P_ctxt",
                negative_prompt + QUALITY_NEGATIVE + "P_shape",
                negative_prompt + QUALITY_NEGATIVE + "P_ctxt",
            )
        if task == "context-aware":  # not in the original app (see the module docstring)
            a = prompt + " P_ctxt"
            return TaskPrompts(a, a, negative_prompt, negative_prompt)
        a = "empty scene blur " + prompt + " P_ctxt"  # object-removal and outpainting alike
        na = negative_prompt + " P_obj"
        return TaskPrompts(a, a, na, na)
    if task == "text-guided":
        return TaskPrompts(" P_obj", " P_obj", "P_obj", "P_obj", prompt, negative_prompt)
    if task == "shape-guided":
        return TaskPrompts(" P_shape", " P_ctxt", "P_shape", "P_ctxt", prompt, negative_prompt)
    if task == "context-aware":
        return TaskPrompts("P_ctxt", "P_ctxt", "", "", prompt, negative_prompt)
    suffix = " empty scene blur" if task == "object-removal" else " empty scene"
    return TaskPrompts(" P_ctxt", " P_ctxt", " P_obj", " P_obj", prompt + suffix, negative_prompt)


def encode_text(
    text_encoder, tokenizer, texts: list[str], device=None, clip_skip: int | None = None
) -> torch.Tensor:
    """Last hidden states ``(len(texts), 77, D)`` of texts with task words, tokenized as the original does; with
    ``clip_skip`` the states that many layers before the last, through the final layer norm (as diffusers'
    ``encode_prompt``).

    Each text's task words are expanded into their placeholder tokens, then tokenized with padding to the
    tokenizer's ``model_max_length`` and truncation, without an attention mask.

    Raises:
        ValueError: truncation would cut a task word's placeholders (the original fails an assertion there):
            the text is too long.
    """
    expanded = [expand_task_tokens(text) for text in texts]
    max_length = tokenizer.model_max_length
    placeholders = {i for ids in task_token_ids(tokenizer).values() for i in ids}
    for text, full in zip(texts, tokenizer(expanded).input_ids):
        if len(full) > max_length and placeholders.intersection(full[max_length - 1 : -1]):
            raise ValueError(
                f"prompt too long: its task word would be cut at {max_length} tokens ({text[:40]!r}…)"
            )
    ids = tokenizer(
        expanded, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    device = device if device is not None else text_encoder.device
    if clip_skip is None:
        return text_encoder(ids.to(device))[0]
    hidden = text_encoder(ids.to(device), output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    tower = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 flattened CLIPTextModel
    return tower.final_layer_norm(hidden)


def encode_task_prompts(
    text_encoder,
    tokenizer,
    prompts_a: list[str],
    prompts_b: list[str],
    fitting_degree: float,
    device=None,
    clip_skip: int | None = None,
) -> torch.Tensor:
    """``t · E(A) + (1 − t) · E(B)`` for each pair of texts (the original's interpolation, ``t`` = fitting
    degree); ``E(B)`` is not computed when ``t`` is 1 or every B equals its A. ``clip_skip`` as
    :func:`encode_text`.

    Returns:
        ``(len(prompts_a), 77, D)`` in the text encoder's dtype.
    """
    if len(prompts_a) != len(prompts_b):
        raise ValueError(f"{len(prompts_a)} A prompts for {len(prompts_b)} B prompts")
    embeds_a = encode_text(text_encoder, tokenizer, prompts_a, device, clip_skip)
    if fitting_degree == 1.0 or list(prompts_a) == list(prompts_b):
        embeds_b = embeds_a
    else:
        embeds_b = encode_text(text_encoder, tokenizer, prompts_b, device, clip_skip)
    return embeds_a * fitting_degree + (1 - fitting_degree) * embeds_b


def encode_task_prompt_pair(
    text_encoder,
    tokenizer,
    prompts: list[TaskPrompts],
    fitting_degree: float,
    negative_fitting_degree: float,
    device,
    do_classifier_free_guidance: bool,
    clip_skip: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The interpolated embeddings of the positive task prompts and, under guidance, of the negative ones
    (:func:`encode_task_prompts` on ``prompt_a``/``prompt_b`` and ``negative_a``/``negative_b``; ``clip_skip`` as
    :func:`encode_text`).

    Returns:
        ``(embeddings, negative embeddings or None without guidance)``, ``(len(prompts), 77, D)`` each.
    """

    def encode(texts_a: list[str], texts_b: list[str], degree: float) -> torch.Tensor:
        return encode_task_prompts(text_encoder, tokenizer, texts_a, texts_b, degree, device, clip_skip)

    positive = encode([p.prompt_a for p in prompts], [p.prompt_b for p in prompts], fitting_degree)
    if not do_classifier_free_guidance:
        return positive, None
    return positive, encode(
        [p.negative_a for p in prompts], [p.negative_b for p in prompts], negative_fitting_degree
    )


def check_task_arguments(task: str, fitting_degree: float, negative_fitting_degree: float | None) -> float:
    """Check a PowerPaint call's ``task`` and fitting degrees.

    Returns:
        The negative fitting degree (default: ``fitting_degree``, as the original app).

    Raises:
        ValueError: an unknown task, or a fitting degree outside [0, 1].
    """
    if task not in TASKS:
        raise ValueError(f"unknown PowerPaint task {task!r}; choose one of: {', '.join(TASKS)}")
    if negative_fitting_degree is None:
        negative_fitting_degree = fitting_degree
    for name, value in (
        ("fitting_degree", fitting_degree),
        ("negative_fitting_degree", negative_fitting_degree),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must be in [0, 1], got {value}")
    return negative_fitting_degree
