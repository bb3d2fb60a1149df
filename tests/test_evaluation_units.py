"""An evaluation never claims more units than it scored: the held-out examples of data with auxiliary
tasks are a finite split, scored one example at a time, each once, whatever the evaluation batch size;
asking for more than a split holds is refused before training, in one sentence naming the key, the
split's size and what to set. Splits drawn afresh (episodes, optimisation problems) take any number."""

from __future__ import annotations

import json

import pytest
import torch

from metalab.app.build import make_trainer
from metalab.errors import ConfigError
from metalab.tasks.auxiliary.base import AuxBatch
from metalab.tasks.episodic.sinusoid import Sinusoid
from metalab.tasks.optimizees.quadratic import Quadratic
from metalab.training.evaluation import check_units, confidence_interval, evaluate_tasks
from tests.helpers.configs import OMNIGLOT, TINY, compose_config
from tests.helpers.runs import run_dirs, run_train

TOY = ["algo=auxilearn", "tasks=aux_toy"]  # val: 500 examples, test: 1,000


def scored_positions(tasks, monkeypatch) -> list[int]:
    """Spy on ``held_out``: the split positions every evaluation batch holds, in order."""
    seen: list[int] = []
    original = type(tasks).held_out

    def spy(self, split, positions):
        seen.extend(positions.tolist())
        return original(self, split, positions)

    monkeypatch.setattr(type(tasks), "held_out", spy)
    return seen


def test_the_whole_toy_val_split_in_small_batches_is_each_example_once(tmp_path, monkeypatch):
    trainer = make_trainer(compose_config([*TINY, *TOY]), tmp_path)
    tasks, algorithm = trainer.tasks, trainer.algorithm
    seen = scored_positions(tasks, monkeypatch)
    result = evaluate_tasks(algorithm, tasks, "val", 500, 64, seed=0)
    assert sorted(seen) == list(range(500))
    data = tasks.data["val"]  # the oracle: the split as one batch, built here
    whole = AuxBatch(data["x"][None], data["y"], data["aux_y"], data["x"][:0], data["y"][:0])
    for key, values in algorithm.evaluate(whole).items():
        assert result[key] == pytest.approx(confidence_interval(values), rel=1e-5), key


def test_fewer_units_than_the_split_holds_are_distinct_across_batches(tmp_path, monkeypatch):
    trainer = make_trainer(compose_config([*TINY, *TOY]), tmp_path)
    seen = scored_positions(trainer.tasks, monkeypatch)
    evaluate_tasks(trainer.algorithm, trainer.tasks, "test", 300, 7, seed=3)
    assert len(seen) == len(set(seen)) == 300


@pytest.mark.parametrize(
    "override, sentence",
    [
        (
            "trainer.eval_tasks=800",
            "trainer.eval_tasks=800 asks for more val examples than the 500 the split holds, and each is scored "
            "once: set trainer.eval_tasks to at most 500.",
        ),
        (
            "trainer.test_tasks=1001",
            "trainer.test_tasks=1001 asks for more test examples than the 1000 the split holds, and each is scored "
            "once: set trainer.test_tasks to at most 1000.",
        ),
    ],
)
def test_more_units_than_the_toy_split_holds_are_refused_before_training(override, sentence, tmp_path):
    with pytest.raises(ConfigError) as raised:
        make_trainer(compose_config([*TINY, *TOY, override]), tmp_path / "run")
    assert str(raised.value) == sentence
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_the_python_api_refuses_too(tmp_path):
    trainer = make_trainer(compose_config([*TINY, *TOY]), tmp_path)
    with pytest.raises(ConfigError, match="num_tasks=501 asks for more val examples than the 500"):
        evaluate_tasks(trainer.algorithm, trainer.tasks, "val", 501, 100, seed=0)


def test_splits_drawn_afresh_take_any_number():
    for tasks in (Sinusoid(), Quadratic()):
        assert tasks.split_size("test") is None
        check_units(tasks, "test", 10**9, "trainer.test_tasks")  # no refusal


def toy_run(tmp_path, *overrides):
    args = [*TOY, *TINY, "trainer.eval_batch_size=64", *overrides]
    return run_train(args, tmp_path)


def test_a_toy_run_reports_the_units_it_scored_on_disk_and_on_the_console(tmp_path):
    done = toy_run(tmp_path, "trainer.eval_tasks=500", "trainer.test_tasks=1000")
    assert done.returncode == 0, done.stderr
    results = json.loads((run_dirs(tmp_path)[-1] / "results.json").read_text())
    assert (results["val_tasks"], results["test_tasks"], results["units"]) == (500, 1000, "examples")
    assert "val mse:" in done.stdout and "(95% CI over 500 examples)" in done.stdout, done.stdout
    assert "test mse:" in done.stdout and "(95% CI over 1000 examples)" in done.stdout, done.stdout


def test_the_toy_refusal_on_the_command_line(tmp_path):
    done = toy_run(tmp_path, "trainer.eval_tasks=800")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (
        "error: trainer.eval_tasks=800 asks for more val examples than the 500 the split holds, and each is "
        "scored once: set trainer.eval_tasks to at most 500."
    )
    assert not any((run / "results.json").exists() for run in run_dirs(tmp_path))


@pytest.fixture
def omniglot_overrides(image_data):
    if not OMNIGLOT.is_dir():
        pytest.skip(f"the Omniglot subset is not at {OMNIGLOT} (set METALAB_OMNIGLOT to its folder)")
    return ["algo=auxilearn", "tasks=aux_omniglot", *image_data["auxomniglot"]]  # test: 136 x 5 = 680 drawings


def test_aux_omniglot_asked_for_1000_test_drawings_is_refused(omniglot_overrides, tmp_path):
    done = run_train([*omniglot_overrides, *TINY, "trainer.test_tasks=1000", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (
        "error: trainer.test_tasks=1000 asks for more test examples than the 680 the split holds, and each is "
        "scored once: set trainer.test_tasks to at most 680."
    )
    assert not (tmp_path / "run" / "results.json").exists()


def test_aux_omniglot_scores_each_of_its_680_test_drawings_once(omniglot_overrides, tmp_path, monkeypatch):
    args = [*omniglot_overrides, *TINY, "trainer.iterations=1", "trainer.eval_tasks=272", "trainer.test_tasks=680"]
    done = run_train([*args, "trainer.eval_batch_size=100", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["val_tasks"], results["test_tasks"]) == (272, 680)
    assert "(95% CI over 272 examples)" in done.stdout and "(95% CI over 680 examples)" in done.stdout, done.stdout
    trainer = make_trainer(compose_config([*args, "trainer.eval_batch_size=100"]), tmp_path / "spy")
    seen = scored_positions(trainer.tasks, monkeypatch)
    trainer.evaluate("test", 680)
    assert sorted(seen) == list(range(680))
    drawings = trainer.tasks.splits["test"][torch.tensor(seen)]
    assert drawings.unique().numel() == 680  # 680 distinct drawings, 5 of each of the 136 characters
    assert torch.bincount(trainer.tasks.labels[drawings]).tolist() == [5] * 136
