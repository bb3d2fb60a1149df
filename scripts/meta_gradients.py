"""The meta-gradient a benchmark step computes, and how far it lies from another: the check that
``scripts/gpu_check.py`` runs on the device and the tests run on the CPU (loaded from scripts/ by both).

    reference = meta_gradient(benchmark.loop_step, *float64(benchmark.sinusoid_setup(device)))
    error = relative_error(meta_gradient(benchmark.vmap_step, *float64(...)), reference)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from metalab.training.precision import Precision
from metalab.types import Params

__all__ = ["float64", "meta_gradient", "relative_error"]


def meta_gradient(step: Callable[[Any, Any], None], algo: Any, batch: Any) -> Params:
    """The meta-gradient ``step(algo, batch)`` hands to ``algo.meta_step``, without the update: that
    call is intercepted, so the gradient of any step that ends in ``meta_step`` (the vmapped
    ``train_step``, the per-task loops, iMAML's implicit surrogate) is read the same way."""
    captured: Params = {}

    def capture(loss: torch.Tensor) -> float:
        params = algo.meta_parameters()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        captured.update({k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)})
        return 0.0

    algo.meta_step = capture
    try:
        step(algo, batch)
    finally:
        del algo.meta_step  # the class's method again
    return {k: g.detach() for k, g in captured.items()}


def relative_error(value: Params, reference: Params) -> float:
    """||value - reference|| / ||reference|| over all entries, computed in float64."""
    difference = sum(float((value[k].double() - r.double()).square().sum()) for k, r in reference.items())
    norm = sum(float(r.double().square().sum()) for r in reference.values())
    return math.sqrt(difference / max(norm, 1e-300))


def float64(setup: tuple[Any, Any]) -> tuple[Any, Any]:
    """(algo, batch) of a benchmark ``setup()`` made float64 (``trainer.precision=64``)."""
    algo, batch = setup
    precision = Precision.of("64", next(iter(algo.meta_parameters().values())).device)
    return precision.prepare(algo), precision.batch(batch)
