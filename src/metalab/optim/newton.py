"""Hessian-free minimisation (truncated Newton-CG with a backtracking line search) over Params,
matrix-free and vmappable: the second-order inner solver of iMAML's "Hessian-free" rows
(Rajeswaran et al., NeurIPS 2019, Section 4: "5 CG steps to compute the search direction and
line-search to pick the step size").

Each step solves H d = -g for the search direction with ``cg_steps`` conjugate-gradient iterations
on Hessian-vector products (``metalab.hypergrad.solve_cg``, which stops at non-positive curvature
and falls back to -g: Nocedal & Wright, Numerical Optimization, Algorithm 7.1), then takes the
largest step t in 1, 1/2, ..., 2^-(line_search - 1) that satisfies Armijo's condition
f(w + t d) <= f(w) + c t g^T d (Algorithm 3.1 there), or no step where none does. Every quantity
is per problem, so under ``torch.func.vmap`` each task picks its own step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metalab.errors import require
from metalab.hypergrad.hvp import make_hvp
from metalab.hypergrad.linear_solvers import solve_cg
from metalab.hypergrad.tree import tree_add, tree_dot, tree_scale
from metalab.types import Params

__all__ = ["ARMIJO", "newton_cg"]

#: the sufficient-decrease constant c of Armijo's condition (Nocedal & Wright's suggestion, 1e-4)
ARMIJO = 1e-4


def newton_cg(
    objective: Callable[..., Tensor],
    params: Params,
    *args: Any,
    steps: int,
    cg_steps: int = 5,
    line_search: int = 6,
    on_step: Callable[[int, Params], None] | None = None,
) -> Params:
    """``params`` after ``steps`` Newton-CG steps on ``objective(params, *args)`` (a scalar);
    ``on_step(step, params)`` is called before each step and once after the last."""
    require(cg_steps >= 1, f"the Newton-CG search direction needs at least 1 CG step (got {cg_steps}).")
    require(line_search >= 1, f"the line search needs at least 1 trial step (got {line_search}).")
    value_and_grad = torch.func.grad_and_value(objective)
    for step in range(steps):
        if on_step is not None:
            on_step(step, params)
        grads, value = value_and_grad(params, *args)
        direction = solve_cg(make_hvp(objective, params, *args), tree_scale(grads, -1.0), maxiter=cg_steps)
        slope = tree_dot(grads, direction)  # < 0 along a descent direction
        chosen, found = torch.zeros_like(value), slope >= 0  # no step along a non-descent direction
        for trial in range(line_search):
            size = 0.5**trial
            trial_value = objective(tree_add(params, direction, size), *args)
            accept = ~found & (trial_value <= value + ARMIJO * size * slope)  # False for NaN
            chosen = torch.where(accept, torch.full_like(chosen, size), chosen)
            found = found | accept
        params = tree_add(params, direction, chosen)
    if on_step is not None:
        on_step(steps, params)
    return params
