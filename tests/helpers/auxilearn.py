"""The AuxiLearn toy with a linear primary network and linear combiner, where w*(phi) has a closed form:
the algorithm built on it, its inner solution set by hand, and finite differences of L_A(w*(phi))."""

from __future__ import annotations

import functools

import torch

from metalab.algorithms import AuxiLearn
from metalab.hypergrad import exact
from metalab.models import MLP
from metalab.tasks.auxiliary.toy import AuxToy

__all__ = ["PHI", "SGD", "at_inner_solution", "aux_set_loss", "closed_form", "finite_differences", "toy_algorithm"]

SGD = functools.partial(torch.optim.SGD, lr=0.01)


def toy_algorithm(solver=None, dtype=torch.float64, combiner="linear", **kwargs) -> AuxiLearn:
    """AuxiLearn with a linear primary network on a small toy (4 dimensions, 3 main labels), in ``dtype``."""
    toy = AuxToy(dim=4, train_size=30, main_labels=3, aux_size=20, aux_batch_size=20, noise=0.3, data_seed=1)
    toy.data = {split: {key: value.to(dtype) for key, value in part.items()} for split, part in toy.data.items()}
    torch.manual_seed(0)
    model = MLP(toy.input_shape, toy.output_dim, hidden_sizes=[]).to(dtype)
    options = dict(primary_optimizer=SGD, combiner_optimizer=SGD, combiner=combiner, convention="paper")
    algorithm = AuxiLearn(model, toy, solver or exact(), None, **{**options, **kwargs})
    algorithm.combiner.to(dtype)
    return algorithm


def closed_form(algorithm: AuxiLearn, batch, phi: torch.Tensor) -> torch.Tensor:
    """w*(phi) = argmin_w L_T(w, phi) for the linear combiner: weighted least squares, [dim + 1] (weight, bias)."""
    x = torch.cat([batch.x[0], torch.ones(len(batch.y), 1, dtype=phi.dtype)], dim=1)
    present = ~torch.isnan(batch.y)
    main_weight = present.to(phi.dtype) / present.sum()
    n = len(batch.y)
    weight = main_weight + phi.sum() / n  # every example's total weight in L_T
    target = torch.nan_to_num(batch.y) * main_weight + (batch.aux_y @ phi) / n
    return torch.linalg.solve(x.T @ (weight[:, None] * x), x.T @ target)


def aux_set_loss(batch, w: torch.Tensor) -> torch.Tensor:
    prediction = batch.x_aux @ w[:-1] + w[-1]
    return ((prediction - batch.y_aux) ** 2).mean()


def at_inner_solution(algorithm: AuxiLearn, phi: torch.Tensor):
    """Set phi and w = w*(phi); return the batch (the whole training split)."""
    batch = algorithm.tasks.sample(30, "train", torch.Generator().manual_seed(0))
    with torch.no_grad():
        algorithm.combiner.weight.copy_(phi)
        w = closed_form(algorithm, batch, phi)
        linear = algorithm.model.net[-1]
        linear.weight.copy_(w[:-1][None])
        linear.bias.copy_(w[-1:])
    return batch


def finite_differences(algorithm: AuxiLearn, batch, phi: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of phi -> L_A(w*(phi))."""
    columns = []
    for k in range(len(phi)):
        step = torch.zeros_like(phi)
        step[k] = eps
        plus = aux_set_loss(batch, closed_form(algorithm, batch, phi + step))
        minus = aux_set_loss(batch, closed_form(algorithm, batch, phi - step))
        columns.append((plus - minus) / (2 * eps))
    return torch.stack(columns)


PHI = torch.tensor([0.7, 0.4], dtype=torch.float64)
