"""Reptile's meta-update against a per-task loop written out by hand, its learning on sinusoids, and its
refusal of solvers that differentiate the inner loop."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.nn.functional import mse_loss

from metalab.algorithms import Reptile
from metalab.errors import ConfigError
from metalab.hypergrad import first_order
from metalab.models import MLP
from metalab.tasks.episodic.sinusoid import Sinusoid
from tests.helpers.sinusoid import float64_batch, mse_before_and_after

INNER_LR, STEPS, EPSILON = 0.05, 3, 0.3
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


def make_reptile(inner_optimizer: str, meta_optimizer=functools.partial(torch.optim.SGD, lr=EPSILON)):
    torch.manual_seed(0)
    model = MLP((1,), 1, hidden_sizes=(8, 8)).double()
    tasks = Sinusoid(shots=5, query=6)
    algo = Reptile(
        model,
        tasks,
        first_order(),
        meta_optimizer,
        inner_lr=INNER_LR,
        inner_steps=STEPS,
        inner_optimizer=inner_optimizer,
    )
    return algo, model, float64_batch(tasks, 3)


def adapted_by_hand(model, theta, x, y, inner_optimizer):
    """phi of one task: STEPS steps of plain SGD or of Adam (Kingma & Ba, Algorithm 1) written out."""
    fast = {k: v.detach().clone() for k, v in theta.items()}
    mean = {k: torch.zeros_like(v) for k, v in fast.items()}
    var = {k: torch.zeros_like(v) for k, v in fast.items()}
    for step in range(1, STEPS + 1):
        fast = {k: v.requires_grad_() for k, v in fast.items()}
        loss = mse_loss(torch.func.functional_call(model, fast, (x,)).squeeze(-1), y)
        grads = dict(zip(fast, torch.autograd.grad(loss, list(fast.values()))))
        for k, g in grads.items():
            if inner_optimizer == "sgd":
                fast[k] = (fast[k] - INNER_LR * g).detach()
                continue
            mean[k] = BETA1 * mean[k] + (1 - BETA1) * g
            var[k] = BETA2 * var[k] + (1 - BETA2) * g * g
            corrected = mean[k] / (1 - BETA1**step), var[k] / (1 - BETA2**step)
            fast[k] = (fast[k] - INNER_LR * corrected[0] / (corrected[1].sqrt() + ADAM_EPS)).detach()
    return fast


@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
def test_one_meta_update_moves_theta_by_epsilon_times_the_mean_of_phi_minus_theta(inner_optimizer):
    algo, model, batch = make_reptile(inner_optimizer)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    phis = [
        adapted_by_hand(model, theta, batch.x_support[t], batch.y_support[t], inner_optimizer)
        for t in range(batch.num_tasks)
    ]
    report = algo.train_step(batch)
    for key, value in model.named_parameters():
        expected = theta[key] + EPSILON * torch.stack([phi[key] - theta[key] for phi in phis]).mean(0)
        torch.testing.assert_close(value.detach(), expected, rtol=0, atol=1e-12)
        assert not torch.allclose(value.detach(), theta[key])
    # the reported loss is the query loss at phi
    query = [
        mse_loss(torch.func.functional_call(model, phi, (batch.x_query[t],)).squeeze(-1), batch.y_query[t])
        for t, phi in enumerate(phis)
    ]
    assert report["loss"] == pytest.approx(torch.stack(query).mean().item(), rel=1e-12)


def test_it_learns_sinusoids():
    """A seeded short run (60 meta-updates): the validation MSE after adaptation falls to less than half
    of its value at the random initialisation."""
    torch.manual_seed(0)
    tasks = Sinusoid(shots=10, query=10)
    model = MLP((1,), 1, hidden_sizes=(32, 32))
    algo = Reptile(
        model,
        tasks,
        first_order(),
        functools.partial(torch.optim.Adam, lr=0.05),
        inner_lr=0.02,
        inner_steps=5,
        eval_inner_steps=5,
    )
    before, after = mse_before_and_after(algo, tasks, iterations=60)
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize(
    "solver, others", [("unroll", "anil, lstm_optimizer or maml"), ("cg", "imaml")], ids=["unroll", "cg"]
)
def test_a_solver_that_differentiates_the_inner_loop_is_refused_in_one_sentence(solver, others):
    import metalab.app.build  # noqa: F401  (installs the catalog of the configured algorithms)
    from metalab import hypergrad

    with pytest.raises(ConfigError) as error:
        Reptile(MLP((1,), 1), Sinusoid(), getattr(hypergrad, solver)(), functools.partial(torch.optim.SGD, lr=1.0))
    assert str(error.value) == (
        f"algo=reptile does not support solver={solver}: Reptile moves the initialisation towards the adapted "
        f"parameters without differentiating the inner loop; use solver=first_order, or algo={others} with "
        f"solver={solver}."
    )
