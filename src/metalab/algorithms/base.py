"""The algorithm contract: an algorithm owns its meta-parameters and optimizer; the trainer only
calls ``train_step`` and ``evaluate`` and never learns what the algorithm is."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metalab import distributed
from metalab.errors import ConfigError, require
from metalab.tasks.base import TaskSampler
from metalab.types import Params, TaskBatch

__all__ = ["Algorithm", "NonFiniteLossError", "OptimizerFactory", "build_optimizer"]

OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]


class NonFiniteLossError(RuntimeError):
    """The meta-loss or its gradient became NaN or infinite; nothing was updated."""


def build_optimizer(factory: OptimizerFactory, params: Iterable[Tensor], key: str,
                    remedy: str) -> torch.optim.Optimizer:
    """``factory(list(params))``, with torch's refusal of its settings (torch.optim validates lr, betas,
    eps, momentum, weight_decay: ValueError) made the ConfigError "<key> rejected its settings (<why>):
    fix that value<remedy>." """
    try:
        return factory(list(params))
    except ValueError as error:
        raise ConfigError(f"{key} rejected its settings ({error}): fix that value{remedy}.") from None


class Algorithm(ABC):
    """Base class of the algorithm plugins.

    Subclasses set ``name`` and ``solvers`` (the solver names they support, e.g. ("unroll",
    "first_order")) and may give, in ``solver_advice``, the reason and remedy for a solver they
    reject (e.g. {"cg": "implicit gradients need a proximal inner problem: use algo=imaml"}).
    """

    name: ClassVar[str]
    solvers: ClassVar[tuple[str, ...]]
    solver_advice: ClassVar[dict[str, str]] = {}
    #: the kinds of batch it trains on: a sampler's ``batch_kind`` ("episodes" when it names none,
    #: "optimizees" for the optimizee families); ``tasks_advice`` names samplers that fit
    accepts: ClassVar[tuple[str, ...]] = ("episodes",)
    tasks_advice: ClassVar[str | None] = None
    #: True when data-parallel training under torchrun is right for it (``metalab.distributed``):
    #: its meta-gradient is the mean of per-task terms, averaged over ranks in ``meta_step``
    distributed_ok: ClassVar[bool] = False

    def __init__(self, model: nn.Module, tasks: TaskSampler, solver: Any,
                 meta_optimizer: OptimizerFactory, grad_clip_norm: float | None = None,
                 grad_clip_value: float | None = None):
        kind = getattr(tasks, "batch_kind", "episodes")
        if kind not in self.accepts:
            advice = self.tasks_advice or f"train them with {getattr(tasks, 'consumers', 'another algo')}"
            raise ConfigError(f"algo={self.name} trains on {' or '.join(self.accepts)}, but {type(tasks).__name__} "
                              f"yields {kind}: {advice}.")
        solver_name = getattr(solver, "name", type(solver).__name__)
        if solver_name not in self.solvers:
            reason = self.solver_advice.get(solver_name, f"use one of solver={', '.join(self.solvers)}")
            raise ConfigError(f"algo={self.name} does not support solver={solver_name}: {reason}.")
        for key, value in (("grad_clip_norm", grad_clip_norm), ("grad_clip_value", grad_clip_value)):
            require(value is None or value > 0, f"trainer.{key} must be positive or null (got {value}).")
        self.model, self.tasks, self.solver = model, tasks, solver
        self.grad_clip_norm, self.grad_clip_value = grad_clip_norm, grad_clip_value
        self.optimizer = build_optimizer(meta_optimizer, self.meta_parameters().values(), "trainer.meta_optimizer",
                                         ", e.g. trainer.meta_optimizer.lr=0.001")

    # -- what a subclass provides -------------------------------------------------------------
    def meta_parameters(self) -> Params:
        """The tensors the meta-optimizer updates (default: the model's parameters)."""
        return dict(self.model.named_parameters())

    @abstractmethod
    def train_step(self, batch: TaskBatch) -> dict[str, float]:
        """One meta-update on a batch of episodes; returns scalar metrics (at least "loss")."""

    @abstractmethod
    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Adapt to each episode and score its query set without touching the meta-parameters.
        Returns per-task values, each of shape [B]; the sampler's ``metric_name`` is among them."""

    def diagnostics(self, batch: Any) -> dict[str, float]:
        """Measurements costlier than a step, which the trainer takes every ``log_every`` iterations
        on that iteration's batch and logs beside the training metrics (e.g. how well an implicit
        algorithm solved its inner problem and its linear system). They change no state. None by
        default."""
        return {}

    # -- shared machinery ---------------------------------------------------------------------
    def to(self, device: torch.device | str) -> Algorithm:
        self.model.to(device)
        return self

    def meta_step(self, loss: Tensor) -> float:
        """Backpropagate ``loss``, clip, and step the meta-optimizer. Returns the gradient norm.
        Refuses (NonFiniteLossError) to apply a NaN/inf loss or gradient, so the meta-parameters
        stay at their last good values. Under several processes the gradients are averaged over
        the ranks first, in the same all_reduce that tells every rank whether the loss was finite on
        all of them (``metalab.distributed.average_gradients``): every rank takes the same step and
        the same decision."""
        finite = bool(torch.isfinite(loss))
        self.optimizer.zero_grad(set_to_none=True)
        if finite or distributed.active():  # every rank joins the all_reduce below
            loss.backward()
        if not distributed.average_gradients(self.meta_parameters().values(), finite):
            where = loss.item() if not finite else "NaN or inf on another process"
            raise NonFiniteLossError(f"the meta-loss is {where}")
        grad_norm = self._clip_and_check([p for p in self.meta_parameters().values() if p.grad is not None],
                                         self.grad_clip_norm)
        self.optimizer.step()
        return grad_norm

    def _clip_and_check(self, params: list[Tensor], *max_norms: float | None) -> float:
        """Clip the gradients of ``params`` in place: each element to +-``grad_clip_value`` (when set),
        then their total norm to each of ``max_norms`` in turn (None: no limit). Returns the total norm
        after the value clipping and before the norm clipping; NonFiniteLossError when it is NaN or
        inf, before the caller steps, so the meta-parameters keep their values."""
        if self.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.grad_clip_value)
        norms = [torch.nn.utils.clip_grad_norm_(params, float("inf") if m is None else m) for m in max_norms]
        if not torch.isfinite(norms[0]):
            raise NonFiniteLossError(f"the meta-gradient norm is {norms[0].item()}")
        return norms[0].item()

    def state_dict(self) -> dict[str, Any]:
        return {"meta_parameters": {k: v.detach().clone() for k, v in self.meta_parameters().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for key, value in self.meta_parameters().items():
                value.copy_(state["meta_parameters"][key])
        self.optimizer.load_state_dict(state["optimizer"])
