"""Metric sinks: a JSONL file in the run directory (always), and optionally wandb."""

from __future__ import annotations

import json
import math
import os
import shlex
import warnings
from pathlib import Path
from typing import Any, Literal, Protocol

from metalab.errors import ConfigError, require
from metalab.training.records import complete_lines

__all__ = [
    "MetricSink",
    "JsonlSink",
    "WandbSink",
    "count_jsonl_rows",
    "finite_or_null",
    "strict_json",
    "truncate_jsonl",
]


class MetricSink(Protocol):
    def log(self, record: dict[str, Any], step: int) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per record to ``path`` (metrics.jsonl), flushed at once so that a
    crash loses nothing already logged. Strict JSON: a NaN or infinity is written as null.
    ``rows`` counts the complete records in the file (a checkpoint stores it, see ``truncate_jsonl``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows = count_jsonl_rows(self.path)
        self._handle: Any = None  # opened at the first record, after any truncation on resume

    def log(self, record: dict[str, Any], step: int) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a")
        self._handle.write(strict_json({"iteration": step, **record}) + "\n")
        self._handle.flush()
        self.rows += 1

    def truncate(self, rows: int | None, last_iteration: int) -> None:
        """Keep the first ``rows`` records (those written before the checkpoint being resumed);
        without a count (an older checkpoint), those logged at or before ``last_iteration``."""
        self.close()
        self.rows = truncate_jsonl(self.path, rows, last_iteration)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """json.dumps that writes NaN and infinities as null, so any JSON reader accepts the text."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)


def count_jsonl_rows(path: str | Path) -> int:
    return len(complete_lines(Path(path)))


def truncate_jsonl(path: str | Path, rows: int | None, last_iteration: int = 0) -> int:
    """Cut ``path`` back to its first ``rows`` complete records (those a checkpoint counted; the
    later ones are redone after a resume); ``rows=None`` keeps the records logged at or before
    ``last_iteration``. A partial last line is dropped either way. Returns the records kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = complete_lines(path)
    if rows is None:
        lines = [line for line in lines if (iteration := _iteration(line)) is not None and iteration <= last_iteration]
    kept = lines[:rows] if rows is not None else lines
    path.write_text("".join(line + "\n" for line in kept))
    return len(kept)


def _iteration(line: str) -> int | None:
    try:
        return json.loads(line).get("iteration", 0)
    except (ValueError, AttributeError):
        return None


class WandbSink:
    """Weights & Biases. mode="offline" (default) writes under the run directory and never touches
    the network; "online" needs a login (``wandb login`` or WANDB_API_KEY); "disabled" is a no-op.
    wandb itself stays quiet (no banners, no deprecation warnings); at the end one line says where
    an offline run's files are and the ``wandb sync`` command that uploads them (online: the URL)."""

    def __init__(
        self,
        run_dir: str | Path,
        config: dict[str, Any],
        project: str = "metalab",
        mode: Literal["online", "offline", "disabled"] = "offline",
        entity: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        run_id: str | None = None,
    ):
        require(
            mode in ("online", "offline", "disabled"),
            f"logger.wandb.mode must be online, offline or disabled (got {mode!r}).",
        )
        os.environ.setdefault("WANDB_SILENT", "true")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            import wandb  # deferred: importing wandb is slow and only this sink needs it

            if mode == "online" and not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
                raise ConfigError(
                    "logger.wandb.mode=online needs a wandb login: run `wandb login` or set WANDB_API_KEY, "
                    "or use logger.wandb.mode=offline and `wandb sync` later."
                )
            self._run = wandb.init(
                project=project,
                entity=entity,
                name=name,
                tags=tags,
                mode=mode,
                dir=str(run_dir),
                config=config,
                id=run_id,
                resume="allow",
                settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True),
            )
        self.mode = mode

    def log(self, record: dict[str, Any], step: int) -> None:
        self._run.log(record, step=step)

    def where(self) -> str | None:
        """The line that tells the user where this run's wandb data is (None when disabled)."""
        if self.mode == "offline":
            sync_dir = str(Path(self._run.dir).parent)  # .../wandb/offline-run-<time>-<id>
            return f"wandb: offline run saved in {sync_dir}; upload it with: wandb sync {shlex.quote(sync_dir)}"
        if self.mode == "online" and self._run.url:
            return f"wandb: run at {self._run.url}"
        return None

    def close(self) -> None:
        line = self.where()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self._run.finish()
        if line:
            print(line, flush=True)
