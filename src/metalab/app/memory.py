"""A lower bound on the memory a configuration needs, checked before the model is allocated.

The model is first built on the meta device (nothing allocated) to count its parameters and, with
one forward pass of two meta examples, the activations per example. One meta-batch then needs at
least, in float32:

    episodes:     B * E * (input size + 1)          B episodes of E examples
    activations:  B * E * activations per example   one forward pass (training keeps more)
    task copies:  B * parameters                    the adapted parameters of each task
    model:        4 * parameters                    weights, gradient, two Adam moments

and one evaluation batch the same with its own B and E. A configuration above what the device
has free (host: MemAvailable; GPU: free memory) is refused in one sentence that states the estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metalab.errors import MetalabError, require

__all__ = ["available_bytes", "check_memory", "episode_batches", "model_footprint"]

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


def check_memory(
    model_factory: Callable[..., nn.Module],
    input_shape: tuple[int, ...],
    output_dim: int,
    batches: dict[str, tuple[int, int]],
    device: torch.device,
) -> None:
    """Refuse (ConfigError) when the model, or one batch of ``batches`` ({what: (episodes,
    examples per episode)}, e.g. {"trainer.meta_batch_size": (25, 20)}), needs more memory than
    ``device`` has free, by the lower bound of the module docstring."""
    free = available_bytes(device)
    if free is None:
        return
    footprint = model_footprint(model_factory, input_shape, output_dim)
    if footprint is None:
        return
    parameters, activations = footprint
    model_bytes = 4 * parameters * _FLOAT
    require(
        model_bytes <= free,
        f"the model has {parameters:,} parameters and needs at least {_gb(model_bytes)} "
        f"but {device} has {_gb(free)} free: make the model smaller.",
    )
    for key, (episodes, examples) in batches.items():
        per_episode = examples * (math.prod(input_shape) + 1 + activations) + parameters
        needed = model_bytes + episodes * per_episode * _FLOAT
        require(
            needed <= free,
            f"{key}={episodes} episodes of {examples} examples on a model of {parameters:,} parameters need at "
            f"least {_gb(needed)} but {device} has {_gb(free)} free: lower {key}, the episode sizes or the model size.",
        )


def _gb(size: float) -> str:
    return f"{size / 2**30:.3g} GiB" if size >= 2**25 else f"{size / 2**20:.3g} MiB"


def episode_batches(tasks: Any, trainer: Any, sampler: Any) -> dict[str, tuple[int, int]]:
    """{trainer key: (episodes, examples per episode)} of a meta-batch and of an evaluation batch,
    from the tasks and trainer config groups (ways, shots, query, eval_shots, eval_query; a sampler
    without ways has one "way", query null means shots). Empty when the sampler built from ``tasks``
    (or its TaskSpec) yields no episodes (its ``batch_kind``: an auxiliary sampler's shots are labels
    per class) or its config has no shots key."""
    if sampler.batch_kind != "episodes" or tasks.get("shots") is None:
        return {}
    ways, shots = tasks.get("ways") or 1, tasks.shots
    query = shots if tasks.get("query") is None else tasks.query
    eval_shots = shots if tasks.get("eval_shots") is None else tasks.eval_shots
    eval_query = query if tasks.get("eval_query") is None else tasks.eval_query
    eval_episodes = min(trainer.eval_batch_size, max(trainer.eval_tasks, trainer.test_tasks, 1))
    return {
        "trainer.meta_batch_size": (trainer.meta_batch_size, ways * (shots + query)),
        "trainer.eval_batch_size": (eval_episodes, ways * (eval_shots + eval_query)),
    }
