"""Faults, checked by what is on disk afterwards: diverging learning rates, NaN only in evaluation,
signals during evaluation, exit codes, two processes on one run directory, kill -9 and orphans."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from metalab.checkpoint import load_checkpoint
from metalab.errors import TrainingDiverged
from tests.helpers.configs import TINY
from tests.helpers.runs import TRAIN, records, run_dirs, train


def strict_load(path):
    def reject(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=reject)


def finite(state):
    """Independent check: every floating tensor anywhere in a checkpoint is finite."""
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(finite(v) for v in state)
    return True


def test_an_infinite_meta_learning_rate_writes_no_checkpoint(tiny_config, tmp_path):
    # the config schema refuses trainer.meta_optimizer.lr=inf up front; set it past the schema
    from metalab.app.build import make_trainer

    trainer = make_trainer(tiny_config("trainer.iterations=5", "trainer.checkpoint_every=1"), tmp_path)
    trainer.algorithm.optimizer.param_groups[0]["lr"] = float("inf")
    with pytest.raises(
        TrainingDiverged, match="by iteration 1: .* became NaN or infinite.*this run wrote no checkpoint"
    ):
        trainer.fit()
    assert not (tmp_path / "checkpoint.pt").exists()
    results = strict_load(tmp_path / "results.json")
    assert results["status"] == "diverged" and "wrote no checkpoint" in results["message"]


def test_a_huge_meta_learning_rate_names_a_checkpoint_that_really_is_finite(tiny_config, tmp_path):
    cfg = tiny_config("trainer.iterations=5", "trainer.checkpoint_every=1", "trainer.meta_optimizer.lr=1e30")
    with pytest.raises(TrainingDiverged) as error:
        train(cfg, tmp_path)
    message = str(error.value)
    named = re.search(
        r"the last checkpoint, (\S+), holds iteration (\d+) with finite values only "
        r"\(largest \|meta-parameter\| (\S+)\)",
        message,
    )
    assert named, message
    state = load_checkpoint(named.group(1))
    assert state["iteration"] == int(named.group(2)) and finite(state)
    largest = max(v.abs().max().item() for v in state["algorithm"]["meta_parameters"].values())
    assert float(named.group(3)) == pytest.approx(largest, rel=1e-2) and largest > 1e20  # the message says how big


def test_nan_only_in_evaluation_is_reported_and_results_stay_strict_json(tiny_config, tmp_path):
    # one inner step trains fine at this rate; the ten of evaluation diverge
    cfg = tiny_config(
        "trainer.iterations=4",
        "trainer.eval_every=2",
        "trainer.eval_tasks=20",
        "trainer.test_tasks=20",
        "trainer.eval_batch_size=20",
        "algo.inner_lr=0.3",
    )
    _, results = train(cfg, tmp_path)
    saved = strict_load(tmp_path / "results.json")
    assert saved["status"] == "nonfinite_evaluation" and "test/mse" in saved["nonfinite"]
    assert saved["test"]["mse"]["mean"] is None and finite(load_checkpoint(tmp_path / "checkpoint.pt"))
    assert any(r.get("val/mse", 0) is None for r in records(tmp_path))  # metrics.jsonl: null, not NaN


@pytest.mark.parametrize("stop_during", ["val", "test"])
def test_a_signal_during_evaluation_stops_cleanly_and_resume_matches_an_uninterrupted_run(
    tiny_config, tmp_path, stop_during
):
    cfg = tiny_config("trainer.iterations=6", "trainer.eval_every=3", "trainer.checkpoint_every=100")
    _, full = train(cfg, tmp_path / "full")
    trainer_ref = {}

    def stopping_sample(sample):
        def wrapped(batch_size, split, generator):
            if split == stop_during and not trainer_ref.get("sent"):
                trainer_ref["sent"] = True
                os.kill(os.getpid(), signal.SIGTERM)  # the real handler, installed by fit
            return sample(batch_size, split, generator)

        return wrapped

    from metalab.app.build import make_trainer

    trainer = make_trainer(cfg, tmp_path / "split")
    trainer.tasks.sample = stopping_sample(trainer.tasks.sample)
    stopped = trainer.fit()
    assert stopped["status"] == "interrupted" and stopped["stopped_by"] == "SIGTERM" and not stopped["test"]
    stopped_at = 3 if stop_during == "val" else 6
    assert stopped["iteration"] == load_checkpoint(tmp_path / "split" / "checkpoint.pt")["iteration"] == stopped_at
    assert strict_load(tmp_path / "split" / "results.json")["status"] == "interrupted"
    _, resumed = train(cfg, tmp_path / "split", resume=True)
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert records(tmp_path / "split") == records(tmp_path / "full")  # nothing lost, nothing twice


def wait_for_rows(metrics, rows, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= rows:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{metrics} never reached {rows} rows")


@pytest.mark.slow
def test_lock_sigint_exit_code_kill_9_and_orphans_on_disk(tmp_path):
    """One live run holds its directory; Ctrl-C exits 130; a kill -9 leaves a lock file that does
    not block the next resume, which deletes orphan temporaries and leaves unique, complete rows."""
    args = [
        *[a for a in TINY if not a.startswith(("trainer.iterations", "trainer.eval_every"))],
        "trainer.iterations=100000",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=100000",
    ]
    live = subprocess.Popen([*TRAIN, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rows(next_metrics(tmp_path, live), 3, live)
    (run_dir,) = run_dirs(tmp_path)
    second = subprocess.run(
        [*TRAIN, *args, f"resume={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"is in use by another live run (process {live.pid})" in second.stderr
    live.send_signal(signal.SIGINT)
    _, err = live.communicate(timeout=120)
    assert live.returncode == 130 and "Traceback" not in err, err
    stopped = strict_load(run_dir / "results.json")
    assert stopped["status"] == "interrupted" and stopped["stopped_by"] == "SIGINT"
    done = stopped["iteration"]

    killed = subprocess.Popen(
        [*TRAIN, *args, f"resume={run_dir}"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_rows(run_dir / "metrics.jsonl", done + 3, killed)  # it trains past the checkpoint, then dies
    killed.kill()
    killed.wait()
    (run_dir / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # what a killed write leaves
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"iteration": 9999')
    finish = subprocess.run(
        [
            *TRAIN,
            *[a for a in args if not a.startswith("trainer.iterations")],
            f"trainer.iterations={done + 2}",
            "resume=true",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finish.returncode == 0, finish.stderr
    assert not list(run_dir.glob(".*.tmp")) and (run_dir / ".lock").exists()
    final = strict_load(run_dir / "results.json")
    assert final["status"] == "completed" and final["iteration"] == done + 2
    assert finite(load_checkpoint(run_dir / "checkpoint.pt"))
    iterations = [r["iteration"] for r in records(run_dir) if "train/loss" in r]
    assert iterations == list(range(1, done + 3))  # every iteration once: the killed run's extra rows are gone


def next_metrics(cwd, process, timeout=120):
    """The metrics.jsonl of the one run under cwd, once its directory exists."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list((cwd / "outputs").glob("runs/*/*/.hydra"))
        if found:
            return found[0].parent / "metrics.jsonl"
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("no run directory appeared")


def test_a_second_signal_stops_at_once_and_the_last_checkpoint_stands(tiny_config, tmp_path):
    from metalab.app.build import make_trainer
    from metalab.training.signals import StoppedAtOnce

    trainer = make_trainer(
        tiny_config("trainer.iterations=50", "trainer.eval_every=0", "trainer.checkpoint_every=2"), tmp_path
    )
    step = trainer.algorithm.train_step

    def twice_signalled(batch):
        if trainer.iteration == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the first: stop after this iteration
            os.kill(os.getpid(), signal.SIGTERM)  # the second: stop now (the CLI exits 143)
        return step(batch)

    trainer.algorithm.train_step = twice_signalled
    with pytest.raises(StoppedAtOnce) as stopped:
        trainer.fit()
    assert stopped.value.signum == signal.SIGTERM
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 4 and not list(tmp_path.glob(".*.tmp"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer's handlers are gone again
