"""The command line: Hydra composes the config, ``build`` turns it into objects, the trainer runs.

    python train.py algo=maml solver=first_order tasks=sinusoid tasks.shots=5 seed=3
"""
from __future__ import annotations

import os
import random
import signal
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from metalab import distributed
from metalab.algorithms.base import Algorithm
from metalab.allocator import reuse_freed_memory
from metalab.errors import ConfigError, MetalabError, require
from metalab.memory import check_memory, episode_batches
from metalab.paths import check_writable, runs_root
from metalab.schema import validate_config
from metalab.tasks.base import TaskSampler
from metalab.tasks.spec import TaskSpec
from metalab.checkpoint import CHECKPOINT, load_checkpoint
from metalab.evaluation import metric_lines
from metalab.resume import check_resume_config, find_resume_dir, finished_results, hold_run_dir, quote_resume_override
from metalab.trainer import Trainer

__all__ = ["CONFIG_DIR", "build", "main", "make_trainer", "resolve_device", "run"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped inside the package
# trainer config keys consumed by build(), not by Trainer
_BUILD_KEYS = ("device", "meta_optimizer", "grad_clip_norm", "grad_clip_value")


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """"auto" -> cuda when available, else cpu; otherwise cpu, cuda, cuda:<index> or mps, refused in
    one sentence (naming ``key``) when it is not a device or this machine does not have it. Under
    several processes, cuda is the GPU of the process's local rank."""
    options = "use auto, cpu, cuda, cuda:<index> or mps"
    require(isinstance(name, str), f"{key} must be a device name (got {name!r}): {options}.")
    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}={name} is not a device: {options}.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        require(count > 0, f"{key}={name} but no CUDA device is visible: use {key}=auto or cpu.")
        require(device.index is None or device.index < count,
                f"{key}={name} but this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}: pick one of them.")
    elif device.type == "mps":
        require(torch.backends.mps.is_available(), f"{key}=mps but this torch sees no Apple GPU (MPS): use {key}=auto or cpu.")
    else:
        require(device.type == "cpu", f"{key}={name} is not supported: {options}.")
    return distributed.local_device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with our one-sentence errors unwrapped and Hydra's made into one."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, MetalabError):
            raise error.__cause__ from None
        raise ConfigError(f"{error.__cause__ or error}: check that config's keys and _target_.".replace("\n", " ")) from None


def build(cfg: DictConfig, device: torch.device, spec: TaskSpec | None = None) -> tuple[TaskSampler | TaskSpec, Algorithm]:
    """Instantiate the task sampler, model, solver and algorithm of a composed config, seeded;
    given ``spec``, the model and algorithm are built around it instead and no data is read.
    The whole config is checked against the schema first, and the memory the model and one
    batch need against what ``device`` has free before the model is allocated."""
    for group in ("algo", "tasks", "model", "solver"):
        require(cfg.get(group) is not None, f"no {group} is selected: add {group}=<option> to the command.")
    validate_config(cfg)
    seed_everything(cfg.seed)
    tasks = instantiate(cfg.tasks, device=device) if spec is None else spec
    model_factory = instantiate(cfg.model)
    check_memory(model_factory, tuple(tasks.input_shape), tasks.output_dim,
                 episode_batches(cfg.tasks, cfg.trainer, tasks), device)
    model = _call(model_factory, "model", input_shape=tasks.input_shape, output_dim=tasks.output_dim).to(device)
    solver = instantiate(cfg.solver)
    meta_optimizer = instantiate(cfg.trainer.meta_optimizer)
    algorithm: Algorithm = _call(instantiate(cfg.algo), "algo", model=model, tasks=tasks, solver=solver, meta_optimizer=meta_optimizer,
                                                 grad_clip_norm=cfg.trainer.grad_clip_norm,
                                                 grad_clip_value=cfg.trainer.grad_clip_value)
    return tasks, algorithm.to(device)


def _call(factory: Any, group: str, **kwargs: Any) -> Any:
    """Call a partial from a config group; a wrong key becomes a ConfigError naming the group."""
    try:
        return factory(**kwargs)
    except TypeError as error:
        if "keyword argument" not in str(error) and "required positional" not in str(error):
            raise  # a bug, not a config mistake
        raise ConfigError(f"{group} config does not fit {getattr(factory, 'func', factory).__name__} ({error}): "
                          f"remove or rename that key, `python train.py --cfg job` shows the config.") from None


def make_trainer(cfg: DictConfig, run_dir: Path) -> Trainer:
    """The trainer of a composed config, writing to ``run_dir``, with its sinks. Checks the config,
    the device and that ``run_dir`` is writable before building anything."""
    validate_config(cfg)
    device = resolve_device(cfg.trainer.device)
    check_writable(run_dir, "pass another resume=<run dir> or set hydra.run.dir=<writable dir>")
    tasks, algorithm = build(cfg, device)
    config = OmegaConf.to_container(cfg, resolve=True)
    sinks = ([instantiate(cfg.logger)(run_dir=run_dir, config=config)]
             if cfg.logger.get("_target_") and distributed.is_main() else [])  # rank 0 logs
    trainer_keys = {k: v for k, v in cfg.trainer.items() if k not in _BUILD_KEYS}
    return Trainer(algorithm, tasks, run_dir, seed=cfg.seed, sinks=sinks, config=config, **trainer_keys)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg``, train, test, print the outcome; return the results. The run
    directory is held (one process per run directory) from before anything is built until the end.
    Under torchrun (or several SLURM tasks) every process joins the group first; rank 0 chooses
    the run directory, holds it and prints, and a refusal on any process stops all of them."""
    reuse_freed_memory()
    distributed.init(resolve_device(cfg.trainer.device))
    distributed.agree(lambda: _check_processes(cfg))
    hydra_cfg = HydraConfig.get()
    config = OmegaConf.to_container(cfg, resolve=True)
    main = distributed.is_main()
    with ExitStack() as held:
        def prepare() -> tuple[Path, Path | None, dict[str, Any] | None]:
            outputs = runs_root(hydra_cfg, hydra.utils.get_original_cwd())  # where Hydra puts this command's runs
            output_dir = Path(hydra_cfg.runtime.output_dir)
            resume_dir = find_resume_dir(cfg.resume, outputs, list(hydra_cfg.overrides.task)) or requeued(output_dir)
            run_dir = resume_dir or output_dir
            held.enter_context(hold_run_dir(run_dir))
            if not resume_dir:
                return run_dir, None, None
            require((run_dir / CHECKPOINT).is_file(), f"resume={run_dir} has no {CHECKPOINT} (the run stopped before its first "
                                                      "checkpoint): start it again without resume.")
            state = load_checkpoint(run_dir / CHECKPOINT)
            check_resume_config(state.get("config") or {}, config, state["iteration"], run_dir)
            return run_dir, resume_dir, finished_results(run_dir, config)

        run_dir, resume_dir, finished = distributed.from_main(prepare)  # rank 0 decides, for every rank
        if finished:
            if main:
                print(f"metalab: {run_dir} already finished at iteration {finished['iteration']}: nothing to do "
                      "(raise trainer.iterations to train longer); its results:")
                print_results(finished)
            return finished
        trainer = distributed.agree(lambda: make_trainer(cfg, run_dir))
        tasks, algorithm = trainer.tasks, trainer.algorithm
        if main:
            print(f"metalab: algo={algorithm.name} solver={algorithm.solver.name} tasks={type(tasks).__name__} "
                  f"device={tasks.device}" + (f" norm={algorithm.model.norm}" if hasattr(algorithm.model, "norm") else "")
                  + (f" processes={distributed.world_size()}" if distributed.active() else "")
                  + f" run_dir={run_dir}" + (" (resumed)" if resume_dir else ""))
        results = trainer.fit(resume=resume_dir is not None)
    if main:
        print_results(results)
    return results


def _check_processes(cfg: DictConfig) -> None:
    """Under several processes: the config is valid, its algorithm supports them and its meta-batch
    splits evenly over them (checked before anything is built)."""
    if distributed.active():
        validate_config(cfg)
        distributed.check_supported(get_class(cfg.algo._target_), cfg.trainer.meta_batch_size)


def requeued(run_dir: Path) -> Path | None:
    """``run_dir`` when SLURM requeued this job (SLURM_RESTART_COUNT > 0, after a preemption or a
    timeout) and its earlier attempt left a checkpoint there: the job then continues it."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return run_dir if restarts.isdigit() and int(restarts) > 0 and (run_dir / CHECKPOINT).is_file() else None


def print_results(results: dict[str, Any]) -> None:
    """The end of a run on the console: how it ended, which checkpoint was tested, one line per metric."""
    if results["status"] == "interrupted":
        print(f"stopped by {results['stopped_by']} at iteration {results['iteration']}, which checkpoint.pt holds: "
              "continue with the same command plus resume=true (or resume=<run dir>)")
    elif results.get("tested_iteration") is not None and results["test"]:
        which = ("the best validation checkpoint (best.pt)" if results.get("tested_checkpoint") == "best"
                 else "the last checkpoint")
        print(f"tested {which}: iteration {results['tested_iteration']} of {results['iteration']}")
    for split in ("val", "test"):
        table = {key: (value["mean"] if value["mean"] is not None else float("nan"), value["ci95"] or 0.0)
                 for key, value in results[split].items()}
        for line in metric_lines(split, table, results.get(f"{split}_tasks") or 0):
            print(line)
    if results["status"] == "nonfinite_evaluation":
        print(f"warning: {', '.join(results['nonfinite'])} came out NaN or infinite although training stayed finite "
              "(results.json holds null there): fewer algo.eval_inner_steps or a lower algo.inner_lr may avoid it")


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


def main() -> float:
    """The command line (train.py, `metalab`, `python -m metalab`): returns the final validation
    metric, for sweepers. A pasted ``resume=<run dir>`` is quoted for Hydra first (run directory
    names hold ``=`` and ``,``); a run stopped by SIGINT/SIGTERM exits with 130/143."""
    sys.argv[1:] = quote_resume_override(sys.argv[1:]) + distributed.hydra_overrides()
    # configs/hydra/launcher/submitit_slurm.yaml is the plugin's config with metalab's defaults, all keys
    # written out; Hydra 1.3 still checks it against the plugin's schema of that name, and warns so
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")
    try:
        return _hydra_main()
    finally:
        distributed.destroy()  # a process group left to the interpreter's exit may abort it
