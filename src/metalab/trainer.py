"""The one trainer: the loop, evaluation and checkpoint schedule, seeding, progress and logging.
It knows nothing of any particular algorithm: it calls ``train_step`` and ``evaluate``."""
from __future__ import annotations

import json
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metalab.algorithms.base import Algorithm, NonFiniteLossError
from metalab.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from metalab.errors import TrainingDiverged, require
from metalab.evaluation import episode_seed, evaluate_tasks
from metalab.logging import JsonlSink, MetricSink, truncate_jsonl
from metalab.provenance import git_commit, package_versions
from metalab.tasks.base import TaskSampler

__all__ = ["Trainer", "BEST", "CHECKPOINT", "RESULTS", "METRICS"]

CHECKPOINT, BEST, RESULTS, METRICS = "checkpoint.pt", "best.pt", "results.json", "metrics.jsonl"


class Trainer:
    """Meta-train ``algorithm`` on episodes from ``tasks``.

    iterations: meta-updates in all.  meta_batch_size: episodes per meta-update.
    eval_every: validate every this many iterations (0 = only at the end) on ``eval_tasks`` episodes.
    test_tasks: episodes of the final test (600 as in MAML's tables).  eval_batch_size: episodes
    adapted at once during evaluation.  checkpoint_every: iterations between checkpoints.
    log_every: iterations between training-metric records.  seed: seeds the training episodes;
    eval_seed fixes the validation and test episodes, the same for every run and seed.
    test_checkpoint: "best" tests the meta-parameters that scored best on validation (kept in
    best.pt; model selection on held-out validation episodes, never on test), "last" the final ones.
    """

    def __init__(self, algorithm: Algorithm, tasks: TaskSampler, run_dir: str | Path, *, iterations: int,
                 meta_batch_size: int, eval_every: int = 0, eval_tasks: int = 100, test_tasks: int = 600,
                 eval_batch_size: int = 100, checkpoint_every: int = 1000, log_every: int = 50, seed: int = 0,
                 eval_seed: int = 1234, test_checkpoint: str = "best", sinks: Sequence[MetricSink] = (),
                 progress: bool = True, config: dict[str, Any] | None = None):
        for key, value, low in (("iterations", iterations, 0), ("meta_batch_size", meta_batch_size, 1),
                                ("eval_every", eval_every, 0), ("eval_tasks", eval_tasks, 0),
                                ("test_tasks", test_tasks, 0), ("eval_batch_size", eval_batch_size, 1),
                                ("checkpoint_every", checkpoint_every, 1), ("log_every", log_every, 1)):
            require(isinstance(value, int) and value >= low,
                    f"trainer.{key} must be an integer >= {low} (got {value!r}).")
        require(test_checkpoint in ("best", "last"),
                f"trainer.test_checkpoint must be best or last (got {test_checkpoint!r}).")
        self.test_checkpoint = test_checkpoint
        self.algorithm, self.tasks, self.run_dir = algorithm, tasks, Path(run_dir)
        self.iterations, self.meta_batch_size = iterations, meta_batch_size
        self.eval_every, self.eval_tasks, self.test_tasks = eval_every, eval_tasks, test_tasks
        self.eval_batch_size, self.checkpoint_every, self.log_every = eval_batch_size, checkpoint_every, log_every
        self.seed, self.eval_seed, self.progress = seed, eval_seed, progress
        self.config = config or {}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sinks: list[MetricSink] = [JsonlSink(self.run_dir / METRICS), *sinks]
        self.generator = tasks.generator(seed)
        self.iteration = 0
        self.best: dict[str, Any] | None = None  # {"iteration", "score"} of best.pt
        self._stop_signal: int | None = None

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def save(self) -> None:
        save_checkpoint({"iteration": self.iteration, "algorithm": self.algorithm.state_dict(),
                         "generator": self.generator.get_state(), "rng": rng_state(), "best": self.best,
                         "config": self.config},
                        self.checkpoint_path())

    def restore(self) -> None:
        state = load_checkpoint(self.checkpoint_path(), map_location=self.tasks.device)
        self.algorithm.load_state_dict(state["algorithm"])
        self.generator.set_state(state["generator"].cpu())
        set_rng_state(state["rng"])
        self.iteration, self.best = state["iteration"], state["best"]
        truncate_jsonl(self.run_dir / METRICS, self.iteration)

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, split: str, num_tasks: int) -> dict[str, tuple[float, float]]:
        return evaluate_tasks(self.algorithm, self.tasks, split, num_tasks, self.eval_batch_size,
                              episode_seed(self.eval_seed, split))

    def validate(self) -> dict[str, tuple[float, float]]:
        """Evaluate on the validation episodes, log, and keep best.pt when the metric improved
        (a NaN score never counts as an improvement)."""
        val = self.evaluate("val", self.eval_tasks)
        self._log_eval("val", val)
        score = val[self.tasks.metric_name][0]
        better = self.best is None or (score > self.best["score"] if self.tasks.higher_is_better else score < self.best["score"])
        if score == score and better:
            self.best = {"iteration": self.iteration, "score": score}
            save_checkpoint({"iteration": self.iteration, "algorithm": self.algorithm.state_dict(), "val": val},
                            self.run_dir / BEST)
        return val

    def _log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record, self.iteration)

    def _log_eval(self, split: str, results: dict[str, tuple[float, float]]) -> None:
        record: dict[str, Any] = {}
        for key, (mean, ci) in results.items():
            record[f"{split}/{key}"], record[f"{split}/{key}_ci95"] = mean, ci
        self._log(record)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train (continuing from the run directory's checkpoint when ``resume``), then test.
        Returns the results, also written to results.json. SIGTERM and Ctrl-C stop after the
        current iteration with a checkpoint written; the results then say "interrupted"."""
        if resume and self.checkpoint_path().is_file():
            self.restore()
        start_iteration, start_time = self.iteration, time.perf_counter()
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=self.iterations, initial=self.iteration, disable=not self.progress,
                   dynamic_ncols=True, desc="meta-train")
        val: dict[str, tuple[float, float]] = {}
        try:
            while self.iteration < self.iterations and self._stop_signal is None:
                batch = self.tasks.sample(self.meta_batch_size, "train", self.generator)
                try:
                    metrics = self.algorithm.train_step(batch)
                except NonFiniteLossError as error:
                    kept = (f"the last good checkpoint is {self.checkpoint_path()}" if self.checkpoint_path().is_file()
                            else "no checkpoint had been written yet")
                    raise TrainingDiverged(f"training diverged at iteration {self.iteration + 1} ({error}); {kept}: "
                                           "lower the learning rates or set trainer.grad_clip_norm.") from None
                self.iteration += 1
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                if self.iteration % self.log_every == 0:
                    self._log({f"train/{k}": v for k, v in metrics.items()})
                if self.eval_every and self.iteration % self.eval_every == 0 and self.iteration < self.iterations:
                    val = self.validate()
                if self.iteration % self.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.save()
        train_seconds = time.perf_counter() - start_time
        interrupted = self.iteration < self.iterations
        test: dict[str, tuple[float, float]] = {}
        tested = self.iteration
        if not interrupted:
            if self.eval_tasks:
                val = self.validate()
                if self.test_checkpoint == "best" and self.best and self.best["iteration"] != self.iteration:
                    best = load_checkpoint(self.run_dir / BEST, map_location=self.tasks.device)
                    self.algorithm.load_state_dict(best["algorithm"])
                    val, tested = best["val"], best["iteration"]
            if self.test_tasks:
                test = self.evaluate("test", self.test_tasks)
                self._log_eval("test", test)
        results = self._results(val, test, interrupted, train_seconds, self.iteration - start_iteration)
        results["tested_iteration"] = tested
        (self.run_dir / RESULTS).write_text(json.dumps(results, indent=2))
        for sink in self.sinks:
            sink.close()
        return results

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C stops at once; the last checkpoint stands
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _results(self, val: dict, test: dict, interrupted: bool, seconds: float, iterations_run: int) -> dict[str, Any]:
        def table(results: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
            return {key: {"mean": mean, "ci95": ci} for key, (mean, ci) in results.items()}

        return {"status": "interrupted" if interrupted else "completed", "iteration": self.iteration,
                "metric": self.tasks.metric_name, "higher_is_better": self.tasks.higher_is_better,
                "val": table(val), "test": table(test), "train_seconds": seconds,
                "iterations_per_second": iterations_run / seconds if seconds > 0 else None,
                "device": str(self.tasks.device), "git_commit": git_commit(), "versions": package_versions(),
                "config": self.config}
