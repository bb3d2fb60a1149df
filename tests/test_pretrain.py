"""MAML's pretrained baseline: a training step against a hand-written gradient step of the joint
regression loss, evaluation against a hand-written fine-tuning loop, and the joint loss falling."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from metalab.algorithms import Pretrain
from metalab.hypergrad import first_order
from metalab.models import MLP
from metalab.tasks.episodic.sinusoid import Sinusoid
from metalab.types import TaskBatch

INNER_LR, LR = 0.05, 0.1


def make(lr: float = LR, dtype: torch.dtype = torch.float64, **kwargs) -> tuple[Pretrain, MLP, Sinusoid]:
    torch.manual_seed(0)
    model = MLP((1,), 1, hidden_sizes=(8, 8)).to(dtype)
    tasks = Sinusoid(shots=5, query=6, eval_query=7)
    algorithm = Pretrain(model, tasks, first_order(), functools.partial(torch.optim.SGD, lr=lr), **kwargs)
    return algorithm, model, tasks


def as_double(batch: TaskBatch) -> TaskBatch:
    return TaskBatch(*(t.double() for t in (batch.x_support, batch.y_support, batch.x_query, batch.y_query)))


def mse(model: MLP, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(torch.func.functional_call(model, params, (x,)).squeeze(-1), y)


def test_a_training_step_is_a_gradient_step_of_the_mean_loss_over_all_examples():
    algorithm, model, tasks = make()
    batch = as_double(tasks.sample(4, "train", tasks.generator(0)))
    before = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    x = torch.cat([batch.x_support, batch.x_query], 1).flatten(0, 1)  # every example of the batch, [B * (S + Q), 1]
    y = torch.cat([batch.y_support, batch.y_query], 1).flatten()
    loss = mse(model, before, x, y)
    grads = torch.autograd.grad(loss, list(before.values()))
    metrics = algorithm.train_step(batch)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-12)
    for (key, value), grad in zip(before.items(), grads):
        torch.testing.assert_close(dict(model.named_parameters())[key].detach(), value.detach() - LR * grad)


def test_evaluation_fine_tunes_with_sgd_as_a_hand_written_loop():
    """After 1, 3 and 4 SGD steps on one task's support set, its query MSE as a loop computes it;
    the meta-parameters are left as they were."""
    algorithm, model, tasks = make(inner_lr=INNER_LR, eval_inner_steps=4, report_steps=[1, 3])
    batch = as_double(tasks.sample(3, "test", tasks.generator(1)))
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    scores = algorithm.evaluate(batch)
    for t in range(batch.num_tasks):
        params, expected = {k: v.clone().requires_grad_() for k, v in theta.items()}, {}
        for step in range(1, 5):
            loss = mse(model, params, batch.x_support[t], batch.y_support[t])
            grads = torch.autograd.grad(loss, list(params.values()))
            params = {k: (v - INNER_LR * g).detach().requires_grad_() for (k, v), g in zip(params.items(), grads)}
            expected[step] = mse(model, params, batch.x_query[t], batch.y_query[t]).item()
        for key, step in (("mse@1", 1), ("mse@3", 3), ("mse", 4), ("loss", 4)):
            assert scores[key][t].item() == pytest.approx(expected[step], rel=1e-10), (key, t)
    for key, value in model.named_parameters():
        torch.testing.assert_close(value.detach(), theta[key], rtol=0, atol=0)


def test_the_joint_regression_loss_falls():
    """Seeded, 150 Adam steps of 25 sinusoids: measured 3.9 -> 3.0, towards the error of the best single
    function, E[y | x] = -(2/pi) E[A] cos x (about 2.9)."""
    torch.manual_seed(0)
    model = MLP((1,), 1, hidden_sizes=(40, 40))
    tasks = Sinusoid(shots=10, query=10)
    algorithm = Pretrain(model, tasks, first_order(), functools.partial(torch.optim.Adam, lr=1e-2))
    generator = tasks.generator(0)
    losses = [algorithm.train_step(tasks.sample(25, "train", generator))["loss"] for _ in range(150)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.85 * first and last < 3.3, (first, last)
