"""iMAML's implicit meta-gradient against a dense (I + H/lam)^{-1} g, per task."""

from __future__ import annotations

import functools

import pytest
import torch

from metalab.algorithms import IMAML
from metalab.errors import ConfigError
from metalab.hypergrad import cg, exact, first_order, gmres, neumann, unroll
from metalab.models import MLP
from metalab.optim.inner import adam
from metalab.tasks.episodic.sinusoid import Sinusoid

LAM = 2.0


def make_imaml(solver, inner_steps=30, inner_optimizer="sgd", smooth=False, **kwargs):
    """A small float64 iMAML on 3 sinusoid tasks; ``smooth``: a tanh network, whose inner problem has
    a root of F (a ReLU network's inner minimum can sit on a kink, where F != 0 exactly)."""
    torch.manual_seed(0)
    model = (
        torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
        if smooth
        else MLP((1,), 1, hidden_sizes=(6,))
    ).double()
    tasks = Sinusoid(shots=5, query=6)
    algo = IMAML(
        model,
        tasks,
        solver,
        functools.partial(torch.optim.SGD, lr=0.0),
        lam=LAM,
        inner_lr=0.05,
        inner_steps=inner_steps,
        inner_optimizer=inner_optimizer,
        **kwargs,
    )
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
        query = lambda vec: algo.tasks.loss(
            algo.predict(unflat(vec), batch.x_query[t], batch.x_support[t]), batch.y_query[t]
        )
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


def test_residuals_match_their_definitions_on_a_dense_system():
    """inner residual = ||F(w, theta)|| / ||F(theta, theta)||; linear residual = ||(I + H/lam) u - g|| / ||g||
    with u the solver's answer, H and g built densely (one task, so the mean is that task's)."""
    algo, model, batch = make_imaml(cg(maxiter=2), inner_steps=4)
    batch = type(batch)(batch.x_support[:1], batch.y_support[:1], batch.x_query[:1], batch.y_query[:1])
    got, _, _, inner, linear = algo.meta_gradient(batch, residuals=True)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    x_support, y_support = batch.x_support[0], batch.y_support[0]
    adapted = algo.adapt(theta, x_support, y_support, algo.inner_steps)
    flat = lambda params: torch.cat([v.flatten() for v in params.values()])  # noqa: E731
    expected_inner = (
        flat(algo.optimality(adapted, theta, x_support, y_support)).norm()
        / (flat(torch.func.grad(algo.support_loss)(theta, x_support, y_support)) / LAM).norm()
    )
    torch.testing.assert_close(inner[0], expected_inner)
    names, shapes, sizes = list(theta), [v.shape for v in theta.values()], [v.numel() for v in theta.values()]
    unflat = lambda vec: {n: c.view(s) for n, c, s in zip(names, vec.split(sizes), shapes)}  # noqa: E731
    w = flat(adapted)
    hessian = torch.autograd.functional.hessian(lambda vec: algo.support_loss(unflat(vec), x_support, y_support), w)
    g = torch.autograd.functional.jacobian(
        lambda vec: algo.tasks.loss(algo.predict(unflat(vec), batch.x_query[0], x_support), batch.y_query[0]), w
    )
    system = torch.eye(len(w), dtype=torch.float64) + hessian / LAM
    expected_linear = (system @ flat(got) - g).norm() / g.norm()
    assert expected_linear > 1e-3  # two CG steps do not solve it: the check can fail
    torch.testing.assert_close(linear[0], expected_linear)
    exact_linear = make_imaml(exact(), inner_steps=4)[0].meta_gradient(batch, residuals=True)[4]
    assert exact_linear[0] < 1e-10


@pytest.mark.slow
def test_implicit_meta_gradient_equals_unrolled_once_the_inner_problem_is_solved():
    """The implicit function theorem's answer is the limit of backpropagation through the inner loop:
    with the inner problem solved to 1e-9 they agree; stopped early, they do not."""
    algo, _, batch = make_imaml(exact(), inner_steps=400, smooth=True)
    implicit, _, _, inner, _ = algo.meta_gradient(batch, residuals=True)
    assert inner.max() < 1e-9
    unrolled = algo.unrolled_meta_gradient(batch)
    flat = lambda params: torch.cat([v.flatten() for v in params.values()])  # noqa: E731
    cosine = torch.nn.functional.cosine_similarity(flat(implicit), flat(unrolled), dim=0)
    assert cosine > 1 - 1e-6 and (flat(implicit) - flat(unrolled)).norm() < 1e-5 * flat(unrolled).norm()
    early, _, _ = make_imaml(exact(), inner_steps=2, smooth=True)
    stopped = flat(early.meta_gradient(batch)[0])
    assert torch.nn.functional.cosine_similarity(stopped, flat(early.unrolled_meta_gradient(batch)), dim=0) < 0.99


def test_first_order_is_the_query_gradient_at_the_inner_solution():
    algo, model, batch = make_imaml(first_order())
    got, _, _ = algo.meta_gradient(batch)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    expected = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in range(batch.num_tasks):
        adapted = {
            k: v.requires_grad_() for k, v in algo.adapt(theta, batch.x_support[t], batch.y_support[t], 30).items()
        }
        loss = algo.tasks.loss(algo.predict(adapted, batch.x_query[t], batch.x_support[t]), batch.y_query[t])
        for k, g in zip(adapted, torch.autograd.grad(loss, list(adapted.values()))):
            expected[k] += g / batch.num_tasks
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


@pytest.mark.slow
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
        updates, state = opt.update({k: 3 * p**2 for k, p in params.items()}, state)
        params = {k: params[k] + updates[k] for k in params}
        reference.zero_grad()
        sum((leaf**3).sum() for leaf in leaves).backward()
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
    with pytest.raises(
        ConfigError,
        match="iMAML differentiates the inner problem's optimality condition, not its loop; "
        "use solver=cg, neumann, gmres, exact or first_order",
    ):
        make_imaml(unroll())
    with pytest.raises(ConfigError, match="algo.lam must be positive"):
        IMAML(MLP((1,), 1), Sinusoid(), cg(), functools.partial(torch.optim.Adam, lr=1e-3), lam=0.0)
    from metalab.models import Conv4

    with pytest.raises(ConfigError, match="solver=exact builds a dense"):
        IMAML(Conv4((1, 28, 28), 5), Sinusoid(), exact(), functools.partial(torch.optim.Adam, lr=1e-3))
    with pytest.raises(ConfigError, match="algo.inner_optimizer must be one of .*'hessian_free'"):
        IMAML(MLP((1,), 1), Sinusoid(), cg(), functools.partial(torch.optim.Adam, lr=1e-3), inner_optimizer="lbfgs")
    with pytest.raises(ConfigError, match="algo.inner_cg_steps has no effect with algo.inner_optimizer=sgd"):
        make_imaml(cg(), inner_cg_steps=8)
    with pytest.raises(ConfigError, match="algo.inner_cg_steps must be an integer >= 1"):
        make_imaml(cg(), inner_optimizer="hessian_free", inner_cg_steps=0)


def test_hessian_free_inner_solver_solves_the_proximal_problem_and_gives_the_dense_meta_gradient():
    """Newton-CG (the paper's "iMAML, Hessian-free") solves the inner problem of the smooth model to
    1e-9 in 8 steps, where gradient descent needs hundreds; its implicit meta-gradient is then the
    dense (I + H/lam)^{-1} g at its solution."""
    algo, model, batch = make_imaml(
        exact(), inner_steps=8, inner_optimizer="hessian_free", inner_cg_steps=19, smooth=True
    )
    got, _, _, inner, _ = algo.meta_gradient(batch, residuals=True)
    assert inner.max() < 1e-9
    gradient_descent, _, _ = make_imaml(exact(), inner_steps=8, smooth=True)
    assert gradient_descent.meta_gradient(batch, residuals=True)[3].min() > 1e-3
    expected = dense_meta_gradient(algo, model, batch)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-8, atol=1e-10)


@pytest.mark.slow
def test_imaml_learns_the_sinusoid_at_least_as_fast_as_maml(tmp_path):
    """End to end with the defaults, the same seed and budget: iMAML (solver=cg) lowers the validation
    MSE at least as much as MAML, and both well below the untrained initialisation's."""
    from metalab.app.build import make_trainer
    from tests.helpers.configs import TINY, compose_config

    budget = [
        *TINY,
        "trainer.iterations=200",
        "trainer.meta_batch_size=25",
        "trainer.eval_every=0",
        "trainer.eval_tasks=100",
        "trainer.eval_batch_size=100",
        "trainer.test_tasks=0",
        "trainer.log_every=100",
    ]
    untrained = make_trainer(compose_config([*budget, "algo=imaml", "trainer.iterations=0"]), tmp_path / "zero").fit()
    maml = make_trainer(compose_config([*budget, "algo=maml"]), tmp_path / "maml").fit()
    imaml = make_trainer(compose_config([*budget, "algo=imaml", "solver=cg"]), tmp_path / "imaml").fit()
    start, maml_mse, imaml_mse = (run["val"]["mse"]["mean"] for run in (untrained, maml, imaml))
    assert imaml_mse <= maml_mse < 0.75 * start, (start, maml_mse, imaml_mse)


def test_defaults_solve_the_inner_problem_and_the_trainer_logs_both_residuals(tmp_path):
    """At the default settings the inner problem is solved to a small relative residual, and every
    log_every iterations metrics.jsonl records the inner and linear residuals."""
    import json

    from metalab.app.build import make_trainer
    from tests.helpers.configs import TINY, compose_config

    trainer = make_trainer(
        compose_config(
            [*TINY, "algo=imaml", "trainer.iterations=4", "trainer.log_every=2", "trainer.meta_batch_size=25"]
        ),
        tmp_path,
    )
    batch = trainer.tasks.sample(25, "train", trainer.tasks.generator(0))
    measured = trainer.algorithm.diagnostics(batch)
    assert measured["inner_residual"] < 0.3 and measured["linear_residual"] < 0.5, measured
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "train/inner_residual" in r]
    assert [r["iteration"] for r in logged] == [2, 4]
    assert all(0 <= r["train/inner_residual"] < 1 and r["train/linear_residual"] >= 0 for r in logged)


def test_an_unsolved_inner_problem_warns_once_naming_the_keys(tmp_path):
    from metalab.app.build import make_trainer
    from metalab.errors import MetalabWarning
    from tests.helpers.configs import TINY, compose_config

    trainer = make_trainer(compose_config([*TINY, "algo=imaml", "algo.inner_steps=1", "algo.inner_lr=0.001"]), tmp_path)
    batch = trainer.tasks.sample(4, "train", trainer.tasks.generator(0))
    with pytest.warns(MetalabWarning, match="algo.inner_steps.*algo.inner_lr.*algo.lam"):
        assert trainer.algorithm.diagnostics(batch)["inner_residual"] > 0.9
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.algorithm.diagnostics(batch)  # once only
    hessian_free = ["algo.inner_optimizer=hessian_free", "algo.inner_steps=1", "algo.inner_cg_steps=1", "algo.lam=0.01"]
    trainer = make_trainer(compose_config([*TINY, "algo=imaml", *hessian_free]), tmp_path / "hf")
    with pytest.warns(MetalabWarning, match=r"raise algo.inner_steps or algo.inner_cg_steps, or algo.lam\.$"):
        trainer.algorithm.diagnostics(batch)


def test_eval_lam_changes_the_adaptation_of_evaluation_only():
    """algo.eval_lam=0 (the official code's test): evaluation adapts by plain gradient descent on the
    support loss, a hand-written loop; the training meta-gradient does not change."""
    algo, model, batch = make_imaml(cg(), inner_steps=4, eval_lam=0.0, eval_inner_steps=4)
    reference, _, _ = make_imaml(cg(), inner_steps=4, eval_inner_steps=4)
    for key, value in algo.meta_gradient(batch)[0].items():
        torch.testing.assert_close(value, reference.meta_gradient(batch)[0][key], rtol=0, atol=0)
    losses = algo.evaluate(batch)["loss"]
    for t in range(batch.num_tasks):
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        names = [name for name, _ in model.named_parameters()]
        for _ in range(4):
            support = algo.tasks.loss(
                torch.func.functional_call(model, dict(zip(names, params)), (batch.x_support[t],)), batch.y_support[t]
            )
            params = [
                (p - 0.05 * g).detach().requires_grad_() for p, g in zip(params, torch.autograd.grad(support, params))
            ]
        query = algo.tasks.loss(
            torch.func.functional_call(model, dict(zip(names, params)), (batch.x_query[t],)), batch.y_query[t]
        )
        torch.testing.assert_close(losses[t], query.detach())
    assert not torch.allclose(losses, reference.evaluate(batch)["loss"])
    with pytest.raises(ConfigError, match="algo.eval_lam must be >= 0 or null"):
        make_imaml(cg(), eval_lam=-1.0)
