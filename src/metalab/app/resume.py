"""Continuing a run safely: which run directory ``resume`` means, which config changes a resumed
run accepts, and the lock that keeps one process per run directory.

    python train.py seed=3 resume=true                          # the newest run of this command
    python train.py seed=3 resume=outputs/runs/<date>/<time>_seed=3   # a named one, pasted as is
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from metalab.checkpoint import CHECKPOINT, METRICS, RESULTS, has_checkpoint, load_checkpoint, remove_orphan_temporaries
from metalab.errors import ConfigError, require

__all__ = [
    "ALLOWED_CHANGES",
    "LOCK",
    "changed_keys",
    "check_resume_config",
    "find_resume_dir",
    "finished_results",
    "hold_run_dir",
    "overrides_without_resume",
    "quote_resume_override",
]

LOCK = ".lock"

#: Config keys (and key prefixes) a resumed run may change: they decide how long to train, how to
#: evaluate, log and show progress, how often to checkpoint, where to run, how to execute the step
#: (trainer.autotune) and where caches live, never what is trained. Every other key defines the run,
#: eval_seed included (best.pt was chosen on its validation episodes).
ALLOWED_CHANGES = (
    "resume",
    "paper",
    "logger",
    "trainer.iterations",
    "trainer.max_time",
    "trainer.eval_every",
    "trainer.eval_tasks",
    "trainer.test_tasks",
    "trainer.eval_batch_size",
    "trainer.test_checkpoint",
    "trainer.checkpoint_every",
    "trainer.log_every",
    "trainer.progress",
    "trainer.device",
    "trainer.autotune",
    "tasks.cache_dir",
    "tasks.on_device",
    "tasks.download",
    "algo.report_steps",
)
_SKIPPED_WHEN_FINISHED = ("resume", "trainer.progress")  # changes that do not call for re-evaluating a finished run


def overrides_without_resume(overrides: list[str]) -> list[str]:
    """The command-line overrides that define a command, sorted: ``resume=...`` and the settings a
    resume may change (``ALLOWED_CHANGES``) left out, so that ``resume=true trainer.iterations=N``
    finds the run of the command without them."""
    return sorted(o for o in overrides if not _allowed(o.lstrip("+~").partition("=")[0]))


def _is_resume(override: str) -> bool:
    return override.lstrip("+~").startswith("resume=")


def quote_resume_override(args: list[str]) -> list[str]:
    """Command-line arguments with a ``resume=<run dir>`` value quoted for Hydra when it holds
    characters Hydra's override grammar reserves (run directory names hold ``=`` and ``,``), so
    the directory name can be pasted as it is. Already quoted values and true/false are kept."""
    quoted = []
    for arg in args:
        key, _, value = arg.partition("=")
        if _is_resume(arg) and value and value[0] not in "'\"" and value.lower() not in ("true", "false", "null"):
            if any(not (c.isalnum() or c in "_./-~") for c in value):
                quote = "'" if "'" not in value else '"'
                arg = f"{key}={quote}{value}{quote}"
        quoted.append(arg)
    return quoted


def find_resume_dir(resume: Any, outputs: Path, overrides: list[str], output_dir: Path | None = None) -> Path | None:
    """The run directory to continue: ``resume`` itself when it is a directory; for ``resume=true``
    ``output_dir`` (this command's own run directory) when it holds a checkpoint (a fixed
    ``hydra.run.dir``), else the run under ``outputs`` active last with the same defining overrides
    (directories that only record an earlier resume are skipped). When that run wrote no checkpoint
    (it stopped before its first one), this refuses rather than fall back on an older run of the command."""
    if resume is False or resume is None:
        return None
    if resume is True and output_dir is not None and has_checkpoint(output_dir):
        return output_dir
    if resume is not True:
        run_dir = Path(str(resume)).expanduser()  # its checkpoint is read once the directory is held
        require(
            run_dir.is_dir(),
            f"resume={resume} is not a directory: pass the run directory of an earlier run "
            f"(it holds .hydra/ and {CHECKPOINT}), or resume=true.",
        )
        return run_dir
    wanted = overrides_without_resume(overrides)
    runs = []
    for saved in outputs.glob("**/.hydra/overrides.yaml"):
        started_with = yaml.safe_load(saved.read_text()) or []
        if not any(_is_resume(o) for o in started_with) and overrides_without_resume(started_with) == wanted:
            runs.append(saved.parent.parent)
    require(
        bool(runs),
        f"resume=true found no earlier run of this command with a {CHECKPOINT} under {outputs}: "
        "pass resume=<run directory> instead.",
    )
    with_checkpoint = [d for d in runs if has_checkpoint(d)]
    newest = max(runs, key=_last_activity)
    if not has_checkpoint(newest):
        older = max(with_checkpoint, key=_last_activity) if with_checkpoint else None
        raise ConfigError(
            f"the newest run of this command, {newest}, wrote no {CHECKPOINT} (it stopped before its first "
            "checkpoint, or is still starting): run the command without resume to start over"
            + (f", or pass resume={older} to continue the older run." if older else ".")
        )
    return newest


def _last_activity(run_dir: Path) -> float:
    """When a run last wrote: its checkpoint, metrics or, at the start, Hydra's record of it."""
    files = [run_dir / CHECKPOINT, run_dir / METRICS, run_dir / ".hydra" / "overrides.yaml"]
    return max(f.stat().st_mtime for f in files if f.is_file())


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict) and config:
        return {
            k: v
            for key, value in config.items()
            for k, v in _flatten(value, f"{prefix}.{key}" if prefix else str(key)).items()
        }
    return {prefix: config}


def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, current value)} for every leaf that differs between two configs
    (a key missing on one side shows as ``<absent>``). A key missing on one side and null on the
    other is no change: an option a later metalab added, at its "off" default, changes no run."""
    old, new = _flatten(saved), _flatten(current)
    pairs = {key: (old.get(key, "<absent>"), new.get(key, "<absent>")) for key in sorted(old.keys() | new.keys())}
    return {key: (a, b) for key, (a, b) in pairs.items() if a != b and {a, b} != {"<absent>", None}}


def _allowed(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in ALLOWED_CHANGES)


_LISTED = 8  # differing keys named in the refusal; the rest are counted


def _original_command(run_dir: Path | str) -> str:
    """ ", or continue it with its own command: python train.py <its overrides> resume=<run_dir>" when
    Hydra's record of the run's overrides is there (a pasted resume=<dir> alone composes the defaults)."""
    saved = Path(run_dir) / ".hydra" / "overrides.yaml"
    try:
        overrides = [o for o in yaml.safe_load(saved.read_text()) or [] if not o.lstrip("+~").startswith("resume=")]
    except (OSError, yaml.YAMLError):
        return ""
    command = " ".join(shlex.quote(o) for o in [*overrides, f"resume={run_dir}"])
    return f", or continue it with its own command: python train.py {command}"


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], iteration: int, run_dir: Path | str) -> None:
    """Refuse (ConfigError, one sentence naming the keys) to continue the run saved in ``run_dir``
    at ``iteration`` with ``current`` when a key that defines the run differs from ``saved``, or
    when trainer.iterations is below the iterations already done. Nothing is compared when either
    config is empty (a checkpoint without its config, a Trainer made without one)."""
    if not saved or not current:
        return
    refused = {key: values for key, values in changed_keys(saved, current).items() if not _allowed(key)}
    if refused:
        shown = list(refused.items())[:_LISTED]
        listed = ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in shown)
        if len(refused) > _LISTED:
            listed += f" and {len(refused) - _LISTED} more keys"
        raise ConfigError(
            f"resume refuses to change what defines the run in {run_dir}: {listed} differ from its "
            "saved config; only trainer.iterations and the evaluation, logging, progress, "
            "checkpoint-frequency and device settings may change, so drop those overrides "
            f"or start a new run without resume{_original_command(run_dir)}."
        )
    iterations = _flatten(current).get("trainer.iterations")
    require(
        not isinstance(iterations, int) or iterations >= iteration,
        f"trainer.iterations={iterations} is below the {iteration} iterations the run in {run_dir} has done: "
        f"pass trainer.iterations>={iteration}, or start a new run without resume.",
    )


def resume_state(run_dir: Path, current: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint.pt of ``run_dir``, read once, for ``Trainer.fit(state)``: refused in one
    sentence when absent or when ``current`` changes what defines the run (``check_resume_config``)."""
    require(
        has_checkpoint(run_dir),
        f"resume={run_dir} has no {CHECKPOINT} (the run stopped before its first "
        "checkpoint): start it again without resume.",
    )
    state = load_checkpoint(run_dir / CHECKPOINT)
    check_resume_config(state.get("config") or {}, current, state["iteration"], run_dir)
    return state


def finished_results(run_dir: Path, current: dict[str, Any]) -> dict[str, Any] | None:
    """The saved results of a run that finished (trained and tested) with a config that differs
    from ``current`` at most in progress display; None when there is something left to do."""
    path = run_dir / RESULTS
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except ValueError:
        return None
    if results.get("status") not in ("completed", "nonfinite_evaluation"):
        return None
    changes = changed_keys(results.get("config") or {}, current)
    return None if any(key not in _SKIPPED_WHEN_FINISHED for key in changes) else results


@contextmanager
def hold_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir`` for this process: an exclusive flock on ``run_dir/.lock`` (the kernel
    releases it when the process ends, even by kill -9, so a dead run never blocks a resume).
    A directory another live process holds is refused in one sentence. While held, temporary
    checkpoint files left by killed writes are deleted."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = (run_dir / LOCK).open("a+")
    except OSError as error:
        raise ConfigError(
            f"cannot write to the run directory {run_dir} ({error.strerror}): "
            "choose a writable place, e.g. hydra.run.dir=<folder>."
        ) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ConfigError(
                f"the run directory {run_dir} is in use by another live run (process {holder}): "
                "wait for it to finish or stop it first; a new run needs no resume."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        remove_orphan_temporaries(run_dir)
        yield run_dir
    finally:
        handle.close()  # releases the lock
