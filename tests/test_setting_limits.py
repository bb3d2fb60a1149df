"""The new groups' settings at their limits: the learned rule's preprocessing at its largest p, a baseline's
learning rate, and what a diverging Neumann series in AuxiLearn tells the user."""

from __future__ import annotations

import math

import pytest
import torch

from metalab.app.build import make_trainer
from metalab.errors import ConfigError, TrainingDiverged
from metalab.optim.baselines import baseline_trajectory
from metalab.optim.lstm_rule import MAX_PREPROCESS, CoordinatewiseLSTM, preprocess_gradients
from tests.helpers.configs import TINY, compose_config


def test_preprocessing_at_the_largest_p_is_finite_in_values_and_gradients():
    p = MAX_PREPROCESS
    grad = torch.tensor([0.0, 1e-36, -1e-36, 1e-3, 5.0, -1e30], requires_grad=True)
    features = preprocess_gradients(grad, p)
    # by hand: |g| >= e^-80 (1.8e-35) -> (log|g| / 80, sign g); below -> (-1, e^80 g)
    expected = [
        [-1.0, 0.0],
        [-1.0, math.exp(80) * 1e-36],
        [-1.0, -math.exp(80) * 1e-36],
        [math.log(1e-3) / 80, 1.0],
        [math.log(5.0) / 80, 1.0],
        [math.log(1e30) / 80, -1.0],
    ]
    torch.testing.assert_close(features, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    (gradient,) = torch.autograd.grad(features.sum(), grad)  # what solver=unroll differentiates
    assert torch.isfinite(gradient).all(), gradient


@pytest.mark.parametrize("p", [MAX_PREPROCESS * 1.01, 710.0, 1e6, 0.0])
def test_a_rule_with_p_beyond_float32_is_refused_in_one_sentence(p):
    with pytest.raises(ConfigError, match=r"^algo.preprocess must be in \(0, 80\] or null \(got "):
        CoordinatewiseLSTM(preprocess=p)


@pytest.mark.parametrize("lr", [math.inf, math.nan, 0.0])
def test_a_baseline_learning_rate_that_is_not_a_positive_finite_number_is_refused(lr):
    with pytest.raises(ConfigError, match=r"^the learning rate of sgd must be a positive finite number"):
        baseline_trajectory("sgd", lr, torch.zeros(2, 3), lambda theta, step: (theta**2).sum(1), steps=2)


def test_a_diverging_neumann_series_names_algo_hpo_lr(tmp_path):
    """hpo_lr = 1e30 is far beyond 2 / the Hessian's largest eigenvalue: the series' terms grow to inf while L_T
    and L_A stay finite, and the divergence sentence says which setting to lower."""
    overrides = ["tasks=aux_toy", "algo.update_every=1", "algo.hpo_lr=1e30"]
    with pytest.raises(TrainingDiverged) as raised:
        make_trainer(compose_config([*TINY, *overrides]), tmp_path).fit()
    message = str(raised.value)
    assert message.startswith("training diverged at iteration 1 (the hypergradient norm is ")
    assert "the Neumann series converges only while algo.hpo_lr * (the Hessian's largest eigenvalue" in message
    assert "lower algo.hpo_lr=1e+30 or solver.damping=0.0, or use solver=cg" in message


def test_a_loss_that_is_already_infinite_gets_no_neumann_advice(tmp_path):
    overrides = ["tasks=aux_toy", "algo.update_every=1", "algo.primary_optimizer.lr=1e30"]
    with pytest.raises(TrainingDiverged) as raised:
        make_trainer(compose_config([*TINY, *overrides]), tmp_path).fit()
    assert "training diverged at iteration" in str(raised.value) and "Neumann" not in str(raised.value)
