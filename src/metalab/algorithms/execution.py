"""How an episodic algorithm runs its per-task function over the episodes of a batch: its "execution".

The per-task function (adapt on the support set, score the query set) is the same in every execution;
only the way it is batched over the tasks differs, so every execution gives the same numbers up to
float rounding (tests/test_execution.py checks each against a per-task loop in float64):

* ``vmap``: ``torch.func.vmap`` over the whole meta-batch (the default);
* ``vmap/k``: vmap over k tasks at a time (``chunk_size=k``), the chunks' results concatenated, which
  bounds the memory of one call;
* ``loop``: one task at a time in Python, the results stacked (the peers' way);
* ``loop+fused_norm``: the loop with torch's fused batch norm wherever a norm takes the statistics of
  the batch it normalises (``metalab.models.norm.fused_norm``), for algorithms that differentiate the
  model at most twice (``EpisodicAlgorithm.fused_norm_ok``) and models with a batch norm;
* ``vmap+query_loop``: for a per-task function given in two stages (``Staged``), the adaptation vmapped
  over the meta-batch and the query scored one task at a time: batching the small support sets pays,
  while a large query set is one large batch already, and out of vmap its forward pass can run torch's
  fused batch norm;
* ``+channels_last``: under vmap the query images laid out by ``tasks_beside_channels`` first; in a
  loop or a query loop each task's images restrided channels-last, so that every activation is (5-D
  images on a CPU only; elsewhere the layout changes nothing and is not a candidate).

Which is fastest depends on the problem and the machine; ``metalab.training.autotune`` measures the
candidates of ``candidates`` on a run's own batches and keeps the fastest.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from metalab.models.norm import fused_norm

__all__ = ["DEFAULT", "Execution", "Staged", "candidates", "layout_applies", "tasks_beside_channels"]


def tasks_beside_channels(x: Tensor) -> Tensor:
    """The same images [B tasks, N, C, H, W], stored as [N, H, W, B, C] on a CPU (anything else is
    returned as it is).

    Under vmap a convolution with per-task weights runs as one grouped convolution over the
    tasks' channels side by side, [N, B * C, H, W]; stored this way that tensor is a channels-last
    view, the layout in which oneDNN's grouped convolutions run fastest, and every later layer
    keeps it. On the 2-core CPU it takes a quarter off a conv4 step with 15 queries per class
    and changes nothing at 1 query (``scripts/benchmark.py``); on a GPU it is not measured yet,
    so it is not used there."""
    if not layout_applies(x):
        return x
    return x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)


def _channels_last(x: Tensor) -> Tensor:
    """One task's images [N, C, H, W] stored channels-last (oneDNN's faster layout for a convolution),
    so that every later activation is: with one channel ``contiguous`` keeps the default strides (either
    layout describes them) and the convolutions would run in the default layout; ``to`` restrides."""
    return x.to(memory_format=torch.channels_last)


def layout_applies(x: Tensor) -> bool:
    """Whether ``tasks_beside_channels`` changes the layout of ``x``: 5-D images on a CPU."""
    return x.dim() == 5 and x.device.type == "cpu"


@dataclass(frozen=True)
class Staged:
    """A per-task function in two stages: ``adapt(x_support, y_support)``, the task's adapted state (a
    tree of tensors), then ``score(adapted, x_support, x_query, y_query)``, the outputs. Called whole it
    is the one per-task function, as every execution but the query loop runs it."""

    adapt: Callable[[Tensor, Tensor], Any]
    score: Callable[[Any, Tensor, Tensor, Tensor], Any]

    def __call__(self, x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor) -> Any:
        return self.score(self.adapt(x_support, y_support), x_support, x_query, y_query)


def _unstacked(stacked: Any) -> list[Any]:
    """A tree of tensors stacked over the tasks, as one tree per task (``unbind``: in the backward pass
    one node stacks the tasks' gradients, rather than one zero-filled tensor per task and leaf); the
    inverse of ``_stacked``."""
    leaves, spec = tree_flatten(stacked)
    return [tree_unflatten(list(task), spec) for task in zip(*(leaf.unbind() for leaf in leaves))]


def _stacked(outputs: list[Any]) -> Any:
    """Per-task outputs (trees of tensors alike) stacked over the tasks."""
    leaves, spec = tree_flatten(outputs[0])
    each = [tree_flatten(output)[0] for output in outputs]
    return tree_unflatten([torch.stack([task[i] for task in each]) for i in range(len(leaves))], spec)


@dataclass(frozen=True)
class Execution:
    """chunk: tasks vmapped at once (None: the whole batch; unused by a loop).  layout: the channels
    layout (where it applies).  loop: one task at a time in Python.  fused: in a loop, torch's fused
    batch norm.  query_loop: a ``Staged`` function's adaptation vmapped (by ``chunk``), its scoring one task
    at a time (any other function runs vmapped)."""

    chunk: int | None = None
    layout: bool = True
    loop: bool = False
    fused: bool = False
    query_loop: bool = False

    def __post_init__(self) -> None:
        if self.fused and not self.loop:  # under vmap torch's batch norm's second derivative is wrong
            raise ValueError("Execution(fused=True) needs loop=True: torch's fused batch norm runs only in a loop")
        if self.query_loop and self.loop:
            raise ValueError("Execution(query_loop=True) vmaps the adaptation: it excludes loop=True")

    @property
    def name(self) -> str:
        base = "loop" if self.loop else "vmap" if self.chunk is None else f"vmap/{self.chunk}"
        stages = "+query_loop" if self.query_loop else ""
        return base + stages + ("+fused_norm" if self.fused else "") + ("+channels_last" if self.layout else "")

    def run(self, per_task: Callable[..., Any], *per_episode: Tensor) -> Any:
        """``per_task`` of each episode's slices of ``per_episode`` (x_support, y_support, x_query,
        y_query, each [B, ...]), its outputs (a tree of tensors) stacked over the episodes."""
        x_support, y_support, x_query, y_query = per_episode
        lay_out = _channels_last if self.layout and layout_applies(x_query) else (lambda x: x)
        if self.query_loop and isinstance(per_task, Staged):
            adapted = _unstacked(vmap(per_task.adapt, chunk_size=self.chunk)(x_support, y_support))
            return _stacked(
                [
                    per_task.score(adapted[t], x_support[t], lay_out(x_query[t]), y_query[t])
                    for t in range(len(x_support))
                ]
            )
        if not self.loop:
            if self.layout:
                x_query = tasks_beside_channels(x_query)
            return vmap(per_task, chunk_size=self.chunk)(x_support, y_support, x_query, y_query)
        with fused_norm() if self.fused else nullcontext():
            return _stacked(
                [
                    per_task(lay_out(x_support[t]), y_support[t], lay_out(x_query[t]), y_query[t])
                    for t in range(len(x_support))
                ]
            )


#: full vmap, the query images beside channels where that applies (what a run uses without autotune)
DEFAULT = Execution()


def candidates(tasks: int, layout: bool, fused: bool = False, staged: bool = False) -> list[Execution]:
    """The executions worth timing for a batch of ``tasks`` episodes: full vmap, vmap in chunks of the
    powers of two from 2 below ``tasks``, the per-task loop, with torch's fused batch norm when ``fused``
    (the algorithm and the model allow it), and when ``staged`` (the algorithm's step is ``Staged``) the
    query loop; each with and without the channels layout when ``layout`` (it applies to this batch),
    else without. The first is ``DEFAULT`` as it runs on this batch."""
    chunks = [None, *(2**i for i in range(1, tasks.bit_length()) if 2**i < tasks)]
    ways = [Execution(chunk, False) for chunk in chunks] + [Execution(None, False, loop=True, fused=fused)]
    ways += [Execution(None, False, query_loop=True)] if staged else []
    return [replace(way, layout=True) for way in ways] + ways if layout else ways
