"""Hessian-vector products over Params, matrix-free and vmappable (torch.func).

For a scalar ``f(params, *args)``, ``hvp(f, params, v, *args) = (d^2 f / d params^2) v``
computed reverse-over-reverse, the vector-Jacobian product of ``grad(f)`` with v (H is symmetric,
so v^T H = (H v)^T): one gradient evaluation's memory and about two to three times its time,
never the Hessian itself (Pearlmutter, 1994). Under ``torch.func.vmap`` over a task dimension it
gives one HVP per task. Forward-over-reverse (``jvp(grad(f))``, the torch.func examples' choice)
fails on ``F.mse_loss`` in torch 2.14 ("ZeroTensors are immutable"), so it is not used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metalab.types import Params

__all__ = ["hvp", "make_hvp"]


def hvp(f: Callable[..., Tensor], params: Params, v: Params, *args: Any) -> Params:
    """``H v`` with ``H = d^2 f / d params^2`` at ``params``; ``v`` has ``params``' keys and
    shapes, and so has the result. ``args`` are passed to ``f`` and not differentiated."""
    return torch.func.vjp(lambda p: torch.func.grad(f)(p, *args), params)[1](v)[0]


def make_hvp(f: Callable[..., Tensor], params: Params, *args: Any) -> Callable[[Params], Params]:
    """``v -> hvp(f, params, v, *args)``: the ``matvec`` a linear solver takes, e.g.
    ``cg()(make_hvp(inner_loss, w), b)`` solves ``H x = b``."""
    return lambda v: hvp(f, params, v, *args)
