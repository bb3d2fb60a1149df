"""Prototypical Networks: logits against distances computed by hand, the meta-gradient against autograd
on that hand computation, learning on the real Omniglot subset, and the refusal of regression tasks."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from metalab.algorithms import ProtoNet
from metalab.app.build import build
from metalab.errors import ConfigError
from metalab.hypergrad import first_order
from metalab.inference import Learner
from metalab.models import MLP, Conv4
from metalab.tasks.spec import TaskSpec
from metalab.types import TaskBatch
from tests.helpers.configs import OMNIGLOT, compose_config

WAYS, SHOTS, QUERY, TASKS, DIM = 3, 2, 4, 2, 4


def tiny(model: torch.nn.Module, input_shape: tuple[int, ...], lr: float = 0.0) -> ProtoNet:
    """ProtoNet on WAYS-way classification, its meta-optimizer SGD at ``lr``."""
    spec = TaskSpec(input_shape, WAYS, "classification")
    return ProtoNet(model, spec, first_order(), functools.partial(torch.optim.SGD, lr=lr))


def episodes(input_shape: tuple[int, ...]) -> TaskBatch:
    """TASKS float64 episodes of WAYS classes, labels shuffled per task."""
    generator = torch.Generator().manual_seed(0)

    def labels(count: int) -> torch.Tensor:
        return torch.stack([torch.arange(WAYS).repeat(count)[torch.randperm(WAYS * count, generator=generator)]])

    y_support = torch.cat([labels(SHOTS) for _ in range(TASKS)])
    y_query = torch.cat([labels(QUERY) for _ in range(TASKS)])
    x_support = torch.randn(TASKS, WAYS * SHOTS, *input_shape, generator=generator, dtype=torch.float64)
    x_query = torch.randn(TASKS, WAYS * QUERY, *input_shape, generator=generator, dtype=torch.float64)
    return TaskBatch(x_support, y_support, x_query, y_query)


def hand_logits(embed_support: torch.Tensor, embed_query: torch.Tensor, y_support: torch.Tensor) -> torch.Tensor:
    """-||f(x_q) - c_k||^2 with c_k the mean of class k's support embeddings, by loops."""
    prototypes = [embed_support[y_support == k].mean(0) for k in range(WAYS)]
    return torch.stack(
        [torch.stack([-((query - prototypes[k]) ** 2).sum() for k in range(WAYS)]) for query in embed_query]
    )


def mlp_embedding(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The hidden layer of MLP((DIM,), WAYS, hidden_sizes=(5,)), written out."""
    return torch.relu(x @ params["net.0.weight"].T + params["net.0.bias"])


def test_logits_are_negative_squared_distances_to_the_class_means():
    torch.manual_seed(0)
    model = MLP((DIM,), WAYS, hidden_sizes=(5,)).double()
    algorithm, batch = tiny(model, (DIM,)), episodes((DIM,))
    params = dict(model.named_parameters())
    for t in range(TASKS):
        got = algorithm.predict(algorithm.adapt(params, batch.x_support[t], batch.y_support[t], 0), batch.x_query[t])
        expected = hand_logits(
            mlp_embedding(params, batch.x_support[t]), mlp_embedding(params, batch.x_query[t]), batch.y_support[t]
        )
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        # what load_learner returns (float32): its adaptation computes the prototypes
        learner = Learner(tiny(copy.deepcopy(model).float(), (DIM,)), algorithm.tasks)
        logits = learner.adapt(batch.x_support[t].float(), batch.y_support[t]).logits(batch.x_query[t].float())
        torch.testing.assert_close(logits, expected.float(), rtol=1e-4, atol=1e-4)
    # evaluation (vmapped over the tasks) scores the same logits
    scores = algorithm.evaluate(batch)
    for t in range(TASKS):
        expected = hand_logits(
            mlp_embedding(params, batch.x_support[t]), mlp_embedding(params, batch.x_query[t]), batch.y_support[t]
        )
        torch.testing.assert_close(scores["loss"][t], F.cross_entropy(expected, batch.y_query[t]))
        assert scores["accuracy"][t].item() == pytest.approx(
            (expected.argmax(1) == batch.y_query[t]).double().mean().item()
        )


@pytest.mark.parametrize("norm", ["support", "transductive"])
def test_conv4_embeddings_follow_the_models_normalisation_protocol(norm):
    """The support set is normalised with its own statistics; the queries with the support set's
    (norm=support) or their own (norm=transductive), as the model's forward does."""
    torch.manual_seed(0)
    model = Conv4((1, 8, 8), WAYS, hidden_channels=3, blocks=2, norm=norm).double()
    algorithm, batch = tiny(model, (1, 8, 8)), episodes((1, 8, 8))
    params = dict(model.named_parameters())
    scores = algorithm.evaluate(batch)
    for t in range(TASKS):
        x_support, x_query = batch.x_support[t], batch.x_query[t]
        queries = model.embed(x_query) if norm == "transductive" else model.embed(x_query, context=x_support)
        expected = hand_logits(model.embed(x_support), queries, batch.y_support[t])
        got = algorithm.predict(algorithm.adapt(params, x_support, batch.y_support[t], 0), x_query, x_support)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(scores["loss"][t], F.cross_entropy(expected, batch.y_query[t]))


def test_a_training_step_follows_the_gradient_of_the_hand_written_loss():
    """With SGD at lr 1 the step is minus the meta-gradient: autograd on the mean over tasks of the
    query cross-entropy of the hand-written logits. The output layer gets no gradient and stays put."""
    torch.manual_seed(0)
    model = MLP((DIM,), WAYS, hidden_sizes=(5,)).double()
    algorithm, batch = tiny(model, (DIM,), lr=1.0), episodes((DIM,))
    before = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    loss = torch.stack(
        [
            F.cross_entropy(
                hand_logits(
                    mlp_embedding(before, batch.x_support[t]),
                    mlp_embedding(before, batch.x_query[t]),
                    batch.y_support[t],
                ),
                batch.y_query[t],
            )
            for t in range(TASKS)
        ]
    ).mean()
    grads = dict(zip(before, torch.autograd.grad(loss, list(before.values()), allow_unused=True)))
    metrics = algorithm.train_step(batch)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-12)
    for key, value in model.named_parameters():
        expected = before[key] if grads[key] is None else before[key] - grads[key]
        torch.testing.assert_close(value.detach(), expected.detach(), rtol=1e-12, atol=1e-12)
    assert grads["net.2.weight"] is None and grads["net.0.weight"].abs().sum() > 0


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"the Omniglot subset is not at {OMNIGLOT} (set METALAB_OMNIGLOT)")
def test_it_learns_5_way_1_shot_omniglot(tmp_path_factory):
    """Seeded, 30 steps of 4 episodes with an 8-channel Conv4: validation accuracy rises clearly
    above its start and well above chance (0.2)."""
    from metalab.tasks.episodic.omniglot import Omniglot

    tasks = Omniglot(root=str(OMNIGLOT), cache_dir=str(tmp_path_factory.mktemp("cache")), ways=5, shots=1, query=5)
    torch.manual_seed(0)
    model = Conv4(tasks.input_shape, tasks.output_dim, hidden_channels=8)
    algorithm = ProtoNet(model, tasks, first_order(), functools.partial(torch.optim.Adam, lr=3e-3))

    def accuracy() -> float:
        return algorithm.evaluate(tasks.sample(100, "val", tasks.generator(1)))["accuracy"].mean().item()

    start, generator = accuracy(), tasks.generator(0)
    for _ in range(30):
        algorithm.train_step(tasks.sample(4, "train", generator))
    end = accuracy()
    assert end > 0.45 and end > start + 0.15, (start, end)  # measured: 0.32 -> 0.56


def test_regression_tasks_are_refused_in_one_sentence():
    with pytest.raises(ConfigError) as refusal:
        build(compose_config(["algo=protonet", "tasks=sinusoid"]), torch.device("cpu"))
    sentence, _, partners = str(refusal.value).partition(", or give Sinusoid to algo=")
    assert sentence == (
        "algo=protonet trains on classification episodes, but Sinusoid yields regression episodes: pair "
        "algo=protonet with tasks=miniimagenet or omniglot"
    )
    # the algorithms named for Sinusoid are generated from what each declares: every episodic one but protonet
    named = set(partners.removesuffix(".").replace(" or ", ", ").split(", "))
    assert {"imaml", "lstm_optimizer", "maml", "pretrain"} <= named and not named & {"protonet", "auxilearn"}
