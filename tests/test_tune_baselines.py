"""scripts/tune_baselines.py: the rate it picks is the grid's lowest mean final loss, and what Hydra or
metalab refuses (a config that does not compose, a bad value, a count below one, a family on which every
rate diverges) comes out as one sentence, not the traceback Hydra wraps it in."""

from __future__ import annotations

import pytest

from metalab.optim.baselines import BASELINES, baseline_trajectory
from metalab.tasks.optimizees.quadratic import Quadratic
from tests.helpers.scripts import assert_refused, run_script, script


def tune(capsys, *args):
    status = script("tune_baselines").main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_each_baseline_gets_the_rate_of_lowest_mean_final_loss(capsys):
    status, out, err = tune(capsys, "tasks=quadratic", "--problems", "3", "--steps", "4", "--seed", "5")
    assert status == 0 and err == ""
    tasks = Quadratic()  # configs/tasks/quadratic.yaml's settings are the class defaults
    batch = tasks.sample(3, "train", tasks.generator(5))
    grid = script("tune_baselines").GRID
    for name in BASELINES:
        losses = {
            lr: baseline_trajectory(name, lr, batch.params, lambda t, s: tasks.optimizee_loss(t, batch, s), 4)[:, -1]
            .mean()
            .item()
            for lr in grid
        }
        best = sorted((loss, lr) for lr, loss in losses.items() if loss == loss and abs(loss) != float("inf"))[0][1]
        assert f"    {name}: {best:g}".ljust(24) + f"# final loss {losses[best]:.4g}" in out.splitlines()


def test_a_family_on_which_every_rate_diverges_gets_no_rate_and_exit_status_1(capsys):
    """Before: `min() arg is an empty sequence`. Starting at |theta| ~ 1e30 the loss is infinite in float32."""
    status, out, err = tune(capsys, "tasks=quadratic", "tasks.init_std=1e30", "--problems", "2", "--steps", "2")
    assert "    # sgd: none; every rate of the grid gave a NaN or infinite final loss" in out.splitlines()
    assert_refused(status, err, 1, "no rate of the grid keeps the final loss of sgd, nesterov, rmsprop, adam finite")


@pytest.mark.parametrize(
    "args, status, words",
    [
        (["tasks=nope"], 2, ["Could not find 'tasks/nope'", "mnist_mlp", "quadratic"]),
        (["tasks=quadratic", "nokey=1"], 2, ["Could not override 'nokey'; To append to your config use +nokey=1"]),
        (["tasks=quadratic", "tasks.="], 2, ["tasks.=", "check the overrides"]),
        (["tasks=quadratic", "tasks.dim=abc"], 2, ["tasks.dim must be an integer >= 1 (got 'abc')"]),
        (["tasks=sinusoid"], 2, ["tasks=sinusoid is not an optimizee family: use tasks=quadratic or tasks=mnist_mlp."]),
        (["tasks=quadratic", "--problems", "0"], 2, ["argument --problems: must be an integer >= 1 (got '0')"]),
        (["tasks=quadratic", "--steps", "-1"], 2, ["argument --steps: must be an integer >= 1 (got '-1')"]),
        (["--problems", "2"], 2, ["the following arguments are required: overrides"]),
    ],
)
def test_what_hydra_or_metalab_refuses_is_one_sentence(capsys, args, status, words):
    assert_refused(*tune(capsys, *args)[::2], status, *words)


def test_as_a_user_types_it_metalabs_sentence_comes_out_of_hydras_wrapper():
    result = run_script("tune_baselines", "tasks=quadratic", "tasks.dim=-3", "--problems", "2", "--steps", "2")
    assert_refused(result.returncode, result.stderr, 2, "tasks.dim must be an integer >= 1 (got -3)")
    assert result.stderr.count("\n") == 1
