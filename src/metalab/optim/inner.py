"""Inner-loop optimizers as pure (init, update) pairs over Params, in the style of optax, so that
any of them can drive any inner loop and be vmapped over tasks. The learned LSTM rule of a trained
``algo=lstm_optimizer`` run is one too (``make_inner_optimizer("learned", lr, rule)``,
``learned_inner_optimizer``).

    opt = adam(lr=0.01)
    state = opt.init(params)
    updates, state = opt.update(grads, state)
    params = {k: params[k] + updates[k] for k in params}

``descend`` runs such a loop: ``steps`` updates of an inner optimizer on a loss of Params.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad

from metalab.errors import require
from metalab.hypergrad.tree import tree_ravel
from metalab.optim.lstm_rule import CoordinatewiseLSTM, LSTMState
from metalab.types import Params

__all__ = ["InnerOptimizer", "adam", "descend", "learned_inner_optimizer", "make_inner_optimizer", "sgd"]


class InnerOptimizer(NamedTuple):
    init: Callable[[Params], Any]
    update: Callable[[Params, Any], tuple[Params, Any]]  # (grads, state) -> (updates, state)


def sgd(lr: float | Params) -> InnerOptimizer:
    """Plain gradient descent: update = -lr * grad. ``lr`` is one step size, or Params of one step size
    per parameter entry, keyed and shaped as the gradients (Meta-SGD, Li et al. 2017: rates that are
    meta-parameters themselves, so the updates stay differentiable in them)."""

    def rate(key: str) -> float | Tensor:
        return lr[key] if isinstance(lr, dict) else lr

    return InnerOptimizer(lambda params: (), lambda grads, state: ({k: -rate(k) * g for k, g in grads.items()}, state))


def adam(lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> InnerOptimizer:
    """Adam (Kingma & Ba 2015, Algorithm 1) with bias correction."""
    beta1, beta2 = betas

    def init(params: Params):
        zeros = {k: torch.zeros_like(p) for k, p in params.items()}
        return (0, zeros, dict(zeros))

    def update(grads: Params, state):
        step, mean, var = state
        step += 1
        mean = {k: beta1 * mean[k] + (1 - beta1) * g for k, g in grads.items()}
        var = {k: beta2 * var[k] + (1 - beta2) * g * g for k, g in grads.items()}
        correction1, correction2 = 1 - beta1**step, (1 - beta2**step) ** 0.5
        return (
            {k: -lr * (mean[k] / correction1) / (var[k].sqrt() / correction2 + eps) for k in grads},
            (step, mean, var),
        )

    return InnerOptimizer(init, update)


def learned_inner_optimizer(rule: CoordinatewiseLSTM) -> InnerOptimizer:
    """The rule as a pure (init, update) pair over Params (``metalab.optim.inner``): the state
    is the LSTM state of every coordinate of the parameters, taken in the dict's order; an update
    is one step of the rule on all gradients at once. It vmaps over tasks. ``init`` moves the rule
    to the device and dtype of the parameters when they differ.

        opt = learned_inner_optimizer(metalab.load_rule(run_dir))
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
        flat, unravel = tree_ravel(grads)
        steps, state = rule(flat, state)
        return unravel(steps), state

    return InnerOptimizer(init, update)


def make_inner_optimizer(name: str, lr: float, rule: CoordinatewiseLSTM | None = None) -> InnerOptimizer:
    """The inner optimizer a config names (``algo.inner_optimizer``): "sgd", "adam" (both at rate
    ``lr``) or "learned": ``rule``, the trained rule of a learned-optimizer run (``algo.inner_rule``,
    loaded by the application from its run directory), whose updates carry their own scale (``lr`` is
    not used). Its weights stay fixed: they are no meta-parameters of the algorithm that uses it."""
    names = ("sgd", "adam", "learned")
    require(name in names, f"algo.inner_optimizer must be one of {list(names)} (got {name!r}).")
    if name != "learned":
        require(
            rule is None,
            f"algo.inner_rule is only read with algo.inner_optimizer=learned (got "
            f"algo.inner_optimizer={name}): remove algo.inner_rule or set algo.inner_optimizer=learned.",
        )
        return (sgd if name == "sgd" else adam)(lr)
    require(
        rule is not None,
        "algo.inner_optimizer=learned needs algo.inner_rule=<run dir>: the directory of a trained "
        "`python train.py algo=lstm_optimizer ...` run.",
    )
    return learned_inner_optimizer(rule.requires_grad_(False))


def descend(
    optimizer: InnerOptimizer,
    loss: Callable[[Params], Tensor],
    params: Params,
    steps: int,
    first_order: bool = False,
    on_step: Callable[[int, Params], None] | None = None,
) -> Params:
    """``params`` after ``steps`` updates of ``optimizer`` on ``loss(params)`` (gradients by
    ``torch.func.grad``, so it vmaps over tasks). The updates stay differentiable in the starting
    point (backpropagating through them is MAML's second order); with ``first_order`` the gradients
    are detached, so no second derivative is ever taken. ``on_step(step, params)`` is called before
    each step and after the last (step 0: the starting point)."""
    state = optimizer.init(params)
    for step in range(steps):
        if on_step is not None:
            on_step(step, params)
        grads = grad(loss)(params)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        updates, state = optimizer.update(grads, state)
        params = {k: p + updates[k] for k, p in params.items()}
    if on_step is not None:
        on_step(steps, params)
    return params
