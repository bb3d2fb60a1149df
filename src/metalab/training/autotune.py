"""Choosing how a run executes its meta-step by measuring, like ``torch.backends.cudnn.benchmark``.

Before the first iteration (and again at each resume: the choice is not part of what defines a run),
the trainer times each execution the algorithm offers (``Algorithm.executions``: for an episodic
algorithm full vmap, vmap in chunks, a per-task loop, with and without the channels layout; see
``metalab.algorithms.execution``) on one batch of its own problem, and keeps the fastest. They give the
same numbers up to float rounding, so the choice changes the speed, not the results:

* the tuning batch comes from a generator of its own, never the run's: the run's batches do not depend
  on tuning;
* the algorithm's state (meta-parameters, meta-optimizer, model buffers) and the global RNG states are
  snapshotted first and restored after each candidate;
* each candidate takes one warm-up step, then up to ``STEPS`` timed ones, and its time is the fastest of
  them (a busy machine only ever slows a step down);
  one already ``SLOWER`` times slower than the best so far stops early;
* the first candidate, the algorithm's untuned execution (full vmap), is kept unless another is faster
  by more than ``MARGIN``: a difference within the timing's noise is no reason to change;
* a candidate that raises (a CUDA out-of-memory error: a chunk size that does not fit) is skipped and its
  error recorded; on a GPU the cache is emptied between candidates.

Under several processes rank 0 alone times the candidates, on its shard of the batch and without
communicating (``distributed.alone``), and every rank takes its choice (``distributed.from_main``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from metalab import distributed
from metalab.algorithms.base import Algorithm, NonFiniteLossError
from metalab.checkpoint import rng_state, set_rng_state
from metalab.tasks.base import TaskSampler

__all__ = ["MARGIN", "SLOWER", "STEPS", "TUNING_SEED", "Tuning", "autotune", "choose"]

#: added to the run's seed for the tuning batch's own generator
TUNING_SEED = 0x7E57
#: timed steps per candidate after its warm-up (the fastest is kept)
STEPS = 2
#: another candidate replaces the first (the untuned execution) only when this much faster (a fraction)
MARGIN = 0.03
#: a candidate whose steps are all this many times slower than the best so far stops early
SLOWER = 1.5


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
    """(the fastest of ``options``, or the first when within ``MARGIN`` of it; {name: seconds per step or
    the error}), the algorithm restored after each. When every candidate raised, the algorithm's current
    execution is kept (the run then meets that error itself)."""
    cuda = device.type == "cuda"
    snapshot = copy.deepcopy((algorithm.state_dict(), algorithm.model.state_dict()))
    rng, current = rng_state(), getattr(algorithm, "execution", options[0])
    candidates: dict[str, float | str] = {}
    best: tuple[float, Any] | None = None
    for execution in options:
        algorithm.use(execution)
        try:
            seconds = _seconds_per_step(algorithm, batch, best[0] * SLOWER if best else float("inf"), cuda)
            candidates[execution.name] = seconds
            if best is None or seconds < best[0]:
                best = (seconds, execution)
        except (RuntimeError, NonFiniteLossError) as error:  # torch.cuda.OutOfMemoryError among them
            candidates[execution.name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:120]}"
        finally:
            state, model_state = copy.deepcopy(snapshot)
            algorithm.model.load_state_dict(model_state)
            algorithm.load_state_dict(state)
            set_rng_state(rng)
            if cuda:
                torch.cuda.empty_cache()
    first = candidates.get(options[0].name)
    if best and isinstance(first, float) and first <= best[0] * (1 + MARGIN):
        return options[0], candidates
    return (best[1] if best else current), candidates


def _seconds_per_step(algorithm: Algorithm, batch: Any, limit: float, cuda: bool) -> float:
    """The fewest seconds of up to ``STEPS`` ``train_step`` calls after one warm-up call, stopping once
    every timed step took more than ``limit``."""

    def once() -> float:
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        algorithm.train_step(batch)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    once()
    times: list[float] = []
    while len(times) < STEPS and (not times or min(times) <= limit):
        times.append(once())
    return min(times)
