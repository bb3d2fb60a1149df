"""A trained LSTM rule as an ordinary ``torch.optim.Optimizer``, for any PyTorch training loop:

    optimizer = metalab.LearnedOptimizer(model.parameters(), rule=metalab.load_rule("outputs/runs/..."))
    for x, y in data:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

Each step feeds the gradient of every coordinate of every parameter to the rule in one batched
LSTM call and adds the proposed updates. Each parameter's per-coordinate hidden and cell states live
in the optimizer's ``state``, so ``state_dict`` / ``load_state_dict`` save and restore them.

``metalab.optim.inner.learned_inner_optimizer(rule)`` is the same rule as an (init, update) pair
over Params, usable inside torch.func.vmap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from metalab.optim.lstm_rule import CoordinatewiseLSTM, LSTMState

__all__ = ["LearnedOptimizer"]


class LearnedOptimizer(torch.optim.Optimizer):
    """Update every parameter with a trained coordinatewise LSTM rule (``metalab.optim.lstm_rule``).

    params: the parameters (or parameter groups) to optimise.  rule: a CoordinatewiseLSTM, e.g. the
    trained rule of a learned-optimizer run, ``metalab.load_rule(run_dir)``. The rule's weights are
    fixed; it is moved to the device and dtype of the first parameter.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], rule: CoordinatewiseLSTM):
        super().__init__(params, {})
        self.rule = rule
        first = self.param_groups[0]["params"][0]
        self.rule.to(device=first.device, dtype=first.dtype).requires_grad_(False)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update of every parameter that has a gradient: one LSTM call over all their
        coordinates. Returns the closure's loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        for p in params:
            if not self.state[p]:
                hidden, cell = self.rule.initial_state(p.numel(), p.device, p.dtype)
                self.state[p].update(hidden=hidden, cell=cell)
        state = LSTMState(
            torch.cat([self.state[p]["hidden"] for p in params], dim=1),
            torch.cat([self.state[p]["cell"] for p in params], dim=1),
        )
        grads = torch.cat([p.grad.reshape(-1) for p in params])
        updates, state = self.rule(grads, state)
        offset = 0
        for p in params:
            size = p.numel()
            p.add_(updates[offset : offset + size].view_as(p))
            self.state[p]["hidden"] = state.hidden[:, offset : offset + size].clone()
            self.state[p]["cell"] = state.cell[:, offset : offset + size].clone()
            offset += size
        return loss
