"""Use a trained meta-learner: adapt it to a new few-shot task and predict.

    learner = metalab.load_learner("outputs/runs/2026-11-22/10-00-00_...")
    adapted = learner.adapt(support_images, ["cat", "dog", "cat", ...])   # tensors or image paths
    adapted.predict(query_images)  # -> ["dog", "cat", ...];  adapted.logits(query_images) -> [Q, ways]
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from metalab.algorithms.episodic import EpisodicAlgorithm
from metalab.checkpoint import load_checkpoint
from metalab.errors import ConfigError, require
from metalab.tasks.base import TaskSampler
from metalab.trainer import BEST, CHECKPOINT
from metalab.types import Params

__all__ = ["Learner", "AdaptedLearner", "load_learner", "load_run"]

Examples = Tensor | Sequence[str | Path]


def load_run(run_dir: str | Path, device: str = "auto", overrides: Sequence[str] = (),
             checkpoint: str = "best") -> tuple[TaskSampler, Any, Any]:
    """(task sampler, algorithm with trained meta-parameters, config) of a run directory.
    checkpoint: "best" (best.pt, what the run tested, when validation ran) or "last";
    ``overrides`` are dotlist changes to its saved config (e.g. "algo.eval_inner_steps=20")."""
    from metalab.cli import build, resolve_device  # the CLI module imports Hydra; only loading needs it

    require(checkpoint in ("best", "last"), f"checkpoint must be best or last (got {checkpoint!r}).")
    run_dir = Path(run_dir).expanduser()
    state = load_checkpoint(run_dir / CHECKPOINT)
    cfg = OmegaConf.merge(OmegaConf.create(state["config"]), OmegaConf.from_dotlist(list(overrides)))
    tasks, algorithm = build(cfg, resolve_device(device))
    if checkpoint == "best" and (run_dir / BEST).is_file():
        state = load_checkpoint(run_dir / BEST)
    algorithm.load_state_dict(state["algorithm"])
    return tasks, algorithm, cfg


@dataclass
class AdaptedLearner:
    """The task-specific parameters after adaptation, and the support set's label names."""

    learner: Learner
    params: Params
    labels: list[Hashable] | None

    def logits(self, x_query: Examples) -> Tensor:
        """Model outputs [Q, ways] (or [Q, 1] for regression) for the query examples."""
        with torch.no_grad():
            return self.learner.algorithm.predict(self.params, self.learner.examples(x_query))

    def predict(self, x_query: Examples) -> list[Hashable] | Tensor:
        """Predicted labels (in the support set's label names) for classification; values for regression."""
        outputs = self.logits(x_query)
        if self.labels is None:
            return outputs.squeeze(-1)
        return [self.labels[i] for i in outputs.argmax(-1).tolist()]


class Learner:
    """A meta-trained algorithm that adapts to new tasks (MAML and iMAML alike: any episodic algorithm)."""

    def __init__(self, algorithm: EpisodicAlgorithm, tasks: TaskSampler):
        require(isinstance(algorithm, EpisodicAlgorithm),
                f"load_learner needs an episodic algorithm (maml, imaml); this run used {type(algorithm).__name__}.")
        self.algorithm, self.tasks = algorithm, tasks

    @property
    def device(self) -> torch.device:
        return self.tasks.device

    def examples(self, x: Examples) -> Tensor:
        """A tensor [N, *input_shape] on the device; image paths are read with the training preprocessing."""
        if isinstance(x, Tensor):
            require(tuple(x.shape[1:]) == tuple(self.tasks.input_shape),
                    f"examples have shape {tuple(x.shape[1:])} but the model takes {tuple(self.tasks.input_shape)}: "
                    "pass a tensor [N, *input_shape] or image paths.")
            return x.to(self.device, torch.get_default_dtype())
        load = getattr(self.tasks, "load_examples", None)
        if load is None:
            raise ConfigError(f"{type(self.tasks).__name__} tasks take tensors, not file paths: pass a tensor [N, *input_shape].")
        return load([Path(p) for p in x]).to(self.device)

    def adapt(self, x_support: Examples, y_support: Tensor | Sequence[Hashable], steps: int | None = None) -> AdaptedLearner:
        """Adapt to one task's support set with the algorithm's inner loop (``eval_inner_steps`` by default).
        Classification labels may be any names: sorted, they are mapped to the outputs 0..N-1."""
        x = self.examples(x_support)
        labels = None
        if self.tasks.metric_name == "accuracy":
            names = y_support.tolist() if isinstance(y_support, Tensor) else list(y_support)
            try:  # sorted: the same support set in any order adapts the same way; 0..N-1 map to themselves
                labels = sorted(set(names))
            except TypeError:  # names that do not sort: order of first appearance
                labels = list(dict.fromkeys(names))
            require(len(labels) <= self.tasks.output_dim,
                    f"the support set has {len(labels)} classes but the model was trained {self.tasks.output_dim}-way.")
            y = torch.tensor([labels.index(n) for n in names], device=self.device)
        else:
            y = torch.as_tensor(y_support, device=self.device, dtype=torch.get_default_dtype())
        require(len(y) == len(x), f"{len(x)} support examples but {len(y)} labels: give one label per example.")
        steps = self.algorithm.eval_inner_steps if steps is None else steps
        with torch.no_grad():  # torch.func.grad inside adapt still works; nothing is kept for backward
            params = self.algorithm.adapt(self.algorithm.initial_params(), x, y, steps)
        return AdaptedLearner(self, {k: v.detach() for k, v in params.items()}, labels)


def load_learner(run_dir: str | Path, device: str = "auto", checkpoint: str = "best") -> Learner:
    """The trained learner of a run directory (the folder holding checkpoint.pt): by default the
    meta-parameters the run tested (best on validation), ``checkpoint="last"`` for the final ones."""
    tasks, algorithm, _ = load_run(run_dir, device, checkpoint=checkpoint)
    return Learner(algorithm, tasks)
