"""iMAML (Rajeswaran, Finn, Kakade, Levine, NeurIPS 2019): implicit meta-gradients.

Inner problem per task (Eq. 4): w* = argmin_w  L_support(w) + lam/2 ||w - theta||^2, solved
approximately by ``inner_steps`` of gradient descent (or Adam) from theta; the loop is never
differentiated. Its stationarity condition, scaled by 1/lam,

    F(w, theta) = grad L_support(w) / lam + (w - theta) = 0,

gives by the implicit function theorem (Lemma 1) the meta-gradient
    d L_query(w*) / d theta = (I + H / lam)^{-1} grad L_query(w*),   H = hess L_support(w*),
which ``metalab.hypergrad.root_vjp`` computes with the configured linear solver (CG with 5
iterations in the paper) from Hessian-vector products: memory does not grow with inner_steps.
solver=first_order drops the inverse and uses grad L_query(w*) itself.
"""
from __future__ import annotations

from typing import ClassVar

from torch import Tensor
from torch.func import grad

from metalab.algorithms.base import NonFiniteLossError
from metalab.algorithms.episodic import EpisodicAlgorithm, StepCallback
from metalab.distributed import all_finite
from metalab.errors import require
from metalab.hypergrad import root_vjp
from metalab.inner_optimizers import make_inner_optimizer
from metalab.types import Params, TaskBatch

__all__ = ["IMAML"]

_EXACT_LIMIT = 5000  # parameters; the dense matrix is then at most 100 MB per task in float32


class IMAML(EpisodicAlgorithm):
    """lam: strength of the proximal term (the paper's lambda = 2).  inner_optimizer: "sgd" | "adam" |
    "learned" (the rule of the learned-optimizer run directory ``inner_rule``)."""

    name = "imaml"
    distributed_ok = True
    solvers = ("cg", "neumann", "gmres", "exact", "first_order")
    solver_advice: ClassVar[dict[str, str]] = {
        "unroll": "iMAML differentiates the inner problem's optimality condition, not its loop; use a linear "
                  "solver (cg, neumann, gmres, exact) or first_order, or algo=maml to backpropagate through the loop",
    }

    def __init__(self, *args, lam: float = 2.0, inner_optimizer: str = "sgd", inner_rule: str | None = None, **kwargs):
        require(lam > 0, f"algo.lam must be positive (got {lam}): the paper uses algo.lam=2.0.")
        self.lam = lam
        super().__init__(*args, **kwargs)
        size = sum(p.numel() for p in self.model.parameters())
        require(self.solver.name != "exact" or size <= _EXACT_LIMIT,
                f"solver=exact builds a dense {size}x{size} matrix per task for this model "
                f"({size * size * 4 / 2**30:.1f} GiB in float32): use solver=cg or solver=gmres, or a model of at "
                f"most {_EXACT_LIMIT} parameters.")
        self.inner_optimizer = make_inner_optimizer(inner_optimizer, self.inner_lr, inner_rule)

    def inner_objective(self, params: Params, anchor: Params, x: Tensor, y: Tensor) -> Tensor:
        """L_support(w) + lam/2 ||w - theta||^2 for one task."""
        proximal = sum(((params[k] - anchor[k]) ** 2).sum() for k in params)
        return self.support_loss(params, x, y) + 0.5 * self.lam * proximal

    def optimality(self, params: Params, anchor: Params, x: Tensor, y: Tensor) -> Params:
        """F(w, theta) = grad L_support(w) / lam + (w - theta): zero at the inner solution."""
        grads = grad(self.support_loss)(params, x, y)
        return {k: grads[k] / self.lam + params[k] - anchor[k] for k in params}

    def adapt(self, params: Params, x_support: Tensor, y_support: Tensor, steps: int,
              on_step: StepCallback | None = None) -> Params:
        anchor = {k: v.detach() for k, v in params.items()}
        params, state = dict(anchor), self.inner_optimizer.init(anchor)
        for step in range(steps):
            if on_step is not None:
                on_step(step, params)
            updates, state = self.inner_optimizer.update(grad(self.inner_objective)(params, anchor, x_support, y_support), state)
            params = {k: params[k] + updates[k] for k in params}
        if on_step is not None:
            on_step(steps, params)
        return params

    def meta_gradient(self, batch: TaskBatch) -> tuple[Params, Tensor, Tensor]:
        """Mean implicit meta-gradient over the batch, and per-task query losses and metrics [B]."""
        theta = {k: v.detach() for k, v in self.initial_params().items()}

        def per_task(x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor):
            adapted = self.adapt(theta, x_support, y_support, self.inner_steps)

            def query_loss(params: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
                loss, metric = self.query_scores(params, x_query, y_query, x_support)
                return loss, (loss, metric)

            outer_grad, (loss, metric) = grad(query_loss, has_aux=True)(adapted)
            if self.solver.name != "first_order":
                outer_grad = root_vjp(self.optimality, adapted, theta, outer_grad, self.solver, x_support, y_support)
            return outer_grad, loss, metric

        grads, losses, metrics = self.over_tasks(per_task, batch)
        return {k: g.mean(0) for k, g in grads.items()}, losses, metrics

    def train_step(self, batch: TaskBatch) -> dict[str, float]:
        meta_grad, losses, metrics = self.meta_gradient(batch)
        loss = losses.mean()
        if not all_finite(loss):  # on every process
            raise NonFiniteLossError(f"the query loss is {loss.item()}")
        # A surrogate whose gradient in theta is the implicit meta-gradient, so that the shared
        # meta_step (clipping, finiteness checks, the optimizer) applies unchanged.
        surrogate = sum((p * meta_grad[k]).sum() for k, p in self.initial_params().items())
        return self.step_report(losses, metrics, self.meta_step(surrogate))
