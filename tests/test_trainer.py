"""The trainer: exact resume, atomic checkpoints, divergence handling, results and metrics files."""

from __future__ import annotations

import json

import pytest
import torch

from metalab.app.build import make_trainer
from metalab.checkpoint import load_checkpoint, save_checkpoint
from metalab.errors import ConfigError, TrainingDiverged
from metalab.training.evaluation import confidence_interval
from tests.helpers.runs import train, train_records


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tiny_config, tmp_path):
    cfg = tiny_config("trainer.iterations=30", "trainer.checkpoint_every=7", "trainer.eval_every=10", "seed=5")
    full, full_results = train(cfg, tmp_path / "full")
    _, stopped = train(cfg, tmp_path / "split", stop_after=12)
    assert stopped["status"] == "interrupted" and stopped["iteration"] == 12
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["iteration"] == 12  # written on the signal
    resumed, resumed_results = train(cfg, tmp_path / "split", resume=True)
    assert resumed_results["status"] == "completed" and resumed_results["iteration"] == 30
    for key, value in full.algorithm.meta_parameters().items():
        assert torch.equal(value, resumed.algorithm.meta_parameters()[key]), key
    assert full_results["test"] == resumed_results["test"]
    assert train_records(tmp_path / "full") == train_records(tmp_path / "split")  # no duplicated records


def test_results_and_metrics_files(tiny_config, tmp_path):
    _, results = train(tiny_config("algo.report_steps=[1,10]"), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "completed" and saved["iteration"] == 2
    assert set(saved["test"]) == {"loss", "mse", "mse@1", "mse@10"}
    assert saved["config"]["algo"]["inner_lr"] == 0.01 and "torch" in saved["versions"]
    assert saved["iterations_per_second"] > 0 and "git_commit" in saved
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("val/mse_ci95" in r for r in records) and any("test/mse" in r for r in records)


def test_divergence_stops_with_the_iteration_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config("trainer.iterations=10", "trainer.checkpoint_every=1")
    trainer = make_trainer(cfg, tmp_path)
    sample = trainer.tasks.sample
    calls = []

    def poisoned(batch_size, split, generator):
        batch = sample(batch_size, split, generator)
        if generator is trainer.generator:  # the run's own batches, not autotune's
            calls.append(1)
            if len(calls) == 4:
                batch.y_query[:] = float("nan")
        return batch

    trainer.tasks.sample = poisoned
    with pytest.raises(TrainingDiverged, match="iteration 4"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["iteration"] == 3
    for key, value in trainer.algorithm.meta_parameters().items():  # parameters untouched by the NaN step
        assert torch.isfinite(value).all() and torch.equal(value.detach(), state["algorithm"]["meta_parameters"][key])


def test_checkpoint_write_is_atomic_and_corruption_is_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"iteration": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"iteration": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["iteration"] == 1 and list(tmp_path.iterdir()) == [path]
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt"):
        load_checkpoint(path)


def test_confidence_interval_is_the_normal_95_percent_formula():
    values = torch.tensor([1.0, 2.0, 4.0, 7.0])
    mean, ci = confidence_interval(values)
    n = 4
    std = (sum((v - 3.5) ** 2 for v in [1, 2, 4, 7]) / (n - 1)) ** 0.5
    assert mean == pytest.approx(3.5) and ci == pytest.approx(1.96 * std / n**0.5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("algo.inner_lr=-0.1", "algo.inner_lr must be positive"),
        ("tasks.shots=0", "tasks.shots must be an integer >= 1"),
        ("algo.inner_steps=-1", "algo.inner_steps must be an integer >= 0"),
        ("trainer.meta_batch_size=0", "trainer.meta_batch_size must be an integer >= 1"),
        ("trainer.meta_optimizer.lr=-1", "trainer.meta_optimizer.lr must be > 0"),
        ("algo.report_steps=[20]", "algo.report_steps must lie in"),
        ("trainer.grad_clip_norm=-1", "trainer.grad_clip_norm must be positive"),
    ],
)
def test_bad_values_are_named_before_training(tiny_config, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        make_trainer(tiny_config(override), tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.slow
def test_the_test_uses_the_best_validation_checkpoint(tiny_config, tmp_path):
    from metalab.training.evaluation import episode_seed, evaluate_tasks

    cfg = tiny_config(
        "trainer.iterations=40", "trainer.eval_every=5", "trainer.eval_tasks=20", "trainer.meta_optimizer.lr=0.05"
    )  # a large step: a bumpy validation curve
    trainer, results = train(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scores = {r["iteration"]: r["val/mse"] for r in records if "val/mse" in r}
    assert len(scores) == 8 and all(v == v for v in scores.values())
    best_iteration = min(scores, key=scores.get)  # the oracle: argmin of the logged validation curve
    assert results["tested_iteration"] == best_iteration and results["val"]["mse"]["mean"] == scores[best_iteration]
    state = load_checkpoint(tmp_path / "best.pt")
    assert state["iteration"] == best_iteration
    trainer.algorithm.load_state_dict(state["algorithm"])
    again = evaluate_tasks(trainer.algorithm, trainer.tasks, "test", 4, 4, episode_seed(1234, "test"))
    assert again["mse"][0] == results["test"]["mse"]["mean"]
    last = load_checkpoint(tmp_path / "checkpoint.pt")
    assert last["iteration"] == 40  # the last state stays for resume


@pytest.mark.slow
def test_a_nan_validation_score_is_never_best(tiny_config, tmp_path):
    # one inner step trains fine at this rate; the ten of evaluation diverge
    cfg = tiny_config("trainer.iterations=10", "trainer.eval_every=5", "trainer.eval_tasks=20", "algo.inner_lr=0.3")
    trainer, results = train(cfg, tmp_path)
    assert (
        trainer.checkpoints.best is None and results["tested_iteration"] == 10 and not (tmp_path / "best.pt").exists()
    )


def test_console_lines_give_percent_accuracy_and_print_the_regression_loss_once():
    from metalab.training.evaluation import metric_lines

    assert metric_lines("test", {"loss": (0.71, 0.05), "accuracy": (0.435, 0.021)}, 600) == [
        "test loss: 0.7100 ± 0.0500 (95% CI over 600 tasks)",
        "test accuracy: 43.50% ± 2.10% (95% CI over 600 tasks)",
    ]
    assert metric_lines("val", {"loss": (0.5, 0.1), "mse": (0.5, 0.1), "mse@1": (0.9, 0.2)}, 100) == [
        "val mse: 0.5000 ± 0.1000 (95% CI over 100 tasks)",
        "val mse@1: 0.9000 ± 0.2000 (95% CI over 100 tasks)",
    ]
    (line,) = metric_lines("test", {"loss": (float("nan"), float("nan")), "mse": (float("nan"), float("nan"))}, 4)
    assert line == "test mse: nan (non-finite on some of 4 tasks)"


def test_evaluation_shows_a_bar_over_its_episodes_unless_progress_is_off(tiny_config, tmp_path, capsys):
    from metalab.training.evaluation import evaluate_tasks

    trainer = make_trainer(tiny_config(), tmp_path)
    evaluate_tasks(trainer.algorithm, trainer.tasks, "val", 6, 4, 0, progress=True)
    shown = capsys.readouterr().err
    assert "val: 100%" in shown and "6/6" in shown  # 6 episodes in batches of 4: counted by episode
    evaluate_tasks(trainer.algorithm, trainer.tasks, "val", 6, 4, 0, progress=False)
    assert capsys.readouterr().err == ""
