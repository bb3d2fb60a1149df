"""Optimizee families: task samplers whose batch is a set of optimisation problems, not episodes
(ARCHITECTURE.md, "Beyond episodes"): their ``batch_kind`` is "optimizees". An algorithm that accepts
that kind (a learned optimizer) trains each problem's parameters from their initial values and is
scored by the loss it reaches.

A problem's parameters are one flat vector, so that a batch of them is a matrix [B, D] whose
entries are exactly the coordinates a coordinatewise rule updates; each family turns the vector
back into its own shapes inside ``optimizee_loss``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from metalab.errors import require
from metalab.tasks.base import BatchKind, Split, TaskSampler
from metalab.tasks.footprint import Footprint

__all__ = ["OptimizeeBatch", "OptimizeeTasks"]


@dataclass
class OptimizeeBatch:
    """B optimisation problems.

    params: [B, D] the initial parameters of each problem (flat).
    data:   per-problem tensors of the family, leading dimension B (quadratic: W [B, n, n], y [B, n]).
    seed:   seeds what the family draws along the trajectory (MNIST: the minibatch of each step),
            so that the loss at a given step is a pure function of the parameters.
    split:  the split the problems come from.
    """

    params: Tensor
    data: dict[str, Tensor] = field(default_factory=dict)
    seed: int = 0
    split: str = "train"

    @property
    def num_tasks(self) -> int:
        return self.params.shape[0]

    def to(self, device: torch.device | str) -> OptimizeeBatch:
        return OptimizeeBatch(
            self.params.to(device), {k: v.to(device) for k, v in self.data.items()}, self.seed, self.split
        )


class OptimizeeTasks(TaskSampler):
    """A distribution over optimisation problems. ``sample`` returns an OptimizeeBatch;
    ``optimizee_loss(params, batch, step)`` is each problem's loss [B] at the parameters
    [B, D] during step ``step`` of its optimisation (a pure function: the same step gives the same
    value). Evaluation scores a problem by its loss after the last step: ``final_loss``."""

    batch_kind: ClassVar[BatchKind] = "optimizees"
    metric_name = "final_loss"
    higher_is_better = False

    def __init__(self, device: torch.device | str = "cpu", baseline_lrs: dict[str, float] | None = None) -> None:
        """``baseline_lrs``: {baseline: learning rate} of the hand-designed optimizers (sgd, nesterov,
        rmsprop, adam; ``metalab.optim.baselines``) the learned rule is compared with on the test problems,
        tuned for this family by scripts/tune_baselines.py."""
        from metalab.optim.baselines import BASELINES

        super().__init__(device)
        self.baseline_lrs = dict(baseline_lrs or {})
        for name, lr in self.baseline_lrs.items():
            require(name in BASELINES, f"tasks.baseline_lrs.{name} is not a baseline: use {', '.join(BASELINES)}.")
            require(
                isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0,
                f"tasks.baseline_lrs.{name} must be a positive learning rate (got {lr!r}).",
            )

    @classmethod
    def footprints(cls, tasks: Mapping[str, Any], trainer: Mapping[str, Any]) -> list[Footprint]:
        """None known here: each family states what one of its problems holds (its parameters, the
        data it draws), as ``Quadratic`` and ``MnistMLP`` do."""
        return []

    @abstractmethod
    def sample(self, batch_size: int, split: Split, generator: torch.Generator) -> OptimizeeBatch:
        """``batch_size`` problems of ``split``, with their initial parameters."""

    @abstractmethod
    def optimizee_loss(self, params: Tensor, batch: OptimizeeBatch, step: int) -> Tensor:
        """Loss of each problem [B] at ``params`` [B, D] during step ``step`` (0 = at the start)."""

    def draw_seed(self, generator: torch.Generator) -> int:
        """A seed for what a batch draws along its trajectory, from the sampler's generator."""
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=self.device).item())
