"""Training time over the segments of a run: a resumed run adds its seconds to those before."""

from __future__ import annotations

import time

__all__ = ["TrainingClock"]


class TrainingClock:
    """Seconds spent in the training loop: ``earlier`` seconds of earlier segments (from the
    checkpoint), plus this segment's while it runs (between ``start`` and ``stop``)."""

    def __init__(self, earlier: float = 0.0):
        self._earlier = earlier
        self._start: float | None = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        self._earlier, self._start = self.seconds(), None

    def seconds(self) -> float:
        running = time.perf_counter() - self._start if self._start is not None else 0.0
        return self._earlier + running
