"""ANIL's meta-gradient against a per-task autograd loop that adapts the head alone, its frozen body in
the inner loop, the choice of the head, and its learning on sinusoids."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.nn.functional import mse_loss

from metalab.algorithms import ANIL
from metalab.errors import ConfigError
from metalab.hypergrad import first_order, unroll
from metalab.models import MLP, Conv4
from metalab.tasks.episodic.sinusoid import Sinusoid
from tests.helpers.sinusoid import float64_batch, mse_before_and_after

INNER_LR, STEPS = 0.1, 2
HEAD = ("net.4.weight", "net.4.bias")  # the MLP's last nn.Linear


def make_anil(solver):
    torch.manual_seed(0)
    model = MLP((1,), 1, hidden_sizes=(8, 8)).double()
    tasks = Sinusoid(shots=5, query=6)
    algo = ANIL(model, tasks, solver, functools.partial(torch.optim.SGD, lr=0.0), inner_lr=INNER_LR, inner_steps=STEPS)
    return algo, model, float64_batch(tasks, 3)


def loop_meta_loss(model, params, batch, create_graph):
    """The meta-objective one task at a time with torch.autograd, SGD on the head alone (the oracle);
    without ``create_graph`` the inner gradients are constants (first order)."""
    losses = []
    for t in range(batch.num_tasks):
        fast = dict(params)
        for _ in range(STEPS):
            loss = mse_loss(
                torch.func.functional_call(model, fast, (batch.x_support[t],)).squeeze(-1), batch.y_support[t]
            )
            grads = torch.autograd.grad(loss, [fast[k] for k in HEAD], create_graph=create_graph)
            fast.update({k: fast[k] - INNER_LR * g for k, g in zip(HEAD, grads)})
        query = torch.func.functional_call(model, fast, (batch.x_query[t],)).squeeze(-1)
        losses.append(mse_loss(query, batch.y_query[t]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("solver", [unroll, first_order])
def test_meta_gradient_equals_a_per_task_loop_adapting_the_head(solver):
    algo, model, batch = make_anil(solver())
    params = dict(model.named_parameters())
    losses, _ = algo.meta_loss(batch)
    got = torch.autograd.grad(losses.mean(), list(params.values()))
    oracle = loop_meta_loss(model, params, batch, create_graph=not algo.solver.first_order)
    expected = torch.autograd.grad(oracle, list(params.values()))
    for key, g, e in zip(params, got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=key)
        assert e.abs().sum() > 0, key  # every parameter, the body included, is meta-learned


def test_the_body_stays_at_theta_inside_the_inner_loop():
    algo, model, batch = make_anil(unroll())
    theta = {k: v.detach() for k, v in model.named_parameters()}
    seen = []
    adapted = algo.adapt(dict(theta), batch.x_support[0], batch.y_support[0], 3, lambda step, p: seen.append(p))
    assert len(seen) == 4
    for params in [*seen, adapted]:
        assert set(params) == set(theta)
        for key in theta:
            if key not in HEAD:
                assert torch.equal(params[key], theta[key]), key
    for key in HEAD:
        assert not torch.allclose(adapted[key], theta[key]), key


def test_the_head_is_the_last_linear_layer_by_default_and_an_unknown_prefix_is_refused():
    conv = ANIL(Conv4((1, 28, 28), 5, hidden_channels=4), Sinusoid(), unroll(), torch.optim.SGD)
    assert conv.head == "head" and conv.head_keys == ["head.weight", "head.bias"]
    assert make_anil(unroll())[0].head_keys == list(HEAD)
    with pytest.raises(ConfigError) as error:
        ANIL(MLP((1,), 1), Sinusoid(), unroll(), torch.optim.SGD, head="head")
    assert str(error.value) == (
        "algo.head=head names no parameter of MLP: set algo.head to one of net.0, net.2, net.4 "
        "(null: the last nn.Linear)."
    )


def test_it_learns_sinusoids():
    """A seeded short run: the validation MSE after adaptation falls to less than half of its value at
    the random initialisation."""
    torch.manual_seed(0)
    tasks = Sinusoid(shots=10, query=10)
    model = MLP((1,), 1, hidden_sizes=(32, 32))
    algo = ANIL(
        model,
        tasks,
        unroll(),
        functools.partial(torch.optim.Adam, lr=0.01),
        inner_lr=0.05,
        inner_steps=2,
        eval_inner_steps=5,
    )
    before, after = mse_before_and_after(algo, tasks)
    assert after < 0.5 * before, (before, after)
