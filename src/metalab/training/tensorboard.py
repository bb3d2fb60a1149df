"""TensorBoard: every metric record of a run as scalars in ``<run_dir>/tensorboard/``, so that
``tensorboard --logdir outputs`` shows every run, live. Resume-safe: the trainer calls ``resume``
with the checkpoint's iteration, and the writer then purges the later steps an interrupted process
had written (``SummaryWriter(purge_step=...)``), so no step is shown twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from metalab.errors import ConfigError

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """Scalars under their metalab names (``train/loss``, ``val/acc``, ...) at the iteration as the step;
    the composed config as text at the start of a new run. ``flush_secs``: how often the event file is
    written (the last records are flushed at ``close``)."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any], subdir: str = "tensorboard", flush_secs: int = 10):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "logger=tensorboard needs the tensorboard package: pip install tensorboard, or choose another logger."
            ) from None
        self.log_dir = Path(run_dir) / subdir
        self._make = lambda purge_step: SummaryWriter(str(self.log_dir), purge_step=purge_step, flush_secs=flush_secs)
        self._config, self._purge_step, self._writer = config, None, None

    def resume(self, iteration: int) -> None:
        """The run continues from its checkpoint at ``iteration``: steps after it are written anew."""
        self._purge_step = iteration + 1

    def log(self, record: dict[str, Any], step: int) -> None:
        if self._writer is None:  # the first record: after resume() when the run continues
            self._writer = self._make(self._purge_step)
            if self._purge_step is None and self._config:
                self._writer.add_text("config", "```\n" + OmegaConf.to_yaml(self._config) + "```", 0)
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "iteration":
                self._writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
