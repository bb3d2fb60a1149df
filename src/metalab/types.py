"""The two data types every part of metalab speaks: ``Params`` and ``TaskBatch``."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["Params", "TaskBatch"]

#: Named tensors: the parameters of a model (as in ``dict(model.named_parameters())``), a
#: gradient, or any vector a linear solver works on. Functions over Params are pure.
Params = dict[str, Tensor]


@dataclass
class TaskBatch:
    """A batch of few-shot episodes, leading dimension = task.

    x_support: [B, S, *input_shape]   y_support: [B, S]   (class ids 0..N-1, or regression targets)
    x_query:   [B, Q, *input_shape]   y_query:   [B, Q]
    All four live on the training device.
    """

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    @property
    def num_tasks(self) -> int:
        return self.x_support.shape[0]

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def task(self, index: int) -> TaskBatch:
        """Episode ``index`` alone, keeping a task dimension of 1 (for loops in tests and inference)."""
        return TaskBatch(*(getattr(self, f.name)[index : index + 1] for f in fields(self)))
