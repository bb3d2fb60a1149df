"""The one trainer: the loop, evaluation and checkpoint schedule, seeding, progress and logging.
It knows nothing of any particular algorithm: it calls ``train_step`` and ``evaluate``."""
from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metalab import distributed
from metalab.algorithms.base import Algorithm, NonFiniteLossError
from metalab.checkpoint import (BEST, CHECKPOINT, METRICS, RESULTS, load_checkpoint, nonfinite_entries, rng_state,
                                save_checkpoint, set_rng_state)
from metalab.errors import TrainingDiverged, require
from metalab.training.evaluation import episode_seed, evaluate_tasks, format_metric
from metalab.training.sinks import JsonlSink, MetricSink, strict_json
from metalab.training.provenance import git_commit, package_versions
from metalab.tasks.base import TaskSampler

__all__ = ["Trainer", "StoppedAtOnce", "BEST", "CHECKPOINT", "RESULTS", "METRICS"]

Evaluation = dict[str, tuple[float, float]]  # {metric: (mean, ci95)}


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop now, the last checkpoint stands. ``signum`` is the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _EvaluationStopped(Exception):
    """Raised by the signal handler to cut an evaluation short (it is redone on resume)."""


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

    A checkpoint is written only when every meta-parameter and optimizer entry is finite; it also
    holds the config, the training seconds so far, the number of metrics.jsonl records and the
    iteration last validated, so that a resume continues exactly (a validation cut short by a
    signal is redone first) and nothing is logged twice.

    Under several processes (``metalab.distributed``) each rank trains on its slice of every
    meta-batch and evaluates its slice of every evaluation batch; rank 0 alone writes the run
    directory, and a signal to any rank stops all of them at the same iteration.
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
        distributed.check_supported(algorithm, meta_batch_size)
        self.main = distributed.is_main()  # the process that writes the run directory
        self.progress = progress and self.main
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = JsonlSink(self.run_dir / METRICS)
        self.sinks: list[MetricSink] = [self.metrics, *sinks] if self.main else []
        self.generator = tasks.generator(seed)
        self.iteration = 0
        self.best: dict[str, Any] | None = None  # {"iteration", "score"} of best.pt
        self.validated, self.last_val = -1, {}   # the iteration last validated, and its results
        self.saved_iteration: int | None = None  # the iteration in checkpoint.pt, once this run wrote or read it
        self._saved_largest = 0.0  # the largest |meta-parameter| in it
        self._train_seconds, self._clock_start = 0.0, None  # seconds trained in earlier segments; this one's start
        self._stop_signal: int | None = None
        self._interruptible = False  # True while evaluating: a signal then cuts the evaluation short

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def train_seconds(self) -> float:
        """Seconds spent in the training loop over every segment of the run (resumes add up)."""
        running = time.perf_counter() - self._clock_start if self._clock_start is not None else 0.0
        return self._train_seconds + running

    def save(self) -> None:
        """Write checkpoint.pt atomically; a NaN or inf meta-parameter or optimizer entry stops the
        run (TrainingDiverged) instead, and the previous, finite checkpoint stays."""
        algorithm = self.algorithm.state_dict()
        bad = nonfinite_entries(algorithm)
        if bad:
            raise TrainingDiverged(f"training diverged by iteration {self.iteration}: {', '.join(bad[:3])}"
                                   f"{' and others' if len(bad) > 3 else ''} became NaN or infinite, so no checkpoint "
                                   f"was written for it; {self._kept()}")
        if not self.main:
            self.saved_iteration, self._saved_largest = self.iteration, _largest(algorithm["meta_parameters"])
            return
        save_checkpoint({"iteration": self.iteration, "algorithm": algorithm,
                         "generator": self.generator.get_state(), "rng": rng_state(), "best": self.best,
                         "config": self.config, "task_spec": self.tasks.spec.state_dict(),
                         "train_seconds": self.train_seconds(), "metrics_rows": self.metrics.rows,
                         "validated": self.validated, "val": self.last_val},
                        self.checkpoint_path())
        self.saved_iteration, self._saved_largest = self.iteration, _largest(algorithm["meta_parameters"])

    def _kept(self) -> str:
        """Where the run stands after a divergence, and what to do: the end of its message."""
        advice = "start a new run with lower learning rates or trainer.grad_clip_norm."
        if self.saved_iteration is None:
            return f"this run wrote no checkpoint: {advice}"
        return (f"the last checkpoint, {self.checkpoint_path()}, holds iteration {self.saved_iteration} with finite values "
                f"only (largest |meta-parameter| {self._saved_largest:.3g}); resuming it would repeat the same steps, "
                f"so {advice}")

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state``, this run's checkpoint.pt as the application read it (and checked
        its config against this run's): restore every state, and cut metrics.jsonl back to the records
        the checkpoint counted."""
        require(not nonfinite_entries(state["algorithm"]),
                f"the checkpoint {self.checkpoint_path()} holds NaN or infinite values (written before metalab "
                "refused such checkpoints): start a new run without resume.")
        self.algorithm.load_state_dict(state["algorithm"])
        self.generator.set_state(state["generator"].cpu())
        set_rng_state(state["rng"])
        self.iteration, self.best = state["iteration"], state["best"]
        self.saved_iteration, self._saved_largest = self.iteration, _largest(state["algorithm"]["meta_parameters"])
        self.validated, self.last_val = state.get("validated", -1), state.get("val", {})
        self._train_seconds = state.get("train_seconds", 0.0)
        if self.main:
            self.metrics.truncate(state.get("metrics_rows"), self.iteration)

    def _load(self, path: Path) -> dict[str, Any]:
        """A checkpoint file of this run, read by rank 0 and sent to every rank (on the CPU then)."""
        device = "cpu" if distributed.active() else self.tasks.device
        return distributed.from_main(lambda: load_checkpoint(path, map_location=device))

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, split: str, num_tasks: int) -> Evaluation:
        """Evaluate on ``num_tasks`` fixed episodes of ``split``; a SIGTERM/SIGINT meanwhile stops
        the evaluation at once."""
        self._interruptible = True
        try:
            return evaluate_tasks(self.algorithm, self.tasks, split, num_tasks, self.eval_batch_size,
                                  episode_seed(self.eval_seed, split), progress=self.progress,
                                  before_batch=self._raise_if_stopping)
        finally:
            self._interruptible = False

    def validate(self) -> Evaluation:
        """Evaluate on the validation episodes, log, print one line, and keep best.pt when the
        metric improved (a NaN score never counts as an improvement)."""
        val = self.evaluate("val", self.eval_tasks)
        self._log_eval("val", val)
        mean, ci = val[self.tasks.metric_name]
        if self.main:
            tqdm.write(f"iteration {self.iteration}: " + format_metric("val", self.tasks.metric_name, mean, ci, self.eval_tasks))
        better = self.best is None or (mean > self.best["score"] if self.tasks.higher_is_better else mean < self.best["score"])
        algorithm = self.algorithm.state_dict() if mean == mean and better else None
        if algorithm is not None and not nonfinite_entries(algorithm):
            self.best = {"iteration": self.iteration, "score": mean}
            if self.main:
                save_checkpoint({"iteration": self.iteration, "algorithm": algorithm, "val": val,
                                 "val_tasks": self.eval_tasks}, self.run_dir / BEST)
        self.validated, self.last_val = self.iteration, val
        return val

    def _validation_due(self) -> bool:
        """Whether the schedule validates at the current iteration and that has not been done."""
        final = self.iteration == self.iterations
        periodic = self.eval_every > 0 and self.iteration > 0 and self.iteration % self.eval_every == 0
        return self.eval_tasks > 0 and (final or periodic) and self.validated != self.iteration

    def _log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record, self.iteration)

    def _log_eval(self, split: str, results: Evaluation) -> None:
        record: dict[str, Any] = {}
        for key, (mean, ci) in results.items():
            record[f"{split}/{key}"], record[f"{split}/{key}_ci95"] = mean, ci
        self._log(record)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train (continuing from ``state``, this run's checkpoint as ``restore`` takes it), then validate
        and test. Returns the results, also written to results.json (strict JSON: NaN as null).
        SIGTERM and Ctrl-C stop training after the current iteration, and an evaluation at once,
        with the checkpoint written at the last completed iteration; the results then say
        "interrupted" and name the signal. A second signal stops at once (StoppedAtOnce).
        SIGUSR2, when a handler for it is installed (submitit's: requeue the SLURM job before its
        time limit), stops the same way, and that handler then runs, after the checkpoint."""
        if state is not None:
            self.restore(state)
        distributed.broadcast_parameters(self.algorithm.meta_parameters().values())
        chained = (signal.SIGUSR2,) if callable(signal.getsignal(signal.SIGUSR2)) else ()
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT, *chained)}
        val: Evaluation = self.last_val
        test: Evaluation = {}
        tested: dict[str, Any] = {"iteration": self.iteration, "checkpoint": "last", "val_tasks": self.eval_tasks}
        finished = False
        try:
            self._clock_start = time.perf_counter()
            try:
                self._train()
            except NonFiniteLossError as error:
                self._finish_diverged(f"training diverged at iteration {self.iteration + 1} ({error}); {self._kept()}")
            except TrainingDiverged as error:
                self._finish_diverged(str(error))
            self._train_seconds, self._clock_start = self.train_seconds(), None
            try:
                self.save()
            except TrainingDiverged as error:
                self._finish_diverged(str(error))
            if not self._stopping():
                val, test, tested = self._final_evaluation()
                finished = True
        except _EvaluationStopped:
            val = self.last_val
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        results = self._results(val, test, interrupted=not finished)
        results.update(tested_iteration=tested["iteration"], tested_checkpoint=tested["checkpoint"],
                       val_tasks=tested["val_tasks"], test_tasks=self.test_tasks)
        self._write_results(results)
        if not finished and self._stop_signal in chained:
            signal.raise_signal(self._stop_signal)  # e.g. submitit requeues the job, and it resumes from here
        return results

    def _train(self) -> None:
        """The meta-training loop, from the current iteration until the last or a stop signal."""
        bar = tqdm(total=self.iterations, initial=self.iteration, disable=not self.progress,
                   dynamic_ncols=True, desc="meta-train")
        try:
            if self.iteration < self.iterations and self._validation_due():
                self.validate()  # cut short by a signal before the checkpoint of this iteration: redo it
            while self.iteration < self.iterations and not self._stopping():
                batch = distributed.shard(self.tasks.sample(self.meta_batch_size, "train", self.generator))
                metrics = self.algorithm.train_step(batch)
                self.iteration += 1
                bar.update(1)
                if self.iteration % self.log_every == 0:
                    metrics = distributed.average({**metrics, **self.algorithm.diagnostics(batch)})  # whole meta-batch
                    self._log({f"train/{k}": v for k, v in metrics.items()})
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                if self.iteration < self.iterations and self._validation_due():
                    self.validate()
                if self.iteration % self.checkpoint_every == 0:
                    self.save()
        except _EvaluationStopped:
            pass  # the checkpoint written next holds this iteration, not yet validated
        finally:
            bar.close()

    def _final_evaluation(self) -> tuple[Evaluation, Evaluation, dict[str, Any]]:
        """Validate the final parameters (then checkpoint, so that a resume does not validate
        again), load best.pt when testing the best, and test. Returns (val, test, what was tested)."""
        if self._validation_due():
            self.validate()
            self.save()
        val = self.last_val
        tested = {"iteration": self.iteration, "checkpoint": "last", "val_tasks": self.eval_tasks}
        if self.test_checkpoint == "best" and self.best:
            tested["checkpoint"] = "best"
            if self.best["iteration"] != self.iteration:
                best = self._load(self.run_dir / BEST)
                self.algorithm.load_state_dict(best["algorithm"])  # no checkpoint is written after this
                val = best["val"]
                tested.update(iteration=best["iteration"], val_tasks=best.get("val_tasks", self.eval_tasks))
        test = self.evaluate("test", self.test_tasks) if self.test_tasks else {}
        if test:
            self._log_eval("test", test)
        return val, test, tested

    def _finish_diverged(self, message: str) -> None:
        """Record the divergence in results.json, then raise it (TrainingDiverged)."""
        self._train_seconds, self._clock_start = self.train_seconds(), None
        results = self._results(self.last_val, {}, interrupted=False)
        results.update(status="diverged", message=message)
        self._write_results(results)
        raise TrainingDiverged(message) from None

    def _write_results(self, results: dict[str, Any]) -> None:
        if self.main:
            (self.run_dir / RESULTS).write_text(strict_json(results, indent=2))
        for sink in self.sinks:
            sink.close()

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C stops at once; the last checkpoint stands
            raise StoppedAtOnce(signum)
        self._stop_signal = signum
        if self._interruptible and not distributed.active():  # several processes stop together, between batches
            raise _EvaluationStopped

    def _stopping(self) -> bool:
        """Whether to stop now: a signal reached this process or, under several processes, any of
        them (decided together, at the same point of every rank)."""
        agreed = distributed.stop_requested(self._stop_signal)
        if agreed is not None and self._stop_signal is None:  # another rank's signal
            self._stop_signal = agreed
        return agreed is not None

    def _raise_if_stopping(self) -> None:
        if self._stopping():
            raise _EvaluationStopped

    def _results(self, val: Evaluation, test: Evaluation, interrupted: bool) -> dict[str, Any]:
        def table(results: Evaluation) -> dict[str, dict[str, float]]:
            return {key: {"mean": mean, "ci95": ci} for key, (mean, ci) in results.items()}

        nonfinite = [f"{split}/{key}" for split, results in (("val", val), ("test", test))
                     for key, (mean, _) in results.items() if not mean == mean or abs(mean) == float("inf")]
        status = "interrupted" if interrupted else "nonfinite_evaluation" if nonfinite else "completed"
        seconds = self.train_seconds()
        return {"status": status, "iteration": self.iteration,
                "stopped_by": signal.Signals(self._stop_signal).name if interrupted and self._stop_signal else None,
                "nonfinite": nonfinite, "metric": self.tasks.metric_name, "higher_is_better": self.tasks.higher_is_better,
                "val": table(val), "test": table(test), "train_seconds": seconds,
                "iterations_per_second": self.iteration / seconds if seconds > 0 else None,
                "device": str(self.tasks.device), "processes": distributed.world_size(), "git_commit": git_commit(),
                "versions": package_versions(),
                "config": self.config}


def _largest(params: dict[str, torch.Tensor]) -> float:
    return max((value.detach().abs().max().item() for value in params.values() if value.numel()), default=0.0)
