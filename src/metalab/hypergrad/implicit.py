"""Implicit differentiation of a root w*(phi) of an optimality condition F(w, phi, *args) = 0.

By the implicit function theorem, dw*/dphi = -(dF/dw)^{-1} dF/dphi, so for an outer gradient
v = dL/dw at w*,

    dL/dphi = -(dF/dphi)^T u,      (dF/dw)^T u = v,

with (dF/dw)^T u a vjp of F in w (so non-symmetric F works), the linear system left to any
solver of ``linear_solvers``, and the last product a vjp of F in phi (Blondel et al., 2021,
"Efficient and Modular Implicit Differentiation"; JAXopt's ``root_vjp`` and
``custom_root``). Nothing differentiates the loop that found w*: memory does not grow with
the number of inner steps (Rajeswaran et al., 2019, iMAML).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metalab.hypergrad.conditions import Loss, OptimalityFn, stationarity
from metalab.hypergrad.linear_solvers import Matvec
from metalab.hypergrad.tree import tree_norm, tree_scale, tree_sub
from metalab.types import Params

__all__ = ["Solve", "InnerSolver", "Residuals", "root_vjp", "custom_root"]

#: ``solve(matvec, b, init=None) -> x`` with A x = b: a ``LinearSolver`` or any such function.
Solve = Callable[[Matvec, Params], Params]
#: ``inner_solver(init_w, phi, *args) -> w*``: any procedure that finds a root of F.
InnerSolver = Callable[..., Params]


class Residuals(NamedTuple):
    """How far a hypergradient's two assumptions hold, per system (0-d tensors, batched under vmap).

    optimality: ||F(w, phi)||, zero when w is the root the implicit function theorem assumes.
    linear:     ||(dF/dw)^T u - v|| / ||v||, the relative residual of the computed u in the
                undamped system: zero when the linear solve is exact (a solver's damping or
                truncation shows here as the error it makes in the hypergradient)."""

    optimality: Tensor
    linear: Tensor


def root_vjp(
    optimality_fn: OptimalityFn,
    solution: Params,
    outer_params: Params,
    cotangent: Params,
    solve: Solve,
    *args: Any,
    residuals: bool = False,
) -> Params | tuple[Params, Residuals]:
    """``-(dF/dphi)^T (dF/dw)^{-T} v`` at (w, phi) = (``solution``, ``outer_params``).

    optimality_fn: F(w, phi, *args) -> Params shaped like w (see ``conditions``).
    solution:      w*, Params, a root of F(., phi).
    outer_params:  phi, Params of any shapes.
    cotangent:     v = dL/dw at w*, Params shaped like w.
    solve:         linear solver for (dF/dw)^T u = v; CG needs dF/dw symmetric positive
                   definite (stationarity at a minimum), gmres and exact do not.
    residuals:     also return ``Residuals`` (one more vjp in w).
    Returns dL/dphi through w*, Params shaped like phi (the implicit part only: add any direct
    dL/dphi yourself, as ``ImplicitStep`` does).

    Pure torch.func: vmap it over a task dimension (phi batched, or shared with
    ``in_dims=None``, in which case sum the per-task results).
    """
    condition, vjp_in_w = torch.func.vjp(lambda w: optimality_fn(w, outer_params, *args), solution)
    u = solve(lambda x: vjp_in_w(x)[0], cotangent)
    _, vjp_in_phi = torch.func.vjp(lambda phi: optimality_fn(solution, phi, *args), outer_params)
    hypergradient = tree_scale(vjp_in_phi(u)[0], -1.0)
    if not residuals:
        return hypergradient
    linear = tree_norm(tree_sub(vjp_in_w(u)[0], cotangent)) / tree_norm(cotangent)
    return hypergradient, Residuals(tree_norm(condition), linear)


@dataclass(frozen=True)
class _Spec:
    """The non-tensor half of a custom_root call, passed through ``autograd.Function.apply``."""

    inner_solver: InnerSolver
    optimality_fn: OptimalityFn
    solve: Solve
    phi_keys: tuple[str, ...]
    w_keys: tuple[str, ...]


class _ImplicitRoot(torch.autograd.Function):
    """w* = inner_solver(init_w, phi, *args) forward (never recorded); root_vjp backward.

    Tensors travel as flat positional inputs (phi's values, then init_w's, then args) because
    autograd only tracks tensors passed to ``apply`` directly, not inside a dict.
    ``generate_vmap_rule``: forward and backward are torch.func-transformable, so torch derives
    the batching rule and ``torch.func.vmap`` over tasks works.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(spec: _Spec, *flat: Any) -> tuple[Tensor, ...]:  # type: ignore[override]
        phi, init_w, args = _unflatten(spec, flat)
        # Detached inputs and grad mode on: the inner loop may use torch.autograd or torch.optim
        # freely (forward runs under no_grad otherwise), and can never write into phi.grad.
        phi, init_w = _detached(phi), _detached(init_w)
        with torch.enable_grad():
            solution = spec.inner_solver(init_w, phi, *args)
        return tuple(solution[key].detach() for key in spec.w_keys)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        spec, *flat = inputs
        phi, _, args = _unflatten(spec, flat)
        ctx.spec, ctx.args = spec, args
        ctx.save_for_backward(*phi.values(), *output)

    @staticmethod
    def backward(ctx: Any, *grad_w: Tensor) -> tuple[Tensor | None, ...]:
        spec: _Spec = ctx.spec
        saved = ctx.saved_tensors
        num_phi = len(spec.phi_keys)
        phi = dict(zip(spec.phi_keys, saved[:num_phi]))
        solution = dict(zip(spec.w_keys, saved[num_phi:]))
        cotangent = dict(zip(spec.w_keys, grad_w))
        grad_phi = root_vjp(spec.optimality_fn, solution, phi, cotangent, spec.solve, *ctx.args)
        num_rest = len(ctx.needs_input_grad) - 1 - num_phi  # init_w and args: w* is independent of init
        return (None, *(grad_phi[key] for key in spec.phi_keys), *([None] * num_rest))


def _detached(params: Params) -> Params:
    return {key: value.detach() for key, value in params.items()}


def _unflatten(spec: _Spec, flat: tuple[Any, ...]) -> tuple[Params, Params, tuple[Any, ...]]:
    num_phi, num_w = len(spec.phi_keys), len(spec.w_keys)
    phi = dict(zip(spec.phi_keys, flat[:num_phi]))
    init_w = dict(zip(spec.w_keys, flat[num_phi : num_phi + num_w]))
    return phi, init_w, tuple(flat[num_phi + num_w :])


def custom_root(
    optimality_fn: OptimalityFn | None = None,
    solve: Solve | None = None,
    *,
    inner_loss: Loss | None = None,
) -> Callable[[InnerSolver], InnerSolver]:
    """Decorator making an inner solver's output differentiable in phi by implicit
    differentiation (JAXopt's ``custom_root``; Blondel et al., 2021).

        @custom_root(stationarity(inner_loss), solve=cg(maxiter=20))
        def inner_solver(init_w, phi, *args) -> Params: ...   # any loop, never differentiated

        w_star = inner_solver(init_w, phi, *args)   # Params; autograd sees w*(phi)
        outer_loss(w_star).backward()               # phi.grad via root_vjp

    optimality_fn: F(w, phi, *args) with F(w*, phi, *args) = 0. Give ``inner_loss=`` instead
        for the default condition, stationarity: F = grad_w inner_loss.
    solve: the linear solver for the backward pass (required), e.g. ``cg(maxiter=20)``.

    phi is a Params of tensors (leaves requiring grad, or results of other differentiable
    ops); init_w and args are passed through to both functions and receive no gradient.
    The result is Params with init_w's keys. The wrapped solver works under
    ``torch.func.vmap``; a second derivative (create_graph=True) is not supported.
    """
    if (optimality_fn is None) == (inner_loss is None):
        raise TypeError("custom_root needs exactly one of optimality_fn and inner_loss.")
    if solve is None:
        raise TypeError("custom_root needs solve=, a linear solver such as metalab.hypergrad.cg().")
    condition = optimality_fn if optimality_fn is not None else stationarity(inner_loss)

    def decorator(inner_solver: InnerSolver) -> InnerSolver:
        @functools.wraps(inner_solver)
        def wrapped(init_w: Params, phi: Params, *args: Any) -> Params:
            spec = _Spec(inner_solver, condition, solve, tuple(phi), tuple(init_w))
            solution = _ImplicitRoot.apply(spec, *phi.values(), *init_w.values(), *args)
            return dict(zip(spec.w_keys, solution))

        return wrapped

    return decorator
