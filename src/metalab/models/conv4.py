"""The four-block convolutional network of MAML (Finn et al. 2017, Section 5.2) and its successors.

Each block: 3x3 conv -> BatchNorm (batch statistics only, no running averages, so the model is a
pure function of its parameters under torch.func) -> ReLU -> downsampling. Omniglot (28x28) uses 64
filters and stride-2 convolutions; MiniImageNet (84x84) uses 32 filters and 2x2 max-pooling.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metalab.errors import require

__all__ = ["Conv4"]

_LARGE_INPUT = 64  # inputs at least this wide get MiniImageNet's settings when left on "auto"


class Conv4(nn.Module):
    """Input [N, C, H, W] -> logits [N, output_dim].

    hidden_channels: filters per block; None = the paper's choice for the input size (64 or 32).
    downsample: "stride" | "maxpool"; None = the paper's choice for the input size.
    """

    def __init__(self, input_shape: Sequence[int], output_dim: int, hidden_channels: int | None = None,
                 downsample: str | None = None, blocks: int = 4):
        super().__init__()
        channels, height, width = input_shape
        large = min(height, width) >= _LARGE_INPUT
        hidden_channels = hidden_channels or (32 if large else 64)
        downsample = downsample or ("maxpool" if large else "stride")
        require(downsample in ("stride", "maxpool"), f"model.downsample must be 'stride' or 'maxpool' (got {downsample!r}).")
        require(hidden_channels >= 1 and blocks >= 1, f"model.hidden_channels and model.blocks must be positive (got {hidden_channels}, {blocks}).")
        layers: list[nn.Module] = []
        for block in range(blocks):
            stride = 2 if downsample == "stride" else 1
            layers += [
                nn.Conv2d(channels if block == 0 else hidden_channels, hidden_channels, 3, stride=stride, padding=1),
                nn.BatchNorm2d(hidden_channels, track_running_stats=False),
                nn.ReLU(),
            ]
            if downsample == "maxpool":
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            feature_dim = self.features(torch.zeros(1, *input_shape)).shape[-1]
        self.head = nn.Linear(feature_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
