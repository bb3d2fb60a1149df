"""metalab.auxilearn.MetaOptimizer, the drop-in for the official auxilearn.optim.MetaOptimizer, on the
official README's loop shape, against the official formula written by hand with dense matrices."""

from __future__ import annotations

import copy

import torch
from torch import nn

from metalab.auxilearn import MetaOptimizer
from metalab.hypergrad import gmres


def make_problem():
    """A tiny primary network with a main and an auxiliary head, a linear combiner, and data."""
    torch.manual_seed(0)
    primary = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    combiner = nn.Linear(1, 1, bias=False).double()  # g_phi(l_aux) = phi * l_aux
    x, y, y_aux = torch.randn(16, 3).double(), torch.randn(16).double(), torch.randn(16).double()
    x_val, y_val = torch.randn(8, 3).double(), torch.randn(8).double()
    return primary, combiner, (x, y, y_aux, x_val, y_val)


def loss_func(primary, combiner, data, train=True):
    x, y, y_aux, x_val, y_val = data
    if not train:
        return ((primary(x_val)[:, 0] - y_val) ** 2).mean()
    out = primary(x)
    main, aux = (out[:, 0] - y) ** 2, (out[:, 1] - y_aux) ** 2
    return main.mean() + combiner(aux[:, None]).mean()


def official_by_hand(primary, combiner, data, hpo_lr, terms, max_grad_norm, dense_solve=False):
    """-(d_phi grad_w L_T)^T sum_{j=0..J} (I - hpo_lr H)^j grad_w L_A with the dense Hessian H and mixed
    Jacobian, its norm clipped: what the official Hypergrad.grad and MetaOptimizer.step compute.
    ``dense_solve``: H^-1 grad_w L_A / hpo_lr instead of the series (another solver, same convention)."""
    names = [n for n, _ in primary.named_parameters()]
    shapes = [p.shape for p in primary.parameters()]
    flat = torch.cat([p.detach().flatten() for p in primary.parameters()])
    phi = combiner.weight.detach().clone()

    def unflatten(vector):
        out, offset = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = vector[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return out

    def train_loss(w, phi_value):
        params = unflatten(w)
        out = torch.func.functional_call(primary, params, (data[0],))
        main, aux = (out[:, 0] - data[1]) ** 2, (out[:, 1] - data[2]) ** 2
        return main.mean() + (phi_value.flatten() * aux).mean()

    def val_loss(w):
        out = torch.func.functional_call(primary, unflatten(w), (data[3],))
        return ((out[:, 0] - data[4]) ** 2).mean()

    hessian = torch.autograd.functional.hessian(lambda w: train_loss(w, phi), flat)
    mixed = torch.autograd.functional.jacobian(
        lambda p: torch.autograd.functional.jacobian(lambda w: train_loss(w, p), flat, create_graph=True), phi
    )
    mixed = mixed.reshape(flat.numel(), -1)  # [n_w, n_phi]
    g = torch.autograd.functional.jacobian(val_loss, flat)
    p, term = g.clone(), g.clone()
    for _ in range(terms):
        term = term - hpo_lr * hessian @ term
        p = p + term
    if dense_solve:
        p = torch.linalg.solve(hessian, g) / hpo_lr
    hypergrad = -(mixed.T @ p)
    norm = hypergrad.norm()
    return hypergrad * min(1.0, max_grad_norm / (norm.item() + 1e-6))


def readme_loop(primary, combiner, data, aux_optimizer_step, steps=6, update_every=2):
    """The official README's training loop; ``aux_optimizer_step(...)`` is the combiner update."""
    primary_optimizer = torch.optim.SGD(primary.parameters(), lr=0.05)
    step = 0
    for _ in range(steps):
        step += 1
        primary_optimizer.zero_grad()
        loss = loss_func(primary, combiner, data, train=True)
        loss.backward()
        primary_optimizer.step()
        if step % update_every == 0:
            train_set_loss = loss_func(primary, combiner, data, train=True)
            auxiliary_set_loss = loss_func(primary, combiner, data, train=False)
            aux_optimizer_step(
                val_loss=auxiliary_set_loss,
                train_loss=train_set_loss,
                aux_params=combiner.parameters(),
                parameters=primary.parameters(),
            )


def test_drop_in_equals_the_official_formula_by_hand_on_the_readme_loop():
    hpo_lr, terms, max_grad_norm = 0.1, 3, 0.05  # a small max_grad_norm: clipping is exercised
    primary, combiner, data = make_problem()
    primary_ref, combiner_ref = copy.deepcopy(primary), copy.deepcopy(combiner)
    aux_optimizer = MetaOptimizer(
        torch.optim.SGD(combiner.parameters(), lr=0.5, momentum=0.9),
        hpo_lr=hpo_lr,
        truncate_iter=terms,
        max_grad_norm=max_grad_norm,
    )
    readme_loop(primary, combiner, data, aux_optimizer.step)

    reference_optimizer = torch.optim.SGD(combiner_ref.parameters(), lr=0.5, momentum=0.9)
    clipped = []

    def by_hand(val_loss, train_loss, aux_params, parameters):
        hypergrad = official_by_hand(primary_ref, combiner_ref, data, hpo_lr, terms, max_grad_norm)
        clipped.append(hypergrad.norm().item())
        combiner_ref.weight.grad = hypergrad.view_as(combiner_ref.weight)
        reference_optimizer.step()

    readme_loop(primary_ref, combiner_ref, data, by_hand)
    assert combiner.weight.item() != 1.0 and max(clipped) > 0
    assert torch.allclose(combiner.weight, combiner_ref.weight, rtol=1e-9, atol=1e-12)
    for p, q in zip(primary.parameters(), primary_ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12)


def test_drop_in_hypergradient_before_clipping_and_with_another_solver():
    primary, combiner, data = make_problem()
    expected = official_by_hand(primary, combiner, data, 0.1, 3, max_grad_norm=1e9)
    optimizer = MetaOptimizer(torch.optim.SGD(combiner.parameters(), lr=0.1), hpo_lr=0.1)
    grads = optimizer.hypergradient(
        loss_func(primary, combiner, data),
        loss_func(primary, combiner, data, train=False),
        primary.parameters(),
        combiner.parameters(),
    )
    assert torch.allclose(grads[0].flatten(), expected, rtol=1e-9)
    # another metalab solver in the official convention: gmres with as many steps as parameters solves H p = g
    size = sum(p.numel() for p in primary.parameters())
    solved = MetaOptimizer(
        torch.optim.SGD(combiner.parameters(), lr=0.1), hpo_lr=0.1, solver=gmres(maxiter=size, restart=size)
    )
    grads = solved.hypergradient(
        loss_func(primary, combiner, data),
        loss_func(primary, combiner, data, train=False),
        iter(list(primary.parameters())),
        iter(list(combiner.parameters())),
    )  # generators
    expected = official_by_hand(primary, combiner, data, 0.1, 3, max_grad_norm=1e9, dense_solve=True)
    assert torch.allclose(grads[0].flatten(), expected, rtol=1e-6)


def test_drop_in_and_the_algorithm_give_the_same_official_hypergradient():
    """algo=auxilearn (torch.func over Params) and the drop-in (autograd over loss tensors), both in the
    official convention with the same Neumann series, at the same state of the toy."""
    from metalab.hypergrad import neumann
    from tests.helpers.auxilearn import PHI, at_inner_solution, toy_algorithm

    algorithm = toy_algorithm(neumann(terms=3), hpo_lr=0.01, convention="official")
    batch = at_inner_solution(algorithm, PHI * 1.3)
    expected = algorithm.hypergradient(batch)[0]["weight"]
    w, phi = algorithm.primary_parameters(), algorithm.meta_parameters()
    drop_in = MetaOptimizer(torch.optim.SGD(phi.values(), lr=0.1), hpo_lr=0.01, truncate_iter=3)
    grads = drop_in.hypergradient(
        algorithm.train_loss(w, phi, batch),
        algorithm.aux_set_loss(w, phi, batch),
        algorithm.model.parameters(),
        algorithm.combiner.parameters(),
    )
    assert torch.allclose(grads[0], expected, rtol=1e-10)
