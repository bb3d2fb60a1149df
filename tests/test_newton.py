"""Newton-CG (metalab.optim.newton) against closed forms: one step with enough CG iterations solves a
convex quadratic exactly, per problem under vmap; on a non-convex function no step climbs."""

from __future__ import annotations

import pytest
import torch

from metalab.errors import ConfigError
from metalab.optim.newton import newton_cg


def quadratic(params, matrix, vector):
    """1/2 w^T A w - b^T w over the two tensors of ``params`` concatenated."""
    w = torch.cat([params["a"], params["b"].flatten()])
    return 0.5 * w @ matrix @ w - vector @ w


def spd(seed: int, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + 0.5 * torch.eye(n, dtype=torch.float64)


def start(batch: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    return {"a": torch.zeros(*batch, 2, dtype=torch.float64), "b": torch.zeros(*batch, 2, 2, dtype=torch.float64)}


def test_one_step_with_enough_cg_iterations_is_the_exact_minimiser():
    matrix, vector = spd(0), torch.arange(1.0, 7.0, dtype=torch.float64)
    w = newton_cg(quadratic, start(), matrix, vector, steps=1, cg_steps=6)
    expected = torch.linalg.solve(matrix, vector)
    torch.testing.assert_close(torch.cat([w["a"], w["b"].flatten()]), expected, rtol=1e-10, atol=1e-10)


def test_under_vmap_each_problem_gets_its_own_solution():
    matrices = torch.stack([spd(seed) for seed in range(3)])
    vectors = torch.randn(3, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    solve = torch.func.vmap(lambda p, m, v: newton_cg(quadratic, p, m, v, steps=2, cg_steps=6))
    w = solve(start((3,)), matrices, vectors)
    for i in range(3):
        expected = torch.linalg.solve(matrices[i], vectors[i])
        torch.testing.assert_close(torch.cat([w["a"][i], w["b"][i].flatten()]), expected, rtol=1e-9, atol=1e-9)


def rosenbrock(params):
    x, y = params["a"][0], params["a"][1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2 + 0.0 * params["b"].sum()


def test_on_a_non_convex_function_no_step_climbs_and_it_gets_close_to_the_minimum():
    params = {"a": torch.tensor([-1.2, 1.0], dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
    values = []
    newton_cg(
        rosenbrock, params, steps=40, cg_steps=2, line_search=20, on_step=lambda s, p: values.append(rosenbrock(p))
    )
    assert all(later <= earlier for earlier, later in zip(values, values[1:]))
    assert values[-1] < 1e-6 < values[0]  # f = 24.2 at the start, 0 at (1, 1)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="at least 1 CG step"):
        newton_cg(quadratic, start(), spd(0), torch.ones(6, dtype=torch.float64), steps=1, cg_steps=0)
