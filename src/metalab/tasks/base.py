"""The task-sampler contract: whole batches of episodes, sampled with tensor ops on the device."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from metalab.recorded import Recorded
from metalab.tasks.footprint import Footprint, episode_footprints
from metalab.tasks.spec import ClassificationScoring, ImageFormat, RegressionScoring, TaskSpec
from metalab.types import TaskBatch

__all__ = ["BATCH_KINDS", "BatchKind", "Split", "TaskSampler", "RegressionTasks", "ClassificationTasks"]

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: What one batch of a sampler is (ARCHITECTURE.md, "Beyond episodes"): a sampler declares the kind it
#: yields (``TaskSampler.batch_kind``), an algorithm the kinds it trains on (``Algorithm.accepts``).
BatchKind = Literal["episodes", "optimizees", "auxiliary"]
#: Each kind in words, for the sentences that refuse a mismatched pair.
BATCH_KINDS: dict[BatchKind, str] = {
    "episodes": "episodes",
    "optimizees": "optimisation problems",
    "auxiliary": "data with auxiliary tasks",
}


class TaskSampler(Recorded, ABC):
    """A distribution over tasks.

    ``sample(batch_size, split, generator)`` returns a TaskBatch of ``batch_size`` episodes,
    deterministic given the generator (a ``torch.Generator`` on ``self.device``), produced
    with tensor ops from data already on the device: no Python loop per task or per example.

    A sampler also says how predictions are scored, so that algorithms stay task-agnostic:
    ``loss(pred, y)`` is the differentiable training loss of one episode, ``metric(pred, y)``
    the reported number (``metric_name``; ``higher_is_better`` tells sweepers which way to go).
    All of that, without the data, is its ``spec`` (a TaskSpec), which checkpoints keep.
    Subclasses may define ``describe(**config)``: the spec from the config keys alone.
    ``batch_kind`` says what ``sample`` returns: TaskBatch episodes here; the optimizee families and
    the data with auxiliary tasks declare their own kinds, and each kind its ``footprints`` (the
    memory a batch needs, from the config) and how an evaluation is cut into batches
    (``evaluation_batches``; ``split_size`` for splits that hold a fixed number of units).
    """

    batch_kind: ClassVar[BatchKind] = "episodes"
    #: what one evaluation unit is, in words (the sentences that count them)
    unit_name: ClassVar[str] = "tasks"
    kind: ClassVar[str]  # "classification" | "regression": how predictions are scored
    metric_name: str
    higher_is_better: bool
    input_shape: tuple[int, ...]  # shape of one example, e.g. (1,) or (1, 28, 28)
    output_dim: int  # model output width: 1 for regression, ways for classification
    image_format: ImageFormat | None = None  # how an image file becomes an input (image tasks)

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

    @property
    def spec(self) -> TaskSpec:
        """What one example looks like and how predictions are scored, without the data."""
        return TaskSpec(tuple(self.input_shape), self.output_dim, self.kind, self.image_format)

    def load_examples(self, paths: Sequence[str | Path]) -> Tensor:
        """Image files as the model saw its training images: float [N, *input_shape] on the device."""
        return self.spec.load_examples(paths, self.device)

    @classmethod
    def footprints(cls, tasks: Mapping[str, Any], trainer: Mapping[str, Any]) -> list[Footprint]:
        """What a training batch and an evaluation batch of the sampler these tasks config keys build
        hold, by the trainer config's batch sizes, without reading any data (``metalab.tasks.footprint``):
        here episodes."""
        return episode_footprints(tasks, trainer)

    @classmethod
    def data_elements(cls, tasks: Mapping[str, Any]) -> int:
        """Numbers the sampler these config keys build holds once built (its data on the device), counted
        from the keys alone before anything is allocated; 0 when it reads its data from disk or draws
        every batch afresh."""
        return 0

    def split_size(self, split: str) -> int | None:
        """The evaluation units ``split`` holds; None when its tasks are drawn afresh (episodes,
        problems), so that any number of them can be evaluated."""
        return None

    def evaluation_batches(
        self, split: Split, num_tasks: int, batch_size: int, generator: torch.Generator
    ) -> Iterator[Any]:
        """The batches of an evaluation of ``num_tasks`` units of ``split``, ``batch_size`` at a time
        (the last one smaller): here fresh ``sample`` batches. A sampler whose splits are finite
        (``split_size``) overrides it so that every unit is scored once."""
        for start in range(0, num_tasks, batch_size):
            yield self.sample(min(batch_size, num_tasks - start), split, generator)

    @classmethod
    def describe(cls, **config: Any) -> TaskSpec | None:
        """The spec of the sampler these config keys would build, without reading any data;
        None when it depends on the data (then only a built sampler's ``spec`` has it)."""
        return None


class RegressionTasks(RegressionScoring, TaskSampler):
    """Scalar regression scored by mean squared error."""

    output_dim = 1


class ClassificationTasks(ClassificationScoring, TaskSampler):
    """N-way classification scored by cross-entropy and reported as accuracy."""
