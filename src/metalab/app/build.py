"""Config to objects: the task sampler, model, solver, algorithm and trainer of a composed config.
The factory every entry point shares (the command line, ``load_learner``, the scripts, the tests);
the config is validated once, by whichever of ``build`` or ``make_trainer`` an entry point calls.

It also fills the catalog of what a user can name (``metalab.algorithms.catalog``) from the configs
on Hydra's search path, so that the sentences refusing a mismatched algorithm, sampler or solver name
every configured option that fits, an algorithm added as one .py and one .yaml included."""

from __future__ import annotations

import importlib.resources
import random
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from metalab import distributed
from metalab.algorithms.base import Algorithm
from metalab.algorithms.catalog import Catalog, set_catalog_source
from metalab.app.memory import check_data, check_memory, rule_footprint
from metalab.app.paths import check_writable
from metalab.app.runs import resolve_rules
from metalab.app.schema import validate_config
from metalab.errors import ConfigError, MetalabError, require
from metalab.tasks.base import TaskSampler
from metalab.tasks.spec import TaskSpec
from metalab.training.trainer import Trainer

__all__ = [
    "CONFIG_DIR",
    "build",
    "config_catalog",
    "config_folders",
    "construct",
    "instantiate",
    "make_trainer",
    "resolve_device",
    "trainer_of",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # shipped inside the package
# trainer config keys consumed by build(), not by Trainer
_BUILD_KEYS = ("device", "meta_optimizer", "grad_clip_norm", "grad_clip_value")


def config_folders() -> list[Traversable]:
    """The folders of Hydra's config search path, first match first: under ``@hydra.main`` every file
    or package source the command composed from (``hydra.searchpath=[...]`` included); otherwise
    (the compose API) the packaged configs."""
    if not HydraConfig.initialized():
        return [CONFIG_DIR]
    folders: list[Traversable] = []
    for source in HydraConfig.get().runtime.config_sources:
        if source.schema == "file":
            folders.append(Path(source.path))
        elif source.schema == "pkg":
            try:
                folders.append(importlib.resources.files(source.path.replace("/", ".")))
            except ModuleNotFoundError:  # a package source Hydra itself could not read either
                continue
    return folders


def config_catalog() -> Catalog:
    """The algorithms (``algo/*.yaml``) and task samplers (``tasks/*.yaml``) of ``config_folders``, by
    option name, each the class its ``_target_`` names; an option whose target does not import as a
    class of its kind is left out (Hydra names that error when the option is chosen)."""
    found: dict[str, dict[str, type]] = {"algo": {}, "tasks": {}}
    for folder in reversed(config_folders()):  # the first folder of the search path wins, as in Hydra
        for group, base in (("algo", Algorithm), ("tasks", TaskSampler)):
            options = folder.joinpath(group)
            for option in options.iterdir() if options.is_dir() else ():
                cls = _target_class(option, group) if option.name.endswith(".yaml") else None
                if isinstance(cls, type) and issubclass(cls, base):
                    found[group][option.name.removesuffix(".yaml")] = cls
    return Catalog(found["algo"], found["tasks"])


def _target_class(option: Traversable, group: str) -> Any:
    """The class an option file's ``_target_`` names (under ``<group>:`` for a ``@package _global_``
    file), or None."""
    try:
        node = yaml.safe_load(option.read_text())
        node = node.get(group, node) if isinstance(node, dict) else None
        return get_class(node["_target_"]) if isinstance(node, dict) and "_target_" in node else None
    except (OSError, yaml.YAMLError, ImportError, ValueError):
        return None


set_catalog_source(config_catalog)


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """ "auto" -> cuda when available, else cpu; otherwise cpu, cuda, cuda:<index> or mps, refused in
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
        require(
            device.index is None or device.index < count,
            f"{key}={name} but this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}: pick one of them.",
        )
    elif device.type == "mps":
        require(
            torch.backends.mps.is_available(),
            f"{key}=mps but this torch sees no Apple GPU (MPS): use {key}=auto or cpu.",
        )
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
        raise ConfigError(
            f"{error.__cause__ or error}: check that config's keys and _target_.".replace("\n", " ")
        ) from None


def build(
    cfg: DictConfig, device: torch.device, spec: TaskSpec | None = None
) -> tuple[TaskSampler | TaskSpec, Algorithm]:
    """Instantiate the task sampler, model, solver and algorithm of a composed config, seeded;
    given ``spec``, the model and algorithm are built around it instead and no data is read.
    The whole config is checked against the schema first, and the memory the model and one
    batch need against what ``device`` has free before the model is allocated."""
    validate_config(cfg)
    return construct(cfg, device, spec)


def construct(
    cfg: DictConfig, device: torch.device, spec: TaskSpec | None = None
) -> tuple[TaskSampler | TaskSpec, Algorithm]:
    """``build`` for a config already validated (``validate_config``): no second check."""
    seed_everything(cfg.seed)
    if spec is None:
        check_data(get_class(cfg.tasks._target_), cfg.tasks, device)
    tasks = instantiate(cfg.tasks, device=device) if spec is None else spec
    model_factory = instantiate(cfg.model)
    check_memory(
        model_factory,
        tuple(tasks.input_shape),
        tasks.output_dim,
        tasks.footprints(cfg.tasks, cfg.trainer),
        device,
        rule_footprint(cfg.algo),
    )
    model = _call(model_factory, "model", input_shape=tasks.input_shape, output_dim=tasks.output_dim).to(device)
    solver = instantiate(cfg.solver)
    meta_optimizer = instantiate(cfg.trainer.meta_optimizer)
    algorithm: Algorithm = _call(
        instantiate(cfg.algo),
        "algo",
        model=model,
        tasks=tasks,
        solver=solver,
        meta_optimizer=meta_optimizer,
        grad_clip_norm=cfg.trainer.grad_clip_norm,
        grad_clip_value=cfg.trainer.grad_clip_value,
        **resolve_rules(cfg.algo),
    )
    return tasks, algorithm.to(device)


def _call(factory: Any, group: str, **kwargs: Any) -> Any:
    """Call a partial from a config group; a wrong key becomes a ConfigError naming the group, and an
    allocation that fails (a size the estimates do not cover) one naming the group's sizes."""
    try:
        return factory(**kwargs)
    except (RuntimeError, MemoryError) as error:
        if not _out_of_memory(error):
            raise
        raise ConfigError(
            f"building {group} needs more memory than there is ({_first_line(error)}): lower the {group} "
            "group's sizes (python train.py --cfg job lists its keys)."
        ) from None
    except TypeError as error:
        if "keyword argument" not in str(error) and "required positional" not in str(error):
            raise  # a bug, not a config mistake
        raise ConfigError(
            f"{group} config does not fit {getattr(factory, 'func', factory).__name__} ({error}): "
            f"remove or rename that key, `python train.py --cfg job` shows the config."
        ) from None


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0].split("] ")[-1].rstrip(".")


def make_trainer(cfg: DictConfig, run_dir: Path) -> Trainer:
    """The trainer of a composed config, writing to ``run_dir``, with its sinks. Checks the config,
    the device and that ``run_dir`` is writable before building anything."""
    validate_config(cfg)
    return trainer_of(cfg, run_dir)


def trainer_of(cfg: DictConfig, run_dir: Path) -> Trainer:
    """``make_trainer`` for a config already validated."""
    device = resolve_device(cfg.trainer.device)
    check_writable(run_dir, "pass another resume=<run dir> or set hydra.run.dir=<writable dir>")
    tasks, algorithm = construct(cfg, device)
    config = OmegaConf.to_container(cfg, resolve=True)
    loggers = (cfg.get("logger") or {}) if distributed.is_main() else {}  # {name: sink config}; rank 0 logs
    sinks = [instantiate(node)(run_dir=run_dir, config=config) for node in loggers.values()]
    trainer_keys = {k: v for k, v in cfg.trainer.items() if k not in _BUILD_KEYS}
    return Trainer(algorithm, tasks, run_dir, seed=cfg.seed, sinks=sinks, config=config, **trainer_keys)
