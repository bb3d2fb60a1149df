"""trainer.max_time: a wall-clock budget that ends a run as its last iteration would (checkpoint,
validation, test), says so in results.json, and is refused in one sentence when malformed."""

from __future__ import annotations

import time

import pytest

from metalab.app.build import make_trainer
from metalab.checkpoint import load_checkpoint
from metalab.errors import ConfigError
from metalab.training.clock import parse_duration
from tests.helpers.runs import train

LONG = ["trainer.iterations=1000000", "trainer.eval_every=0", "trainer.checkpoint_every=1000000"]


def test_a_spent_budget_stops_training_then_validates_tests_and_checkpoints(tiny_config, tmp_path):
    cfg = tiny_config(*LONG, "trainer.max_time=2")
    start = time.perf_counter()
    _, results = train(cfg, tmp_path)
    assert time.perf_counter() - start < 60  # generous: a loaded machine; the budget is 2 s
    assert results["status"] == "completed" and results["stopped_by"] == "max_time"
    assert 0 < results["iteration"] < 1000000 and results["train_seconds"] >= 2
    assert results["val_iteration"] == results["iteration"]  # validated where it stopped
    assert set(results["test"]) >= {"mse"} and results["test_tasks"] == 4
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == results["iteration"]

    # the budget counts the training of every segment: a larger one continues the run
    _, resumed = train(tiny_config(*LONG, "trainer.max_time=2.5"), tmp_path, resume=True)
    assert resumed["stopped_by"] == "max_time" and resumed["iteration"] > results["iteration"]
    assert 2.5 <= resumed["train_seconds"] < 30


@pytest.mark.parametrize(
    "value, seconds",
    [(90, 90.0), (0.5, 0.5), ("01:00:00", 3600.0), ("00:12:00:00", 43200.0), ("1:02:03:04", 93784.0), (None, None)],
)
def test_a_duration_is_seconds_or_days_hours_minutes_seconds(value, seconds):
    assert parse_duration(value) == seconds  # 1:02:03:04 = 86400 + 2 * 3600 + 3 * 60 + 4


@pytest.mark.parametrize("value", ["1h", "12:00", "00:-1:00", 0, -5, "1:2:3:4:5"])
def test_a_malformed_budget_is_refused_in_one_sentence(tiny_config, tmp_path, value):
    cfg = tiny_config()
    cfg.trainer.max_time = value
    with pytest.raises(ConfigError) as refused:
        make_trainer(cfg, tmp_path)
    message = str(refused.value)
    assert message.startswith(f"trainer.max_time={value!r} is not a positive duration: give seconds")
    assert message.endswith("or null for no limit.") and "\n" not in message
