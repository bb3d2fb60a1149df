"""A toy linear regression with one helpful and one harmful auxiliary task, in the spirit of
AuxiLearn's illustrative example (Navon et al., ICLR 2021): fast, and with a closed-form inner solution.

    x ~ N(0, I_dim);  main:    y      = x . beta  + noise   (labelled on ``main_labels`` training examples)
                      helpful: y_help = x . beta  + noise   (every training example: the same function)
                      harmful: y_harm = x . gamma + noise   (every training example: an unrelated function)

Both auxiliaries read the main head (``AuxTask(width=0)``): the primary network is one linear map
(``model=mlp model.hidden_sizes=[]``), so L_T is quadratic in w and w*(phi) has a closed form. With
fewer main labels than dimensions the main task alone is underdetermined: the helpful auxiliary
supplies beta, the harmful one pulls towards gamma, and a learned combiner should weigh it down.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from metalab.errors import require
from metalab.tasks.auxiliary.base import AuxBatch, AuxiliaryTasks, AuxTask, labelled
from metalab.tasks.footprint import settings
from metalab.tasks.spec import RegressionScoring, TaskSpec

__all__ = ["AuxToy"]

_SPLITS = ("train", "aux", "val", "test")


class AuxToy(RegressionScoring, AuxiliaryTasks):
    """dim: input dimension.  train_size, main_labels: training examples and how many of them have a
    main label.  aux_size, val_size, test_size: examples of the other splits.  aux_batch_size: examples
    of the "aux" split per training batch.  noise: std of every target's noise.  data_seed: draws
    beta, gamma and the data (the same for every run seed)."""

    aux_tasks = (AuxTask("helpful", 0), AuxTask("harmful", 0))
    main_width = 1

    def __init__(
        self,
        dim: int = 10,
        train_size: int = 200,
        main_labels: int = 5,
        aux_size: int = 50,
        val_size: int = 500,
        test_size: int = 1000,
        aux_batch_size: int = 50,
        noise: float = 0.1,
        data_seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        super().__init__(device)
        for key, value, low in (
            ("dim", dim, 1),
            ("train_size", train_size, 1),
            ("main_labels", main_labels, 0),
            ("aux_size", aux_size, 1),
            ("val_size", val_size, 1),
            ("test_size", test_size, 1),
            ("aux_batch_size", aux_batch_size, 1),
            ("data_seed", data_seed, 0),
        ):
            require(
                isinstance(value, int) and value >= low, f"tasks.{key} must be an integer >= {low} (got {value!r})."
            )
        require(main_labels <= train_size, f"tasks.main_labels={main_labels} exceeds tasks.train_size={train_size}.")
        require(noise >= 0, f"tasks.noise must be >= 0 (got {noise}).")
        self.input_shape, self.aux_batch_size = (dim,), aux_batch_size
        g = torch.Generator().manual_seed(data_seed)
        self.beta, self.gamma = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
        self.data: dict[str, dict[str, Tensor]] = {}
        for split, size in zip(_SPLITS, (train_size, aux_size, val_size, test_size)):
            x = torch.randn(size, dim, generator=g)
            y = x @ self.beta + noise * torch.randn(size, generator=g)
            aux_y = torch.stack([x @ self.beta, x @ self.gamma], dim=1) + noise * torch.randn(size, 2, generator=g)
            if split == "train":
                y[main_labels:] = float("nan")
            self.data[split] = {"x": x, "y": y, "aux_y": aux_y}
        self.to(device)

    @classmethod
    def data_elements(cls, tasks: Mapping[str, Any]) -> int:
        """Every split's inputs and its three targets, and beta and gamma."""
        keys = settings(cls, tasks)
        examples = sum(keys[f"{split}_size"] for split in ("train", "aux", "val", "test"))
        return examples * (keys["dim"] + 3) + 2 * keys["dim"]

    @classmethod
    def describe(cls, **config: Any) -> TaskSpec:
        return TaskSpec((config.get("dim", 10),), 1, cls.kind)

    def to(self, device: torch.device | str) -> AuxToy:
        super().to(device)
        self.data = {s: {k: v.to(self.device) for k, v in d.items()} for s, d in self.data.items()}
        return self

    def split_size(self, split: str) -> int:
        return self.data[split]["x"].shape[0]

    def _draw(self, split: str, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """n training or "aux" examples: a random subset when n fits in the split, else drawn with replacement."""
        size = self.split_size(split)
        index = (
            torch.randperm(size, generator=generator, device=self.device)[:n]
            if n <= size
            else torch.randint(size, (n,), generator=generator, device=self.device)
        )
        return {k: v[index] for k, v in self.data[split].items()}

    def held_out(self, split: str, positions: Tensor) -> AuxBatch:
        part = {k: v[positions] for k, v in self.data[split].items()}
        return AuxBatch(part["x"][None], part["y"], part["aux_y"], part["x"][:0], part["y"][:0])

    def sample(self, batch_size: int, split: str, generator: torch.Generator) -> AuxBatch:
        if split != "train":
            return self.sample_held_out(batch_size, split, generator)
        part = self._draw(split, batch_size, generator)
        aux = self._draw("aux", self.aux_batch_size, generator)
        return AuxBatch(part["x"][None], part["y"], part["aux_y"], aux["x"], aux["y"])

    def example_losses(self, outputs: Tensor, batch: AuxBatch) -> tuple[Tensor, Tensor]:
        """Squared errors of the one linear output [V=1, N, 1] against each target (0 where absent)."""
        targets = torch.cat([batch.y[:, None], batch.aux_y], dim=1)  # [N, 1 + K]
        present = labelled(targets)
        safe = torch.where(present, targets, torch.zeros_like(targets))  # no NaN reaches the gradient
        errors = torch.where(present, (outputs[0, :, :1] - safe) ** 2, torch.zeros_like(safe))
        return errors[:, 0], errors[:, 1:]
