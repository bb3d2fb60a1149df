"""The vmapped MAML meta-gradient against an explicit per-task loop and finite differences."""

from __future__ import annotations

import functools

import pytest
import torch

from metalab.algorithms import MAML
from metalab.hypergrad import first_order, unroll
from metalab.models import MLP
from metalab.tasks.episodic.sinusoid import Sinusoid

INNER_LR, STEPS = 0.05, 2


def make_maml(solver, learn_inner_lr=False):
    torch.manual_seed(0)
    model = MLP((1,), 1, hidden_sizes=(8, 8)).double()
    tasks = Sinusoid(shots=5, query=6)
    algo = MAML(
        model,
        tasks,
        solver,
        functools.partial(torch.optim.SGD, lr=0.0),
        inner_lr=INNER_LR,
        inner_steps=STEPS,
        learn_inner_lr=learn_inner_lr,
    )
    batch = tasks.sample(4, "train", tasks.generator(0))
    batch = type(batch)(*(t.double() for t in (batch.x_support, batch.y_support, batch.x_query, batch.y_query)))
    return algo, model, batch


def loop_meta_loss(model, params, batch, create_graph):
    """The same meta-objective with torch.autograd, one task at a time (the oracle)."""
    losses = []
    for t in range(batch.num_tasks):
        fast = dict(params)
        for _ in range(STEPS):
            loss = torch.nn.functional.mse_loss(
                torch.func.functional_call(model, fast, (batch.x_support[t],)).squeeze(-1), batch.y_support[t]
            )
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
            fast = {k: v - INNER_LR * g for (k, v), g in zip(fast.items(), grads)}
        losses.append(
            torch.nn.functional.mse_loss(
                torch.func.functional_call(model, fast, (batch.x_query[t],)).squeeze(-1), batch.y_query[t]
            )
        )
    return torch.stack(losses).mean()


def vmapped_gradient(algo, batch):
    losses, _ = algo.meta_loss(batch)
    params = algo.meta_parameters()
    return dict(zip(params, torch.autograd.grad(losses.mean(), list(params.values()))))


def test_second_order_equals_per_task_loop_and_finite_differences():
    algo, model, batch = make_maml(unroll())
    got = vmapped_gradient(algo, batch)
    params = dict(model.named_parameters())
    expected = dict(zip(params, torch.autograd.grad(loop_meta_loss(model, params, batch, True), list(params.values()))))
    for key in params:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12)
    # central finite differences along a random direction
    direction = {k: torch.randn_like(v) for k, v in params.items()}
    eps = 1e-5

    def shifted(sign):
        return {k: (v + sign * eps * direction[k]).detach().requires_grad_() for k, v in params.items()}

    plus, minus = (loop_meta_loss(model, shifted(sign), batch, False).detach() for sign in (1, -1))
    numeric = (plus - minus) / (2 * eps)
    analytic = sum((got[k] * direction[k]).sum() for k in params)
    assert torch.isclose(analytic, numeric, rtol=1e-6), (analytic, numeric)


def test_first_order_is_the_query_gradient_at_the_adapted_parameters():
    algo, model, batch = make_maml(first_order())
    got = vmapped_gradient(algo, batch)
    params = dict(model.named_parameters())
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(batch.num_tasks):  # definition: mean over tasks of grad L_query(w_t), w_t treated as a leaf
        fast = {k: v.detach().clone() for k, v in params.items()}
        for _ in range(STEPS):
            fast = {k: v.requires_grad_() for k, v in fast.items()}
            loss = torch.nn.functional.mse_loss(
                torch.func.functional_call(model, fast, (batch.x_support[t],)).squeeze(-1), batch.y_support[t]
            )
            grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {k: (v - INNER_LR * g).detach() for (k, v), g in zip(fast.items(), grads)}
        fast = {k: v.requires_grad_() for k, v in fast.items()}
        query = torch.nn.functional.mse_loss(
            torch.func.functional_call(model, fast, (batch.x_query[t],)).squeeze(-1), batch.y_query[t]
        )
        for key, g in zip(fast, torch.autograd.grad(query, list(fast.values()))):
            expected[key] += g / batch.num_tasks
    for key in params:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got["net.0.weight"], make_and_grad_second_order()["net.0.weight"])


def make_and_grad_second_order():
    algo, _, batch = make_maml(unroll())
    return vmapped_gradient(algo, batch)


def test_meta_sgd_learns_inner_rates_with_correct_gradient():
    algo, model, batch = make_maml(unroll(), learn_inner_lr=True)
    params = algo.meta_parameters()
    assert any(k.startswith("inner_lr.") for k in params)
    losses, _ = algo.meta_loss(batch)
    grads = torch.autograd.grad(losses.mean(), list(params.values()))
    key = list(params).index("inner_lr.net.4.bias")
    lr = params["inner_lr.net.4.bias"]
    eps = 1e-6
    with torch.no_grad():
        lr += eps
        plus = algo.meta_loss(batch)[0].mean()
        lr -= 2 * eps
        minus = algo.meta_loss(batch)[0].mean()
        lr += eps
    assert torch.isclose(grads[key].sum(), (plus - minus) / (2 * eps), rtol=1e-5)


def test_evaluation_reports_each_step_and_does_not_touch_meta_parameters():
    algo, model, batch = make_maml(unroll())
    algo.eval_inner_steps, algo.report_steps = 3, [0, 1, 3]
    before = {k: v.clone() for k, v in model.named_parameters()}
    scores = algo.evaluate(batch)
    assert set(scores) == {"mse@0", "mse@1", "mse@3", "mse", "loss"} and scores["mse"].shape == (4,)
    torch.testing.assert_close(scores["mse@3"], scores["mse"])
    for key, value in model.named_parameters():
        assert torch.equal(value, before[key])
    with torch.no_grad():  # step 0 is the unadapted model on the query set
        unadapted = torch.stack(
            [torch.nn.functional.mse_loss(model(batch.x_query[t]).squeeze(-1), batch.y_query[t]) for t in range(4)]
        )
    torch.testing.assert_close(scores["mse@0"], unadapted)


@pytest.mark.parametrize("solver", ["cg", "neumann", "gmres", "exact"])
def test_maml_rejects_implicit_solvers_with_the_reason(solver):
    """The reason is MAML's, by the solver's kind; the remedy is generated from what the configured
    algorithms declare: iMAML trains on episodes with every implicit solver."""
    import metalab.app.build  # noqa: F401  (installs the catalog of the configured algorithms)
    from metalab import hypergrad
    from metalab.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        MAML(MLP((1,), 1), Sinusoid(), getattr(hypergrad, solver)(), functools.partial(torch.optim.Adam, lr=1e-3))
    assert str(error.value) == (
        f"algo=maml does not support solver={solver}: MAML's inner loop is a few SGD steps, "
        "not the solution of an inner problem, so implicit differentiation does not apply; "
        f"use solver=unroll or first_order, or algo=imaml with solver={solver}."
    )


def test_query_images_are_stored_so_that_vmaps_grouped_convolution_input_is_a_channels_last_view():
    from metalab.algorithms.episodic import tasks_beside_channels

    x = torch.rand(3, 4, 2, 5, 5)  # tasks, examples, channels, height, width
    moved = tasks_beside_channels(x)
    assert torch.equal(moved, x)
    grouped = moved.movedim(0, 1).reshape(4, 3 * 2, 5, 5)  # what vmap's rule hands the convolution
    assert grouped.data_ptr() == moved.data_ptr() and grouped.is_contiguous(memory_format=torch.channels_last)
    one_task = x[0]
    assert tasks_beside_channels(one_task) is one_task  # not an episode batch: unchanged
