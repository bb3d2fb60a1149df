"""metalab.hypergrad: hypergradients of bilevel problems, usable without the trainer."""

from metalab.hypergrad.apply import NonFiniteLossError, apply_gradients
from metalab.hypergrad.conditions import (
    OptimalityFn,
    projected_gradient_fixed_point,
    proximal_gradient_fixed_point,
    stationarity,
)
from metalab.hypergrad.hvp import hvp, make_hvp
from metalab.hypergrad.implicit import Residuals, custom_root, root_vjp
from metalab.hypergrad.implicit_step import ImplicitStep
from metalab.hypergrad.linear_solvers import (
    LinearSolver,
    Matvec,
    cg,
    exact,
    gmres,
    neumann,
    solve_cg,
    solve_exact,
    solve_gmres,
    solve_neumann,
)
from metalab.hypergrad.tree import (
    tree_add,
    tree_dot,
    tree_map,
    tree_norm,
    tree_ravel,
    tree_scale,
    tree_sub,
    tree_zeros_like,
)
from metalab.hypergrad.unroll import Unroll, first_order, unroll

__all__ = [
    "Unroll",
    "first_order",
    "unroll",
    "LinearSolver",
    "Matvec",
    "cg",
    "neumann",
    "gmres",
    "exact",
    "solve_cg",
    "solve_neumann",
    "solve_gmres",
    "solve_exact",
    "hvp",
    "make_hvp",
    "OptimalityFn",
    "stationarity",
    "proximal_gradient_fixed_point",
    "projected_gradient_fixed_point",
    "Residuals",
    "root_vjp",
    "custom_root",
    "ImplicitStep",
    "NonFiniteLossError",
    "apply_gradients",
    "tree_map",
    "tree_add",
    "tree_sub",
    "tree_scale",
    "tree_dot",
    "tree_norm",
    "tree_zeros_like",
    "tree_ravel",
]
