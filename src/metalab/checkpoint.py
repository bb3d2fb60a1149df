"""Atomic checkpoints and the random-number state needed for an exact resume."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalab.errors import ConfigError, require

__all__ = [
    "BEST",
    "CHECKPOINT",
    "METRICS",
    "RESULTS",
    "has_checkpoint",
    "load_checkpoint",
    "nonfinite_entries",
    "read_run",
    "remove_orphan_temporaries",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]


#: The files of a run directory: last state (for resume), best-on-validation state, results, metric records.
CHECKPOINT, BEST, RESULTS, METRICS = "checkpoint.pt", "best.pt", "results.json", "metrics.jsonl"
_TMP_SUFFIX = ".tmp"  # a temporary checkpoint is named .<name>.<random>.tmp until it is renamed


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed to
    disk, then renamed over the old one, so a crash leaves either the old or the new checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; a missing or corrupt file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}: check the run directory, or start without resume.")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ConfigError(
            f"the checkpoint {path} is corrupt or not a metalab checkpoint ({error}); "
            "delete it to start over, or point resume at another run."
        ) from None


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint.pt: a run that saved its state at least once."""
    return (Path(run_dir) / CHECKPOINT).is_file()


def read_run(run_dir: str | Path, remedy: str, checkpoint: str = "last") -> tuple[dict[str, Any], dict[str, Any]]:
    """(the state in checkpoint.pt, the state ``checkpoint`` names) of a run directory: "last" is
    checkpoint.pt itself, "best" is best.pt (the run's best on validation) where the run kept one and
    checkpoint.pt otherwise. Each file is read once. A directory without checkpoint.pt is refused in
    the one sentence "<run_dir> holds no checkpoint.pt: <remedy>."; a corrupt file as
    ``load_checkpoint`` says."""
    run_dir = Path(run_dir)
    require(checkpoint in ("best", "last"), f"checkpoint must be best or last (got {checkpoint!r}).")
    require(has_checkpoint(run_dir), f"{run_dir} holds no {CHECKPOINT}: {remedy}.")
    last = load_checkpoint(run_dir / CHECKPOINT)
    return last, (load_checkpoint(run_dir / BEST) if checkpoint == "best" and (run_dir / BEST).is_file() else last)


def remove_orphan_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed before their rename left in ``folder``
    (.<name>.pt.<random>.tmp); returns them. Call it only while no other process writes there."""
    orphans = sorted(Path(folder).glob(f".*.pt.*{_TMP_SUFFIX}"))
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return orphans


def nonfinite_entries(state: Any, prefix: str = "") -> list[str]:
    """The names (dotted paths) of the floating-point tensors in a nested dict/list ``state``
    that hold a NaN or an infinity: a checkpoint with any of them must not be written."""
    if isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [
        name for key, value in items for name in nonfinite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    ]


def rng_state() -> dict[str, Any]:
    """The global RNG states of python, numpy, torch and (when present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
