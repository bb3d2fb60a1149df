"""Optimality conditions F(w, phi, *args) = 0 whose root is the inner solution w*(phi).

The catalogue of Blondel et al. (2021), "Efficient and Modular Implicit Differentiation",
as in JAXopt: each function here turns a loss (plus a prox or projection) into F,
which ``root_vjp``, ``custom_root`` and ``ImplicitStep`` differentiate.

Shapes: ``w`` and ``F(w, phi, *args)`` are Params with the same keys and shapes (F maps the
inner space to itself); ``phi`` is Params of any shapes; ``args`` are data, never
differentiated. Every F is built from torch.func, so it is vmappable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metalab.hypergrad.tree import tree_add, tree_sub
from metalab.types import Params

__all__ = [
    "OptimalityFn",
    "stationarity",
    "proximal_gradient_fixed_point",
    "projected_gradient_fixed_point",
]

#: F(w, phi, *args) -> Params shaped like w; w*(phi) solves F(w*, phi) = 0.
OptimalityFn = Callable[..., Params]
#: loss(w, phi, *args) -> 0-d tensor.
Loss = Callable[..., Tensor]


def stationarity(inner_loss: Loss) -> OptimalityFn:
    """F(w, phi, *args) = grad_w inner_loss(w, phi, *args) (Blondel et al. 2021).

    For an unconstrained smooth inner problem w* = argmin_w inner_loss; dF/dw is the Hessian,
    symmetric, so CG applies (positive definite at a strict minimum).
    """
    return torch.func.grad(inner_loss)


def proximal_gradient_fixed_point(
    smooth_loss: Loss, prox: Callable[[Params, Params, float], Params], step: float
) -> OptimalityFn:
    """F(w, phi, *args) = w - prox(w - step * grad_w smooth_loss(w, phi, *args), phi, step)
    (Blondel et al. 2021).

    For w* = argmin_w smooth_loss(w, phi) + g(w, phi), with ``prox(x, phi, step)`` the
    proximal operator of ``step * g(., phi)`` (e.g. soft-thresholding at ``step * lambda``
    for the lasso). Any ``step > 0`` gives the same roots; dF/dw is not symmetric, so pair it
    with gmres or exact.
    """

    def condition(w: Params, phi: Params, *args: Any) -> Params:
        gradient = torch.func.grad(smooth_loss)(w, phi, *args)
        return tree_sub(w, prox(tree_add(w, gradient, -step), phi, step))

    return condition


def projected_gradient_fixed_point(
    loss: Loss, projection: Callable[[Params, Params], Params], step: float
) -> OptimalityFn:
    """F(w, phi, *args) = w - projection(w - step * grad_w loss(w, phi, *args), phi)
    (Blondel et al. 2021: the prox of a set's indicator is the projection onto it).

    For w* = argmin_{w in C(phi)} loss(w, phi), with ``projection(x, phi)`` the Euclidean
    projection onto C(phi) (e.g. ``relu`` for w >= 0, a clamp for a box). dF/dw is not
    symmetric: use gmres or exact.
    """
    return proximal_gradient_fixed_point(loss, lambda x, phi, _step: projection(x, phi), step)
