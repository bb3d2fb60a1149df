"""The one way a gradient reaches parameters: set ``.grad``, clip, step the optimizer, with a NaN or an
infinity refused before anything moves. The algorithms' meta-step, AuxiLearn's combiner step,
``ImplicitStep`` and the drop-in ``metalab.auxilearn.MetaOptimizer`` all step through it.

    norm = apply_gradients(params, grads, optimizer, max_norm=10.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["NonFiniteLossError", "apply_gradients"]


class NonFiniteLossError(RuntimeError):
    """The meta-loss or its gradient became NaN or infinite; nothing was updated."""


def apply_gradients(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    optimizer: torch.optim.Optimizer,
    *,
    max_norm: float | None = None,
    max_value: float | None = None,
    what: str = "gradient",
) -> float:
    """Set each ``params[i].grad`` to ``grads[i]`` (cast to the parameter's dtype; None: no gradient), clip
    every entry to +-``max_value`` and then the total norm to ``max_norm`` (None: no limit), and step
    ``optimizer`` (which steps ``params``).

    Returns the total norm after the value clipping and before the norm clipping. When it is NaN or
    infinite, raises NonFiniteLossError ("the <what> norm is nan") before stepping, so the parameters
    keep their values.
    """
    for param, grad in zip(params, grads, strict=True):
        param.grad = None if grad is None else grad.to(param.dtype)
    with_grads = [param for param in params if param.grad is not None]
    if max_value is not None:
        torch.nn.utils.clip_grad_value_(with_grads, max_value)
    norm = torch.nn.utils.clip_grad_norm_(with_grads, float("inf") if max_norm is None else max_norm)
    if not torch.isfinite(norm):
        raise NonFiniteLossError(f"the {what} norm is {norm.item()}")
    optimizer.step()
    return norm.item()
