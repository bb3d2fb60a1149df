"""MAML (Finn, Abbeel, Levine, ICML 2017) and first-order MAML, on torch.func.

Meta-objective (Eq. 1): min_theta sum_tasks L_query(theta - alpha grad L_support(theta)), with
``inner_steps`` such steps. solver=unroll backpropagates through them (second order);
solver=first_order treats the inner gradients as constants. ``learn_inner_lr`` learns one step
size per parameter entry as well (Meta-SGD, Li et al. 2017): SGD with per-entry rates. The inner step
is an inner optimizer (``metalab.optim.inner``): SGD, or with ``inner_optimizer`` Adam or a trained
learned-optimizer rule, whose updates are then backpropagated through in the same way.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from metalab.algorithms.episodic import EpisodicAlgorithm, StepCallback
from metalab.algorithms.execution import Staged
from metalab.errors import require
from metalab.optim.inner import descend, make_inner_optimizer, sgd
from metalab.optim.lstm_rule import CoordinatewiseLSTM
from metalab.types import Params, TaskBatch

__all__ = ["MAML"]


class MAML(EpisodicAlgorithm):
    name = "maml"
    distributed_ok = True
    query_differentiated_once = True  # the meta-gradient backpropagates the query loss, once
    staged_step = True  # meta_loss: adapt, then score the query
    solvers = ("unroll", "first_order")
    solver_advice: ClassVar[dict[str, str]] = {
        "implicit": "MAML's inner loop is a few SGD steps, not the solution of an inner problem, so implicit "
        "differentiation does not apply",
    }

    def __init__(
        self,
        model: nn.Module,
        *args,
        learn_inner_lr: bool = False,
        inner_lr: float = 0.01,
        inner_optimizer: str = "sgd",
        inner_rule: CoordinatewiseLSTM | None = None,
        **kwargs,
    ):
        """inner_optimizer: "sgd" (the paper) | "adam" | "learned" (the rule of the learned-optimizer
        run directory ``inner_rule``)."""
        require(
            not learn_inner_lr or inner_optimizer == "sgd",
            "algo.learn_inner_lr=true learns SGD step sizes: it needs algo.inner_optimizer=sgd "
            f"(got {inner_optimizer}).",
        )
        self.learn_inner_lr = learn_inner_lr
        # Meta-SGD: one learned step size per parameter entry, initialised at inner_lr
        self.inner_lrs: Params = (
            {k: nn.Parameter(torch.full_like(p, inner_lr)) for k, p in model.named_parameters()}
            if learn_inner_lr
            else {}
        )
        self.inner_optimizer = (
            sgd(self.inner_lrs) if learn_inner_lr else make_inner_optimizer(inner_optimizer, inner_lr, inner_rule)
        )
        super().__init__(model, *args, inner_lr=inner_lr, **kwargs)

    def meta_parameters(self) -> Params:
        params = dict(self.model.named_parameters())
        params.update({f"inner_lr.{k}": v for k, v in self.inner_lrs.items()})
        return params

    def to(self, device: torch.device | str) -> MAML:
        super().to(device)
        with torch.no_grad():
            for value in self.inner_lrs.values():
                value.data = value.data.to(device)
        return self

    def adapt(
        self, params: Params, x_support: Tensor, y_support: Tensor, steps: int, on_step: StepCallback | None = None
    ) -> Params:
        def support_loss(params: Params) -> Tensor:
            return self.support_loss(params, x_support, y_support)

        return descend(self.inner_optimizer, support_loss, params, steps, self.solver.first_order, on_step)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Per-task query losses and metrics after adaptation, each [B], differentiable in the
        meta-parameters."""
        init = self.initial_params()

        def adapt(x_support: Tensor, y_support: Tensor) -> Params:
            return self.adapt(init, x_support, y_support, self.inner_steps)

        def score(adapted: Params, x_support: Tensor, x_query: Tensor, y_query: Tensor):
            loss, metric = self.query_scores(adapted, x_query, y_query, x_support)
            return loss, metric.detach()

        return self.over_tasks(Staged(adapt, score), batch)

    def train_step(self, batch: TaskBatch) -> dict[str, float]:
        losses, metrics = self.meta_loss(batch)
        return self.step_report(losses, metrics, self.meta_step(losses.mean()))
