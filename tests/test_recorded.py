"""metalab.recorded: the config a Trainer records for objects built in Python names each argument given,
passes the schema a command-line config passes, and builds objects called with the same arguments."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from metalab import IMAML, MAML, Trainer
from metalab.app.build import build
from metalab.app.schema import validate_config
from metalab.hypergrad import cg, first_order, unroll
from metalab.models import MLP
from metalab.recorded import Undescribed, describe
from metalab.tasks.episodic.sinusoid import Sinusoid


def graph(algorithm_class, solver, **hyperparameters):
    tasks = Sinusoid(4, 3, eval_query=7)  # shots and query given positionally
    model = MLP(tasks.input_shape, tasks.output_dim, hidden_sizes=(8, 8))
    adam = functools.partial(torch.optim.Adam, lr=0.003, betas=(0.8, 0.9))
    return algorithm_class(model, tasks, solver, adam, grad_clip_norm=2.0, **hyperparameters), tasks


@pytest.mark.parametrize(
    "algorithm_class, solver, hyperparameters",
    [
        (MAML, first_order(), {"inner_lr": 0.05, "eval_inner_steps": 3, "report_steps": (1, 2)}),
        (IMAML, cg(maxiter=2), {"lam": 0.5}),
    ],
    ids=["maml", "imaml"],
)
def test_the_recorded_config_passes_the_schema_and_builds_objects_called_with_the_same_arguments(
    tmp_path, algorithm_class, solver, hyperparameters
):
    algorithm, tasks = graph(algorithm_class, solver, **hyperparameters)
    config = Trainer(algorithm, tasks, tmp_path, iterations=5, meta_batch_size=2, seed=3).config  # no config given
    assert "unrebuildable" not in config
    validate_config(config)  # the wiring left out is what app.schema says metalab passes itself
    assert config["tasks"] == {
        "_target_": "metalab.tasks.episodic.sinusoid.Sinusoid",
        "shots": 4,
        "query": 3,
        "eval_query": 7,
    }
    assert config["model"] == {"_target_": "metalab.models.mlp.MLP", "_partial_": True, "hidden_sizes": [8, 8]}
    assert config["trainer"]["meta_optimizer"] == {
        "_target_": "torch.optim.adam.Adam",
        "_partial_": True,
        "lr": 0.003,
        "betas": [0.8, 0.9],
    }
    assert config["trainer"]["grad_clip_norm"] == 2.0 and config["seed"] == 3
    assert config["trainer"]["iterations"] == 5 and config["trainer"]["eval_batch_size"] == 100
    rebuilt_tasks, rebuilt = build(OmegaConf.create(config), torch.device("cpu"))  # as load_run does
    assert type(rebuilt) is algorithm_class and rebuilt.solver == solver
    for original, again in ((tasks, rebuilt_tasks), (algorithm.model, rebuilt.model)):
        assert {k: v for k, v in again.recorded_arguments.items() if k != "device"} == {
            k: v for k, v in original.recorded_arguments.items() if k != "device"
        }
    for key, value in hyperparameters.items():
        assert rebuilt.recorded_arguments[key] == describe(value)
    assert list(rebuilt.optimizer.defaults["betas"]) == [0.8, 0.9] and rebuilt.optimizer.defaults["lr"] == 0.003


def test_the_learned_optimizer_records_the_arguments_its_family_subclass_is_built_with():
    """LSTMOptimizer(...) builds the subclass of the sampler's kind in __new__: the arguments still reach the
    recording, so a rebuild keeps settings that change no weight's shape (output_scale, preprocess)."""
    from metalab import LSTMOptimizer
    from metalab.tasks.optimizees.quadratic import Quadratic

    tasks = Quadratic(dim=3)
    model = MLP(tasks.input_shape, tasks.output_dim, hidden_sizes=[2])
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    algorithm = LSTMOptimizer(model, tasks, first_order(), adam, hidden_size=7, output_scale=0.5, preprocess=None)
    assert type(algorithm).__name__ == "OptimizeeLSTMOptimizer"
    recorded = algorithm.recorded_arguments
    assert (recorded["hidden_size"], recorded["output_scale"], recorded["preprocess"]) == (7, 0.5, None)


def test_positional_arguments_are_named_as_the_base_class_names_them():
    algorithm, tasks = graph(MAML, unroll())
    assert tasks.recorded_arguments == {"shots": 4, "query": 3, "eval_query": 7}
    recorded = algorithm.recorded_arguments
    assert list(recorded)[:4] == ["model", "tasks", "solver", "meta_optimizer"]
    assert isinstance(recorded["model"], Undescribed) and recorded["solver"] == {"_target_": "metalab.hypergrad.unroll"}


@pytest.mark.parametrize(
    "value, expected",
    [
        ((1, [2.0, None]), [1, [2.0, None]]),
        (Path("data/omniglot"), "data/omniglot"),
        (torch.optim.SGD, {"_target_": "torch.optim.sgd.SGD", "_partial_": True}),
        (cg(tol=1e-6), {"_target_": "metalab.hypergrad.cg", "maxiter": 5, "tol": 1e-6, "damping": 0.0}),
        (lambda params: None, "<lambda>"),
        (torch.zeros(2), "a Tensor"),
        (functools.partial(torch.optim.SGD, lr=torch.tensor(0.1)), "a Tensor"),
        ({"a": [torch.zeros(1)]}, "a Tensor"),
    ],
    ids=["plain", "path", "class", "solver", "lambda", "tensor", "partial of a tensor", "nested"],
)
def test_describe(value, expected):
    described = describe(value)
    assert described == expected
    assert isinstance(described, Undescribed) == (isinstance(expected, str) and not isinstance(value, Path))
