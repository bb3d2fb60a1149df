"""Hessian-vector products over Params, matrix-free and vmappable (torch.func).

For a scalar ``f(params, *args)``, ``hvp(f, params, v, *args) = (d^2 f / d params^2) v``
computed forward-over-reverse, ``jvp(grad(f))``: one gradient evaluation's memory and about
two to three times its time, never the Hessian itself (Pearlmutter, 1994; the torch.func MAML
examples). Under ``torch.func.vmap`` over a task dimension it gives one HVP per task.
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
    return torch.func.jvp(lambda p: torch.func.grad(f)(p, *args), (params,), (v,))[1]


def make_hvp(f: Callable[..., Tensor], params: Params, *args: Any) -> Callable[[Params], Params]:
    """``v -> hvp(f, params, v, *args)``: the ``matvec`` a linear solver takes, e.g.
    ``cg()(make_hvp(inner_loss, w), b)`` solves ``H x = b``."""
    return lambda v: hvp(f, params, v, *args)
