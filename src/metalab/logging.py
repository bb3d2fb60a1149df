"""Metric sinks: a JSONL file in the run directory (always), and optionally wandb."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from metalab.errors import ConfigError, require

__all__ = ["MetricSink", "JsonlSink", "WandbSink", "truncate_jsonl"]


class MetricSink(Protocol):
    def log(self, record: dict[str, Any], step: int) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per record to ``path`` (metrics.jsonl), flushed at once so that a
    crash loses nothing already logged."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a")

    def log(self, record: dict[str, Any], step: int) -> None:
        self._handle.write(json.dumps({"iteration": step, **record}) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def truncate_jsonl(path: str | Path, last_iteration: int) -> None:
    """Drop records logged after ``last_iteration`` (they are redone after a resume)."""
    path = Path(path)
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("iteration", 0) <= last_iteration]
        path.write_text("".join(line + "\n" for line in kept))


class WandbSink:
    """Weights & Biases. mode="offline" (default) writes under the run directory and never touches
    the network; "online" needs a login (``wandb login`` or WANDB_API_KEY); "disabled" is a no-op."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any], project: str = "metalab",
                 mode: str = "offline", entity: str | None = None, name: str | None = None,
                 tags: list[str] | None = None, run_id: str | None = None):
        require(mode in ("online", "offline", "disabled"),
                f"logger.mode must be online, offline or disabled (got {mode!r}).")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # deferred: importing wandb is slow and only this sink needs it

        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
            raise ConfigError("logger.mode=online needs a wandb login: run `wandb login` or set WANDB_API_KEY, "
                              "or use logger.mode=offline and `wandb sync` later.")
        self._run = wandb.init(project=project, entity=entity, name=name, tags=tags, mode=mode,
                               dir=str(run_dir), config=config, id=run_id, resume="allow",
                               settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True))

    def log(self, record: dict[str, Any], step: int) -> None:
        self._run.log(record, step=step)

    def close(self) -> None:
        self._run.finish()
