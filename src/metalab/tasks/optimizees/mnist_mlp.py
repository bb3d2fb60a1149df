"""The MNIST optimizee of "Learning to learn by gradient descent by gradient descent" (Andrychowicz
et al. 2016, Section 3.2): an MLP classifying MNIST digits, its cross-entropy on a minibatch of 128
training images a step, from a random initialisation per problem."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import vmap

from metalab.errors import require
from metalab.hypergrad.tree import tree_ravel
from metalab.tasks.base import Split
from metalab.tasks.footprint import Footprint, settings, train_and_eval
from metalab.tasks.io.mnist import load_mnist
from metalab.tasks.optimizees.base import OptimizeeBatch, OptimizeeTasks
from metalab.tasks.spec import ClassificationScoring, TaskSpec

__all__ = ["MnistMLP", "layer_shapes", "parameter_count"]

_ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}
_PIXELS, _CLASSES = 28 * 28, 10


def layer_shapes(hidden_sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """The weight [out, in] and bias [out] shapes of the MLP, 784 inputs to 10 classes, layer by layer."""
    widths = [_PIXELS, *hidden_sizes, _CLASSES]
    return [shape for w_in, w_out in zip(widths[:-1], widths[1:]) for shape in ((w_out, w_in), (w_out,))]


def parameter_count(hidden_sizes: Sequence[int]) -> int:
    """Parameters of the MLP of ``layer_shapes``, a Python int (no overflow however wide the layers)."""
    return sum(math.prod(shape) for shape in layer_shapes(hidden_sizes))


class MnistMLP(OptimizeeTasks):
    """Problems "train this MLP on MNIST": each has its own initial weights and draws its own
    minibatches; the loss at step t is the cross-entropy on that step's minibatch.

    root: folder of MNIST's IDX files (``metalab.tasks.io.mnist``).  hidden_sizes: hidden layer widths
    (paper: [20]; its generalisation tests: [40], [20, 20]).  activation: sigmoid (paper) | relu |
    tanh.  minibatch_size: images per step (paper: 128).  init_std: every weight and bias ~
    N(0, init_std^2) (DeepMind's code: 0.01).  val_fraction: the share of MNIST's training images
    held out as the "val" split (a fixed random subset); "train" problems use the rest, "test" problems
    MNIST's test images.
    baseline_lrs: see ``OptimizeeTasks``. download: fetch the IDX files into ``root`` with
    torchvision when they are absent (never by default). Pixels are scaled to [0, 1].
    """

    kind = "classification"
    output_dim = 10
    input_shape = (1, 28, 28)

    def __init__(
        self,
        root: str = "../shared/data/mnist",
        hidden_sizes: Sequence[int] = (20,),
        activation: Literal["sigmoid", "relu", "tanh"] = "sigmoid",
        minibatch_size: int = 128,
        init_std: float = 0.01,
        val_fraction: float = 0.1,
        baseline_lrs: dict[str, float] | None = None,
        download: bool = False,
        device: torch.device | str = "cpu",
    ):
        super().__init__(device, baseline_lrs)
        require(
            all(isinstance(h, int) and h >= 1 for h in hidden_sizes),
            f"tasks.hidden_sizes must be positive integers (got {list(hidden_sizes)}): the paper's is [20].",
        )
        require(
            activation in _ACTIVATIONS,
            f"tasks.activation must be one of {', '.join(_ACTIVATIONS)} (got {activation!r}).",
        )
        require(
            isinstance(minibatch_size, int) and minibatch_size >= 1,
            f"tasks.minibatch_size must be an integer >= 1 (got {minibatch_size!r}): the paper's is 128.",
        )
        require(init_std >= 0, f"tasks.init_std must be >= 0 (got {init_std}).")
        require(0 < val_fraction < 1, f"tasks.val_fraction must lie strictly between 0 and 1 (got {val_fraction}).")
        self.hidden_sizes, self.activation = tuple(hidden_sizes), activation
        self.minibatch_size, self.init_std = minibatch_size, init_std
        self.shapes = layer_shapes(self.hidden_sizes)
        self.num_params = parameter_count(self.hidden_sizes)
        train_images, train_labels = load_mnist(root, "train", download)
        test_images, test_labels = load_mnist(root, "test", download)
        held_out = max(1, round(val_fraction * len(train_labels)))
        require(held_out < len(train_labels), f"tasks.val_fraction={val_fraction} leaves no training images.")
        # a fixed shuffle first: IDX files may be sorted by class (the 5,000-digit subset is)
        order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(0))
        train, val = order[:-held_out], order[-held_out:]
        self.data = {
            "train": (train_images[train], train_labels[train]),
            "val": (train_images[val], train_labels[val]),
            "test": (test_images, test_labels),
        }
        self.to(self.device)

    def to(self, device: torch.device | str) -> MnistMLP:
        super().to(device)
        self.data = {
            split: (images.flatten(1).to(self.device), labels.to(self.device))
            for split, (images, labels) in self.data.items()
        }
        return self

    @classmethod
    def describe(cls, **config: Any) -> TaskSpec:
        return TaskSpec(cls.input_shape, cls.output_dim, cls.kind)

    @classmethod
    def footprints(cls, tasks: Mapping[str, Any], trainer: Mapping[str, Any]) -> list[Footprint]:
        """Per problem: the MLP's parameters trained, and at each step a minibatch of images (as floats)
        and labels with the MLP's activations on it."""
        keys = settings(cls, tasks)
        hidden_sizes, minibatch = list(keys["hidden_sizes"]), keys["minibatch_size"]
        parameters = parameter_count(hidden_sizes)
        problems = dict(
            noun="problems",
            detail=f"of {parameters:,} parameters (tasks.hidden_sizes={hidden_sizes})",
            levers=("tasks.hidden_sizes", "tasks.minibatch_size"),
            parameters=parameters,
            elements=minibatch * (_PIXELS + 1 + sum(hidden_sizes) + _CLASSES),
        )
        return train_and_eval(trainer, problems)

    def sample(self, batch_size: int, split: Split, generator: torch.Generator) -> OptimizeeBatch:
        params = self.init_std * torch.randn(batch_size, self.num_params, generator=generator, device=self.device)
        return OptimizeeBatch(params, seed=self.draw_seed(generator), split=split)

    def minibatch(self, batch: OptimizeeBatch, step: int) -> tuple[Tensor, Tensor]:
        """Images [B, minibatch_size, 784] in [0, 1] and labels [B, minibatch_size] of each problem at
        ``step``: drawn with replacement from the batch's split, by a generator seeded from the
        batch's seed and the step (so a step always sees the same minibatch)."""
        images, labels = self.data[batch.split]
        generator = torch.Generator(device=self.device).manual_seed((batch.seed + 1_000_003 * step) % 2**63)
        index = torch.randint(
            0, len(labels), (batch.num_tasks, self.minibatch_size), generator=generator, device=self.device
        )
        return images[index].to(batch.params.dtype) / 255.0, labels[index]

    def logits(self, params: Tensor, x: Tensor) -> Tensor:
        """The MLP of one problem: flat parameters [D], images [N, 784] -> logits [N, 10]."""
        layers = list(self.layers(params).values())
        activation, h = _ACTIVATIONS[self.activation], x
        for index, (weight, bias) in enumerate(zip(layers[0::2], layers[1::2])):
            h = h @ weight.T + bias
            if 2 * index + 2 < len(layers):
                h = activation(h)
        return h

    def layers(self, params: Tensor) -> dict[str, Tensor]:
        """The flat parameters [D] of one problem as {"weight0": [out, in], "bias0": [out], ...}: the
        inverse of ``tree_ravel`` on a layout of meta tensors (shapes and dtype alone, no memory)."""
        layout = {
            f"{('weight', 'bias')[i % 2]}{i // 2}": torch.empty(shape, dtype=params.dtype, device="meta")
            for i, shape in enumerate(self.shapes)
        }
        return tree_ravel(layout)[1](params)

    def optimizee_loss(self, params: Tensor, batch: OptimizeeBatch, step: int) -> Tensor:
        x, y = self.minibatch(batch, step)
        return vmap(lambda p, xb, yb: self.loss(self.logits(p, xb), yb))(params, x, y)

    # the TaskSampler contract: logits [N, 10] against labels [N], scored as every classification task
    loss = staticmethod(ClassificationScoring.loss)
    metric = staticmethod(ClassificationScoring.metric)
