"""Prototypical Networks (Snell, Swersky, Zemel, NeurIPS 2017), on torch.func.

Each class k of an episode has a prototype, the mean embedding of its support examples (Eq. 1):
c_k = 1/|S_k| sum_{(x, y) in S_k} f(x). A query x is classified by a softmax over the negative squared
Euclidean distances to the prototypes (Eq. 2): logits_k = -||f(x) - c_k||^2; the meta-loss is the
cross-entropy of the query set, averaged over the episodes of a batch (Algorithm 1). There is no inner
loop: adapting to a task is computing its prototypes, so ``adapt`` returns the embedding's parameters
with the prototypes beside them (under ``PROTOTYPES``) and ``predict`` scores against them; evaluation
and ``metalab.load_learner`` then work as for MAML.

The embedding f is the configured model without its output layer: its ``embed(x, context)`` (e.g.
``Conv4.embed``), normalised as the model's forward is (``metalab.models.norm``): a support set with its
own statistics, queries with the support set's ("support") or their own ("transductive"). The output
layer's parameters stay meta-parameters (checkpoints and ``load_learner`` see the whole model) but no
loss reaches them: they get no gradient and the meta-optimizer leaves them as they are.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalab.algorithms.base import OptimizerFactory
from metalab.algorithms.episodic import EpisodicAlgorithm, StepCallback
from metalab.errors import require
from metalab.tasks.base import TaskSampler
from metalab.types import Params, TaskBatch

__all__ = ["PROTOTYPES", "ProtoNet", "squared_distances"]

#: the key of a task's prototypes [ways, feature_dim] among its adapted "parameters"
PROTOTYPES = "prototypes"


def squared_distances(embeddings: Tensor, prototypes: Tensor) -> Tensor:
    """||e_i - c_k||^2 for embeddings [N, D] and prototypes [K, D]: [N, K]."""
    difference = embeddings.unsqueeze(1) - prototypes.unsqueeze(0)
    return (difference * difference).sum(-1)


class _Embedding(nn.Module):
    """``model.embed`` as a module's forward, for ``functional_call`` (its parameters: "model.<name>")."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.model.embed(x, context)


class ProtoNet(EpisodicAlgorithm):
    name = "protonet"
    distributed_ok = True  # the meta-gradient is the mean of per-episode terms
    query_differentiated_once = True  # the meta-gradient backpropagates the query loss, once
    task_kinds = ("classification",)
    solvers = ("first_order",)
    solver_advice: ClassVar[dict[str, str]] = {
        "unroll": "Prototypical Networks have no inner loop to differentiate through (a task's prototypes are a "
        "mean of embeddings, differentiated by ordinary autograd)",
        "implicit": "Prototypical Networks have no inner problem whose solution implicit differentiation could "
        "differentiate",
    }

    def __init__(
        self,
        model: nn.Module,
        tasks: TaskSampler,
        solver: Any,
        meta_optimizer: OptimizerFactory,
        grad_clip_norm: float | None = None,
        grad_clip_value: float | None = None,
    ):
        super().__init__(model, tasks, solver, meta_optimizer, grad_clip_norm, grad_clip_value, inner_steps=0)
        require(
            callable(getattr(model, "embed", None)),
            f"algo=protonet compares embeddings, but {type(model).__name__} has no embed(x, context) method "
            "giving them: use model=conv4 or model=mlp, or give your model one (as metalab.models.Conv4.embed).",
        )
        self.embedding = _Embedding(model)

    def embed(self, params: Params, x: Tensor, context: Tensor | None = None) -> Tensor:
        """f(x) [N, D] for one task's examples x [N, *input_shape] under the model parameters ``params``;
        ``context`` is the task's support set (None: x is)."""
        params = {f"model.{k}": v for k, v in params.items()}
        if context is None or not self.model_takes_context:
            return functional_call(self.embedding, params, (x,))
        return functional_call(self.embedding, params, (x,), {"context": context})

    def adapt(
        self, params: Params, x_support: Tensor, y_support: Tensor, steps: int, on_step: StepCallback | None = None
    ) -> Params:
        """``params`` and the task's prototypes (Eq. 1), [ways, D] under ``PROTOTYPES``; ``steps`` is
        unused (there is no inner loop)."""
        ways = self.tasks.output_dim
        embeddings = self.embed(params, x_support)
        members = (y_support.unsqueeze(1) == torch.arange(ways, device=y_support.device)).to(
            embeddings.dtype
        )  # [S, ways]
        prototypes = (members.T @ embeddings) / members.sum(0).unsqueeze(1)
        adapted = {**params, PROTOTYPES: prototypes}
        if on_step is not None:
            on_step(steps, adapted)
        return adapted

    def predict(self, params: Params, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Logits [N, ways] of one task's examples x: -||f(x) - c_k||^2 (Eq. 2), with ``params`` from
        ``adapt`` and ``context`` the task's support set."""
        weights = {k: v for k, v in params.items() if k != PROTOTYPES}
        return -squared_distances(self.embed(weights, x, context), params[PROTOTYPES])

    def train_step(self, batch: TaskBatch) -> dict[str, float]:
        init = self.initial_params()

        def per_task(x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor):
            loss, metric = self.query_scores(self.adapt(init, x_support, y_support, 0), x_query, y_query, x_support)
            return loss, metric.detach()

        losses, metrics = self.over_tasks(per_task, batch)
        return self.step_report(losses, metrics, self.meta_step(losses.mean()))
