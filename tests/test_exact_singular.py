"""solver=exact on a singular system: the minimum-norm least-squares solution (hand-computed), alone, under vmap
and inside AuxiLearn's hypergradient, where a parameter the losses do not reach makes the Hessian singular."""

from __future__ import annotations

import dataclasses

import torch

from metalab.app.build import make_trainer
from metalab.hypergrad import cg, exact, solve_exact
from tests.helpers.auxilearn import PHI, at_inner_solution, toy_algorithm
from tests.helpers.configs import TINY, compose_config

DTYPE = torch.float64


def matvec_of(matrix: torch.Tensor):
    return lambda v: {"x": matrix @ v["x"]}


def solve(matrix: list[list[float]], b: list[float], damping: float = 0.0) -> list[float]:
    matrix_, b_ = torch.tensor(matrix, dtype=DTYPE), torch.tensor(b, dtype=DTYPE)
    return solve_exact(matvec_of(matrix_), {"x": b_}, damping=damping)["x"].tolist()


def close(x: list[float], expected: list[float]) -> bool:
    return torch.allclose(torch.tensor(x, dtype=DTYPE), torch.tensor(expected, dtype=DTYPE), atol=1e-12)


def test_a_zero_row_gets_the_least_norm_solution_and_no_error():
    # diag(2, 0, 3) x = (4, 0, 6): x_2 is free; the least-norm solution sets it to 0
    assert close(solve([[2, 0, 0], [0, 0, 0], [0, 0, 3]], [4, 0, 6]), [2, 0, 2])
    # inconsistent (4, 5, 6): the least-squares residual leaves the 5 where no x reaches it
    assert close(solve([[2, 0, 0], [0, 0, 0], [0, 0, 3]], [4, 5, 6]), [2, 0, 2])


def test_a_singular_nonsymmetric_system_and_damping_that_makes_it_regular():
    # [[1, 1], [1, 1]] x = (2, 0): s = x1 + x2 minimises (s - 2)^2 + s^2 at s = 1, least norm x = (1/2, 1/2)
    assert close(solve([[1, 1], [1, 1]], [2, 0]), [0.5, 0.5])
    # damping 1: [[2, 1], [1, 2]] x = (2, 0) -> x = (4/3, -2/3), the ordinary solution
    assert close(solve([[1, 1], [1, 1]], [2, 0], damping=1.0), [4 / 3, -2 / 3])


def test_a_nonsingular_system_is_solved_as_before():
    # [[2, 1], [1, 3]] x = (1, 2) -> x = (1/5, 3/5)
    assert close(solve([[2, 1], [1, 3]], [1, 2]), [0.2, 0.6])


def test_under_vmap_a_singular_system_beside_a_regular_one():
    matrices = torch.tensor([[[2, 0], [0, 0]], [[2, 1], [1, 3]]], dtype=DTYPE)
    b = torch.tensor([[4, 5], [1, 2]], dtype=DTYPE)
    x = torch.func.vmap(lambda m, rhs: exact()(matvec_of(m), {"x": rhs})["x"])(matrices, b)
    assert close(x[0].tolist(), [2, 0]) and close(x[1].tolist(), [0.2, 0.6])


def test_auxilearn_hypergradient_with_an_input_no_example_has():
    """Input 0 is zero in every example: its weight gets a zero row and column of the Hessian of L_T, which
    LU cannot factor. The least-norm solution is CG's (from 0, on this consistent positive semi-definite
    system), so the exact hypergradient equals CG's, and it is finite."""
    hypergradients = []
    for solver in (exact(), cg(maxiter=20, tol=0.0)):
        algorithm = toy_algorithm(solver)
        batch = at_inner_solution(algorithm, PHI)
        x, x_aux = batch.x.clone(), batch.x_aux.clone()
        x[..., 0], x_aux[..., 0] = 0.0, 0.0
        hypergradients.append(algorithm.hypergradient(dataclasses.replace(batch, x=x, x_aux=x_aux))[0]["weight"])
    assert torch.isfinite(hypergradients[0]).all() and hypergradients[0].abs().max() > 1e-6
    assert torch.allclose(hypergradients[0], hypergradients[1], rtol=1e-8, atol=1e-12), hypergradients


def test_a_run_whose_hessian_is_zero_trains_with_solver_exact(tmp_path):
    """No main label and a zero linear combiner: L_T = 0, so its Hessian is the zero matrix; the hypergradient is
    then 0 (every w minimises L_T) and the run completes with the combiner where it started."""
    overrides = ["tasks=aux_toy", "solver=exact", "algo.init_weight=0", "tasks.main_labels=0", "algo.update_every=1"]
    trainer = make_trainer(compose_config([*TINY, *overrides]), tmp_path)
    results = trainer.fit()
    assert results["status"] == "completed" and results["iteration"] == 2
    assert trainer.algorithm.combiner.weight.tolist() == [0.0, 0.0]
