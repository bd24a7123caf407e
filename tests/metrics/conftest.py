"""Tiny tokenizers and feature models for the metric tests, built once per session under fixed seeds."""

import json

import pytest
import torch


def _byte_level_alphabet() -> list[str]:
    """The printable-unicode stand-ins byte-level BPE uses for the 256 byte values (GPT-2/CLIP scheme)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    """A real `CLIPTokenizer` folder with a 514-token byte-level vocabulary and no merges."""
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    alphabet = _byte_level_alphabet()
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 77,
            }
        )
    )
    return folder


@pytest.fixture(scope="session")
def bert_tokenizer_dir(tmp_path_factory):
    """A real `BertTokenizer` folder (uncased WordPiece) with a small vocabulary."""
    folder = tmp_path_factory.mktemp("bert_tokenizer")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += list("abcdefghijklmnopqrstuvwxyz0123456789.,")
    words += ["a", "cat", "dog", "photo", "of", "the", "on", "red", "blue", "sofa"]
    words += ["##" + letter for letter in "abcdefghijklmnopqrstuvwxyz"]
    seen = []
    for word in words:
        if word not in seen:
            seen.append(word)
    (folder / "vocab.txt").write_text("\n".join(seen) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512})
    )
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, clip_tokenizer_dir):
    """A 2-layer `CLIPModel` (32 px, patch 8, projection 16) saved with its tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    config = CLIPConfig(
        text_config={
            "vocab_size": 514,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 512,
            "eos_token_id": 513,
            "pad_token_id": 513,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer.from_pretrained(clip_tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture
def images():
    """Two seeded 3×40×48 images in [0, 1] and a perturbed copy."""
    generator = torch.Generator().manual_seed(0)
    original = torch.rand(2, 3, 40, 48, generator=generator)
    generated = (original + 0.2 * torch.rand(2, 3, 40, 48, generator=generator)).clamp(0, 1)
    return generated, original
