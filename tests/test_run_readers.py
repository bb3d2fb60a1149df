"""The one reader of trained runs (metalab.checkpoint.read_run) behind load_rule, load_learner and load_run:
a run directory whose files are damaged, foreign, non-finite or of another algorithm is refused in one
sentence naming the file, through the Python API, `python train.py algo.init_rule=...` and evaluate.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metalab
from metalab.app.build import make_trainer
from metalab.checkpoint import BEST, CHECKPOINT
from tests.helpers.configs import REPO, TINY, compose_config
from tests.helpers.runs import run_train

LSTM = ["tasks=quadratic", "algo.optimizee_steps=4", "algo.unroll=2", "algo.hidden_size=3", "algo.num_layers=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished MAML run (sinusoid) and a finished learned-optimizer run (quadratic), each with best.pt."""
    root = tmp_path_factory.mktemp("runs")
    make_trainer(compose_config(TINY), root / "maml").fit()
    make_trainer(compose_config([*TINY, *LSTM]), root / "lstm").fit()
    return {"maml": root / "maml", "lstm": root / "lstm"}


def damaged(runs: dict[str, Path], run: str, destination: Path, file: str, change) -> Path:
    """A copy of ``runs[run]`` whose ``file`` is replaced by ``change(its state, runs)`` (bytes: written raw)."""
    copy = shutil.copytree(runs[run], destination / f"{run}-{file}")
    state = change(torch.load(copy / file, weights_only=False), runs)
    if isinstance(state, bytes):
        (copy / file).write_bytes(state)
    else:
        torch.save(state, copy / file)
    return copy


def with_nan(state, _runs, group="meta_parameters"):
    entries = state["algorithm"][group]
    name = next(iter(entries))
    entries[name].view(-1)[0] = float("nan")
    return state


def with_inf_optimizer_state(state, _runs):
    moments = next(iter(state["algorithm"]["optimizer"]["state"].values()))
    moments["exp_avg"].fill_(float("inf"))
    return state


def others_best(other):
    return lambda _state, runs: torch.load(runs[other] / BEST, weights_only=False)


#: (file, change, fragments of the sentence, for load_rule (run "lstm") and load_learner (run "maml"))
DAMAGE = {
    "checkpoint.pt a list": (CHECKPOINT, lambda s, r: [1, 2], ["checkpoint.pt is not a metalab checkpoint", "a list"]),
    "best.pt a list": (BEST, lambda s, r: [1], ["best.pt is not a metalab checkpoint (it holds a list, not a dict)"]),
    "checkpoint.pt not a torch file": (CHECKPOINT, lambda s, r: b"hello", ["checkpoint.pt is corrupt"]),
    "no algorithm state": (CHECKPOINT, lambda s, r: {"config": s["config"]}, ["holds no algorithm state"]),
    "config not a dict": (CHECKPOINT, lambda s, r: {**s, "config": "x"}, ["holds no run config with an algo"]),
    "a NaN meta-parameter in best.pt": (BEST, with_nan, ["best.pt holds NaN or infinite values (in meta_parameters."]),
    "an inf optimizer moment": (CHECKPOINT, with_inf_optimizer_state, ["holds NaN or infinite", "optimizer.state.0"]),
}


def load_rule_of(run_dir):
    return metalab.load_rule(run_dir)


def load_learner_of(run_dir):
    return metalab.load_learner(run_dir, device="cpu")


READERS = {"lstm": load_rule_of, "maml": load_learner_of}


@pytest.mark.parametrize("run", list(READERS))
@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_run_is_one_sentence_naming_the_file(runs, tmp_path, run, case):
    file, change, fragments = DAMAGE[case]
    copy = damaged(runs, run, tmp_path, file, change)
    with pytest.raises(metalab.ConfigError) as error:
        READERS[run](copy)
    message = str(error.value)
    assert str(copy) in message and "\n" not in message and message.endswith("."), message
    for fragment in fragments:
        assert fragment in message, message


def test_the_runs_themselves_load(runs):
    """The oracle of the refusals above: the undamaged runs load, with best.pt's weights."""
    best = torch.load(runs["lstm"] / BEST, weights_only=False)["algorithm"]["meta_parameters"]
    for name, value in metalab.load_rule(runs["lstm"]).named_parameters():
        assert torch.equal(value, best[name]), name
    best = torch.load(runs["maml"] / BEST, weights_only=False)["algorithm"]["meta_parameters"]
    learner = metalab.load_learner(runs["maml"], device="cpu")
    for name, value in learner.algorithm.meta_parameters().items():
        assert torch.equal(value, best[name]), name


def test_a_best_pt_of_another_algorithm_names_what_it_holds_and_what_the_config_expects(runs, tmp_path):
    maml = damaged(runs, "maml", tmp_path, BEST, others_best("lstm"))
    with pytest.raises(metalab.ConfigError) as error:
        metalab.load_learner(maml, device="cpu")
    message = str(error.value)
    assert f"{maml / BEST} does not hold the state of the MAML its config builds" in message, message
    assert "meta_parameters holds lstm." in message and "where net.0.bias, net.0.weight" in message, message
    assert 'pass checkpoint="last"' in message and "\n" not in message
    # the last state is MAML's own: it loads
    assert metalab.load_learner(maml, device="cpu", checkpoint="last").algorithm.meta_parameters()
    lstm = damaged(runs, "lstm", tmp_path, BEST, others_best("maml"))
    with pytest.raises(metalab.ConfigError, match=r"the weights in .*best.pt do not fit the rule .*net.0.bias"):
        metalab.load_rule(lstm)


def test_evaluate_script_refuses_another_algorithms_best_pt(runs, tmp_path):
    maml = damaged(runs, "maml", tmp_path, BEST, others_best("lstm"))
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), str(maml), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: {maml / BEST} does not hold the state of the MAML"), result.stderr


def test_init_rule_pointing_at_a_run_whose_checkpoint_is_a_list_is_one_line(runs, tmp_path):
    lstm = damaged(runs, "lstm", tmp_path, CHECKPOINT, lambda s, r: [1, 2])
    result = run_train(["tasks=quadratic", *TINY, f"algo.init_rule={lstm}"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"error: {lstm / CHECKPOINT} is not a metalab checkpoint (it holds a list, not a dict)" in result.stderr


def test_a_rule_of_another_algorithm_or_not_a_run_directory(runs):
    with pytest.raises(metalab.ConfigError, match=r"is a run of metalab.algorithms.MAML, not of LSTMOptimizer"):
        metalab.load_rule(runs["maml"])
    with pytest.raises(metalab.ConfigError, match=r"checkpoint.pt is a file, not a run directory: pass the"):
        metalab.load_rule(runs["lstm"] / CHECKPOINT)
    with pytest.raises(metalab.ConfigError, match=r"load_learner needs a run of an episodic algorithm"):
        metalab.load_learner(runs["lstm"], device="cpu")
    for reader in (metalab.load_rule, metalab.load_learner):
        with pytest.raises(TypeError, match=r"^run_dir must be a path \(str or pathlib.Path\) to a run directory, not"):
            reader(None)
        with pytest.raises(metalab.ConfigError, match=r"^checkpoint must be best or last \(got 'first'\)\.$"):
            reader(runs["lstm"], checkpoint="first")


def test_load_run_overrides_are_a_list_and_one_that_changes_the_model_is_named(runs):
    from metalab.inference import load_run

    for overrides in ("algo.inner_lr=1", 5, [3]):
        with pytest.raises(TypeError, match=r"^overrides must be a list of key=value strings"):
            load_run(runs["maml"], "cpu", overrides)
    with pytest.raises(metalab.ConfigError) as error:
        load_run(runs["maml"], "cpu", ["model.hidden_sizes=[3]"], data=False)
    message = str(error.value)
    assert "builds with the overrides ['model.hidden_sizes=[3]'] (meta_parameters holds" in message, message
    assert "and 1 other are expected" in message and message.endswith(
        "or drop the overrides that change the model or the algorithm's parameters."
    ), message
