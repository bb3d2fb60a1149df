"""Choosing how a run executes its meta-step by measuring, like ``torch.backends.cudnn.benchmark``.

Before the first iteration (and again at each resume: the choice is not part of what defines a run),
the trainer times each execution the algorithm offers (``Algorithm.executions``: for an episodic
algorithm full vmap, vmap in chunks, a per-task loop, with and without the channels layout; see
``metalab.algorithms.execution``) on one batch of its own problem, and keeps the fastest. They give the
same numbers up to float rounding, so the choice changes the speed, not the results:

* the tuning batch comes from a generator of its own, never the run's: the run's batches do not depend
  on tuning;
* the algorithm's state (meta-parameters, meta-optimizer, model buffers) and the global RNG states are
  snapshotted first and restored at the end;
* the candidates take turns, one step each per round, so that drift in the machine's speed slows them
  alike: a first round warms each up, then ``STEPS`` rounds are timed, and a candidate's time is its
  fastest step (a busy machine only ever slows a step down); one already ``SLOWER`` times slower than
  the best sits out the later rounds;
* the first candidate, the algorithm's untuned execution (full vmap), is kept unless another is faster
  by more than ``MARGIN``: when the fastest is another, the two meet in a final of ``CONFIRM`` more
  rounds, and the challenger wins only if it is the faster in every round of the final and the median
  of its steps beats the first's by that margin (a fastest step can be a lucky one, and a median a
  lucky run of them; a difference within the timing's noise is no reason to change);
* a candidate that raises (a CUDA out-of-memory error: a chunk size that does not fit) is skipped and its
  error recorded; on a GPU the cache is emptied between candidates.

Under several processes rank 0 alone times the candidates, on its shard of the batch and without
communicating (``distributed.alone``), and every rank takes its choice (``distributed.from_main``).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from metalab import distributed
from metalab.algorithms.base import Algorithm, NonFiniteLossError
from metalab.checkpoint import rng_state, set_rng_state
from metalab.tasks.base import TaskSampler

__all__ = ["CONFIRM", "MARGIN", "SLOWER", "STEPS", "TUNING_SEED", "Tuning", "autotune", "choose"]

#: added to the run's seed for the tuning batch's own generator
TUNING_SEED = 0x7E57
#: timed rounds after the warm-up round: steps per candidate (its fastest is kept)
STEPS = 3
#: another candidate replaces the first (the untuned execution) only when this much faster (a fraction)
MARGIN = 0.03
#: a candidate this many times slower than the best so far sits out the later rounds
SLOWER = 1.5
#: rounds of the final between the fastest candidate and the first, when they differ
CONFIRM = 3


@dataclass(frozen=True)
class Tuning:
    """The outcome: the execution ``chosen`` (None: nothing to choose, or tuning off), every candidate's
    seconds per step or the error that skipped it, and the seconds tuning took."""

    chosen: Any = None
    candidates: dict[str, float | str] = field(default_factory=dict)
    seconds: float = 0.0
    enabled: bool = True

    def record(self) -> dict[str, Any]:
        """results.json's ``execution`` entry."""
        return {
            "autotune": self.enabled,
            "chosen": self.chosen.name if self.chosen is not None else None,
            "candidates": self.candidates,
            "tuning_seconds": self.seconds,
        }

    def line(self) -> str | None:
        """The console's line, e.g. "autotune: chose vmap/8 (0.41 s/it) over vmap 0.52, loop 0.61 in 6.3 s"."""
        if self.chosen is None:
            return None
        others = ", ".join(
            f"{name} {value:.3g}" if isinstance(value, float) else f"{name} ({value})"
            for name, value in self.candidates.items()
            if name != self.chosen.name
        )
        mine = self.candidates.get(self.chosen.name)
        timed = f" ({mine:.3g} s/it)" if isinstance(mine, float) else ""
        return f"autotune: chose {self.chosen.name}{timed}{f' over {others}' if others else ''} in {self.seconds:.1f} s"


def autotune(
    algorithm: Algorithm,
    tasks: TaskSampler,
    meta_batch_size: int,
    seed: int,
    prepare: Callable[[Any], Any] | None = None,
) -> Tuning:
    """``choose`` on a batch of ``meta_batch_size`` episodes (this rank's shard of it) drawn from a
    generator of its own, seeded ``seed + TUNING_SEED``, and mapped by ``prepare`` as the run maps its
    batches (the trainer's precision); the RNG states are as before."""
    rng = rng_state()
    batch = distributed.shard(tasks.sample(meta_batch_size, "train", tasks.generator(seed + TUNING_SEED)))
    set_rng_state(rng)
    if batch is not None and prepare is not None:
        batch = prepare(batch)
    return choose(algorithm, batch, tasks.device)


def choose(algorithm: Algorithm, batch: Any, device: torch.device) -> Tuning:
    """Time ``algorithm``'s executions on ``batch``, ``use`` the fastest, and return the outcome; the
    algorithm's state and the RNG states are as before. Under several processes rank 0 decides."""
    start = time.perf_counter()
    options = algorithm.executions(batch) if batch is not None else []
    if not options:
        return Tuning()

    def measure() -> tuple[Any, dict[str, float | str]]:
        with distributed.alone():
            return _measure(algorithm, batch, options, device)

    chosen, candidates = distributed.from_main(measure)
    algorithm.use(chosen)
    return Tuning(chosen, candidates, time.perf_counter() - start)


def _measure(algorithm: Algorithm, batch: Any, options: list[Any], device: torch.device):
    """(the fastest of ``options``, or the first unless the fastest won every round of the final and beat
    it by ``MARGIN`` in the median;
    {name: its fastest step's seconds, or the error}), the algorithm and the RNG states restored at the
    end (and after a step that failed). When every candidate raised, the algorithm's current execution
    is kept (the run then meets that error itself)."""
    cuda = device.type == "cuda"
    snapshot = copy.deepcopy((algorithm.state_dict(), algorithm.model.state_dict()))
    rng, current = rng_state(), getattr(algorithm, "execution", options[0])

    def restore() -> None:
        state, model_state = copy.deepcopy(snapshot)
        algorithm.model.load_state_dict(model_state)
        algorithm.load_state_dict(state)
        set_rng_state(rng)
        if cuda:
            torch.cuda.empty_cache()

    times: dict[str, list[float]] = {execution.name: [] for execution in options}
    failed: dict[str, str] = {}
    try:
        for round_ in range(STEPS + 1):  # round 0 warms every candidate up; each later one times one step
            best = min((min(t) for t in times.values() if t), default=float("inf"))
            for execution in options:
                name = execution.name
                if name in failed or (times[name] and min(times[name]) > best * SLOWER):
                    continue
                algorithm.use(execution)
                try:
                    seconds = _step_seconds(algorithm, batch, cuda)
                except (RuntimeError, NonFiniteLossError) as error:  # torch.cuda.OutOfMemoryError among them
                    failed[name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:120]}"
                    restore()
                    continue
                if round_:
                    times[name].append(seconds)
    finally:
        restore()
    candidates: dict[str, float | str] = {
        name: failed[name] if name in failed else min(seconds) for name, seconds in times.items()
    }
    timed = {e.name: e for e in options if isinstance(candidates[e.name], float)}
    if not timed:
        return current, candidates
    fastest, first = min(timed, key=candidates.get), options[0]
    if first.name not in timed or fastest == first.name:
        return timed[fastest], candidates
    try:  # the final: the fastest against the first, in CONFIRM more rounds, by the median of all their steps
        for _ in range(CONFIRM):
            for execution in (first, timed[fastest]):
                algorithm.use(execution)
                times[execution.name].append(_step_seconds(algorithm, batch, cuda))
    except (RuntimeError, NonFiniteLossError):
        return first, candidates
    finally:
        restore()
    candidates[first.name], candidates[fastest] = min(times[first.name]), min(times[fastest])
    final = zip(times[first.name][-CONFIRM:], times[fastest][-CONFIRM:])  # each round's two steps
    every_round = all(challenger < untuned for untuned, challenger in final)
    if not every_round or statistics.median(times[first.name]) <= statistics.median(times[fastest]) * (1 + MARGIN):
        return first, candidates
    return timed[fastest], candidates


def _step_seconds(algorithm: Algorithm, batch: Any, cuda: bool) -> float:
    """The seconds of one ``train_step`` (on a GPU, until the device has finished it)."""
    if cuda:
        torch.cuda.synchronize()
    begin = time.perf_counter()
    algorithm.train_step(batch)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - begin
