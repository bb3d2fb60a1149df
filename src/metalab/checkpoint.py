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
    "state_file",
    "state_mismatch",
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


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    remedy: str = "delete it to start over, or point resume at another run",
) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; a missing or corrupt file is a ConfigError
    ending in ``remedy`` (what to do; by default, about resuming)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}: check the run directory, or start without resume.")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises several types for truncated or foreign files
        detail = " ".join(str(error).split())
        raise ConfigError(
            f"the checkpoint {path} is corrupt or not a metalab checkpoint ({detail}); {remedy}."
        ) from None


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint.pt: a run that saved its state at least once."""
    return (Path(run_dir) / CHECKPOINT).is_file()


def read_run(
    run_dir: str | Path, remedy: str, checkpoint: str = "last", algorithm: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the state in checkpoint.pt, the state ``checkpoint`` names) of a run directory: "last" is
    checkpoint.pt itself, "best" is best.pt (the run's best on validation) where the run kept one and
    checkpoint.pt otherwise. Each file is read once. The one reader of trained runs: it checks that
    ``run_dir`` is a path (TypeError) to a directory holding checkpoint.pt ("<run_dir> holds no
    checkpoint.pt: <remedy>."), that each file is a torch file (as ``load_checkpoint`` says), a dict
    holding the run's config and an ``algorithm`` state with ``meta_parameters``, that this state holds
    only finite values (the entries named), and, given ``algorithm`` (a class name such as
    "LSTMOptimizer"), that the config's ``algo._target_`` is that class; every refusal is a ConfigError
    of one sentence ending in ``remedy``. ``state_mismatch`` then checks the state against the objects
    it will be loaded into."""
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(
            f"run_dir must be a path (str or pathlib.Path) to a run directory, not {type(run_dir).__name__}."
        )
    run_dir = Path(run_dir).expanduser()
    require(checkpoint in ("best", "last"), f"checkpoint must be best or last (got {checkpoint!r}).")
    require(not run_dir.is_file(), f"{run_dir} is a file, not a run directory: {remedy}.")
    require(has_checkpoint(run_dir), f"{run_dir} holds no {CHECKPOINT}: {remedy}.")
    last = _read_state(run_dir / CHECKPOINT, remedy, config=True)
    if algorithm is not None:
        target = str(last["config"]["algo"].get("_target_") or "an unknown algorithm")
        require(
            target.rsplit(".", 1)[-1] == algorithm, f"{run_dir} is a run of {target}, not of {algorithm}: {remedy}."
        )
    chosen = state_file(run_dir, checkpoint)
    return last, (_read_state(chosen, remedy) if chosen.name == BEST else last)


def state_file(run_dir: str | Path, checkpoint: str) -> Path:
    """The file of ``run_dir`` that ``checkpoint`` names: best.pt for "best" where the run kept one,
    checkpoint.pt otherwise."""
    best = Path(run_dir).expanduser() / BEST
    return best if checkpoint == "best" and best.is_file() else best.with_name(CHECKPOINT)


def _read_state(path: Path, remedy: str, config: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path``, refused unless it is a dict with an ``algorithm`` state holding a dict of
    ``meta_parameters`` (and, with ``config``, the run's config with its ``algo``), all finite."""
    state = load_checkpoint(path, remedy=remedy)
    problem = _not_a_run_state(state, config)
    require(problem is None, f"{path} is not a metalab checkpoint ({problem}): {remedy}.")
    bad = nonfinite_entries(state["algorithm"])
    require(
        not bad,
        f"{path} holds NaN or infinite values (in {', '.join(bad[:3])}{' and others' if len(bad) > 3 else ''}), "
        f"which no trained run writes: {remedy}.",
    )
    return state


def _not_a_run_state(state: Any, config: bool) -> str | None:
    """What keeps ``state`` from being a run's checkpoint, in words, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    algorithm = state.get("algorithm")
    if not (isinstance(algorithm, dict) and isinstance(algorithm.get("meta_parameters"), dict)):
        return "it holds no algorithm state with meta_parameters"
    if config and not (isinstance(state.get("config"), dict) and isinstance(state["config"].get("algo"), dict)):
        return "it holds no run config with an algo section"
    return None


def state_mismatch(held: dict[str, Any], expected: dict[str, Any], where: str = "") -> str | None:
    """None when the state ``held`` (a file's) fits ``expected`` (the state_dict of the object it is for):
    the same keys, and tensors of the same shapes, recursively through nested dicts (an optimizer's
    ``state`` and ``param_groups``, filled as it steps, are left to its own load_state_dict);
    otherwise the first difference, in words ("meta_parameters holds a, b where c, d are expected")."""
    if set(held) != set(expected):
        verb = "is" if len(expected) == 1 else "are"
        return f"{where or 'the state'} holds {_names(held)} where {_names(expected)} {verb} expected"
    for key, value in expected.items():
        other, name = held[key], f"{where}.{key}" if where else str(key)
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and value.shape != other.shape:
            return f"{name} has shape {list(other.shape)} where {list(value.shape)} is expected"
        if isinstance(value, dict) and isinstance(other, dict) and key not in ("state", "param_groups"):
            inner = state_mismatch(other, value, name)
            if inner is not None:
                return inner
    return None


def _names(state: dict[str, Any]) -> str:
    names = sorted(map(str, state))
    if not names:
        return "nothing"
    more = len(names) - 3
    return ", ".join(names[:3]) + (f" and {more} other{'s' if more > 1 else ''}" if more > 0 else "")


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
