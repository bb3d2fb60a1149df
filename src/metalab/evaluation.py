"""Evaluation over many tasks, reported as mean and 95% confidence interval."""
from __future__ import annotations

import math

import torch

from metalab.algorithms.base import Algorithm
from metalab.tasks.base import Split, TaskSampler

__all__ = ["confidence_interval", "episode_seed", "evaluate_tasks"]


def confidence_interval(values: torch.Tensor) -> tuple[float, float]:
    """(mean, 1.96 * std / sqrt(n)) of per-task values: the 95% CI of MAML's tables."""
    values = values.double().flatten()
    n = values.numel()
    std = values.std(unbiased=True).item() if n > 1 else 0.0
    return values.mean().item(), 1.96 * std / math.sqrt(n)


def episode_seed(eval_seed: int, split: str) -> int:
    """The seed of a split's evaluation episodes: fixed, so every run and checkpoint sees the same ones."""
    return eval_seed + {"val": 0, "test": 1, "train": 2}[split]


def evaluate_tasks(algorithm: Algorithm, tasks: TaskSampler, split: Split, num_tasks: int,
                   batch_size: int, seed: int) -> dict[str, tuple[float, float]]:
    """Adapt to ``num_tasks`` episodes of ``split`` (the same episodes for the same seed) and return
    {metric: (mean, ci95)} for every metric ``algorithm.evaluate`` reports."""
    generator = tasks.generator(seed)
    per_task: dict[str, list[torch.Tensor]] = {}
    for start in range(0, num_tasks, batch_size):
        batch = tasks.sample(min(batch_size, num_tasks - start), split, generator)
        for key, values in algorithm.evaluate(batch).items():
            per_task.setdefault(key, []).append(values.detach().cpu())
    return {key: confidence_interval(torch.cat(chunks)) for key, chunks in per_task.items()}
