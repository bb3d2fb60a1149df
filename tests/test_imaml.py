"""iMAML's implicit meta-gradient against a dense (I + H/lam)^{-1} g, per task."""
from __future__ import annotations

import functools

import pytest
import torch

from metalab.algorithms import IMAML
from metalab.errors import ConfigError
from metalab.hypergrad import cg, exact, first_order, gmres, neumann, unroll
from metalab.inner_optimizers import adam
from metalab.models import MLP
from metalab.tasks.sinusoid import Sinusoid

LAM = 2.0


def make_imaml(solver, inner_steps=30, inner_optimizer="sgd"):
    torch.manual_seed(0)
    model = MLP((1,), 1, hidden_sizes=(6,)).double()
    tasks = Sinusoid(shots=5, query=6)
    algo = IMAML(model, tasks, solver, functools.partial(torch.optim.SGD, lr=0.0), lam=LAM, inner_lr=0.05,
                 inner_steps=inner_steps, inner_optimizer=inner_optimizer)
    batch = tasks.sample(3, "train", tasks.generator(1))
    batch = type(batch)(*(t.double() for t in (batch.x_support, batch.y_support, batch.x_query, batch.y_query)))
    return algo, model, batch


def dense_meta_gradient(algo, model, batch):
    """The oracle: per task, adapt, build the Hessian of L_support densely, solve (I + H/lam) x = g."""
    theta = {k: v.detach() for k, v in model.named_parameters()}
    names, shapes = list(theta), [v.shape for v in theta.values()]
    sizes = [v.numel() for v in theta.values()]

    def unflat(vector):
        return {n: c.view(s) for n, c, s in zip(names, vector.split(sizes), shapes)}

    total = torch.zeros(sum(sizes), dtype=torch.float64)
    for t in range(batch.num_tasks):
        adapted = algo.adapt(theta, batch.x_support[t], batch.y_support[t], algo.inner_steps)
        w = torch.cat([adapted[n].flatten() for n in names])
        support = lambda vec: algo.support_loss(unflat(vec), batch.x_support[t], batch.y_support[t])
        query = lambda vec: algo.tasks.loss(algo.predict(unflat(vec), batch.x_query[t], batch.x_support[t]), batch.y_query[t])
        hessian = torch.autograd.functional.hessian(support, w)
        g = torch.autograd.functional.jacobian(query, w)
        total += torch.linalg.solve(torch.eye(len(w), dtype=torch.float64) + hessian / LAM, g)
    return unflat(total / batch.num_tasks)


def test_exact_solver_equals_dense_inverse():
    algo, model, batch = make_imaml(exact())
    got, _, _ = algo.meta_gradient(batch)
    expected = dense_meta_gradient(algo, model, batch)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-8, atol=1e-10)


def test_cg_approaches_exact_as_iterations_grow_and_gmres_matches():
    expected = dense_meta_gradient(*make_imaml(exact()))

    def error(solver):
        algo, _, batch = make_imaml(solver)
        got, _, _ = algo.meta_gradient(batch)
        return max(((got[k] - expected[k]).norm() / expected[k].norm()).item() for k in expected)
    errors = [error(cg(maxiter=m)) for m in (1, 3, 10, 40)]
    assert errors[0] > 1e-3 and errors[-1] < 1e-8, errors
    assert all(a >= b * 0.999 for a, b in zip(errors, errors[1:])), errors  # monotone in practice for SPD
    assert error(gmres(maxiter=40, restart=40)) < 1e-8
    # spectrum of I + H/lam here lies in [0.43, 13.1]: alpha < 2/13.1 converges, at rate 1 - 0.43 alpha
    assert error(neumann(terms=600, alpha=0.07)) < 1e-6


def test_first_order_is_the_query_gradient_at_the_inner_solution():
    algo, model, batch = make_imaml(first_order())
    got, _, _ = algo.meta_gradient(batch)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    expected = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in range(batch.num_tasks):
        adapted = {k: v.requires_grad_() for k, v in algo.adapt(theta, batch.x_support[t], batch.y_support[t], 30).items()}
        loss = algo.tasks.loss(algo.predict(adapted, batch.x_query[t], batch.x_support[t]), batch.y_query[t])
        for k, g in zip(adapted, torch.autograd.grad(loss, list(adapted.values()))):
            expected[k] += g / batch.num_tasks
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


def test_inner_loop_minimises_the_proximal_objective():
    # a smooth model (tanh): a ReLU network's inner minimum can sit on a kink, where F != 0 exactly
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
    algo = IMAML(model, Sinusoid(), exact(), functools.partial(torch.optim.SGD, lr=0.0), lam=LAM, inner_lr=0.05)
    batch = make_imaml(exact())[2]
    theta = {k: v.detach() for k, v in model.named_parameters()}
    adapted = algo.adapt(theta, batch.x_support[0], batch.y_support[0], 2000)
    residual = algo.optimality(adapted, theta, batch.x_support[0], batch.y_support[0])
    assert max(r.abs().max().item() for r in residual.values()) < 1e-6


def test_inner_adam_matches_torch_adam():
    torch.manual_seed(0)
    params = {"a": torch.randn(3, dtype=torch.float64), "b": torch.randn(2, 2, dtype=torch.float64)}
    leaves = [p.clone().requires_grad_() for p in params.values()]
    reference = torch.optim.Adam(leaves, lr=0.1)
    opt = adam(0.1)
    state = opt.init(params)
    for _ in range(5):  # loss = sum p^3, gradient 3 p^2
        updates, state = opt.update({k: 3 * p ** 2 for k, p in params.items()}, state)
        params = {k: params[k] + updates[k] for k in params}
        reference.zero_grad()
        sum((leaf ** 3).sum() for leaf in leaves).backward()
        reference.step()
    for value, leaf in zip(params.values(), leaves):
        torch.testing.assert_close(value, leaf.detach())


def test_imaml_training_step_runs_with_adam_inner_loop_and_lowers_loss():
    algo, model, batch = make_imaml(cg(maxiter=5), inner_steps=5, inner_optimizer="adam")
    algo.optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    before = algo.train_step(batch)["loss"]
    for _ in range(20):
        after = algo.train_step(batch)["loss"]
    assert after < before


def test_unsupported_and_bad_values():
    with pytest.raises(ConfigError, match="algo=maml"):
        make_imaml(unroll())
    with pytest.raises(ConfigError, match="algo.lam must be positive"):
        IMAML(MLP((1,), 1), Sinusoid(), cg(), functools.partial(torch.optim.Adam, lr=1e-3), lam=0.0)
    from metalab.models import Conv4
    with pytest.raises(ConfigError, match="solver=exact builds a dense"):
        IMAML(Conv4((1, 28, 28), 5), Sinusoid(), exact(), functools.partial(torch.optim.Adam, lr=1e-3))
    with pytest.raises(ConfigError, match="algo.inner_optimizer"):
        IMAML(MLP((1,), 1), Sinusoid(), cg(), functools.partial(torch.optim.Adam, lr=1e-3), inner_optimizer="lbfgs")
