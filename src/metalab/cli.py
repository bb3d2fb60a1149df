"""The command line: Hydra composes the config, ``build`` turns it into objects, the trainer runs.

    python train.py algo=maml solver=first_order tasks=sinusoid tasks.shots=5 seed=3
"""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from metalab.algorithms.base import Algorithm
from metalab.errors import ConfigError, MetalabError, require
from metalab.tasks.base import TaskSampler
from metalab.trainer import CHECKPOINT, Trainer

__all__ = ["CONFIG_DIR", "build", "main", "make_trainer", "resolve_device", "run"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped inside the package
# trainer config keys consumed by build(), not by Trainer
_BUILD_KEYS = ("device", "meta_optimizer", "grad_clip_norm", "grad_clip_value")


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    require(name != "cuda" or torch.cuda.is_available(),
            "trainer.device=cuda but no CUDA device is visible: use trainer.device=auto or cpu.")
    return torch.device(name)


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


def build(cfg: DictConfig, device: torch.device) -> tuple[TaskSampler, Algorithm]:
    """Instantiate the task sampler, model, solver and algorithm of a composed config, seeded."""
    for group in ("algo", "tasks", "model", "solver"):
        require(cfg.get(group) is not None, f"no {group} is selected: add {group}=<option> to the command.")
    require(isinstance(cfg.seed, int), f"seed must be an integer (got {cfg.seed!r}).")
    seed_everything(cfg.seed)
    tasks: TaskSampler = instantiate(cfg.tasks, device=device)
    model = _call(instantiate(cfg.model), "model", input_shape=tasks.input_shape, output_dim=tasks.output_dim).to(device)
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


def _overrides_without_resume(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if not o.lstrip("+~").startswith("resume="))


def find_resume_dir(resume: Any, outputs: Path, overrides: list[str]) -> Path | None:
    """The run directory to continue: ``resume`` itself when it is a path, for ``resume=true``
    the newest run under ``outputs`` started with the same overrides that has a checkpoint."""
    if resume is False or resume is None:
        return None
    if resume is not True:
        run_dir = Path(str(resume)).expanduser()
        require((run_dir / CHECKPOINT).is_file(),
                f"resume={resume} has no {CHECKPOINT}: pass the run directory of an earlier run (it holds .hydra/ and {CHECKPOINT}).")
        return run_dir
    wanted = _overrides_without_resume(overrides)
    candidates = []
    for saved in outputs.glob("**/.hydra/overrides.yaml"):
        run_dir = saved.parent.parent
        if (run_dir / CHECKPOINT).is_file() and _overrides_without_resume(yaml.safe_load(saved.read_text()) or []) == wanted:
            candidates.append(run_dir)
    require(bool(candidates), f"resume=true found no earlier run of this command with a {CHECKPOINT} under {outputs}: "
                              "pass resume=<run directory> instead.")
    return max(candidates, key=lambda d: (d / CHECKPOINT).stat().st_mtime)


def make_trainer(cfg: DictConfig, run_dir: Path) -> Trainer:
    """The trainer of a composed config, writing to ``run_dir``, with its sinks."""
    device = resolve_device(cfg.trainer.device)
    tasks, algorithm = build(cfg, device)
    config = OmegaConf.to_container(cfg, resolve=True)
    sinks = [instantiate(cfg.logger)(run_dir=run_dir, config=config)] if cfg.logger.get("_target_") else []
    trainer_keys = {k: v for k, v in cfg.trainer.items() if k not in _BUILD_KEYS}
    return Trainer(algorithm, tasks, run_dir, seed=cfg.seed, sinks=sinks, config=config, **trainer_keys)


def run(cfg: DictConfig) -> float:
    """Build everything from ``cfg``, train, test; return the final validation metric (for sweepers)."""
    hydra_cfg = HydraConfig.get()
    outputs = Path(hydra.utils.get_original_cwd()) / "outputs"
    resume_dir = find_resume_dir(cfg.resume, outputs, list(hydra_cfg.overrides.task))
    run_dir = resume_dir or Path(hydra_cfg.runtime.output_dir)
    trainer = make_trainer(cfg, run_dir)
    tasks, algorithm = trainer.tasks, trainer.algorithm
    print(f"metalab: algo={algorithm.name} solver={algorithm.solver.name} tasks={type(tasks).__name__} "
          f"device={tasks.device} run_dir={run_dir}" + (" (resumed)" if resume_dir else ""))
    results = trainer.fit(resume=resume_dir is not None)
    if results["status"] == "interrupted":
        print(f"stopped at iteration {results['iteration']}; continue with the same command plus resume=true")
    for split in ("val", "test"):
        for key, value in results[split].items():
            print(f"{split} {key}: {value['mean']:.4f} ± {value['ci95']:.4f}")
    headline = results["val"].get(tasks.metric_name) or results["test"].get(tasks.metric_name)
    return headline["mean"] if headline else float("nan")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except MetalabError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else 1)
