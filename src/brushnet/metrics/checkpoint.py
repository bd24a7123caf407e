"""Reading published metric weight files (.pth / .pt / .bin / .safetensors) from local paths.

No file is ever downloaded: every loader in `brushnet.metrics` takes a path on disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

__all__ = ["load_state_dict_file", "load_into", "load_tokenizer"]


def load_state_dict_file(path: str | os.PathLike, strip_prefixes: Iterable[str] = ("module.",)) -> dict:
    """Reads a state dict from `path`.

    `.safetensors` files go through `safetensors.torch.load_file`; anything else through
    `torch.load(..., weights_only=True)` (no pickled code is executed). A checkpoint that wraps its
    weights as `{"state_dict": ...}` or `{"model": ...}` is unwrapped, and the given key prefixes
    (DataParallel's `module.` by default) are stripped.

    Args:
        path: local file.
        strip_prefixes: prefixes removed from every key that starts with them.

    Returns:
        `dict[str, torch.Tensor]` on the CPU.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metric weights not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(path, device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as exc:  # a corrupt file, a pickled module, a file of another kind: what torch says is long
        # and points the wrong way ("re-run with weights_only=False"); name the file and the first line only
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in reason:
            reason = (
                "it pickles objects other than tensors (only plain state dicts load; nothing is unpickled)"
            )
        raise ValueError(f"{path}: not a readable state-dict checkpoint ({reason[:200]})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state_dict).__name__})")
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in strip_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    return cleaned


def load_into(
    module: torch.nn.Module, state_dict: dict, ignore: Iterable[str] = (), source: str = ""
) -> None:
    """`module.load_state_dict(state_dict, strict=True)` with a readable error.

    Args:
        module: the freshly built model.
        state_dict: weights in `module`'s key layout.
        ignore: keys that published files carry but the module does not need (dropped first).
        source: file name used in the error message.
    """
    ignore = set(ignore)
    state_dict = {key: value for key, value in state_dict.items() if key not in ignore}
    expected = set(module.state_dict().keys())
    missing = sorted(expected - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source or type(module).__name__}: weights do not match the model "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    module.load_state_dict(state_dict, strict=True)


def load_tokenizer(cls, path: str | os.PathLike, vocabulary: tuple[str, ...]):
    """``cls.from_pretrained(path)`` from a local folder that holds a vocabulary, or a one-line ``ValueError``.

    transformers builds a tokenizer of its special tokens alone from a folder without vocabulary files (every
    word then becomes the unknown token): a metric scored with it is wrong without any error.

    Args:
        cls: the tokenizer class (``CLIPTokenizer``, ``BertTokenizer``).
        path: the local folder.
        vocabulary: the files that make its vocabulary (``tokenizer.json`` also does).
    """
    path = os.fspath(path)
    names = set(os.listdir(path)) if os.path.isdir(path) else set()
    if "tokenizer.json" not in names and not set(vocabulary) <= names:
        raise ValueError(
            f"{path}: no tokenizer vocabulary (expected {' and '.join(vocabulary)}, or tokenizer.json)"
        )
    tokenizer = cls.from_pretrained(path, local_files_only=True)
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ValueError(f"{path}: the tokenizer has no vocabulary beyond its special tokens")
    return tokenizer
