"""PowerPaint's learned task tokens (Zhuang et al., "A Task is Worth One Word: Learning with Task Prompts for
High-Quality Versatile Image Inpainting", ECCV 2024, §3.2), as a stock CLIP tokenizer and text encoder.

PowerPaint adds three task words to the text encoder — ``P_ctxt`` (fill from context), ``P_shape`` (an object
that fits the mask's shape) and ``P_obj`` (an object described by the text) — each learned as
:data:`VECTORS_PER_TOKEN` = 10 embedding vectors. The original wraps the tokenizer (it rewrites each task word
into ten placeholder tokens ``P_obj_0 … P_obj_9`` before tokenizing) and replaces the token-embedding layer by
one that looks the placeholder ids up in a separate table. That lookup is exactly a token-embedding table with
the 30 learned rows appended after the base vocabulary, so here the text encoder is a plain
``transformers.CLIPTextModel`` with ``vocab_size + 30`` rows and the tokenizer a plain ``CLIPTokenizer`` with
the 30 placeholder tokens added — nothing in either class is replaced.

- :func:`add_task_tokens` adds the placeholders to a tokenizer (ids right after its vocabulary, in the order
  ``P_ctxt_0 … P_ctxt_9, P_shape_0 … P_shape_9, P_obj_0 … P_obj_9``, as the original);
- :func:`expand_task_tokens` rewrites the task words of a text into their placeholders (plain substring
  replacement, as the original);
- :func:`text_encoder_from_original` / :func:`original_state_dict` convert between the released state-dict
  layout (``…token_embedding.wrapped.weight`` + ``…token_embedding.trainable_embeddings.<name>``) and the stock
  one, so the released files load unchanged and a trained encoder can be written back in their layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "TASK_TOKENS",
    "VECTORS_PER_TOKEN",
    "placeholder_tokens",
    "expand_task_tokens",
    "add_task_tokens",
    "task_token_ids",
    "is_original_layout",
    "stock_state_dict",
    "original_state_dict",
    "text_encoder_from_original",
]

TASK_TOKENS: tuple[str, ...] = ("P_ctxt", "P_shape", "P_obj")
"""The task words, in the order the original adds them (their placeholder ids follow this order)."""

VECTORS_PER_TOKEN = 10
"""Learned vectors per task word in every released PowerPaint checkpoint (v1, v2, v2-1)."""

_WRAPPED = "embeddings.token_embedding.wrapped.weight"
_TRAINABLE = "embeddings.token_embedding.trainable_embeddings."
_TABLE = "embeddings.token_embedding.weight"


def placeholder_tokens(name: str, vectors: int = VECTORS_PER_TOKEN) -> list[str]:
    """The placeholder tokens of task word ``name``: ``[name_0, …, name_{vectors−1}]``."""
    return [f"{name}_{i}" for i in range(vectors)]


def expand_task_tokens(text: str, vectors: int = VECTORS_PER_TOKEN) -> str:
    """Rewrite every task word of ``text`` into its placeholders joined by single spaces.

    ``"a cat P_obj"`` → ``"a cat P_obj_0 P_obj_1 … P_obj_9"``. Plain substring replacement in the order of
    :data:`TASK_TOKENS`, as the original's tokenizer wrapper does.
    """
    for name in TASK_TOKENS:
        text = text.replace(name, " ".join(placeholder_tokens(name, vectors)))
    return text


def add_task_tokens(tokenizer, vectors: int = VECTORS_PER_TOKEN) -> list[int]:
    """Add the task placeholders to a CLIP tokenizer (in place) and return their ids.

    The ids are consecutive right after the tokenizer's vocabulary — ``len(tokenizer) … len(tokenizer) + 29``
    for 10 vectors — which is where :func:`text_encoder_from_original` puts the learned rows.

    Raises:
        ValueError: the tokenizer already knows one of the placeholders (added twice, or a vocabulary that
            clashes), which would shift the ids.
    """
    names = [token for name in TASK_TOKENS for token in placeholder_tokens(name, vectors)]
    first = len(tokenizer)
    known = [token for token in names if token in tokenizer.get_vocab()]
    if known:
        raise ValueError(f"the tokenizer already has the task token {known[0]!r}")
    added = tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if added != len(names) or ids != list(range(first, first + len(names))):
        raise ValueError("the task tokens did not get consecutive ids after the vocabulary")
    return ids


def task_token_ids(tokenizer, vectors: int = VECTORS_PER_TOKEN) -> dict[str, list[int]]:
    """``{task word: its placeholder ids}`` for a tokenizer that has them (see :func:`add_task_tokens`).

    Raises:
        ValueError: a placeholder is missing.
    """
    vocab = tokenizer.get_vocab()
    out = {}
    for name in TASK_TOKENS:
        tokens = placeholder_tokens(name, vectors)
        missing = [t for t in tokens if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks the task token {missing[0]!r}; call add_task_tokens first")
        out[name] = [vocab[t] for t in tokens]
    return out


def _split_prefix(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """(``"text_model."`` or ``""``, the state dict without that prefix)."""
    prefix = "text_model." if any(k.startswith("text_model.") for k in state_dict) else ""
    return prefix, {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def is_original_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a text-encoder state dict is in the released PowerPaint layout (wrapped table + task vectors)."""
    return any(k.endswith(_WRAPPED) for k in state_dict)


def stock_state_dict(
    state_dict: Mapping[str, torch.Tensor], vectors: int = VECTORS_PER_TOKEN
) -> dict[str, torch.Tensor]:
    """The released PowerPaint text-encoder layout → stock ``CLIPTextModel`` keys with an extended table.

    ``…token_embedding.wrapped.weight`` ``[V, D]`` and ``…trainable_embeddings.{P_ctxt, P_shape, P_obj}``
    ``[vectors, D]`` become one ``embeddings.token_embedding.weight`` ``[V + 3·vectors, D]`` (rows in
    :data:`TASK_TOKENS` order). ``position_ids`` (a buffer older transformers saved) is dropped; the
    ``text_model.`` prefix is removed (``CLIPTextModel.state_dict()`` of transformers ≥ 5 has none).

    Raises:
        ValueError: not the original layout, a task vector missing or of the wrong shape, unknown
            ``trainable_embeddings`` entries.
    """
    _, plain = _split_prefix(state_dict)
    if _WRAPPED not in plain:
        raise ValueError(f"not a PowerPaint text encoder: no {_WRAPPED!r}")
    table = plain.pop(_WRAPPED)
    rows = []
    for name in TASK_TOKENS:
        key = _TRAINABLE + name
        if key not in plain:
            raise ValueError(f"PowerPaint text encoder lacks the task vectors {key!r}")
        vectors_of = plain.pop(key)
        if tuple(vectors_of.shape) != (vectors, table.shape[1]):
            raise ValueError(
                f"{key} has shape {tuple(vectors_of.shape)}, expected ({vectors}, {table.shape[1]})"
            )
        rows.append(vectors_of.to(table.dtype))
    extra = [k for k in plain if k.startswith(_TRAINABLE)]
    if extra:
        raise ValueError(f"unknown task vectors {extra[0]!r} (known: {', '.join(TASK_TOKENS)})")
    plain.pop("embeddings.position_ids", None)
    plain[_TABLE] = torch.cat([table, *rows])
    return plain


def original_state_dict(
    state_dict: Mapping[str, torch.Tensor], vectors: int = VECTORS_PER_TOKEN
) -> dict[str, torch.Tensor]:
    """Stock ``CLIPTextModel`` keys with an extended table → the released PowerPaint layout (``text_model.``
    prefix, ``wrapped.weight`` + three ``trainable_embeddings``), the inverse of :func:`stock_state_dict`
    (``position_ids`` is not written)."""
    _, plain = _split_prefix(state_dict)
    table = plain.pop(_TABLE)
    base = table.shape[0] - len(TASK_TOKENS) * vectors
    out = {_WRAPPED: table[:base].clone()}
    for i, name in enumerate(TASK_TOKENS):
        out[_TRAINABLE + name] = table[base + i * vectors : base + (i + 1) * vectors].clone()
    out.update(plain)
    return {"text_model." + k: v for k, v in out.items()}


def text_encoder_from_original(
    state_dict: Mapping[str, torch.Tensor],
    config,
    vectors: int = VECTORS_PER_TOKEN,
    fallback: Mapping[str, torch.Tensor] | None = None,
):
    """A ``CLIPTextModel`` holding a released PowerPaint text-encoder state dict, task vectors included.

    Args:
        state_dict: the released file's tensors (original layout, see :func:`stock_state_dict`).
        config: the ``CLIPTextConfig`` of the base text encoder (its ``vocab_size`` is the base vocabulary;
            the model gets ``3 · vectors`` more rows).
        vectors: vectors per task word.
        fallback: stock-layout tensors for keys the file lacks (the original loads the v2 branch encoder
            non-strictly on top of SD1.5's text encoder); ``None``: every key must be in the file.

    Returns:
        ``(model, filled)``: the text encoder in float32 on the CPU, and the keys taken from ``fallback``.

    Raises:
        ValueError: a wrong layout or vocabulary size, unexpected keys, or missing keys without a fallback.
    """
    import copy

    from transformers import CLIPTextModel

    stock = stock_state_dict(state_dict, vectors)
    base_vocab = stock[_TABLE].shape[0] - len(TASK_TOKENS) * vectors
    if base_vocab != config.vocab_size:
        raise ValueError(
            f"the PowerPaint text encoder has {base_vocab} base tokens, the base text encoder {config.vocab_size}"
        )
    config = copy.deepcopy(config)
    config.vocab_size = base_vocab + len(TASK_TOKENS) * vectors
    model = CLIPTextModel(config)
    own = model.state_dict()
    missing = [k for k in own if k not in stock]
    unexpected = [k for k in stock if k not in own]
    if unexpected:
        raise ValueError(f"unexpected key in the PowerPaint text encoder: {unexpected[0]!r}")
    filled = []
    if missing:
        if fallback is None or any(k not in fallback for k in missing):
            raise ValueError(f"the PowerPaint text encoder lacks {len(missing)} keys (first: {missing[0]!r})")
        filled = missing
        stock.update({k: fallback[k] for k in missing})
    bad = [k for k, v in own.items() if tuple(stock[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(
            f"{bad[0]} has shape {tuple(stock[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}"
        )
    model.load_state_dict({k: v.float() for k, v in stock.items()}, strict=True)
    return model.eval(), filled
