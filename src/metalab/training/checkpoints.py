"""A run's checkpoints: checkpoint.pt (the last state, for resume) and best.pt (the best on validation).

A checkpoint is written only when every meta-parameter and optimizer entry is finite, so that the
one on disk can always be resumed; when training diverges, ``kept`` says which iteration that is.
Under several processes rank 0 alone writes, and every rank keeps the same bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from metalab import distributed
from metalab.algorithms.base import Algorithm
from metalab.checkpoint import BEST, CHECKPOINT, load_checkpoint, nonfinite_entries, save_checkpoint
from metalab.errors import TrainingDiverged, require
from metalab.training.evaluation import Evaluation

__all__ = ["Checkpoints"]


class Checkpoints:
    """checkpoint.pt and best.pt of ``run_dir``, written by the ``main`` process, read onto ``device``.

    best: {"iteration", "score"} of best.pt, or None before a validation score counted.
    saved_iteration: the iteration in checkpoint.pt, once this run wrote or read it.
    """

    def __init__(self, run_dir: Path, main: bool, device: torch.device | str):
        self.path, self.best_path = run_dir / CHECKPOINT, run_dir / BEST
        self.main, self.device = main, device
        self.best: dict[str, Any] | None = None
        self.saved_iteration: int | None = None
        self._saved_largest = 0.0  # the largest |meta-parameter| in it

    def save(self, iteration: int, algorithm: dict[str, Any], resume_state: Callable[[], dict[str, Any]]) -> None:
        """Write checkpoint.pt atomically: the algorithm's state at ``iteration`` and what else a resume
        needs (``resume_state()``). A NaN or inf in the algorithm's state stops the run (TrainingDiverged)
        instead, and the previous, finite checkpoint stays."""
        bad = nonfinite_entries(algorithm)
        if bad:
            raise TrainingDiverged(
                f"training diverged by iteration {iteration}: {', '.join(bad[:3])}"
                f"{' and others' if len(bad) > 3 else ''} became NaN or infinite, so no checkpoint "
                f"was written for it; {self.kept()}"
            )
        if self.main:
            save_checkpoint(
                {"iteration": iteration, "algorithm": algorithm, "best": self.best, **resume_state()}, self.path
            )
        self._saved(iteration, algorithm)

    def restore(self, state: dict[str, Any]) -> None:
        """Take up ``state``, this run's checkpoint.pt, refusing one with NaN or infinite values."""
        require(
            not nonfinite_entries(state["algorithm"]),
            f"the checkpoint {self.path} holds NaN or infinite values (written before metalab "
            "refused such checkpoints): start a new run without resume.",
        )
        self.best = state["best"]
        self._saved(state["iteration"], state["algorithm"])

    def keep_if_best(
        self, iteration: int, val: Evaluation, metric: str, higher_is_better: bool, algorithm: Algorithm, val_tasks: int
    ) -> None:
        """Write best.pt when ``val[metric]`` improves on the best so far (a NaN score never does, nor a
        state with NaN or infinite values)."""
        score = val[metric][0]
        better = self.best is None or (score > self.best["score"] if higher_is_better else score < self.best["score"])
        state = algorithm.state_dict() if score == score and better else None
        if state is None or nonfinite_entries(state):
            return
        self.best = {"iteration": iteration, "score": score}
        if self.main:
            save_checkpoint(
                {"iteration": iteration, "algorithm": state, "val": val, "val_tasks": val_tasks}, self.best_path
            )

    def load_best(self) -> dict[str, Any]:
        """best.pt, read by rank 0 and sent to every rank (on the CPU then)."""
        device = "cpu" if distributed.active() else self.device
        return distributed.from_main(lambda: load_checkpoint(self.best_path, map_location=device))

    def kept(self) -> str:
        """Where the run stands after a divergence, and what to do: the end of its message."""
        advice = "start a new run with lower learning rates or trainer.grad_clip_norm."
        if self.saved_iteration is None:
            return f"this run wrote no checkpoint: {advice}"
        return (
            f"the last checkpoint, {self.path}, holds iteration {self.saved_iteration} with finite values "
            f"only (largest |meta-parameter| {self._saved_largest:.3g}); resuming it would repeat the same steps, "
            f"so {advice}"
        )

    def _saved(self, iteration: int, algorithm: dict[str, Any]) -> None:
        params = algorithm["meta_parameters"]
        self.saved_iteration = iteration
        self._saved_largest = max(
            (value.detach().abs().max().item() for value in params.values() if value.numel()), default=0.0
        )
