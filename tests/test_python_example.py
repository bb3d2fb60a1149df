"""Training from plain Python (docs/python.md): examples/train_from_python.py runs as a user runs it, and
a run built from Python objects loads back with load_learner, or is refused in one sentence naming the
object no config describes."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import metalab
from metalab.hypergrad import cg, unroll
from metalab.models import MLP
from metalab.tasks.episodic.sinusoid import Sinusoid
from tests.helpers.configs import REPO
from tests.helpers.scripts import assert_refused, run_script

EXAMPLE = REPO / "examples" / "train_from_python.py"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """(what the example printed last, as JSON; its run directory) of `python examples/train_from_python.py <dir>`."""
    run_dir = tmp_path_factory.mktemp("python") / "run"
    done = subprocess.run([sys.executable, str(EXAMPLE), str(run_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), run_dir


def mlp(params, x):
    """The MLP's forward written out: ReLU layers net.0, net.2, then the linear net.4."""
    for layer in (0, 2):
        x = torch.relu(x @ params[f"net.{layer}.weight"].T + params[f"net.{layer}.bias"])
    return x @ params["net.4.weight"].T + params["net.4.bias"]


def test_the_example_writes_a_run_that_results_json_and_its_evaluation_agree_on(example):
    printed, run_dir = example
    assert {p.name for p in run_dir.iterdir()} >= {"checkpoint.pt", "best.pt", "metrics.jsonl", "results.json"}
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["iteration"] == 60
    assert printed["test_mse"] == pytest.approx(results["test"]["mse"]["mean"], abs=1e-6)
    assert printed["evaluated_mse"] == pytest.approx(results["test"]["mse"]["mean"], abs=1e-6)
    config = results["config"]  # recorded from the objects, as the command line would have composed it
    assert config["algo"]["_target_"] == "metalab.algorithms.maml.MAML" and config["algo"]["inner_lr"] == 0.01
    assert config["trainer"]["meta_optimizer"] == {"_target_": "torch.optim.adam.Adam", "_partial_": True, "lr": 0.01}
    assert "unrebuildable" not in config


def test_scripts_evaluate_rebuilds_the_python_run_as_a_command_line_run(example):
    printed, run_dir = example
    done = run_script("evaluate", str(run_dir), "--num-tasks", "50", "--device", "cpu")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert json.loads((run_dir / "eval_test.json").read_text())["mse"]["mean"] == pytest.approx(
        printed["test_mse"], abs=1e-6
    )


def test_the_loaded_learner_adapts_as_an_explicit_sgd_loop_on_the_run_s_best_parameters(example):
    printed, run_dir = example
    assert printed["predictions"] == pytest.approx(printed["in_process_predictions"], abs=1e-6)
    saved = torch.load(run_dir / "best.pt", weights_only=False)["algorithm"]["meta_parameters"]
    x_support, x_query = (torch.tensor(printed[key]).unsqueeze(1) for key in ("x_support", "x_query"))
    y_support = torch.tensor(printed["y_support"])
    params = {k: v.detach().clone().requires_grad_() for k, v in saved.items()}
    for _ in range(10):  # eval_inner_steps SGD steps of inner_lr on the support MSE
        loss = ((mlp(params, x_support).squeeze(-1) - y_support) ** 2).mean()
        grads = torch.autograd.grad(loss, list(params.values()))
        params = {k: (p - 0.01 * g).detach().requires_grad_() for (k, p), g in zip(params.items(), grads)}
    expected = mlp(params, x_query).squeeze(-1).tolist()
    assert printed["predictions"] == pytest.approx(expected, abs=1e-5)


class TinyNet(nn.Module):
    """A user's own model: metalab records no constructor arguments for it."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.layers(x)


def train(run_dir, algorithm, tasks):
    """One meta-update and a tiny validation and test."""
    trainer = metalab.Trainer(
        algorithm, tasks, run_dir, iterations=1, meta_batch_size=2, eval_tasks=2, test_tasks=2, progress=False
    )
    trainer.fit()


def maml(model_of, meta_optimizer=functools.partial(torch.optim.Adam, lr=1e-3)):
    torch.manual_seed(0)
    tasks = Sinusoid(shots=5, query=5)
    return metalab.MAML(model_of(tasks), tasks, unroll(), meta_optimizer, inner_lr=0.01, inner_steps=1), tasks


SUPPORT, QUERY = torch.linspace(-5, 5, 5).unsqueeze(1), torch.linspace(-4, 4, 3).unsqueeze(1)


def predictions(learner):
    return learner.adapt(SUPPORT, torch.sin(SUPPORT.squeeze(1))).predict(QUERY)


@pytest.mark.parametrize(
    "model_of, meta_optimizer, words",
    [
        (lambda tasks: TinyNet(), torch.optim.Adam, ["the model TinyNet", "not a metalab class"]),
        (lambda tasks: MLP((1,), 1), lambda params: torch.optim.SGD(params, lr=0.1), ["meta-optimizer", "<lambda>"]),
    ],
    ids=["own model", "lambda meta-optimizer"],
)
def test_a_run_of_objects_no_config_describes_is_refused_in_one_sentence_then_loads_into_the_algorithm_passed(
    tmp_path, model_of, meta_optimizer, words
):
    algorithm, tasks = maml(model_of, meta_optimizer)
    train(tmp_path, algorithm, tasks)  # training itself does not need the description
    with pytest.raises(metalab.ConfigError) as refusal:
        metalab.load_learner(tmp_path, device="cpu")
    message = str(refusal.value)
    for word in [str(tmp_path), *words, "load_learner(run_dir, algorithm=...)"]:
        assert word in message
    assert "\n" not in message and message.endswith(".")
    done = run_script("evaluate", str(tmp_path), "--num-tasks", "2", "--device", "cpu")
    assert_refused(done.returncode, done.stderr, 2, "cannot rebuild", *words)
    again, _ = maml(model_of, meta_optimizer)  # built again as it was trained: loads, predicts as trained
    loaded = metalab.load_learner(tmp_path, algorithm=again)
    expected = predictions(metalab.Learner(algorithm, tasks.spec))
    assert torch.allclose(predictions(loaded), expected, atol=1e-6)


def test_an_algorithm_passed_that_does_not_fit_the_run_is_refused_naming_it(tmp_path):
    algorithm, tasks = maml(lambda tasks: TinyNet())
    train(tmp_path, algorithm, tasks)
    other, _ = maml(lambda tasks: TinyNet(hidden=4))
    with pytest.raises(metalab.ConfigError, match="MAML passed as algorithm .*: build the algorithm and its model as"):
        metalab.load_learner(tmp_path, algorithm=other)


def test_an_imaml_run_built_in_python_round_trips(tmp_path):
    torch.manual_seed(0)
    tasks = Sinusoid(shots=5, query=5)
    imaml = metalab.IMAML(
        MLP(tasks.input_shape, tasks.output_dim, hidden_sizes=[16]),
        tasks,
        cg(maxiter=3),
        functools.partial(torch.optim.Adam, lr=1e-3),
        lam=1.0,
        inner_steps=3,
    )
    train(tmp_path, imaml, tasks)
    loaded = metalab.load_learner(tmp_path, device="cpu")
    assert isinstance(loaded.algorithm, metalab.IMAML) and loaded.algorithm.lam == 1.0
    assert loaded.algorithm.solver == cg(maxiter=3)
    expected = predictions(metalab.Learner(imaml, tasks.spec))
    assert torch.allclose(predictions(loaded), expected, atol=1e-6)
