"""What a run leaves on disk stays right: Hydra's record (.hydra/) is written only by the process that
holds the run directory, resume=true finds a run made with hydra.run.dir, folder names never nest
a value's path, a stopped run keeps the validation it did, and a full disk is one sentence."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from metalab.app.paths import run_name
from metalab.app.resume import hold_run_dir
from tests.helpers.configs import TINY
from tests.helpers.runs import TRAIN, records, run_train, train


def record(run_dir):
    return {p.name: p.read_bytes() for p in sorted((run_dir / ".hydra").iterdir())}


@pytest.mark.slow
def test_a_refused_process_never_rewrites_the_record_and_resume_true_finds_a_fixed_run_dir(tmp_path):
    run = tmp_path / "run"
    first = run_train([*TINY, f"hydra.run.dir={run}"], tmp_path)
    assert first.returncode == 0, first.stderr
    saved = record(run)
    assert sorted(saved) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert b"seed" not in saved["overrides.yaml"] and b"trainer.iterations=2" in saved["overrides.yaml"]

    again = run_train([*TINY, f"hydra.run.dir={run}", "seed=5"], tmp_path)  # a new run into a used directory
    assert again.returncode == 2 and again.stderr.startswith(f"error: {run} already holds a run (checkpoint.pt)")
    assert "Traceback" not in again.stderr and record(run) == saved

    with hold_run_dir(run):  # a live run holds it
        live = run_train([*TINY, f"hydra.run.dir={run}", "resume=true"], tmp_path)
    assert live.returncode == 2 and "is in use by another live run" in live.stderr and record(run) == saved

    longer = [*TINY[1:], "trainer.iterations=4", f"hydra.run.dir={run}", "resume=true"]
    resumed = run_train(longer, tmp_path)
    assert resumed.returncode == 0 and f"run_dir={run} (resumed)" in resumed.stdout, resumed.stderr
    assert json.loads((run / "results.json").read_text())["iteration"] == 4 and record(run) == saved
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no folder left by the refused or resuming commands


def test_a_run_folder_name_never_holds_a_path_separator():
    assert run_name("paper=/data/omniglot,seed=1") == "paper=%2Fdata%2Fomniglot,seed=1"
    assert run_name("a=50%/b") == "a=50%25%2Fb"
    long = "tasks.root=" + "/x" * 200  # cut at 180 characters, wherever a / falls
    assert "/" not in run_name(long) and len(run_name(long)) <= 180
    assert run_name(long) != run_name(long + "/y")  # the hash tells them apart


@pytest.mark.slow
def test_a_multirun_over_paths_puts_every_job_one_level_under_the_sweep(tmp_path):
    result = subprocess.run(
        [*TRAIN, "-m", *TINY, "paper=/data/a,/data/b", "hydra.sweep.dir=sweep"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    jobs = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/results.json"))
    assert [job.split(",")[0] for job in jobs] == ["0_paper=%2Fdata%2Fa", "1_paper=%2Fdata%2Fb"]


def test_a_stop_after_a_validation_keeps_it_in_results(tiny_config, tmp_path):
    cfg = tiny_config("trainer.iterations=10", "trainer.eval_every=2", "trainer.checkpoint_every=100")
    _, results = train(cfg, tmp_path, stop_after=5)
    logged = [r for r in records(tmp_path) if "val/mse" in r]
    assert [r["iteration"] for r in logged] == [2, 4]
    assert results["status"] == "interrupted" and results["iteration"] == 5
    assert results["val"]["mse"] == {"mean": logged[-1]["val/mse"], "ci95": logged[-1]["val/mse_ci95"]}
    assert results["val_iteration"] == 4 and results["val_tasks"] == 4
    assert results["test"] == {} and results["test_tasks"] == 0 and results["tested_iteration"] is None
    assert json.loads((tmp_path / "results.json").read_text())["val"] == results["val"]


#: train.py with the second checkpoint written to a full disk (/dev/full: every write fails with ENOSPC)
FULL_DISK = """
import sys
import metalab.training.checkpoints as checkpoints
real, calls = checkpoints.save_checkpoint, []
def save_checkpoint(state, path):
    calls.append(path)
    if len(calls) == 2:
        open("/dev/full", "wb").write(bytes(1 << 16))
    real(state, path)
checkpoints.save_checkpoint = save_checkpoint
from metalab.app.cli import main
sys.argv = ["train.py", *sys.argv[1:]]
main()
"""


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full to fill a disk")
def test_a_full_disk_is_one_sentence_and_resume_continues_from_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = [*TINY[1:], "trainer.iterations=6", "trainer.eval_every=0", "trainer.checkpoint_every=2"]
    full = subprocess.run(
        [sys.executable, "-c", FULL_DISK, *args, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    assert full.stderr.strip() == (
        f"error: cannot write to the run directory {run} (No space left on device); its last checkpoint stands: "
        "free space there (or make it writable), then continue with the same command plus resume=true."
    )
    assert __import__("torch").load(run / "checkpoint.pt", weights_only=False)["iteration"] == 2
    resumed = run_train([*args, f"hydra.run.dir={run}", "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["iteration"] for r in records(run) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
