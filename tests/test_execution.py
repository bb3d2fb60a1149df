"""Every execution an episodic algorithm offers (full vmap, vmap in chunks that do and do not divide the
meta-batch, a per-task loop, with torch's fused batch norm where the algorithm allows it, the adaptation
vmapped and the query scored one task at a time where the step is staged, each with and without the
channels layout) applies the meta-gradient of a per-task loop written out here with torch.autograd
through the model's own batch norm, in float64, to 1e-10: MAML (second and first order), ANIL, iMAML
(cg), Reptile (its update theta - mean(phi)) and Prototypical Networks, under both batch-norm protocols."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalab.algorithms import ANIL, IMAML, MAML, ProtoNet, Reptile
from metalab.algorithms.execution import Execution, Staged
from metalab.hypergrad import cg, first_order, unroll
from metalab.models import Conv4
from metalab.tasks.spec import TaskSpec
from metalab.types import TaskBatch

WAYS, SHOTS, QUERY, TASKS, SHAPE = 3, 1, 2, 6, (1, 16, 16)
INNER_LR, STEPS = 0.3, 2
#: iMAML: a proximal term strong enough that I + H / LAM stays positive definite on this tiny batch-norm
#: network (CG's premise), and steps small enough that its guarded inner loop takes every one
LAM, IMAML_LR = 200.0, 0.002


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny float64 convolutions run fastest, and steadiest on a shared machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def episodes() -> TaskBatch:
    generator = torch.Generator().manual_seed(0)

    def labels(count: int) -> torch.Tensor:
        return torch.stack([torch.randperm(WAYS, generator=generator).repeat(count) for _ in range(TASKS)])

    def images(count: int) -> torch.Tensor:
        return torch.rand(TASKS, WAYS * count, *SHAPE, generator=generator, dtype=torch.float64)

    return TaskBatch(images(SHOTS), labels(SHOTS), images(QUERY), labels(QUERY))


def build(cls, solver, norm="support", **kwargs):
    """The algorithm on a tiny float64 Conv4 (batch-norm protocol ``norm``), its meta-optimizer SGD at
    rate 0: ``train_step`` leaves the meta-gradient it applied in each parameter's .grad."""
    torch.manual_seed(0)
    model = Conv4(SHAPE, WAYS, hidden_channels=2, norm=norm).double()
    spec = TaskSpec(SHAPE, WAYS, "classification")
    return cls(model, spec, solver, functools.partial(torch.optim.SGD, lr=0.0), **kwargs)


def applied_gradient(algo) -> list[torch.Tensor]:
    algo.train_step(episodes())
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in algo.model.parameters()]


def forward(model, params, x, context=None):
    return functional_call(model, params, (x,), {"context": context})


def sgd_by_hand(model, params, x, y, keys, steps, graph, lr=INNER_LR):
    """``steps`` SGD steps on one task's support loss over the parameters ``keys``; with ``graph`` the
    steps stay differentiable (second order), else their gradients are constants."""
    for _ in range(steps):
        loss = F.cross_entropy(forward(model, params, x), y)
        grads = torch.autograd.grad(loss, [params[k] for k in keys], create_graph=graph)
        params = {**params, **{k: params[k] - lr * g for k, g in zip(keys, grads)}}
    return params


def maml_by_hand(algo, batch, keys, graph):
    theta = dict(algo.model.named_parameters())
    total = 0.0
    for t in range(TASKS):
        fast = sgd_by_hand(algo.model, theta, batch.x_support[t], batch.y_support[t], keys, STEPS, graph)
        total = total + F.cross_entropy(
            forward(algo.model, fast, batch.x_query[t], batch.x_support[t]), batch.y_query[t]
        )
    return list(torch.autograd.grad(total / TASKS, list(theta.values()), allow_unused=True))


def imaml_by_hand(algo, batch):
    """The mean over tasks of (I + H / lam)^{-1} grad L_query(w), H the dense Hessian of the support loss
    at w, and w from gradient descent on the proximal objective."""
    model, theta = algo.model, {k: v.detach() for k, v in algo.model.named_parameters()}
    shapes = {k: v.shape for k, v in theta.items()}

    def unflat(vector):
        parts = torch.split(vector, [shape.numel() for shape in shapes.values()])
        return {k: part.view(shapes[k]) for k, part in zip(shapes, parts)}

    flat_theta = torch.cat([v.flatten() for v in theta.values()])
    total = torch.zeros_like(flat_theta)
    for t in range(TASKS):
        x, y, xq, yq = batch.x_support[t], batch.y_support[t], batch.x_query[t], batch.y_query[t]
        w = flat_theta.clone()
        for _ in range(STEPS):
            w = w.requires_grad_()
            objective = F.cross_entropy(forward(model, unflat(w), x), y) + 0.5 * LAM * ((w - flat_theta) ** 2).sum()
            w = (w - IMAML_LR * torch.autograd.grad(objective, w)[0]).detach()
        hessian = torch.func.hessian(lambda v: F.cross_entropy(forward(model, unflat(v), x), y))(w)
        wq = w.clone().requires_grad_()
        outer = torch.autograd.grad(F.cross_entropy(forward(model, unflat(wq), xq, x), yq), wq)[0]
        total += torch.linalg.solve(torch.eye(len(w), dtype=w.dtype) + hessian / LAM, outer)
    return list(unflat(total / TASKS).values())


def reptile_by_hand(algo, batch):
    theta = {k: v.detach().requires_grad_() for k, v in algo.model.named_parameters()}
    phis = [
        sgd_by_hand(algo.model, theta, batch.x_support[t], batch.y_support[t], list(theta), STEPS, False)
        for t in range(TASKS)
    ]
    return [theta[k].detach() - torch.stack([phi[k].detach() for phi in phis]).mean(0) for k in theta]


def protonet_by_hand(algo, batch):
    model, total = algo.model, 0.0
    for t in range(TASKS):
        support = model.embed(batch.x_support[t])
        prototypes = torch.stack([support[batch.y_support[t] == k].mean(0) for k in range(WAYS)])
        query = model.embed(batch.x_query[t], batch.x_support[t])
        logits = -((query.unsqueeze(1) - prototypes.unsqueeze(0)) ** 2).sum(-1)
        total = total + F.cross_entropy(logits, batch.y_query[t])
    return list(torch.autograd.grad(total / TASKS, list(model.parameters()), allow_unused=True))


HEAD = ["head.weight", "head.bias"]
CASES = {
    "maml": (
        lambda norm="support": build(MAML, unroll(), norm=norm, inner_lr=INNER_LR, inner_steps=STEPS),
        lambda a, b: maml_by_hand(a, b, list(dict(a.model.named_parameters())), True),
    ),
    "fomaml": (
        lambda norm="support": build(MAML, first_order(), norm=norm, inner_lr=INNER_LR, inner_steps=STEPS),
        lambda a, b: maml_by_hand(a, b, list(dict(a.model.named_parameters())), False),
    ),
    "anil": (
        lambda norm="support": build(ANIL, unroll(), norm=norm, inner_lr=INNER_LR, inner_steps=STEPS),
        lambda a, b: maml_by_hand(a, b, HEAD, True),
    ),
    "imaml": (
        lambda norm="support": build(
            IMAML, cg(maxiter=20, tol=1e-14), norm=norm, inner_lr=IMAML_LR, inner_steps=STEPS, lam=LAM
        ),
        imaml_by_hand,
    ),
    "reptile": (
        lambda norm="support": build(Reptile, first_order(), norm=norm, inner_lr=INNER_LR, inner_steps=STEPS),
        reptile_by_hand,
    ),
    "protonet": (lambda norm="support": build(ProtoNet, first_order(), norm=norm), protonet_by_hand),
}
#: under transductive statistics the query's forward pass runs torch's fused batch norm in every execution
#: (``query_differentiated_once``), which the hand-written loops (the model's own norm) check
CASES.update(
    {f"{name}-transductive": (functools.partial(make, "transductive"), by) for name, (make, by) in CASES.items()}
)


@pytest.mark.parametrize("case", list(CASES))
def test_every_execution_applies_the_per_task_loops_meta_gradient(case):
    make, by_hand = CASES[case]
    algo = make()
    expected = [
        g if g is not None else torch.zeros_like(p) for g, p in zip(by_hand(algo, episodes()), algo.model.parameters())
    ]
    assert any(g.abs().max() > 1e-6 for g in expected)  # an oracle that can tell executions apart
    executions = algo.executions(episodes())
    names = [execution.name for execution in executions]
    loop = "loop+fused_norm" if algo.fused_norm_ok else "loop"  # torch's batch norm: at most 2nd derivatives
    assert {"vmap", "vmap/2", "vmap/4", loop, "vmap/4+channels_last", f"{loop}+channels_last"} <= set(names)
    assert ("vmap+query_loop+channels_last" in names) == algo.staged_step  # MAML's and ANIL's adapt-then-score
    for execution in executions:  # vmap/2 divides the meta-batch of 6, vmap/4 does not
        algo = make()
        algo.use(execution)
        for got, want, (key, _) in zip(applied_gradient(algo), expected, algo.model.named_parameters()):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{execution.name}: {key}")


@pytest.mark.parametrize("once", [True, False])
def test_the_query_norm_is_torchs_fused_one_where_the_query_loss_is_differentiated_once(monkeypatch, once):
    """Under transductive statistics a vmapped MAML step normalises the query batch with torch's batch
    norm (one call per block) where ``query_differentiated_once``; without it, never."""
    algo = CASES["maml-transductive"][0]()
    monkeypatch.setattr(algo, "query_differentiated_once", once)
    calls = []
    original = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    algo.train_step(episodes())
    assert len(calls) == (4 if once else 0)  # Conv4's four blocks, the query's forward pass once under vmap


@pytest.mark.parametrize("execution", [Execution(layout=True, loop=True), Execution(layout=True, query_loop=True)])
def test_the_channels_layout_reaches_one_channel_images_activations(execution):
    """One-channel images (Omniglot's) have default strides that either layout describes; laid out
    channels-last their first convolution's output is channels-last too, so every later layer runs in
    that layout (left in the default one, oneDNN copies each activation in the backward pass)."""
    seen = []

    def score(adapted, x_support, x_query, y_query):
        seen.append(F.conv2d(x_query, adapted, padding=1).is_contiguous(memory_format=torch.channels_last))
        return x_query.sum()

    def adapt(x_support, y_support):
        return torch.ones(4, 1, 3, 3, dtype=x_support.dtype)

    batch = episodes()
    execution.run(Staged(adapt, score), batch.x_support, batch.y_support, batch.x_query, batch.y_query)
    assert seen == [True] * TASKS
