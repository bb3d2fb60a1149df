"""The hand-designed optimizers the learned rule is compared with (Andrychowicz et al. 2016,
Figures 2-5): SGD, Nesterov momentum, RMSprop and Adam, run on a batch of problems at once.

The parameters of B problems are one tensor [B, D] and the loss of the batch is the sum of the
problems' losses, so its gradient holds each problem's own gradient; these optimizers act entry by
entry, so one torch.optim step on the tensor is one independent step of every problem.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from metalab.errors import require

__all__ = ["BASELINES", "baseline_trajectory"]

#: name -> torch.optim factory of (parameters, learning rate)
BASELINES: dict[str, Callable[[list[Tensor], float], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "nesterov": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}


def baseline_trajectory(
    name: str,
    lr: float,
    start: Tensor,
    loss: Callable[[Tensor, int], Tensor],
    steps: int,
    score: Callable[[Tensor, int], Tensor] | None = None,
) -> Tensor:
    """Optimise B problems from ``start`` [B, D] for ``steps`` steps with baseline ``name`` at
    learning rate ``lr``, the gradient of step t taken of ``loss(theta, t)`` [B]. Returns
    score(theta_t, t) for t = 0..steps, [B, steps + 1] (``score`` defaults to ``loss``)."""
    require(name in BASELINES, f"unknown baseline {name!r}: use one of {', '.join(BASELINES)}.")
    require(0 < lr < math.inf, f"the learning rate of {name} must be a positive finite number (got {lr}).")
    score = score or loss
    theta = start.detach().clone().requires_grad_(True)
    optimizer = BASELINES[name]([theta], lr)
    scores = []
    for step in range(steps + 1):
        with torch.enable_grad():
            value = loss(theta, step)
            if step < steps:
                optimizer.zero_grad(set_to_none=True)
                value.sum().backward()
        with torch.no_grad():
            scores.append(value.detach() if score is loss else score(theta, step))
            if step < steps:
                optimizer.step()
    return torch.stack(scores, dim=1)
