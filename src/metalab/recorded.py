"""Objects built in plain Python, recorded as the config that rebuilds them.

A run trained from Python (``Trainer(algorithm, tasks, run_dir, ...)`` without a config) is loaded
back the way a command-line run is: ``load_learner`` builds its objects from the config in its
checkpoint. So each metalab sampler, model and algorithm records the arguments of its constructor
call as it is made (``Recorded``, a base class; like Lightning's ``save_hyperparameters``), and
``run_config`` turns the graph the trainer receives into that config: each object's class path and
recorded arguments, less what ``app.build`` passes itself (the sampler's device, the model's shapes,
the algorithm's model, sampler, solver and meta-optimizer), with the solver (a ``metalab.hypergrad``
factory's result) and the meta-optimizer factory (an optimizer class, or a ``functools.partial`` of
one with keyword arguments) in their own groups.

What cannot be described (a user's own ``nn.Module``, a lambda, a class defined in the script that
is run, a tensor argument) does not stop training: the config lists it under ``UNREBUILDABLE``, and
loading refuses the run in one sentence naming it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["UNREBUILDABLE", "WIRING", "Recorded", "run_config"]

#: config key listing the objects of a Python-built run that no config describes (absent when none)
UNREBUILDABLE = "unrebuildable"
#: constructor arguments that app.build passes itself, per group (never config keys; ``app.schema`` checks them)
WIRING = {
    "tasks": frozenset({"device"}),
    "model": frozenset({"input_shape", "output_dim"}),
    "algo": frozenset({"model", "tasks", "solver", "meta_optimizer", "grad_clip_norm", "grad_clip_value"}),
}


class Undescribed(str):
    """A recorded argument that no config value describes, as words ("a Tensor")."""


class Recorded:
    """Base class that records the arguments of each constructor call, by name, as config values
    (``Undescribed`` where an argument has none), in ``recorded_arguments``."""

    recorded_arguments: dict[str, Any] | None

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        self = super().__new__(cls)
        object.__setattr__(self, "recorded_arguments", _named(cls, args, kwargs))  # before nn.Module.__init__
        return self


def _named(cls: type, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """A constructor call's arguments by name: positional ones as the first ``__init__`` up the class
    hierarchy that takes no ``*args`` names them (the subclasses pass ``*args`` on in order); None when
    they do not bind there."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
            continue
        positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(args) > len(positional) or any(name in kwargs for name in positional[: len(args)]):
            return None
        return {name: describe(value) for name, value in (*zip(positional, args), *kwargs.items())}
    return None


def describe(value: Any) -> Any:
    """The config value that rebuilds ``value`` (plain values as they are, paths as strings, sequences as lists), or
    ``Undescribed``: a solver as its ``metalab.hypergrad`` factory's config; an optimizer class or a
    ``functools.partial`` of one, with keyword arguments, as a partial config."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):  # a data folder: the config names it as a string
        return os.fspath(value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # a tuple, a list, Hydra's ListConfig
        items = [describe(item) for item in value]
        return next((item for item in items if isinstance(item, Undescribed)), items)
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        items = {key: describe(item) for key, item in value.items()}
        return next((item for item in items.values() if isinstance(item, Undescribed)), items)
    if type(value).__module__.startswith("metalab.hypergrad") and isinstance(getattr(value, "name", None), str):
        factory = getattr(importlib.import_module("metalab.hypergrad"), value.name, None)
        options = getattr(value, "options", {})
        if callable(factory) and factory(**options) == value:
            return {"_target_": f"metalab.hypergrad.{value.name}", **options}
    if isinstance(value, functools.partial) and not value.args:
        target = describe(value.func)
        keywords = describe(value.keywords)
        if isinstance(target, dict) and isinstance(keywords, dict):
            return {**target, **keywords}
        return next(part for part in (keywords, target) if isinstance(part, Undescribed))
    if inspect.isclass(value) and _importable(value):
        return {"_target_": _path(value), "_partial_": True}
    return Undescribed(_words(value))


def run_config(algorithm: Any, tasks: Any, seed: int, trainer: dict[str, Any]) -> dict[str, Any]:
    """The config of a run built from ``algorithm`` and ``tasks`` (its sampler) in Python, with the
    trainer's keyword arguments ``trainer``: the config ``app.build`` rebuilds them from, as the
    command line would have composed it; what it cannot describe is listed under ``UNREBUILDABLE``."""
    problems: list[str] = []
    sampler = _node(tasks, "tasks", "the sampler", problems)
    model = _node(getattr(algorithm, "model", None), "model", "the model", problems)
    algo = _node(algorithm, "algo", "the algorithm", problems)
    recorded = getattr(algorithm, "recorded_arguments", None) or {}
    groups = {"solver": recorded.get("solver"), "meta_optimizer": recorded.get("meta_optimizer")}
    for role, value in zip(("the solver", "the meta-optimizer factory"), groups.values()):
        if recorded and not isinstance(value, dict):
            problems.append(f"{role} {value}")
    config = {
        "seed": seed,
        "tasks": sampler,
        "model": model,
        "solver": groups["solver"] if isinstance(groups["solver"], dict) else None,
        "algo": algo,
        "trainer": {
            **trainer,
            "device": str(tasks.device),
            "meta_optimizer": groups["meta_optimizer"] if isinstance(groups["meta_optimizer"], dict) else None,
            "grad_clip_norm": getattr(algorithm, "grad_clip_norm", None),
            "grad_clip_value": getattr(algorithm, "grad_clip_value", None),
        },
    }
    if problems:
        config[UNREBUILDABLE] = problems
    return config


def _node(obj: Any, group: str, role: str, problems: list[str]) -> dict[str, Any]:
    """The config node of one object (a partial for the model and the algorithm, which ``app.build``
    completes); what keeps it from rebuilding ``obj`` is appended to ``problems``."""
    cls = type(obj)
    node: dict[str, Any] = {"_target_": _path(cls), **({"_partial_": True} if group in ("model", "algo") else {})}
    recorded = getattr(obj, "recorded_arguments", None)
    if recorded is None:
        problems.append(f"{role} {cls.__qualname__} (not a metalab class, so its arguments were not recorded)")
    elif not _importable(cls):
        problems.append(f"{role} {cls.__qualname__} (defined in {cls.__module__}, which a later process cannot import)")
    else:
        for key, value in recorded.items():
            if key in WIRING[group]:
                continue
            if isinstance(value, Undescribed):
                problems.append(f"{role}'s {key} ({value})")
            node[key] = None if isinstance(value, Undescribed) else value
    return node


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _importable(cls: type) -> bool:
    """Whether another process can import ``cls`` by its path (not a class of the script run, nor a local one)."""
    return cls.__module__ != "__main__" and "<locals>" not in cls.__qualname__


def _words(value: Any) -> str:
    name = getattr(value, "__qualname__", None)
    return f"{name}" if callable(value) and name else f"a {type(value).__name__}"
