"""The four-block convolutional network of MAML (Finn et al. 2017, Section 5.2) and its successors.

Each block: 3x3 conv -> batch norm -> activation (ReLU) -> downsampling. Omniglot (28x28) uses 64
filters and stride-2 convolutions; MiniImageNet (84x84) uses 32 filters and 2x2 max-pooling.

The norm is ``metalab.models.norm.BatchNorm`` (no running statistics, so the model is a pure
function of its parameters under torch.func; exact higher derivatives under vmap). ``norm``
chooses where its statistics come from: "support" (default) normalises every example with the
statistics of the task's support set, passed as ``context``, so that a query's prediction does
not depend on the other queries; "transductive" uses the statistics of each batch given, as MAML
did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.errors import require
from metalab.models.norm import BatchNorm, affine, check_protocol
from metalab.recorded import Recorded

__all__ = ["Conv4", "ACTIVATIONS"]

_LARGE_INPUT = 64  # inputs at least this wide get MiniImageNet's settings when left on "auto"
#: model.activation options: ReLU as in the paper; smooth ones for finite-difference checks.
ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh}


class Conv4(Recorded, nn.Module):
    """Input [N, C, H, W] -> logits [N, output_dim].

    hidden_channels: filters per block; None = the paper's choice for the input size (64 or 32).
    downsample: "stride" | "maxpool"; None = the paper's choice for the input size.
    norm: "support" | "transductive", the normalisation protocol (see the module docstring).
    activation: "relu" | "softplus" | "tanh".
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        output_dim: int,
        hidden_channels: int | None = None,
        downsample: str | None = None,
        blocks: int = 4,
        norm: str = "support",
        activation: str = "relu",
    ):
        super().__init__()
        channels, height, width = input_shape
        large = min(height, width) >= _LARGE_INPUT
        hidden_channels = hidden_channels or (32 if large else 64)
        downsample = downsample or ("maxpool" if large else "stride")
        require(
            downsample in ("stride", "maxpool"), f"model.downsample must be 'stride' or 'maxpool' (got {downsample!r})."
        )
        require(
            hidden_channels >= 1 and blocks >= 1,
            f"model.hidden_channels and model.blocks must be positive (got {hidden_channels}, {blocks}).",
        )
        require(
            activation in ACTIVATIONS, f"model.activation must be one of {', '.join(ACTIVATIONS)} (got {activation!r})."
        )
        self.norm = check_protocol(norm)
        size, most = min(height, width), 0  # each block halves the image; past 1x1 a block has nothing to see
        while size > 1:
            size, most = (size + 1) // 2 if downsample == "stride" else size // 2, most + 1
        require(
            blocks <= most,
            f"model.blocks={blocks} is more than a {height}x{width} input allows with "
            f"{downsample} downsampling (at most {most}): e.g. model.blocks=4.",
        )
        layers: list[nn.Module] = []
        for block in range(blocks):
            stride = 2 if downsample == "stride" else 1
            layers += [
                nn.Conv2d(channels if block == 0 else hidden_channels, hidden_channels, 3, stride=stride, padding=1),
                BatchNorm(hidden_channels),
                ACTIVATIONS[activation](),
            ]
            if downsample == "maxpool":
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            feature_dim = self.features(torch.zeros(1, *input_shape)).shape[-1]
        self.head = nn.Linear(feature_dim, output_dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Logits of x [N, C, H, W]. Under norm="support", ``context`` [S, C, H, W] (the support
        set) supplies the normalisation statistics, and each row's output depends only on that row
        and the context; with ``context=None`` x supplies its own (x is then the support set).
        Under norm="transductive" the statistics are always x's and ``context`` is ignored."""
        return self.head(self.embed(x, context))

    def embed(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The features [N, feature_dim] of x that ``head`` maps to logits, normalised as ``forward``
        normalises them: the embedding of a metric-based learner (Prototypical Networks)."""
        if context is None or self.norm == "transductive":
            return self._features(x)
        require(
            context.shape[1:] == x.shape[1:],
            f"context examples have shape {tuple(context.shape[1:])} but x has {tuple(x.shape[1:])}: "
            "pass the support set.",
        )
        return self._features(context, x)

    def _features(self, context: Tensor, x: Tensor | None = None) -> Tensor:
        """The blocks. Every norm takes its statistics from ``context``'s rows; x's rows, when given,
        are normalised with them without being part of them, and x's features are returned
        (context's otherwise).

        A norm with given statistics is an affine map per channel, so for x it is folded into the
        convolution in front of it: conv(x, W * scale, b * scale + shift) is norm(conv(x, W, b))
        exactly, without the passes over x's activations that the norm would take on its own."""
        layers = iter(self.features)
        for layer in layers:
            if isinstance(layer, nn.Conv2d):
                h, norm = layer(context), next(layers)
                if x is None:
                    context = norm(h)
                else:
                    scale, shift = norm.scale_shift(h)
                    context = affine(h, scale, shift)
                    x = F.conv2d(
                        x,
                        layer.weight * scale[:, None, None, None],
                        layer.bias * scale + shift,
                        layer.stride,
                        layer.padding,
                    )
            else:
                context = layer(context)
                x = None if x is None else layer(x)
        return context if x is None else x
