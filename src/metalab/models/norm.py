"""Batch normalisation from plain mean and variance operations, with a choice of where the
statistics come from.

Why not ``nn.BatchNorm2d``: torch's vmap rule for differentiating ``F.batch_norm`` twice is
wrong (pytorch/functorch#534). Under ``torch.func.vmap`` over tasks it gave MAML's second-order
meta-gradient a 2e-3 to 1e-2 relative error against a per-task autograd loop (and a non-zero
gradient to the conv biases in front of a norm, which the loss cannot depend on), and made
iMAML's Hessian-vector products fail with "accessing `data` under vmap transform is not
allowed". The same normalisation written as ``mean`` / ``var`` tensor ops differentiates exactly
to any order, under vmap or not.

Protocols (where the statistics come from), ``PROTOCOLS``:

* ``"support"`` (default): the statistics of a *context set*, the task's support examples
  (non-transductive; "MetaBN" in Bronskill et al. 2020, "TaskNorm"). A query's prediction then
  does not depend on which other queries are in the batch.
* ``"transductive"``: the statistics of whatever batch is given, queries included (the protocol
  of MAML's code, Finn et al. 2017): a prediction depends on the rest of the query batch.

Either way the norm keeps no running statistics, so a model is a pure function of its parameters.

Inside ``fused_norm()`` a norm that takes its statistics from the batch it normalises calls torch's
fused ``F.batch_norm`` instead: the same function in fewer passes. Where it may be entered: around a
forward pass that is differentiated at most once, under vmap or not (an episodic algorithm's query
scores, ``EpisodicAlgorithm.query_differentiated_once``); and around a per-task loop, not under vmap,
whose rule for the second derivative is wrong, that takes at most second derivatives (torch's batch
norm has none beyond): ``metalab.algorithms.execution``'s ``loop+fused_norm`` executions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.errors import require

__all__ = ["PROTOCOLS", "BatchNorm", "affine", "check_protocol", "fused_norm"]

PROTOCOLS = ("support", "transductive")

_FUSED: ContextVar[bool] = ContextVar("fused_norm", default=False)


@contextmanager
def fused_norm() -> Iterator[None]:
    """Within: a ``BatchNorm`` normalising x by x's own statistics runs torch's fused batch norm (see
    the module docstring for where that is allowed)."""
    token = _FUSED.set(True)
    try:
        yield
    finally:
        _FUSED.reset(token)


def _along_channels(values: Tensor, like: Tensor) -> Tensor:
    """``values`` [C] viewed so that they broadcast along the channel dimension (1) of ``like``."""
    return values.view((1, -1) + (1,) * (like.dim() - 2))


def affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """x * scale + shift per channel: x [N, C, *spatial], scale and shift [C] (a norm's map,
    ``BatchNorm.scale_shift``)."""
    return x * _along_channels(scale, x) + _along_channels(shift, x)


def check_protocol(protocol: str) -> str:
    """``protocol`` if it names a normalisation protocol; a ConfigError otherwise."""
    require(
        protocol in PROTOCOLS,
        "model.norm must be 'support' (statistics of the support set) or 'transductive' (of each batch) "
        f"(got {protocol!r}).",
    )
    return protocol


class BatchNorm(nn.Module):
    """Normalise each channel of x [N, C, *spatial] to zero mean and unit variance, then scale by
    ``weight`` and shift by ``bias`` (both [C], initialised to 1 and 0, as ``nn.BatchNorm2d``'s and
    with the same names). The mean and the biased variance are taken over the first
    ``num_context`` rows of x and all spatial positions (all N rows when ``num_context`` is None):

        y = (x - mean) / sqrt(var + eps) * weight + bias
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor, num_context: int | None = None) -> Tensor:
        if num_context is None and _FUSED.get():
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return affine(x, *self.scale_shift(x if num_context is None else x[:num_context]))

    def scale_shift(self, reference: Tensor) -> tuple[Tensor, Tensor]:
        """The normalisation as one affine map per channel, y = x * scale + shift (each [C]), with
        the statistics of ``reference`` [M, C, *spatial]: scale = weight / sqrt(var + eps),
        shift = bias - mean * scale. One pass over x instead of four, and, since it is affine, a
        map that can be folded into the convolution in front of it (``Conv4``).

        Written so that autograd's derivatives (first and second) make no more full-size passes
        than they must: a mean as a sum times 1/n (``Tensor.mean``'s derivative divides the
        expanded gradient, a full-size pass; a sum's is a broadcast view), the centring as adding
        -mean (subtraction's derivative negates the full-size gradient), and x * x rather than
        ``square`` (whose derivative multiplies by 2 in a pass of its own)."""
        dims = [0, *range(2, reference.dim())]
        inverse_count = 1.0 / (reference.numel() // reference.shape[1])
        mean = reference.sum(dims) * inverse_count
        centred = reference + _along_channels(-mean, reference)
        var = (centred * centred).sum(dims) * inverse_count
        scale = self.weight * torch.rsqrt(var + self.eps)
        return scale, self.bias - mean * scale

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"
