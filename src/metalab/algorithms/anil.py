"""ANIL, "Almost No Inner Loop" (Raghu, Raghu, Bengio, Vinyals, ICLR 2020, "Rapid Learning or Feature
Reuse?", Section 4): MAML whose inner loop adapts only the network's head.

With theta = (theta_body, theta_head), the inner loop takes MAML's steps (Eq. 1 of Finn et al. 2017,
``inner_steps`` of them, SGD or any inner optimizer) on the head alone,

    head_task = theta_head - alpha grad_head L_support(theta_body, theta_head)   (repeated),

and the meta-objective is MAML's, sum_tasks L_query(theta_body, head_task): the body is meta-learned
through the query loss only, both directly and through the head's inner steps, which depend on the
body's features (solver=unroll backpropagates through those steps; solver=first_order treats the
inner gradients as constants, so the body then learns from the query loss at the adapted head).

``head`` names the adapted parameters by their prefix: null, the model's last ``nn.Linear`` (Conv4's
``head``, the MLP's ``net.4``). Each inner step still runs the whole network forward (the models do
not expose their features apart from their head), but differentiates only the head.
"""

from __future__ import annotations

from torch import Tensor, nn

from metalab.algorithms.episodic import StepCallback
from metalab.algorithms.maml import MAML
from metalab.errors import require
from metalab.optim.inner import descend
from metalab.types import Params

__all__ = ["ANIL"]


def last_linear(model: nn.Module) -> str | None:
    """The name of the last ``nn.Linear`` among the model's modules (None if it has none)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


class ANIL(MAML):
    """head: the prefix of the parameters the inner loop adapts (null: the model's last nn.Linear).
    The other settings are MAML's; with ``learn_inner_lr`` only the head's step sizes are learned."""

    name = "anil"

    def __init__(self, model: nn.Module, *args, head: str | None = None, **kwargs):
        prefixes = sorted({name.rpartition(".")[0] for name, _ in model.named_parameters()})
        head = last_linear(model) if head is None else head
        self.head_keys = [name for name, _ in model.named_parameters() if head and name.startswith(f"{head}.")]
        require(
            bool(self.head_keys),
            f"algo.head={head or 'null'} names no parameter of {type(model).__name__}: set algo.head to one of "
            f"{', '.join(prefixes)} (null: the last nn.Linear).",
        )
        self.head = head
        super().__init__(model, *args, **kwargs)

    def meta_parameters(self) -> Params:
        """The model's parameters, and with ``learn_inner_lr`` the step sizes of the head's."""
        return {
            k: v
            for k, v in super().meta_parameters().items()
            if not k.startswith("inner_lr.") or k.removeprefix("inner_lr.") in self.head_keys
        }

    def adapt(
        self, params: Params, x_support: Tensor, y_support: Tensor, steps: int, on_step: StepCallback | None = None
    ) -> Params:
        body = {k: v for k, v in params.items() if k not in self.head_keys}

        def support_loss(head: Params) -> Tensor:
            return self.support_loss({**body, **head}, x_support, y_support)

        def record(step: int, head: Params) -> None:
            on_step(step, {**body, **head})

        head = {k: params[k] for k in self.head_keys}
        head = descend(
            self.inner_optimizer, support_loss, head, steps, self.solver.first_order, record if on_step else None
        )
        return {**body, **head}
