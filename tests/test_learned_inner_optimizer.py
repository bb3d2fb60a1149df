"""A trained LSTM rule as MAML's and iMAML's inner optimizer (algo.inner_optimizer=learned), against
an explicit per-task loop that applies the rule by hand, in float64."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import functional_call

from metalab.algorithms import IMAML, MAML
from metalab.app.runs import load_rule
from metalab.errors import ConfigError
from metalab.hypergrad import cg, first_order, unroll
from metalab.models import MLP
from metalab.optim.lstm_rule import CoordinatewiseLSTM
from metalab.tasks.episodic.sinusoid import Sinusoid

STEPS = 3


@pytest.fixture(scope="module")
def rule_run(tmp_path_factory):
    """A learned-optimizer run directory (2 meta-iterations on quadratics), its rule in best.pt."""
    from metalab.app.build import make_trainer
    from tests.helpers.configs import TINY, compose_config

    run = tmp_path_factory.mktemp("rule") / "run"
    cfg = compose_config([*TINY, "tasks=quadratic", "algo.optimizee_steps=4", "algo.unroll=2", "algo.hidden_size=5"])
    make_trainer(cfg, run).fit()
    return run


def sinusoid_batch(tasks: Sinusoid):
    batch = tasks.sample(3, "train", tasks.generator(0))
    return type(batch)(*(t.double() for t in (batch.x_support, batch.y_support, batch.x_query, batch.y_query)))


def by_hand(rule: CoordinatewiseLSTM, model, params: dict, x, y, create_graph: bool, anchor_lam=None) -> dict:
    """STEPS inner steps of one task: the support MSE's gradient (plus lam (w - theta) for iMAML's
    proximal term) of all parameters, concatenated, through the rule, its updates added back. For
    iMAML (``anchor_lam``) also its divergence guard: a step that would take the objective above its
    value at the start is not taken, and the later steps are halved."""
    names = list(params)
    state = rule.initial_state(sum(p.numel() for p in params.values()), dtype=torch.float64)

    def objective(fast):
        loss = torch.nn.functional.mse_loss(functional_call(model, fast, (x,)).squeeze(-1), y)
        if anchor_lam is not None:
            loss = loss + 0.5 * anchor_lam * sum(((fast[k] - params[k]) ** 2).sum() for k in names)
        return loss

    fast, start, scale = dict(params), objective(params).item(), 1.0
    for _ in range(STEPS):
        grads = torch.autograd.grad(objective(fast), [fast[k] for k in names], create_graph=create_graph)
        update, state = rule(torch.cat([g.reshape(-1) for g in grads]), state)
        pieces = update.split([fast[k].numel() for k in names])
        trial = {k: fast[k] + scale * piece.view_as(fast[k]) for k, piece in zip(names, pieces)}
        if anchor_lam is None or objective(trial).item() <= start:
            fast = trial
        else:
            scale /= 2
    return fast


@pytest.mark.parametrize("solver", [unroll(), first_order()], ids=["unroll", "first_order"])
def test_maml_with_the_learned_rule_equals_the_rule_applied_by_hand(rule_run, solver):
    torch.manual_seed(0)
    model = MLP((1,), 1, hidden_sizes=(8,)).double()
    tasks = Sinusoid(shots=5, query=6)
    algo = MAML(
        model,
        tasks,
        solver,
        functools.partial(torch.optim.SGD, lr=0.0),
        inner_steps=STEPS,
        inner_optimizer="learned",
        inner_rule=load_rule(rule_run),
    )
    batch = sinusoid_batch(tasks)
    losses, _ = algo.meta_loss(batch)
    params = algo.meta_parameters()
    got = torch.autograd.grad(losses.mean(), list(params.values()))

    rule = load_rule(rule_run).double().requires_grad_(False)  # the oracle's own copy
    second_order = solver.name == "unroll"
    expected_losses = []
    for t in range(batch.num_tasks):
        fast = by_hand(rule, model, params, batch.x_support[t], batch.y_support[t], create_graph=second_order)
        if not second_order:  # d grad / d theta = 0: the updates are constants, fast = theta + const
            fast = {k: params[k] + (fast[k] - params[k]).detach() for k in params}
        prediction = functional_call(model, fast, (batch.x_query[t],)).squeeze(-1)
        expected_losses.append(torch.nn.functional.mse_loss(prediction, batch.y_query[t]))
    expected_losses = torch.stack(expected_losses)
    expected = torch.autograd.grad(expected_losses.mean(), list(params.values()))
    torch.testing.assert_close(losses, expected_losses, rtol=1e-10, atol=1e-12)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_imaml_adapts_with_the_learned_rule_on_its_proximal_objective(rule_run):
    torch.manual_seed(1)
    model = MLP((1,), 1, hidden_sizes=(8,)).double()
    tasks = Sinusoid(shots=5, query=6)
    algo = IMAML(
        model,
        tasks,
        cg(maxiter=3),
        functools.partial(torch.optim.SGD, lr=0.0),
        lam=2.0,
        inner_steps=STEPS,
        inner_optimizer="learned",
        inner_rule=load_rule(rule_run),
    )
    batch = sinusoid_batch(tasks)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    adapted = torch.func.vmap(lambda x, y: algo.adapt(theta, x, y, STEPS))(batch.x_support, batch.y_support)
    rule = load_rule(rule_run).double()
    for t in range(batch.num_tasks):
        expected = by_hand(
            rule,
            model,
            {k: v.clone().requires_grad_() for k, v in theta.items()},
            batch.x_support[t],
            batch.y_support[t],
            create_graph=False,
            anchor_lam=2.0,
        )
        for k in theta:
            torch.testing.assert_close(adapted[k][t], expected[k].detach(), rtol=1e-10, atol=1e-12)
    moved = [not torch.allclose(adapted["net.0.weight"][t], theta["net.0.weight"]) for t in range(batch.num_tasks)]
    assert any(moved)  # the rule moved them where its steps kept the objective below its start


@pytest.mark.slow
def test_the_config_trains_maml_and_imaml_with_a_learned_rule(tiny_config, tmp_path, rule_run):
    from metalab.app.build import make_trainer

    for algo in ("maml", "imaml"):
        cfg = tiny_config(
            f"algo={algo}",
            "algo.inner_optimizer=learned",
            f"algo.inner_rule={rule_run}",
            "algo.inner_steps=2",
            "algo.eval_inner_steps=2",
        )
        results = make_trainer(cfg, tmp_path / algo).fit()
        assert results["status"] == "completed" and results["test"]["mse"]["mean"] == results["test"]["mse"]["mean"]


@pytest.mark.parametrize(
    "options, match",
    [
        ({"inner_optimizer": "learned"}, "needs algo.inner_rule=<run dir>"),
        ({"inner_optimizer": "adam", "inner_rule": "somewhere"}, "only read with algo.inner_optimizer=learned"),
        ({"inner_optimizer": "adam", "learn_inner_lr": True}, "needs algo.inner_optimizer=sgd"),
    ],
)
def test_bad_inner_optimizer_options_are_refused_in_one_sentence(options, match):
    with pytest.raises(ConfigError, match=match):
        MAML(MLP((1,), 1), Sinusoid(), unroll(), functools.partial(torch.optim.Adam, lr=1e-3), **options)


def test_a_rule_directory_without_a_run_is_refused_naming_the_key():
    from metalab.app.runs import resolve_rules

    with pytest.raises(ConfigError, match="algo.inner_rule=/nonexistent holds no checkpoint.pt"):
        resolve_rules({"inner_rule": "/nonexistent"})
