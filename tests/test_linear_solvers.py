"""Linear solvers over Params against a dense ``torch.linalg.solve`` oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metalab.errors import ConfigError
from metalab.hypergrad import (
    LinearSolver,
    cg,
    exact,
    gmres,
    hvp,
    neumann,
    solve_cg,
    solve_exact,
    tree_ravel,
)

DTYPE = torch.float64
SIZE = 10  # a [3, 2] tensor and a [4] tensor
CONFIGS = Path(__file__).resolve().parents[1] / "src" / "metalab" / "configs" / "solver"


def random_rhs(generator: torch.Generator, batch: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    return {
        "weight": torch.randn(*batch, 3, 2, generator=generator, dtype=DTYPE),
        "bias": torch.randn(*batch, 4, generator=generator, dtype=DTYPE),
    }


def spd_matrix(generator: torch.Generator, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """Eigenvalues in about [1, 4]."""
    m = torch.randn(*batch, SIZE, SIZE, generator=generator, dtype=DTYPE)
    return m @ m.mT / (2 * SIZE) + torch.eye(SIZE, dtype=DTYPE)


def nonsymmetric_matrix(generator: torch.Generator, batch: tuple[int, ...] = ()) -> torch.Tensor:
    m = torch.randn(*batch, SIZE, SIZE, generator=generator, dtype=DTYPE)
    return 2 * torch.eye(SIZE, dtype=DTYPE) + m / SIZE**0.5


def matvec_of(matrix: torch.Tensor):
    """The dense matrix as a matvec on Params (what an HVP is to the solver)."""

    def matvec(v):
        flat, unravel = tree_ravel(v)
        return unravel(matrix @ flat)

    return matvec


def dense_solve(matrix: torch.Tensor, b, damping: float = 0.0) -> torch.Tensor:
    flat, _ = tree_ravel(b)
    return torch.linalg.solve(matrix + damping * torch.eye(SIZE, dtype=DTYPE), flat)


def relative_error(x, reference: torch.Tensor) -> float:
    return float((tree_ravel(x)[0] - reference).norm() / reference.norm())


def neumann_for(matrix: torch.Tensor, damping: float = 0.0) -> LinearSolver:
    """alpha = 1 / lambda_max: the series contracts by 1 - lambda_min / lambda_max per term."""
    eigenvalues = torch.linalg.eigvalsh(matrix) + damping
    rate = float(1 - eigenvalues.min() / eigenvalues.max())
    terms = int(torch.tensor(1e-9).log() / torch.tensor(rate).log()) + 1
    return neumann(terms=terms, alpha=float(1 / eigenvalues.max()), damping=damping)


SPD_SOLVERS = {
    "cg": lambda matrix, damping: cg(maxiter=2 * SIZE, tol=0.0, damping=damping),
    "neumann": neumann_for,
    "exact": lambda matrix, damping: exact(damping=damping),
}
GENERAL_SOLVERS = {
    "gmres": lambda matrix, damping: gmres(maxiter=SIZE, restart=SIZE, tol=0.0, damping=damping),
    "gmres_restarted": lambda matrix, damping: gmres(maxiter=80, restart=4, tol=0.0, damping=damping),
    "exact": lambda matrix, damping: exact(damping=damping),
}


@pytest.mark.parametrize("damping", [0.0, 0.7])
@pytest.mark.parametrize("name", list(SPD_SOLVERS))
def test_spd_solvers_match_dense_solve(name: str, damping: float) -> None:
    generator = torch.Generator().manual_seed(0)
    matrix, b = spd_matrix(generator), random_rhs(generator)
    x = SPD_SOLVERS[name](matrix, damping)(matvec_of(matrix), b)
    assert set(x) == set(b) and all(x[key].shape == b[key].shape for key in b)
    assert relative_error(x, dense_solve(matrix, b, damping)) < 1e-6


@pytest.mark.parametrize("damping", [0.0, 0.7])
@pytest.mark.parametrize("name", list(GENERAL_SOLVERS))
def test_nonsymmetric_solvers_match_dense_solve(name: str, damping: float) -> None:
    generator = torch.Generator().manual_seed(1)
    matrix, b = nonsymmetric_matrix(generator), random_rhs(generator)
    assert not torch.allclose(matrix, matrix.mT)
    x = GENERAL_SOLVERS[name](matrix, damping)(matvec_of(matrix), b)
    assert relative_error(x, dense_solve(matrix, b, damping)) < 1e-6


def test_cg_on_nonsymmetric_system_is_not_the_solution() -> None:
    """Guards the test above: the non-symmetric case does separate gmres from cg."""
    generator = torch.Generator().manual_seed(1)
    matrix, b = nonsymmetric_matrix(generator), random_rhs(generator)
    x = cg(maxiter=SIZE, tol=0.0)(matvec_of(matrix), b)
    assert relative_error(x, dense_solve(matrix, b)) > 1e-3


def test_cg_stops_where_a_direction_meets_non_positive_curvature() -> None:
    """On A = diag(1, -4), b = (1, 0.1): the first direction b has curvature b^T A b = 0.96 > 0, so
    CG takes the step |b|^2 / b^T A b along it; the next direction has negative curvature, so CG
    stops there (closed form), where untruncated CG would go on to the indefinite system's
    solution (1, -0.025). Along b alone with b^T A b <= 0 it returns b."""
    matrix = torch.diag(torch.tensor([1.0, -4.0], dtype=DTYPE))
    matvec = lambda v: {"x": matrix @ v["x"]}  # noqa: E731
    b = {"x": torch.tensor([1.0, 0.1], dtype=DTYPE)}
    expected = b["x"] * (b["x"] @ b["x"]) / (b["x"] @ matrix @ b["x"])
    torch.testing.assert_close(solve_cg(matvec, b, maxiter=5, tol=0.0)["x"], expected)
    flat = {"x": torch.tensor([1.0, 0.5], dtype=DTYPE)}  # curvature 1 - 4 * 0.25 = 0
    torch.testing.assert_close(solve_cg(matvec, flat, maxiter=5, tol=0.0)["x"], flat["x"])
    batched = torch.func.vmap(lambda x: solve_cg(matvec, {"x": x}, maxiter=5, tol=0.0)["x"])
    torch.testing.assert_close(batched(torch.stack([b["x"], flat["x"]])), torch.stack([expected, flat["x"]]))


BATCHED = [
    cg(maxiter=6, tol=1e-2),  # loose tolerance: systems freeze at different iterations
    cg(maxiter=2 * SIZE, tol=0.0, damping=0.3),
    neumann(terms=6, alpha=0.3, damping=0.1),
    gmres(maxiter=7, restart=3, tol=1e-2),
    gmres(maxiter=SIZE, restart=SIZE, tol=0.0),
    exact(damping=0.2),
]


@pytest.mark.parametrize("solver", BATCHED, ids=lambda s: f"{s.name}-{s.options}")
def test_vmap_over_systems_equals_each_system_alone(solver: LinearSolver) -> None:
    generator = torch.Generator().manual_seed(2)
    batch = 5
    matrices = spd_matrix(generator, (batch,))
    matrices[0] = torch.eye(SIZE, dtype=DTYPE)  # converges at once: exercises the frozen path
    b = random_rhs(generator, (batch,))
    batched = torch.func.vmap(lambda m, rhs: solver(matvec_of(m), rhs))(matrices, b)
    for i in range(batch):
        alone = solver(matvec_of(matrices[i]), {key: value[i] for key, value in b.items()})
        for key in b:
            torch.testing.assert_close(batched[key][i], alone[key], rtol=1e-10, atol=1e-12)


def test_tolerance_freezes_the_iterate() -> None:
    """Once ||r|| <= tol ||b||, more iterations change nothing (the masked update)."""
    generator = torch.Generator().manual_seed(3)
    matrix, b = spd_matrix(generator), random_rhs(generator)
    matvec = matvec_of(matrix)
    few, many = cg(maxiter=4, tol=0.5)(matvec, b), cg(maxiter=40, tol=0.5)(matvec, b)
    for key in b:
        torch.testing.assert_close(few[key], many[key], rtol=0, atol=0)
    assert relative_error(few, dense_solve(matrix, b)) < 0.5


@pytest.mark.parametrize("solver", [cg(), neumann(), gmres(), exact()], ids=lambda s: s.name)
def test_zero_right_hand_side_gives_zero_without_nan(solver: LinearSolver) -> None:
    generator = torch.Generator().manual_seed(4)
    matrix = spd_matrix(generator)
    b = {key: torch.zeros_like(value) for key, value in random_rhs(generator).items()}
    x = solver(matvec_of(matrix), b)
    assert all(torch.equal(x[key], b[key]) for key in b)


@pytest.mark.parametrize("solver", [cg(maxiter=3, tol=0.0), gmres(maxiter=3, tol=0.0)], ids=lambda s: s.name)
def test_warm_start_at_the_solution_stays_there(solver: LinearSolver) -> None:
    generator = torch.Generator().manual_seed(5)
    matrix, b = spd_matrix(generator), random_rhs(generator)
    _, unravel = tree_ravel(b)
    solution = unravel(dense_solve(matrix, b))
    x = solver(matvec_of(matrix), b, init=solution)
    assert relative_error(x, dense_solve(matrix, b)) < 1e-12


def test_hessian_vector_product_system_in_float32() -> None:
    """matvec = hvp of a quadratic 1/2 w^T A w: cg in float32 reaches float32 accuracy."""
    generator = torch.Generator().manual_seed(6)
    matrix = spd_matrix(generator).float()
    b = {key: value.float() for key, value in random_rhs(generator).items()}

    def quadratic(w):
        flat, _ = tree_ravel(w)
        return 0.5 * flat @ matrix @ flat

    w0 = {key: torch.zeros_like(value) for key, value in b.items()}
    x = cg(maxiter=2 * SIZE, tol=1e-6)(lambda v: hvp(quadratic, w0, v), b)
    assert x["weight"].dtype == torch.float32
    reference = torch.linalg.solve(matrix.double(), tree_ravel(b)[0].double())
    assert float((tree_ravel(x)[0].double() - reference).norm() / reference.norm()) < 1e-4


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "solver", [cg(maxiter=20), neumann(terms=40, alpha=0.3), gmres(maxiter=10), exact()], ids=lambda s: s.name
)
def test_vmapped_solvers_in_float32_on_every_device(solver: LinearSolver, device: str) -> None:
    generator = torch.Generator().manual_seed(8)
    matrices = spd_matrix(generator, (3,))
    b = random_rhs(generator, (3,))
    x = torch.func.vmap(lambda m, rhs: solver(matvec_of(m), rhs))(
        matrices.float().to(device), {key: value.float().to(device) for key, value in b.items()}
    )
    assert x["weight"].device.type == device and x["weight"].dtype == torch.float32
    flatten = lambda tree: torch.cat([tree["weight"].reshape(3, -1), tree["bias"]], dim=1)  # noqa: E731
    reference = torch.linalg.solve(matrices, flatten(b))
    assert float((flatten(x).double().cpu() - reference).norm() / reference.norm()) < 1e-4


def test_functions_and_factories_agree() -> None:
    generator = torch.Generator().manual_seed(7)
    matrix, b = spd_matrix(generator), random_rhs(generator)
    by_function = solve_cg(matvec_of(matrix), b, maxiter=3, damping=0.5)
    by_factory = cg(maxiter=3, damping=0.5)(matvec_of(matrix), b)
    assert all(torch.equal(by_function[key], by_factory[key]) for key in b)
    torch.testing.assert_close(tree_ravel(solve_exact(matvec_of(matrix), b))[0], dense_solve(matrix, b))


@pytest.mark.parametrize(
    "make",
    [
        lambda: cg(maxiter=0),
        lambda: cg(maxiter=2.5),
        lambda: cg(tol=-1.0),
        lambda: cg(damping=-0.1),
        lambda: neumann(terms=-1),
        lambda: neumann(alpha=0.0),
        lambda: neumann(damping=float("nan")),
        lambda: gmres(maxiter=0),
        lambda: gmres(restart=0),
        lambda: gmres(damping=-1.0),
        lambda: exact(damping=-1e-3),
    ],
)
def test_bad_options_raise_config_error(make) -> None:
    with pytest.raises(ConfigError, match="solver"):
        make()


@pytest.mark.parametrize("name", ["cg", "neumann", "gmres", "exact"])
def test_solver_configs_instantiate_their_factory(name: str) -> None:
    solver = instantiate(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    assert isinstance(solver, LinearSolver)
    assert solver.name == name and solver.kind == "implicit"
    assert solver == {"cg": cg, "neumann": neumann, "gmres": gmres, "exact": exact}[name]()


def test_options_are_attributes() -> None:
    solver = cg(maxiter=7, damping=0.5)
    assert (solver.maxiter, solver.tol, solver.damping) == (7, 1e-10, 0.5)
    with pytest.raises(AttributeError):
        solver.terms  # noqa: B018
