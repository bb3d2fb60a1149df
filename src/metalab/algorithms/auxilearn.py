"""AuxiLearn (Navon, Achituve, Maron, Chechik, Fetaya, ICLR 2021): auxiliary learning by implicit
differentiation, and its baselines, on data with auxiliary tasks (``metalab.tasks.auxiliary.base``).

A primary network w (the configured model, one head per task, ``tasks.head_slices``) is trained by
its own optimizer (``primary_optimizer``) on the training loss

    L_T(w, phi) = l_main(w) + g_phi(l_aux_1(w), ..., l_aux_K(w))          (per example, then averaged)

with a combiner g_phi (``metalab.algorithms.combiners``). Every ``update_every`` primary steps a learned combiner
(linear, nonlinear) takes one step of its own optimizer (``combiner_optimizer``) along the
implicit hypergradient of the main loss on the auxiliary split, L_A(w) (the paper's Eq. 4, w taken
as w*(phi)):

    dL_A/dphi = -(d_phi grad_w L_T)^T (grad^2_w L_T)^{-1} grad_w L_A,

from ``metalab.hypergrad.ImplicitStep``: the inverse-Hessian product by the configured solver
(default ``neumann`` with J = 3 terms and step ``hpo_lr``; cg, gmres, exact), the hypergradient's
norm clipped at ``max_grad_norm`` (official: 10 by default, 25 to 100 in its trainers), then the
combiner clamped to non-negative weights. L_T is evaluated on the step's training batch
at the updated w, L_A on the batch's auxiliary-split examples.

Scaling convention (``convention``):
    "official" (default): the official code's. Its Neumann sum p = sum_{j=0..J} (I - hpo_lr H)^j
        grad_w L_A lacks the paper's leading factor hpo_lr, so its hypergradient is 1/hpo_lr times
        the paper's. Here every solver's result is multiplied by 1/hpo_lr, so that the official
        settings (combiner learning rate, clipping) apply and swapping the solver changes the
        accuracy of H^-1, not the step size.
    "paper": the paper's Algorithm 1, hpo_lr * sum_j (I - hpo_lr H)^j grad_w L_A for neumann
        (an estimate of H^-1 grad_w L_A itself), and the solvers' H^-1 as they are.

Baselines run by the same code path with no hypergradient: main_only, equal, fixed (``weights``),
uncertainty weighting (Kendall et al. 2018, its log-variances trained with w by the primary
optimizer), and the AuxiLearn paper's baselines GradNorm (``alpha``, ``gradnorm_lr``), DWA
(``temperature``; an epoch is ``update_every`` steps), GCS (``gcs_variant``) and OL-AUX (``olaux_lr``;
its horizon is ``update_every`` steps), whose rules act at every primary step through
``Combiner.primary_gradients`` (the gradient the primary optimizer steps, from the per-task losses and
the parameters every task shares: ``shared_parameters``). ``train_step`` reports ``weight/<aux name>``,
the effective weight of each auxiliary.

Everything that changes during training persists in ``state_dict``: the primary network and its
optimizer, the combiner (its parameters and its buffers: GradNorm's L(0) and Adam moments, DWA's loss
history, OL-AUX's accumulated products) and its optimizer, the step count (the trainer keeps the data
generator).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalab.algorithms.base import Algorithm, NonFiniteLossError, OptimizerFactory, build_optimizer, check_exact_size
from metalab.algorithms.combiners import Combiner, CombinerName, GCSVariant, make_combiner
from metalab.errors import require
from metalab.hypergrad import ImplicitStep, apply_gradients, neumann, solve_neumann, tree_scale
from metalab.tasks.auxiliary.base import AuxBatch, labelled
from metalab.tasks.base import BatchKind, TaskSampler
from metalab.types import Params

__all__ = ["AuxiLearn"]

Convention = Literal["official", "paper"]
_CONVENTIONS = get_args(Convention)
_SEE_CONFIG = " (`python train.py --cfg job` shows the config)"  # the remedy of a rejected optimizer setting


class AuxiLearn(Algorithm):
    """combiner: main_only | equal | fixed | linear | nonlinear | uncertainty | gradnorm | dwa | gcs | olaux.
    primary_optimizer: optimizer factory of the primary network (official NYUv2: Adam, lr 1e-4).
    combiner_optimizer: optimizer factory of phi (official: SGD, lr 1e-3, momentum 0.9, weight decay
    1e-4); it replaces ``meta_optimizer`` (trainer.meta_optimizer), which AuxiLearn does not use.
    max_grad_norm: the hypergradient's norm is clipped to it (None: not clipped); trainer.grad_clip_norm
    and grad_clip_value, when set, clip it too (the norm to the smaller of the two limits).
    update_every: primary steps per combiner step (official NYUv2: 50); DWA's epoch and OL-AUX's horizon.
    hpo_lr: the Neumann series' step, and 1/scale of the "official" convention (official: 1e-4).
    convention: "official" or "paper" (module docstring).
    weights: the fixed combiner's weights, one per auxiliary.  init_weight: the linear combiner's
    initial weights (official: 1).  hidden_sizes, init_upper: the nonlinear combiner's softplus layers
    and its initial weights ~ U[0, init_upper].  alpha, gradnorm_lr: GradNorm's restoring force (1.5) and
    its weights' Adam rate (0.025).  temperature: DWA's (2).  gcs_variant: GCS's gate, "unweighted"
    (AuxiLearn's code) or "weighted".  olaux_lr: OL-AUX's beta.  Each of these nine is refused, moved from its
    default, beside a combiner that does not read it (``combiners.USED_BY``).
    """

    name = "auxilearn"
    solvers = ("neumann", "cg", "gmres", "exact")
    solver_advice: ClassVar[dict[str, str]] = {
        s: "AuxiLearn differentiates the primary network's optimality condition, not its training loop; use "
        "solver=neumann (the paper), cg, gmres or exact"
        for s in ("unroll", "first_order")
    }
    accepts: ClassVar[tuple[BatchKind, ...]] = ("auxiliary",)

    def __init__(
        self,
        model: nn.Module,
        tasks: TaskSampler,
        solver: Any,
        meta_optimizer: OptimizerFactory,
        grad_clip_norm: float | None = None,
        grad_clip_value: float | None = None,
        *,
        primary_optimizer: OptimizerFactory,
        combiner_optimizer: OptimizerFactory,
        combiner: CombinerName = "linear",
        update_every: int = 50,
        max_grad_norm: float | None = 10.0,
        hpo_lr: float = 1e-4,
        convention: Convention = "official",
        weights: Sequence[float] | None = None,
        init_weight: float = 1.0,
        hidden_sizes: Sequence[int] = (10,),
        init_upper: float = 1.0,
        alpha: float = 1.5,
        gradnorm_lr: float = 0.025,
        temperature: float = 2.0,
        gcs_variant: GCSVariant = "unweighted",
        olaux_lr: float = 1e-3,
    ):
        self.check_tasks(tasks)  # before tasks.aux_tasks is read
        require(
            isinstance(update_every, int) and update_every >= 1,
            f"algo.update_every must be an integer >= 1 (got {update_every!r}): e.g. algo.update_every=50.",
        )
        require(
            max_grad_norm is None or max_grad_norm > 0,
            f"algo.max_grad_norm must be positive or null (got {max_grad_norm}): e.g. algo.max_grad_norm=10.",
        )
        require(hpo_lr > 0, f"algo.hpo_lr must be positive (got {hpo_lr}): e.g. algo.hpo_lr=1e-4.")
        require(convention in _CONVENTIONS, f"algo.convention must be official or paper (got {convention!r}).")
        device = next(model.parameters()).device
        self.combiner: Combiner = make_combiner(
            combiner,
            len(tasks.aux_tasks),
            weights=weights,
            init_weight=init_weight,
            hidden_sizes=hidden_sizes,
            init_upper=init_upper,
            alpha=alpha,
            gradnorm_lr=gradnorm_lr,
            temperature=temperature,
            gcs_variant=gcs_variant,
            olaux_lr=olaux_lr,
            update_every=update_every,
        ).to(device)
        combiner_opt = build_optimizer(
            combiner_optimizer, self.combiner.parameters(), "algo.combiner_optimizer", _SEE_CONFIG
        )
        super().__init__(model, tasks, solver, lambda params: combiner_opt, grad_clip_norm, grad_clip_value)
        self.combiner_name, self.update_every, self.hpo_lr, self.convention = combiner, update_every, hpo_lr, convention
        primary = [*model.parameters(), *(self.combiner.parameters() if self.combiner.learned_by == "primary" else ())]
        self.primary_optimizer = build_optimizer(primary_optimizer, primary, "algo.primary_optimizer", _SEE_CONFIG)
        self.shared = self.shared_parameters([p for g in self.primary_optimizer.param_groups for p in g["params"]])
        require(
            any(self.shared) or combiner not in ("gradnorm", "gcs", "olaux"),
            f"algo.combiner={combiner} compares the tasks' gradients on the parameters they share, but this model's "
            "only layer is its output layer, one head per task: use a model with a hidden layer, "
            "e.g. model.hidden_sizes=[64].",
        )
        limits = [limit for limit in (max_grad_norm, grad_clip_norm) if limit is not None]
        self.implicit = ImplicitStep(
            dict(self.combiner.named_parameters()),
            self.optimizer,
            self._solver(solver),
            self.train_loss,
            self.aux_set_loss,
            grad_clip=min(limits, default=None),
            grad_clip_value=grad_clip_value,
        )
        self.steps = 0  # primary steps taken

    def _solver(self, solver: Any) -> Any:
        """The configured linear solver, with hpo_lr as the Neumann step and the convention's scale."""
        check_exact_size(solver, self.model)
        self._divergence = ""  # what a non-finite hypergradient says beside it (``_divergence_hint``)
        if solver.solve is solve_neumann:
            require(
                solver.alpha in (1.0, self.hpo_lr),
                f"algo=auxilearn takes the Neumann step from algo.hpo_lr, not solver.alpha={solver.alpha}: "
                f"set algo.hpo_lr={solver.alpha} instead.",
            )
            solver = neumann(terms=solver.terms, alpha=self.hpo_lr, damping=solver.damping)
            self._divergence = (
                f"; the Neumann series converges only while algo.hpo_lr * (the Hessian's largest eigenvalue + "
                f"solver.damping) < 2: lower algo.hpo_lr={self.hpo_lr} or solver.damping={solver.damping}, or use "
                "solver=cg"
            )
        if self.convention == "paper":
            return solver
        return lambda matvec, b, init=None: tree_scale(solver(matvec, b), 1.0 / self.hpo_lr)

    # -- the losses, as pure functions of (w, phi) ------------------------------------------------
    def meta_parameters(self) -> Params:
        """phi: the combiner's parameters (what algo.combiner_optimizer steps, for a learned combiner)."""
        return dict(self.combiner.named_parameters())

    def primary_parameters(self) -> Params:
        """w: the primary network's parameters."""
        return dict(self.model.named_parameters())

    def shared_parameters(self, params: list[Tensor]) -> list[bool]:
        """Which of ``params`` every task's loss reads: all the network's but its output layer's (the last
        nn.Linear of width ``tasks.output_dim``, whose rows are the heads) when every auxiliary has a head of
        its own; all of the network's when some auxiliary reads the main head (the toy)."""
        width = self.tasks.output_dim
        heads = [m for m in self.model.modules() if isinstance(m, nn.Linear) and m.out_features == width]
        own_heads = bool(heads) and all(task.width > 0 for task in self.tasks.aux_tasks)
        head = {id(p) for p in heads[-1].parameters()} if own_heads else set()
        network = {id(p) for p in self.model.parameters()}
        return [id(p) in network and id(p) not in head for p in params]

    def outputs(self, w: Params, x: Tensor) -> Tensor:
        """The primary network at w on inputs x [*batch, *input_shape] -> [*batch, output_dim]."""
        batch_shape = x.shape[: x.dim() - len(self.tasks.input_shape)]
        flat = x.reshape(-1, *self.tasks.input_shape)
        out = functional_call(self.model, {**dict(self.model.named_buffers()), **w}, (flat,))
        return out.reshape(*batch_shape, out.shape[-1])

    def example_losses(self, w: Params, batch: AuxBatch) -> tuple[Tensor, Tensor]:
        """Per-example losses at w on every view of the batch: main [N], auxiliary [N, K]."""
        return self.tasks.example_losses(self.outputs(w, batch.x), batch)

    def train_terms(self, w: Params, phi: Params, batch: AuxBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(L_T(w, phi), the per-example main losses [N], the auxiliary losses [N, K]) on a training batch."""
        main, aux = self.example_losses(w, batch)
        return functional_call(self.combiner, phi, (main, aux, labelled(batch.y))), main, aux

    def train_loss(self, w: Params, phi: Params, batch: AuxBatch) -> Tensor:
        """L_T(w, phi) on a training batch."""
        return self.train_terms(w, phi, batch)[0]

    def aux_set_loss(self, w: Params, phi: Params, batch: AuxBatch) -> Tensor:
        """L_A(w): the mean main loss on the batch's auxiliary-split examples (phi unused)."""
        return self.tasks.main_losses(self.outputs(w, batch.x_aux), batch.y_aux).mean()

    # -- training -----------------------------------------------------------------------------
    def train_step(self, batch: AuxBatch) -> dict[str, float]:
        """One primary step on L_T; every ``update_every`` steps, one combiner step on L_A."""
        loss, main, aux = self.train_terms(self.primary_parameters(), self.meta_parameters(), batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"the training loss L_T is {loss.item()}")
        params = [p for group in self.primary_optimizer.param_groups for p in group["params"]]
        present = labelled(batch.y)
        losses = self.combiner.task_losses(main, aux, present)
        has_targets = torch.cat([present.any()[None], labelled(batch.aux_y).any(0)])
        # None: a parameter L_T does not use; the combiner's own rule (if any) steps here too
        grads = self.combiner.primary_gradients(loss, losses, has_targets, params, self.shared)
        apply_gradients(params, grads, self.primary_optimizer, what="L_T gradient")
        self.steps += 1
        metrics = {"loss": loss.item(), "main_loss": losses[0].item()}
        aux_means = aux.detach().mean(0)
        for name, value, weight in zip(self.tasks.aux_names, aux_means.tolist(), self.combiner.weights(aux).tolist()):
            metrics[f"aux_loss/{name}"], metrics[f"weight/{name}"] = value, weight
        if self.combiner.learned_by == "hypergradient" and self.steps % self.update_every == 0:
            metrics.update(self.combiner_step(batch))
        return metrics

    def hypergradient(self, batch: AuxBatch) -> tuple[Params, Tensor]:
        """(dL_A/dphi in this algorithm's convention, L_A) at the current w, with L_T on ``batch``."""
        return self.implicit.hypergradient(self.primary_parameters(), (batch,), (batch,))

    def combiner_step(self, batch: AuxBatch) -> dict[str, float]:
        """One combiner step along the hypergradient (``ImplicitStep.step``: phi.grad set, clipped, the
        combiner optimizer stepped), then phi clamped >= 0. A NaN/inf hypergradient changes nothing
        (NonFiniteLossError). ``hypergrad_norm``: its norm before the norm clipping."""
        try:
            report = self.implicit.step(self.primary_parameters(), (batch,), (batch,))
        except NonFiniteLossError as error:
            raise NonFiniteLossError(f"{error}{self._divergence_hint(batch)}") from None
        self.combiner.clamp()
        return {"aux_set_loss": report["val_loss"], "hypergrad_norm": report["hypergrad_norm"]}

    def _divergence_hint(self, batch: AuxBatch) -> str:
        """Why a non-finite hypergradient arose where L_T and L_A are finite: the Neumann series diverged
        (with another solver, or a loss already non-finite, nothing is added)."""
        if not self._divergence:
            return ""
        with torch.no_grad():
            w, phi = self.primary_parameters(), self.meta_parameters()
            finite = torch.isfinite(self.train_loss(w, phi, batch)) & torch.isfinite(self.aux_set_loss(w, phi, batch))
        return self._divergence if finite else ""

    def diagnostics(self, batch: AuxBatch) -> dict[str, float]:
        """For a combiner learned by hypergradient, at the current w: ``inner_grad_norm``, ||grad_w L_T||
        (the implicit function theorem takes w as a minimum of L_T; the primary network is trained
        along with phi, never to convergence, so this is a norm, not a residual relative to a start),
        and ``linear_residual``, the Hessian system's relative residual (the truncated Neumann series
        of the paper leaves most of it: it scales the gradient rather than inverting the Hessian)."""
        if self.combiner.learned_by != "hypergradient":
            return {}
        *_, measured = self.implicit.hypergradient(self.primary_parameters(), (batch,), (batch,), residuals=True)
        return {"inner_grad_norm": measured.optimality.item(), "linear_residual": measured.linear.item()}

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, batch: AuxBatch) -> dict[str, Tensor]:
        """Per example [N] of a val/test batch (view 0): the main ``loss`` and the sampler's metric."""
        with torch.no_grad():
            out = self.model(batch.x[0])
            return {
                "loss": self.tasks.main_losses(out, batch.y),
                self.tasks.metric_name: self.tasks.main_metric(out, batch.y),
            }

    # -- state --------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> AuxiLearn:
        super().to(device)
        self.combiner.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """phi and the combiner optimizer (base), the combiner's buffers (its rule's state), the primary
        network, its optimizer, the step count."""
        return {
            **super().state_dict(),
            "combiner": {k: v.detach().clone() for k, v in self.combiner.state_dict().items()},
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "primary_optimizer": self.primary_optimizer.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "combiner" in state:  # checkpoints written before the rule combiners had none
            self.combiner.load_state_dict(state["combiner"])
        self.model.load_state_dict(state["model"])
        self.primary_optimizer.load_state_dict(state["primary_optimizer"])
        self.steps = state["steps"]
