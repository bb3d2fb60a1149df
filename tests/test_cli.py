"""The command line as a user types it: subprocess runs of train.py, resume, sweeps, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers.configs import TINY
from tests.helpers.runs import ROOT, TRAIN, run_dirs, run_train
from tests.helpers.scripts import run_script


@pytest.mark.slow
def test_tiny_run_writes_metrics_and_results_and_prints_the_ci(tmp_path):
    """`python /path/to/train.py` from a directory of the user's: the run lands in ./outputs/runs."""
    result = run_train([*TINY, "logger=wandb"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test mse:" in result.stdout and "±" in result.stdout
    (run_dir,) = run_dirs(tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["test"]["mse"]["mean"] > 0
    assert (run_dir / "metrics.jsonl").read_text().count("\n") >= 2
    (offline,) = (run_dir / "wandb").glob("offline-run-*")  # offline: written locally, no network, no prompt
    assert f"wandb: offline run saved in {offline}; upload it with: wandb sync {offline}" in result.stdout
    assert [line for line in result.stdout.splitlines() if line.startswith("wandb")] == [
        f"wandb: offline run saved in {offline}; upload it with: wandb sync {offline}"
    ]
    assert "wandb" not in result.stderr and "deprecat" not in (result.stdout + result.stderr).lower()
    assert not (run_dir / "cli.log").exists()  # Hydra's job log would stay empty: metalab prints to the console


@pytest.mark.slow
def test_many_overrides_give_a_run_dir_name_a_file_system_takes_and_resume_finds_it(tmp_path):
    """Hydra joins every override into the folder name; past 255 bytes that was a traceback."""
    long = "0" * 60 + "1"  # long but harmless values: 0.01 + 1e-62 is 0.01
    many = [
        *TINY,
        "trainer.iterations=1",
        f"algo.inner_lr=0.01{long}",
        f"trainer.meta_optimizer.lr=0.001{long}",
        f"trainer.grad_clip_norm=10.{long}",
        "algo.eval_inner_steps=10",
        "seed=7",
    ]
    assert len(",".join(sorted(many))) > 255
    first = run_train(many, tmp_path)
    assert first.returncode == 0, first.stderr
    (run_dir,) = run_dirs(tmp_path)
    assert len(run_dir.name.encode()) <= 255 and run_dir.name.startswith(run_dir.name.split("_")[0])
    again = run_train([*many, "resume=true"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert str(run_dir) in again.stdout  # the same, shortened run directory was continued


@pytest.mark.slow
def test_cfg_job_and_unknown_options(tmp_path):
    shown = run_train(["--cfg", "job", "algo=maml", "solver=first_order", "tasks.shots=5"], tmp_path)
    assert (
        shown.returncode == 0
        and "_target_: metalab.hypergrad.first_order" in shown.stdout
        and "shots: 5" in shown.stdout
    )
    unknown = run_train(["solver=nope"], tmp_path)
    assert unknown.returncode != 0 and "Available options" in unknown.stderr and "first_order" in unknown.stderr


@pytest.mark.slow
def test_unwritable_run_dir_is_one_sentence_before_hydra_creates_it(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = run_train([*TINY, f"hydra.run.dir={tmp_path}/a_file/run"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: cannot write runs to {tmp_path}/a_file/run (Not a directory): run from a "
        "writable directory or set hydra.run.dir=<writable dir>, or make it writable."
    )


@pytest.mark.slow
def test_own_config_directory_adds_an_experiment_through_the_search_path(tmp_path):
    (tmp_path / "my_configs" / "experiment").mkdir(parents=True)
    (tmp_path / "my_configs" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /algo: imaml\nalgo:\n  inner_steps: 3\ntrainer:\n  iterations: 7\n"
    )
    shown = run_train(
        [f"hydra.searchpath=[file://{tmp_path / 'my_configs'}]", "+experiment=mine", "--cfg", "job"], tmp_path
    )
    assert shown.returncode == 0, shown.stderr
    assert "_target_: metalab.algorithms.IMAML" in shown.stdout and "inner_steps: 3" in shown.stdout
    assert (
        "iterations: 7" in shown.stdout and "_target_: metalab.hypergrad.cg" in shown.stdout
    )  # imaml's default solver


@pytest.mark.slow
def test_default_data_root_is_found_from_another_directory(tmp_path):
    """Without METALAB_OMNIGLOT, ../shared/data/omniglot is looked up from the working directory,
    then from the checkout: a run started elsewhere still finds the shared data, by absolute path."""
    from tests.helpers.configs import OMNIGLOT

    env = {k: v for k, v in os.environ.items() if k != "METALAB_OMNIGLOT"}
    shown = run_train(["tasks=omniglot", "--cfg", "job", "--resolve", "-p", "tasks.root"], tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    expected = (ROOT / ".." / "shared" / "data" / "omniglot").resolve()
    assert shown.stdout.strip() == str(
        expected if expected.exists() else (tmp_path / ".." / "shared" / "data" / "omniglot").resolve()
    )
    assert OMNIGLOT.resolve() == expected or "METALAB_OMNIGLOT" in os.environ


def test_data_root_rule(tmp_path, monkeypatch):
    from metalab.app import paths

    checkout, cwd = tmp_path / "checkout", tmp_path / "elsewhere" / "cwd"
    (checkout / "data" / "set").mkdir(parents=True)
    cwd.mkdir(parents=True)
    monkeypatch.setattr(paths, "CHECKOUT", checkout)
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("METALAB_TEST_ROOT", raising=False)
    assert paths.data_root("METALAB_TEST_ROOT", "data/set") == str(
        checkout / "data" / "set"
    )  # only the checkout has it
    (cwd / "data" / "set").mkdir(parents=True)
    assert paths.data_root("METALAB_TEST_ROOT", "data/set") == str(cwd / "data" / "set")  # the working directory first
    assert paths.data_root("METALAB_TEST_ROOT", "nowhere") == str(
        cwd / "nowhere"
    )  # neither: where the sampler will say it looked
    monkeypatch.setenv("METALAB_TEST_ROOT", str(tmp_path / "env"))
    assert paths.data_root("METALAB_TEST_ROOT", "data/set") == str(tmp_path / "env")  # the variable wins


@pytest.mark.slow
def test_bad_value_is_one_sentence_without_traceback(tmp_path):
    result = run_train([*TINY, "algo.inner_lr=-1"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: algo.inner_lr must be positive (got -1): e.g. algo.inner_lr=0.01."


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_true_continues(tmp_path):
    args = [
        *[a for a in TINY if not a.startswith("trainer.iterations")],
        "trainer.iterations=400",
        "trainer.checkpoint_every=100000",
        "trainer.eval_every=0",
    ]
    process = subprocess.Popen([*TRAIN, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training is under way
        metrics = list((tmp_path / "outputs").glob("runs/*/*/metrics.jsonl"))
        if metrics and metrics[0].read_text().count("\n") >= 3:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err  # 128 + SIGTERM: schedulers see it did not finish
    (run_dir,) = run_dirs(tmp_path)
    stopped = json.loads((run_dir / "results.json").read_text())
    assert stopped["status"] == "interrupted" and 3 <= stopped["iteration"] < 400
    resumed = run_train([*args, "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"run_dir={run_dir} (resumed)" in resumed.stdout
    final = json.loads((run_dir / "results.json").read_text())
    assert final["status"] == "completed" and final["iteration"] == 400
    iterations = [
        json.loads(line)["iteration"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 400  # continued, nothing logged twice


@pytest.mark.slow
def test_resume_without_an_earlier_run_says_what_to_do(tmp_path):
    result = run_train([*TINY, "resume=true"], tmp_path)
    assert result.returncode == 2 and "found no earlier run of this command" in result.stderr


@pytest.mark.slow
def test_multirun_and_summarize(tmp_path):
    result = run_train(["-m", *TINY, "algo.inner_lr=0.01,0.001", "seed=0,1"], tmp_path)
    assert result.returncode == 0, result.stderr
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    jobs = sorted(sweep_dir.glob("*/results.json"))
    assert len(jobs) == 4
    summarized = run_script("summarize", str(sweep_dir))
    assert summarized.returncode == 0, summarized.stderr
    summary = summarized.stdout
    rows = [line for line in summary.splitlines() if line.startswith("| algo.inner_lr=")]
    assert len(rows) == 2 and all("| 2 |" in row for row in rows)
    # the oracle: mean over the two seeds of each job's test mse
    by_lr = {}
    for job in jobs:
        results = json.loads(job.read_text())
        by_lr.setdefault(results["config"]["algo"]["inner_lr"], []).append(results["test"]["mse"]["mean"])
    for lr, values in by_lr.items():
        row = next(r for r in rows if f"algo.inner_lr={lr} " in r or f"algo.inner_lr={lr} |" in r)
        assert f"{sum(values) / 2:.4f} ±" in row


@pytest.mark.slow
def test_reproduce_lists_every_experiment_with_the_papers_number():
    from metalab.app.cli import CONFIG_DIR

    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reproduce.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        rows = [line for line in result.stdout.splitlines() if line.startswith(f"| {path.stem} |")]
        assert rows, path.stem
        paper_value = next(iter(yaml.safe_load(path.read_text())["paper"]["metrics"].values()))
        assert f"| {paper_value} |" in rows[0], (path.stem, paper_value, rows[0])
    unknown = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--run", "nope"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert unknown.returncode == 2 and "no experiment named nope" in unknown.stderr


def test_help_explains_metalab_not_hydra(tmp_path):
    result = subprocess.run([*TRAIN, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("metalab: config-driven meta-learning")
    from metalab.app.cli import CONFIG_DIR

    algos = sorted(path.stem for path in (CONFIG_DIR / "algo").glob("*.yaml"))
    assert f"algo: {', '.join(algos)}" in lines and "maml" in algos  # each group on one line, with its options
    assert any(line.startswith("solver: cg, exact, first_order, gmres, neumann, unroll") for line in lines)
    assert sum(line.strip().startswith("python train.py") for line in lines) == 3
    assert "Runs go to outputs/runs/" in result.stdout and "powered by Hydra" not in result.stdout
    assert not (tmp_path / "outputs").exists()  # --help runs nothing
