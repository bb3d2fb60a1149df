"""The coordinatewise LSTM update rule of "Learning to learn by gradient descent by gradient descent"
(Andrychowicz et al., NIPS 2016, Section 2.1 and Appendix A).

One small LSTM (2 layers of 20 units) whose weights are shared by every coordinate of the
optimizee, with a hidden state per coordinate. Each step it reads the gradient of every coordinate
and proposes that coordinate's update: theta_{t+1} = theta_t + g_t (Eq. 1). All coordinates of all
problems advance together in one batched LSTM step, the coordinates being its batch.

    rule = CoordinatewiseLSTM()
    state = rule.initial_state(theta.numel(), theta.device, theta.dtype)
    update, state = rule(grad, state)       # grad and update of any shape, e.g. [problems, coordinates]
    theta = theta + update
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.errors import require

__all__ = ["MAX_PREPROCESS", "CoordinatewiseLSTM", "LSTMState", "preprocess_gradients"]

#: The largest p of the preprocessing: it scales gradients by e^p and compares them with e^-p, which
#: float32 holds (finite, and normal) only for p below about 87.
MAX_PREPROCESS = 80.0


class LSTMState(NamedTuple):
    """Hidden and cell states of every coordinate: each [num_layers, coordinates, hidden_size]."""

    hidden: Tensor
    cell: Tensor

    def detach(self) -> LSTMState:
        return LSTMState(self.hidden.detach(), self.cell.detach())


def preprocess_gradients(grad: Tensor, p: float) -> Tensor:
    """The paper's input preprocessing (Appendix A): each gradient entry g becomes two features,

        (log|g| / p, sign g)   if |g| >= e^-p
        (-1, e^p g)            otherwise,

    so that gradients of very different magnitudes reach the LSTM on one scale. grad [...] ->
    features [..., 2]. The logarithm is taken of max(|g|, e^-p), so that no branch divides by zero
    when differentiated. 0 < p <= ``MAX_PREPROCESS``, so that e^p and e^-p are float32 numbers."""
    threshold = math.exp(-p)
    large = grad.abs() >= threshold
    log_magnitude = torch.log(grad.abs().clamp(min=threshold)) / p
    first = torch.where(large, log_magnitude, torch.full_like(grad, -1.0))
    second = torch.where(large, torch.sign(grad), math.exp(p) * grad)
    return torch.stack((first, second), dim=-1)


class CoordinatewiseLSTM(nn.Module):
    """The learned update rule m(grad; phi) applied to every coordinate at once.

    hidden_size: units per LSTM layer (paper: 20).  num_layers: LSTM layers (paper: 2).
    preprocess: p of ``preprocess_gradients`` (paper: 10; at most ``MAX_PREPROCESS``), or None to feed the raw gradient
    (DeepMind's quadratic).  output_scale: the update is output_scale times the LSTM's linear
    read-out (paper: 0.1).
    """

    def __init__(
        self, hidden_size: int = 20, num_layers: int = 2, preprocess: float | None = 10.0, output_scale: float = 0.1
    ):
        super().__init__()
        for key, value in (("hidden_size", hidden_size), ("num_layers", num_layers)):
            require(isinstance(value, int) and value >= 1, f"algo.{key} must be an integer >= 1 (got {value!r}).")
        require(
            preprocess is None or 0 < preprocess <= MAX_PREPROCESS,
            f"algo.preprocess must be in (0, {MAX_PREPROCESS:g}] or null (got {preprocess}): the preprocessing "
            "scales gradients by e^p, which float32 holds only below p = 87; the paper's is 10.",
        )
        require(output_scale > 0, f"algo.output_scale must be positive (got {output_scale}): the paper's is 0.1.")
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.preprocess, self.output_scale = preprocess, output_scale
        self.lstm = nn.LSTM(2 if preprocess is not None else 1, hidden_size, num_layers)
        self.readout = nn.Linear(hidden_size, 1)

    def initial_state(
        self, coordinates: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LSTMState:
        """Zero hidden and cell states for ``coordinates`` coordinates."""
        zeros = torch.zeros(self.num_layers, coordinates, self.hidden_size, device=device, dtype=dtype)
        return LSTMState(zeros, zeros.clone())

    def features(self, grad: Tensor) -> Tensor:
        """The LSTM's input per coordinate: grad [...] -> [..., 1 or 2]."""
        return grad.unsqueeze(-1) if self.preprocess is None else preprocess_gradients(grad, self.preprocess)

    def forward(self, grad: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        """Updates for every coordinate of ``grad`` (any shape; state over grad.numel() coordinates,
        in row-major order) and the next state: all coordinates at once, one matrix product per
        layer and gate set. The LSTM equations are written out over ``self.lstm``'s weights (torch's
        gate order i, f, g, o) rather than calling nn.LSTM, so that the rule also runs under
        torch.func.vmap (an inner optimizer inside vmapped inner loops)."""
        x = self.features(grad.reshape(-1))  # [coordinates, features]
        hidden, cell = [], []
        for layer in range(self.num_layers):
            gates = F.linear(
                x, getattr(self.lstm, f"weight_ih_l{layer}"), getattr(self.lstm, f"bias_ih_l{layer}")
            ) + F.linear(
                state.hidden[layer], getattr(self.lstm, f"weight_hh_l{layer}"), getattr(self.lstm, f"bias_hh_l{layer}")
            )
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * state.cell[layer] + torch.sigmoid(i) * torch.tanh(g)
            x = torch.sigmoid(o) * torch.tanh(c)
            hidden.append(x)
            cell.append(c)
        update = self.output_scale * self.readout(x).squeeze(-1)
        return update.view_as(grad), LSTMState(torch.stack(hidden), torch.stack(cell))
