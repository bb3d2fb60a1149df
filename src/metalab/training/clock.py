"""Training time over the segments of a run: a resumed run adds its seconds to those before; and the
wall-clock budget ``trainer.max_time`` it is measured against."""

from __future__ import annotations

import re
import time

from metalab.errors import require

__all__ = ["TrainingClock", "parse_duration"]

_DURATION = re.compile(r"(?:(\d+):)?(\d+):(\d+):(\d+)")


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


def parse_duration(value: float | str | None, key: str = "trainer.max_time") -> float | None:
    """Seconds of a duration given as a number of seconds or as Lightning's "DD:HH:MM:SS" string
    (also "HH:MM:SS"); None stays None (no budget). Anything else, or a duration that is not positive,
    is refused in one sentence naming ``key``."""
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        days, hours, minutes, secs = (int(part or 0) for part in match.groups())
        seconds = float(((days * 24 + hours) * 60 + minutes) * 60 + secs)
    require(
        seconds is not None and 0 < seconds < float("inf"),
        f"{key}={value!r} is not a positive duration: give seconds (e.g. {key}=3600) or DD:HH:MM:SS or "
        f"HH:MM:SS (e.g. {key}=00:12:00:00 for 12 hours), or null for no limit.",
    )
    return seconds
