"""Matrix-free linear solvers over Params, all with one signature (as JAXopt's ``linear_solve``):

    solve_X(matvec, b, *, init=None, **options) -> x        with (A + damping I) x ≈ b

``b`` and ``x`` are Params; ``matvec`` maps Params to Params (A v, typically a Hessian- or
Jacobian-vector product); ``damping`` is JAXopt's ``ridge``. The top half of this file is the
numerics (pure functions); the bottom half binds options into a ``LinearSolver`` (TorchOpt's
split of ``linalg/`` from ``linear_solve/``), which is what ``configs/solver/*.yaml`` instantiate.

Every solver runs under ``torch.func.vmap`` (one system per task, matvec a per-task HVP): the
iteration counts are fixed Python ints, and a tolerance freezes a converged system by masking
its updates with ``torch.where`` instead of exiting the loop, so no ``.item()`` and no ``if`` on
tensor values. Nothing names a device or dtype; the work happens in ``b``'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from metalab.errors import require
from metalab.hypergrad.tree import (
    tree_add,
    tree_dot,
    tree_norm,
    tree_ravel,
    tree_scale,
    tree_sub,
    tree_zeros_like,
)
from metalab.types import Params

__all__ = [
    "Matvec",
    "LinearSolver",
    "solve_cg",
    "solve_neumann",
    "solve_gmres",
    "solve_exact",
    "cg",
    "neumann",
    "gmres",
    "exact",
]

#: v -> A v on Params.
Matvec = Callable[[Params], Params]


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------


def _damped(matvec: Matvec, damping: float) -> Matvec:
    """v -> (A + damping I) v."""
    if damping == 0.0:
        return matvec
    return lambda v: tree_add(matvec(v), v, damping)


def _safe_div(numerator: Tensor, denominator: Tensor, active: Tensor) -> Tensor:
    """``numerator / denominator`` where ``active``, else 0. The inner ``where`` keeps a zero
    denominator of a frozen (converged) system from making inf/NaN, in values and in gradients."""
    safe = torch.where(active, denominator, torch.ones_like(denominator))
    return torch.where(active, numerator / safe, torch.zeros_like(numerator))


def solve_cg(
    matvec: Matvec,
    b: Params,
    *,
    init: Params | None = None,
    maxiter: int = 5,
    tol: float = 1e-10,
    damping: float = 0.0,
) -> Params:
    """Conjugate gradient for symmetric positive-definite ``A + damping I`` (Hestenes & Stiefel).

    Runs exactly ``maxiter`` matvecs (plus one when ``init`` is given); once the residual
    satisfies ``||r|| <= tol * ||b||`` the iterate stops moving. The solver of iMAML
    (Rajeswaran et al., 2019: CG on I + H / lambda).

    CG is defined for positive-definite systems only. When a search direction p meets
    non-positive curvature (p^T A p <= 0), the system is indefinite along p and the step
    ``r^T r / p^T A p`` would be negative or unbounded; the iteration then stops and returns the
    iterate it has, which minimises the quadratic model over the Krylov subspace where it is
    convex (truncated Newton-CG, Nocedal & Wright, Numerical Optimization, Algorithm 7.1), or
    ``b`` when that happens at the first step. This is what keeps an implicit meta-gradient
    bounded where the inner loop stopped short of a minimum (a Hessian with eigenvalues below
    -lambda makes iMAML's I + H / lambda indefinite) instead of returning a vector of any size.
    """
    operator = _damped(matvec, damping)
    x = tree_zeros_like(b) if init is None else init
    residual = b if init is None else tree_sub(b, operator(x))
    direction = residual
    residual_sq = tree_dot(residual, residual)
    threshold_sq = tol**2 * tree_dot(b, b)
    convex = torch.ones_like(residual_sq, dtype=torch.bool)  # no non-positive curvature met yet
    for iteration in range(maxiter):
        operator_direction = operator(direction)
        curvature = tree_dot(direction, operator_direction)
        if iteration == 0 and init is None:  # indefinite along b itself: fall back to x = b
            x = tree_add(x, b, torch.where(curvature > 0, torch.zeros_like(curvature), torch.ones_like(curvature)))
        convex = convex & (curvature > 0)
        active = convex & (residual_sq > threshold_sq)
        step = _safe_div(residual_sq, curvature, active)
        x = tree_add(x, direction, step)
        residual = tree_add(residual, operator_direction, -step)
        new_residual_sq = tree_dot(residual, residual)
        direction = tree_add(residual, direction, _safe_div(new_residual_sq, residual_sq, active))
        residual_sq = new_residual_sq
    return x


def solve_neumann(
    matvec: Matvec,
    b: Params,
    *,
    init: Params | None = None,
    terms: int = 3,
    alpha: float = 1.0,
    damping: float = 0.0,
) -> Params:
    """Truncated Neumann series ``x = alpha * sum_{j=0..terms} (I - alpha A)^j b``.

    Uses ``terms`` matvecs; converges to ``A^{-1} b`` when the spectral radius of
    ``I - alpha A`` is below 1 (0 < alpha < 2 / lambda_max for SPD A). With ``init`` it
    corrects the warm start: ``x = init + series(b - A init)``. AuxiLearn's inverse-Hessian
    approximation (Navon et al., 2021; Lorraine et al., 2020), with J = 3 there; AuxiLearn's
    code returns the series without the leading ``alpha`` (1 / alpha times this), which
    matters before gradient clipping: scale the result by 1 / alpha to reproduce it exactly.
    """
    operator = _damped(matvec, damping)
    residual = b if init is None else tree_sub(b, operator(init))
    term, total = residual, residual
    for _ in range(terms):
        term = tree_add(term, operator(term), -alpha)
        total = tree_add(total, term)
    x = tree_scale(total, alpha)
    return x if init is None else tree_add(init, x)


def _givens(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(c, s) with [[c, s], [-s, c]] @ [a, b] = [hypot(a, b), 0]; (1, 0) when a = b = 0."""
    radius = torch.hypot(a, b)
    nonzero = radius > 0
    return (
        torch.where(nonzero, _safe_div(a, radius, nonzero), torch.ones_like(a)),
        _safe_div(b, radius, nonzero),
    )


def _gmres_cycle(operator: Matvec, x: Params, residual: Params, steps: int, threshold: Tensor) -> Params:
    """One GMRES cycle of ``steps`` Arnoldi steps from ``x`` (Saad & Schultz, 1986).

    The (steps+1) x steps Hessenberg matrix is reduced to triangular form column by column with
    Givens rotations, so ``|rhs[j+1]|`` is the residual norm after step j. Entries are kept as
    Python lists of 0-d tensors: under vmap they are per-system scalars, and writing them into
    a preallocated tensor in place would not batch. A step taken after convergence (or after a
    lucky breakdown) is replaced by an identity column with a zero right-hand side, which
    leaves the solution unchanged and the triangular system well posed.
    """
    beta = tree_norm(residual)
    one, zero = torch.ones_like(beta), torch.zeros_like(beta)
    basis = [tree_scale(residual, _safe_div(one, beta, beta > 0))]
    rhs = [beta]  # Q^T (beta e_1), rotated as the columns are
    columns: list[list[Tensor]] = []  # columns[j] = column j of the triangular factor (j+1 entries)
    rotations: list[tuple[Tensor, Tensor]] = []
    for j in range(steps):
        active = rhs[j].abs() > threshold
        w = operator(basis[j])
        column = []
        for v in basis:  # modified Gram-Schmidt
            coefficient = tree_dot(w, v)
            w = tree_add(w, v, -coefficient)
            column.append(coefficient)
        subdiagonal = tree_norm(w)
        basis.append(tree_scale(w, _safe_div(one, subdiagonal, active & (subdiagonal > 0))))
        for i, (c, s) in enumerate(rotations):
            column[i], column[i + 1] = c * column[i] + s * column[i + 1], c * column[i + 1] - s * column[i]
        c, s = _givens(column[j], subdiagonal)
        column[j] = c * column[j] + s * subdiagonal
        column = [torch.where(active, entry, one if i == j else zero) for i, entry in enumerate(column)]
        c, s = torch.where(active, c, one), torch.where(active, s, zero)
        rotations.append((c, s))
        rhs.append(-s * rhs[j])
        rhs[j] = torch.where(active, c * rhs[j], zero)
        columns.append(column)
    coefficients: list[Tensor] = [beta] * steps  # placeholders, all overwritten below
    for i in reversed(range(steps)):  # back substitution R y = rhs[:steps]
        partial = rhs[i]
        for k in range(i + 1, steps):
            partial = partial - columns[k][i] * coefficients[k]
        coefficients[i] = partial / columns[i][i]
    for i in range(steps):
        x = tree_add(x, basis[i], coefficients[i])
    return x


def solve_gmres(
    matvec: Matvec,
    b: Params,
    *,
    init: Params | None = None,
    maxiter: int = 20,
    restart: int = 20,
    tol: float = 1e-10,
    damping: float = 0.0,
) -> Params:
    """Restarted GMRES for a general (non-symmetric) nonsingular ``A + damping I``.

    ``maxiter`` counts Arnoldi steps (matvecs) over all cycles, like ``solve_cg``'s; the
    Krylov space is rebuilt from the current iterate every ``restart`` steps (each restart
    costs one more matvec for its residual). Stops moving once ``||r|| <= tol * ||b||``.
    Memory grows with ``restart`` (one Params per basis vector).
    """
    operator = _damped(matvec, damping)
    x = tree_zeros_like(b) if init is None else init
    threshold = tol * tree_norm(b)
    done = 0
    while done < maxiter:
        residual = b if (done == 0 and init is None) else tree_sub(b, operator(x))
        steps = min(restart, maxiter - done)
        x = _gmres_cycle(operator, x, residual, steps, threshold)
        done += steps
    return x


def solve_exact(matvec: Matvec, b: Params, *, init: Params | None = None, damping: float = 0.0) -> Params:
    """Dense solve: materialise M = A + damping I ([n, n], n = number of elements of b) by applying
    ``matvec`` to the n basis vectors (vmapped over the rows of the identity) and return
    x = M^+ b, the minimum-norm least-squares solution. O(n^2) memory: for small problems and as a
    test oracle. ``init`` is ignored.

    For a nonsingular M that is M^-1 b (``torch.linalg.solve``, an LU factorisation). A singular M is
    common: a parameter the loss does not reach (a dead ReLU unit, an unused head) makes a zero row
    and column of a Hessian. LU then finds a zero pivot, and x is instead the least-squares solution
    of least norm (``torch.linalg.pinv``, an SVD): on a consistent system it solves M x = b with no
    component in M's null space, which is also where damping -> 0 and CG started at 0 lead. Under
    vmap one singular system sends the whole batch through the SVD, where a nonsingular one gets
    M^-1 b all the same.
    """
    flat_b, unravel = tree_ravel(b)
    identity = torch.eye(flat_b.numel(), dtype=flat_b.dtype, device=flat_b.device)
    # Row i of the vmapped result is A e_i, i.e. column i of A.
    columns = torch.func.vmap(lambda e: tree_ravel(matvec(unravel(e)))[0])(identity)
    matrix = columns.mT + damping * identity
    try:
        solution = torch.linalg.solve(matrix, flat_b)
    except torch.linalg.LinAlgError:  # a zero pivot: M is singular
        solution = torch.linalg.pinv(matrix) @ flat_b
    return unravel(solution)


# --------------------------------------------------------------------------------------------
# Factories: options bound and checked, for configs/solver/*.yaml
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSolver:
    """A ``solve_*`` function with its options bound: ``solver(matvec, b, init=None) -> x``.

    ``name`` is the config name ("cg", "neumann", "gmres", "exact"); ``kind = "implicit"``
    tells an algorithm to differentiate implicitly (``Unroll.kind == "unroll"``); options are
    readable as attributes (``solver.maxiter``) and as ``solver.options``.
    """

    name: str
    solve: Callable[..., Params] = field(repr=False)
    options: dict[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = "implicit"

    def __call__(self, matvec: Matvec, b: Params, init: Params | None = None) -> Params:
        return self.solve(matvec, b, init=init, **self.options)

    def __getattr__(self, item: str) -> Any:
        options = self.__dict__.get("options", {})  # not self.options: no recursion when unpickling
        if item in options:
            return options[item]
        raise AttributeError(f"LinearSolver {self.__dict__.get('name')!r} has no attribute {item!r}")

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.options.items()))))


def _checked_int(solver: str, option: str, value: Any, minimum: int) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    require(ok, f"solver {solver}: {option}={value!r} is invalid; set solver.{option} to an integer >= {minimum}.")
    return value


def _checked_float(solver: str, option: str, value: Any, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    bound = "> 0" if positive else ">= 0"
    require(ok, f"solver {solver}: {option}={value!r} is invalid; set solver.{option} to a finite number {bound}.")
    return float(value)


def cg(maxiter: int = 5, tol: float = 1e-10, damping: float = 0.0) -> LinearSolver:
    """Conjugate gradient (``solve_cg``): ``maxiter`` matvecs (default 5, iMAML's), relative
    residual tolerance ``tol`` (default 1e-10), ``damping`` added to the diagonal (default 0)."""
    options = {
        "maxiter": _checked_int("cg", "maxiter", maxiter, 1),
        "tol": _checked_float("cg", "tol", tol),
        "damping": _checked_float("cg", "damping", damping),
    }
    return LinearSolver("cg", solve_cg, options)


def neumann(terms: int = 3, alpha: float = 1.0, damping: float = 0.0) -> LinearSolver:
    """Truncated Neumann series (``solve_neumann``): ``terms`` matvecs (default 3, AuxiLearn's;
    0 gives ``alpha * b``), step ``alpha`` (default 1.0; needs alpha < 2 / lambda_max(A)),
    ``damping`` (default 0)."""
    options = {
        "terms": _checked_int("neumann", "terms", terms, 0),
        "alpha": _checked_float("neumann", "alpha", alpha, positive=True),
        "damping": _checked_float("neumann", "damping", damping),
    }
    return LinearSolver("neumann", solve_neumann, options)


def gmres(maxiter: int = 20, restart: int = 20, tol: float = 1e-10, damping: float = 0.0) -> LinearSolver:
    """Restarted GMRES (``solve_gmres``) for non-symmetric systems: ``maxiter`` matvecs in all
    (default 20), Krylov space rebuilt every ``restart`` steps (default 20), relative residual
    tolerance ``tol`` (default 1e-10), ``damping`` (default 0)."""
    options = {
        "maxiter": _checked_int("gmres", "maxiter", maxiter, 1),
        "restart": _checked_int("gmres", "restart", restart, 1),
        "tol": _checked_float("gmres", "tol", tol),
        "damping": _checked_float("gmres", "damping", damping),
    }
    return LinearSolver("gmres", solve_gmres, options)


def exact(damping: float = 0.0) -> LinearSolver:
    """Dense direct solve (``solve_exact``), for small problems and as an oracle; ``damping``
    (default 0). A singular system gets its minimum-norm least-squares solution."""
    return LinearSolver("exact", solve_exact, {"damping": _checked_float("exact", "damping", damping)})
