"""Reptile (Nichol, Achiam, Schulman 2018, "On First-Order Meta-Learning Algorithms"), Algorithm 2
(batched), on torch.func.

For each task of the meta-batch, phi_task = k steps of the inner optimizer (SGD, Adam or a learned
rule) on the task's support set, starting from theta; then

    theta <- theta + epsilon * mean_tasks(phi_task - theta).

The update is taken through the trainer's meta-optimizer: each meta-parameter's gradient is set to
theta - mean_tasks(phi_task) and the meta-optimizer steps (``Algorithm.meta_step``, with its
clipping, finiteness checks and, under several processes, the mean over the ranks). With
``trainer.meta_optimizer`` SGD at lr epsilon this is Algorithm 2 exactly; Adam on that "gradient" is
the variant its authors suggest (OpenAI's Reptile post: "treat phi - W as a gradient and plug it into
a more sophisticated optimizer like Adam"). Nothing is differentiated through the inner loop: its
gradients are detached and no graph is kept (``solver=first_order`` only).

The query set of a training episode is not used by the update; its loss at phi_task is reported as
the training loss. Evaluation is MAML's: adapt on the support set with ``eval_inner_steps``, score
the query set (``EpisodicAlgorithm.evaluate``).

Differences from the official code (openai/supervised-reptile): there each inner step takes a
minibatch (``--inner-batch``) of the task's training shots, not the whole support set; its inner
Adam has beta1 = 0 and keeps its moments across tasks and meta-iterations (here: beta1 = 0.9, fresh
moments per task); and epsilon is annealed linearly to 0 (``--meta-step-final 0``), while metalab's
trainer keeps the meta-optimizer's rate constant.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from metalab.algorithms.episodic import EpisodicAlgorithm, StepCallback
from metalab.optim.inner import descend, make_inner_optimizer
from metalab.optim.lstm_rule import CoordinatewiseLSTM
from metalab.types import Params, TaskBatch

__all__ = ["Reptile"]

_NO_DERIVATIVE = (
    "Reptile moves the initialisation towards the adapted parameters without differentiating the inner loop"
)


class Reptile(EpisodicAlgorithm):
    """inner_optimizer: "sgd" | "adam" (the paper's experiments) | "learned" (the rule of the
    learned-optimizer run directory ``inner_rule``), at rate ``inner_lr`` for ``inner_steps`` steps."""

    name = "reptile"
    distributed_ok = True  # the meta-"gradient" theta - mean(phi) is averaged over the ranks in meta_step
    query_differentiated_once = True  # the query loss is only reported
    solvers = ("first_order",)
    solver_advice: ClassVar[dict[str, str]] = {"unroll": _NO_DERIVATIVE, "implicit": _NO_DERIVATIVE}

    def __init__(self, *args, inner_optimizer: str = "sgd", inner_rule: CoordinatewiseLSTM | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.inner_optimizer = make_inner_optimizer(inner_optimizer, self.inner_lr, inner_rule)

    def adapt(
        self, params: Params, x_support: Tensor, y_support: Tensor, steps: int, on_step: StepCallback | None = None
    ) -> Params:
        def support_loss(params: Params) -> Tensor:
            return self.support_loss(params, x_support, y_support)

        return descend(self.inner_optimizer, support_loss, params, steps, first_order=True, on_step=on_step)

    def adapted_parameters(self, batch: TaskBatch) -> tuple[Params, Tensor, Tensor]:
        """phi_task of every episode, each [B, *shape], and the query losses and metrics [B] at phi_task."""
        theta = {k: v.detach() for k, v in self.initial_params().items()}

        def per_task(x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor):
            adapted = self.adapt(theta, x_support, y_support, self.inner_steps)
            return adapted, *self.query_scores(adapted, x_query, y_query, x_support)

        with torch.no_grad():  # torch.func.grad inside adapt still works; nothing is kept for backward
            return self.over_tasks(per_task, batch)

    def train_step(self, batch: TaskBatch) -> dict[str, float]:
        adapted, losses, metrics = self.adapted_parameters(batch)
        theta = self.initial_params()
        direction = {k: p.detach() - adapted[k].mean(0) for k, p in theta.items()}  # theta - mean(phi)
        # A surrogate whose gradient in theta is that direction, so that the shared meta_step applies.
        surrogate = sum((p * direction[k]).sum() for k, p in theta.items())
        return self.step_report(losses, metrics, self.meta_step(surrogate))
