"""Sinusoid episodes for the episodic algorithms' tests: a float64 batch for oracles, and a seeded short
training run that says how much the validation MSE fell."""

from __future__ import annotations

from metalab.tasks.episodic.sinusoid import Sinusoid
from metalab.types import TaskBatch

__all__ = ["float64_batch", "mse_before_and_after"]


def float64_batch(tasks: Sinusoid, num_tasks: int, seed: int = 0) -> TaskBatch:
    """``num_tasks`` training episodes of ``tasks`` in float64."""
    batch = tasks.sample(num_tasks, "train", tasks.generator(seed))
    return type(batch)(*(t.double() for t in (batch.x_support, batch.y_support, batch.x_query, batch.y_query)))


def mse_before_and_after(algorithm, tasks: Sinusoid, iterations: int = 100, meta_batch_size: int = 5):
    """The mean validation MSE after adaptation on 100 fixed episodes, before and after ``iterations``
    training steps on seeded episodes."""
    val, generator = tasks.sample(100, "val", tasks.generator(1)), tasks.generator(0)
    before = algorithm.evaluate(val)["mse"].mean().item()
    for _ in range(iterations):
        algorithm.train_step(tasks.sample(meta_batch_size, "train", generator))
    return before, algorithm.evaluate(val)["mse"].mean().item()
