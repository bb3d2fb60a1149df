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
``metalab.hypergrad``'s functional solvers over Params (``solver=`` takes cg, gmres or exact too, the
1/hpo_lr scale then applied to their solution). Generators are accepted (the official README passes
``.parameters()``, which the official code iterates more than once).

Unlike the official code, every argument is checked before anything is computed, as torch.optim checks
its own (TypeError for a wrong type, ``metalab.ConfigError``, a ValueError, for a wrong value, in one
sentence naming the argument): in particular ``aux_params`` must be parameters that ``meta_optimizer``
updates and ``parameters`` must not be (the two swapped is refused), and a NaN or infinite loss or
hypergradient raises ``NonFiniteLossError`` with the auxiliary parameters, their ``.grad`` and the
optimizer's state untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from metalab.errors import require
from metalab.hypergrad import LinearSolver, NonFiniteLossError, apply_gradients, neumann
from metalab.types import Params

__all__ = ["MetaOptimizer"]

_SOLVERS = "metalab.hypergrad.cg(...), gmres(...), neumann(...) or exact()"


class MetaOptimizer:
    """meta_optimizer: a torch optimizer over the auxiliary parameters phi.  hpo_lr: the Neumann step
    (and the convention's scale), a finite number > 0.  truncate_iter: the Neumann terms J, an integer
    >= 0 (official: 3).  max_grad_norm: clip the hypergradient's norm (None: no clipping; official
    default 10).  solver: a ``metalab.hypergrad`` linear solver replacing the Neumann series (None: the
    official series)."""

    def __init__(
        self,
        meta_optimizer: torch.optim.Optimizer,
        hpo_lr: float,
        truncate_iter: int = 3,
        max_grad_norm: float | None = 10,
        solver: LinearSolver | None = None,
    ):
        if not isinstance(meta_optimizer, torch.optim.Optimizer):
            raise TypeError(
                "meta_optimizer must be a torch.optim.Optimizer over the auxiliary parameters, e.g. "
                f"torch.optim.SGD(aux_net.parameters(), lr=1e-3), not {_kind(meta_optimizer)}."
            )
        _check_number("hpo_lr", hpo_lr, "a finite number > 0 (the official examples use 1e-4)")
        _check_number("max_grad_norm", max_grad_norm, "a finite number > 0, or None for no clipping", optional=True)
        terms = "an integer >= 0 (the Neumann terms; official: 3)"
        if isinstance(truncate_iter, bool) or not isinstance(truncate_iter, int):
            raise TypeError(f"truncate_iter must be {terms}, not {_kind(truncate_iter)}.")
        require(truncate_iter >= 0, f"truncate_iter must be {terms}, not {truncate_iter}.")
        _check_solver(solver)
        self.meta_optimizer, self.hpo_lr, self.max_grad_norm = meta_optimizer, hpo_lr, max_grad_norm
        self.solver = solver if solver is not None else neumann(terms=truncate_iter, alpha=hpo_lr)

    def hypergradient(
        self, train_loss: Tensor, val_loss: Tensor, parameters: Iterable[Tensor], aux_params: Iterable[Tensor]
    ) -> list[Tensor]:
        """The official hypergradient, one tensor per auxiliary parameter (nothing is modified). The
        arguments are checked first (see the module's docstring)."""
        return self._hypergradient(train_loss, val_loss, *self._checked(train_loss, val_loss, parameters, aux_params))

    def _hypergradient(
        self, train_loss: Tensor, val_loss: Tensor, params: list[Tensor], aux_params: list[Tensor]
    ) -> list[Tensor]:
        grad_val = torch.autograd.grad(val_loss, params, retain_graph=True, allow_unused=True)
        require(
            any(g is not None for g in grad_val),
            "val_loss does not depend on parameters: pass the primary network's parameters as parameters "
            "and a val_loss computed by that network (are parameters and aux_params swapped?).",
        )
        grad_train = torch.autograd.grad(train_loss, params, create_graph=True, allow_unused=True)
        # the entries of grad_w L_T that are functions of (w, phi): the others add nothing to H v or to the mixed term
        linked = [i for i, g in enumerate(grad_train) if g is not None and g.requires_grad]
        outputs = [grad_train[i] for i in linked]

        def hvp(v: Params) -> Params:  # H v on the graph of grad_w L_T (double backward)
            if not outputs:
                return {key: torch.zeros_like(value) for key, value in v.items()}
            vs = list(v.values())
            return _as_params(_grad(outputs, params, grad_outputs=[vs[i] for i in linked], retain_graph=True))

        p = list(self.solver(hvp, _as_params(_zeros_for_none(grad_val, params))).values())
        mixed = (
            torch.autograd.grad(outputs, aux_params, [p[i] / self.hpo_lr for i in linked], allow_unused=True)
            if outputs
            else [None] * len(aux_params)
        )
        require(
            any(g is not None for g in mixed),
            "the gradient of train_loss in parameters does not depend on aux_params, so the hypergradient "
            "would be zero: build train_loss with the auxiliary network weighting the auxiliary losses "
            "(main loss + aux_net(auxiliary losses), as the official examples do).",
        )
        return [-g for g in _zeros_for_none(mixed, aux_params)]

    def step(
        self,
        train_loss: Tensor,
        val_loss: Tensor,
        parameters: Iterable[Tensor],
        aux_params: Iterable[Tensor],
        return_grads: bool = False,
    ) -> list[Tensor] | None:
        """Set phi.grad to the hypergradient, clip, ``meta_optimizer.step()`` (as the official ``step``;
        ``metalab.hypergrad.apply_gradients``). Unlike the official code, a NaN or infinite loss or
        hypergradient is refused (``NonFiniteLossError``) before phi, phi.grad or the optimizer change."""
        params, aux_params = self._checked(train_loss, val_loss, parameters, aux_params)
        hypergrads = self._hypergradient(train_loss, val_loss, params, aux_params)
        if not all(bool(torch.isfinite(g).all()) for g in hypergrads):
            raise NonFiniteLossError(
                "the hypergradient holds NaN or infinite values although both losses are finite, so the auxiliary "
                "parameters were left unchanged: lower hpo_lr (the Neumann series diverges above 2 / the largest "
                "Hessian eigenvalue) or truncate_iter."
            )
        self.zero_grad()
        apply_gradients(aux_params, hypergrads, self.meta_optimizer, max_norm=self.max_grad_norm, what="hypergradient")
        return hypergrads if return_grads else None

    def zero_grad(self) -> None:
        self.meta_optimizer.zero_grad()

    def _checked(
        self, train_loss: Any, val_loss: Any, parameters: Any, aux_params: Any
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The two parameter lists, after every check that needs no derivative: scalar losses with a graph,
        finite (else NonFiniteLossError); non-empty lists of tensors that require grad; aux_params among
        meta_optimizer's parameters, ``parameters`` neither among them nor sharing a tensor with aux_params."""
        for name, loss in (("train_loss", train_loss), ("val_loss", val_loss)):
            if not isinstance(loss, Tensor):
                raise TypeError(f"{name} must be a loss tensor built from the parameters, not {_kind(loss)}.")
            require(loss.numel() == 1, f"{name} has shape {list(loss.shape)}: pass a scalar loss (e.g. its .mean()).")
            require(
                loss.grad_fn is not None,
                f"{name} has no graph to differentiate: compute it from the parameters outside torch.no_grad(), "
                "without .detach() or .item().",
            )
            if not bool(torch.isfinite(loss.detach()).all()):
                raise NonFiniteLossError(
                    f"{name} is {loss.item()}, so no hypergradient was applied and the auxiliary parameters are "
                    "unchanged: lower the learning rates, or look for a log(0) or a division by zero in the loss."
                )
        params, aux = _tensors("parameters", parameters), _tensors("aux_params", aux_params)
        aux_ids = {id(p) for p in aux}
        require(
            not any(id(p) in aux_ids for p in params),
            "parameters and aux_params share tensors: pass the primary network's parameters as parameters "
            "and the auxiliary network's as aux_params.",
        )
        stepped = {id(p) for group in self.meta_optimizer.param_groups for p in group["params"]}
        outside = sum(id(p) not in stepped for p in aux)
        require(
            outside == 0,
            f"{outside} of the {len(aux)} aux_params are not parameters of meta_optimizer, which would not update "
            "them: pass as aux_params the auxiliary network's parameters that meta_optimizer was built over "
            "(are parameters and aux_params swapped?).",
        )
        require(
            not any(id(p) in stepped for p in params),
            "meta_optimizer updates some of parameters (the primary network's): build it over the auxiliary "
            "network's parameters only (are parameters and aux_params swapped?).",
        )
        return params, aux


def _tensors(name: str, values: Any) -> list[Tensor]:
    """``values`` (an iterable of tensors, e.g. a generator of ``net.parameters()``) as a list, checked:
    not a single tensor or a module, non-empty, every entry a tensor that requires grad."""
    if isinstance(values, (Tensor, nn.Module, str)) or not isinstance(values, Iterable):
        hint = " (pass net.parameters())" if isinstance(values, nn.Module) else ""
        raise TypeError(f"{name} must be an iterable of tensors, e.g. net.parameters(), not {_kind(values)}{hint}.")
    values = list(values)
    require(len(values) > 0, f"{name} is empty: pass the network's parameters, e.g. net.parameters().")
    for index, value in enumerate(values):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{index}] is {_kind(value)}: {name} must hold tensors, e.g. net.parameters().")
        require(
            value.requires_grad,
            f"{name}[{index}] does not require grad: pass only trainable tensors "
            "(e.g. [p for p in net.parameters() if p.requires_grad]).",
        )
    return values


def _check_number(name: str, value: Any, wanted: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {wanted}, not {_kind(value)}.")
    require(math.isfinite(value) and value > 0, f"{name} must be {wanted}, not {value}.")


def _check_solver(solver: Any) -> None:
    """None, or a linear solver: solver(matvec, b) -> x over Params (every ``metalab.hypergrad`` one)."""
    if solver is None or (callable(solver) and getattr(solver, "kind", "implicit") == "implicit"):
        return
    if isinstance(solver, str):
        known = solver in ("cg", "gmres", "neumann", "exact")
        hint = f"build it with metalab.hypergrad.{solver}()" if known else f"use one of {_SOLVERS}"
        raise TypeError(f"solver must be a linear solver object, not the string {solver!r}: {hint}.")
    raise TypeError(
        f"solver must be a linear solver ({_SOLVERS}) or None for the official Neumann series, not {_kind(solver)}."
    )


def _kind(value: Any) -> str:
    """A value named for a sentence: "a list", "the string 'cg'", "None"."""
    if value is None:
        return "None"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"a {type(value).__name__}"


def _grad(outputs, inputs: list[Tensor], **kwargs) -> list[Tensor]:
    """torch.autograd.grad with zeros for inputs the outputs do not depend on."""
    return _zeros_for_none(torch.autograd.grad(outputs, inputs, allow_unused=True, **kwargs), inputs)


def _zeros_for_none(grads, inputs: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _as_params(tensors: list[Tensor]) -> Params:
    return {str(i): t for i, t in enumerate(tensors)}
