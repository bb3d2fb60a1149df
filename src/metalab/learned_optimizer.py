"""A trained LSTM rule as an ordinary ``torch.optim.Optimizer``, for any PyTorch training loop:

    optimizer = metalab.LearnedOptimizer(model.parameters(), run_dir="outputs/runs/...")
    for x, y in data:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

Each step feeds the gradient of every coordinate of every parameter to the rule in one batched
LSTM call and adds the proposed updates. Each parameter's per-coordinate hidden and cell states live
in the optimizer's ``state``, so ``state_dict`` / ``load_state_dict`` save and restore them.

``learned_inner_optimizer(rule)`` is the same rule as an (init, update) pair over Params, like
``metalab.inner_optimizers.sgd`` and ``adam``, usable inside torch.func.vmap.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metalab.checkpoint import BEST, CHECKPOINT, load_checkpoint
from metalab.errors import ConfigError, require
from metalab.inner_optimizers import InnerOptimizer
from metalab.lstm_rule import CoordinatewiseLSTM, LSTMState
from metalab.types import Params

__all__ = ["LearnedOptimizer", "learned_inner_optimizer", "load_rule"]

_RULE_KEYS = ("hidden_size", "num_layers", "preprocess", "output_scale")


def load_rule(run_dir: str | Path, checkpoint: str = "best") -> CoordinatewiseLSTM:
    """The rule a ``algo=lstm_optimizer`` run trained: its shape from the run's config (in
    checkpoint.pt), its weights from best.pt (``checkpoint="best"``: the best on validation, when
    the run kept one) or checkpoint.pt (``"last"``). Anything else is refused in one sentence."""
    run_dir = Path(run_dir)
    require(checkpoint in ("best", "last"), f"checkpoint must be best or last (got {checkpoint!r}).")
    require((run_dir / CHECKPOINT).is_file(), f"{run_dir} holds no {CHECKPOINT}: pass the directory of a finished "
                                              "`python train.py algo=lstm_optimizer ...` run.")
    last = load_checkpoint(run_dir / CHECKPOINT)
    algo = (last.get("config") or {}).get("algo") or {}
    require(str(algo.get("_target_", "")).endswith("LSTMOptimizer"),
            f"{run_dir} is a run of {algo.get('_target_', 'an unknown algorithm')}, not of algo=lstm_optimizer: "
            "pass the directory of a learned-optimizer run.")
    rule = CoordinatewiseLSTM(**{key: algo[key] for key in _RULE_KEYS if key in algo})
    source = last if checkpoint == "last" or not (run_dir / BEST).is_file() else load_checkpoint(run_dir / BEST)
    try:
        rule.load_state_dict(source["algorithm"]["meta_parameters"])
    except (KeyError, RuntimeError) as error:
        raise ConfigError(f"the weights in {run_dir} do not fit the rule its config describes ({error}): "
                          "re-train the run with this version.".replace("\n", " ")) from None
    return rule


def learned_inner_optimizer(rule: CoordinatewiseLSTM) -> InnerOptimizer:
    """The rule as a pure (init, update) pair over Params (``metalab.inner_optimizers``): the state
    is the LSTM state of every coordinate of the parameters, taken in the dict's order; an update
    is one step of the rule on all gradients at once. It vmaps over tasks. ``init`` moves the rule
    to the device and dtype of the parameters when they differ.

        opt = learned_inner_optimizer(load_rule(run_dir))
        state = opt.init(params)
        updates, state = opt.update(grads, state)
        params = {k: params[k] + updates[k] for k in params}
    """

    def init(params: Params) -> LSTMState:
        first = next(iter(params.values()))
        weight = next(rule.parameters())
        if (weight.device, weight.dtype) != (first.device, first.dtype):
            with torch.no_grad():
                rule.to(device=first.device, dtype=first.dtype)
        return rule.initial_state(sum(p.numel() for p in params.values()), first.device, first.dtype)

    def update(grads: Params, state: LSTMState) -> tuple[Params, LSTMState]:
        steps, state = rule(torch.cat([g.reshape(-1) for g in grads.values()]), state)
        pieces = steps.split([g.numel() for g in grads.values()])
        return {k: piece.view_as(g) for (k, g), piece in zip(grads.items(), pieces)}, state

    return InnerOptimizer(init, update)


class LearnedOptimizer(torch.optim.Optimizer):
    """Update every parameter with a trained coordinatewise LSTM rule (``metalab.lstm_rule``).

    params: the parameters (or parameter groups) to optimise.  run_dir: a learned-optimizer run
    to load the rule from (``load_rule``), or ``rule``: a CoordinatewiseLSTM given directly.
    checkpoint: "best" or "last", with ``run_dir``. The rule's weights are fixed; it is moved to
    the device and dtype of the first parameter.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], run_dir: str | Path | None = None,
                 rule: CoordinatewiseLSTM | None = None, checkpoint: str = "best"):
        require((run_dir is None) != (rule is None), "LearnedOptimizer takes either run_dir or rule, not both or neither.")
        super().__init__(params, {})
        self.rule = rule if rule is not None else load_rule(run_dir, checkpoint)
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
        state = LSTMState(torch.cat([self.state[p]["hidden"] for p in params], dim=1),
                          torch.cat([self.state[p]["cell"] for p in params], dim=1))
        grads = torch.cat([p.grad.reshape(-1) for p in params])
        updates, state = self.rule(grads, state)
        offset = 0
        for p in params:
            size = p.numel()
            p.add_(updates[offset:offset + size].view_as(p))
            self.state[p]["hidden"] = state.hidden[:, offset:offset + size].clone()
            self.state[p]["cell"] = state.cell[:, offset:offset + size].clone()
            offset += size
        return loss
