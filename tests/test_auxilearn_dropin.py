"""metalab.auxilearn.MetaOptimizer, the drop-in for the official auxilearn.optim.MetaOptimizer, on the
official README's loop shape, against the official formula written by hand with dense matrices; its
arguments checked as torch.optim checks its own, a refused step changing nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from metalab.auxilearn import MetaOptimizer
from metalab.errors import ConfigError
from metalab.hypergrad import NonFiniteLossError, first_order, gmres


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


def test_drop_in_with_the_exact_solver_equals_the_dense_solve():
    from metalab.hypergrad import exact

    primary, combiner, data = make_problem()
    optimizer = MetaOptimizer(torch.optim.SGD(combiner.parameters(), lr=0.1), hpo_lr=0.1, solver=exact())
    grads = optimizer.hypergradient(
        loss_func(primary, combiner, data),
        loss_func(primary, combiner, data, train=False),
        primary.parameters(),
        [combiner.weight],
    )
    expected = official_by_hand(primary, combiner, data, 0.1, 3, max_grad_norm=1e9, dense_solve=True)
    torch.testing.assert_close(grads[0].flatten(), expected, rtol=1e-9, atol=0)


def test_a_primary_parameter_only_the_validation_loss_uses_adds_nothing():
    """w = (the network, an extra tensor only L_A uses): L_T's Hessian and mixed term are zero in the extra
    tensor, so the hypergradient is the network's alone (the official code could not differentiate it)."""
    primary, combiner, data = make_problem()
    extra = torch.ones(2, dtype=torch.float64, requires_grad=True)
    optimizer = MetaOptimizer(torch.optim.SGD(combiner.parameters(), lr=0.1), hpo_lr=0.1)
    losses = lambda: (loss_func(primary, combiner, data), loss_func(primary, combiner, data, train=False))  # noqa: E731
    train_loss, val_loss = losses()
    with_extra = optimizer.hypergradient(
        train_loss, val_loss + (extra**2).sum(), [*primary.parameters(), extra], [combiner.weight]
    )
    alone = optimizer.hypergradient(*losses(), primary.parameters(), [combiner.weight])
    torch.testing.assert_close(with_extra[0], alone[0], rtol=1e-12, atol=0)


def losses(primary, combiner, data):
    return loss_func(primary, combiner, data), loss_func(primary, combiner, data, train=False)


def main_loss_only(primary, combiner, data):
    x, y = data[0], data[1]
    return ((primary(x)[:, 0] - y) ** 2).mean()


#: (step's arguments from (primary, combiner, data, train_loss, val_loss), the exception, a fragment of its sentence)
BAD_STEPS = {
    "NaN train loss": (lambda P, A, d, t, v: (t * float("nan"), v, P, A), NonFiniteLossError, "train_loss is nan"),
    "infinite validation loss": (lambda P, A, d, t, v: (t, v / 0, P, A), NonFiniteLossError, "val_loss is inf"),
    "parameters and aux_params swapped": (
        lambda P, A, d, t, v: (t, v, A, P),
        ConfigError,
        "aux_params are not parameters of meta_optimizer, which would not update them",
    ),
    "overlapping lists": (lambda P, A, d, t, v: (t, v, [*P, *A], A), ConfigError, "parameters and aux_params share"),
    "empty parameters": (lambda P, A, d, t, v: (t, v, [], A), ConfigError, "parameters is empty"),
    "empty aux_params": (lambda P, A, d, t, v: (t, v, P, iter([])), ConfigError, "aux_params is empty"),
    "a module as parameters": (
        lambda P, A, d, t, v: (t, v, d[0], A),
        TypeError,
        "not a Sequential (pass net.parameters",
    ),
    "one tensor as aux_params": (lambda P, A, d, t, v: (t, v, P, A[0]), TypeError, "aux_params must be an iterable of"),
    "a number among parameters": (lambda P, A, d, t, v: (t, v, [1.0], A), TypeError, "parameters[0] is a float"),
    "frozen tensors": (lambda P, A, d, t, v: (t, v, [p.detach() for p in P], A), ConfigError, "does not require grad"),
    "a float loss": (lambda P, A, d, t, v: (t.item(), v, P, A), TypeError, "train_loss must be a loss tensor"),
    "a loss per example": (lambda P, A, d, t, v: (torch.stack([t, t]), v, P, A), ConfigError, "has shape [2]"),
    "a detached loss": (lambda P, A, d, t, v: (t, v.detach(), P, A), ConfigError, "val_loss has no graph"),
    "a validation loss of the auxiliary network": (
        lambda P, A, d, t, v: (t, A[0].sum(), P, A),
        ConfigError,
        "val_loss does not depend on parameters",
    ),
    "a train loss without the auxiliary network": (
        lambda P, A, d, t, v: (main_loss_only(d[0], d[1], d[2]), v, P, A),
        ConfigError,
        "does not depend on aux_params, so the hypergradient would be zero",
    ),
}


def state_of(primary, combiner, optimizer):
    """Every value a refused step must leave as it was: parameters, their .grad, the optimizer's state."""
    params = [*primary.parameters(), *combiner.parameters()]
    return copy.deepcopy(([p.detach() for p in params], [p.grad for p in params], optimizer.state_dict()["state"]))


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_a_bad_step_is_one_sentence_and_changes_nothing(case):
    arguments, error, fragment = BAD_STEPS[case]
    primary, combiner, data = make_problem()
    meta_optimizer = torch.optim.SGD(combiner.parameters(), lr=0.1, momentum=0.9)
    optimizer = MetaOptimizer(meta_optimizer, hpo_lr=0.1)
    optimizer.step(*losses(primary, combiner, data), primary.parameters(), combiner.parameters())  # a momentum state
    for p in [*primary.parameters(), *combiner.parameters()]:
        p.grad = torch.full_like(p, 7.0)  # what the user's loop left there
    before = state_of(primary, combiner, meta_optimizer)
    P, A = list(primary.parameters()), list(combiner.parameters())
    with pytest.raises(error) as raised:
        optimizer.step(*arguments(P, A, (primary, combiner, data), *losses(primary, combiner, data)))
    message = str(raised.value)
    assert fragment in message and "\n" not in message and message.endswith("."), message
    torch.testing.assert_close(state_of(primary, combiner, meta_optimizer), before, rtol=0, atol=0)


def test_a_diverging_neumann_series_is_refused_and_changes_nothing():
    primary, combiner, data = make_problem()
    optimizer = MetaOptimizer(torch.optim.SGD(combiner.parameters(), lr=0.1), hpo_lr=1e300)
    weight = combiner.weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match=r"^the hypergradient holds NaN or infinite values although both"):
        optimizer.step(*losses(primary, combiner, data), primary.parameters(), combiner.parameters())
    assert torch.equal(combiner.weight, weight) and combiner.weight.grad is None


#: (MetaOptimizer's arguments over an SGD optimizer ``sgd``, the exception, the start of its sentence)
BAD_CONSTRUCTIONS = {
    "a list of optimizers": (lambda sgd: dict(meta_optimizer=[sgd]), TypeError, "meta_optimizer must be a torch.optim"),
    "parameters for the optimizer": (lambda sgd: dict(meta_optimizer=sgd.param_groups[0]["params"]), TypeError, ""),
    "a string hpo_lr": (lambda sgd: dict(hpo_lr="1e-4"), TypeError, "hpo_lr must be a finite number > 0"),
    "a boolean hpo_lr": (lambda sgd: dict(hpo_lr=True), TypeError, "hpo_lr must be a finite number > 0"),
    "a zero hpo_lr": (lambda sgd: dict(hpo_lr=0.0), ConfigError, "hpo_lr must be a finite number > 0"),
    "an infinite hpo_lr": (lambda sgd: dict(hpo_lr=float("inf")), ConfigError, "hpo_lr must be a finite number > 0"),
    "a NaN hpo_lr": (lambda sgd: dict(hpo_lr=float("nan")), ConfigError, "hpo_lr must be a finite number > 0"),
    "a string truncate_iter": (lambda sgd: dict(truncate_iter="3"), TypeError, "truncate_iter must be an integer >= 0"),
    "a fractional truncate_iter": (lambda sgd: dict(truncate_iter=2.5), TypeError, "truncate_iter must be an integer"),
    "a negative truncate_iter": (lambda sgd: dict(truncate_iter=-1), ConfigError, "truncate_iter must be an integer"),
    "a string max_grad_norm": (lambda sgd: dict(max_grad_norm="10"), TypeError, "max_grad_norm must be a finite"),
    "a zero max_grad_norm": (lambda sgd: dict(max_grad_norm=0), ConfigError, "max_grad_norm must be a finite"),
    "a NaN max_grad_norm": (lambda sgd: dict(max_grad_norm=float("nan")), ConfigError, "max_grad_norm must be a"),
    "a solver's name": (
        lambda sgd: dict(solver="cg"),
        TypeError,
        "solver must be a linear solver object, not the string",
    ),
    "an unknown solver name": (lambda sgd: dict(solver="bfgs"), TypeError, "solver must be a linear solver object"),
    "an unrolling solver": (lambda sgd: dict(solver=first_order()), TypeError, "solver must be a linear solver (metal"),
    "a number as solver": (lambda sgd: dict(solver=3), TypeError, "solver must be a linear solver (metalab.hypergrad"),
}


@pytest.mark.parametrize("case", list(BAD_CONSTRUCTIONS))
def test_a_bad_construction_is_one_sentence(case):
    arguments, error, start = BAD_CONSTRUCTIONS[case]
    sgd = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    with pytest.raises(error) as raised:
        MetaOptimizer(**{"meta_optimizer": sgd, "hpo_lr": 1e-4, **arguments(sgd)})
    message = str(raised.value)
    assert message.startswith(start) and "\n" not in message and message.endswith("."), message
