"""ImplicitStep: one step of outer parameters phi along the implicit hypergradient, for a bilevel
problem whose inner parameters w are trained by any means (AuxiLearn's combiner step; Navon et al.,
2021; Lorraine et al., 2020).

    outer: min_phi val_loss(w*(phi), phi)      inner: w*(phi) = argmin_w train_loss(w, phi)

At the current inner parameters w (taken as w*), the total derivative is

    dL_val/dphi = d_phi val_loss  -  (d_phi grad_w train_loss)^T (d^2_w train_loss)^{-1} d_w val_loss,

the second term from ``root_vjp`` on the stationarity of train_loss, with the inverse Hessian
applied by any linear solver (AuxiLearn: ``neumann(terms=3, alpha=hpo_lr)``; or cg, gmres...).
The step itself goes through ``apply_gradients`` (clip, refuse NaN/inf, step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metalab.errors import require
from metalab.hypergrad.apply import apply_gradients
from metalab.hypergrad.conditions import Loss, stationarity
from metalab.hypergrad.implicit import Residuals, Solve, root_vjp
from metalab.hypergrad.tree import tree_add
from metalab.types import Params

__all__ = ["ImplicitStep"]


class ImplicitStep:
    """Sets ``phi.grad`` to the implicit hypergradient, clips it, and steps ``optimizer``.

    outer_params: phi, Params of leaf tensors requiring grad (e.g. ``dict(aux_net.named_parameters())``),
        the tensors ``optimizer`` updates.
    optimizer:    a ``torch.optim.Optimizer`` over ``outer_params.values()``.
    solve:        linear solver for the Hessian system (``LinearSolver`` or any
        ``solve(matvec, b) -> x``); the Hessian of train_loss should be positive definite at w.
    train_loss:   ``train_loss(w, phi, *train_args) -> 0-d tensor``, the inner objective.
    val_loss:     ``val_loss(w, phi, *val_args) -> 0-d tensor``, the outer objective; its direct
        dependence on phi (if any) is added to the implicit part.
    grad_clip:    max global norm of the hypergradient, or None.
    grad_clip_value: max absolute value of each of its entries (clipped before the norm), or None.
    """

    def __init__(
        self,
        outer_params: Params,
        optimizer: torch.optim.Optimizer,
        solve: Solve,
        train_loss: Loss,
        val_loss: Loss,
        grad_clip: float | None = None,
        grad_clip_value: float | None = None,
    ) -> None:
        for key, value in (("grad_clip", grad_clip), ("grad_clip_value", grad_clip_value)):
            require(
                value is None or value > 0,
                f"{key}={value!r} is invalid; set it to a positive number or to null for no clipping.",
            )
        self.outer_params = outer_params
        self.optimizer = optimizer
        self.solve = solve
        self.train_loss = train_loss
        self.val_loss = val_loss
        self.grad_clip, self.grad_clip_value = grad_clip, grad_clip_value

    def hypergradient(
        self,
        inner_params: Params,
        train_args: tuple[Any, ...] = (),
        val_args: tuple[Any, ...] = (),
        residuals: bool = False,
    ) -> tuple[Params, Tensor] | tuple[Params, Tensor, Residuals]:
        """(dL_val/dphi shaped like phi, val_loss value) at w = ``inner_params``; no side effects.
        With ``residuals``, also how well w and the linear solve meet their assumptions
        (``Residuals``: ||grad_w train_loss||, and the relative residual of the Hessian system)."""
        # Detached: the hypergradient is built by torch.func alone and must not extend (or be
        # extended by) whatever autograd graph the caller's tensors belong to.
        w = {key: value.detach() for key, value in inner_params.items()}
        phi = {key: value.detach() for key, value in self.outer_params.items()}
        (grad_w, direct), value = torch.func.grad_and_value(self.val_loss, argnums=(0, 1))(w, phi, *val_args)
        implicit = root_vjp(stationarity(self.train_loss), w, phi, grad_w, self.solve, *train_args, residuals=residuals)
        if residuals:
            implicit, measured = implicit
            return tree_add(implicit, direct), value, measured
        return tree_add(implicit, direct), value

    def step(
        self, inner_params: Params, train_args: tuple[Any, ...] = (), val_args: tuple[Any, ...] = ()
    ) -> dict[str, float]:
        """One outer step: set phi.grad, clip, ``optimizer.step()`` (``apply_gradients``); a NaN or
        infinite hypergradient raises NonFiniteLossError and phi keeps its values.

        Returns ``{"val_loss": ..., "hypergrad_norm": ...}`` (the norm before the norm clipping).
        """
        hypergrad, value = self.hypergradient(inner_params, train_args, val_args)
        norm = apply_gradients(
            list(self.outer_params.values()),
            [hypergrad[key] for key in self.outer_params],
            self.optimizer,
            max_norm=self.grad_clip,
            max_value=self.grad_clip_value,
            what="hypergradient",
        )
        return {"val_loss": float(value), "hypergrad_norm": norm}
