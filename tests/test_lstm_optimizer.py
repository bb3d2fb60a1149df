"""The learned LSTM optimizer against oracles: the preprocessing formula, an explicit per-coordinate
LSTM, and autograd through an explicitly unrolled, per-problem optimisation in float64."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from metalab.algorithms import MAML, LSTMOptimizer
from metalab.app.runs import load_rule
from metalab.errors import ConfigError
from metalab.hypergrad import first_order, unroll
from metalab.models import MLP
from metalab.optim.inner import learned_inner_optimizer
from metalab.optim.learned import LearnedOptimizer
from metalab.optim.lstm_rule import CoordinatewiseLSTM, preprocess_gradients
from metalab.tasks.episodic.sinusoid import Sinusoid
from metalab.tasks.optimizees.quadratic import Quadratic


def paper_preprocessing(g: float, p: float) -> tuple[float, float]:
    """Andrychowicz et al. 2016, Appendix A, written out for one number."""
    if abs(g) >= math.exp(-p):
        return math.log(abs(g)) / p, math.copysign(1.0, g) if g != 0 else 0.0
    return -1.0, math.exp(p) * g


@pytest.mark.parametrize("p", [10.0, 5.0])
def test_preprocessing_matches_the_formula_on_both_branches_and_the_boundary(p):
    boundary = math.exp(-p)
    values = [
        0.0,
        1e-9,
        -1e-9,
        0.5 * boundary,
        -0.5 * boundary,
        boundary,
        -boundary,
        math.nextafter(boundary, 0.0),
        2 * boundary,
        0.3,
        -0.3,
        1.0,
        -7.0,
        1e4,
    ]
    got = preprocess_gradients(torch.tensor(values, dtype=torch.float64), p)
    expected = torch.tensor([paper_preprocessing(g, p) for g in values], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    # both branches give (-1, sign g) at |g| = e^-p: the features are continuous across the boundary
    assert got[5].tolist() == [-1.0, 1.0] and got[6].tolist() == [-1.0, -1.0]
    torch.testing.assert_close(got[7], torch.tensor([-1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(got[3:5], torch.tensor([[-1.0, 0.5], [-1.0, -0.5]], dtype=torch.float64))  # (-1, e^p g)
    # gradients stay finite at g = 0 (the log branch is not taken there)
    g = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(preprocess_gradients(g, p).sum(), g)
    assert torch.isfinite(grad).all()


def reference_update(rule: CoordinatewiseLSTM, grad: float, hidden: list[torch.Tensor], cell: list[torch.Tensor]):
    """One coordinate through the LSTM gate equations written out (i, f, g, o gates, as torch orders
    them), layer by layer; returns (update, hidden, cell) of that coordinate."""
    x = torch.tensor(paper_preprocessing(grad, rule.preprocess), dtype=torch.float64)
    new_hidden, new_cell = [], []
    for layer in range(rule.num_layers):
        w_ih, w_hh = getattr(rule.lstm, f"weight_ih_l{layer}"), getattr(rule.lstm, f"weight_hh_l{layer}")
        b = getattr(rule.lstm, f"bias_ih_l{layer}") + getattr(rule.lstm, f"bias_hh_l{layer}")
        gates = w_ih @ x + w_hh @ hidden[layer] + b
        i, f, g, o = gates.chunk(4)
        c = torch.sigmoid(f) * cell[layer] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        new_hidden.append(h)
        new_cell.append(c)
        x = h
    update = rule.output_scale * (rule.readout.weight[0] @ x + rule.readout.bias[0])
    return update, new_hidden, new_cell


def test_batched_update_equals_a_loop_over_coordinates():
    torch.manual_seed(0)
    rule = CoordinatewiseLSTM(hidden_size=5, num_layers=2, preprocess=10.0, output_scale=0.1).double()
    grads = [torch.randn(3, 4, dtype=torch.float64) * torch.logspace(-6, 1, 4, dtype=torch.float64) for _ in range(3)]
    state = rule.initial_state(12, dtype=torch.float64)
    zeros = torch.zeros(5, dtype=torch.float64)
    per_coordinate = [([zeros] * 2, [zeros] * 2) for _ in range(12)]
    with torch.no_grad():
        for grad in grads:  # three steps: the hidden state of each coordinate carries over
            update, state = rule(grad, state)
            for index, g in enumerate(grad.flatten().tolist()):
                expected, hidden, cell = reference_update(rule, g, *per_coordinate[index])
                per_coordinate[index] = (hidden, cell)
                torch.testing.assert_close(update.flatten()[index], expected, rtol=1e-10, atol=1e-12)
                for layer in range(2):
                    torch.testing.assert_close(state.hidden[layer, index], hidden[layer], rtol=1e-10, atol=1e-12)


STEPS, UNROLL, PROBLEMS, DIM = 7, 3, 3, 4


def make_lstm_optimizer(solver, **options) -> tuple[LSTMOptimizer, Quadratic]:
    torch.manual_seed(0)
    tasks = Quadratic(dim=DIM, init_std=0.5)
    algo = LSTMOptimizer(
        MLP((DIM,), 1),
        tasks,
        solver,
        functools.partial(torch.optim.Adam, lr=1e-3),
        hidden_size=6,
        optimizee_steps=STEPS,
        unroll=UNROLL,
        **options,
    )
    algo.rule.double()
    return algo, tasks


def oracle_meta_gradients(
    algo: LSTMOptimizer, W, y, theta0, keep_second_order: bool, weights
) -> list[list[torch.Tensor]]:
    """Each truncation's meta-gradient from an explicit loop over problems and steps, with the
    quadratic's gradient in closed form, 2 W^T (W theta - y) (from a detached theta when second
    derivatives are dropped), states and parameters detached at every truncation."""
    params = list(algo.rule.parameters())
    thetas = [theta0[b] for b in range(PROBLEMS)]
    states = [algo.rule.initial_state(DIM, dtype=torch.float64) for _ in range(PROBLEMS)]
    gradients = []
    for start in range(0, STEPS, UNROLL):
        end = min(start + UNROLL, STEPS)
        meta_loss = 0.0
        for b in range(PROBLEMS):
            theta, state = thetas[b].detach(), states[b].detach()
            for step in range(start, end):
                source = theta if keep_second_order else theta.detach()
                grad = 2 * W[b].T @ (W[b] @ source - y[b])
                update, state = algo.rule(grad, state)
                theta = theta + update
                meta_loss = meta_loss + weights[step - start] * ((W[b] @ theta - y[b]) ** 2).sum() / PROBLEMS
            thetas[b], states[b] = theta, state
        gradients.append(list(torch.autograd.grad(meta_loss, params)))
    return gradients


@pytest.mark.parametrize("solver", [first_order(), unroll()], ids=["first_order", "unroll"])
@pytest.mark.parametrize("weights", [None, [0.5, 1.0, 2.0]], ids=["unweighted", "weighted"])
def test_truncated_meta_gradient_equals_autograd_through_an_explicit_loop(solver, weights):
    algo, tasks = make_lstm_optimizer(solver, loss_weights=weights)
    batch = tasks.sample(PROBLEMS, "train", tasks.generator(3))
    batch.params, batch.data = batch.params.double(), {k: v.double() for k, v in batch.data.items()}
    params = list(algo.rule.parameters())
    got = [torch.autograd.grad(t.meta_loss, params) for t in algo.truncations(batch)]
    expected = oracle_meta_gradients(
        algo, batch.data["W"], batch.data["y"], batch.params, not solver.first_order, weights or [1.0] * UNROLL
    )
    assert len(got) == len(expected) == math.ceil(STEPS / UNROLL)
    for window_got, window_expected in zip(got, expected):
        for g, e in zip(window_got, window_expected):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_first_order_and_unroll_differ_and_train_step_makes_one_update_per_truncation():
    grads = {}
    for solver in (first_order(), unroll()):
        algo, tasks = make_lstm_optimizer(solver)
        batch = tasks.sample(PROBLEMS, "train", tasks.generator(3))
        batch.params, batch.data = batch.params.double(), {k: v.double() for k, v in batch.data.items()}
        grads[solver.name] = torch.autograd.grad(next(algo.truncations(batch)).meta_loss, list(algo.rule.parameters()))
        metrics = algo.train_step(batch)
        assert {"loss", "final_loss", "grad_norm"} <= set(metrics)
        steps = {int(s["step"]) for s in algo.optimizer.state_dict()["state"].values()}
        assert steps == {math.ceil(STEPS / UNROLL)}
    assert not torch.allclose(grads["first_order"][0], grads["unroll"][0])


def test_evaluation_trajectory_starts_at_the_initial_loss_and_reports_the_final_one():
    algo, tasks = make_lstm_optimizer(first_order(), report_steps=[0, 2])
    algo.rule.float()
    batch = tasks.sample(5, "val", tasks.generator(1))
    scores = algo.evaluate(batch)
    initial = ((torch.einsum("bij,bj->bi", batch.data["W"], batch.params) - batch.data["y"]) ** 2).sum(-1)
    torch.testing.assert_close(scores["loss@0"], initial)
    trajectory = algo.trajectory(batch)
    assert trajectory.shape == (5, STEPS + 1)
    torch.testing.assert_close(scores["final_loss"], trajectory[:, -1])
    torch.testing.assert_close(scores["loss@2"], trajectory[:, 2])


def test_mismatched_pairs_are_refused_in_one_sentence():
    optimizer = functools.partial(torch.optim.Adam, lr=1e-3)
    with pytest.raises(ConfigError, match="algo=lstm_optimizer"):
        MAML(MLP((10,), 1), Quadratic(), unroll(), optimizer)
    with pytest.raises(ConfigError, match="does not support solver=cg"):
        from metalab.hypergrad import cg

        LSTMOptimizer(MLP((10,), 1), Quadratic(), cg(), optimizer)


def test_lstm_optimizer_builds_the_class_of_the_samplers_batch_kind_and_refuses_other_kinds():
    from metalab.algorithms.lstm_optimizer import EpisodicLSTMOptimizer, OptimizeeLSTMOptimizer
    from metalab.tasks.auxiliary.toy import AuxToy

    optimizer = functools.partial(torch.optim.Adam, lr=1e-3)
    on_problems = LSTMOptimizer(MLP((DIM,), 1), Quadratic(dim=DIM), first_order(), optimizer)
    on_episodes = LSTMOptimizer(
        model=MLP((1,), 1), tasks=Sinusoid(shots=4, query=5), solver=first_order(), meta_optimizer=optimizer
    )  # as the config builds it: by keyword
    assert type(on_problems) is OptimizeeLSTMOptimizer and type(on_episodes) is EpisodicLSTMOptimizer
    assert isinstance(on_problems, LSTMOptimizer) and isinstance(on_episodes, LSTMOptimizer)
    assert "model" not in on_problems.state_dict() and "model" in on_episodes.state_dict()  # episodes start there
    with pytest.raises(ConfigError, match="algo=lstm_optimizer trains on .*, but AuxToy yields"):
        LSTMOptimizer(MLP((10,), 1), AuxToy(), first_order(), optimizer)
    with pytest.raises(ConfigError, match="algo=lstm_optimizer trains on episodes, but Quadratic yields"):
        EpisodicLSTMOptimizer(MLP((DIM,), 1), Quadratic(dim=DIM), first_order(), optimizer)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"unroll": 0}, "algo.unroll"),
        ({"loss_weights": [1.0]}, "algo.loss_weights"),
        ({"preprocess": -1.0}, "algo.preprocess"),
        ({"report_steps": [500]}, "report_steps"),
    ],
)
def test_bad_options_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        LSTMOptimizer(MLP((10,), 1), Quadratic(), first_order(), functools.partial(torch.optim.Adam, lr=1e-3), **bad)


def sinusoid_setup(solver, **options):
    torch.manual_seed(0)
    tasks = Sinusoid(shots=4, query=5)
    model = MLP((1,), 1, hidden_sizes=(6,)).double()
    algo = LSTMOptimizer(
        model,
        tasks,
        solver,
        functools.partial(torch.optim.Adam, lr=1e-3),
        hidden_size=5,
        optimizee_steps=STEPS,
        unroll=UNROLL,
        **options,
    )
    algo.rule.double()
    batch = tasks.sample(3, "train", tasks.generator(2))
    batch = type(batch)(*(t.double() for t in (batch.x_support, batch.y_support, batch.x_query, batch.y_query)))
    return algo, model, batch


@pytest.mark.parametrize("solver", [first_order(), unroll()], ids=["first_order", "unroll"])
def test_on_episodes_the_rule_trains_on_support_and_is_meta_trained_on_query(solver):
    algo, model, batch = sinusoid_setup(solver)
    rule_params = list(algo.rule.parameters())
    got = [torch.autograd.grad(t.meta_loss, rule_params) for t in algo.truncations(batch)]
    # oracle: one episode at a time, the model's parameters as a dict, autograd for the support gradient
    names = [name for name, _ in model.named_parameters()]
    starts = [[p.detach() for p in model.parameters()] for _ in range(batch.num_tasks)]
    states = [
        algo.rule.initial_state(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
        for _ in range(batch.num_tasks)
    ]

    def mse(params, x, y):
        return ((torch.func.functional_call(model, dict(zip(names, params)), (x,)).squeeze(-1) - y) ** 2).mean()

    for window, start in enumerate(range(0, STEPS, UNROLL)):
        meta_loss = 0.0
        for b in range(batch.num_tasks):
            params = [p.detach().requires_grad_(True) for p in starts[b]]
            state = states[b].detach()
            for _ in range(start, min(start + UNROLL, STEPS)):
                grads = torch.autograd.grad(
                    mse(params, batch.x_support[b], batch.y_support[b]), params, create_graph=not solver.first_order
                )
                flat = torch.cat([g.reshape(-1) for g in grads])
                update, state = algo.rule(flat if not solver.first_order else flat.detach(), state)
                pieces = update.split([p.numel() for p in params])
                params = [p + u.view_as(p) for p, u in zip(params, pieces)]
                meta_loss = meta_loss + mse(params, batch.x_query[b], batch.y_query[b]) / batch.num_tasks
            starts[b], states[b] = params, state
        expected = torch.autograd.grad(meta_loss, rule_params)
        for g, e in zip(got[window], expected):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_episode_evaluation_scores_the_query_set_and_state_dict_keeps_the_starting_model():
    algo, model, batch = sinusoid_setup(first_order(), eval_optimizee_steps=3, report_steps=[0])
    scores = algo.evaluate(batch)
    untrained = torch.stack(
        [((model(batch.x_query[b]).squeeze(-1) - batch.y_query[b]) ** 2).mean() for b in range(batch.num_tasks)]
    ).detach()
    torch.testing.assert_close(scores["mse@0"], untrained)
    assert scores["mse"].shape == (3,) and not torch.allclose(scores["mse"], untrained)
    torch.testing.assert_close(scores["loss"], scores["mse"])
    state = algo.state_dict()
    other, other_model, _ = sinusoid_setup(first_order(), eval_optimizee_steps=3, report_steps=[0])
    with torch.no_grad():
        for p in [*other_model.parameters(), *other.rule.parameters()]:
            p.add_(1.0)
    other.load_state_dict(state)
    torch.testing.assert_close(other.evaluate(batch)["mse"], scores["mse"], rtol=0, atol=0)


def linear_problem():
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    return model, lambda net=model: ((net(x) - y) ** 2).mean()


def test_learned_optimizer_steps_equal_the_rule_on_the_concatenated_gradient():
    rule = CoordinatewiseLSTM(hidden_size=4).double()
    model, loss_fn = linear_problem()
    oracle = copy.deepcopy(model)
    theta = parameters_to_vector(model.parameters()).detach().clone()
    state = rule.initial_state(theta.numel(), dtype=torch.float64)
    optimizer = LearnedOptimizer(model.parameters(), rule=rule)
    for _ in range(4):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
        # oracle: the whole parameter vector as one tensor, updated by hand
        vector_to_parameters(theta, oracle.parameters())
        oracle.zero_grad()
        loss_fn(oracle).backward()
        with torch.no_grad():
            update, state = rule(torch.cat([p.grad.reshape(-1) for p in oracle.parameters()]), state)
        theta = theta + update
        torch.testing.assert_close(parameters_to_vector(model.parameters()).detach(), theta, rtol=1e-12, atol=1e-14)


def test_learned_optimizer_state_dict_round_trip_continues_identically():
    rule = CoordinatewiseLSTM(hidden_size=4).double()
    model, loss_fn = linear_problem()
    optimizer = LearnedOptimizer(model.parameters(), rule=rule)

    def run(opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()

    run(optimizer, 3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = copy.deepcopy(optimizer.state_dict())
    assert {tuple(s["hidden"].shape) for s in saved["state"].values()} == {(2, 6, 4), (2, 2, 4)}
    run(optimizer, 2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(saved_model)
    fresh = LearnedOptimizer(model.parameters(), rule=rule)
    fresh.load_state_dict(saved)
    run(fresh, 2)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    # without the saved hidden states the continuation differs: the state matters
    model.load_state_dict(saved_model)
    run(LearnedOptimizer(model.parameters(), rule=rule), 2)
    assert not torch.equal(model.weight, expected["weight"])


def test_learned_optimizer_loads_the_best_rule_of_a_run(tiny_config, tmp_path):
    from metalab.app.build import make_trainer
    from metalab.checkpoint import load_checkpoint

    cfg = tiny_config(
        "tasks=quadratic",
        "algo.optimizee_steps=4",
        "algo.unroll=2",
        "algo.hidden_size=3",
        "algo.num_layers=1",
        "algo.preprocess=null",
    )
    make_trainer(cfg, tmp_path / "run").fit()
    best = load_checkpoint(tmp_path / "run" / "best.pt")["algorithm"]["meta_parameters"]
    rule = load_rule(tmp_path / "run")
    assert (rule.hidden_size, rule.num_layers, rule.preprocess) == (3, 1, None)
    for name, value in rule.named_parameters():
        assert torch.equal(value, best[name])
    theta = torch.nn.Parameter(torch.ones(10))
    optimizer = LearnedOptimizer([theta], rule=load_rule(tmp_path / "run", checkpoint="last"))
    last = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["algorithm"]["meta_parameters"]
    assert torch.equal(optimizer.rule.readout.weight, last["readout.weight"])
    with pytest.raises(ConfigError, match="holds no checkpoint.pt"):
        load_rule(tmp_path)
    make_trainer(tiny_config("algo=maml"), tmp_path / "maml").fit()
    with pytest.raises(
        ConfigError, match=r"a run of metalab.algorithms.MAML, not of LSTMOptimizer: .*algo=lstm_optimizer"
    ):
        LearnedOptimizer([theta], rule=load_rule(tmp_path / "maml"))


def test_the_rule_as_an_inner_optimizer_vmaps_over_tasks_and_equals_learned_optimizer():
    rule = CoordinatewiseLSTM(hidden_size=4).double()
    inner = learned_inner_optimizer(rule)
    model, _ = linear_problem()
    torch.manual_seed(2)
    xs, ys = torch.randn(3, 8, 3, dtype=torch.float64), torch.randn(3, 8, 2, dtype=torch.float64)
    start = {k: v.detach() for k, v in model.named_parameters()}

    def task_loss(params, x, y):
        return ((torch.func.functional_call(model, params, (x,)) - y) ** 2).mean()

    def adapt(x, y):
        params, state = start, inner.init(start)
        for _ in range(3):
            updates, state = inner.update(torch.func.grad(task_loss)(params, x, y), state)
            params = {k: params[k] + updates[k] for k in params}
        return params

    vmapped = torch.func.vmap(adapt)(xs, ys)
    for t in range(3):  # oracle: LearnedOptimizer on a copy of the model, one task at a time
        net = copy.deepcopy(model)
        optimizer = LearnedOptimizer(net.parameters(), rule=rule)
        for _ in range(3):
            optimizer.zero_grad()
            ((net(xs[t]) - ys[t]) ** 2).mean().backward()
            optimizer.step()
        for name, value in net.named_parameters():
            torch.testing.assert_close(vmapped[name][t], value.detach(), rtol=1e-12, atol=1e-14)


def test_init_rule_starts_from_a_trained_rule_and_zero_iterations_test_it(tiny_config, tmp_path):
    """algo.init_rule=<run> with trainer.iterations=0 tests exactly the rule that run tested: the same
    test problems (eval_seed) give the same final losses as the run's own test."""
    from metalab.app.build import make_trainer

    shape = ["tasks=quadratic", "algo.optimizee_steps=4", "algo.unroll=2", "algo.hidden_size=3"]
    trained = make_trainer(tiny_config(*shape), tmp_path / "trained").fit()
    evaluated = make_trainer(
        tiny_config(*shape, f"algo.init_rule={tmp_path / 'trained'}", "trainer.iterations=0", "trainer.eval_tasks=0"),
        tmp_path / "evaluated",
    ).fit()
    assert evaluated["status"] == "completed" and evaluated["iteration"] == 0
    for key in ("final_loss", "adam/final_loss"):
        assert evaluated["test"][key] == trained["test"][key], key
    with pytest.raises(ConfigError, match="algo.init_rule=.* holds no checkpoint.pt"):
        make_trainer(tiny_config(*shape, f"algo.init_rule={tmp_path / 'absent'}"), tmp_path / "x")
    with pytest.raises(ConfigError, match=r"not this run's \(5, 2"):
        make_trainer(
            tiny_config(*shape[:-1], "algo.hidden_size=5", f"algo.init_rule={tmp_path / 'trained'}"), tmp_path / "y"
        )
