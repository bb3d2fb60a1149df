"""One typed schema for the whole config, checked before anything is built.

The schema of a config node with a ``_target_`` is that target's signature: its keys are the
target's parameters (for a class, collected up its hierarchy for as long as each ``__init__``
passes ``**kwargs`` on), and each value must fit the parameter's type annotation. A bool is not
an integer, a string is not a list, a number is finite. ``RANGES`` adds the bounds that no
constructor checks. The trainer group is the Trainer's keyword arguments plus the four keys
``build`` consumes. Every violation is one ConfigError sentence naming the key, the expected
type and the value given, so that no wrong type reaches a constructor. An algorithm and a sampler
that do not pair (``Algorithm.accepts``, ``TaskSampler.batch_kind``) are refused here too.

    validate_config(cfg)   # raises ConfigError("algo.inner_lr must be a number (got 'abc'): e.g. algo.inner_lr=0.01.")
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metalab.algorithms.base import Algorithm
from metalab.app.runs import RULE_KEYS
from metalab.errors import ConfigError, require
from metalab.recorded import WIRING
from metalab.tasks.base import TaskSampler
from metalab.training.trainer import Trainer

__all__ = ["RANGES", "Range", "validate_config"]

_EMPTY = inspect.Parameter.empty

#: The config groups whose node is one object's config (the trainer group is two objects').
GROUPS = ("algo", "tasks", "model", "solver", "logger")
#: Per target node, the arguments metalab passes itself (never config keys).
INJECTED: dict[str, frozenset[str]] = {
    **WIRING,  # tasks, model, algo: what app.build passes their constructors
    "solver": frozenset(),
    "logger": frozenset({"run_dir", "config"}),
    "trainer.meta_optimizer": frozenset({"params"}),
}
_TRAINER_INJECTED = frozenset({"algorithm", "tasks", "run_dir", "seed", "sinks", "config"})
_HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})


@dataclass(frozen=True)
class Param:
    """One config key: its annotation (``_EMPTY``: any value) and default (``_EMPTY``: required)."""

    annotation: Any = _EMPTY
    default: Any = _EMPTY


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric key: low <= value <= high (``low_open``: low < value; ``high_open``: value < high)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_show(self.low)}"
        return (
            f"in {'(' if self.low_open else '['}{_show(self.low)}, {_show(self.high)}{')' if self.high_open else ']'}"
        )


#: Bounds that no constructor checks (seeds feed numpy, which takes [0, 2^32), the samplers' data seeds a
#: torch.Generator, which takes [0, 2^64) and reads a negative seed as a large one; torch accepts lr=0, which
#: trains nothing, and any momentum >= 0, though from 1 on a gradient is never forgotten and the steps grow;
#: Conv4 would take hidden_channels=0 for null, its default width). A key ending in ``.*`` bounds every
#: entry of a mapping (``tasks.baseline_lrs.sgd``, ...).
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**32 - 1),
    "trainer.eval_seed": Range(0, 2**32 - 1),
    "trainer.meta_optimizer.lr": Range(0, low_open=True),
    "model.hidden_channels": Range(1),
    "algo.primary_optimizer.lr": Range(0, low_open=True),
    "algo.primary_optimizer.momentum": Range(0, 1, high_open=True),
    "algo.combiner_optimizer.lr": Range(0, low_open=True),
    "algo.combiner_optimizer.momentum": Range(0, 1, high_open=True),
    "tasks.baseline_lrs.*": Range(0, low_open=True),
    "tasks.split_seed": Range(0, 2**64 - 1),
    "tasks.data_seed": Range(0, 2**64 - 1),
}

#: Top-level keys besides the groups.
TOP_LEVEL: dict[str, Param] = {
    "seed": Param(int, 0),
    "resume": Param(Union[bool, str], False),
    "paper": Param(),  # free-form: an experiment's published numbers
}


def validate_config(cfg: DictConfig | dict) -> None:
    """Check every key of a composed config against the schema; raise ConfigError at the first
    key that is unknown, of the wrong type or out of range, or at a group left unselected."""
    for group in ("algo", "tasks", "model", "solver"):
        require(cfg.get(group) is not None, f"no {group} is selected: add {group}=<option> to the command.")
    try:
        config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(f"the config does not resolve ({error}).".replace("\n", " ")) from None
    _check_keys("", config, {**TOP_LEVEL, **{group: Param() for group in (*GROUPS, "trainer")}}, "the config")
    for key, param in TOP_LEVEL.items():
        if key in config:
            _check_value(key, config[key], param)
    for group in GROUPS:
        node = config.get(group)
        if group == "logger" and isinstance(node, dict):  # {name: sink config}: logger=[wandb,tensorboard]
            for name, sink in node.items():
                require(
                    isinstance(sink, dict) and "_target_" in sink,
                    f"logger.{name} is not a logger: choose loggers with logger=<name> or logger=[<name>,<name>].",
                )
                _check_node(f"logger.{name}", sink, INJECTED["logger"])
        elif isinstance(node, dict):
            _check_node(group, node, INJECTED[group])
    if isinstance(config.get("trainer"), dict):
        _check_trainer(config["trainer"])
    _check_pair(config.get("algo"), config.get("tasks"))


def _check_pair(algo: Any, tasks: Any) -> None:
    """The algorithm trains on the kind of batch the sampler yields (``Algorithm.check_tasks`` on their
    classes' declarations), checked before any data is read."""
    if not (isinstance(algo, dict) and isinstance(tasks, dict) and "_target_" in algo and "_target_" in tasks):
        return
    algorithm, sampler = get_object(algo["_target_"]), get_object(tasks["_target_"])
    classes = inspect.isclass(algorithm) and inspect.isclass(sampler)
    if classes and issubclass(algorithm, Algorithm) and issubclass(sampler, TaskSampler):
        algorithm.check_tasks(sampler)


def _check_trainer(node: dict[str, Any]) -> None:
    """The trainer group: the Trainer's keyword arguments and what cli.build takes from it."""
    params = {k: p for k, p in signature_params(Trainer)[0].items() if k not in _TRAINER_INJECTED}
    clip = signature_params(Algorithm)[0]
    params |= {
        "device": Param(str, "auto"),
        "meta_optimizer": Param(dict),
        "grad_clip_norm": clip["grad_clip_norm"],
        "grad_clip_value": clip["grad_clip_value"],
    }
    _check_keys("trainer", node, params, "the trainer")
    for key, value in node.items():
        if key != "meta_optimizer":
            _check_value(f"trainer.{key}", value, params[key])
    optimizer = node.get("meta_optimizer")
    require(
        isinstance(optimizer, dict) and "_target_" in optimizer,
        "trainer.meta_optimizer must be an optimizer config with a _target_, e.g. torch.optim.Adam.",
    )
    _check_node("trainer.meta_optimizer", optimizer, INJECTED["trainer.meta_optimizer"])


def _check_node(path: str, node: dict[str, Any], injected: frozenset[str]) -> None:
    """A node with a ``_target_``: its keys against the target's signature."""
    keys = [k for k in node if k not in _HYDRA_KEYS]
    if "_target_" not in node:
        require(
            not keys, f"{path}.{keys[0] if keys else ''} has no effect: the selected {path} option takes no settings."
        )
        return
    target = node["_target_"]
    try:
        factory = get_object(target)
    except Exception as error:  # Hydra raises ImportError or its own error for an unknown path
        raise ConfigError(
            f"{path}._target_={target} cannot be imported ({error}): check its spelling.".replace("\n", " ")
        ) from None
    params, open_ended = signature_params(factory)
    for key in keys:
        require(key not in injected, f"{path}.{key} is set by metalab itself, not by the config: remove it.")
    if not open_ended:
        _check_keys(
            path, {k: node[k] for k in keys}, {k: p for k, p in params.items() if k not in injected}, f"{target}"
        )
    for key in keys:
        if isinstance(node[key], dict) and "_target_" in node[key]:  # a nested object, e.g. algo.primary_optimizer
            _check_node(f"{path}.{key}", node[key], frozenset({"params"}))
        elif path == "algo" and key in RULE_KEYS:  # a run directory, loaded into its rule by build()
            _check_value(f"{path}.{key}", node[key], Param(str | None, None))
        elif key in params:
            _check_value(f"{path}.{key}", node[key], params[key])
    for key, param in params.items():
        require(
            param.default is not _EMPTY or key in injected or key in node,
            f"{path}.{key} is required by {target}: add +{path}.{key}=<value>.",
        )


def _check_keys(path: str, node: dict[str, Any], params: dict[str, Param], owner: str) -> None:
    unknown = [k for k in node if k not in params and k not in _HYDRA_KEYS]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        require(bool(params), f"{where} is not a setting of {owner}, which takes none: remove it.")
        raise ConfigError(
            f"{where} is not a setting of {owner}; the valid keys are {', '.join(sorted(params))} "
            "(`python train.py --cfg job` shows the config)."
        )


def signature_params(factory: Any) -> tuple[dict[str, Param], bool]:
    """({name: Param} of what ``factory`` accepts by keyword, whether it also takes any **kwargs
    it cannot name). A class's parameters are collected along its MRO while each ``__init__``
    forwards ``**kwargs``."""
    if not inspect.isclass(factory):
        return _own_params(factory)
    params: dict[str, Param] = {}
    for cls in factory.__mro__:
        if "__init__" not in vars(cls) or cls is object:
            continue
        own, forwards = _own_params(vars(cls)["__init__"])
        params = {**own, **params}
        if not forwards:
            return params, False
    return params, True


def _own_params(function: Any) -> tuple[dict[str, Param], bool]:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return {}, True
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # an annotation that does not evaluate: check the key's presence only
        hints = {}
    params, forwards = {}, False
    for name, parameter in signature.parameters.items():
        if parameter.kind is parameter.VAR_KEYWORD:
            forwards = True
        elif name != "self" and parameter.kind is not parameter.VAR_POSITIONAL:
            params[name] = Param(hints.get(name, _EMPTY), parameter.default)
    return params, forwards


def _check_value(path: str, value: Any, param: Param) -> None:
    if not fits(value, param.annotation):
        example = f": e.g. {path}={_show(param.default, quote=False)}" if _is_example(param) else ""
        raise ConfigError(f"{path} must be {describe(param.annotation)} (got {_show(value)}){example}.")
    entry = _entry_annotation(param.annotation)
    if entry is not _EMPTY and isinstance(value, dict):  # a mapping of settings, e.g. tasks.baseline_lrs
        for key, item in value.items():
            _check_value(f"{path}.{key}", item, Param(entry))
    bounds = RANGES.get(path, RANGES.get(f"{path.rpartition('.')[0]}.*"))
    if bounds is not None and isinstance(value, (int, float)):
        example = (
            f": e.g. {path}={_show(param.default, quote=False)}"
            if _is_example(param) and bounds.holds(param.default)
            else ""
        )
        require(bounds.holds(value), f"{path} must be {bounds} (got {_show(value)}){example}.")


def _entry_annotation(annotation: Any) -> Any:
    """The value annotation of a mapping annotation (``dict[str, float]``, or a union holding one), else _EMPTY."""
    arms = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    for arm in arms:
        if typing.get_origin(arm) in (dict, collections.abc.Mapping) and len(typing.get_args(arm)) == 2:
            return typing.get_args(arm)[1]
    return _EMPTY


def fits(value: Any, annotation: Any) -> bool:
    """Whether a config value (int, float, bool, str, None, list, dict) fits ``annotation``;
    an annotation no config value can be checked against (a Callable, a class) accepts anything
    of that class or is left to the constructor."""
    if annotation is _EMPTY or annotation is Any:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(map(fits, value, args))
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable) or annotation in (list, tuple):
        return isinstance(value, (list, tuple)) and all(fits(item, args[0] if args else _EMPTY) for item in value)
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):  # a class no config value is (a Tensor): only a nested _target_ node
        return isinstance(value, annotation) or (isinstance(value, dict) and "_target_" in value)
    return True


def describe(annotation: Any) -> str:
    """What a value of ``annotation`` looks like on the command line, e.g. "a list of integers"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        parts = [describe(arg) for arg in args if not (isinstance(arg, type) and not _from_config(arg))]
        return " or ".join(dict.fromkeys(parts))
    if origin is Literal:
        return "one of " + ", ".join(arg if isinstance(arg, str) else _show(arg) for arg in args)
    names = {
        type(None): "null",
        bool: "true or false",
        int: "an integer",
        float: "a finite number",
        str: "a string",
        dict: "a mapping",
    }
    if annotation in names:
        return names[annotation]
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} " + _plural(describe(args[0]))
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable) or annotation in (list, tuple):
        return "a list of " + _plural(describe(args[0])) if args else "a list"
    return f"a {getattr(annotation, '__name__', annotation)}"


def _plural(description: str) -> str:
    plurals = {"an integer": "integers", "a finite number": "finite numbers", "a string": "strings"}
    return plurals.get(description, description)


def _from_config(cls: type) -> bool:
    """Whether a value of class ``cls`` can come from a config at all (a Tensor or device cannot)."""
    return cls in (bool, int, float, str, list, tuple, dict, type(None))


def _is_example(param: Param) -> bool:
    return param.default is not _EMPTY and param.default is not None and fits(param.default, param.annotation)


def _show(value: Any, quote: bool = True) -> str:
    """A value as it is typed on the command line: true, null, [40,40], 'abc' (abc unless ``quote``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(item, quote) for item in value) + "]"
    if isinstance(value, str):
        return repr(value) if quote else value
    return str(value)
