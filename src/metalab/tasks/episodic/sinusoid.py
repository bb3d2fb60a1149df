"""Sinusoid regression of MAML (Finn et al. 2017, Section 5.1): y = A sin(x - phase)."""

from __future__ import annotations

import math
from typing import Any

import torch

from metalab.errors import require
from metalab.tasks.base import RegressionTasks, Split
from metalab.tasks.spec import TaskSpec
from metalab.types import TaskBatch

__all__ = ["Sinusoid"]


class Sinusoid(RegressionTasks):
    """A ~ U[amplitude], phase ~ U[phase], x ~ U[input_range]; every split draws from the same
    distribution (tasks are infinite), so "val" and "test" differ from "train" only in shots/query.

    shots / query: examples per task in the support / query set during meta-training.
    eval_shots / eval_query: the same for "val" and "test" (None = as in training).
    """

    input_shape = (1,)

    def __init__(
        self,
        shots: int = 10,
        query: int = 10,
        eval_shots: int | None = None,
        eval_query: int | None = None,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        input_range: tuple[float, float] = (-5.0, 5.0),
        device: torch.device | str = "cpu",
    ):
        super().__init__(device)
        self.shots, self.query = shots, query
        self.eval_shots = shots if eval_shots is None else eval_shots
        self.eval_query = query if eval_query is None else eval_query
        for key in ("shots", "query", "eval_shots", "eval_query"):
            value = getattr(self, key)
            require(
                isinstance(value, int) and value >= 1,
                f"tasks.{key} must be an integer >= 1 (got {value!r}): e.g. tasks.{key}=10.",
            )
        for key, (low, high) in (("amplitude", amplitude), ("phase", phase), ("input_range", input_range)):
            require(low <= high, f"tasks.{key} must be [low, high] with low <= high (got {[low, high]}).")
        self.amplitude, self.phase, self.input_range = tuple(amplitude), tuple(phase), tuple(input_range)

    @classmethod
    def describe(cls, **config: Any) -> TaskSpec:
        """Scalar inputs and outputs, whatever the keys (they only shape the task distribution)."""
        return TaskSpec(cls.input_shape, cls.output_dim, cls.kind)

    def sample(self, batch_size: int, split: Split, generator: torch.Generator) -> TaskBatch:
        shots, query = (self.shots, self.query) if split == "train" else (self.eval_shots, self.eval_query)

        def uniform(shape: tuple[int, ...], bounds: tuple[float, float]) -> torch.Tensor:
            low, high = bounds
            return low + (high - low) * torch.rand(shape, generator=generator, device=self.device)

        amplitude = uniform((batch_size, 1), self.amplitude)
        phase = uniform((batch_size, 1), self.phase)
        x = uniform((batch_size, shots + query), self.input_range)
        y = amplitude * torch.sin(x - phase)
        x = x.unsqueeze(-1)
        return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])
