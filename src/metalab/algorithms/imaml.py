"""iMAML (Rajeswaran, Finn, Kakade, Levine, NeurIPS 2019): implicit meta-gradients.

Inner problem per task (Eq. 4): w* = argmin_w  L_support(w) + lam/2 ||w - theta||^2, solved
approximately by ``inner_steps`` of gradient descent (or Adam) from theta; the loop is never
differentiated. Its stationarity condition, scaled by 1/lam,

    F(w, theta) = grad L_support(w) / lam + (w - theta) = 0,

gives by the implicit function theorem (Lemma 1) the meta-gradient
    d L_query(w*) / d theta = (I + H / lam)^{-1} grad L_query(w*),   H = hess L_support(w*),
which ``metalab.hypergrad.root_vjp`` computes with the configured linear solver (CG with 5
iterations in the paper) from Hessian-vector products: memory does not grow with inner_steps.
A solver of kind "unroll" (solver=first_order) drops the inverse and uses grad L_query(w*) itself.

The formula holds only at a minimum of the inner problem. Along a direction of support curvature
h, ``inner_steps`` steps of size ``inner_lr`` close the gap to the minimum by the factor
(1 - inner_lr (h + lam))^inner_steps; where that is far from 0 the loop has barely moved, the true
derivative of w in theta is near 1 there, and the formula's lam / (lam + h) is wrong, unboundedly so
where h < -lam makes I + H / lam indefinite (w is then no minimum at all, and CG on an indefinite
system returns a vector of any size). Before this was understood, the sinusoid defaults
(inner_lr 0.01, 16 steps, lam 2: inner_lr * inner_steps * lam = 0.32) left the slow directions 72%
unsolved and the meta-gradient pointed nowhere: iMAML learned nothing. The defaults now make the
inner problem well conditioned enough to be solved in 16 steps (``configs/algo/imaml.yaml``), CG
stops at non-positive curvature (``solve_cg``), and ``diagnostics`` measures, every
``trainer.log_every`` iterations, how well both the inner problem and the linear system were solved,
warning once when the inner problem clearly was not.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import Tensor
from torch.func import grad

from metalab.algorithms.base import NonFiniteLossError, check_exact_size
from metalab.algorithms.episodic import EpisodicAlgorithm, StepCallback
from metalab.distributed import all_finite
from metalab.errors import MetalabWarning, require
from metalab.hypergrad import root_vjp, tree_norm
from metalab.optim.inner import make_inner_optimizer
from metalab.optim.lstm_rule import CoordinatewiseLSTM
from metalab.optim.newton import newton_cg
from metalab.types import Params, TaskBatch

__all__ = ["IMAML"]

#: mean relative optimality residual above which the inner problem is clearly not solved
UNSOLVED = 0.5
#: ``algo.inner_optimizer`` of the second-order inner solver
HESSIAN_FREE = "hessian_free"
INNER_OPTIMIZERS = ("sgd", "adam", "learned", HESSIAN_FREE)


class IMAML(EpisodicAlgorithm):
    """lam: strength of the proximal term (the paper's lambda = 2).  lam_damping: added to lam in the
    meta-gradient's linear system, (I + H / (lam + lam_damping)) u = grad L_query (0: the paper's
    formula, exact when the inner problem is solved; the official code adds 10, and damps CG further,
    which is lam_damping = 22 up to a factor 2 in scale).  inner_optimizer: "sgd" | "adam" | "learned"
    (``inner_rule``, the trained rule of a learned-optimizer run), each ``inner_steps`` steps at
    ``inner_lr``, or "hessian_free": ``inner_steps`` Newton-CG steps (``metalab.optim.newton``), each
    with ``inner_cg_steps`` CG iterations for its direction and a backtracking line search (the paper's
    "iMAML, Hessian-free"; ``inner_lr`` unused).  eval_lam: the proximal strength of the adaptation at
    evaluation and of a loaded learner (None: lam; 0: no proximal term, the official code's test)."""

    name = "imaml"
    distributed_ok = True
    fused_norm_ok = False  # the hypergradient differentiates Hessian-vector products: third derivatives
    query_differentiated_once = True  # the query loss gives one gradient; the Hessians are the support loss's
    solvers = ("cg", "neumann", "gmres", "exact", "first_order")
    solver_advice: ClassVar[dict[str, str]] = {
        "unroll": "iMAML differentiates the inner problem's optimality condition, not its loop"
    }

    def __init__(
        self,
        *args,
        lam: float = 2.0,
        lam_damping: float = 0.0,
        inner_optimizer: str = "sgd",
        inner_rule: CoordinatewiseLSTM | None = None,
        inner_cg_steps: int = 5,
        eval_lam: float | None = None,
        **kwargs,
    ):
        require(lam > 0, f"algo.lam must be positive (got {lam}): the paper uses algo.lam=2.0.")
        require(lam_damping >= 0, f"algo.lam_damping must be >= 0 (got {lam_damping}): 0 is the paper's formula.")
        require(
            eval_lam is None or eval_lam >= 0,
            f"algo.eval_lam must be >= 0 or null (got {eval_lam}): null adapts with algo.lam at evaluation, 0 without "
            "the proximal term (the official code's test).",
        )
        self.lam, self.lam_damping = lam, lam_damping
        self.eval_lam = lam if eval_lam is None else eval_lam
        super().__init__(*args, **kwargs)
        check_exact_size(self.solver, self.model)
        require(
            isinstance(inner_cg_steps, int) and inner_cg_steps >= 1,
            f"algo.inner_cg_steps must be an integer >= 1 (got {inner_cg_steps!r}): the paper uses 5.",
        )
        require(
            inner_optimizer == HESSIAN_FREE or inner_cg_steps == 5,
            f"algo.inner_cg_steps has no effect with algo.inner_optimizer={inner_optimizer}: it is a setting of "
            f"algo.inner_optimizer={HESSIAN_FREE}; remove it or set algo.inner_optimizer={HESSIAN_FREE}.",
        )
        self.inner_cg_steps = inner_cg_steps
        if inner_optimizer == HESSIAN_FREE:
            require(
                inner_rule is None,
                f"algo.inner_rule is only read with algo.inner_optimizer=learned (got "
                f"algo.inner_optimizer={HESSIAN_FREE}): remove algo.inner_rule or set algo.inner_optimizer=learned.",
            )
            self.inner_optimizer = None
        else:
            require(
                inner_optimizer in INNER_OPTIMIZERS,
                f"algo.inner_optimizer must be one of {list(INNER_OPTIMIZERS)} (got {inner_optimizer!r}).",
            )
            self.inner_optimizer = make_inner_optimizer(inner_optimizer, self.inner_lr, inner_rule)
        self._warned = False

    def inner_objective(self, params: Params, anchor: Params, x: Tensor, y: Tensor, lam: float | None = None) -> Tensor:
        """L_support(w) + lam/2 ||w - theta||^2 for one task (``lam``: this algorithm's by default)."""
        proximal = sum(((params[k] - anchor[k]) ** 2).sum() for k in params)
        return self.support_loss(params, x, y) + 0.5 * (self.lam if lam is None else lam) * proximal

    def optimality(self, params: Params, anchor: Params, x: Tensor, y: Tensor, lam: float | None = None) -> Params:
        """F(w, theta) = grad L_support(w) / lam + (w - theta): zero at the inner solution (``lam``: the
        proximal strength, this algorithm's by default)."""
        grads = grad(self.support_loss)(params, x, y)
        lam = self.lam if lam is None else lam
        return {k: grads[k] / lam + params[k] - anchor[k] for k in params}

    def damped_optimality(self, params: Params, anchor: Params, x: Tensor, y: Tensor) -> Params:
        """The condition whose implicit derivative is the meta-gradient: F at lam + lam_damping, so that
        root_vjp solves (I + H / (lam + lam_damping)) u = grad L_query."""
        return self.optimality(params, anchor, x, y, self.lam + self.lam_damping)

    def adapt(
        self, params: Params, x_support: Tensor, y_support: Tensor, steps: int, on_step: StepCallback | None = None
    ) -> Params:
        """The adaptation of evaluation and of a loaded learner: the inner loop with ``eval_lam``."""
        anchor = {k: v.detach() for k, v in params.items()}
        return self.inner_loop(anchor, x_support, y_support, steps, on_step, lam=self.eval_lam)

    def inner_loop(
        self,
        anchor: Params,
        x_support: Tensor,
        y_support: Tensor,
        steps: int,
        on_step: StepCallback | None = None,
        lam: float | None = None,
    ) -> Params:
        """``steps`` steps of the inner optimizer on the proximal objective from ``anchor``, guarded
        against divergence: a step that would take a task's objective above its value at the start (or
        make it NaN) is not taken, and that task's later steps are halved. Gradient descent may rise
        and fall on its way down; it only climbs past its start when its step is too large for the
        curvature (above 2 / inner_lr, which a meta-learned initialisation can reach), and then it
        diverges. The loop stays differentiable in ``anchor`` when that is (``unrolled_meta_gradient``).
        With algo.inner_optimizer=hessian_free, Newton-CG steps instead (their line search never climbs).
        ``lam``: the proximal strength (this algorithm's by default)."""
        if self.inner_optimizer is None:
            return newton_cg(
                self.inner_objective, dict(anchor), anchor, x_support, y_support, lam,
                steps=steps, cg_steps=self.inner_cg_steps, on_step=on_step,
            )  # fmt: skip
        objective = torch.func.grad_and_value(self.inner_objective)
        params, state = dict(anchor), self.inner_optimizer.init(anchor)
        grads, start = objective(params, anchor, x_support, y_support, lam)
        scale = torch.ones_like(start)  # per task under vmap
        for step in range(steps):
            if on_step is not None:
                on_step(step, params)
            updates, state = self.inner_optimizer.update(grads, state)
            trial = {k: params[k] + scale * updates[k] for k in params}
            trial_grads, trial_value = objective(trial, anchor, x_support, y_support, lam)
            bounded = trial_value <= start  # False for NaN
            params = {k: torch.where(bounded, trial[k], params[k]) for k in params}
            grads = {k: torch.where(bounded, trial_grads[k], grads[k]) for k in grads}
            scale = torch.where(bounded, scale, scale / 2)
        if on_step is not None:
            on_step(steps, params)
        return params

    def meta_gradient(self, batch: TaskBatch, residuals: bool = False):
        """Mean implicit meta-gradient over the batch, and per-task query losses and metrics [B];
        with ``residuals``, also per task [B] the inner problem's relative optimality residual
        ||F(w, theta)|| / ||F(theta, theta)|| (1 where the loop did not move, 0 at the solution) and the
        linear solve's relative residual in the (damped) system it solves (``metalab.hypergrad.Residuals``)."""
        theta = {k: v.detach() for k, v in self.initial_params().items()}
        implicit = self.solver.kind == "implicit"
        require(implicit or not residuals, "residuals are measured for the implicit solvers only.")

        def per_task(x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor):
            adapted = self.inner_loop(theta, x_support, y_support, self.inner_steps)

            def query_loss(params: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
                loss, metric = self.query_scores(params, x_query, y_query, x_support)
                return loss, (loss, metric)

            outer_grad, (loss, metric) = grad(query_loss, has_aux=True)(adapted)
            if not implicit:
                return outer_grad, loss, metric
            condition = self.damped_optimality
            if not residuals:
                return root_vjp(condition, adapted, theta, outer_grad, self.solver, x_support, y_support), loss, metric
            outer_grad, measured = root_vjp(
                condition, adapted, theta, outer_grad, self.solver, x_support, y_support, residuals=True
            )
            inner = [tree_norm(self.optimality(w, theta, x_support, y_support)) for w in (adapted, theta)]
            return outer_grad, loss, metric, inner[0] / inner[1], measured.linear

        grads, *rest = self.over_tasks(per_task, batch)
        return {k: g.mean(0) for k, g in grads.items()}, *rest

    def unrolled_meta_gradient(self, batch: TaskBatch) -> Params:
        """Mean meta-gradient over the batch by backpropagation through the same inner loop (the
        anchor and the starting point both theta): the reference the implicit one approaches as the
        inner problem is solved. Memory grows with inner_steps; for checks, not for training."""
        theta = {k: v.detach() for k, v in self.initial_params().items()}

        def per_task(x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor) -> Params:
            def query_loss(anchor: Params) -> Tensor:
                adapted = self.inner_loop(anchor, x_support, y_support, self.inner_steps)
                return self.query_scores(adapted, x_query, y_query, x_support)[0]

            return grad(query_loss)(theta)

        return {k: g.mean(0) for k, g in self.over_tasks(per_task, batch).items()}

    def train_step(self, batch: TaskBatch) -> dict[str, float]:
        meta_grad, losses, metrics = self.meta_gradient(batch)
        loss = losses.mean()
        if not all_finite(loss):  # on every process
            raise NonFiniteLossError(f"the query loss is {loss.item()}")
        # A surrogate whose gradient in theta is the implicit meta-gradient, so that the shared
        # meta_step (clipping, finiteness checks, the optimizer) applies unchanged.
        surrogate = sum((p * meta_grad[k]).sum() for k, p in self.initial_params().items())
        return self.step_report(losses, metrics, self.meta_step(surrogate))

    def diagnostics(self, batch: TaskBatch) -> dict[str, float]:
        """``inner_residual`` and ``linear_residual`` (``meta_gradient``), means over the batch, at the
        current theta; warns once when the inner problem is clearly not solved. Nothing for
        solver=first_order, which solves no linear system."""
        if self.solver.kind != "implicit":
            return {}
        with torch.no_grad():
            _, _, _, inner, linear = self.meta_gradient(batch, residuals=True)
        measured = {"inner_residual": inner.mean().item(), "linear_residual": linear.mean().item()}
        if measured["inner_residual"] > UNSOLVED and not self._warned:
            self._warned = True
            warnings.warn(
                f"iMAML's inner problem is far from solved (relative optimality residual "
                f"{measured['inner_residual']:.2f} > {UNSOLVED}), so its implicit meta-gradient is unreliable: "
                + (
                    "raise algo.inner_steps or algo.inner_cg_steps, or algo.lam."
                    if self.inner_optimizer is None
                    else "raise algo.inner_steps, or algo.inner_lr while the inner loop stays stable, or algo.lam."
                ),
                MetalabWarning,
                stacklevel=2,
            )
        return measured
