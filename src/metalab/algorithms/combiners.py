"""Loss combiners of auxiliary learning: L_T = l_main + g_phi(l_aux_1, ..., l_aux_K), per example.

Each combiner is an ``nn.Module`` mapping the per-example losses, main [N] and auxiliary [N, K], to
the scalar training loss L_T, so that ``torch.func.functional_call`` can differentiate it in its
parameters phi. ``learned_by`` says who updates phi:

    "hypergradient"  linear, nonlinear: AuxiLearn's implicit hypergradient of the auxiliary-set loss
                     (Navon et al., ICLR 2021), then ``clamp`` keeps them non-negative
    "primary"        uncertainty: trained jointly with the primary network on L_T (Kendall et al., 2018)
    "rule"           gradnorm, dwa, olaux: their own update rule, run by ``primary_gradients`` at every
                     primary step (baselines of the AuxiLearn paper, below)
    None             main_only, equal, fixed: constants; gcs: a gate recomputed at every step

``primary_gradients`` is the one seam between a combiner and the primary step: given L_T, the per-task
mean losses [1 + K] and the primary parameters, it returns the gradient the primary optimizer steps and
updates the combiner's own state. The default is the gradient of L_T; the baselines that act on
gradients (GradNorm's norms, GCS's cosines, OL-AUX's inner products) differentiate each task's loss
apart (``task_gradients``) and combine them.

``weights(aux)`` is the effective weight of each auxiliary, dL_T/dl_aux_k divided by
dL_T/dl_main, averaged over the examples: what metrics.jsonl logs as ``weight/<aux name>``.

A combiner's own settings (``USED_BY``: algo.weights, init_weight, hidden_sizes, init_upper, alpha,
gradnorm_lr, temperature, olaux_lr, gcs_variant) belong to one combiner each; ``make_combiner`` refuses
one set away from its default beside another combiner, where it would be ignored without a word.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn

from metalab.errors import require
from metalab.optim.inner import adam

__all__ = [
    "COMBINERS",
    "DWA",
    "GCS",
    "USED_BY",
    "Combiner",
    "CombinerName",
    "Fixed",
    "GradNorm",
    "Linear",
    "Nonlinear",
    "OLAux",
    "Uncertainty",
    "make_combiner",
    "task_gradients",
]


def _mean_main(main: Tensor, present: Tensor) -> Tensor:
    """Mean main loss over the examples that have a main label (0 when none has)."""
    return torch.where(present, main, torch.zeros_like(main)).sum() / present.sum().clamp(min=1)


Gradients = list[Tensor]  # one tensor per primary parameter, in the optimizer's order


def task_gradients(losses: Tensor, params: Sequence[Tensor]) -> list[Gradients]:
    """grad_w of each task's mean loss (``losses`` [1 + K], main first) in ``params``: one backward pass
    per task, zeros where a task's loss does not reach a parameter (another task's head)."""
    gradients = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        gradients.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    return gradients


def _inner(a: Gradients, b: Gradients, shared: Sequence[bool]) -> Tensor:
    """<a, b> over the shared parameters."""
    return torch.stack([(x * y).sum() for x, y, keep in zip(a, b, shared) if keep]).sum()


def _weighted_sum(gradients: list[Gradients], coefficients: Sequence[Tensor]) -> Gradients:
    """sum_t c_t[i] g_t[i] for every parameter i, with ``coefficients[i]`` [tasks] the weights of parameter i."""
    return [sum(c * g[i] for c, g in zip(coefficients[i], gradients)) for i in range(len(gradients[0]))]


class Combiner(nn.Module):
    """g_phi over K auxiliary losses. Subclasses define ``aux_term`` (or ``forward``)."""

    learned_by: ClassVar[str | None] = None

    def __init__(self, num_aux: int):
        super().__init__()
        self.num_aux = num_aux

    def aux_term(self, aux: Tensor) -> Tensor:
        """g_phi(l_aux) per example [N] from the auxiliary losses [N, K]."""
        raise NotImplementedError

    @staticmethod
    def task_losses(main: Tensor, aux: Tensor, present: Tensor) -> Tensor:
        """The per-task mean losses [1 + K]: the main loss over labelled examples, then each auxiliary's."""
        return torch.cat([_mean_main(main, present)[None], aux.mean(0)])

    def primary_gradients(
        self, loss: Tensor, losses: Tensor, labelled: Tensor, params: Sequence[Tensor], shared: Sequence[bool]
    ) -> list[Tensor | None]:
        """The gradient the primary optimizer steps, one entry per tensor of ``params`` (None: unused), from
        L_T (``loss``), the per-task mean losses (``losses`` [1 + K], ``task_losses``; ``labelled`` [1 + K]
        bool: whether the batch holds any target of that task) and which parameters every task shares
        (``shared``: all but the output layer when every task has its own head). A combiner with its own
        update rule takes its step here too. The default: dL_T/dparams, no state."""
        return list(torch.autograd.grad(loss, params, allow_unused=True))

    def forward(self, main: Tensor, aux: Tensor, present: Tensor) -> Tensor:
        """L_T: the mean main loss over labelled examples (``present`` [N] bool) plus the mean of
        g_phi over all examples (an absent auxiliary target's loss is 0)."""
        return _mean_main(main, present) + self.aux_term(aux).mean()

    def clamp(self) -> None:
        """Project phi back onto its feasible set after an optimizer step (default: nothing)."""

    def weights(self, aux: Tensor) -> Tensor:
        """Effective weight of each auxiliary [K] at the auxiliary losses ``aux`` [N, K]:
        dL_T/d(mean l_aux_k) divided by dL_T/d(mean l_main), every example labelled."""
        with torch.enable_grad():
            main = torch.zeros(aux.shape[0], dtype=aux.dtype, device=aux.device, requires_grad=True)
            aux = aux.detach().requires_grad_(True)
            present = torch.ones(aux.shape[0], dtype=torch.bool, device=aux.device)
            grad_main, grad_aux = torch.autograd.grad(self(main, aux, present), (main, aux))
        # a loss enters L_T through its mean, so dL_T/d(mean l_k) = sum_i dL_T/dl_ik
        return (grad_aux.sum(0) / grad_main.sum()).detach()


class Fixed(Combiner):
    """g(l) = sum_k w_k l_k with constant weights (main_only: all 0; equal: all 1; fixed: from config)."""

    def __init__(self, num_aux: int, weights: Sequence[float]):
        super().__init__(num_aux)
        require(
            len(weights) == num_aux,
            f"algo.weights must hold one weight per auxiliary task, {num_aux} (got {len(weights)}).",
        )
        self.weight = nn.Parameter(torch.tensor([float(w) for w in weights]), requires_grad=False)

    def aux_term(self, aux: Tensor) -> Tensor:
        return aux @ self.weight


class Linear(Combiner):
    """g_phi(l) = sum_k phi_k l_k with phi >= 0 (clamped after each step), initialised to ``init``
    (official code: 1)."""

    learned_by = "hypergradient"

    def __init__(self, num_aux: int, init: float = 1.0):
        super().__init__(num_aux)
        self.weight = nn.Parameter(torch.full((num_aux,), float(init)))

    def aux_term(self, aux: Tensor) -> Tensor:
        return aux @ self.weight

    def clamp(self) -> None:
        with torch.no_grad():
            self.weight.clamp_(min=0)


class Nonlinear(Combiner):
    """g_phi(l) = MLP(l): ``hidden_sizes`` softplus layers and a linear read-out without bias, all
    weights non-negative (clamped after each step, as the official MonoNonlinearHyperNet), so that
    g >= 0 and g is non-decreasing in every loss. Weights ~ U[0, init_upper] (official: U[0, 1]),
    biases 0."""

    learned_by = "hypergradient"

    def __init__(self, num_aux: int, hidden_sizes: Sequence[int] = (10,), init_upper: float = 1.0):
        super().__init__(num_aux)
        widths = [num_aux, *hidden_sizes]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.Softplus()]
        layers.append(nn.Linear(widths[-1], 1, bias=False))
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    layer.weight.uniform_(0.0, init_upper)
                    if layer.bias is not None:
                        layer.bias.zero_()

    def aux_term(self, aux: Tensor) -> Tensor:
        return self.net(aux).squeeze(-1)

    def clamp(self) -> None:
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    layer.weight.clamp_(min=0)


class Uncertainty(Combiner):
    """Uncertainty weighting (Kendall, Gal, Cipolla, CVPR 2018), as AuxiLearn's baseline code writes it:
    L_T = sum_t exp(-s_t) / 2 * l_t + s_t / 2 over the main task and every auxiliary, s_t = log sigma_t^2
    learned jointly with the primary network (``learned_by = "primary"``), initialised to 0."""

    learned_by = "primary"

    def __init__(self, num_aux: int):
        super().__init__(num_aux)
        self.log_variance = nn.Parameter(torch.zeros(num_aux + 1))

    def forward(self, main: Tensor, aux: Tensor, present: Tensor) -> Tensor:
        losses = self.task_losses(main, aux, present)
        return (0.5 * torch.exp(-self.log_variance) * losses + 0.5 * self.log_variance).sum()


class GradNorm(Combiner):
    """GradNorm (Chen, Badrinarayanan, Lee, Rabinovich, ICML 2018), as AuxiLearn's baseline code runs it.

    Task weights w_i over the main task and every auxiliary (initialised to 1), L_T = sum_i w_i L_i
    (Eq. 1). At each primary step, from the per-task gradients on W, the last shared layer (the last
    shared parameter of two or more dimensions: the toy's linear map, conv4's last convolution):

        G_i = ||grad_W (w_i L_i)||,   r_i = (L_i(t) / L_i(0)) / mean_j (L_j(t) / L_j(0))
        L_grad = sum_i |G_i - mean_j(G_j) * r_i^alpha|       (Eq. 2; the target held constant)

    the network steps along grad_w sum_i w_i L_i (the weights of step t), the weights take one Adam step
    along dL_grad/dw (``lr``: AuxiLearn's code and the GradNorm paper, 0.025; the code adds them to the
    network's Adam as a group of that rate) and are renormalised to sum to 1 + K (Algorithm 1; the
    official code renormalises before its optimizer steps, so its sum drifts from 1 + K). L_i(0) are the
    losses of the first step whose batch holds every task's targets; a batch lacking some task's targets
    leaves the weights as they are. ``alpha``: the restoring force (AuxiLearn's code and the GradNorm
    paper's NYUv2: 1.5). ``weights``: w_k / w_main after the step."""

    learned_by = "rule"

    def __init__(self, num_aux: int, alpha: float = 1.5, lr: float = 0.025):
        super().__init__(num_aux)
        self.alpha, self.optimizer = alpha, adam(lr)
        self.weight = nn.Parameter(torch.ones(num_aux + 1), requires_grad=False)  # w_main, w_aux_1..K
        self.register_buffer("initial_losses", torch.zeros(num_aux + 1))  # L_i(0), once ``started``
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("adam_mean", torch.zeros(num_aux + 1))
        self.register_buffer("adam_var", torch.zeros(num_aux + 1))

    def forward(self, main: Tensor, aux: Tensor, present: Tensor) -> Tensor:
        return self.task_losses(main, aux, present) @ self.weight

    def primary_gradients(
        self, loss: Tensor, losses: Tensor, labelled: Tensor, params: Sequence[Tensor], shared: Sequence[bool]
    ) -> list[Tensor | None]:
        gradients = task_gradients(losses, params)
        with torch.no_grad():
            step = _weighted_sum(gradients, [self.weight.detach().clone()] * len(params))
        if bool(labelled.all()):
            layer = _last_shared_layer(params, shared)
            self.update(losses.detach(), torch.stack([g[layer].norm() for g in gradients]).detach())
        return step

    def update(self, losses: Tensor, layer_norms: Tensor) -> None:
        """One GradNorm step of the weights from the task losses L_i(t) [1 + K] and ||grad_W L_i|| [1 + K]."""
        with torch.no_grad():
            if not self.started:
                self.initial_losses.copy_(losses)
                self.started.fill_(True)
            ratios = losses / self.initial_losses
            inverse_rates = ratios / ratios.mean()
        with torch.enable_grad():
            weight = self.weight.detach().clone().requires_grad_(True)
            norms = (weight * layer_norms).abs()  # G_i = ||w_i grad_W L_i||
            target = (norms.mean() * inverse_rates**self.alpha).detach()
            (grad,) = torch.autograd.grad((norms - target).abs().sum(), weight)
        state = (int(self.adam_steps), {"w": self.adam_mean}, {"w": self.adam_var})
        updates, (steps, mean, var) = self.optimizer.update({"w": grad}, state)
        with torch.no_grad():
            self.adam_steps.fill_(steps)
            self.adam_mean.copy_(mean["w"])
            self.adam_var.copy_(var["w"])
            self.weight.add_(updates["w"])
            self.weight.mul_(len(self.weight) / self.weight.sum())


class DWA(Combiner):
    """Dynamic Weight Average (Liu, Johns, Davison, CVPR 2019, Eq. 3-4), as AuxiLearn's baseline code:

        L_T = sum_k lambda_k L_k over the main task and every auxiliary (1 + K tasks),
        lambda_k(t) = (1 + K) exp(w_k(t-1) / T) / sum_i exp(w_i(t-1) / T),   w_k(t-1) = L_k(t-1) / L_k(t-2)

    with L_k(e) the mean loss of task k over epoch e, and lambda = 1 for the first two epochs. An
    "epoch" here is ``update_every`` primary steps (the data sets are sampled, not passed over); a task's
    epoch mean is over the steps whose batch holds its targets (an epoch with none keeps the previous
    mean: ratio 1). ``temperature`` T: 2 (the paper, AuxiLearn's code). ``weights``: lambda_k / lambda_main."""

    learned_by = "rule"

    def __init__(self, num_aux: int, temperature: float = 2.0, update_every: int = 50):
        super().__init__(num_aux)
        self.temperature, self.update_every = temperature, update_every
        self.weight = nn.Parameter(torch.ones(num_aux + 1), requires_grad=False)  # lambda
        self.register_buffer("epoch_sum", torch.zeros(num_aux + 1))
        self.register_buffer("epoch_count", torch.zeros(num_aux + 1))
        self.register_buffer("history", torch.zeros(2, num_aux + 1))  # L(e - 1), L(e - 2)
        self.register_buffer("known", torch.zeros(2, num_aux + 1, dtype=torch.bool))  # which of them exist
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))

    def forward(self, main: Tensor, aux: Tensor, present: Tensor) -> Tensor:
        return self.task_losses(main, aux, present) @ self.weight

    def primary_gradients(
        self, loss: Tensor, losses: Tensor, labelled: Tensor, params: Sequence[Tensor], shared: Sequence[bool]
    ) -> list[Tensor | None]:
        gradients = super().primary_gradients(loss, losses, labelled, params, shared)
        self.record(losses.detach(), labelled)
        return gradients

    def record(self, losses: Tensor, labelled: Tensor) -> None:
        """Add one step's task losses [1 + K]; at the end of an epoch, the lambdas of the next."""
        with torch.no_grad():
            self.epoch_sum += torch.where(labelled, losses, torch.zeros_like(losses))
            self.epoch_count += labelled.to(self.epoch_count.dtype)
            self.steps += 1
            if int(self.steps) % self.update_every:
                return
            counted = self.epoch_count > 0
            mean = torch.where(counted, self.epoch_sum / self.epoch_count.clamp(min=1), self.history[0])
            self.history.copy_(torch.stack([mean, self.history[0]]))
            self.known.copy_(torch.stack([counted | self.known[0], self.known[0]]))
            self.epoch_sum.zero_()
            self.epoch_count.zero_()
            self.epochs += 1
            if int(self.epochs) >= 2:
                defined = self.known.all(0) & (self.history[1] > 0)
                rates = torch.where(defined, self.history[0] / self.history[1].clamp(min=1e-30), 1.0)
                self.weight.copy_(len(rates) * torch.softmax(rates / self.temperature, 0))


GCSVariant = Literal["unweighted", "weighted"]


class GCS(Combiner):
    """Gradient cosine similarity (Du, Czarnecki, Jayakumar, Farajtabar, Pascanu, Lakshminarayanan 2018,
    "Adapting Auxiliary Losses Using Gradient Similarity", Algorithm 1). On the shared parameters the
    primary step follows

        grad L_main + sum_k gate_k grad L_aux_k,   gate_k = [cos(grad L_main, grad L_aux_k) > 0]   ("unweighted")
                                                   gate_k = max(0, cos(grad L_main, grad L_aux_k))   ("weighted")

    the cosine over the shared parameters; each task's own head follows its own loss's gradient, ungated.
    AuxiLearn's baseline code runs the unweighted variant (``variant``'s default). A batch without main
    labels has grad L_main = 0 and closes every gate. ``weights``: the gates of the last step (the mean
    of the logged ``weight/<aux>`` is the fraction of steps an auxiliary was used); the logged loss is
    L_main + sum_k L_aux_k, as the official code's."""

    def __init__(self, num_aux: int, variant: GCSVariant = "unweighted"):
        super().__init__(num_aux)
        self.variant = variant
        self.gate = nn.Parameter(torch.ones(num_aux), requires_grad=False)

    def forward(self, main: Tensor, aux: Tensor, present: Tensor) -> Tensor:
        return self.task_losses(main, aux, present).sum()

    def weights(self, aux: Tensor) -> Tensor:
        return self.gate.detach().clone()

    def primary_gradients(
        self, loss: Tensor, losses: Tensor, labelled: Tensor, params: Sequence[Tensor], shared: Sequence[bool]
    ) -> list[Tensor | None]:
        main, *auxiliaries = gradients = task_gradients(losses, params)
        with torch.no_grad():
            norms = [_inner(g, g, shared).sqrt() for g in gradients]
            cosines = torch.stack(
                [_inner(main, g, shared) / (norms[0] * n).clamp(min=1e-8) for g, n in zip(auxiliaries, norms[1:])]
            ).clamp(-1, 1)
            self.gate.copy_((cosines > 0).to(cosines.dtype) if self.variant == "unweighted" else cosines.clamp(min=0))
            gated, ungated = torch.cat([self.gate.new_ones(1), self.gate]), self.gate.new_ones(len(gradients))
            return _weighted_sum(gradients, [gated if keep else ungated for keep in shared])


class OLAux(Combiner):
    """OL-AUX (Lin, Baweja, Kantor, Held, NeurIPS 2019, "Adaptive Auxiliary Task Weighting for
    Reinforcement Learning", Algorithm 1): L_T = L_main + sum_k w_k L_aux_k (w initialised to 1), and
    every N = ``update_every`` primary steps

        w_k <- w_k - beta grad_{w_k} L_main(theta_{t+N}),
        grad_{w_k} L_main(theta_{t+N}) ~ -alpha sum_{j<N} grad L_main(theta_{t+j})^T grad L_aux_k(theta_{t+j})

    i.e. w_k <- w_k + beta' sum over the last N steps of grad L_main^T grad L_aux_k (the inner product over
    the shared parameters), then w_k clamped >= 0 (a negative weight would ascend an auxiliary loss; the
    paper states no constraint). The paper's primary step size alpha is folded into ``lr`` = beta' (the
    primary optimizer here is Adam, whose step is not alpha times the gradient). AuxiLearn's released code
    has no OL-AUX; ``lr`` is this project's choice, not a published value. ``weights``: w_k."""

    learned_by = "rule"

    def __init__(self, num_aux: int, lr: float = 1e-3, update_every: int = 50):
        super().__init__(num_aux)
        self.lr, self.update_every = lr, update_every
        self.weight = nn.Parameter(torch.ones(num_aux), requires_grad=False)
        self.register_buffer("products", torch.zeros(num_aux))  # sum over the horizon of grad L_main^T grad L_aux_k
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def aux_term(self, aux: Tensor) -> Tensor:
        return aux @ self.weight

    def primary_gradients(
        self, loss: Tensor, losses: Tensor, labelled: Tensor, params: Sequence[Tensor], shared: Sequence[bool]
    ) -> list[Tensor | None]:
        main, *auxiliaries = gradients = task_gradients(losses, params)
        with torch.no_grad():
            step = _weighted_sum(gradients, [torch.cat([self.weight.new_ones(1), self.weight])] * len(params))
            self.accumulate(torch.stack([_inner(main, g, shared) for g in auxiliaries]))
        return step

    def accumulate(self, products: Tensor) -> None:
        """Add one step's grad L_main^T grad L_aux_k [K]; every ``update_every`` steps, the weights' step."""
        with torch.no_grad():
            self.products += products
            self.steps += 1
            if int(self.steps) % self.update_every == 0:
                self.weight.add_(self.lr * self.products).clamp_(min=0)
                self.products.zero_()


def _last_shared_layer(params: Sequence[Tensor], shared: Sequence[bool]) -> int:
    """Index of GradNorm's W: the last shared parameter of two or more dimensions (a weight, not a bias
    or a norm's scale), or the last shared one when none has."""
    candidates = [i for i, (p, keep) in enumerate(zip(params, shared)) if keep]
    return next((i for i in reversed(candidates) if params[i].dim() >= 2), candidates[-1])


CombinerName = Literal[
    "main_only", "equal", "fixed", "linear", "nonlinear", "uncertainty", "gradnorm", "dwa", "gcs", "olaux"
]
COMBINERS: tuple[str, ...] = get_args(CombinerName)
#: each setting of ``make_combiner`` (an algo key of AuxiLearn) and the one combiner that reads it
USED_BY = {
    "weights": "fixed",
    "init_weight": "linear",
    "hidden_sizes": "nonlinear",
    "init_upper": "nonlinear",
    "alpha": "gradnorm",
    "gradnorm_lr": "gradnorm",
    "temperature": "dwa",
    "gcs_variant": "gcs",
    "olaux_lr": "olaux",
}


def make_combiner(
    name: str,
    num_aux: int,
    *,
    weights: Sequence[float] | None = None,
    init_weight: float = 1.0,
    hidden_sizes: Sequence[int] = (10,),
    init_upper: float = 1.0,
    alpha: float = 1.5,
    gradnorm_lr: float = 0.025,
    temperature: float = 2.0,
    gcs_variant: GCSVariant = "unweighted",
    olaux_lr: float = 1e-3,
    update_every: int = 50,
) -> Combiner:
    """The combiner ``algo.combiner=name`` over ``num_aux`` auxiliaries; one sentence for a bad name, a bad
    setting, or a setting (``USED_BY``) moved from its default that this combiner would ignore.
    ``update_every`` is DWA's epoch and OL-AUX's horizon (and the learned combiners' interval, in AuxiLearn)."""
    given = locals()
    require(name in COMBINERS, f"algo.combiner={name} is not a combiner: use one of {', '.join(COMBINERS)}.")
    _refuse_ignored(name, **{key: given[key] for key in USED_BY})
    require(num_aux >= 1, "the task sampler has no auxiliary task: AuxiLearn needs at least one.")
    if name == "main_only":
        return Fixed(num_aux, [0.0] * num_aux)
    if name == "equal":
        return Fixed(num_aux, [1.0] * num_aux)
    if name == "fixed":
        require(
            weights is not None,
            f"algo.combiner=fixed needs algo.weights, one per auxiliary task ({num_aux}), "
            f"e.g. algo.weights=[{','.join(['1.0'] * num_aux)}].",
        )
        require(all(w >= 0 for w in weights), f"algo.weights must be non-negative (got {list(weights)}).")
        return Fixed(num_aux, weights)
    if name == "linear":
        require(init_weight >= 0, f"algo.init_weight must be non-negative (got {init_weight}).")
        return Linear(num_aux, init_weight)
    if name == "nonlinear":
        require(
            len(hidden_sizes) >= 1 and all(h >= 1 for h in hidden_sizes),
            f"algo.hidden_sizes must be positive integers (got {list(hidden_sizes)}): e.g. algo.hidden_sizes=[10].",
        )
        require(
            math.isfinite(init_upper) and init_upper >= 0,
            f"algo.init_upper must be a finite number >= 0 (got {init_upper}): the weights start ~ U[0, init_upper], "
            "e.g. algo.init_upper=1.0 (official).",
        )
        return Nonlinear(num_aux, hidden_sizes, init_upper)
    if name == "gradnorm":
        require(
            math.isfinite(alpha) and alpha >= 0,
            f"algo.alpha must be a finite number >= 0 (got {alpha}): GradNorm's restoring force, e.g. algo.alpha=1.5 "
            "(the paper's NYUv2 value).",
        )
        _require_rate("gradnorm_lr", gradnorm_lr, "0.025 (the GradNorm paper)")
        return GradNorm(num_aux, alpha, gradnorm_lr)
    if name == "dwa":
        require(
            math.isfinite(temperature) and temperature > 0,
            f"algo.temperature must be a finite number > 0 (got {temperature}): DWA's softmax temperature, "
            "e.g. algo.temperature=2 (the paper).",
        )
        return DWA(num_aux, temperature, update_every)
    if name == "gcs":
        require(
            gcs_variant in get_args(GCSVariant),
            f"algo.gcs_variant must be unweighted or weighted (got {gcs_variant!r}).",
        )
        return GCS(num_aux, gcs_variant)
    if name == "olaux":
        _require_rate("olaux_lr", olaux_lr, "0.001")
        return OLAux(num_aux, olaux_lr, update_every)
    return Uncertainty(num_aux)


def _require_rate(key: str, value: float, example: str) -> None:
    require(
        math.isfinite(value) and value > 0,
        f"algo.{key} must be a finite number > 0 (got {value}): e.g. algo.{key}={example}.",
    )


def _refuse_ignored(name: str, **settings: Any) -> None:
    """A setting of ``USED_BY`` that differs from ``make_combiner``'s default, beside a combiner that
    does not read it: one sentence naming the key and its combiner (the defaults, as algo/auxilearn.yaml
    writes them, pass with every combiner)."""
    defaults = inspect.signature(make_combiner).parameters
    for key, value in settings.items():
        default = defaults[key].default
        same = (
            list(value) == list(default)
            if isinstance(value, Sequence) and isinstance(default, tuple)
            else value == default
        )
        require(
            same or USED_BY[key] == name,
            f"algo.{key} has no effect with algo.combiner={name}: it is a setting of algo.combiner={USED_BY[key]}; "
            f"remove algo.{key} or set algo.combiner={USED_BY[key]}.",
        )
