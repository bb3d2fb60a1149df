"""scripts/summarize.py, reproduce.py and evaluate.py as a user runs them, on real tiny runs."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.configs import TINY
from tests.helpers.runs import ROOT
from tests.helpers.scripts import assert_refused, read_only, run_script, script


# t_{p, df} from a printed table of Student's t (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2)
@pytest.mark.parametrize(
    "p, df, t",
    [
        (0.975, 1, 12.706),
        (0.975, 2, 4.303),
        (0.975, 4, 2.776),
        (0.975, 9, 2.262),
        (0.975, 30, 2.042),
        (0.975, 100, 1.984),
        (0.95, 4, 2.132),
        (0.995, 10, 3.169),
    ],
)
def test_student_t_quantile_matches_the_table(p, df, t):
    assert script("summarize").student_t_quantile(p, df) == pytest.approx(t, abs=5e-4)


@pytest.mark.slow
def test_summarize_uses_students_t_over_seeds(tmp_path):
    """Five seeds of one setting: the interval is t_{0.975,4} * stdev / sqrt(5), not 1.96 * ..."""
    values = [0.50, 0.61, 0.47, 0.58, 0.66]
    for seed, value in enumerate(values):
        job = tmp_path / f"{seed}_seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["algo.inner_lr=0.1", f"seed={seed}"]))
        (job / "results.json").write_text(json.dumps({"test": {"accuracy": {"mean": value, "ci95": 0.01}}}))
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    half_width = 2.7764451 * statistics.stdev(values) / math.sqrt(5)
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| (none) |")]
    assert row == f"| (none) | 5 | {statistics.mean(values):.4f} ± {half_width:.4f} |"


def run_experiment(cwd: Path, *overrides: str) -> Path:
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "+experiment=maml_sinusoid", *TINY, *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = (cwd / "outputs" / "runs").glob("*/*")
    return run_dir


@pytest.fixture(scope="module")
def experiment_run(tmp_path_factory) -> Path:
    """A tiny `python train.py +experiment=maml_sinusoid` run, made from a directory of its own."""
    return run_experiment(tmp_path_factory.mktemp("user"))


@pytest.mark.slow
def test_reproduce_finds_runs_of_train_py_plus_experiment(experiment_run):
    cwd = experiment_run.parents[3]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reproduce.py")], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| maml_sinusoid |")]
    test = json.loads((experiment_run / "results.json").read_text())["test"]
    assert len(rows) == 3  # mse@1, mse@5, mse@10
    for row in rows:
        metric = row.split(" | ")[1]
        assert f"| {test[metric]['mean']:.4g} ± {test[metric]['ci95']:.2g} |" in row
        assert (
            str(experiment_run.relative_to(cwd)) in row and "trainer.iterations=2" in row
        )  # which run, and how it differs


@pytest.mark.slow
def test_evaluate_split_reproduces_the_runs_validation(experiment_run):
    """split=val on the best checkpoint with the run's own episodes gives the run's validation numbers."""
    evaluate = script("evaluate")
    assert evaluate.main([str(experiment_run), "--split", "val", "--num-tasks", "4", "--device", "cpu"]) == 0
    ours = json.loads((experiment_run / "eval_val.json").read_text())
    theirs = json.loads((experiment_run / "results.json").read_text())["val"]
    assert ours["mse"]["mean"] == pytest.approx(theirs["mse"]["mean"], rel=1e-6)
    assert ours["mse"]["ci95"] == pytest.approx(theirs["mse"]["ci95"], rel=1e-6)


@pytest.mark.parametrize(
    "args, sentence",
    [
        (
            ["x", "tasks.split=test"],
            "error: tasks.split is the sampler's split protocol (maml or background_evaluation), "
            "not the episodes to evaluate: write --split test instead.",
        ),
        (["x", "--split", "holdout"], "error: --split must be one of train, val, test (got 'holdout')."),
        (["x", "--num-tasks", "abc"], "error: --num-tasks must be an integer >= 1 (got 'abc')."),
        (
            ["--split", "test"],
            "error: the following arguments are required: run_dir: usage is python scripts/evaluate.py",
        ),
        (["x", "oops"], "error: 'oops' is not key=value: usage is python scripts/evaluate.py"),
        (["x", "--device", "cuda:99"], "error: --device=cuda:99 but "),
    ],
)
def test_evaluate_refuses_in_one_sentence(args, sentence, capsys):
    assert script("evaluate").main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(sentence) and "\n" not in err


def test_evaluate_refuses_an_output_it_cannot_write_before_loading_anything(tmp_path, capsys):
    """The check comes first: the unreadable checkpoint.pt here would otherwise be refused as corrupt."""
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    evaluate = script("evaluate")
    with read_only(tmp_path):
        status = evaluate.main([str(tmp_path), "--device", "cpu"])
    assert_refused(status, capsys.readouterr().err, 2, f"cannot write {tmp_path / 'eval_test.json'} (", "--output")
    status = evaluate.main([str(tmp_path), "--device", "cpu", "--output", str(tmp_path / "missing" / "e.json")])
    assert_refused(status, capsys.readouterr().err, 2, f"cannot write {tmp_path / 'missing' / 'e.json'} (No such")
    status = evaluate.main([str(tmp_path), "--device", "cpu", "--split", "val"])  # writable: it goes on to load
    assert_refused(status, capsys.readouterr().err, 2, "is corrupt or not a metalab checkpoint")


@pytest.mark.slow
def test_evaluate_on_a_read_only_run_says_so_before_evaluating_and_writes_where_told(experiment_run, tmp_path):
    """Before: the results were printed, then OSError, and the file was never written."""
    args = [str(experiment_run), "--num-tasks", "4", "--device", "cpu"]
    with read_only(experiment_run):  # no file can be created there (eval_val.json may exist: it stays writable)
        refused = run_script("evaluate", *args, "--split", "test")
        told = run_script("evaluate", *args, "--split", "val", "--output", str(tmp_path / "val.json"))
    assert_refused(refused.returncode, refused.stderr, 2, "--output FILE to write elsewhere")
    assert refused.stdout == ""  # nothing evaluated, nothing lost
    assert told.returncode == 0 and told.stdout.endswith(f"wrote {tmp_path / 'val.json'}\n"), told.stderr
    ours = json.loads((tmp_path / "val.json").read_text())
    theirs = json.loads((experiment_run / "results.json").read_text())["val"]
    assert ours["mse"]["mean"] == pytest.approx(theirs["mse"]["mean"], rel=1e-6)


def test_evaluate_as_a_user_types_it_refuses_an_empty_run_directory():
    result = run_script("evaluate", "", "--device", "cpu")
    assert_refused(result.returncode, result.stderr, 2, "argument run_dir: is empty: pass a path")
