"""A lower bound on the memory a configuration needs, checked after the task sampler has read its data
and before the model, the algorithm or any batch is allocated.

The model is first built on the meta device (nothing allocated) to count its parameters P and, with
one forward pass of two meta examples, the activations per example A. Each batch the trainer draws is
stated by the task sampler from its config (``footprints``, ``metalab.tasks.footprint``), so that
every sampler kind is sized, episodes, optimisation problems and data with auxiliary tasks alike. One
batch of U units then needs at least, in float32:

    model:        4 * P                      weights, gradient, two Adam moments
    LSTM rule:    4 * its weights            algo=lstm_optimizer (``rule_footprint``)
    per unit:     examples * (input size + 1 + A)    the inputs the model runs on, their targets, one
                                                     forward pass of activations (training keeps more)
                + C                          what is trained per unit: an episode's copy of the model
                                             (P), an optimizee's own parameters
                + elements                   the data drawn for the unit (a quadratic's W and y, an
                                             MNIST minibatch) and its own activations
                + C * 2 * layers * hidden    the LSTM rule's hidden and cell state per coordinate
    beside them:  shared examples * (input size + 1 + A)   (AuxiLearn's "aux" minibatch)

all in Python integers, so that no size overflows. A configuration above what the device has free
(host: MemAvailable; GPU: free memory, which already leaves out the sampler's resident data) is refused
in one sentence that states the estimate and names the keys to lower.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from torch import nn

from metalab.algorithms.lstm_optimizer import LSTMOptimizer
from metalab.errors import ConfigError, MetalabError, require
from metalab.tasks.footprint import Footprint, settings

__all__ = ["RuleFootprint", "available_bytes", "check_data", "check_memory", "model_footprint", "rule_footprint"]

_FLOAT = 4


def model_footprint(
    factory: Callable[..., nn.Module], input_shape: tuple[int, ...], output_dim: int
) -> tuple[int, int] | None:
    """(parameters, activation elements per example) of ``factory(input_shape=, output_dim=)``,
    measured on the meta device; activations are 0 when the forward pass cannot run there. None
    when the model cannot be built there (the real build then reports why); ConfigError when its
    size overflows."""
    try:
        with torch.device("meta"):
            model = factory(input_shape=input_shape, output_dim=output_dim)
    except MetalabError:
        raise
    except Exception as error:
        require("overflow" not in str(error), f"the model is too large for any memory ({error}): make it smaller.")
        return None
    parameters = sum(p.numel() for p in model.parameters())
    counted = [0]

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            counted[0] += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.empty(2, *input_shape, device="meta"))
    except Exception:  # a model that needs real values: count its parameters only (still a lower bound)
        counted[0] = 0
    finally:
        for hook in hooks:
            hook.remove()
    return parameters, counted[0] // 2


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: the GPU's free memory, or the host's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


@dataclass(frozen=True)
class RuleFootprint:
    """The coordinatewise LSTM rule of algo=lstm_optimizer (``metalab.optim.lstm_rule``): its weights,
    the state it keeps per coordinate it updates (hidden and cell, hidden_size per layer), and the
    config keys that size them, as a refusal names them."""

    parameters: int
    per_coordinate: int
    sizes: str
    levers: tuple[str, ...] = ("algo.hidden_size", "algo.num_layers")


def rule_footprint(algo: Mapping[str, Any]) -> RuleFootprint | None:
    """The LSTM rule of an algo config group whose algorithm trains one (``LSTMOptimizer``), else None."""
    try:
        cls = get_class(algo["_target_"])
    except Exception:  # no class to ask (the schema has already named a bad _target_)
        return None
    if not (isinstance(cls, type) and issubclass(cls, LSTMOptimizer)):
        return None
    keys = settings(cls, algo)
    hidden, layers = keys["hidden_size"], keys["num_layers"]
    inputs = 1 if keys["preprocess"] is None else 2  # the gradient, or its two preprocessed features
    gates = 4 * hidden  # nn.LSTM: weight_ih [4h, in], weight_hh [4h, h], two biases [4h] per layer
    parameters = gates * (inputs + hidden + 2) + (layers - 1) * gates * (2 * hidden + 2) + hidden + 1
    sizes = f"2 x algo.num_layers={layers} x algo.hidden_size={hidden}"
    return RuleFootprint(parameters, 2 * layers * hidden, sizes)


def check_memory(
    model_factory: Callable[..., nn.Module],
    input_shape: tuple[int, ...],
    output_dim: int,
    batches: list[Footprint],
    device: torch.device,
    rule: RuleFootprint | None = None,
) -> None:
    """Refuse (ConfigError) when the model, the LSTM ``rule`` or one batch of ``batches`` (the task
    sampler's ``footprints``) needs more memory than ``device`` has free, by the lower bound of the
    module docstring; each refusal names the keys to lower."""
    free = available_bytes(device)
    if free is None:
        return
    footprint = model_footprint(model_factory, input_shape, output_dim)
    parameters, activations = footprint if footprint is not None else (0, 0)  # unknown: count the batches alone
    model_bytes = 4 * parameters * _FLOAT
    require(
        model_bytes <= free,
        f"the model has {parameters:,} parameters and needs at least {_gb(model_bytes)} "
        f"but {device} has {_gb(free)} free: make the model smaller.",
    )
    rule_bytes = 0 if rule is None else 4 * rule.parameters * _FLOAT
    if rule is not None:
        require(
            model_bytes + rule_bytes <= free,
            f"the LSTM rule has {rule.parameters:,} parameters and needs at least {_gb(model_bytes + rule_bytes)} "
            f"with the model but {device} has {_gb(free)} free: lower algo.hidden_size or algo.num_layers.",
        )
    per_example = math.prod(input_shape) + 1 + activations  # its values, its target, the activations
    for batch in batches:
        coordinates = batch.model_copies * parameters + batch.parameters  # what is trained per unit
        per_unit = batch.examples * per_example + coordinates + batch.elements
        if rule is not None:
            per_unit += coordinates * rule.per_coordinate
        needed = model_bytes + rule_bytes + (batch.units * per_unit + batch.shared_examples * per_example) * _FLOAT
        if needed <= free:
            continue
        model = f"on a model of {parameters:,} parameters" if batch.examples or batch.model_copies else ""
        state = f"with the LSTM rule's state of {rule.sizes} values per coordinate" if rule and coordinates else ""
        levers = [batch.key, *batch.levers]
        levers += ["the model size"] if model else []
        levers += list(rule.levers) if state else []
        parts = (f"{batch.key}={batch.units} {batch.noun}", batch.detail, model, state)
        what = " ".join(part for part in parts if part)
        raise ConfigError(
            f"{what} need at least {_gb(needed)} but {device} has {_gb(free)} free: "
            f"lower {', '.join(levers[:-1])} or {levers[-1]}."
        )


def check_data(sampler: type, tasks: Mapping[str, Any], device: torch.device) -> None:
    """Refuse (ConfigError), before the sampler is built, a config whose data (``sampler.data_elements``,
    float32) needs more memory than ``device`` has free."""
    free = available_bytes(device)
    needed = sampler.data_elements(tasks) * _FLOAT if hasattr(sampler, "data_elements") else 0
    require(
        free is None or needed <= free,
        f"the data of tasks={sampler.__name__} needs at least {_gb(needed)} but {device} has {_gb(free or 0)} free: "
        "lower its sizes (python train.py --cfg job lists the tasks keys).",
    )


def _gb(size: int) -> str:
    if size >= 2**1000:  # beyond a float: say how many digits
        return f"about 10^{len(str(size // 2**30)) - 1} GiB"
    return f"{size / 2**30:.3g} GiB" if size >= 2**25 else f"{size / 2**20:.3g} MiB"
