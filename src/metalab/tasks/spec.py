"""What one example of a task family looks like and how predictions are scored, apart from the data.

A ``TaskSpec`` is all that building a model and adapting it to a new task need: the input shape,
the output width, the loss and metric, and how an image file becomes an input. Each sampler builds
its spec from its config keys (``describe``; MiniImageNet adds the channel statistics of its
training images), every checkpoint keeps it as a plain dict, and ``load_learner`` rebuilds the model
and algorithm around it without reading the data set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from metalab.errors import ConfigError, require
from metalab.tasks.footprint import Footprint, episode_footprints
from metalab.tasks.io.image_cache import ImageSource, decode_images

__all__ = ["ClassificationScoring", "ImageFormat", "RegressionScoring", "TaskSpec"]


class RegressionScoring:
    """Scalar regression scored by mean squared error: predictions [N, 1], targets [N]."""

    kind = "regression"
    metric_name = "mse"
    higher_is_better = False

    @staticmethod
    def loss(predictions: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(predictions.squeeze(-1), targets)

    metric = loss


class ClassificationScoring:
    """N-way classification scored by cross-entropy and reported as accuracy: logits [N, ways], labels [N]."""

    kind = "classification"
    metric_name = "accuracy"
    higher_is_better = True

    @staticmethod
    def loss(predictions: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(predictions, targets)

    @staticmethod
    def metric(predictions: Tensor, targets: Tensor) -> Tensor:
        return (predictions.argmax(-1) == targets).float().mean()


_SCORINGS = {scoring.kind: scoring for scoring in (RegressionScoring, ClassificationScoring)}


@dataclass(frozen=True)
class ImageFormat:
    """How an image file becomes a model input, exactly as the data set's images did: decoded as
    ``mode`` ("L": grey, "RGB"), resized to size x size (Lanczos), inverted when ``invert``
    (Omniglot: black strokes on white become strokes = 255), then x = (pixels / 255 - mean) / std
    per channel (mean / std None: x = pixels / 255)."""

    size: int
    mode: Literal["L", "RGB"]
    invert: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def decode(self, sources: Sequence[ImageSource], names: Sequence[str] | None = None) -> Tensor:
        """Files (paths or encoded bytes) as the data set holds them: uint8 [N, C, size, size];
        ``names`` label the sources in error messages (default: the sources themselves)."""
        names = [str(s) for s in sources] if names is None else names
        pixels = torch.from_numpy(decode_images(list(sources), list(names), self.size, self.mode))
        pixels = pixels.unsqueeze(1) if self.mode == "L" else pixels
        return 255 - pixels if self.invert else pixels

    def scale_shift(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
        """x = pixels * scale + shift, per channel: scale [C, 1, 1], shift [C, 1, 1] or None (no mean)."""
        std = torch.ones(self.channels) if self.std is None else torch.tensor(self.std)
        scale = (1.0 / (255.0 * std)).view(-1, 1, 1).to(device)
        shift = None if self.mean is None else (-torch.tensor(self.mean) / std).view(-1, 1, 1).to(device)
        return scale, shift

    def normalise(self, pixels: Tensor) -> Tensor:
        """uint8 pixels [..., C, H, W] -> float model inputs, on the pixels' device."""
        scale, shift = self.scale_shift(pixels.device)
        x = pixels.float().mul_(scale)  # convert, then scale in place: type-promoting ops are slower
        return x if shift is None else x.add_(shift)


@dataclass(frozen=True)
class TaskSpec:
    """What one example looks like (``input_shape``, e.g. (1, 28, 28)), the model's output width
    (``output_dim``: ways, or 1 for regression), how predictions are scored (``kind``:
    "classification" or "regression": ``loss``, ``metric``, ``metric_name``) and, for image tasks,
    how a file becomes an input (``image_format``). Algorithms take it where they take a sampler."""

    #: a trained run loaded without its data stands for the episodes it was trained on
    batch_kind: ClassVar[Literal["episodes"]] = "episodes"

    input_shape: tuple[int, ...]
    output_dim: int
    kind: Literal["classification", "regression"]
    image_format: ImageFormat | None = None

    def __post_init__(self) -> None:
        require(self.kind in _SCORINGS, f"task kind {self.kind!r} is unknown; use one of {', '.join(_SCORINGS)}.")

    @classmethod
    def footprints(cls, tasks: Mapping[str, Any], trainer: Mapping[str, Any]) -> list[Footprint]:
        """The episodes the run's tasks config keys describe (``TaskSampler.footprints``)."""
        return episode_footprints(tasks, trainer)

    @property
    def metric_name(self) -> str:
        return _SCORINGS[self.kind].metric_name

    @property
    def higher_is_better(self) -> bool:
        return _SCORINGS[self.kind].higher_is_better

    def loss(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """Scalar training loss of one episode: predictions [N, output_dim], targets [N]."""
        return _SCORINGS[self.kind].loss(predictions, targets)

    def metric(self, predictions: Tensor, targets: Tensor) -> Tensor:
        """Scalar reported score of one episode (``metric_name``), same shapes as ``loss``."""
        return _SCORINGS[self.kind].metric(predictions, targets)

    def load_examples(self, paths: Sequence[str | Path], device: torch.device | str = "cpu") -> Tensor:
        """Image files as the model saw its training images: float [N, *input_shape] on ``device``."""
        if self.image_format is None:
            raise ConfigError(
                f"{self.kind} tasks of input shape {self.input_shape} take tensors, not file paths: "
                "pass a tensor [N, *input_shape]."
            )
        return self.image_format.normalise(self.image_format.decode([str(p) for p in paths]).to(device))

    def state_dict(self) -> dict[str, Any]:
        """The spec as plain Python values (what a checkpoint keeps)."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TaskSpec:
        """The spec ``state_dict`` returned."""
        try:
            image_format = state.get("image_format")
            if image_format is not None:
                image_format = ImageFormat(
                    **{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in image_format.items()}
                )
            return cls(tuple(state["input_shape"]), int(state["output_dim"]), state["kind"], image_format)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ConfigError(
                f"the saved task description {state!r} is not one metalab wrote ({error}); "
                "re-save the run with this version."
            ) from None
