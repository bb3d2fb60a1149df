"""LearnedOptimizer as a torch.optim optimizer: parameters of several dtypes (against one optimizer per
dtype), a group's lr (against the rule applied by hand), and its arguments checked as torch.optim
checks its own (sparse gradients, a NaN rule, a wrong lr or state: one sentence, nothing moved)."""

from __future__ import annotations

import copy

import pytest
import torch

from metalab.errors import ConfigError
from metalab.optim.learned import LearnedOptimizer
from metalab.optim.lstm_rule import CoordinatewiseLSTM


def rule(hidden_size: int = 4) -> CoordinatewiseLSTM:
    torch.manual_seed(0)
    return CoordinatewiseLSTM(hidden_size=hidden_size)


def loss_of(params: list[torch.Tensor]) -> torch.Tensor:
    """A loss with a different gradient for every coordinate, summed in float64."""
    return sum(((p.double() - 0.3 * k) ** 2 * (k + 1)).sum() for k, p in enumerate(params))


def run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = 3) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(params).backward()
        optimizer.step()


@pytest.mark.parametrize("first", [torch.float32, torch.float64])
def test_mixed_dtypes_step_as_one_optimizer_per_dtype(first):
    second = torch.float64 if first == torch.float32 else torch.float32
    torch.manual_seed(1)
    start = [torch.randn(3, 2, dtype=first), torch.randn(5, dtype=second), torch.randn(4, dtype=first)]
    mixed = [torch.nn.Parameter(p.clone()) for p in start]
    run(LearnedOptimizer(mixed, rule=rule()), mixed)
    # oracle: one LearnedOptimizer per dtype, each with its own copy of the same rule
    separate = [torch.nn.Parameter(p.clone()) for p in start]
    optimizers = [
        LearnedOptimizer([p for p in separate if p.dtype == dtype], rule=copy.deepcopy(rule()))
        for dtype in (first, second)
    ]
    for _ in range(3):
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss_of(separate).backward()
        for optimizer in optimizers:
            optimizer.step()
    for got, expected, begin in zip(mixed, separate, start):
        assert got.dtype == begin.dtype and not torch.equal(got, begin)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_groups_lr_scales_the_rules_update_and_lr_schedulers_work():
    torch.manual_seed(2)
    start = [torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    the_rule = rule().double()
    optimizer = LearnedOptimizer([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.25}], rule=the_rule)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    # oracle: the rule applied by hand, parameter by parameter, update scaled by the group's lr of that step
    by_hand = [p.clone().requires_grad_() for p in start]
    states = [the_rule.initial_state(p.numel(), dtype=torch.float64) for p in start]
    for step in range(3):
        optimizer.zero_grad()
        loss_of(params).backward()
        optimizer.step()
        scheduler.step()
        grads = torch.autograd.grad(loss_of(by_hand), by_hand)
        with torch.no_grad():
            for k, lr in enumerate((1.0, 0.25)):
                update, states[k] = the_rule(grads[k], states[k])
                by_hand[k] += lr * 0.5**step * update
    assert [group["lr"] for group in optimizer.param_groups] == [0.125, 0.03125]
    for got, expected in zip(params, by_hand):
        torch.testing.assert_close(got, expected.detach(), rtol=1e-12, atol=1e-14)


def test_sparse_gradients_are_refused_before_anything_moves():
    embedding = torch.nn.Embedding(5, 3, sparse=True)
    dense = torch.nn.Parameter(torch.ones(2))
    optimizer = LearnedOptimizer([dense, *embedding.parameters()], rule=rule())
    (embedding(torch.tensor([1, 3])).sum() + dense.sum()).backward()
    before = embedding.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"^LearnedOptimizer does not support sparse gradients: compute dense"):
        optimizer.step()
    assert torch.equal(dense, torch.ones(2)) and torch.equal(embedding.weight, before) and not optimizer.state


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_is_refused_and_nothing_moves(bad):
    first, second = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    optimizer = LearnedOptimizer([first, second], rule=rule())
    (first.sum() + second.sum()).backward()
    optimizer.step()  # a finite step: the state exists and the parameters moved
    state, values = copy.deepcopy(optimizer.state_dict()), (first.detach().clone(), second.detach().clone())
    second.grad[1] = bad
    with pytest.raises(ConfigError, match=r"^LearnedOptimizer got a NaN or infinite gradient, so no parameter was"):
        optimizer.step()
    assert torch.equal(first, values[0]) and torch.equal(second, values[1])
    hidden = [entry["hidden"] for entry in optimizer.state_dict()["state"].values()]
    assert all(torch.equal(h, s["hidden"]) for h, s in zip(hidden, state["state"].values()))


def nan_rule() -> CoordinatewiseLSTM:
    broken = rule()
    with torch.no_grad():
        broken.lstm.weight_hh_l0[0, 0] = float("nan")
    return broken


#: (a call, the exception, the start of its one sentence)
BAD_CALLS = {
    "a path instead of a rule": (
        lambda p: LearnedOptimizer(p, rule="outputs/runs/x"),
        TypeError,
        "rule must be a CoordinatewiseLSTM, not str: load a trained one with metalab.load_rule",
    ),
    "a rule with a NaN weight": (
        lambda p: LearnedOptimizer(p, rule=nan_rule()),
        ConfigError,
        "the rule's weights lstm.weight_hh_l0 hold NaN or infinite values",
    ),
    "no parameters": (lambda p: LearnedOptimizer([], rule=rule()), ValueError, "optimizer got an empty parameter list"),
    "a negative lr": (
        lambda p: LearnedOptimizer(p, rule=rule(), lr=-1.0),
        ConfigError,
        "lr must be a finite number >= 0",
    ),
    "a NaN lr": (lambda p: LearnedOptimizer(p, rule=rule(), lr=float("nan")), ConfigError, "lr must be a finite"),
    "a string lr": (lambda p: LearnedOptimizer(p, rule=rule(), lr="0.1"), TypeError, "lr must be a number"),
    "a group's infinite lr": (
        lambda p: LearnedOptimizer([{"params": p, "lr": float("inf")}], rule=rule()),
        ConfigError,
        "a param group's lr must be a finite number >= 0",
    ),
    "integer parameters": (
        lambda p: LearnedOptimizer([torch.ones(3, dtype=torch.long)], rule=rule()),
        ConfigError,
        "LearnedOptimizer updates floating-point parameters only (got one of torch.int64)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_a_bad_argument_is_one_sentence(case):
    call, error, start = BAD_CALLS[case]
    with pytest.raises(error) as raised:
        call([torch.nn.Parameter(torch.ones(3))])
    message = str(raised.value)
    assert message.startswith(start) and "\n" not in message, message


def test_a_state_dict_with_nan_or_of_another_rule_is_refused():
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = LearnedOptimizer(params, rule=rule())
    run(optimizer, params, steps=1)
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][0]["cell"][0, 1, 2] = float("inf")
    with pytest.raises(ConfigError, match=r"^the optimizer state state.0.cell holds NaN or infinite values"):
        optimizer.load_state_dict(saved)
    other = LearnedOptimizer([torch.nn.Parameter(torch.ones(3))], rule=rule(hidden_size=7))
    with pytest.raises(
        ConfigError, match=r"hidden states of \(layers, units\) \[\(2, 4\)\], but this rule has \(2, 7\)"
    ):
        other.load_state_dict(optimizer.state_dict())
    fresh = LearnedOptimizer([torch.nn.Parameter(torch.ones(3))], rule=rule())
    fresh.load_state_dict(optimizer.state_dict())  # the oracle of the refusals: the same rule's state loads
    assert torch.equal(fresh.state_dict()["state"][0]["hidden"], optimizer.state_dict()["state"][0]["hidden"])
