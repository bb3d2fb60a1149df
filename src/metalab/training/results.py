"""The results record of a run: how it ended, its validation and test statistics, its speed, and
where the numbers came from (config, commit, package versions). It is written to results.json in
strict JSON (NaN as null) and returned by ``Trainer.fit``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from metalab import distributed
from metalab.checkpoint import RESULTS
from metalab.tasks.base import TaskSampler
from metalab.training.evaluation import Evaluation
from metalab.training.provenance import git_commit, package_versions
from metalab.training.sinks import strict_json

__all__ = ["Tested", "results_record", "write_results"]


class Tested(NamedTuple):
    """What the test scored: the parameters of ``iteration``, from the "best" or the "last" checkpoint,
    whose validation score is over ``val_tasks`` tasks."""

    iteration: int
    checkpoint: str
    val_tasks: int


def results_record(
    tasks: TaskSampler,
    iteration: int,
    val: Evaluation,
    test: Evaluation,
    *,
    stopped_by: str | None,
    train_seconds: float,
    config: dict[str, Any],
    execution: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of a run at ``iteration``: status "interrupted" when a signal (``stopped_by``, its
    name) stopped it, else "nonfinite_evaluation" when a mean of ``val`` or ``test`` is NaN or infinite
    (listed in "nonfinite"), else "completed"; each metric as {"mean", "ci95"}. ``execution``: how the
    meta-step was executed (``metalab.training.autotune.Tuning.record``)."""

    def table(results: Evaluation) -> dict[str, dict[str, float]]:
        return {key: {"mean": mean, "ci95": ci} for key, (mean, ci) in results.items()}

    nonfinite = [
        f"{split}/{key}"
        for split, results in (("val", val), ("test", test))
        for key, (mean, _) in results.items()
        if not mean == mean or abs(mean) == float("inf")
    ]
    status = "interrupted" if stopped_by else "nonfinite_evaluation" if nonfinite else "completed"
    return {
        "status": status,
        "iteration": iteration,
        "stopped_by": stopped_by,
        "nonfinite": nonfinite,
        "metric": tasks.metric_name,
        "higher_is_better": tasks.higher_is_better,
        "val": table(val),
        "test": table(test),
        "train_seconds": train_seconds,
        "iterations_per_second": iteration / train_seconds if train_seconds > 0 else None,
        "units": tasks.unit_name,  # what val_tasks and test_tasks count: tasks, or examples
        "device": str(tasks.device),
        "processes": distributed.world_size(),
        "execution": execution,
        "git_commit": git_commit(),
        "versions": package_versions(),
        "config": config,
    }


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    """results.json of ``run_dir``, strict JSON."""
    (run_dir / RESULTS).write_text(strict_json(results, indent=2))
