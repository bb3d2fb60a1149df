"""The MLP of MAML's sinusoid experiments: two hidden layers of 40 ReLU units by default."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

from torch import Tensor, nn

from metalab.errors import require
from metalab.recorded import Recorded

__all__ = ["MLP"]


class MLP(Recorded, nn.Module):
    """Fully connected ReLU network. Input [..., *input_shape] -> output [..., output_dim]."""

    def __init__(self, input_shape: Sequence[int], output_dim: int, hidden_sizes: Sequence[int] = (40, 40)):
        super().__init__()
        require(
            all(h >= 1 for h in hidden_sizes),
            f"model.hidden_sizes must be positive integers (got {list(hidden_sizes)}): "
            "e.g. model.hidden_sizes=[40,40].",
        )
        self.input_shape = tuple(input_shape)
        widths = [prod(self.input_shape), *hidden_sizes]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], output_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Outputs for x; ``context`` (a support set) is accepted and ignored: each row is
        computed on its own, there is nothing to normalise."""
        return self.net[-1](self.embed(x))

    def embed(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The last hidden layer's activations [..., hidden_sizes[-1]] (the input, flattened, when there
        is no hidden layer): the embedding of a metric-based learner (Prototypical Networks)."""
        x = x.flatten(start_dim=x.dim() - len(self.input_shape))
        for layer in list(self.net)[:-1]:  # not self.net[:-1], which builds a new Sequential at every call
            x = layer(x)
        return x
