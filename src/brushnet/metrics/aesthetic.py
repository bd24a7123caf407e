"""LAION aesthetic score: a regression head on L2-normalised CLIP ViT-L/14 image embeddings.

Two published heads are supported, told apart by their keys:

* the LAION-5B "v1" linear head `sa_0_4_vit_l_14_linear.pth` (`weight` 1×768, `bias`) — the one the
  released BrushBench script (`evaluate_brushnet.py`) downloads and uses, and what reference README §6
  calls "linear head on CLIP ViT-L/14 image features";
* the improved "v2" MLP `sac+logos+ava1-l14-linearMSE.pth` (`layers.0/2/4/6/7.*`): Linear 768→1024,
  Dropout 0.2, 1024→128, Dropout 0.2, 128→64, Dropout 0.1, 64→16, 16→1, no activations.

`aesthetic_score = head(E_I / ||E_I||)`, roughly on a 1–10 scale for the real heads.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .checkpoint import load_into, load_state_dict_file
from .clip_score import clip_image_embeddings

__all__ = ["PreferenceMLP", "aesthetic_score", "load_aesthetic_head"]


class PreferenceMLP(nn.Module):
    """The 5-layer linear stack shared by the LAION aesthetic predictor v2 and ImageReward's head.

    `layers`: Linear(d→1024), Dropout(0.2), Linear(1024→128), Dropout(0.2), Linear(128→64),
    Dropout(0.1), Linear(64→16), Linear(16→1) — keys `layers.{0,2,4,6,7}.{weight,bias}`.
    """

    def __init__(self, input_size: int = 768, hidden_sizes: tuple[int, int, int, int] = (1024, 128, 64, 16)):
        super().__init__()
        h1, h2, h3, h4 = hidden_sizes
        self.layers = nn.Sequential(
            nn.Linear(input_size, h1),
            nn.Dropout(0.2),
            nn.Linear(h1, h2),
            nn.Dropout(0.2),
            nn.Linear(h2, h3),
            nn.Dropout(0.1),
            nn.Linear(h3, h4),
            nn.Linear(h4, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """`N×input_size` → `N×1`."""
        return self.layers(embeddings)


@torch.no_grad()
def aesthetic_score(head: nn.Module, clip_model, images: torch.Tensor) -> torch.Tensor:
    """Per-image LAION aesthetic score.

    Args:
        head: `nn.Linear(768, 1)` or `PreferenceMLP` (see `load_aesthetic_head`).
        clip_model: `transformers.CLIPModel` ViT-L/14 (see `clip_score.load_clip`).
        images: `N×3×H×W` in [0, 1].

    Returns:
        `N` scores.
    """
    embeddings = clip_image_embeddings(clip_model, images)
    parameter = next(head.parameters())
    return head(embeddings.to(parameter)).squeeze(-1).float()


def load_aesthetic_head(path: str | os.PathLike) -> nn.Module:
    """Loads either published head from a local .pth/.safetensors, picking the architecture by keys.

    Returns:
        `nn.Linear(d, 1)` for the v1 linear head or `PreferenceMLP(d)` for the v2 MLP, in eval mode.
    """
    state_dict = load_state_dict_file(path)
    if "weight" in state_dict and "bias" in state_dict and len(state_dict) == 2:
        head: nn.Module = nn.Linear(state_dict["weight"].shape[1], 1)
    elif "layers.0.weight" in state_dict:
        head = PreferenceMLP(state_dict["layers.0.weight"].shape[1])
    else:
        raise ValueError(f"{path}: not a LAION aesthetic head (keys {sorted(state_dict)[:4]}…)")
    load_into(head, {key: value.float() for key, value in state_dict.items()}, source=os.fspath(path))
    return head.eval().requires_grad_(False)
