"""Exact meta-gradients through batch norm, in float64 on a tiny Conv4 (2 blocks, 3 channels, 8x8
inputs, 2-way, 2 tasks), under both normalisation protocols.

The oracles never use vmap or the algorithms' code: an explicit per-task loop with
torch.autograd over a reference forward pass written with torch's own ``F.batch_norm`` (the
transductive protocol) or ``torch.var_mean`` (the support protocol); for iMAML a dense Hessian
and ``torch.linalg.solve``; and central finite differences. torch's vmap rule for
differentiating ``F.batch_norm`` twice gave errors of 2e-3 to 1e-2 here (pytorch/functorch#534);
these tests hold the vmapped code to 1e-10.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from metalab.algorithms import IMAML, MAML
from metalab.errors import ConfigError
from metalab.hypergrad import cg, exact, first_order, gmres, neumann, unroll
from metalab.models import MLP, BatchNorm, Conv4
from metalab.tasks.base import ClassificationTasks
from metalab.types import Params, TaskBatch

WAYS, SHOTS, QUERY, TASKS = 2, 2, 3, 2
INPUT = (1, 8, 8)
INNER_LR, MAML_STEPS = 0.3, 2
LAM, IMAML_LR, IMAML_STEPS = 10.0, 0.05, 20  # here I + H/lam is positive definite, eigenvalues in [0.5, 2.4]
PROTOCOLS = ("support", "transductive")


class TwoWayImages(ClassificationTasks):
    """Only the scoring of a 2-way image task: the tests feed their own batches."""

    input_shape, output_dim = INPUT, WAYS

    def sample(self, batch_size, split, generator):
        raise NotImplementedError


def tiny_conv4(norm: str, activation: str = "relu") -> Conv4:
    torch.manual_seed(0)
    model = Conv4(
        INPUT, WAYS, hidden_channels=3, downsample="stride", blocks=2, norm=norm, activation=activation
    ).double()
    with torch.no_grad():  # away from the initial weight 1 / bias 0, so that every term matters
        for name, value in model.named_parameters():
            if ".1." in name or ".4." in name:
                value.add_(0.3 * torch.randn_like(value))
    return model


def tiny_batch(seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    labels = lambda n: torch.arange(WAYS).repeat_interleave(n).expand(TASKS, -1).contiguous()
    return TaskBatch(
        torch.randn(TASKS, WAYS * SHOTS, *INPUT, generator=g, dtype=torch.float64),
        labels(SHOTS),
        torch.randn(TASKS, WAYS * QUERY, *INPUT, generator=g, dtype=torch.float64),
        labels(QUERY),
    )


def no_meta_update(params):
    return torch.optim.SGD(params, lr=0.0)


def reference_forward(model: Conv4, params: Params, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """Conv4's logits written out with torch's functional ops, one task, no vmap."""
    support = context is not None and model.norm == "support"
    h = torch.cat([context, x]) if support else x
    for index, layer in enumerate(model.features):
        weight, bias = params.get(f"features.{index}.weight"), params.get(f"features.{index}.bias")
        if isinstance(layer, torch.nn.Conv2d):
            h = F.conv2d(h, weight, bias, stride=layer.stride, padding=layer.padding)
        elif isinstance(layer, BatchNorm) and support:
            var, mean = torch.var_mean(h[: len(context)], dim=(0, 2, 3), unbiased=False, keepdim=True)
            h = (h - mean) / torch.sqrt(var + 1e-5) * weight[:, None, None] + bias[:, None, None]
        elif isinstance(layer, BatchNorm):
            h = F.batch_norm(h, None, None, weight, bias, training=True, eps=1e-5)
        else:
            h = layer(h)
    logits = F.linear(h, params["head.weight"], params["head.bias"])
    return logits[len(context) :] if support else logits


def gradient(loss: torch.Tensor, params: Params) -> Params:
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def assert_params_close(got: Params, expected: Params, rtol: float) -> None:
    scale = max(v.abs().max().item() for v in expected.values())
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{key}: {m}")


def conv_biases_before_norms(model: Conv4) -> list[str]:
    layers = list(model.features)
    return [
        f"features.{i}.bias"
        for i, layer in enumerate(layers[:-1])
        if isinstance(layer, torch.nn.Conv2d) and isinstance(layers[i + 1], BatchNorm)
    ]


# -- the norm itself ------------------------------------------------------------------------------


def test_norm_equals_torch_batch_norm_and_uses_only_the_context_rows():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    norm = BatchNorm(3).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-1, 1)
    torch_norm = torch.nn.BatchNorm2d(3, track_running_stats=False).double()
    torch_norm.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(x), torch_norm(x), rtol=1e-12, atol=1e-12)
    # with statistics from the first two rows: torch's eval-mode batch norm given those statistics
    var, mean = torch.var_mean(x[:2], dim=(0, 2, 3), unbiased=False)
    expected = F.batch_norm(x, mean, var, norm.weight, norm.bias, training=False, eps=1e-5)
    torch.testing.assert_close(norm(x, num_context=2), expected, rtol=1e-12, atol=1e-12)


def test_bad_norm_and_activation_are_refused_in_one_sentence():
    with pytest.raises(ConfigError, match="model.norm must be 'support'.*got 'batch'"):
        Conv4(INPUT, WAYS, norm="batch")
    with pytest.raises(ConfigError, match="model.activation must be one of relu, softplus, tanh"):
        Conv4(INPUT, WAYS, activation="gelu")


# -- the protocols ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", PROTOCOLS)
def test_model_equals_reference_forward(norm):
    model, batch = tiny_conv4(norm), tiny_batch()
    params = dict(model.named_parameters())
    x_support, x_query = batch.x_support[0], batch.x_query[0]
    with torch.no_grad():
        for context in (None, x_support):
            torch.testing.assert_close(
                model(x_query, context=context),
                reference_forward(model, params, x_query, context),
                rtol=1e-12,
                atol=1e-12,
            )


def test_support_protocol_predicts_each_query_independently_of_the_others():
    model, batch = tiny_conv4("support"), tiny_batch()
    algo = MAML(model, TwoWayImages(), unroll(), no_meta_update, inner_lr=INNER_LR, inner_steps=MAML_STEPS)
    x_support, y_support, x_query = batch.x_support[0], batch.y_support[0], batch.x_query[0]
    with torch.no_grad():
        adapted = algo.adapt(algo.initial_params(), x_support, y_support, MAML_STEPS)
        together = algo.predict(adapted, x_query, context=x_support)
        one_at_a_time = torch.cat(
            [algo.predict(adapted, x_query[i : i + 1], context=x_support) for i in range(len(x_query))]
        )
        torch.testing.assert_close(one_at_a_time, together, rtol=1e-12, atol=1e-12)
        # the support set as its own context is the support set given as context
        torch.testing.assert_close(
            algo.predict(adapted, x_support),
            algo.predict(adapted, x_support, context=x_support),
            rtol=1e-12,
            atol=1e-12,
        )


def test_transductive_protocol_depends_on_the_batch():
    model, batch = tiny_conv4("transductive"), tiny_batch()
    params, x_support, x_query = dict(model.named_parameters()), batch.x_support[0], batch.x_query[0]
    with torch.no_grad():
        together = model(x_query, context=x_support)
        torch.testing.assert_close(together, model(x_query))  # context ignored
        halves = torch.cat([model(x_query[:3]), model(x_query[3:])])
    assert (halves - together).abs().max() > 1e-3
    torch.testing.assert_close(together, reference_forward(model, params, x_query, None))


def test_models_without_context_argument_are_called_on_x_alone():
    sequential = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, WAYS)).double()
    algo = MAML(sequential, TwoWayImages(), unroll(), no_meta_update)
    mlp = MLP(INPUT, WAYS).double()
    batch = tiny_batch()
    for model, owner in ((sequential, algo), (mlp, MAML(mlp, TwoWayImages(), unroll(), no_meta_update))):
        params = dict(model.named_parameters())
        torch.testing.assert_close(
            owner.predict(params, batch.x_query[0], context=batch.x_support[0]), model(batch.x_query[0])
        )


# -- MAML -------------------------------------------------------------------------------------------


def maml_loop_gradient(model: Conv4, batch: TaskBatch, second_order: bool) -> Params:
    """Mean query loss after MAML_STEPS inner SGD steps, task by task with torch.autograd."""
    params = dict(model.named_parameters())
    total = 0.0
    for t in range(batch.num_tasks):
        fast = dict(params)
        for _ in range(MAML_STEPS):
            loss = F.cross_entropy(reference_forward(model, fast, batch.x_support[t], None), batch.y_support[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
            fast = {k: v - INNER_LR * g for (k, v), g in zip(fast.items(), grads)}
        logits = reference_forward(model, fast, batch.x_query[t], batch.x_support[t])
        total = total + F.cross_entropy(logits, batch.y_query[t]) / batch.num_tasks
    return gradient(total, params)


@pytest.mark.parametrize("norm", PROTOCOLS)
@pytest.mark.parametrize("solver", [unroll(), first_order()], ids=["unroll", "first_order"])
def test_maml_vmapped_meta_gradient_equals_per_task_loop(norm, solver):
    model, batch = tiny_conv4(norm), tiny_batch()
    algo = MAML(model, TwoWayImages(), solver, no_meta_update, inner_lr=INNER_LR, inner_steps=MAML_STEPS)
    losses, _ = algo.meta_loss(batch)
    got = gradient(losses.mean(), algo.meta_parameters())
    expected = maml_loop_gradient(model, batch, second_order=not solver.first_order)
    assert_params_close(got, expected, rtol=1e-10)
    # a conv bias in front of a norm shifts a channel that the norm then centres: no effect on the loss
    scale = max(g.abs().max().item() for g in got.values())
    for key in conv_biases_before_norms(model):
        assert got[key].abs().max() < 1e-12 * scale, (key, got[key])


@pytest.mark.parametrize("norm", PROTOCOLS)
def test_maml_meta_gradient_equals_central_finite_differences(norm):
    model, batch = tiny_conv4(norm, activation="softplus"), tiny_batch(seed=1)
    algo = MAML(model, TwoWayImages(), unroll(), no_meta_update, inner_lr=INNER_LR, inner_steps=MAML_STEPS)
    params = algo.meta_parameters()
    got = gradient(algo.meta_loss(batch)[0].mean(), params)
    generator = torch.Generator().manual_seed(2)
    eps = 1e-5
    for _ in range(3):
        direction = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()}
        shifted = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                moved = {k: v + sign * eps * direction[k] for k, v in params.items()}
                shifted.append(
                    torch.stack(
                        [
                            F.cross_entropy(
                                reference_forward(model, adapted, batch.x_query[t], batch.x_support[t]),
                                batch.y_query[t],
                            )
                            for t, adapted in enumerate(sgd_adapt(model, moved, batch))
                        ]
                    ).mean()
                )
        numeric = (shifted[0] - shifted[1]) / (2 * eps)
        analytic = sum((got[k] * direction[k]).sum() for k in params)
        assert torch.isclose(analytic, numeric, rtol=1e-6, atol=1e-10), (analytic.item(), numeric.item())


def sgd_adapt(model: Conv4, params: Params, batch: TaskBatch) -> list[Params]:
    """MAML's inner loop per task, plain autograd, for the finite differences."""
    adapted = []
    for t in range(batch.num_tasks):
        fast = {k: v.detach().requires_grad_() for k, v in params.items()}
        for _ in range(MAML_STEPS):
            with torch.enable_grad():
                loss = F.cross_entropy(reference_forward(model, fast, batch.x_support[t], None), batch.y_support[t])
                grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {k: (v - INNER_LR * g).detach().requires_grad_() for (k, v), g in zip(fast.items(), grads)}
        adapted.append(fast)
    return adapted


# -- iMAML ------------------------------------------------------------------------------------------


def flat(params: Params) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()])


def unflat(vector: torch.Tensor, like: Params) -> Params:
    sizes = [v.numel() for v in like.values()]
    return {k: c.view(v.shape) for (k, v), c in zip(like.items(), vector.split(sizes))}


@functools.cache
def imaml_dense_systems(norm: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For tiny_conv4(norm) and tiny_batch(), per task: (I + H / lam, grad L_query(w*)) with H the dense Hessian of the support loss at
    w*, and w* from IMAML_STEPS of gradient descent on L_support(w) + lam/2 ||w - theta||^2."""
    model, batch = tiny_conv4(norm), tiny_batch()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    systems = []
    for t in range(batch.num_tasks):
        x_support, y_support = batch.x_support[t], batch.y_support[t]
        support_loss = lambda vector: F.cross_entropy(
            reference_forward(model, unflat(vector, theta), x_support, None), y_support
        )
        query_loss = lambda vector: F.cross_entropy(
            reference_forward(model, unflat(vector, theta), batch.x_query[t], x_support), batch.y_query[t]
        )
        w = flat(theta)
        for _ in range(IMAML_STEPS):
            w = w - IMAML_LR * (torch.autograd.functional.jacobian(support_loss, w) + LAM * (w - flat(theta)))
        hessian = torch.autograd.functional.hessian(support_loss, w)
        matrix = torch.eye(len(w), dtype=w.dtype) + hessian / LAM
        systems.append((matrix, torch.autograd.functional.jacobian(query_loss, w)))
    return systems


def neumann_series(matrix: torch.Tensor, b: torch.Tensor, terms: int, alpha: float) -> torch.Tensor:
    """alpha * sum_{j=0..terms} (I - alpha A)^j b, densely."""
    step = torch.eye(len(b), dtype=b.dtype) - alpha * matrix
    return alpha * sum(torch.linalg.matrix_power(step, j) @ b for j in range(terms + 1))


ORACLES = {
    "exact": (exact(), lambda A, g: torch.linalg.solve(A, g)),
    "cg": (cg(maxiter=30, tol=1e-14), lambda A, g: torch.linalg.solve(A, g)),
    "gmres": (gmres(maxiter=30, restart=30, tol=1e-14), lambda A, g: torch.linalg.solve(A, g)),
    "neumann": (neumann(terms=4, alpha=0.5), lambda A, g: neumann_series(A, g, terms=4, alpha=0.5)),
    "first_order": (first_order(), lambda A, g: g),
}


@pytest.mark.parametrize("norm", PROTOCOLS)
@pytest.mark.parametrize("name", list(ORACLES))
def test_imaml_meta_gradient_equals_dense_solve_per_task(norm, name):
    solver, oracle = ORACLES[name]
    model, batch = tiny_conv4(norm), tiny_batch()
    algo = IMAML(model, TwoWayImages(), solver, no_meta_update, lam=LAM, inner_lr=IMAML_LR, inner_steps=IMAML_STEPS)
    got, _, _ = algo.meta_gradient(batch)
    systems = imaml_dense_systems(norm)
    expected = unflat(sum(oracle(matrix, g) for matrix, g in systems) / len(systems), got)
    assert_params_close(got, expected, rtol=1e-9)
    scale = max(g.abs().max().item() for g in got.values())
    for key in conv_biases_before_norms(model):
        assert got[key].abs().max() < 1e-10 * scale, (key, got[key])
