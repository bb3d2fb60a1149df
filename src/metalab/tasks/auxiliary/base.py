"""Data with auxiliary tasks: task samplers whose batch is a minibatch of one data set with a main
target and K auxiliary targets, not a set of episodes (ARCHITECTURE.md, "Beyond episodes"): its
``batch_kind`` is "auxiliary", and the algorithms that accept that kind train one primary network on it.

The primary network is any model of the project whose output width is ``output_dim`` = the main
head's width plus every auxiliary head's width: its output columns are sliced into heads
(``head_slices``). An auxiliary task may read its own *view* of the inputs (rotation prediction reads
rotated copies): a batch holds the V views stacked, ``x[v]``, and the network runs once on all of
them, ``model(x.flatten(0, 1))``.

Splits (the paper's four): "train" (few main labels; the auxiliary targets may cover more
examples), "aux" (a small labelled set for the hypergradient's L_A), "val" and "test".
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from metalab.errors import require
from metalab.tasks.base import BatchKind, Split, TaskSampler
from metalab.tasks.footprint import Footprint, settings, train_and_eval

__all__ = ["AuxBatch", "AuxTask", "AuxiliaryTasks", "labelled"]


def labelled(y: Tensor) -> Tensor:
    """Which targets are present, bool of y's shape: class ids >= 0, or regression targets not NaN."""
    return ~torch.isnan(y) if y.is_floating_point() else y >= 0


@dataclass(frozen=True)
class AuxTask:
    """One auxiliary task: its name ("alphabet", "rotation", "random", ...), the width of its head
    (classes, or 1 for a regression target; 0: it has no head of its own and reads the main head, as
    the toy's auxiliaries, other targets of the same linear function) and the view of the inputs it
    reads (0 = as they are)."""

    name: str
    width: int
    view: int = 0


@dataclass
class AuxBatch:
    """A minibatch of N examples (leading dimension of every tensor after the views).

    x:     [V, N, *input_shape]  the inputs, view 0 as they are, views 1.. as the tasks name them
    y:     [N]     main targets; an example without a main label has -1 (classification) or NaN
    aux_y: [N, K]  one column per auxiliary task, same convention for missing targets
    x_aux, y_aux:  [M, *input_shape], [M]  a minibatch of the "aux" split (main targets only), the data
                   of the hypergradient's L_A; empty (M = 0) in evaluation batches
    """

    x: Tensor
    y: Tensor
    aux_y: Tensor
    x_aux: Tensor
    y_aux: Tensor

    @property
    def num_tasks(self) -> int:
        """Evaluation units: the examples of the batch."""
        return self.y.shape[0]

    def to(self, device: torch.device | str) -> AuxBatch:
        return AuxBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


class AuxiliaryTasks(TaskSampler):
    """A data set with auxiliary tasks.

    ``sample(n, "train", g)`` returns an AuxBatch of n training examples with all their views and
    targets, and ``aux_batch_size`` examples of the "aux" split; ``sample(n, "val" | "test", g)``
    returns n distinct examples of that split (all of it when it has fewer; one view, no auxiliary
    targets needed), deterministic given g. The "val" and "test" splits are finite (``split_size``):
    an evaluation scores each of their examples at most once (``evaluation_batches``).
    ``example_losses`` gives the per-example main and auxiliary losses the combiners weigh.
    """

    batch_kind: ClassVar[BatchKind] = "auxiliary"
    unit_name: ClassVar[str] = "examples"
    aux_tasks: tuple[AuxTask, ...]
    main_width: int  # classes of the main task (1 for regression)
    aux_batch_size: int

    @property
    def num_views(self) -> int:
        return 1 + max((task.view for task in self.aux_tasks), default=0)

    @property
    def head_slices(self) -> list[slice]:
        """Columns of the network's output: the main head, then one slice per auxiliary task."""
        widths = [self.main_width, *(task.width for task in self.aux_tasks)]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        return [slice(s, s + w) for s, w in zip(starts, widths)]

    @property
    def output_dim(self) -> int:  # type: ignore[override]
        return self.main_width + sum(task.width for task in self.aux_tasks)

    @property
    def aux_names(self) -> list[str]:
        return [task.name for task in self.aux_tasks]

    def main_losses(self, outputs: Tensor, y: Tensor) -> Tensor:
        """Per-example main loss [N] from one view's outputs [N, output_dim] and main targets [N] (all
        present): ``loss`` on the main head, vmapped over the examples (L_A, evaluation)."""
        head = outputs[:, self.head_slices[0]]
        return torch.func.vmap(lambda p, t: self.loss(p[None], t[None]))(head, y)

    def main_metric(self, outputs: Tensor, y: Tensor) -> Tensor:
        """Per-example ``metric`` [N] of the main head (accuracy 0/1, squared error), as ``main_losses``."""
        head = outputs[:, self.head_slices[0]]
        return torch.func.vmap(lambda p, t: self.metric(p[None], t[None]))(head, y)

    @abstractmethod
    def split_size(self, split: str) -> int:
        """Number of examples of ``split``."""

    @abstractmethod
    def held_out(self, split: str, positions: Tensor) -> AuxBatch:
        """The examples at ``positions`` (long [n], distinct, in 0..split_size - 1) of "val" or "test" as
        an evaluation batch: one view, auxiliary targets absent, no "aux" minibatch."""

    def sample_held_out(self, batch_size: int, split: str, generator: torch.Generator) -> AuxBatch:
        """``batch_size`` distinct examples of "val" or "test" in a random order (all of it when it has fewer)."""
        require(split in ("val", "test"), f"Unknown split {split!r}; use train, val or test.")
        order = torch.randperm(self.split_size(split), generator=generator, device=self.device)
        return self.held_out(split, order[:batch_size])

    def evaluation_batches(
        self, split: Split, num_tasks: int, batch_size: int, generator: torch.Generator
    ) -> Iterator[AuxBatch]:
        """``num_tasks`` distinct examples of ``split`` (at most ``split_size``; the first batch is
        ``sample_held_out``'s), ``batch_size`` at a time: each scored once, none twice."""
        order = torch.randperm(self.split_size(split), generator=generator, device=self.device)[:num_tasks]
        for positions in order.split(batch_size):
            yield self.held_out(split, positions)

    @classmethod
    def footprints(cls, tasks: Mapping[str, Any], trainer: Mapping[str, Any]) -> list[Footprint]:
        """A training batch: trainer.meta_batch_size examples in every view, and the "aux" minibatch
        (aux_batch_size examples); an evaluation batch: examples in one view."""
        keys = settings(cls, tasks)
        views = cls.footprint_views(keys)
        train = dict(
            noun="examples",
            detail=f"in {views} views" if views > 1 else "",
            levers=("tasks.aux_batch_size",),
            examples=views,
            shared_examples=keys.get("aux_batch_size", 0),
        )
        return train_and_eval(trainer, train, dict(noun="examples", detail="", examples=1))

    @classmethod
    def footprint_views(cls, keys: dict[str, Any]) -> int:
        """Views of the inputs a training batch holds, from the config keys (``settings``): here those
        of the class's own ``aux_tasks``, one when they are chosen by the config."""
        return 1 + max((task.view for task in getattr(cls, "aux_tasks", ())), default=0)

    @abstractmethod
    def example_losses(self, outputs: Tensor, batch: AuxBatch) -> tuple[Tensor, Tensor]:
        """Per-example losses from the network's outputs on all views [V, N, output_dim]:
        (main [N], aux [N, K]); an example without a target contributes 0 to that column.
        The mean main loss is ``main.sum() / (number of examples with a main label)``."""
