"""The memory check sizes every sampler kind (episodes, optimisation problems, data with auxiliary
tasks) and the learned optimizer's LSTM rule from the config, and refuses a configuration in one
sentence before the model, the algorithm or any batch is allocated. The estimate's parts are checked
against the bytes of real objects (a sampled batch, an LSTM's parameters and state, an nn.Sequential)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import metalab.app.build as build_module
import metalab.app.memory as memory
from metalab.app.build import make_trainer
from metalab.errors import ConfigError
from metalab.optim.lstm_rule import CoordinatewiseLSTM
from metalab.tasks.optimizees.mnist_mlp import MnistMLP
from metalab.tasks.optimizees.quadratic import Quadratic
from tests.helpers.configs import TINY, compose_config
from tests.helpers.mnist import MNIST_OVERRIDES, mnist_or_skip
from tests.helpers.runs import run_train

MiB = 2**20
FREE = 16 * MiB  # below 32 MiB the sentences state MiB
LSTM = ["algo=lstm_optimizer"]


@pytest.fixture
def nothing_allocated(monkeypatch):
    """Fails the test if the model or the algorithm (with its LSTM rule) is built: a refusal must come first."""

    def built(*args, **kwargs):
        raise AssertionError("the model or the algorithm was built before the memory check refused")

    monkeypatch.setattr(build_module, "_call", built)


def refusal(overrides, tmp_path) -> str:
    cfg = compose_config([*TINY, *overrides])
    with pytest.raises(ConfigError) as raised:
        make_trainer(cfg, tmp_path / "run")
    message = str(raised.value)
    assert "\n" not in message and message.endswith(".") and "need" in message, message
    return message


def test_a_quadratic_batch_is_sized_as_the_tensors_it_samples():
    cfg = compose_config([*LSTM, "tasks=quadratic", "tasks.dim=7", "trainer.meta_batch_size=3"])
    train, _ = Quadratic.footprints(cfg.tasks, cfg.trainer)
    batch = Quadratic(dim=7).sample(3, "train", torch.Generator().manual_seed(0))
    sampled = batch.params.nbytes + sum(tensor.nbytes for tensor in batch.data.values())
    assert train.units * (train.parameters + train.elements) * 4 == sampled


@pytest.mark.parametrize("hidden_sizes", [[20], [40], [20, 20], [3, 5, 7]])
def test_an_mnist_problem_has_the_parameters_of_its_mlp(hidden_sizes):
    cfg = compose_config([*LSTM, "tasks=mnist_mlp", f"tasks.hidden_sizes={hidden_sizes}"])
    train, evaluation = MnistMLP.footprints(cfg.tasks, cfg.trainer)
    widths = [784, *hidden_sizes, 10]
    oracle = nn.Sequential(*(nn.Linear(a, b, device="meta") for a, b in zip(widths[:-1], widths[1:])))
    assert train.parameters == evaluation.parameters == sum(p.numel() for p in oracle.parameters())
    assert train.units == cfg.trainer.meta_batch_size
    assert evaluation.units == min(cfg.trainer.eval_batch_size, max(cfg.trainer.eval_tasks, cfg.trainer.test_tasks))


@pytest.mark.parametrize("hidden_size, num_layers, preprocess", [(20, 2, 10.0), (7, 1, None), (5, 3, 10.0)])
def test_the_lstm_rule_is_sized_as_its_weights_and_state(hidden_size, num_layers, preprocess):
    algo = compose_config(
        [
            *LSTM,
            f"algo.hidden_size={hidden_size}",
            f"algo.num_layers={num_layers}",
            f"algo.preprocess={preprocess or 'null'}",
        ]
    ).algo
    rule = memory.rule_footprint(algo)
    real = CoordinatewiseLSTM(hidden_size, num_layers, preprocess)
    assert rule.parameters == sum(p.numel() for p in real.parameters())
    state = real.initial_state(13)
    assert 13 * rule.per_coordinate * 4 == state.hidden.nbytes + state.cell.nbytes
    assert memory.rule_footprint(compose_config([]).algo) is None  # maml keeps no rule


def test_the_estimate_is_its_parts_refused_one_byte_below(monkeypatch, tmp_path):
    """quadratic (n = 50) with the rule: model 4 x P, rule 4 x its weights, and per problem theta, W, y and
    the rule's state of theta's coordinates, all float32; accepted at the estimate, refused one byte below."""
    overrides = [*LSTM, "tasks=quadratic", "tasks.dim=50", "trainer.meta_batch_size=5"]  # eval: 4
    cfg = compose_config([*TINY, *overrides])
    model = sum(p.numel() for p in nn.Sequential(nn.Linear(50, 40), nn.Linear(40, 40), nn.Linear(40, 1)).parameters())
    rule = sum(p.numel() for p in CoordinatewiseLSTM(20, 2, 10.0).parameters())
    problem = 50 + 50 * 50 + 50 + 50 * (2 * 2 * 20)
    estimate = 4 * (4 * model + 4 * rule + cfg.trainer.meta_batch_size * problem)
    monkeypatch.setattr(memory, "available_bytes", lambda device: estimate)
    make_trainer(cfg, tmp_path / "fits")
    monkeypatch.setattr(memory, "available_bytes", lambda device: estimate - 1)
    assert "trainer.meta_batch_size=5 problems of dimension 50" in refusal(overrides, tmp_path)


ORDINARY = [  # sizes a machine with 16 MiB free cannot hold
    (
        [*LSTM, "tasks=quadratic", "tasks.dim=2000"],
        ["trainer.meta_batch_size=2 problems of dimension 2000", "tasks.dim"],
    ),
    ([*LSTM, "tasks=quadratic", "algo.hidden_size=1000"], ["the LSTM rule has 12,", "algo.hidden_size"]),
    ([*LSTM, "tasks=mnist_mlp", "trainer.meta_batch_size=100"], ["trainer.meta_batch_size=100 problems of 15,910"]),
    (["algo=auxilearn", "tasks=aux_mnist", "trainer.meta_batch_size=100000"], ["=100000 examples in 2 views"]),
    (["tasks=sinusoid", "trainer.meta_batch_size=100000"], ["=100000 episodes of 20 examples on a model of 1,761"]),
]
ABSURD = [  # sizes no machine holds, against the real free memory
    ([*LSTM, "tasks=quadratic", "tasks.dim=1000000"], ["trainer.meta_batch_size=2 problems of dimension 1000000"]),
    ([*LSTM, "tasks=mnist_mlp", "tasks.hidden_sizes=[100000000000]"], ["problems of 79,500,000,000,010 parameters"]),
    (
        [*LSTM, "tasks=mnist_mlp", "tasks.hidden_sizes=[100000000000,100000000000]"],  # 10^22: no overflow
        ["problems of 10,000,000,079,600,000,000,010 parameters"],
    ),
    ([*LSTM, "tasks=mnist_mlp", "trainer.meta_batch_size=1000000000"], ["trainer.meta_batch_size=1000000000"]),
    (["algo=auxilearn", "tasks=aux_mnist", "trainer.meta_batch_size=1000000000"], ["=1000000000 examples"]),
    ([*LSTM, "tasks=quadratic", "algo.hidden_size=10000000"], ["the LSTM rule has 1,200,000,250,000,001 param"]),
    ([*LSTM, "tasks=sinusoid", "algo.hidden_size=100000"], ["the LSTM rule has"]),
]


def with_data(overrides):
    if any(o in overrides for o in ("tasks=mnist_mlp", "tasks=aux_mnist")):
        mnist_or_skip()
        return [*overrides, *MNIST_OVERRIDES]
    return overrides


@pytest.mark.parametrize("overrides, words", ORDINARY, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_ordinary_sizes_beyond_the_free_memory_are_refused_before_allocation(
    overrides, words, monkeypatch, nothing_allocated, tmp_path
):
    monkeypatch.setattr(memory, "available_bytes", lambda device: FREE)
    message = refusal(with_data(overrides), tmp_path)
    assert all(word in message for word in words) and "but cpu has 16 MiB free: lower " in message, message


@pytest.mark.parametrize("overrides, words", ABSURD, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_absurd_sizes_are_refused_against_the_real_free_memory(overrides, words, nothing_allocated, tmp_path):
    message = refusal(with_data(overrides), tmp_path)
    assert all(word in message for word in words) and "GiB" in message and " free: lower " in message, message


@pytest.mark.parametrize(
    "overrides",
    [
        [*LSTM, "tasks=quadratic"],
        [*LSTM, "tasks=mnist_mlp"],
        ["algo=auxilearn", "tasks=aux_mnist"],
        ["tasks=sinusoid"],
        ["algo=auxilearn", "tasks=aux_toy"],
    ],
)
def test_the_shipped_sizes_are_accepted(overrides, tmp_path):
    """The shipped batch sizes (not TINY's), against the real free memory."""
    cfg = compose_config([*with_data(overrides), "trainer.device=cpu", "trainer.progress=false"])
    assert make_trainer(cfg, tmp_path / "run").meta_batch_size == cfg.trainer.meta_batch_size


def test_the_command_line_prints_the_sentence_and_exits_2(tmp_path):
    done = run_train([*LSTM, "tasks=quadratic", "tasks.dim=1000000", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: trainer.meta_batch_size=25 problems of dimension 1000000"), done.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_sizes_beyond_a_float_are_still_stated():
    assert memory._gb(10**400) == f"about 10^{math.floor(400 - 30 * math.log10(2))} GiB"


def test_the_toy_data_is_sized_as_the_tensors_it_holds():
    cfg = compose_config(["algo=auxilearn", "tasks=aux_toy", "tasks.dim=7", "tasks.train_size=30"])
    from metalab.tasks.auxiliary.toy import AuxToy

    sampler = AuxToy(dim=7, train_size=30)
    held = sum(t.numel() for split in sampler.data.values() for t in split.values())
    assert AuxToy.data_elements(cfg.tasks) == held + sampler.beta.numel() + sampler.gamma.numel()


@pytest.mark.parametrize("size", ["tasks.dim=100000000000", "tasks.dim=30000000", "tasks.train_size=100000000000"])
def test_toy_data_beyond_the_free_memory_is_refused_before_the_sampler_is_built(size, tmp_path, monkeypatch):
    from metalab.tasks.auxiliary.toy import AuxToy

    @functools.wraps(AuxToy.__init__)  # the same signature, for the schema
    def built(*args, **kwargs):
        pytest.fail("the sampler was built before the check")

    monkeypatch.setattr(AuxToy, "__init__", built)
    message = refusal(["algo=auxilearn", "tasks=aux_toy", size], tmp_path)
    assert message.startswith("the data of tasks=AuxToy needs at least ") and "lower its sizes" in message


def test_an_allocation_that_fails_while_building_is_one_sentence_naming_the_group(tmp_path):
    """The combiner's own network: no estimate covers it, but a failed allocation still ends in a sentence."""
    cfg = compose_config(
        [*TINY, "algo=auxilearn", "tasks=aux_toy", "algo.combiner=nonlinear", "algo.hidden_sizes=[10**11]"]
    )
    cfg.algo.hidden_sizes = [10**11]
    with pytest.raises(ConfigError, match=r"^building algo needs more memory than there is \(.*allocate") as raised:
        make_trainer(cfg, tmp_path / "run")
    assert "\n" not in str(raised.value) and "lower the algo group's sizes" in str(raised.value)
