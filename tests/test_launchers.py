"""Hydra's launcher and sweeper plugins (the `cluster` and `sweep` extras, in `dev`): a 2-job sweep in
parallel local processes (joblib), the SLURM config as far as composing its sbatch script shows,
a requeued SLURM job continuing its run, and a 3-trial Optuna search. Each test skips, naming the
extra, when its plugin is not installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metalab.app.build import make_trainer
from metalab.app.cli import CONFIG_DIR, requeued
from tests.helpers.configs import TINY, compose_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "train.py")]


def plugin(module: str, extra: str):
    return pytest.importorskip(module, reason=f'{module} is not installed: pip install -e ".[{extra}]" (or ".[dev]")')


def run_train(args, cwd, **kwargs):
    return subprocess.run([*TRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.mark.slow
def test_a_two_job_sweep_runs_in_parallel_processes_with_joblib(tmp_path):
    """Each job equals the same run made alone in this process (meta-parameters to 1e-6 relative)."""
    plugin("hydra_plugins.hydra_joblib_launcher", "cluster")
    result = run_train(
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, "seed=0,1", "hydra.sweep.dir=sweep"],
        tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr  # Hydra's joblib launcher ran the jobs
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    for seed, job in enumerate(jobs):
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "completed" and results["config"]["seed"] == seed
        alone = tmp_path / f"alone_{seed}"
        make_trainer(compose_config([*TINY, f"seed={seed}"]), alone).fit()
        ours, theirs = (
            torch.load(d / "checkpoint.pt", weights_only=False)["algorithm"]["meta_parameters"] for d in (job, alone)
        )
        for key, value in theirs.items():
            error = (ours[key] - value).abs().max().item()
            assert error <= 1e-6 * value.abs().max().item(), (seed, key, error)


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/submitit_slurm' is validated:UserWarning")  # see cli.main
def test_the_slurm_launcher_config_composes_to_an_sbatch_script_with_one_task_per_gpu(tmp_path, monkeypatch):
    """Hydra's submitit launcher, given configs/hydra/launcher/submitit_slurm.yaml and overrides,
    writes the sbatch script SLURM would get (submission itself is replaced by recording it)."""
    submitit = plugin("submitit", "cluster")
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for srun; it is never run
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            return_hydra_config=True,
            overrides=[
                "hydra/launcher=submitit_slurm",
                "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.timeout_min=600",
                f"hydra.sweep.dir={tmp_path / 'sweep'}",
            ],
        )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_") == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    launcher = SlurmLauncher(**params)
    launcher.config = cfg
    scripts: list[str] = []

    class Recorder(submitit.AutoExecutor):
        def map_array(self, fn, *args):
            scripts.append(self._executor._make_submission_file_text("COMMAND", "uid"))
            return []

    monkeypatch.setattr(submitit, "AutoExecutor", Recorder)
    launcher.launch([["seed=0"]], 0)
    flags = {line for line in scripts[0].splitlines() if line.startswith("#SBATCH")}
    assert {
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=600",
        "#SBATCH --signal=USR2@120",
    } <= flags
    assert any(line.startswith("srun ") and line.endswith("COMMAND") for line in scripts[0].splitlines())


@pytest.mark.slow
def test_a_requeued_slurm_job_continues_its_run_from_the_checkpoint(tmp_path):
    """The same command in a job SLURM requeued (SLURM_RESTART_COUNT=1, as SLURM sets it) continues
    the run in its directory from checkpoint.pt (here with more iterations, so that there is work
    left; tests/test_cli.py and tests/test_distributed.py stop runs with SIGTERM first)."""
    args = [*[a for a in TINY if not a.startswith("trainer.iterations")], f"hydra.run.dir={tmp_path / 'run'}"]
    first = run_train([*args, "trainer.iterations=2"], tmp_path)
    assert first.returncode == 0, first.stderr
    again = run_train([*args, "trainer.iterations=4"], tmp_path, env={**os.environ, "SLURM_RESTART_COUNT": "1"})
    assert again.returncode == 0 and f"run_dir={tmp_path / 'run'} (resumed)" in again.stdout, again.stderr
    final = json.loads((tmp_path / "run" / "results.json").read_text())
    assert final["status"] == "completed" and final["iteration"] == 4
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in metrics if "train/loss" in line] == [1, 2, 3, 4]


#: train.py under a SIGUSR2 handler like submitit's (which requeues the job, then exits): it records
#: the iteration of checkpoint.pt at the moment it runs
UNDER_SUBMITIT = """
import signal, sys, torch
from pathlib import Path
def requeue(signum, frame):
    Path("requeued").write_text(str(torch.load("run/checkpoint.pt", weights_only=False)["iteration"]))
    sys.exit(1)
signal.signal(signal.SIGUSR2, requeue)
from metalab.app.cli import main
main()
"""


@pytest.mark.slow
def test_submitits_timeout_signal_checkpoints_first_then_its_handler_requeues(tmp_path):
    args = [
        *[a for a in TINY if not a.startswith("trainer.iterations")],
        "trainer.iterations=100000",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=100000",
        "hydra.run.dir=run",
    ]
    process = subprocess.Popen(
        [sys.executable, "-c", UNDER_SUBMITIT, *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.1)
    process.send_signal(signal.SIGUSR2)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err  # the handler's exit
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "interrupted" and results["stopped_by"] == "SIGUSR2"
    assert int((tmp_path / "requeued").read_text()) == results["iteration"] >= 3  # checkpointed before it ran


@pytest.mark.parametrize(
    "restarts, checkpoint, resumed", [("1", True, True), ("0", True, False), (None, True, False), ("2", False, False)]
)
def test_only_a_requeued_job_with_a_checkpoint_continues(tmp_path, monkeypatch, restarts, checkpoint, resumed):
    if restarts is None:
        monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    else:
        monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
    if checkpoint:
        (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert requeued(tmp_path) == (tmp_path if resumed else None)


@pytest.mark.slow
def test_a_three_trial_optuna_search_minimises_the_validation_metric_main_returns(tmp_path):
    """The best value Optuna reports is the smallest validation MSE among the trials' results.json,
    and its parameters are that trial's."""
    plugin("hydra_plugins.hydra_optuna_sweeper", "sweep")
    result = run_train(
        [
            "-m",
            "+search=maml_sinusoid",
            "hydra.sweeper.n_trials=3",
            "trainer.iterations=3",
            "trainer.meta_batch_size=2",
            "trainer.eval_tasks=4",
            "trainer.eval_batch_size=4",
            "trainer.progress=false",
            "trainer.device=cpu",
            "hydra.sweep.dir=search",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    trials = [json.loads(p.read_text()) for p in sorted((tmp_path / "search").glob("*/results.json"))]
    assert len(trials) == 3 and all(t["status"] == "completed" for t in trials)
    best = yaml.safe_load((tmp_path / "search" / "optimization_results.yaml").read_text())
    winner = min(trials, key=lambda t: t["val"]["mse"]["mean"])
    assert best["best_value"] == pytest.approx(winner["val"]["mse"]["mean"], rel=1e-12)
    assert best["best_params"]["algo.inner_lr"] == pytest.approx(winner["config"]["algo"]["inner_lr"], rel=1e-12)
    assert best["best_params"]["trainer.meta_optimizer.lr"] == pytest.approx(
        winner["config"]["trainer"]["meta_optimizer"]["lr"], rel=1e-12
    )
    lrs = [t["config"]["algo"]["inner_lr"] for t in trials]
    assert len(set(lrs)) == 3 and all(0.001 <= lr <= 0.1 for lr in lrs)  # sampled in the configured interval
