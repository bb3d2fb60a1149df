"""Shared machinery of the episodic algorithms (MAML, iMAML): a per-task inner loop, vmapped over
the task dimension, and evaluation that scores the query set after chosen numbers of steps.

Predictions on a task's query set are made with its support set as ``context``, in training
and in evaluation alike: a model with batch norm (``Conv4``) takes its normalisation statistics
from there under its default protocol (see ``metalab.models.norm``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from metalab.algorithms.base import Algorithm, takes_context
from metalab.algorithms.execution import DEFAULT, Execution, candidates, layout_applies, tasks_beside_channels
from metalab.errors import require
from metalab.models.norm import BatchNorm, fused_norm
from metalab.types import Params, TaskBatch

__all__ = ["EpisodicAlgorithm", "StepCallback", "tasks_beside_channels"]

#: Called as on_step(step, params) after each inner step (and with step 0 before the first).
StepCallback = Callable[[int, Params], None]


class EpisodicAlgorithm(Algorithm):
    """An algorithm whose inner problem is "fit the support set of one episode, starting from the
    meta-learned initialisation". Subclasses implement ``adapt`` for one task; vmapping it over
    the episodes of a batch is done here.

    inner_lr: inner-loop step size.  inner_steps: inner steps during meta-training.
    eval_inner_steps: inner steps during evaluation.  report_steps: extra step counts at which
    evaluation also reports the query metric (e.g. [1, 5, 10] for MAML's sinusoid table).
    """

    #: whether the model is differentiated at most twice (a meta-gradient through inner gradients),
    #: so that a per-task loop may use torch's fused batch norm, which has no third derivative
    fused_norm_ok: bool = True
    #: whether the query loss is differentiated at most once (the meta-gradient backpropagates it, and no
    #: derivative of that is taken), so that the query's forward pass may run torch's fused batch norm in
    #: every execution: exact to first order under vmap too, where its second derivative is wrong. False
    #: unless an algorithm says so: an algorithm that differentiates its query loss twice must leave it
    query_differentiated_once: bool = False
    #: whether ``train_step`` runs a ``Staged`` per-task function (adapt, then score the query), which the
    #: query-loop execution can split
    staged_step: bool = False

    def __init__(
        self,
        *args,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        report_steps: Sequence[int] = (),
        **kwargs,
    ):
        eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        require(inner_lr > 0, f"algo.inner_lr must be positive (got {inner_lr}): e.g. algo.inner_lr=0.01.")
        for key, value in (("inner_steps", inner_steps), ("eval_inner_steps", eval_inner_steps)):
            require(isinstance(value, int) and value >= 0, f"algo.{key} must be an integer >= 0 (got {value!r}).")
        report_steps = sorted(set(report_steps))
        require(
            all(0 <= s <= eval_inner_steps for s in report_steps),
            f"algo.report_steps must lie in [0, algo.eval_inner_steps={eval_inner_steps}] (got {report_steps}).",
        )
        self.inner_lr, self.inner_steps, self.eval_inner_steps = inner_lr, inner_steps, eval_inner_steps
        self.report_steps = report_steps
        super().__init__(*args, **kwargs)
        self.model_takes_context = takes_context(self.model)
        self.execution = DEFAULT

    def predict(self, params: Params, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Model output for the examples x [N, *input_shape] of one task. ``context`` [S,
        *input_shape] is that task's support set, for models whose forward takes ``context``
        (e.g. batch-norm statistics; see ``metalab.models.norm``); without it x is treated as the
        support set. Models whose forward has no ``context`` argument are called on x alone."""
        if context is None or not self.model_takes_context:
            return functional_call(self.model, params, (x,))
        return functional_call(self.model, params, (x,), {"context": context})

    def support_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """Loss on the support set (x, y) of one task, x its own context."""
        return self.tasks.loss(self.predict(params, x), y)

    def query_scores(
        self, params: Params, x_query: Tensor, y_query: Tensor, x_support: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(loss, metric) of one task's query set under ``params``, its support set ``x_support``
        as context; the loss stays differentiable (where ``query_differentiated_once``, once: a norm
        that takes the statistics of the query batch then runs torch's fused batch norm)."""
        with fused_norm() if self.query_differentiated_once else nullcontext():
            predictions = self.predict(params, x_query, context=x_support)
        return self.tasks.loss(predictions, y_query), self.tasks.metric(predictions, y_query)

    def step_report(self, losses: Tensor, metrics: Tensor, grad_norm: float) -> dict[str, float]:
        """What ``train_step`` returns, from per-task query losses and metrics [B]."""
        return {"loss": losses.mean().item(), self.tasks.metric_name: metrics.mean().item(), "grad_norm": grad_norm}

    def over_tasks(self, per_task: Callable[..., Any], batch: TaskBatch) -> Any:
        """``per_task(x_support, y_support, x_query, y_query)`` of one episode over the episodes of
        ``batch``, its outputs stacked, as the current execution runs it (``use``; by default vmapped
        over the whole batch, the query images laid out by ``tasks_beside_channels``)."""
        return self.execution.run(per_task, batch.x_support, batch.y_support, batch.x_query, batch.y_query)

    def executions(self, batch: TaskBatch) -> list[Execution]:
        """The ways of running ``over_tasks`` on batches like ``batch`` (``metalab.algorithms.execution``):
        full vmap, vmap in chunks, a per-task loop, each with and without the channels layout where it
        applies, the loop with torch's fused batch norm where ``fused_norm_ok`` and the model has a batch
        norm, and the query loop where ``staged_step`` and the model has a batch norm (which the query's
        forward pass then runs fused). They give the same numbers; ``metalab.training.autotune`` keeps the
        fastest."""
        norm = any(isinstance(module, BatchNorm) for module in self.model.modules())
        return candidates(
            batch.num_tasks, layout_applies(batch.x_query), self.fused_norm_ok and norm, self.staged_step and norm
        )

    def use(self, execution: Execution) -> None:
        """Run ``over_tasks`` (training and evaluation) as ``execution`` from now on."""
        self.execution = execution

    def initial_params(self) -> Params:
        """The meta-learned initialisation the inner loop starts from."""
        return dict(self.model.named_parameters())

    @abstractmethod
    def adapt(
        self, params: Params, x_support: Tensor, y_support: Tensor, steps: int, on_step: StepCallback | None = None
    ) -> Params:
        """Task parameters after ``steps`` inner steps on one episode's support set."""

    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        metric = self.tasks.metric_name

        def per_task(x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor) -> dict[str, Tensor]:
            scores: dict[str, Tensor] = {}

            def record(step: int, params: Params) -> None:
                if step in self.report_steps:
                    scores[f"{metric}@{step}"] = self.tasks.metric(self.predict(params, x_query, x_support), y_query)

            adapted = self.adapt(self.initial_params(), x_support, y_support, self.eval_inner_steps, record)
            scores["loss"], scores[metric] = self.query_scores(adapted, x_query, y_query, x_support)
            return scores

        with torch.no_grad():  # torch.func.grad inside adapt still works; nothing is kept for backward
            return self.over_tasks(per_task, batch)
