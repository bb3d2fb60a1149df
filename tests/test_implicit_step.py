"""ImplicitStep against a hand-computed ridge hypergradient step, and against a grid search; the one
gradient-apply path (apply_gradients) against clipping by hand, and its refusal of NaN/inf."""

from __future__ import annotations

import pytest
import torch

from metalab.errors import ConfigError
from metalab.hypergrad import ImplicitStep, NonFiniteLossError, apply_gradients, cg, exact, neumann

DTYPE = torch.float64
DIRECT_WEIGHT = 0.3  # val_loss also depends on phi directly, through DIRECT_WEIGHT/2 ||lam||^2


def problem(seed: int = 0, features: int = 5):
    generator = torch.Generator().manual_seed(seed)
    w_true = 0.3 * torch.randn(features, generator=generator, dtype=DTYPE)
    x = torch.randn(25, features, generator=generator, dtype=DTYPE)
    x_val = torch.randn(200, features, generator=generator, dtype=DTYPE)
    noise = lambda n: 2.0 * torch.randn(n, generator=generator, dtype=DTYPE)  # noqa: E731
    return x, x @ w_true + noise(25), x_val, x_val @ w_true + noise(200)


def ridge_solution(lam: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(x.T @ x + torch.diag(lam.expand(x.shape[1])), x.T @ y)


def test_one_step_is_the_hand_computed_hypergradient_step() -> None:
    x, y, x_val, y_val = problem()
    lam = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5], dtype=DTYPE)

    def train_loss(w, phi):
        return 0.5 * ((x @ w["w"] - y) ** 2).sum() + 0.5 * (phi["lam"] * w["w"] ** 2).sum()

    def val_loss(w, phi):
        return 0.5 * ((x_val @ w["w"] - y_val) ** 2).sum() + 0.5 * DIRECT_WEIGHT * (phi["lam"] ** 2).sum()

    # By hand: dL/dlam_i = -w_i [H^{-1} X_val^T (X_val w - y_val)]_i + DIRECT_WEIGHT lam_i.
    w = ridge_solution(lam, x, y)
    hessian = x.T @ x + torch.diag(lam)
    by_hand = -w * torch.linalg.solve(hessian, x_val.T @ (x_val @ w - y_val)) + DIRECT_WEIGHT * lam
    alpha = float(1 / torch.linalg.eigvalsh(hessian).max())

    for solver in [exact(), cg(maxiter=5, tol=0.0), neumann(terms=400, alpha=alpha)]:
        phi = {"lam": lam.clone().requires_grad_()}
        meta = ImplicitStep(phi, torch.optim.SGD(phi.values(), lr=0.01), solver, train_loss, val_loss)
        stats = meta.step({"w": w})
        torch.testing.assert_close(phi["lam"].grad, by_hand, rtol=1e-7, atol=1e-9, msg=solver.name)
        torch.testing.assert_close(phi["lam"].detach(), lam - 0.01 * by_hand, rtol=1e-9, atol=1e-9)
        assert stats["hypergrad_norm"] == pytest.approx(float(by_hand.norm()), rel=1e-7)
        assert stats["val_loss"] == pytest.approx(float(val_loss({"w": w}, {"lam": lam})))


def test_gradient_clipping_bounds_the_step() -> None:
    x, y, x_val, y_val = problem()
    phi = {"log_lam": torch.zeros(5, dtype=DTYPE, requires_grad=True)}

    def train_loss(w, phi):
        return 0.5 * ((x @ w["w"] - y) ** 2).sum() + 0.5 * (phi["log_lam"].exp() * w["w"] ** 2).sum()

    def val_loss(w, phi):
        return 0.5 * ((x_val @ w["w"] - y_val) ** 2).sum()

    w = {"w": ridge_solution(torch.ones(5, dtype=DTYPE), x, y)}
    sgd = torch.optim.SGD(phi.values(), lr=1.0)
    meta = ImplicitStep(phi, sgd, exact(), train_loss, val_loss, grad_clip=1e-3)
    stats = meta.step(w)
    assert stats["hypergrad_norm"] > 1e-2  # so the clip did bind
    assert float(phi["log_lam"].detach().norm()) == pytest.approx(1e-3, rel=1e-5)


def test_learns_a_ridge_penalty_as_good_as_a_grid_search() -> None:
    """AuxiLearn-style alternation: inner parameters refit, then one outer step, 40 times."""
    x, y, x_val, y_val = problem(seed=1, features=20)

    def train_loss(w, phi):
        return 0.5 * ((x @ w["w"] - y) ** 2).mean() + 0.5 * phi["log_lam"].exp() * (w["w"] ** 2).sum()

    def val_loss(w, phi):
        return 0.5 * ((x_val @ w["w"] - y_val) ** 2).mean()

    def fitted(log_lam: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"w": ridge_solution(len(y) * log_lam.exp(), x, y)}  # argmin of train_loss

    def validation_at(log_lam: torch.Tensor) -> float:
        return float(val_loss(fitted(log_lam), None))

    phi = {"log_lam": torch.tensor(-6.0, dtype=DTYPE, requires_grad=True)}
    adam = torch.optim.Adam(phi.values(), lr=0.2, betas=(0.5, 0.999))  # little momentum: no overshoot
    meta = ImplicitStep(phi, adam, cg(maxiter=20), train_loss, val_loss, grad_clip=10.0)
    start = validation_at(phi["log_lam"].detach())
    for _ in range(40):
        meta.step(fitted(phi["log_lam"].detach()))
    learned = validation_at(phi["log_lam"].detach())
    grid_best = min(validation_at(torch.tensor(v, dtype=DTYPE)) for v in torch.linspace(-8, 4, 121).tolist())
    assert learned < 0.9 * start
    assert learned <= grid_best * 1.01


def test_nonpositive_grad_clip_raises_config_error() -> None:
    phi = {"a": torch.zeros(1, requires_grad=True)}

    def loss(w, phi):
        return (w["w"] ** 2).sum()

    with pytest.raises(ConfigError, match="grad_clip"):
        ImplicitStep(phi, torch.optim.SGD(phi.values(), lr=1.0), cg(), loss, loss, grad_clip=0.0)


def test_apply_gradients_clips_values_then_the_norm_and_returns_the_norm_between() -> None:
    params = [torch.zeros(3, dtype=DTYPE, requires_grad=True), torch.zeros(2, dtype=DTYPE, requires_grad=True)]
    grads = [torch.tensor([3.0, -0.5, 0.2], dtype=DTYPE), torch.tensor([-4.0, 1.0], dtype=DTYPE)]
    value_clipped = [g.clamp(-1.0, 1.0) for g in grads]  # by hand: entries to +-1, then the norm to 0.5
    between = torch.cat(value_clipped).norm()
    norm = apply_gradients(params, grads, torch.optim.SGD(params, lr=1.0), max_norm=0.5, max_value=1.0)
    assert norm == pytest.approx(float(between), rel=1e-12)
    for param, clipped in zip(params, value_clipped):
        torch.testing.assert_close(param.detach(), -clipped * 0.5 / (float(between) + 1e-6), rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_hypergradient_is_refused_and_nothing_moves(bad: float) -> None:
    phi = {"lam": torch.ones(2, dtype=DTYPE, requires_grad=True)}

    def train_loss(w, phi):
        return 0.5 * (phi["lam"] * (w["w"] - 1.0) ** 2).sum()

    def val_loss(w, phi):
        return bad * (w["w"] ** 2).sum()

    adam = torch.optim.Adam(phi.values(), lr=0.1)
    step = ImplicitStep(phi, adam, exact(), train_loss, val_loss, grad_clip=1.0)
    with pytest.raises(NonFiniteLossError, match="hypergradient norm"):
        step.step({"w": torch.full((2,), 0.5, dtype=DTYPE)})
    assert torch.equal(phi["lam"].detach(), torch.ones(2, dtype=DTYPE)) and not adam.state
