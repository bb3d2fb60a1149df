"""A drop-in for the official ``auxilearn.optim.MetaOptimizer`` (Navon et al., ICLR 2021): a training
loop written for the official code runs by changing its import,

    from metalab.auxilearn import MetaOptimizer      # was: from auxilearn.optim import MetaOptimizer

    aux_optimizer = MetaOptimizer(torch.optim.SGD(aux_net.parameters(), lr=1e-3), hpo_lr=1e-4)
    ...
    aux_optimizer.step(train_loss=train_set_loss, val_loss=aux_set_loss,
                       parameters=primary.parameters(), aux_params=aux_net.parameters())

and gets the official numbers: the hypergradient -(d_phi grad_w L_T)^T p with the official Neumann sum
p = sum_{j=0..truncate_iter} (I - hpo_lr H)^j grad_w L_A (no leading hpo_lr: 1/hpo_lr times the
paper's), no direct dL_A/dphi, its norm clipped at ``max_grad_norm``, then ``meta_optimizer.step()``.

It is a thin adapter: the losses are tensors already built, so the Hessian-vector products are
autograd double-backward products on their graphs, and the linear system is solved by
``metalab.hypergrad``'s functional solvers over Params (``solver=`` takes cg or gmres too, the 1/hpo_lr
scale then applied to their solution; not exact, which vmaps the products, and a graph's backward does
not vmap). Generators are accepted (the official README passes
``.parameters()``, which the official code iterates more than once).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from metalab.errors import require
from metalab.hypergrad import LinearSolver, apply_gradients, neumann
from metalab.types import Params

__all__ = ["MetaOptimizer"]


class MetaOptimizer:
    """meta_optimizer: a torch optimizer over the auxiliary parameters phi.  hpo_lr: the Neumann step
    (and the convention's scale).  truncate_iter: the Neumann terms J (official: 3).  max_grad_norm:
    clip the hypergradient's norm (None: no clipping; official default 10).  solver: a
    ``metalab.hypergrad`` linear solver replacing the Neumann series (None: the official series)."""

    def __init__(
        self,
        meta_optimizer: torch.optim.Optimizer,
        hpo_lr: float,
        truncate_iter: int = 3,
        max_grad_norm: float | None = 10,
        solver: LinearSolver | None = None,
    ):
        require(hpo_lr > 0, f"hpo_lr must be positive (got {hpo_lr}).")
        require(
            max_grad_norm is None or max_grad_norm > 0, f"max_grad_norm must be positive or None (got {max_grad_norm})."
        )
        self.meta_optimizer, self.hpo_lr, self.max_grad_norm = meta_optimizer, hpo_lr, max_grad_norm
        self.solver = solver if solver is not None else neumann(terms=truncate_iter, alpha=hpo_lr)

    def hypergradient(
        self, train_loss: Tensor, val_loss: Tensor, parameters: Iterable[Tensor], aux_params: Iterable[Tensor]
    ) -> list[Tensor]:
        """The official hypergradient, one tensor per auxiliary parameter (nothing is modified)."""
        params, aux_params = list(parameters), list(aux_params)
        grad_val = _grad(val_loss, params, retain_graph=True)
        grad_train = torch.autograd.grad(train_loss, params, create_graph=True, allow_unused=True)
        grad_train = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grad_train)]

        def hvp(v: Params) -> Params:  # H v on the graph of grad_w L_T (double backward)
            return _as_params(_grad(grad_train, params, grad_outputs=list(v.values()), retain_graph=True))

        p = self.solver(hvp, _as_params(grad_val))
        mixed = _grad(grad_train, aux_params, grad_outputs=[value / self.hpo_lr for value in p.values()])
        return [-g for g in mixed]

    def step(
        self,
        train_loss: Tensor,
        val_loss: Tensor,
        parameters: Iterable[Tensor],
        aux_params: Iterable[Tensor],
        return_grads: bool = False,
    ) -> list[Tensor] | None:
        """Set phi.grad to the hypergradient, clip, ``meta_optimizer.step()`` (as the official ``step``;
        ``metalab.hypergrad.apply_gradients``). Unlike the official code, a NaN or infinite
        hypergradient is refused (``NonFiniteLossError``) before phi changes."""
        aux_params = list(aux_params)
        self.zero_grad()
        hypergrads = self.hypergradient(train_loss, val_loss, parameters, aux_params)
        apply_gradients(aux_params, hypergrads, self.meta_optimizer, max_norm=self.max_grad_norm, what="hypergradient")
        return hypergrads if return_grads else None

    def zero_grad(self) -> None:
        self.meta_optimizer.zero_grad()


def _grad(outputs, inputs: list[Tensor], **kwargs) -> list[Tensor]:
    """torch.autograd.grad with zeros for inputs the outputs do not depend on."""
    grads = torch.autograd.grad(outputs, inputs, allow_unused=True, **kwargs)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _as_params(tensors: list[Tensor]) -> Params:
    return {str(i): t for i, t in enumerate(tensors)}
