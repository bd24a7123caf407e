"""LPIPS with the SqueezeNet 1.1 backbone (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric", Eq. 1), the variant BrushBench reports (torchmetrics
`LearnedPerceptualImagePatchSimilarity(net_type="squeeze")`).

`d(x, x0) = Σ_l 1/(H_l W_l) Σ_{h,w} || w_l ⊙ (ŷ_l[h,w] − ŷ0_l[h,w]) ||²` where `ŷ_l` are the
channel-unit-normalised activations of tap `l` and `w_l` the learned 1×1 linear heads.

Weights: the backbone is torchvision's `squeezenet1_1` state dict (keys `features.N.*`; the
classifier keys are ignored) and the heads are the `lpips` package's `weights/v0.1/squeeze.pth`
(keys `lin0.model.1.weight` … `lin6.model.1.weight`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .checkpoint import load_into, load_state_dict_file
from .pixel import keep_masked

__all__ = ["LPIPSSqueeze", "squeezenet1_1_features", "lpips_distance", "load_lpips_squeeze"]

# Published LPIPS input scaling (applied to inputs in [-1, 1]).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# Each tap ends after this `features` index (inclusive); channel counts of the taps.
SQUEEZE_TAP_ENDS = (1, 4, 7, 9, 10, 11, 12)
SQUEEZE_TAP_CHANNELS = (64, 128, 256, 384, 384, 512, 512)


class Fire(nn.Module):
    """SqueezeNet Fire module: 1×1 squeeze, then concatenated 1×1 and 3×3 expands, each ReLU'd."""

    def __init__(
        self, in_channels: int, squeeze_channels: int, expand1x1_channels: int, expand3x3_channels: int
    ):
        super().__init__()
        self.squeeze = nn.Conv2d(in_channels, squeeze_channels, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_channels, expand1x1_channels, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_channels, expand3x3_channels, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))],
            dim=1,
        )


def squeezenet1_1_features() -> nn.Sequential:
    """SqueezeNet 1.1 `features` with torchvision's module indices (so `features.N.*` keys load)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2),  # 0
        nn.ReLU(inplace=True),  # 1
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),  # 2
        Fire(64, 16, 64, 64),  # 3
        Fire(128, 16, 64, 64),  # 4
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),  # 5
        Fire(128, 32, 128, 128),  # 6
        Fire(256, 32, 128, 128),  # 7
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),  # 8
        Fire(256, 48, 192, 192),  # 9
        Fire(384, 48, 192, 192),  # 10
        Fire(384, 64, 256, 256),  # 11
        Fire(512, 64, 256, 256),  # 12
    )


class LinearHead(nn.Module):
    """LPIPS per-tap head: dropout then a bias-free 1×1 conv to one channel (`lin{l}.model.1.weight`)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(in_channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPSSqueeze(nn.Module):
    """LPIPS v0.1 with a SqueezeNet 1.1 backbone. State-dict keys: `net.features.N.*`, `lin{0..6}.*`.

    `forward` takes images in [-1, 1] (the `lpips` package convention); `lpips_distance` wraps it
    for [0, 1] inputs and masks.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = nn.Module()
        self.net.features = squeezenet1_1_features()
        for index, channels in enumerate(SQUEEZE_TAP_CHANNELS):
            self.add_module(f"lin{index}", LinearHead(channels))
        self.eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations after features 1, 4, 7, 9, 10, 11, 12 of the scaled input."""
        x = (x - self.shift) / self.scale
        outputs = []
        for index, layer in enumerate(self.net.features):
            x = layer(x)
            if index in SQUEEZE_TAP_ENDS:
                outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS distance, shape `N`, for `x`, `y` of shape `N×3×H×W` in [-1, 1]."""
        distance = x.new_zeros(x.shape[0])
        for index, (feat_x, feat_y) in enumerate(zip(self.taps(x), self.taps(y))):
            feat_x = feat_x / (feat_x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            feat_y = feat_y / (feat_y.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            head = getattr(self, f"lin{index}")
            distance = distance + head((feat_x - feat_y) ** 2).mean(dim=(1, 2, 3))
        return distance


@torch.no_grad()
def lpips_distance(
    model: LPIPSSqueeze,
    generated: torch.Tensor,
    original: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LPIPS between `generated` and `original`, optionally on the kept region only.

    Both images are multiplied by the keep mask `1 - mask` (BrushBench's kept-region protocol), then
    mapped to [-1, 1] as `2x - 1`.

    Args:
        model: an `LPIPSSqueeze` (see `load_lpips_squeeze`).
        generated, original: `N×3×H×W` in [0, 1].
        mask: `N×1×H×W`, 1 = hole; None compares whole images.

    Returns:
        `N` distances (≥ 0 for non-negative heads; 0 for identical inputs).
    """
    if generated.shape != original.shape:
        raise ValueError(f"shape mismatch: {tuple(generated.shape)} vs {tuple(original.shape)}")
    parameter = next(model.parameters())
    generated = keep_masked(generated.to(parameter), mask)
    original = keep_masked(original.to(parameter), mask)
    return model(generated * 2 - 1, original * 2 - 1)


def load_lpips_squeeze(backbone_path: str | os.PathLike, linear_path: str | os.PathLike) -> LPIPSSqueeze:
    """Builds `LPIPSSqueeze` and loads the published weights from local files.

    Args:
        backbone_path: torchvision `squeezenet1_1-*.pth` (or a .safetensors of it); keys `features.N.*`
            (a `net.`-prefixed LPIPS-style dict is accepted too); `classifier.*` keys are ignored.
        linear_path: `lpips` `weights/v0.1/squeeze.pth` (keys `lin{0..6}.model.1.weight`).

    Returns:
        The model in eval mode on the CPU, float32.
    """
    model = LPIPSSqueeze()
    backbone = load_state_dict_file(backbone_path, strip_prefixes=("module.", "net."))
    backbone = {key: value for key, value in backbone.items() if key.startswith("features.")}
    load_into(model.net, backbone, source=os.fspath(backbone_path))
    heads = load_state_dict_file(linear_path)
    head_module = nn.ModuleDict(
        {f"lin{i}": getattr(model, f"lin{i}") for i in range(len(SQUEEZE_TAP_CHANNELS))}
    )
    load_into(head_module, heads, source=os.fspath(linear_path))
    return model.eval().requires_grad_(False)
