"""Evaluation over many tasks, reported as mean and 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from metalab import distributed
from metalab.algorithms.base import Algorithm
from metalab.errors import require
from metalab.tasks.base import Split, TaskSampler

__all__ = [
    "Comparison",
    "Evaluation",
    "check_units",
    "confidence_interval",
    "episode_seed",
    "evaluate_tasks",
    "format_metric",
    "metric_lines",
]

Evaluation = dict[str, tuple[float, float]]  # {metric: (mean, ci95)}
#: other methods scored on the same evaluation batch, {method: {metric: per-task values [B]}}: e.g. the
#: hand-designed optimizers on the learned optimizer's held-out problems (``Algorithm.compare``)
Comparison = Callable[[Any], dict[str, dict[str, torch.Tensor]]]


def confidence_interval(values: torch.Tensor) -> tuple[float, float]:
    """(mean, 1.96 * std / sqrt(n)) of per-task values: the 95% CI of MAML's tables."""
    values = values.double().flatten()
    n = values.numel()
    std = values.std(unbiased=True).item() if n > 1 else 0.0
    return values.mean().item(), 1.96 * std / math.sqrt(n)


def episode_seed(eval_seed: int, split: str) -> int:
    """The seed of a split's evaluation episodes: fixed, so every run and checkpoint sees the same ones."""
    return eval_seed + {"val": 0, "test": 1, "train": 2}[split]


def check_units(tasks: TaskSampler, split: str, num_tasks: int, key: str) -> None:
    """Refuse (ConfigError, naming ``key``) an evaluation of more units than ``split`` holds: a split
    of fixed size (``tasks.split_size``, e.g. the test examples of data with auxiliary tasks) is scored
    one unit at a time, each at most once, so that the confidence interval is over units truly scored;
    splits drawn afresh (episodes, optimisation problems) take any number."""
    size = tasks.split_size(split) if hasattr(tasks, "split_size") else None
    require(
        size != 0 or num_tasks == 0,
        f"{key}={num_tasks} asks for {split} {getattr(tasks, 'unit_name', 'tasks')} but the data holds no {split} "
        f"split (its tasks.split keeps none): set {key}=0, or evaluate another split.",
    )
    require(
        size is None or num_tasks <= size,
        f"{key}={num_tasks} asks for more {split} {getattr(tasks, 'unit_name', 'tasks')} than the {size} "
        f"the split holds, and each is scored once: set {key} to at most {size}.",
    )


def evaluate_tasks(
    algorithm: Algorithm,
    tasks: TaskSampler,
    split: Split,
    num_tasks: int,
    batch_size: int,
    seed: int,
    progress: bool = False,
    before_batch: Callable[[], None] | None = None,
    compare: Comparison | None = None,
    key: str = "num_tasks",
    prepare: Callable[[Any], Any] | None = None,
) -> Evaluation:
    """Adapt to ``num_tasks`` episodes of ``split`` (the same episodes for the same seed) and return
    {metric: (mean, ci95)} for every metric ``algorithm.evaluate`` reports, and with ``compare`` for
    every metric of every method it scores on the same batches, as "<method>/<metric>". ``progress``
    shows a tqdm bar over the episodes (it disappears when done); ``before_batch`` is called before
    each batch (the trainer stops an evaluation there). Under several processes each rank adapts its
    slice of every batch and the per-task values of all ranks are gathered before the statistics.
    The batches are the sampler's ``evaluation_batches``: a finite split is scored unit by unit, each
    once, and more units than it holds are refused (``check_units``, naming ``key``). ``prepare`` maps each
    batch before it is scored (the trainer's precision: ``Precision.batch``)."""
    check_units(tasks, split, num_tasks, key)
    generator = tasks.generator(seed)
    batches = tasks.evaluation_batches(split, num_tasks, batch_size, generator)
    chunks: list[dict[str, torch.Tensor]] = []  # this rank's per-task values, one entry per batch
    # mininterval=0: one refresh per evaluation batch (few, and each takes a while), so the bar always
    # shows where the evaluation is, however fast its first batches were
    with tqdm(
        total=num_tasks,
        desc=split,
        unit="task",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
        mininterval=0,
        miniters=1,
    ) as bar:
        for start in range(0, num_tasks, batch_size):
            if before_batch is not None:
                before_batch()
            size = min(batch_size, num_tasks - start)
            batch = distributed.shard(next(batches))
            if batch is not None and prepare is not None:
                batch = prepare(batch)
            values = _scores(algorithm, batch, compare) if batch is not None else {}  # None: this rank's slice is empty
            chunks.append({key: value.detach().cpu() for key, value in values.items()})
            bar.update(size)
    per_task = distributed.gather_chunks(chunks)
    return {key: confidence_interval(torch.cat(values)) for key, values in per_task.items()}


def _scores(algorithm: Algorithm, batch: Any, compare: Comparison | None = None) -> dict[str, torch.Tensor]:
    """``algorithm.evaluate(batch)``, followed by what ``compare`` scores on the same batch, each
    method's metrics named "<method>/<metric>"."""
    values = algorithm.evaluate(batch)
    for method, method_values in (compare(batch) if compare is not None else {}).items():
        values.update({f"{method}/{key}": value for key, value in method_values.items()})
    return values


def format_metric(split: str, key: str, mean: float, ci: float, num_tasks: int, unit: str = "tasks") -> str:
    """One console line: accuracy in percent, e.g. "test accuracy: 43.50% ± 2.10% (95% CI over
    600 tasks)"; other metrics as numbers; a non-finite mean says so. ``unit``: what was scored
    (the sampler's ``unit_name``: tasks, or examples for data with auxiliary tasks)."""
    if not math.isfinite(mean):
        return f"{split} {key}: {mean} (non-finite on some of {num_tasks} {unit})"
    if key.split("@")[0] == "accuracy":
        return f"{split} {key}: {100 * mean:.2f}% ± {100 * ci:.2f}% (95% CI over {num_tasks} {unit})"
    return f"{split} {key}: {mean:.4f} ± {ci:.4f} (95% CI over {num_tasks} {unit})"


def metric_lines(split: str, results: dict[str, tuple[float, float]], num_tasks: int, unit: str = "tasks") -> list[str]:
    """``format_metric`` for each metric of ``results``, leaving out "loss" when it repeats another
    metric exactly (regression: the loss is the MSE)."""

    def same(a: tuple[float, float], b: tuple[float, float]) -> bool:  # NaN counts as equal to NaN here
        return all(x == y or (x != x and y != y) for x, y in zip(a, b))

    repeated = "loss" in results and any(
        key != "loss" and same(value, results["loss"]) for key, value in results.items()
    )
    return [
        format_metric(split, key, mean, ci, num_tasks, unit)
        for key, (mean, ci) in results.items()
        if not (key == "loss" and repeated)
    ]
