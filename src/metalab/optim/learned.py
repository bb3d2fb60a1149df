"""A trained LSTM rule as an ordinary ``torch.optim.Optimizer``, for any PyTorch training loop:

    optimizer = metalab.LearnedOptimizer(model.parameters(), rule=metalab.load_rule("outputs/runs/..."))
    for x, y in data:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

Each step feeds the gradient of every coordinate of every parameter to the rule in one batched
LSTM call (one per dtype and device, for a model that mixes them) and adds the proposed updates,
scaled by the parameter group's ``lr`` (1.0 by default: the update as trained). Each parameter's
per-coordinate hidden and cell states live in the optimizer's ``state``, so ``state_dict`` /
``load_state_dict`` save and restore them.

``metalab.optim.inner.learned_inner_optimizer(rule)`` is the same rule as an (init, update) pair
over Params, usable inside torch.func.vmap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from metalab.checkpoint import nonfinite_entries
from metalab.errors import ConfigError
from metalab.optim.lstm_rule import CoordinatewiseLSTM, LSTMState

__all__ = ["LearnedOptimizer"]


class LearnedOptimizer(torch.optim.Optimizer):
    """Update every parameter with a trained coordinatewise LSTM rule (``metalab.optim.lstm_rule``).

    params: the parameters (or parameter groups) to optimise, floating point, of any dtypes and
    devices.  rule: a CoordinatewiseLSTM, e.g. the trained rule of a learned-optimizer run,
    ``metalab.load_rule(run_dir)``; its weights are fixed (and must be finite); it is moved to the
    device and dtype of the first parameter, and cast for parameters of other dtypes or devices.
    lr: a factor on the rule's update, p <- p + lr * rule(grad) (default 1.0: the update the rule
    was trained to make); a param group's own ``lr`` applies to its parameters, so
    ``torch.optim.lr_scheduler`` works as with any optimizer. Sparse gradients are refused, as
    torch.optim.Adam refuses them. A wrong value is a ``metalab.ConfigError`` (a ValueError) of one sentence,
    a wrong type a TypeError.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], rule: CoordinatewiseLSTM, lr: float = 1.0):
        if not isinstance(rule, CoordinatewiseLSTM):
            raise TypeError(
                f"rule must be a CoordinatewiseLSTM, not {type(rule).__name__}: "
                "load a trained one with metalab.load_rule(run_dir)."
            )
        bad = nonfinite_entries(rule.state_dict())
        if bad:
            raise ConfigError(
                f"the rule's weights {', '.join(bad[:3])} hold NaN or infinite values: pass a trained rule "
                "(metalab.load_rule refuses such runs)."
            )
        _check_lr(lr, "lr")
        super().__init__(params, {"lr": lr})
        self.rule = rule
        first = self.param_groups[0]["params"][0]
        self.rule.to(device=first.device, dtype=first.dtype).requires_grad_(False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's, with each parameter checked to be a real floating-point tensor and the
        group's ``lr`` a finite number >= 0."""
        _check_lr(param_group.get("lr", self.defaults["lr"]), "a param group's lr")
        super().add_param_group(param_group)
        for param in self.param_groups[-1]["params"]:
            if not param.is_floating_point():
                raise ConfigError(
                    f"LearnedOptimizer updates floating-point parameters only (got one of {param.dtype}): "
                    "pass the model's trainable parameters."
                )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update of every parameter that has a gradient: one LSTM call over all their
        coordinates per (device, dtype). Returns the closure's loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = [(p, group["lr"]) for group in self.param_groups for p in group["params"] if p.grad is not None]
        for p, _ in stepped:  # all checked before any parameter moves
            if p.grad.layout != torch.strided:
                raise RuntimeError(
                    "LearnedOptimizer does not support sparse gradients: compute dense ones "
                    "(e.g. nn.Embedding(..., sparse=False)) or call .to_dense() on the gradient."
                )
        kinds: dict[tuple[torch.device, torch.dtype], list[tuple[Tensor, float]]] = {}
        for p, lr in stepped:
            kinds.setdefault((p.device, p.dtype), []).append((p, lr))
        for members in kinds.values():  # one sync per (device, dtype)
            if not bool(torch.stack([p.grad.isfinite().all() for p, _ in members]).all()):
                raise ConfigError(
                    "LearnedOptimizer got a NaN or infinite gradient, so no parameter was updated: check the loss "
                    "(a lower learning rate, gradient clipping), or skip the step as torch.amp.GradScaler does."
                )
        for (device, dtype), members in kinds.items():
            self._update(members, _cast(self.rule, device, dtype))
        return loss

    def _update(self, members: list[tuple[Tensor, float]], weights: dict[str, Tensor]) -> None:
        """One LSTM call over the coordinates of ``members`` (parameters of one device and dtype, with
        their group's lr), the rule's weights ``weights`` in that dtype."""
        params = [p for p, _ in members]
        for p in params:
            if not self.state[p]:
                hidden, cell = self.rule.initial_state(p.numel(), p.device, p.dtype)
                self.state[p].update(hidden=hidden, cell=cell)
        state = LSTMState(
            torch.cat([self.state[p]["hidden"] for p in params], dim=1),
            torch.cat([self.state[p]["cell"] for p in params], dim=1),
        )
        grads = torch.cat([p.grad.reshape(-1) for p in params])
        updates, state = torch.func.functional_call(self.rule, weights, (grads, state))
        offset = 0
        for p, lr in members:
            size = p.numel()
            p.add_(updates[offset : offset + size].view_as(p), alpha=lr)
            self.state[p]["hidden"] = state.hidden[:, offset : offset + size].clone()
            self.state[p]["cell"] = state.cell[:, offset : offset + size].clone()
            offset += size

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's, refusing NaN or infinite hidden states and states of another rule's shape."""
        bad = nonfinite_entries(state_dict.get("state", {}), "state")
        if bad:
            raise ConfigError(
                f"the optimizer state {', '.join(bad[:3])} holds NaN or infinite values: "
                "load a state_dict saved before the training diverged."
            )
        shapes = {tuple(s["hidden"].shape[::2]) for s in state_dict.get("state", {}).values() if "hidden" in s}
        rule_shape = (self.rule.num_layers, self.rule.hidden_size)
        if shapes - {rule_shape}:
            raise ConfigError(
                f"the optimizer state holds hidden states of (layers, units) {sorted(shapes)}, but this rule has "
                f"{rule_shape}: load a state_dict saved by a LearnedOptimizer with the same rule."
            )
        super().load_state_dict(state_dict)


def _check_lr(lr: Any, name: str) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"{name} must be a number (a factor on the rule's update, 1.0 as trained), not {lr!r}.")
    if not (math.isfinite(lr) and lr >= 0):
        raise ConfigError(
            f"{name} must be a finite number >= 0 (a factor on the rule's update, 1.0 as trained), not {lr}."
        )


def _cast(rule: CoordinatewiseLSTM, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """The rule's weights on ``device`` in ``dtype`` (the tensors themselves where they already are)."""
    return {name: value.to(device=device, dtype=dtype) for name, value in rule.named_parameters()}
