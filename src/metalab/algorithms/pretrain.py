"""The "pretrained, then fine-tuned" baseline of MAML (Finn, Abbeel, Levine, ICML 2017, Section 5.1 and
Appendix C, the "pretrained" row of the sinusoid comparison).

Training is ordinary regression on all tasks jointly: min_theta of the mean loss of theta itself over
every example of the meta-batch, support and query sets alike, with no adaptation; one meta-optimizer
step per batch. Evaluation fine-tunes theta on each task's support set with MAML's inner loop (plain SGD,
``inner_lr``, ``eval_inner_steps``, ``report_steps``) and scores the query set, exactly as MAML is
evaluated: the class is MAML with ``inner_steps`` fixed at 0 and another ``train_step``. The paper tuned
the fine-tuning step size automatically; here it is ``inner_lr``.

On classification episodes it runs, but learns no class identity: each episode shuffles its labels
0..N-1 over its classes, so joint training sees each label attached to every class. MAML's MiniImageNet
fine-tuning baseline was not this: it trained a classifier over the 64 training classes, which metalab's
episodes do not expose.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metalab.algorithms.base import OptimizerFactory
from metalab.algorithms.maml import MAML
from metalab.tasks.base import TaskSampler
from metalab.types import TaskBatch

__all__ = ["Pretrain"]


class Pretrain(MAML):
    name = "pretrain"
    distributed_ok = True  # the gradient is the mean of per-episode terms
    staged_step = False  # its train_step scores every example of a task in one stage
    solvers = ("first_order",)
    solver_advice: ClassVar[dict[str, str]] = {
        "unroll": "pretraining fits theta itself to every example, with no inner loop to differentiate through",
        "implicit": "pretraining has no inner problem whose solution implicit differentiation could differentiate",
    }

    def __init__(
        self,
        model: nn.Module,
        tasks: TaskSampler,
        solver: Any,
        meta_optimizer: OptimizerFactory,
        grad_clip_norm: float | None = None,
        grad_clip_value: float | None = None,
        inner_lr: float = 0.01,
        eval_inner_steps: int = 10,
        report_steps: Sequence[int] = (),
    ):
        """inner_lr: the fine-tuning SGD step size.  eval_inner_steps: fine-tuning steps at evaluation.
        report_steps: also report the query metric after these step counts (e.g. [1, 5, 10])."""
        super().__init__(
            model,
            tasks,
            solver,
            meta_optimizer,
            grad_clip_norm,
            grad_clip_value,
            inner_lr=inner_lr,
            inner_steps=0,
            eval_inner_steps=eval_inner_steps,
            report_steps=report_steps,
        )

    def train_step(self, batch: TaskBatch) -> dict[str, float]:
        """One step of the mean loss of theta over all examples of the batch (support and query)."""
        params = self.initial_params()

        def per_task(x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor):
            x, y = torch.cat([x_support, x_query]), torch.cat([y_support, y_query])
            predictions = self.predict(params, x)  # the task's examples are their own context
            return self.tasks.loss(predictions, y), self.tasks.metric(predictions, y).detach()

        losses, metrics = self.over_tasks(per_task, batch)
        return self.step_report(losses, metrics, self.meta_step(losses.mean()))
