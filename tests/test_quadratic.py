"""The quadratic optimizee family against explicit per-problem formulas, and every configured
learned-optimizer pairing through the real trainer."""

from __future__ import annotations

import pytest
import torch

from metalab.app.build import make_trainer
from metalab.errors import ConfigError
from metalab.optim.baselines import BASELINES, baseline_trajectory
from metalab.tasks.optimizees.quadratic import Quadratic
from tests.helpers.configs import REPO, compose_config
from tests.helpers.mnist import MNIST_OVERRIDES, mnist_or_skip
from tests.helpers.runs import train, train_records

#: a learned-optimizer run shrunk to seconds: 4 optimizee steps in truncations of 2
SHORT = ["algo.optimizee_steps=4", "algo.unroll=2", "algo.hidden_size=4"]


def test_vmapped_loss_equals_a_loop_over_problems():
    tasks = Quadratic(dim=5, init_std=1.0)
    batch = tasks.sample(6, "train", tasks.generator(0))
    theta = torch.randn(6, 5)
    expected = torch.stack(
        [torch.linalg.vector_norm(batch.data["W"][b] @ theta[b] - batch.data["y"][b]) ** 2 for b in range(6)]
    )
    torch.testing.assert_close(tasks.optimizee_loss(theta, batch, step=3), expected)
    # its gradient is the closed form 2 W^T (W theta - y)
    theta.requires_grad_(True)
    (grad,) = torch.autograd.grad(tasks.optimizee_loss(theta, batch, 0).sum(), theta)
    W, y = batch.data["W"], batch.data["y"]
    closed = 2 * torch.einsum("bji,bj->bi", W, torch.einsum("bij,bj->bi", W, theta.detach()) - y)
    torch.testing.assert_close(grad, closed)


@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
def test_distributions_and_determinism(distribution):
    tasks = Quadratic(dim=10, distribution=distribution, init_std=0.01)
    batch = tasks.sample(2000, "train", tasks.generator(0))
    W, y = batch.data["W"], batch.data["y"]
    assert W.shape == (2000, 10, 10) and y.shape == (2000, 10) and batch.params.shape == (2000, 10)
    if distribution == "uniform":  # U[0, 1): mean 1/2, variance 1/12
        assert W.min() >= 0 and W.max() < 1
        assert abs(W.mean().item() - 0.5) < 0.01 and abs(W.var().item() - 1 / 12) < 0.005
    else:
        assert abs(W.mean().item()) < 0.01 and abs(W.var().item() - 1.0) < 0.02
    assert abs(batch.params.std().item() - 0.01) < 0.001
    again = tasks.sample(2000, "train", tasks.generator(0))
    assert torch.equal(again.data["W"], W) and torch.equal(again.params, batch.params)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"dim": 0}, "tasks.dim"),
        ({"distribution": "cauchy"}, "tasks.distribution"),
        ({"init_std": -1.0}, "tasks.init_std"),
    ],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        Quadratic(**bad)


PAIRS = [
    ["tasks=quadratic"],
    ["tasks=quadratic", "solver=unroll"],
    ["tasks=quadratic", "tasks.distribution=uniform"],
    ["algo=lstm_optimizer", "tasks=quadratic", "algo.preprocess=null", "algo.output_scale=1.0"],
    ["tasks=mnist_mlp"],
    ["tasks=mnist_mlp_40units"],
    ["tasks=mnist_mlp_2layers"],
    ["tasks=mnist_mlp_relu"],
    ["tasks=mnist_mlp_200steps", "algo.eval_optimizee_steps=6"],
    ["algo=lstm_optimizer", "tasks=sinusoid"],
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", PAIRS, ids=[" ".join(p) for p in PAIRS])
def test_each_configured_pair_trains_two_iterations_through_the_trainer(tiny_config, tmp_path, overrides):
    if overrides[0].startswith("tasks=mnist"):
        mnist_or_skip()
        overrides = [*overrides, *MNIST_OVERRIDES]
    cfg = tiny_config(*overrides, *SHORT)
    assert cfg.algo._target_.endswith("LSTMOptimizer")
    results = make_trainer(cfg, tmp_path).fit()
    assert results["status"] == "completed" and results["iteration"] == 2
    assert results["metric"] == ("mse" if "tasks=sinusoid" in overrides else "final_loss")
    assert results["test"][results["metric"]]["mean"] == results["test"][results["metric"]]["mean"]  # not NaN
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum('"train/loss"' in row for row in rows) == 2


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["algo=maml", "tasks=quadratic"], "algo=lstm_optimizer"),
        (["algo=imaml", "tasks=quadratic"], "algo=lstm_optimizer"),
        (["tasks=quadratic", "solver=cg"], "solver=first_order"),
    ],
)
def test_mismatched_pairs_are_refused_before_training(tiny_config, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_trainer(tiny_config(*overrides), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()


@pytest.mark.parametrize("task", ["quadratic", "sinusoid"])
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tiny_config, tmp_path, task):
    cfg = tiny_config(
        "algo=lstm_optimizer",
        f"tasks={task}",
        *SHORT,
        "trainer.iterations=6",
        "trainer.checkpoint_every=2",
        "trainer.eval_every=3",
        "seed=5",
    )
    full, full_results = train(cfg, tmp_path / "full")
    _, stopped = train(cfg, tmp_path / "split", stop_after=4)
    assert stopped["status"] == "interrupted" and stopped["iteration"] == 4
    resumed, resumed_results = train(cfg, tmp_path / "split", resume=True)
    assert resumed_results["iteration"] == 6
    for key, value in full.algorithm.state_dict()["meta_parameters"].items():
        assert torch.equal(value, resumed.algorithm.state_dict()["meta_parameters"][key]), key
    assert full_results["test"] == resumed_results["test"]
    assert train_records(tmp_path / "full") == train_records(tmp_path / "split")


@pytest.mark.parametrize("name", list(BASELINES))
def test_a_baseline_on_a_batch_equals_one_optimizer_per_problem(name):
    tasks = Quadratic(dim=4, init_std=1.0)
    batch = tasks.sample(3, "train", tasks.generator(0))
    batched = baseline_trajectory(
        name, 0.01, batch.params, lambda theta, step: tasks.optimizee_loss(theta, batch, step), 5
    )
    for b in range(3):
        theta = batch.params[b].clone().requires_grad_(True)
        optimizer = BASELINES[name]([theta], 0.01)
        losses = []
        for step in range(6):
            loss = ((batch.data["W"][b] @ theta - batch.data["y"][b]) ** 2).sum()
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.testing.assert_close(batched[b], torch.tensor(losses))


def test_each_tuned_baseline_approaches_the_least_squares_solution():
    rates = compose_config(["tasks=quadratic"]).tasks.baseline_lrs
    assert set(rates) == set(BASELINES)
    tasks = Quadratic(dim=10, init_std=1.0)
    batch = tasks.sample(8, "test", tasks.generator(5))
    batch.data["W"] = torch.eye(10) + 0.1 * batch.data["W"]  # well conditioned: a few hundred steps suffice
    solution = torch.linalg.solve(batch.data["W"], batch.data["y"])  # the least-squares solution (loss 0)
    start_distance = (batch.params - solution).norm(dim=1)
    for name, lr in rates.items():
        final = {}

        def loss(theta, step):
            final["theta"] = theta.detach()
            return tasks.optimizee_loss(theta, batch, step)

        curve = baseline_trajectory(name, lr, batch.params, loss, 500)
        assert (curve[:, -1] < 1e-3 * curve[:, 0]).all(), name
        assert ((final["theta"] - solution).norm(dim=1) < 0.05 * start_distance).all(), name


def test_test_problems_are_also_scored_by_every_tuned_baseline(tiny_config, tmp_path):
    from metalab.algorithms import LSTMOptimizer
    from metalab.hypergrad import first_order
    from metalab.models import MLP
    from metalab.training.evaluation import episode_seed

    tasks = Quadratic(dim=5, baseline_lrs={"sgd": 0.01, "adam": 0.1})
    algo = LSTMOptimizer(MLP((5,), 1), tasks, first_order(), torch.optim.Adam, optimizee_steps=6, unroll=3)
    batch = tasks.sample(4, "test", tasks.generator(0))
    assert set(algo.evaluate(batch)) == {"final_loss", "loss"}  # the rule alone, on every split
    compared = algo.compare(batch)
    assert set(compared) == {"sgd", "adam"} and set(compared["adam"]) == {"final_loss", "loss"}
    curve = baseline_trajectory(
        "adam", 0.1, batch.params, lambda theta, step: tasks.optimizee_loss(theta, batch, step), 6
    )
    torch.testing.assert_close(compared["adam"]["final_loss"], curve[:, -1])
    torch.testing.assert_close(compared["adam"]["loss"], curve[:, 1:].mean(dim=1))
    # the trainer's test records them beside the rule's scores; validation scores the rule alone
    cfg = tiny_config("tasks=quadratic", *SHORT)
    results = make_trainer(cfg, tmp_path).fit()
    assert set(results["val"]) == {"final_loss", "loss"}
    assert set(results["test"]) == {
        f"{prefix}{key}" for prefix in ("", "sgd/", "nesterov/", "rmsprop/", "adam/") for key in ("final_loss", "loss")
    }
    tasks = Quadratic(**{k: v for k, v in cfg.tasks.items() if not k.startswith("_")})
    test = tasks.sample(4, "test", tasks.generator(episode_seed(cfg.trainer.eval_seed, "test")))  # one batch of 4
    for name, lr in cfg.tasks.baseline_lrs.items():
        curve = baseline_trajectory(
            name, lr, test.params, lambda theta, step: tasks.optimizee_loss(theta, test, step), 4
        )
        assert results["test"][f"{name}/final_loss"]["mean"] == pytest.approx(curve[:, -1].mean().item(), rel=1e-6)
    with pytest.raises(ConfigError, match="tasks.baseline_lrs.lbfgs"):
        Quadratic(baseline_lrs={"lbfgs": 1.0})


def test_plot_draws_the_learned_rule_and_the_baselines_on_the_trainers_test_problems(tiny_config, tmp_path):
    import importlib.util
    import json

    from metalab.training.evaluation import episode_seed

    spec = importlib.util.spec_from_file_location("plot", REPO / "scripts" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plot = module.main

    cfg = tiny_config("tasks=quadratic", *SHORT)
    make_trainer(cfg, tmp_path).fit()
    plot([str(tmp_path), "--problems", "6"])
    assert (tmp_path / "validation.png").stat().st_size > 0 and (tmp_path / "loss_vs_step.png").stat().st_size > 0
    curves = json.loads((tmp_path / "loss_vs_step.json").read_text())["curves"]
    assert set(curves) == {"learned", "sgd", "nesterov", "rmsprop", "adam"}
    tasks = Quadratic(**{k: v for k, v in cfg.tasks.items() if not k.startswith("_")})
    batch = tasks.sample(6, "test", tasks.generator(episode_seed(cfg.trainer.eval_seed, "test")))
    initial = tasks.optimizee_loss(batch.params, batch, 0)
    for name, curve in curves.items():
        assert len(curve["mean"]) == 4 + 1
        assert curve["mean"][0] == pytest.approx(initial.mean().item(), rel=1e-6), name  # all start from theta_0
