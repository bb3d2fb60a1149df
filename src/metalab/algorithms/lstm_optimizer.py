"""The learned LSTM optimizer (Andrychowicz et al., NIPS 2016): meta-train a coordinatewise LSTM
(``metalab.optim.lstm_rule``) to optimise problems from a family, by truncated backpropagation through
its own updates.

One ``train_step`` takes a fresh batch of problems and optimises each for ``optimizee_steps``
steps, theta_{t+1} = theta_t + m(grad f(theta_t); phi). Every ``unroll`` steps it makes one
meta-update on the truncation's meta-loss (Eq. 3 restricted to the truncation)

    L(phi) = sum_{t = s+1}^{s+unroll} w_t f_t(theta_t)     (mean over the problems of the batch),

then detaches the parameters and the LSTM states, so the next truncation starts from their values.
solver=first_order drops second derivatives (d grad_t / d phi = 0, the paper's choice);
solver=unroll keeps them. Evaluation optimises held-out problems with the rule for
``eval_optimizee_steps`` steps and scores where they end.

``LSTMOptimizer`` holds what every batch family shares (the rule, the truncated-BPTT meta-update, the
rollout of held-out problems); one subclass per family says what its batch is as problems for the
rule (``problems``) and how a held-out problem is scored (``evaluate``):

- ``OptimizeeLSTMOptimizer``, an optimizee family (quadratic, the MNIST network): each problem's own
  loss, scored by the loss after the last step (``final_loss``); ``compare`` scores the tuned
  hand-designed optimizers on the same problems, which the trainer's test records beside it.
- ``EpisodicLSTMOptimizer``, episodes (sinusoid, Omniglot, ...): the rule trains the model from its
  initial parameters (the same for every episode, kept in the state_dict) on the support loss, the
  meta-loss is the query loss along the way, and evaluation reports the sampler's metric on the query set.

``LSTMOptimizer(model, tasks, ...)``, which algo=lstm_optimizer names, builds the subclass of the
sampler's batch kind.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.utils import parameters_to_vector

from metalab.algorithms.base import Algorithm, OptimizerFactory, takes_context
from metalab.errors import require
from metalab.optim.baselines import baseline_trajectory
from metalab.optim.lstm_rule import CoordinatewiseLSTM
from metalab.tasks.base import BatchKind, TaskSampler
from metalab.tasks.optimizees.base import OptimizeeBatch
from metalab.types import Params, TaskBatch

__all__ = ["EpisodicLSTMOptimizer", "LSTMOptimizer", "OptimizeeLSTMOptimizer", "Truncation"]


class Problems(NamedTuple):
    """A batch seen by the rule: the starting parameters [B, D]; ``loss(theta, step)`` [B], whose
    gradient the rule reads; ``meta_loss(theta, step)`` [B], what the meta-objective sums (None: the
    same as ``loss``)."""

    start: Tensor
    loss: Callable[[Tensor, int], Tensor]
    meta_loss: Callable[[Tensor, int], Tensor] | None


class Truncation(NamedTuple):
    """One truncation of a trajectory: its meta-loss (differentiable in the LSTM's weights) and the
    losses f_t(theta_t) of its steps t = s+1 .. s+unroll, detached, [steps, B]."""

    meta_loss: Tensor
    losses: Tensor


class LSTMOptimizer(Algorithm):
    """Meta-learn the weights of a ``CoordinatewiseLSTM`` on a family of problems.

    hidden_size, num_layers, preprocess, output_scale: the rule (paper: 20, 2, 10, 0.1).
    optimizee_steps: steps each training problem is optimised for (paper: 100).
    unroll: steps per truncation, one meta-update each (paper: 20).
    eval_optimizee_steps: steps at validation/test (None: optimizee_steps; the paper also tries 200).
    loss_weights: w_t >= 0 of the meta-loss for the 1st..unroll-th step of a truncation, not all 0 (None: all 1).
    report_steps: evaluation also reports the score after these step counts, as "<metric>@<step>".
    init_rule: the trained rule of a learned-optimizer run (``algo.init_rule=<run dir>``, loaded by the
    application) as the starting point, its shape equal to this one's; with trainer.iterations=0 the
    run only evaluates that rule, e.g. on another family (the paper's generalisation tests).

    ``model`` is what the rule trains on episodes; an optimizee family defines its own function and
    leaves ``model`` unused.
    """

    name = "lstm_optimizer"
    solvers = ("first_order", "unroll")
    solver_advice: ClassVar[dict[str, str]] = {
        "implicit": "the learned optimizer is meta-trained by backpropagation through its unrolled updates, not "
        "through the solution of an inner problem (solver=first_order is the paper's)"
    }
    accepts: ClassVar[tuple[BatchKind, ...]] = ("optimizees", "episodes")

    def __new__(cls, model: Any = None, tasks: Any = None, *args: Any, **kwargs: Any) -> LSTMOptimizer:
        """``LSTMOptimizer(...)`` builds the subclass of the sampler's batch kind (``FAMILIES``), so that
        the one algo=lstm_optimizer serves every family; a subclass named directly is built as itself."""
        if cls is LSTMOptimizer:
            cls.check_tasks(tasks)  # a kind no family trains on: refused in one sentence
            cls = FAMILIES[getattr(tasks, "batch_kind", "episodes")]  # a TaskSpec (metalab.inference): episodes
        return super().__new__(cls, model, tasks, *args, **kwargs)  # Recorded keeps the constructor's arguments

    def __init__(
        self,
        model: nn.Module,
        tasks: TaskSampler,
        solver: Any,
        meta_optimizer: OptimizerFactory,
        grad_clip_norm: float | None = None,
        grad_clip_value: float | None = None,
        *,
        hidden_size: int = 20,
        num_layers: int = 2,
        preprocess: float | None = 10.0,
        output_scale: float = 0.1,
        optimizee_steps: int = 100,
        unroll: int = 20,
        eval_optimizee_steps: int | None = None,
        loss_weights: Sequence[float] | None = None,
        report_steps: Sequence[int] = (),
        init_rule: CoordinatewiseLSTM | None = None,
    ):
        eval_optimizee_steps = optimizee_steps if eval_optimizee_steps is None else eval_optimizee_steps
        for key, value in (
            ("optimizee_steps", optimizee_steps),
            ("unroll", unroll),
            ("eval_optimizee_steps", eval_optimizee_steps),
        ):
            require(isinstance(value, int) and value >= 1, f"algo.{key} must be an integer >= 1 (got {value!r}).")
        require(
            loss_weights is None or len(loss_weights) == unroll,
            f"algo.loss_weights must hold algo.unroll={unroll} weights, one per step of a truncation "
            f"(got {None if loss_weights is None else len(loss_weights)}), or be null for all 1.",
        )
        require(
            loss_weights is None or (min(loss_weights) >= 0 and max(loss_weights) > 0),
            f"algo.loss_weights must be >= 0, not all 0 (got {list(loss_weights or ())}): a negative weight trains "
            "the rule to raise that step's loss, all 0 trains nothing; null weights every step 1.",
        )
        report_steps = sorted(set(report_steps))
        require(
            all(0 <= s <= eval_optimizee_steps for s in report_steps),
            f"algo.report_steps must lie in [0, algo.eval_optimizee_steps={eval_optimizee_steps}] "
            f"(got {report_steps}).",
        )
        self.rule = CoordinatewiseLSTM(hidden_size, num_layers, preprocess, output_scale)
        if init_rule is not None:
            self.rule.load_state_dict(self._trained_rule(init_rule).state_dict())
        self.optimizee_steps, self.unroll, self.eval_optimizee_steps = optimizee_steps, unroll, eval_optimizee_steps
        self.loss_weights = None if loss_weights is None else [float(w) for w in loss_weights]
        self.report_steps = report_steps
        super().__init__(model, tasks, solver, meta_optimizer, grad_clip_norm, grad_clip_value)
        self.rule.to(next(model.parameters(), torch.empty(0)).device)

    def _trained_rule(self, rule: CoordinatewiseLSTM) -> CoordinatewiseLSTM:
        """``algo.init_rule``'s rule, refused in one sentence when its shape is not this run's."""
        shape = lambda r: (r.hidden_size, r.num_layers, r.preprocess, r.output_scale)  # noqa: E731
        require(
            shape(rule) == shape(self.rule),
            f"algo.init_rule holds a rule of (hidden_size, num_layers, preprocess, output_scale) = "
            f"{shape(rule)}, not this run's {shape(self.rule)}: set those algo keys to the rule's.",
        )
        return rule

    def meta_parameters(self) -> Params:
        return dict(self.rule.named_parameters())

    def to(self, device: torch.device | str) -> LSTMOptimizer:
        super().to(device)
        self.rule.to(device)
        return self

    @abstractmethod
    def problems(self, batch: Any) -> Problems:
        """The batch as problems for the rule."""

    # -- meta-training ------------------------------------------------------------------------
    def truncations(self, batch: Any, steps: int | None = None) -> Iterator[Truncation]:
        """Optimise the batch's problems for ``steps`` (default optimizee_steps) steps with the rule,
        yielding each truncation's meta-loss as soon as its ``unroll`` steps are done. Parameters and
        LSTM states are detached at the start of every truncation; the caller may update the rule's
        weights between truncations (``train_step`` does)."""
        steps = self.optimizee_steps if steps is None else steps
        first_order = self.solver.first_order
        problems = self.problems(batch)
        theta = problems.start
        state = self.rule.initial_state(theta.numel(), theta.device, theta.dtype)
        for start in range(0, steps, self.unroll):
            end = min(start + self.unroll, steps)
            theta, state = theta.detach().requires_grad_(True), state.detach()
            losses = []
            for step in range(start, end):
                loss = problems.loss(theta, step)
                if step > start:
                    losses.append(loss if problems.meta_loss is None else problems.meta_loss(theta, step))
                (grad,) = torch.autograd.grad(loss.sum(), theta, create_graph=not first_order, retain_graph=True)
                update, state = self.rule(grad, state)
                theta = theta + update
            losses.append((problems.meta_loss or problems.loss)(theta, end))
            weights = self.loss_weights or [1.0] * len(losses)
            meta_loss = sum(w * loss.mean() for w, loss in zip(weights, losses))
            yield Truncation(meta_loss, torch.stack(losses).detach())

    def train_step(self, batch: Any) -> dict[str, float]:
        """Optimise one batch of fresh problems, with a meta-update after every truncation."""
        losses, grad_norms = [], []
        for truncation in self.truncations(batch):
            grad_norms.append(self.meta_step(truncation.meta_loss))
            losses.append(truncation.losses)
        trajectory = torch.cat(losses)  # f_t(theta_t) (episodes: query loss), t = 1..optimizee_steps, [steps, B]
        return {
            "loss": trajectory.mean().item(),
            "final_loss": trajectory[-1].mean().item(),
            "grad_norm": sum(grad_norms) / len(grad_norms),
        }

    # -- held-out problems --------------------------------------------------------------------
    def optimize(self, batch: Any, steps: int, on_step: Callable[[int, Tensor], None] | None = None) -> Tensor:
        """The problems' parameters [B, D] after ``steps`` steps of the rule, calling
        on_step(step, theta) at every step 0..steps; nothing is kept for a meta-gradient."""
        problems = self.problems(batch)
        theta = problems.start
        state = self.rule.initial_state(theta.numel(), theta.device, theta.dtype)
        for step in range(steps + 1):
            if on_step is not None:
                on_step(step, theta)
            if step == steps:
                break
            with torch.enable_grad():
                theta = theta.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(problems.loss(theta, step).sum(), theta)
            with torch.no_grad():
                update, state = self.rule(grad, state)
                theta = theta + update
        return theta.detach()

    def trajectory(self, batch: Any, steps: int | None = None) -> Tensor:
        """The meta-objective's loss f_t(theta_t) for t = 0..steps (default eval_optimizee_steps) of
        each problem optimised by the rule (the query loss for episodes), [B, steps + 1]."""
        problems, losses = self.problems(batch), []

        def record(step: int, theta: Tensor) -> None:
            with torch.no_grad():
                losses.append((problems.meta_loss or problems.loss)(theta, step))

        self.optimize(batch, self.eval_optimizee_steps if steps is None else steps, record)
        return torch.stack(losses, dim=1)


class OptimizeeLSTMOptimizer(LSTMOptimizer):
    """The learned optimizer on an optimizee family: each problem of a batch is optimised from its own
    initial parameters on its own loss (``tasks.optimizee_loss``) and scored by the loss it reaches."""

    accepts: ClassVar[tuple[BatchKind, ...]] = ("optimizees",)

    def problems(self, batch: OptimizeeBatch) -> Problems:
        def loss(theta: Tensor, step: int) -> Tensor:
            return self.tasks.optimizee_loss(theta, batch, step)

        return Problems(batch.params.detach(), loss, None)

    def evaluate(self, batch: OptimizeeBatch) -> dict[str, Tensor]:
        """Per problem [B]: ``final_loss`` after eval_optimizee_steps steps, ``loss`` the mean of
        f_t(theta_t) over t = 1..eval_optimizee_steps (the meta-objective), and loss@<step>."""
        return self.scores(self.trajectory(batch))

    def scores(self, trajectory: Tensor) -> dict[str, Tensor]:
        """What ``evaluate`` reports of a loss trajectory [B, steps + 1], the rule's or a baseline's."""
        return {
            "final_loss": trajectory[:, -1],
            "loss": trajectory[:, 1:].mean(dim=1),
            **{f"loss@{step}": trajectory[:, step] for step in self.report_steps},
        }

    def baseline_curves(self, batch: OptimizeeBatch, steps: int | None = None) -> dict[str, Tensor]:
        """Loss against step, f_t(theta_t) for t = 0..steps (default eval_optimizee_steps), [B, steps + 1],
        of each hand-designed optimizer the family has tuned rates for (``tasks.baseline_lrs``), on the
        problems the rule optimises."""
        problems = self.problems(batch)
        steps = self.eval_optimizee_steps if steps is None else steps
        return {
            name: baseline_trajectory(name, lr, problems.start, problems.loss, steps)
            for name, lr in self.tasks.baseline_lrs.items()
        }

    def curves(self, batch: OptimizeeBatch, steps: int | None = None) -> dict[str, Tensor]:
        """Loss against step of the rule ("learned") and of each tuned baseline on the same problems,
        [B, steps + 1] each: the paper's Figures 2-5 (scripts/plot.py)."""
        return {"learned": self.trajectory(batch, steps), **self.baseline_curves(batch, steps)}

    def compare(self, batch: OptimizeeBatch) -> dict[str, dict[str, Tensor]]:
        """{baseline: scores} of the tuned baselines on these problems, scored as ``evaluate`` scores
        the rule: what the trainer's test records beside the rule's scores, as <baseline>/final_loss etc."""
        return {name: self.scores(curve) for name, curve in self.baseline_curves(batch).items()}


class EpisodicLSTMOptimizer(LSTMOptimizer):
    """The learned optimizer on episodes: the rule trains the model from its initial parameters on each
    support set and is meta-trained on the query loss; the initial parameters are part of the state."""

    accepts: ClassVar[tuple[BatchKind, ...]] = ("episodes",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._takes_context = takes_context(self.model)

    def state_dict(self) -> dict[str, Any]:
        """The rule's weights and meta-optimizer, and the model's initial parameters (episodes start there)."""
        return {**super().state_dict(), "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.model.load_state_dict(state["model"])

    def problems(self, batch: TaskBatch) -> Problems:
        """The model, from its initial parameters (the same for every episode), trained on each
        support set and meta-trained on the query set."""
        start = parameters_to_vector(self.model.parameters()).detach()

        def support(theta: Tensor, step: int) -> Tensor:
            return vmap(self._episode_loss)(theta, batch.x_support, batch.y_support, batch.x_support)

        def query(theta: Tensor, step: int) -> Tensor:
            return vmap(self._episode_loss)(theta, batch.x_query, batch.y_query, batch.x_support)

        return Problems(start.expand(batch.num_tasks, -1), support, query)

    def predict(self, theta: Tensor, x: Tensor, context: Tensor) -> Tensor:
        """The model at flat parameters theta [D] on one episode's examples x, its support set as
        context for models that take one."""
        params, offset = {}, 0
        for name, value in self.model.named_parameters():
            params[name] = theta[offset : offset + value.numel()].view_as(value)
            offset += value.numel()
        kwargs = {"context": context} if self._takes_context else {}
        return functional_call(self.model, params, (x,), kwargs)

    def _episode_loss(self, theta: Tensor, x: Tensor, y: Tensor, context: Tensor) -> Tensor:
        return self.tasks.loss(self.predict(theta, x, context), y)

    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Per episode [B]: the query ``loss`` and the sampler's metric after eval_optimizee_steps steps
        on the support set, and <metric>@<step>."""
        metric = self.tasks.metric_name
        scores: dict[str, Tensor] = {}

        def query_metric(theta: Tensor) -> Tensor:
            per_episode = lambda th, x, y, c: self.tasks.metric(self.predict(th, x, c), y)  # noqa: E731
            with torch.no_grad():
                return vmap(per_episode)(theta, batch.x_query, batch.y_query, batch.x_support)

        def record(step: int, theta: Tensor) -> None:
            if step in self.report_steps:
                scores[f"{metric}@{step}"] = query_metric(theta)

        theta = self.optimize(batch, self.eval_optimizee_steps, record)
        with torch.no_grad():
            scores["loss"] = self.problems(batch).meta_loss(theta, self.eval_optimizee_steps)
        scores[metric] = query_metric(theta)
        return scores


#: the class ``LSTMOptimizer(...)`` builds for each batch kind a sampler yields
FAMILIES: dict[str, type[LSTMOptimizer]] = {
    family.accepts[0]: family for family in (OptimizeeLSTMOptimizer, EpisodicLSTMOptimizer)
}
