"""logger=tensorboard: the event file read back with TensorBoard's own reader holds every metric of
metrics.jsonl at its iteration, once, also after a resume from a checkpoint older than the events."""

from __future__ import annotations

import shutil

import pytest

from metalab.app.build import make_trainer
from metalab.app.resume import resume_state
from tests.helpers.configs import TINY, compose_config
from tests.helpers.runs import records, run_train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def fit_with_tensorboard(cfg, run_dir, resume=False):
    cfg.logger = compose_config(["logger=tensorboard"]).logger  # as logger=tensorboard on the command line
    trainer = make_trainer(cfg, run_dir)
    return trainer.fit(resume_state(run_dir, trainer.config) if resume else None)


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard shows them (purged steps dropped)."""
    reader = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def expected(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The same, from metrics.jsonl (the oracle: written by the other sink)."""
    table: dict[str, list[tuple[int, float]]] = {}
    for record in records(run_dir):
        for key, value in record.items():
            if key != "iteration":
                table.setdefault(key, []).append((record["iteration"], value))
    return table


def assert_same(actual, wanted):
    assert sorted(actual) == sorted(wanted)
    for tag, points in wanted.items():
        assert [s for s, _ in actual[tag]] == [s for s, _ in points], tag
        values = [float("nan") if v is None else v for _, v in points]  # metrics.jsonl writes NaN as null
        assert [v for _, v in actual[tag]] == pytest.approx(values, rel=1e-6, nan_ok=True), tag  # TB keeps float32


def test_every_metric_is_in_the_event_file_at_its_iteration(tiny_config, tmp_path):
    fit_with_tensorboard(tiny_config("trainer.iterations=4", "trainer.eval_every=2"), tmp_path)
    table = scalars(tmp_path)
    assert {"train/loss", "val/mse", "val/mse_ci95", "test/mse"} <= set(table)
    assert_same(table, expected(tmp_path))


def test_resuming_from_an_older_checkpoint_shows_each_step_once(tiny_config, tmp_path):
    """A kill after the events of iterations 4-6 were written but before their checkpoint: the resumed run
    writes 4-6 again, and TensorBoard shows them once."""
    # (no test at 3: metrics.jsonl drops a finished run's test when it trains on, TensorBoard keeps what it showed)
    fit_with_tensorboard(tiny_config("trainer.iterations=3", "trainer.eval_every=0", "trainer.test_tasks=0"), tmp_path)
    shutil.copy(tmp_path / "checkpoint.pt", tmp_path / "at3.pt")
    longer = tiny_config("trainer.iterations=6", "trainer.eval_every=0")
    fit_with_tensorboard(longer, tmp_path, resume=True)
    shutil.copy(tmp_path / "at3.pt", tmp_path / "checkpoint.pt")  # as if killed before checkpointing iteration 6
    fit_with_tensorboard(longer, tmp_path, resume=True)
    table = scalars(tmp_path)
    assert [step for step, _ in table["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert_same(table, expected(tmp_path))


def test_the_command_line_writes_an_event_file_tensorboard_reads(tmp_path):
    result = run_train([*TINY, "logger=tensorboard", "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "run"
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert_same(scalars(run_dir), expected(run_dir))


def test_loggers_combine(tmp_path):
    """logger=[wandb,tensorboard]: both sinks, beside metrics.jsonl."""
    from metalab.training.sinks import WandbSink
    from metalab.training.tensorboard import TensorBoardSink

    cfg = compose_config([*TINY, "logger=[wandb,tensorboard]"])
    trainer = make_trainer(cfg, tmp_path)
    assert [type(sink) for sink in trainer.sinks[1:]] == [WandbSink, TensorBoardSink]
    trainer.fit()
    assert scalars(tmp_path)["train/loss"] and list((tmp_path / "wandb").glob("offline-run-*"))
