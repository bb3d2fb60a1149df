"""The task-sampler contract: whole batches of episodes, sampled with tensor ops on the device."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from metalab.types import TaskBatch

__all__ = ["Split", "TaskSampler", "RegressionTasks", "ClassificationTasks"]

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


class TaskSampler(ABC):
    """A distribution over tasks.

    ``sample(batch_size, split, generator)`` returns a TaskBatch of ``batch_size`` episodes,
    deterministic given the generator (a ``torch.Generator`` on ``self.device``), produced
    with tensor ops from data already on the device: no Python loop per task or per example.

    A sampler also says how predictions are scored, so that algorithms stay task-agnostic:
    ``loss(pred, y)`` is the differentiable training loss of one episode, ``metric(pred, y)``
    the reported number (``metric_name``; ``higher_is_better`` tells sweepers which way to go).
    """

    metric_name: str
    higher_is_better: bool
    input_shape: tuple[int, ...]  # shape of one example, e.g. (1,) or (1, 28, 28)
    output_dim: int  # model output width: 1 for regression, ways for classification

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    @abstractmethod
    def sample(self, batch_size: int, split: Split, generator: torch.Generator) -> TaskBatch:
        """``batch_size`` episodes from ``split`` ("train" | "val" | "test")."""

    @abstractmethod
    def loss(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """Scalar loss of one episode: predictions [N, output_dim], targets [N]."""

    @abstractmethod
    def metric(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """Scalar score of one episode (accuracy, MSE, ...), same shapes as ``loss``."""

    def to(self, device: torch.device | str) -> TaskSampler:
        """Move the sampler's resident data to ``device``; subclasses holding tensors extend it."""
        self.device = torch.device(device)
        return self

    def generator(self, seed: int) -> torch.Generator:
        """A generator on the sampler's device, seeded."""
        return torch.Generator(device=self.device).manual_seed(seed)


class RegressionTasks(TaskSampler):
    """Scalar regression scored by mean squared error."""

    metric_name = "mse"
    higher_is_better = False
    output_dim = 1

    def loss(self, predictions: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(predictions.squeeze(-1), targets)

    def metric(self, predictions: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(predictions.squeeze(-1), targets)


class ClassificationTasks(TaskSampler):
    """N-way classification scored by cross-entropy and reported as accuracy."""

    metric_name = "accuracy"
    higher_is_better = True

    def loss(self, predictions: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(predictions, targets)

    def metric(self, predictions: Tensor, targets: Tensor) -> Tensor:
        return (predictions.argmax(-1) == targets).float().mean()
