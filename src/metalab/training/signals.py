"""Stop requests: how a run that is told to stop (SIGTERM from a scheduler, Ctrl-C) ends cleanly.

The first SIGTERM or SIGINT asks the trainer to stop after the current iteration, with a checkpoint
there, and cuts an evaluation short at once (it is redone on resume); a second one stops at once
(``StoppedAtOnce``) and the last checkpoint stands. SIGUSR2, when a handler for it is already
installed (submitit's, which requeues the SLURM job before its time limit), stops the same way and
is passed on to that handler once the run has written its results. Under several processes
(``metalab.distributed``) the ranks decide together, at the same point, so that all of them stop
at the same iteration.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from metalab import distributed

__all__ = ["EvaluationStopped", "StopRequests", "StoppedAtOnce"]


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop now, the last checkpoint stands. ``signum`` is the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class EvaluationStopped(Exception):
    """An evaluation cut short by a stop request (it is redone on resume)."""


class StopRequests:
    """The stop signal this run received, if any, and its handler (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._chained: tuple[int, ...] = ()  # signals whose earlier handler runs after the results are written
        self._interruptible = False  # True while evaluating: a signal then cuts the evaluation short

    @contextmanager
    def handled(self) -> Iterator[None]:
        """Handle SIGTERM, SIGINT and (when something handles it already) SIGUSR2 inside the block,
        and give them back their earlier handlers after it."""
        self._chained = (signal.SIGUSR2,) if callable(signal.getsignal(signal.SIGUSR2)) else ()
        previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGTERM, signal.SIGINT, *self._chained)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def request(self, signum: int, frame: Any = None) -> None:
        """The signal handler: note the request; a second one raises StoppedAtOnce, and one during an
        evaluation in a single process raises EvaluationStopped."""
        if self.signum is not None:  # a second Ctrl-C stops at once; the last checkpoint stands
            raise StoppedAtOnce(signum)
        self.signum = signum
        if self._interruptible and not distributed.active():  # several processes stop together, between batches
            raise EvaluationStopped

    def stopping(self) -> bool:
        """Whether to stop now: a signal reached this process or, under several processes, any of
        them (decided together, at the same point of every rank)."""
        agreed = distributed.stop_requested(self.signum)
        if agreed is not None and self.signum is None:  # another rank's signal
            self.signum = agreed
        return agreed is not None

    def check(self) -> None:
        """Raise EvaluationStopped when stopping: called before each evaluation batch."""
        if self.stopping():
            raise EvaluationStopped

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """An evaluation: inside the block a signal stops it at once."""
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def name(self) -> str | None:
        """The name of the signal received ("SIGTERM"), or None."""
        return signal.Signals(self.signum).name if self.signum else None

    def pass_on(self) -> None:
        """Raise the signal again when its earlier handler chains (submitit requeues the job, and it
        resumes from the checkpoint); call it after the handlers are given back and the results written."""
        if self.signum in self._chained:
            signal.raise_signal(self.signum)
