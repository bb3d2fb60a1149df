"""The algorithm contract: an algorithm owns its meta-parameters and optimizer; the trainer only
calls ``train_step`` and ``evaluate`` and never learns what the algorithm is.

An algorithm declares what it pairs with: the kinds of batch it trains on (``accepts``) and of task
(``task_kinds``: a prototype classifier trains on classification episodes only), the solvers
it supports (``solvers``) and whether it trains under several processes (``distributed_ok``). The
sentences that refuse a mismatch are generated from those declarations and from the catalog of what a
user can name (``metalab.algorithms.catalog``)."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metalab import distributed
from metalab.algorithms.catalog import catalog, or_list
from metalab.errors import ConfigError, require
from metalab.hypergrad.apply import NonFiniteLossError, apply_gradients
from metalab.hypergrad.linear_solvers import solve_exact
from metalab.recorded import Recorded
from metalab.tasks.base import BATCH_KINDS, BatchKind, TaskSampler
from metalab.tasks.spec import TaskSpec
from metalab.types import Params, TaskBatch

__all__ = [
    "Algorithm",
    "EXACT_LIMIT",
    "NonFiniteLossError",
    "OptimizerFactory",
    "build_optimizer",
    "check_exact_size",
    "takes_context",
]

OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]
#: parameters: the largest model whose dense Hessian solver=exact builds (100 MB in float32)
EXACT_LIMIT = 5000


def build_optimizer(
    factory: OptimizerFactory, params: Iterable[Tensor], key: str, remedy: str
) -> torch.optim.Optimizer:
    """``factory(list(params))``, with torch's refusal of its settings (torch.optim validates lr, betas,
    eps, momentum, weight_decay: ValueError) made the ConfigError "<key> rejected its settings (<why>):
    fix that value<remedy>." """
    try:
        return factory(list(params))
    except ValueError as error:
        raise ConfigError(f"{key} rejected its settings ({error}): fix that value{remedy}.") from None


def check_exact_size(solver: Any, model: nn.Module) -> None:
    """Refuse, in one sentence, the dense solver (``solve_exact``) for a model of more than
    ``EXACT_LIMIT`` parameters: it builds their n x n Hessian (per task, for an episodic algorithm)."""
    if solver.kind != "implicit" or solver.solve is not solve_exact:
        return
    size = sum(p.numel() for p in model.parameters())
    require(
        size <= EXACT_LIMIT,
        f"solver=exact builds a dense {size}x{size} matrix for this model ({size * size * 4 / 2**30:.1f} GiB in "
        f"float32): use an iterative solver (solver=cg, gmres or neumann), or a model of at most {EXACT_LIMIT} "
        "parameters.",
    )


def takes_context(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes a ``context`` argument (a task's support set, from which a model
    with batch norm takes its statistics; ``metalab.models.norm``): such a model is called with it."""
    return "context" in inspect.signature(model.forward).parameters


class Algorithm(Recorded, ABC):
    """Base class of the algorithm plugins.

    Subclasses set ``name`` (the one ``algo=<name>`` selects), ``solvers`` (the solver names they
    support, e.g. ("unroll", "first_order")), ``accepts``, ``task_kinds`` and ``distributed_ok``, and
    may say in ``solver_advice`` why they refuse the solvers of a kind ({"implicit": "<reason>"}); the
    remedy of a refusal is generated.
    """

    name: ClassVar[str]
    solvers: ClassVar[tuple[str, ...]]
    #: {solver kind ("unroll" | "implicit"): why this algorithm refuses the solvers of that kind}
    solver_advice: ClassVar[dict[str, str]] = {}
    #: the kinds of batch it trains on (a sampler's ``batch_kind``)
    accepts: ClassVar[tuple[BatchKind, ...]] = ("episodes",)
    #: the kinds of task it trains on (a sampler's ``kind``: "classification" | "regression"); None: any
    task_kinds: ClassVar[tuple[str, ...] | None] = None
    #: True when data-parallel training under torchrun is right for it (``metalab.distributed``):
    #: its meta-gradient is the mean of per-task terms, averaged over ranks in ``meta_step``
    distributed_ok: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        tasks: TaskSampler,
        solver: Any,
        meta_optimizer: OptimizerFactory,
        grad_clip_norm: float | None = None,
        grad_clip_value: float | None = None,
    ):
        self.check_tasks(tasks)
        self.check_solver(solver, tasks)
        for key, value in (("grad_clip_norm", grad_clip_norm), ("grad_clip_value", grad_clip_value)):
            require(value is None or value > 0, f"trainer.{key} must be positive or null (got {value}).")
        self.model, self.tasks, self.solver = model, tasks, solver
        self.grad_clip_norm, self.grad_clip_value = grad_clip_norm, grad_clip_value
        self.optimizer = build_optimizer(
            meta_optimizer,
            self.meta_parameters().values(),
            "trainer.meta_optimizer",
            ", e.g. trainer.meta_optimizer.lr=0.001",
        )

    @classmethod
    def trains_on(cls, tasks: TaskSampler | TaskSpec | type[TaskSampler]) -> bool:
        """Whether this algorithm trains on what ``tasks`` (a sampler, its class or a TaskSpec) yields:
        batches of a kind in ``accepts``, of tasks of a kind in ``task_kinds``."""
        fits_kind = cls.task_kinds is None or getattr(tasks, "kind", None) in cls.task_kinds
        return tasks.batch_kind in cls.accepts and fits_kind

    @classmethod
    def check_tasks(cls, tasks: TaskSampler | TaskSpec | type[TaskSampler]) -> None:
        """Refuse a sampler whose batches this algorithm does not train on, in one sentence naming
        the samplers it does train on and the algorithms that train on that sampler. ``tasks`` may be
        a sampler class: the config is checked before any data is read."""
        kind = tasks.batch_kind  # a TaskSpec's is "episodes": a trained run loaded without its data
        if cls.trains_on(tasks):
            return
        task_kind = getattr(tasks, "kind", None)
        sampler = tasks.__name__ if isinstance(tasks, type) else type(tasks).__name__
        known = catalog()
        partners, others = known.yielding(cls.accepts, cls.task_kinds), known.accepting(kind, task_kind)
        wanted = or_list(BATCH_KINDS[k] for k in cls.accepts)
        wanted = f"{or_list(cls.task_kinds)} {wanted}" if cls.task_kinds else wanted
        given = BATCH_KINDS[kind] if kind not in cls.accepts else f"{task_kind} {BATCH_KINDS[kind]}"
        raise ConfigError(
            f"algo={cls.name} trains on {wanted}, but {sampler} yields {given}: "
            f"pair algo={cls.name} with {f'tasks={or_list(partners)}' if partners else f'a sampler of {wanted}'}, "
            f"or give {sampler} to {f'algo={or_list(others)}' if others else 'an algorithm that trains on them'}."
        )

    @classmethod
    def check_solver(cls, solver: Any, tasks: TaskSampler | TaskSpec) -> None:
        """Refuse a solver this algorithm does not support, in one sentence with its reason (by the
        solver's kind) and the remedy: its own solvers, or the algorithms that train on these tasks
        with that solver."""
        if solver.name in cls.solvers:
            return
        reason = cls.solver_advice.get(solver.kind)
        supporting = catalog().supporting(solver.name, tasks.batch_kind, getattr(tasks, "kind", None))
        others = [name for name in supporting if name != cls.name]
        raise ConfigError(
            f"algo={cls.name} does not support solver={solver.name}: {f'{reason}; ' if reason else ''}"
            f"use solver={or_list(cls.solvers)}"
            f"{f', or algo={or_list(others)} with solver={solver.name}' if others else ''}."
        )

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

    def compare(self, batch: Any) -> dict[str, dict[str, Tensor]]:
        """Other methods scored on the same held-out batch, {method: per-unit values like ``evaluate``'s},
        which the trainer's test records as "<method>/<metric>" (the learned optimizer: its tuned
        baselines). None by default."""
        return {}

    def executions(self, batch: Any) -> list[Any]:
        """The ways this algorithm can run its step on batches like ``batch``, which give the same numbers
        and which ``metalab.training.autotune`` times to keep the fastest (``use``), the one it runs
        without tuning first; none by default: nothing to choose (``EpisodicAlgorithm`` offers its
        ``metalab.algorithms.execution`` ones)."""
        return []

    def use(self, execution: Any) -> None:
        """Run from now on as ``execution``, one of ``executions``."""
        raise NotImplementedError(f"{type(self).__name__} offers no executions to choose from")

    # -- shared machinery ---------------------------------------------------------------------
    def to(self, device: torch.device | str) -> Algorithm:
        self.model.to(device)
        return self

    def meta_step(self, loss: Tensor) -> float:
        """Backpropagate ``loss``, clip, and step the meta-optimizer (``apply_gradients``). Returns the
        gradient norm after the value clipping and before the norm clipping. Refuses
        (NonFiniteLossError) to apply a NaN/inf loss or gradient, so the meta-parameters stay at their
        last good values. Under several processes the gradients are averaged over the ranks first, in
        the same all_reduce that tells every rank whether the loss was finite on all of them
        (``metalab.distributed.average_gradients``): every rank takes the same step and the same
        decision."""
        finite = bool(torch.isfinite(loss))
        self.optimizer.zero_grad(set_to_none=True)
        if finite or distributed.active():  # every rank joins the all_reduce below
            loss.backward()
        params = list(self.meta_parameters().values())
        if not distributed.average_gradients(params, finite):
            where = loss.item() if not finite else "NaN or inf on another process"
            raise NonFiniteLossError(f"the meta-loss is {where}")
        return apply_gradients(
            params,
            [p.grad for p in params],
            self.optimizer,
            max_norm=self.grad_clip_norm,
            max_value=self.grad_clip_value,
            what="meta-gradient",
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "meta_parameters": {k: v.detach().clone() for k, v in self.meta_parameters().items()},
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for key, value in self.meta_parameters().items():
                value.copy_(state["meta_parameters"][key])
        self.optimizer.load_state_dict(state["optimizer"])
