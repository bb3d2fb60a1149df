"""Implicit hypergradients against closed forms (ridge regression, a linear system) and central
finite differences (ridge, lasso via its proximal-gradient fixed point, box-constrained least
squares via its projected-gradient fixed point)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from metalab.hypergrad import (
    LinearSolver,
    cg,
    custom_root,
    exact,
    gmres,
    hvp,
    neumann,
    projected_gradient_fixed_point,
    proximal_gradient_fixed_point,
    root_vjp,
    stationarity,
)

DTYPE = torch.float64
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- ridge regression
# inner: w*(lam) = argmin_w 1/2 ||X w - y||^2 + 1/2 sum_i lam_i w_i^2 = (X^T X + diag(lam))^{-1} X^T y
# outer: L(lam) = 1/2 ||X_val w*(lam) - y_val||^2
# closed form: dL/dlam_i = -w*_i [(X^T X + diag(lam))^{-1} X_val^T (X_val w* - y_val)]_i


def ridge_data(generator: torch.Generator, batch: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    x = torch.randn(*batch, 30, 5, generator=generator, dtype=DTYPE)
    y = torch.randn(*batch, 30, generator=generator, dtype=DTYPE)
    x_val = torch.randn(*batch, 20, 5, generator=generator, dtype=DTYPE)
    y_val = torch.randn(*batch, 20, generator=generator, dtype=DTYPE)
    return x, y, x_val, y_val


def ridge_loss(w, phi, x, y):
    return 0.5 * ((x @ w["w"] - y) ** 2).sum() + 0.5 * (phi["lam"] * w["w"] ** 2).sum()


def ridge_solution(lam: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    penalty = torch.diag(lam.expand(x.shape[-1]))  # lam: a scalar, or one per feature
    return torch.linalg.solve(x.mT @ x + penalty, x.mT @ y)


def validation_loss(w: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((x_val @ w - y_val) ** 2).sum()


def ridge_closed_form(lam, x, y, x_val, y_val) -> torch.Tensor:
    w = ridge_solution(lam, x, y)
    hessian = x.mT @ x + torch.diag(lam.expand(x.shape[-1]))
    per_feature = -w * torch.linalg.solve(hessian, x_val.mT @ (x_val @ w - y_val))
    return per_feature.sum() if lam.dim() == 0 else per_feature


def central_difference(
    function: Callable[[torch.Tensor], torch.Tensor], at: torch.Tensor, step: float = 1e-6
) -> torch.Tensor:
    """d function / d at, one coordinate at a time."""
    flat = at.reshape(-1)
    gradient = torch.empty_like(flat)
    for i in range(flat.numel()):
        shift = torch.zeros_like(flat)
        shift[i] = step
        plus, minus = (function((flat + s).reshape(at.shape)) for s in (shift, -shift))
        gradient[i] = (plus - minus) / (2 * step)
    return gradient.reshape(at.shape)


def ridge_hypergradient(lam: torch.Tensor, solver: LinearSolver, x, y, x_val, y_val) -> torch.Tensor:
    w = {"w": ridge_solution(lam, x, y)}
    cotangent = {"w": x_val.mT @ (x_val @ w["w"] - y_val)}
    return root_vjp(stationarity(ridge_loss), w, {"lam": lam}, cotangent, solver, x, y)["lam"]


def solvers_for_ridge(x: torch.Tensor, lam: torch.Tensor) -> list[LinearSolver]:
    eigenvalues = torch.linalg.eigvalsh(x.mT @ x + torch.diag(lam.expand(x.shape[-1])))
    alpha = float(1 / eigenvalues.max())
    terms = int(torch.tensor(1e-10).log() / torch.log(1 - eigenvalues.min() * alpha)) + 1
    return [cg(maxiter=10, tol=0.0), gmres(maxiter=10), exact(), neumann(terms=terms, alpha=alpha)]


@pytest.mark.parametrize("per_feature", [False, True], ids=["scalar_lambda", "per_feature_lambda"])
def test_root_vjp_matches_ridge_closed_form_and_finite_differences(per_feature: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    x, y, x_val, y_val = ridge_data(generator)
    lam = torch.rand(5 if per_feature else (), generator=generator, dtype=DTYPE) + 0.5
    closed_form = ridge_closed_form(lam, x, y, x_val, y_val)
    differences = central_difference(lambda l: validation_loss(ridge_solution(l, x, y), x_val, y_val), lam)
    torch.testing.assert_close(closed_form, differences, rtol=1e-6, atol=1e-8)
    for solver in solvers_for_ridge(x, lam):
        hypergradient = ridge_hypergradient(lam, solver, x, y, x_val, y_val)
        torch.testing.assert_close(hypergradient, closed_form, rtol=1e-6, atol=1e-9, msg=solver.name)


def test_root_vjp_uses_the_transpose_for_nonsymmetric_conditions() -> None:
    """F(w, phi) = (M + diag(phi)) w - c with M non-symmetric: w* = (M + diag(phi))^{-1} c and
    dL/dphi_i = -w*_i [(M + diag(phi))^{-T} dL/dw]_i for L = 1/2 ||w* - t||^2."""
    generator = torch.Generator().manual_seed(1)
    m = 3 * torch.eye(6, dtype=DTYPE) + torch.randn(6, 6, generator=generator, dtype=DTYPE)
    c, target = torch.randn(2, 6, generator=generator, dtype=DTYPE)
    phi = {"diag": torch.rand(6, generator=generator, dtype=DTYPE)}

    def condition(w, phi):
        return {"w": (m + torch.diag(phi["diag"])) @ w["w"] - c}

    a = m + torch.diag(phi["diag"])
    w = torch.linalg.solve(a, c)
    closed_form = -w * torch.linalg.solve(a.mT, w - target)
    for solver in [gmres(maxiter=6), exact()]:
        result = root_vjp(condition, {"w": w}, phi, {"w": w - target}, solver)["diag"]
        torch.testing.assert_close(result, closed_form, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shared_phi", [True, False], ids=["phi_shared", "phi_per_task"])
def test_vmapped_root_vjp_equals_a_loop(shared_phi: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    tasks = 4
    x, y, x_val, y_val = ridge_data(generator, (tasks,))
    lam = torch.rand(5 if shared_phi else (tasks, 5), generator=generator, dtype=DTYPE) + 0.5
    batched = torch.func.vmap(ridge_hypergradient, in_dims=(None if shared_phi else 0, None, 0, 0, 0, 0))(
        lam, cg(maxiter=10, tol=1e-12), x, y, x_val, y_val
    )
    for task in range(tasks):
        task_lam = lam if shared_phi else lam[task]
        alone = ridge_closed_form(task_lam, x[task], y[task], x_val[task], y_val[task])
        torch.testing.assert_close(batched[task], alone, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------- custom_root


@custom_root(inner_loss=ridge_loss, solve=cg(maxiter=10, tol=0.0))
def ridge_by_gradient_descent(init, phi, x, y):
    """An iterative inner solver written with torch.autograd (forward runs with grad enabled)."""
    w = init["w"].clone().requires_grad_()
    step = 1 / float(torch.linalg.eigvalsh(x.T @ x).max() + phi["lam"].max())
    for _ in range(400):
        (gradient,) = torch.autograd.grad(ridge_loss({"w": w}, phi, x, y), w)
        w = (w - step * gradient).detach().requires_grad_()
    return {"w": w.detach()}


@custom_root(stationarity(ridge_loss), solve=gmres(maxiter=10))
def ridge_in_closed_form(init, phi, x, y):
    return {"w": ridge_solution(phi["lam"], x, y)}


@pytest.mark.parametrize(
    "inner_solver", [ridge_by_gradient_descent, ridge_in_closed_form], ids=["gradient_descent", "closed_form"]
)
def test_custom_root_backward_gives_the_closed_form(inner_solver) -> None:
    generator = torch.Generator().manual_seed(3)
    x, y, x_val, y_val = ridge_data(generator)
    lam = (torch.rand(5, generator=generator, dtype=DTYPE) + 0.5).requires_grad_()
    w = inner_solver({"w": torch.zeros(5, dtype=DTYPE)}, {"lam": lam}, x, y)
    torch.testing.assert_close(w["w"], ridge_solution(lam.detach(), x, y), rtol=1e-9, atol=1e-10)
    validation_loss(w["w"], x_val, y_val).backward()
    expected = ridge_closed_form(lam.detach(), x, y, x_val, y_val)
    torch.testing.assert_close(lam.grad, expected, rtol=1e-6, atol=1e-9)


def test_custom_root_under_vmap_with_shared_phi() -> None:
    """vmap over tasks, phi shared: autograd sums the per-task hypergradients."""
    generator = torch.Generator().manual_seed(4)
    tasks = 3
    x, y, x_val, y_val = ridge_data(generator, (tasks,))
    lam = (torch.rand(5, generator=generator, dtype=DTYPE) + 0.5).requires_grad_()

    def task_loss(phi, x, y, x_val, y_val):
        w = ridge_in_closed_form({"w": torch.zeros(5, dtype=DTYPE)}, phi, x, y)
        return validation_loss(w["w"], x_val, y_val)

    losses = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))({"lam": lam}, x, y, x_val, y_val)
    losses.sum().backward()
    expected = sum(ridge_closed_form(lam.detach(), x[t], y[t], x_val[t], y_val[t]) for t in range(tasks))
    torch.testing.assert_close(lam.grad, expected, rtol=1e-8, atol=1e-10)


def test_custom_root_needs_a_solver_and_one_condition() -> None:
    with pytest.raises(TypeError):
        custom_root(stationarity(ridge_loss))
    with pytest.raises(TypeError):
        custom_root(stationarity(ridge_loss), cg(), inner_loss=ridge_loss)


def test_hvp_matches_the_dense_hessian() -> None:
    generator = torch.Generator().manual_seed(5)
    flat_params, flat_v = torch.randn(2, 7, generator=generator, dtype=DTYPE)
    as_params = lambda z: {"a": z[:3], "b": z[3:].reshape(2, 2)}  # noqa: E731

    def f(p, scale):
        flat = torch.cat([p["a"], p["b"].reshape(-1)])
        return scale * torch.sin(flat).sum() * (flat**2).sum()

    hessian = torch.autograd.functional.hessian(lambda z: f(as_params(z), 2.0), flat_params)
    result = hvp(f, as_params(flat_params), as_params(flat_v), 2.0)
    torch.testing.assert_close(torch.cat([result["a"], result["b"].reshape(-1)]), hessian @ flat_v)


def test_hvp_of_a_network_under_mse_loss_matches_the_dense_hessian() -> None:
    """F.mse_loss, whose forward-mode derivative of its backward fails in torch 2.14 ("ZeroTensors are
    immutable"): hvp goes reverse-over-reverse."""
    generator = torch.Generator().manual_seed(6)
    x, y = torch.randn(2, 5, 1, generator=generator, dtype=DTYPE)
    model = torch.nn.Sequential(torch.nn.Linear(1, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    names, shapes = list(params), [v.shape for v in params.values()]
    unflat = lambda z: dict(zip(names, (c.view(s) for c, s in zip(z.split([s.numel() for s in shapes]), shapes))))  # noqa: E731
    loss = lambda p: torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (x,)), y)  # noqa: E731
    flat = torch.cat([v.flatten() for v in params.values()])
    v = torch.randn(flat.numel(), generator=generator, dtype=DTYPE)
    hessian = torch.autograd.functional.hessian(lambda z: loss(unflat(z)), flat)
    result = hvp(loss, params, unflat(v))
    torch.testing.assert_close(torch.cat([r.flatten() for r in result.values()]), hessian @ v)


# ----------------------------------------------------------------------------- non-smooth conditions


def least_squares(w, phi, x, y):
    return 0.5 * ((x @ w["w"] - y) ** 2).mean()


def soft_threshold(v, phi, step):
    """prox of step * lam ||.||_1."""
    return {"w": torch.sign(v["w"]) * torch.relu(v["w"].abs() - step * phi["lam"])}


def test_lasso_hypergradient_through_the_proximal_gradient_fixed_point() -> None:
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(40, 8, generator=generator, dtype=DTYPE)
    w_true = torch.tensor([1.0, -2.0, 0.5, 0, 0, 0, 0, 0], dtype=DTYPE)
    y = x @ w_true + 0.5 * torch.randn(40, generator=generator, dtype=DTYPE)
    x_val = torch.randn(30, 8, generator=generator, dtype=DTYPE)
    y_val = x_val @ w_true
    step = 1 / float(torch.linalg.eigvalsh(x.T @ x / len(y)).max())

    def lasso(lam: torch.Tensor) -> torch.Tensor:  # ISTA to machine precision
        w = {"w": torch.zeros(8, dtype=DTYPE)}
        for _ in range(300):
            gradient = x.T @ (x @ w["w"] - y) / len(y)  # by hand: torch.func.grad is slow in a loop
            w = soft_threshold({"w": w["w"] - step * gradient}, {"lam": lam}, step)
        return w["w"]

    lam = torch.tensor(0.1, dtype=DTYPE)
    w = lasso(lam)
    assert 0 < int((w == 0).sum()) < 8  # both active and inactive coordinates
    condition = proximal_gradient_fixed_point(least_squares, soft_threshold, step)
    assert float(condition({"w": w}, {"lam": lam}, x, y)["w"].abs().max()) < 1e-12  # w is a root
    cotangent = {"w": x_val.T @ (x_val @ w - y_val)}
    differences = central_difference(lambda l: validation_loss(lasso(l), x_val, y_val), lam, step=1e-5)
    for solver in [gmres(maxiter=8), exact()]:
        hypergradient = root_vjp(condition, {"w": w}, {"lam": lam}, cotangent, solver, x, y)["lam"]
        torch.testing.assert_close(hypergradient, differences, rtol=1e-6, atol=1e-8)


def test_box_constrained_hypergradient_through_the_projected_gradient_fixed_point() -> None:
    """min_{0 <= w <= upper} 1/2 ||X w - y||^2 / n + lam/2 ||w||^2, phi = (lam, upper)."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(40, 6, generator=generator, dtype=DTYPE)
    w_true = torch.tensor([2.0, 1.0, 0.3, -1.0, -0.5, 0.0], dtype=DTYPE)
    y = x @ w_true + 0.3 * torch.randn(40, generator=generator, dtype=DTYPE)
    x_val, y_val = x[:20] + 0.1, y[:20]

    def loss(w, phi, x, y):
        return least_squares(w, phi, x, y) + 0.5 * phi["lam"] * (w["w"] ** 2).sum()

    def box(v, phi):
        return {"w": torch.minimum(torch.relu(v["w"]), phi["upper"])}

    step = 1 / float(torch.linalg.eigvalsh(x.T @ x / len(y)).max() + 1)

    def solve_box(phi):  # projected gradient to machine precision
        w = {"w": torch.zeros(6, dtype=DTYPE)}
        for _ in range(300):
            gradient = x.T @ (x @ w["w"] - y) / len(y) + phi["lam"] * w["w"]
            w = box({"w": w["w"] - step * gradient}, phi)
        return w["w"]

    phi = {"lam": torch.tensor(0.05, dtype=DTYPE), "upper": torch.full((6,), 1.2, dtype=DTYPE)}
    w = solve_box(phi)
    assert bool((w == 0).any() and (w == phi["upper"]).any() and ((w > 0) & (w < phi["upper"])).any())
    condition = projected_gradient_fixed_point(loss, box, step)
    assert float(condition({"w": w}, phi, x, y)["w"].abs().max()) < 1e-12  # w is a root
    cotangent = {"w": x_val.T @ (x_val @ w - y_val)}

    def outer(lam, upper):
        return validation_loss(solve_box({"lam": lam, "upper": upper}), x_val, y_val)

    differences = {
        "lam": central_difference(lambda lam: outer(lam, phi["upper"]), phi["lam"], step=1e-5),
        "upper": central_difference(lambda upper: outer(phi["lam"], upper), phi["upper"], step=1e-5),
    }
    for solver in [gmres(maxiter=6), exact()]:
        hypergradient = root_vjp(condition, {"w": w}, phi, cotangent, solver, x, y)
        for key in phi:
            torch.testing.assert_close(hypergradient[key], differences[key], rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- the documented example


def test_readme_ridge_example() -> None:
    """Runs the worked example of README.md verbatim, so that the docs never lie."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- example: ridge -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, "README.md lost its <!-- example: ridge --> code block"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)  # noqa: S102
    x_val, y_val, phi, fit, x, y = (namespace[k] for k in ("X_val", "y_val", "phi", "fit", "X", "y"))
    with torch.no_grad():
        start = {"log_lam": torch.full((10,), -2.0)}
        before = validation_loss(fit({"w": torch.zeros(10)}, start, x, y)["w"], x_val, y_val)
        after = validation_loss(fit({"w": torch.zeros(10)}, phi, x, y)["w"], x_val, y_val)
    assert after < 0.8 * before
    penalties = phi["log_lam"].detach()
    assert penalties[3:].min() > penalties[:3].max()  # the 7 useless features are penalised most
