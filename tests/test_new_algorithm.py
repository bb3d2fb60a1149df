"""A new algorithm is one .py and one .yaml: a throw-away plugin (one first-order MAML step, written
against the Algorithm contract alone) in a temporary folder on sys.path, and its configs/algo/<name>.yaml
in a temporary config folder on Hydra's search path. It trains through make_trainer exactly as
FOMAML does, and the sentences that refuse a mismatched pair name it, generated from what it declares;
no file of the repository is touched."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from metalab.app.build import build, make_trainer
from metalab.checkpoint import read_run
from metalab.errors import ConfigError
from tests.helpers.configs import compose_config, listed
from tests.helpers.runs import ROOT, run_train

PLUGIN = '''
"""One first-order MAML step per task (Finn et al. 2017, FOMAML), as a metalab algorithm plugin."""
from __future__ import annotations

from torch.func import grad

from metalab.algorithms.episodic import EpisodicAlgorithm


class OneStepFOMAML(EpisodicAlgorithm):
    name = "first_step"
    solvers = ("first_order",)

    def adapt(self, params, x_support, y_support, steps, on_step=None):
        for step in range(steps):
            if on_step is not None:
                on_step(step, params)
            grads = grad(self.support_loss)(params, x_support, y_support)
            params = {k: p - self.inner_lr * grads[k].detach() for k, p in params.items()}
        if on_step is not None:
            on_step(steps, params)
        return params

    def train_step(self, batch):
        start = self.initial_params()

        def per_task(x_support, y_support, x_query, y_query):
            adapted = self.adapt(start, x_support, y_support, self.inner_steps)
            loss, metric = self.query_scores(adapted, x_query, y_query, x_support)
            return loss, metric.detach()

        losses, metrics = self.over_tasks(per_task, batch)
        return self.step_report(losses, metrics, self.meta_step(losses.mean()))
'''

CONFIG = """# @package _global_
defaults:
  - override /solver: first_order
algo:
  _target_: one_step_plugin.OneStepFOMAML
  _partial_: true
  inner_lr: 0.01
  inner_steps: 1
  eval_inner_steps: 10
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """(the folder of the plugin's .py, the override that puts its .yaml on Hydra's search path)."""
    code, algo_configs = tmp_path / "code", tmp_path / "configs" / "algo"
    code.mkdir()
    algo_configs.mkdir(parents=True)
    (code / "one_step_plugin.py").write_text(PLUGIN)
    (algo_configs / "first_step.yaml").write_text(CONFIG)
    monkeypatch.syspath_prepend(str(code))
    yield code, f"hydra.searchpath=[file://{tmp_path / 'configs'}]"
    sys.modules.pop("one_step_plugin", None)


def test_a_plugin_algorithm_trains_as_fomaml_does(tiny_config, tmp_path, plugin):
    """Two iterations through make_trainer; the oracle is MAML with solver=first_order from the same
    seed: the same meta-parameters and test scores."""
    _, search = plugin
    ours = make_trainer(tiny_config(search, "algo=first_step"), tmp_path / "plugin").fit()
    fomaml = make_trainer(tiny_config("algo=maml", "solver=first_order"), tmp_path / "fomaml").fit()
    assert ours["status"] == "completed" and ours["iteration"] == 2
    (mine, _), (theirs, _) = (read_run(tmp_path / run, "a test run") for run in ("plugin", "fomaml"))
    assert mine["config"]["algo"]["_target_"] == "one_step_plugin.OneStepFOMAML"
    for key, value in theirs["algorithm"]["meta_parameters"].items():
        torch.testing.assert_close(mine["algorithm"]["meta_parameters"][key], value)
    assert ours["test"]["mse"]["mean"] == pytest.approx(fomaml["test"]["mse"]["mean"], rel=1e-5)


@pytest.mark.slow
def test_a_plugin_algorithm_is_named_in_the_generated_pairs(plugin, tmp_path):
    """Composed with data it does not train on, it is refused from the config, before any data is
    read; and `python train.py` with its folders on the paths names it among the algorithms that
    train on episodes when another algorithm is given episodes."""
    code, search = plugin
    with pytest.raises(ConfigError) as refusal:
        build(compose_config([search, "algo=first_step", "tasks=aux_toy"]), torch.device("cpu"))
    assert str(refusal.value) == (
        "algo=first_step trains on episodes, but AuxToy yields data with auxiliary tasks: "
        "pair algo=first_step with tasks=miniimagenet, omniglot or sinusoid, or give AuxToy "
        "to algo=auxilearn."
    )
    paths = os.pathsep.join(filter(None, [str(code), str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")]))
    result = run_train(
        [search, "algo=auxilearn", "tasks=sinusoid", "trainer.device=cpu"],
        tmp_path,
        env={**os.environ, "PYTHONPATH": paths},
    )
    assert result.returncode == 2, result.stderr
    sentence, _, partners = result.stderr.strip().splitlines()[-1].partition(", or give Sinusoid to algo=")
    assert sentence == (
        "error: algo=auxilearn trains on data with auxiliary tasks, but Sinusoid yields episodes: pair "
        "algo=auxilearn with tasks=aux_miniimagenet, aux_mnist, aux_omniglot or aux_toy"
    )
    assert {"first_step", "imaml", "maml"} <= listed(partners) and "auxilearn" not in listed(partners)
