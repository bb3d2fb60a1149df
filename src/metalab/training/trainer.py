"""The one trainer: the loop and its schedule of logging, validation and checkpoints, then the test.
It knows nothing of any particular algorithm: it calls ``train_step`` and ``evaluate``. Beside it:
stop requests (``signals``), checkpoint.pt and best.pt (``checkpoints``), the results record
(``results``) and the time trained over a run's segments (``clock``)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from tqdm.auto import tqdm

from metalab import distributed
from metalab.algorithms.base import Algorithm, NonFiniteLossError
from metalab.checkpoint import METRICS, rng_state, set_rng_state
from metalab.errors import MetalabWarning, TrainingDiverged, require
from metalab.recorded import run_config
from metalab.tasks.base import TaskSampler
from metalab.training.autotune import Tuning, autotune
from metalab.training.checkpoints import Checkpoints
from metalab.training.clock import TrainingClock, parse_duration
from metalab.training.evaluation import (
    Comparison,
    Evaluation,
    check_units,
    episode_seed,
    evaluate_tasks,
    format_metric,
)
from metalab.training.precision import Precision
from metalab.training.results import Tested, results_record, write_results
from metalab.training.signals import EvaluationStopped, StopRequests
from metalab.training.sinks import JsonlSink, MetricSink

__all__ = ["Trainer"]


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
    max_time: a wall-clock budget for training, in seconds or as "DD:HH:MM:SS" / "HH:MM:SS" (None: none).
    It counts the training loop, its periodic validations included (results.json's train_seconds, summed
    over a run's resumed segments), not the start-up nor the final validation and test. Once it is
    spent, training stops after the current iteration and the run ends as at its last iteration
    (checkpoint, validation unless done at this iteration, test); results.json then says
    "stopped_by": "max_time". A test split the sampler lacks (``split_size("test") == 0``, e.g. Omniglot's
    tasks.split=all) is skipped, with a warning, whatever test_tasks says. autotune: before training (and
    at each resume) time the ways the algorithm can execute its step on a batch of its own and keep the
    fastest (``metalab.training.autotune``; the run's numbers do not depend on it); false: the
    algorithm's default execution, untimed.
    precision: "32" | "tf32" | "bf16" | "64", the arithmetic of every step and evaluation
    (``metalab.training.precision``); "64" makes the algorithm's meta-parameters float64 here.

    ``config``: the run's config, as the command line composed it; without one (a run built in
    Python) the trainer records the config that describes ``algorithm`` and ``tasks``
    (``metalab.recorded.run_config``), so that ``load_learner`` rebuilds them from the run directory.

    A checkpoint also holds the config, the training seconds so far, the number of metrics.jsonl
    records and the iteration last validated, so that a resume continues exactly (a validation cut
    short by a signal is redone first) and nothing is logged twice.

    Under several processes (``metalab.distributed``) each rank trains on its slice of every
    meta-batch and evaluates its slice of every evaluation batch; rank 0 alone writes the run
    directory, and a signal to any rank stops all of them at the same iteration.
    """

    def __init__(
        self,
        algorithm: Algorithm,
        tasks: TaskSampler,
        run_dir: str | Path,
        *,
        iterations: int,
        meta_batch_size: int,
        eval_every: int = 0,
        eval_tasks: int = 100,
        test_tasks: int = 600,
        eval_batch_size: int = 100,
        checkpoint_every: int = 1000,
        log_every: int = 50,
        seed: int = 0,
        eval_seed: int = 1234,
        test_checkpoint: str = "best",
        max_time: float | str | None = None,
        autotune: bool = True,
        precision: str | int = "32",
        sinks: Sequence[MetricSink] = (),
        progress: bool = True,
        config: dict[str, Any] | None = None,
    ):
        for key, value, low in (
            ("iterations", iterations, 0),
            ("meta_batch_size", meta_batch_size, 1),
            ("eval_every", eval_every, 0),
            ("eval_tasks", eval_tasks, 0),
            ("test_tasks", test_tasks, 0),
            ("eval_batch_size", eval_batch_size, 1),
            ("checkpoint_every", checkpoint_every, 1),
            ("log_every", log_every, 1),
        ):
            require(
                isinstance(value, int) and value >= low, f"trainer.{key} must be an integer >= {low} (got {value!r})."
            )
        require(isinstance(autotune, bool), f"trainer.autotune must be true or false (got {autotune!r}).")
        require(
            test_checkpoint in ("best", "last"),
            f"trainer.test_checkpoint must be best or last (got {test_checkpoint!r}).",
        )
        self.max_time = parse_duration(max_time)
        self.precision = Precision.of(precision, tasks.device)
        if test_tasks and tasks.split_size("test") == 0:
            warnings.warn(
                f"{type(tasks).__name__} holds no test split here (its tasks.split keeps none): the test of "
                f"trainer.test_tasks={test_tasks} is skipped.",
                MetalabWarning,
            )
            test_tasks = 0
        check_units(tasks, "val", eval_tasks, "trainer.eval_tasks")  # before training, not at its end
        check_units(tasks, "test", test_tasks, "trainer.test_tasks")
        self.test_checkpoint = test_checkpoint
        self.algorithm, self.tasks, self.run_dir = algorithm, tasks, Path(run_dir)
        self.iterations, self.meta_batch_size = iterations, meta_batch_size
        self.eval_every, self.eval_tasks, self.test_tasks = eval_every, eval_tasks, test_tasks
        self.eval_batch_size, self.checkpoint_every, self.log_every = eval_batch_size, checkpoint_every, log_every
        self.seed, self.eval_seed = seed, eval_seed
        self.autotune, self.tuning = autotune, Tuning(enabled=autotune)
        settings = dict(
            iterations=iterations,
            meta_batch_size=meta_batch_size,
            eval_every=eval_every,
            eval_tasks=eval_tasks,
            test_tasks=test_tasks,
            eval_batch_size=eval_batch_size,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            eval_seed=eval_seed,
            test_checkpoint=test_checkpoint,
            max_time=max_time,
            autotune=autotune,
            precision=self.precision.name,
            progress=progress,
        )
        self.config = run_config(algorithm, tasks, seed, settings) if config is None else config
        distributed.check_supported(algorithm, meta_batch_size)
        self.precision.prepare(algorithm)
        self.main = distributed.is_main()  # the process that writes the run directory
        self.progress = progress and self.main
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = JsonlSink(self.run_dir / METRICS)
        self.sinks: list[MetricSink] = [self.metrics, *sinks] if self.main else []
        self.generator = tasks.generator(seed)
        self.iteration = 0
        self.validated, self.last_val = -1, {}  # the iteration last validated, and its results
        self.checkpoints = Checkpoints(self.run_dir, self.main, tasks.device)
        self.stops = StopRequests()
        self.clock = TrainingClock()
        self.out_of_time = False  # whether trainer.max_time stopped training

    # -- the run ----------------------------------------------------------------------------
    def fit(self, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train (continuing from ``state``, this run's checkpoint as ``restore`` takes it), then validate
        and test. Returns the results, also written to results.json (strict JSON: NaN as null).
        A stop request (``signals``: SIGTERM, Ctrl-C, SIGUSR2 under submitit) stops training after the
        current iteration, and an evaluation at once, with the checkpoint written at the last completed
        iteration; the results then say "interrupted" and name the signal. A divergence is recorded
        in results.json and raised (TrainingDiverged). A spent ``max_time`` stops training after the
        current iteration too, and the run then ends as it would at its last iteration."""
        if state is not None:
            self.restore(state)
        distributed.broadcast_parameters(self.algorithm.meta_parameters().values())
        self._tune()
        val: Evaluation = {}
        test: Evaluation = {}
        tested: Tested | None = None  # what the test scored, once it did
        finished = False
        with self.stops.handled():
            try:
                self._train()
                self.save()
                if not self.stops.stopping():
                    val, test, tested = self._final_evaluation()
                    finished = True
            except NonFiniteLossError as error:
                self._diverged(
                    f"training diverged at iteration {self.iteration + 1} ({error}); {self.checkpoints.kept()}"
                )
            except TrainingDiverged as error:
                self._diverged(str(error))
            except EvaluationStopped:
                pass
        if not finished:  # stopped: the last validation that completed, of iteration self.validated
            val = self.last_val
        results = results_record(
            self.tasks,
            self.iteration,
            val,
            test,
            stopped_by=None if finished else self.stops.name(),
            train_seconds=self.clock.seconds(),
            config=self.config,
            execution=self.tuning.record(),
        )
        results.update(
            val_iteration=tested.iteration if tested else self.validated if val else None,
            tested_iteration=tested.iteration if tested else None,
            tested_checkpoint=tested.checkpoint if tested else None,
            val_tasks=tested.val_tasks if tested else self.eval_tasks if val else 0,
            test_tasks=self.test_tasks if test else 0,
        )
        if finished and self.out_of_time:
            results["stopped_by"] = "max_time"
        self._finish(results)
        if not finished:
            self.stops.pass_on()
        return results

    def _train(self) -> None:
        """The meta-training loop, from the current iteration until the last or a stop request."""
        bar = tqdm(
            total=self.iterations,
            initial=self.iteration,
            disable=not self.progress,
            dynamic_ncols=True,
            desc="meta-train",
        )
        self.clock.start()
        try:
            if self.iteration < self.iterations and self._validation_due():
                self.validate()  # cut short by a signal before the checkpoint of this iteration: redo it
            while self.iteration < self.iterations and not self.stops.stopping() and not self._time_is_up():
                batch = distributed.shard(self.tasks.sample(self.meta_batch_size, "train", self.generator))
                batch = self.precision.batch(batch)
                with self.precision.applied():
                    metrics = self.algorithm.train_step(batch)
                self.iteration += 1
                bar.update(1)
                if self.iteration % self.log_every == 0:
                    with self.precision.applied():
                        diagnostics = self.algorithm.diagnostics(batch)
                    metrics = distributed.average({**metrics, **diagnostics})  # whole meta-batch
                    self._log({f"train/{k}": v for k, v in metrics.items()})
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                if self.iteration < self.iterations and self._validation_due():
                    self.validate()
                if self.iteration % self.checkpoint_every == 0:
                    self.save()
        except EvaluationStopped:
            pass  # the checkpoint written next holds this iteration, not yet validated
        finally:
            self.clock.stop()
            bar.close()

    def _tune(self) -> None:
        """Choose the algorithm's execution by timing its candidates (``trainer.autotune``), and say so; not
        when no iteration is left (a finished run evaluated again), where the timing would outlast its use."""
        if not self.autotune or self.iteration >= self.iterations:
            return
        with self.precision.applied():  # timed as the run will step
            self.tuning = autotune(self.algorithm, self.tasks, self.meta_batch_size, self.seed, self.precision.batch)
        line = self.tuning.line()
        if line and self.main:
            tqdm.write(line)

    def _time_is_up(self) -> bool:
        """Whether trainer.max_time is spent (decided together under several processes)."""
        if self.max_time is not None and not self.out_of_time:
            spent = self.clock.seconds() >= self.max_time
            self.out_of_time = distributed.stop_requested(1 if spent else None) is not None  # any rank's clock
        return self.out_of_time

    def _validation_due(self) -> bool:
        """Whether the schedule validates at the current iteration and that has not been done."""
        final = self.iteration == self.iterations
        periodic = self.eval_every > 0 and self.iteration > 0 and self.iteration % self.eval_every == 0
        return self.eval_tasks > 0 and (final or periodic) and self.validated != self.iteration

    def _final_evaluation(self) -> tuple[Evaluation, Evaluation, Tested]:
        """Validate the final parameters (then checkpoint, so that a resume does not validate
        again), load best.pt when testing the best, and test, with what the algorithm is compared
        with on the same test tasks. Returns (val, test, what was tested)."""
        if self.eval_tasks > 0 and self.validated != self.iteration:  # the last iteration, or where max_time stopped
            self.validate()
            self.save()
        val, tested = self.last_val, Tested(self.iteration, "last", self.eval_tasks)
        best = self.checkpoints.best
        if self.test_checkpoint == "best" and best:
            tested = tested._replace(checkpoint="best")
            if best["iteration"] != self.iteration:
                state = self.checkpoints.load_best()
                self.algorithm.load_state_dict(state["algorithm"])  # no checkpoint is written after this
                val, tested = state["val"], Tested(state["iteration"], "best", state.get("val_tasks", self.eval_tasks))
        compare: Comparison | None = self.algorithm.compare
        test = self.evaluate("test", self.test_tasks, compare) if self.test_tasks else {}
        if test:
            self._log_eval("test", test)
        return val, test, tested

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, split: str, num_tasks: int, compare: Comparison | None = None) -> Evaluation:
        """Evaluate on ``num_tasks`` fixed episodes of ``split`` (and ``compare`` on the same ones);
        a stop request meanwhile stops the evaluation at once (EvaluationStopped)."""
        with self.stops.interruptible(), self.precision.applied():
            return evaluate_tasks(
                self.algorithm,
                self.tasks,
                split,
                num_tasks,
                self.eval_batch_size,
                episode_seed(self.eval_seed, split),
                progress=self.progress,
                before_batch=self.stops.check,
                compare=compare,
                prepare=self.precision.batch,
            )

    def validate(self) -> Evaluation:
        """Evaluate on the validation episodes, log, print one line, and keep best.pt when the
        metric improved."""
        val = self.evaluate("val", self.eval_tasks)
        self._log_eval("val", val)
        mean, ci = val[self.tasks.metric_name]
        if self.main:
            line = format_metric("val", self.tasks.metric_name, mean, ci, self.eval_tasks, self.tasks.unit_name)
            tqdm.write(f"iteration {self.iteration}: {line}")
        self.checkpoints.keep_if_best(
            self.iteration, val, self.tasks.metric_name, self.tasks.higher_is_better, self.algorithm, self.eval_tasks
        )
        self.validated, self.last_val = self.iteration, val
        return val

    # -- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        """Write checkpoint.pt (``Checkpoints.save``: TrainingDiverged instead when a value is not finite)."""
        self.checkpoints.save(self.iteration, self.algorithm.state_dict(), self._resume_state)

    def _resume_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the algorithm, for a resume to continue exactly."""
        return {
            "generator": self.generator.get_state(),
            "rng": rng_state(),
            "config": self.config,
            "task_spec": self.tasks.spec.state_dict(),
            "train_seconds": self.clock.seconds(),
            "metrics_rows": self.metrics.rows,
            "validated": self.validated,
            "val": self.last_val,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state``, this run's checkpoint.pt as the application read it (and checked
        its config against this run's): restore every state, and cut metrics.jsonl back to the records
        the checkpoint counted."""
        self.checkpoints.restore(state)
        self.algorithm.load_state_dict(state["algorithm"])
        self.generator.set_state(state["generator"].cpu())
        set_rng_state(state["rng"])
        self.iteration = state["iteration"]
        self.validated, self.last_val = state.get("validated", -1), state.get("val", {})
        self.clock = TrainingClock(state.get("train_seconds", 0.0))
        if self.main:
            self.metrics.truncate(state.get("metrics_rows"), self.iteration)
        for sink in self.sinks:  # a sink that keeps its own history drops what came after the checkpoint
            if hasattr(sink, "resume"):
                sink.resume(self.iteration)

    # -- records ----------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record, self.iteration)

    def _log_eval(self, split: str, results: Evaluation) -> None:
        record: dict[str, Any] = {}
        for key, (mean, ci) in results.items():
            record[f"{split}/{key}"], record[f"{split}/{key}_ci95"] = mean, ci
        self._log(record)

    def _diverged(self, message: str) -> NoReturn:
        """Record the divergence in results.json, then raise it (TrainingDiverged)."""
        results = results_record(
            self.tasks,
            self.iteration,
            self.last_val,
            {},
            stopped_by=None,
            train_seconds=self.clock.seconds(),
            config=self.config,
            execution=self.tuning.record(),
        )
        results.update(status="diverged", message=message)
        self._finish(results)
        raise TrainingDiverged(message) from None

    def _finish(self, results: dict[str, Any]) -> None:
        """Write results.json (rank 0), with the precision it ran in, and close the metric sinks."""
        results["precision"] = self.precision.name
        if self.main:
            write_results(self.run_dir, results)
        for sink in self.sinks:
            sink.close()
