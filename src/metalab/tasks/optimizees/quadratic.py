"""Quadratic functions of "Learning to learn by gradient descent by gradient descent" (Andrychowicz
et al. 2016, Section 3.1): f(theta) = ||W theta - y||^2, one W [n, n] and y [n] per problem."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import vmap

from metalab.errors import require
from metalab.tasks.base import Split
from metalab.tasks.footprint import Footprint, settings, train_and_eval
from metalab.tasks.optimizees.base import OptimizeeBatch, OptimizeeTasks
from metalab.tasks.spec import TaskSpec

__all__ = ["Quadratic", "quadratic_loss"]


def quadratic_loss(theta: Tensor, W: Tensor, y: Tensor) -> Tensor:
    """||W theta - y||^2 of one problem: theta [n], W [n, n], y [n] -> scalar."""
    return ((W @ theta - y) ** 2).sum()


class Quadratic(OptimizeeTasks):
    """Problems f(theta) = ||W theta - y||^2, vmapped over the batch.

    dim: n (paper: 10).  distribution: of the entries of W and y: "gaussian" N(0, 1) (the paper) or
    "uniform" U[0, 1) (DeepMind's code).  init_std: theta_0 ~ N(0, init_std^2) (DeepMind: 0.01;
    0 starts every problem at the origin).  baseline_lrs: see ``OptimizeeTasks``. Problems are infinite:
    the splits share one distribution and differ only in the seed the trainer gives them.

    Seen as data, a problem is a least-squares regression of n examples (the rows of W) with
    targets y, hence its spec: input shape (n,), one output, scored as a regression.
    """

    kind = "regression"
    output_dim = 1

    def __init__(
        self,
        dim: int = 10,
        distribution: Literal["gaussian", "uniform"] = "gaussian",
        init_std: float = 0.01,
        baseline_lrs: dict[str, float] | None = None,
        device: torch.device | str = "cpu",
    ):
        super().__init__(device, baseline_lrs)
        require(
            isinstance(dim, int) and dim >= 1, f"tasks.dim must be an integer >= 1 (got {dim!r}): the paper's is 10."
        )
        require(
            distribution in ("gaussian", "uniform"),
            f"tasks.distribution must be gaussian (the paper) or uniform (DeepMind's code) (got {distribution!r}).",
        )
        require(init_std >= 0, f"tasks.init_std must be >= 0 (got {init_std}).")
        self.dim, self.distribution, self.init_std = dim, distribution, init_std
        self.input_shape = (dim,)

    @classmethod
    def describe(cls, dim: int = 10, **config: Any) -> TaskSpec:
        return TaskSpec((dim,), cls.output_dim, cls.kind)

    @classmethod
    def footprints(cls, tasks: Mapping[str, Any], trainer: Mapping[str, Any]) -> list[Footprint]:
        """Per problem: theta [n] trained, and W [n, n] and y [n] drawn."""
        dim = settings(cls, tasks)["dim"]
        problems = dict(noun="problems", detail=f"of dimension {dim}", levers=("tasks.dim",))
        return train_and_eval(trainer, {**problems, "parameters": dim, "elements": dim * dim + dim})

    def sample(self, batch_size: int, split: Split, generator: torch.Generator) -> OptimizeeBatch:
        def draw(*shape: int) -> Tensor:
            full = (batch_size, *shape)
            if self.distribution == "uniform":
                return torch.rand(full, generator=generator, device=self.device)
            return torch.randn(full, generator=generator, device=self.device)

        W, y = draw(self.dim, self.dim), draw(self.dim)
        theta = self.init_std * torch.randn(batch_size, self.dim, generator=generator, device=self.device)
        return OptimizeeBatch(theta, {"W": W, "y": y}, seed=0, split=split)

    def optimizee_loss(self, params: Tensor, batch: OptimizeeBatch, step: int) -> Tensor:
        return vmap(quadratic_loss)(params, batch.data["W"], batch.data["y"])

    # as a regression (the TaskSampler contract): predictions W theta [n, 1] against targets y [n]
    @staticmethod
    def loss(predictions: Tensor, targets: Tensor) -> Tensor:
        return ((predictions.squeeze(-1) - targets) ** 2).sum()

    metric = loss
