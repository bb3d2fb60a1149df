"""Loss combiners of auxiliary learning: L_T = l_main + g_phi(l_aux_1, ..., l_aux_K), per example.

Each combiner is an ``nn.Module`` mapping the per-example losses, main [N] and auxiliary [N, K], to
the scalar training loss L_T, so that ``torch.func.functional_call`` can differentiate it in its
parameters phi. ``learned_by`` says who updates phi:

    "hypergradient"  linear, nonlinear: AuxiLearn's implicit hypergradient of the auxiliary-set loss
                     (Navon et al., ICLR 2021), then ``clamp`` keeps them non-negative
    "primary"        uncertainty: trained jointly with the primary network on L_T (Kendall et al., 2018)
    None             main_only, equal, fixed: constants

``weights(aux)`` is the effective weight of each auxiliary, dL_T/dl_aux_k divided by
dL_T/dl_main, averaged over the examples: what metrics.jsonl logs as ``weight/<aux name>``.

A combiner's own settings (``USED_BY``: algo.weights, init_weight, hidden_sizes, init_upper) belong to
one combiner each; ``make_combiner`` refuses one set away from its default beside another combiner,
where it would be ignored without a word.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn

from metalab.errors import require

__all__ = [
    "COMBINERS",
    "USED_BY",
    "Combiner",
    "CombinerName",
    "Fixed",
    "Linear",
    "Nonlinear",
    "Uncertainty",
    "make_combiner",
]


def _mean_main(main: Tensor, present: Tensor) -> Tensor:
    """Mean main loss over the examples that have a main label (0 when none has)."""
    return torch.where(present, main, torch.zeros_like(main)).sum() / present.sum().clamp(min=1)


class Combiner(nn.Module):
    """g_phi over K auxiliary losses. Subclasses define ``aux_term`` (or ``forward``)."""

    learned_by: ClassVar[str | None] = None

    def __init__(self, num_aux: int):
        super().__init__()
        self.num_aux = num_aux

    def aux_term(self, aux: Tensor) -> Tensor:
        """g_phi(l_aux) per example [N] from the auxiliary losses [N, K]."""
        raise NotImplementedError

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
        losses = torch.cat([_mean_main(main, present)[None], aux.mean(0)])
        return (0.5 * torch.exp(-self.log_variance) * losses + 0.5 * self.log_variance).sum()


CombinerName = Literal["main_only", "equal", "fixed", "linear", "nonlinear", "uncertainty"]
COMBINERS: tuple[str, ...] = get_args(CombinerName)
#: each setting of ``make_combiner`` (an algo key of AuxiLearn) and the one combiner that reads it
USED_BY = {"weights": "fixed", "init_weight": "linear", "hidden_sizes": "nonlinear", "init_upper": "nonlinear"}


def make_combiner(
    name: str,
    num_aux: int,
    *,
    weights: Sequence[float] | None = None,
    init_weight: float = 1.0,
    hidden_sizes: Sequence[int] = (10,),
    init_upper: float = 1.0,
) -> Combiner:
    """The combiner ``algo.combiner=name`` over ``num_aux`` auxiliaries; one sentence for a bad name, a bad
    setting, or a setting (``USED_BY``) moved from its default that this combiner would ignore."""
    require(name in COMBINERS, f"algo.combiner={name} is not a combiner: use one of {', '.join(COMBINERS)}.")
    _refuse_ignored(name, weights=weights, init_weight=init_weight, hidden_sizes=hidden_sizes, init_upper=init_upper)
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
    return Uncertainty(num_aux)


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
