"""The command line: Hydra composes the config, ``build`` turns it into objects, the trainer runs.

python train.py algo=maml solver=first_order tasks=sinusoid tasks.shots=5 seed=3
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from metalab import distributed
from metalab.app.allocator import reuse_freed_memory
from metalab.app.build import CONFIG_DIR, config_catalog, resolve_device, trainer_of
from metalab.app.paths import runs_root
from metalab.app.record import write_record
from metalab.app.resume import find_resume_dir, finished_results, hold_run_dir, quote_resume_override, resume_state
from metalab.app.schema import validate_config
from metalab.checkpoint import CHECKPOINT, has_checkpoint
from metalab.errors import ConfigError, MetalabError, MetalabWarning, RunDirUnwritable, require
from metalab.training.evaluation import metric_lines

__all__ = ["CONFIG_DIR", "main", "run"]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg``, train, test, print the outcome; return the results. The run
    directory is held (one process per run directory) from before anything is built until the end.
    Under torchrun (or several SLURM tasks) every process joins the group first; rank 0 chooses
    the run directory, holds it and prints, and a refusal on any process stops all of them."""
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)  # made by Hydra, empty: metalab writes .hydra/ itself
    try:
        return _run(cfg, hydra_cfg, output_dir)
    finally:
        _discard_if_empty(output_dir)  # a refused command, or a resume that continued another directory


def _run(cfg: DictConfig, hydra_cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    reuse_freed_memory()
    validate_config(cfg)  # the one check of the config, before anything is built
    distributed.init(resolve_device(cfg.trainer.device))
    distributed.agree(lambda: _check_processes(cfg))
    config = OmegaConf.to_container(cfg, resolve=True)
    main = distributed.is_main()
    with ExitStack() as held:

        def prepare() -> tuple[Path, dict[str, Any] | None, dict[str, Any] | None]:
            outputs = runs_root(hydra_cfg, hydra.utils.get_original_cwd())  # where Hydra puts this command's runs
            overrides = list(hydra_cfg.overrides.task)
            resume_dir = find_resume_dir(cfg.resume, outputs, overrides, output_dir) or requeued(output_dir)
            run_dir = resume_dir or output_dir
            held.enter_context(hold_run_dir(run_dir))
            if not resume_dir:
                require(
                    not has_checkpoint(run_dir),
                    f"{run_dir} already holds a run ({CHECKPOINT}): continue it with the same command plus "
                    "resume=true, or choose another hydra.run.dir.",
                )
                write_record(run_dir, cfg)  # Hydra's record of this run, once the directory is held
                return run_dir, None, None
            return run_dir, resume_state(run_dir, config), finished_results(run_dir, config)

        run_dir, state, finished = distributed.from_main(prepare)  # rank 0 decides, for every rank
        if finished:
            if main:
                print(
                    f"metalab: {run_dir} already finished at iteration {finished['iteration']}: nothing to do "
                    f"(raise trainer.{'max_time' if finished.get('stopped_by') == 'max_time' else 'iterations'} "
                    "to train longer); its results:"
                )
                print_results(finished)
            return finished
        trainer = distributed.agree(lambda: trainer_of(cfg, run_dir))
        tasks, algorithm = trainer.tasks, trainer.algorithm
        if main:
            print(
                f"metalab: algo={algorithm.name} solver={algorithm.solver.name} tasks={type(tasks).__name__} "
                f"device={tasks.device}"
                + (f" norm={algorithm.model.norm}" if hasattr(algorithm.model, "norm") else "")
                + (f" processes={distributed.world_size()}" if distributed.active() else "")
                + f" run_dir={run_dir}"
                + (" (resumed)" if state is not None else "")
            )
        with _writes_to(run_dir):
            results = trainer.fit(state)
    if main:
        print_results(results)
    return results


@contextmanager
def _writes_to(run_dir: Path) -> Iterator[None]:
    """A full or read-only disk while the run writes ``run_dir`` (checkpoints are atomic: the last one
    stands) as one sentence: RunDirUnwritable."""
    try:
        yield
    except OSError as error:
        if error.errno not in _DISK_ERRORS:
            raise
        raise RunDirUnwritable(
            f"cannot write to the run directory {run_dir} ({error.strerror}); its last checkpoint stands: "
            "free space there (or make it writable), then continue with the same command plus resume=true."
        ) from None


_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def _discard_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()  # only ever removes an empty folder
    except OSError:
        pass


def _check_processes(cfg: DictConfig) -> None:
    """Under several processes: its algorithm supports them and its meta-batch splits evenly over
    them (checked before anything is built)."""
    if distributed.active():
        distributed.check_supported(
            get_class(cfg.algo._target_), cfg.trainer.meta_batch_size, config_catalog().parallel()
        )


def requeued(run_dir: Path) -> Path | None:
    """``run_dir`` when SLURM requeued this job (SLURM_RESTART_COUNT > 0, after a preemption or a
    timeout) and its earlier attempt left a checkpoint there: the job then continues it."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return run_dir if restarts.isdigit() and int(restarts) > 0 and has_checkpoint(run_dir) else None


def print_results(results: dict[str, Any]) -> None:
    """The end of a run on the console: how it ended, which checkpoint was tested, one line per metric."""
    if results["status"] == "interrupted":
        print(
            f"stopped by {results['stopped_by']} at iteration {results['iteration']}, which checkpoint.pt holds: "
            "continue with the same command plus resume=true (or resume=<run dir>)"
        )
    elif results.get("stopped_by") == "max_time":
        print(
            f"trainer.max_time was spent after {results['train_seconds']:.0f} s of training: stopped at iteration "
            f"{results['iteration']} (continue with resume=true and a larger trainer.max_time)"
        )
    if results.get("tested_iteration") is not None and results["test"] and results["status"] != "interrupted":
        which = (
            "the best validation checkpoint (best.pt)"
            if results.get("tested_checkpoint") == "best"
            else "the last checkpoint"
        )
        print(f"tested {which}: iteration {results['tested_iteration']} of {results['iteration']}")
    for split in ("val", "test"):
        table = {
            key: (value["mean"] if value["mean"] is not None else float("nan"), value["ci95"] or 0.0)
            for key, value in results[split].items()
        }
        for line in metric_lines(split, table, results.get(f"{split}_tasks") or 0, results.get("units", "tasks")):
            print(line)
    if results["status"] == "nonfinite_evaluation":
        print(
            f"warning: {', '.join(results['nonfinite'])} came out NaN or infinite although training stayed finite "
            "(results.json holds null there): fewer algo.eval_inner_steps or a lower algo.inner_lr may avoid it"
        )


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        results = run(cfg)
    except MetalabError as error:
        if distributed.is_main() or not isinstance(error, ConfigError):  # every rank refuses alike: say it once
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    except KeyboardInterrupt as error:  # before training started, or a second signal: stop at once
        signum = getattr(error, "signum", signal.SIGINT)
        print(f"stopped at once by {signal.Signals(signum).name}; the last checkpoint stands", file=sys.stderr)
        sys.exit(128 + signum)
    if results["status"] == "interrupted":  # schedulers must see that the run did not finish
        sys.exit(128 + signal.Signals[results["stopped_by"]].value)
    headline = results["val"].get(results["metric"]) or results["test"].get(results["metric"])
    return headline["mean"] if headline and headline["mean"] is not None else float("nan")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """metalab's own warnings as one line on stderr; any other as Python prints it."""
    if issubclass(category, MetalabWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main() -> float:
    """The command line (train.py, `metalab`, `python -m metalab`): returns the final validation
    metric, for sweepers. A pasted ``resume=<run dir>`` is quoted for Hydra first (run directory
    names hold ``=`` and ``,``); a run stopped by SIGINT/SIGTERM exits with 130/143."""
    sys.argv[1:] = quote_resume_override(sys.argv[1:]) + distributed.hydra_overrides()
    # configs/hydra/launcher/submitit_slurm.yaml is the plugin's config with metalab's defaults, all keys
    # written out; Hydra 1.3 still checks it against the plugin's schema of that name, and warns so
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")
    warnings.showwarning = _show_warning
    try:
        return _hydra_main()
    finally:
        distributed.destroy()  # a process group left to the interpreter's exit may abort it
