"""Accuracy of implicit hypergradients against the number of linear-solver iterations.

For two inner problems, the hypergradient dL_val/dphi = root_vjp(stationarity(train_loss), ...)
computed with cg, neumann and gmres after k matrix-vector products is compared with the one
computed by the dense solve (``exact``); the table reports ||g_k - g_exact|| / ||g_exact||.

  (a) ridge regression with one penalty per feature, the inner solution in closed form;
  (b) an MLP regression (1-H-H-1, tanh) trained to stationarity of MSE + per-layer weight
      decay exp(phi_l) / 2 (||W_l||^2 + ||b_l||^2) by L-BFGS; phi = the log weight decays.

Neumann uses alpha = 1 / lambda_max(Hessian), read off the dense Hessian: the largest step
for which the series is safe, i.e. its best case. gmres restarts every 20 steps (its default).

    python scripts/benchmark_hypergrad.py            # the table in docs/hypergrad.md
    python scripts/benchmark_hypergrad.py --quick    # smaller problems, seconds
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor

from metalab.hypergrad import (
    LinearSolver,
    cg,
    exact,
    gmres,
    make_hvp,
    neumann,
    root_vjp,
    stationarity,
    tree_ravel,
)
from metalab.types import Params

ITERATIONS = (1, 2, 5, 10, 20, 50)
DTYPE = torch.float64


class Problem:
    """A bilevel problem at its inner solution: what root_vjp needs, plus a description."""

    def __init__(self, name: str, train_loss: Callable, val_loss: Callable, w: Params, phi: Params) -> None:
        self.name, self.train_loss, self.val_loss, self.w, self.phi = name, train_loss, val_loss, w, phi
        self.cotangent = torch.func.grad(val_loss)(w, phi)
        flat_w, unravel = tree_ravel(w)
        matvec = make_hvp(train_loss, w, phi)
        hessian = torch.func.vmap(lambda e: tree_ravel(matvec(unravel(e)))[0])(torch.eye(flat_w.numel(), dtype=DTYPE))
        self.eigenvalues = torch.linalg.eigvalsh((hessian + hessian.T) / 2)
        self.gradient_norm = float(tree_ravel(torch.func.grad(train_loss)(w, phi))[0].norm())

    def hypergradient(self, solver: LinearSolver) -> Tensor:
        g = root_vjp(stationarity(self.train_loss), self.w, self.phi, self.cotangent, solver)
        return tree_ravel(g)[0]

    def describe(self) -> str:
        low, high = float(self.eigenvalues[0]), float(self.eigenvalues[-1])
        return (
            f"{self.name}: {self.eigenvalues.numel()} inner parameters, Hessian eigenvalues "
            f"[{low:.2e}, {high:.2e}] (condition {high / low:.1e}), ||grad_w train_loss|| = "
            f"{self.gradient_norm:.1e}"
        )


def ridge_problem(features: int, samples: int, generator: torch.Generator) -> Problem:
    """Columns scaled geometrically over two decades: an ill-conditioned design."""
    scales = torch.logspace(0, -2, features, dtype=DTYPE)
    x = torch.randn(samples, features, generator=generator, dtype=DTYPE) * scales
    x_val = torch.randn(samples, features, generator=generator, dtype=DTYPE) * scales
    w_true = torch.randn(features, generator=generator, dtype=DTYPE)
    y = x @ w_true + 0.1 * torch.randn(samples, generator=generator, dtype=DTYPE)
    y_val = x_val @ w_true + 0.1 * torch.randn(samples, generator=generator, dtype=DTYPE)
    phi = {"log_lam": torch.full((features,), -6.0, dtype=DTYPE)}

    def train_loss(w: Params, phi: Params) -> Tensor:
        return 0.5 * ((x @ w["w"] - y) ** 2).mean() + 0.5 * (phi["log_lam"].exp() * w["w"] ** 2).sum()

    def val_loss(w: Params, phi: Params) -> Tensor:
        return 0.5 * ((x_val @ w["w"] - y_val) ** 2).mean()

    hessian = x.T @ x / samples + torch.diag(phi["log_lam"].exp())
    w = {"w": torch.linalg.solve(hessian, x.T @ y / samples)}
    return Problem(f"ridge (d={features}, n={samples})", train_loss, val_loss, w, phi)


def mlp(params: Params, x: Tensor) -> Tensor:
    hidden = torch.tanh(x @ params["w1"] + params["b1"])
    hidden = torch.tanh(hidden @ params["w2"] + params["b2"])
    return (hidden @ params["w3"] + params["b3"]).squeeze(-1)


def mlp_problem(
    hidden: int, samples: int, inner_iterations: int, generator: torch.Generator, log_decay: float = -4.0
) -> Problem:
    """Sinusoid regression; the inner problem is solved by full-batch L-BFGS to stationarity."""

    def data(n: int) -> tuple[Tensor, Tensor]:
        x = torch.rand(n, 1, generator=generator, dtype=DTYPE) * 10 - 5
        return x, torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=generator, dtype=DTYPE)

    (x, y), (x_val, y_val) = data(samples), data(samples)
    sizes = [(1, hidden), (hidden, hidden), (hidden, 1)]
    w = {}
    for layer, (fan_in, fan_out) in enumerate(sizes, start=1):
        w[f"w{layer}"] = torch.randn(fan_in, fan_out, generator=generator, dtype=DTYPE) / fan_in**0.5
        w[f"b{layer}"] = torch.zeros(fan_out, dtype=DTYPE)
    phi = {"log_decay": torch.full((3,), log_decay, dtype=DTYPE)}  # one per layer

    def train_loss(w: Params, phi: Params) -> Tensor:
        decay = phi["log_decay"].exp()
        # Biases too: a dead unit's unpenalised bias would be a flat direction (singular Hessian).
        squares = [(w[f"w{layer}"] ** 2).sum() + (w[f"b{layer}"] ** 2).sum() for layer in (1, 2, 3)]
        penalty = (decay * torch.stack(squares)).sum()
        return 0.5 * ((mlp(w, x) - y) ** 2).mean() + 0.5 * penalty

    def val_loss(w: Params, phi: Params) -> Tensor:
        return 0.5 * ((mlp(w, x_val) - y_val) ** 2).mean()

    leaves = [value.requires_grad_() for value in w.values()]
    optimizer = torch.optim.LBFGS(
        leaves,
        max_iter=inner_iterations,
        max_eval=2 * inner_iterations,
        tolerance_grad=1e-12,
        tolerance_change=0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = train_loss(w, phi)
        loss.backward()
        return loss

    optimizer.step(closure)
    w = {key: value.detach() for key, value in w.items()}
    return Problem(f"MLP 1-{hidden}-{hidden}-1 (n={samples})", train_loss, val_loss, w, phi)


def solvers(k: int, problem: Problem) -> dict[str, LinearSolver]:
    alpha = float(1 / problem.eigenvalues[-1])
    return {
        "cg": cg(maxiter=k, tol=0.0),
        "neumann": neumann(terms=k, alpha=alpha),
        "gmres": gmres(maxiter=k, tol=0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small problems: a seconds-long run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    if args.quick:
        problems = [ridge_problem(20, 40, generator), mlp_problem(8, 40, 200, generator, log_decay=-3.0)]
    else:
        problems = [ridge_problem(100, 200, generator), mlp_problem(20, 100, 2000, generator)]

    rows = []
    for problem in problems:
        reference = problem.hypergradient(exact())
        errors: dict[str, list[float]] = {}
        for k in ITERATIONS:
            for name, solver in solvers(k, problem).items():
                relative = float((problem.hypergradient(solver) - reference).norm() / reference.norm())
                errors.setdefault(name, []).append(relative)
        rows += [(problem.name, name, values) for name, values in errors.items()]

    print("| problem | solver | " + " | ".join(f"k={k}" for k in ITERATIONS) + " |")
    print("|---|---|" + "---|" * len(ITERATIONS))
    for name, solver, values in rows:
        print(f"| {name} | {solver} | " + " | ".join(f"{v:.1e}" for v in values) + " |")
    print()
    for problem in problems:
        print(f"- {problem.describe()}")
    print(f"\n({time.perf_counter() - start:.1f} s, torch {torch.__version__}, seed {args.seed})")


if __name__ == "__main__":
    main()
