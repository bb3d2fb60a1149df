"""scripts/summarize.py on the multiruns a cluster leaves: NaN metrics, killed and interrupted jobs,
Hydra delete overrides, jobs without .hydra/, truncated records; each left out with a line saying why,
n counted from the values that are really there."""

from __future__ import annotations

import math
import statistics

import pytest

from tests.helpers.scripts import assert_refused, completed, run_script, script, write_job

T = {2: 12.7062047, 3: 4.3026527}  # t_{0.975, n-1} for n values, Student's t table (NIST/SEMATECH 1.3.6.7.2)
INTERRUPTED = {"status": "interrupted", "stopped_by": "SIGTERM", "iteration": 4, "val": {}, "test": {}}


def summarize(capsys, *args):
    """(exit status, stdout table rows, stderr) of summarize.main in process."""
    status = script("summarize").main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:], err


def interval(values):
    return f"{statistics.mean(values):.4f} ± {T[len(values)] * statistics.stdev(values) / math.sqrt(len(values)):.4f}"


def test_a_null_mean_is_left_out_and_the_row_counts_the_real_values(tmp_path, capsys):
    """A NaN metric (results.json: "mean": null) once made torch fail to infer a dtype."""
    write_job(tmp_path / "0", ["seed=0"], completed(0.5))
    write_job(tmp_path / "1", ["seed=1"], completed(0.7))
    write_job(tmp_path / "2", ["seed=2"], {**completed(None), "status": "nonfinite_evaluation"})
    status, rows, err = summarize(capsys, tmp_path)
    assert status == 0 and rows == [f"| (none) | 2 | {interval([0.5, 0.7])} |"]
    assert "skipped 2: its test metrics are all null (NaN or infinite)" in err.splitlines()


def test_one_null_metric_of_a_job_leaves_its_other_metrics_counted(tmp_path, capsys):
    both = {"status": "completed", "test": {"mse": {"mean": 0.9}, "loss": {"mean": None}}}
    write_job(
        tmp_path / "0", ["seed=0"], {"status": "completed", "test": {"mse": {"mean": 0.5}, "loss": {"mean": 1.0}}}
    )
    write_job(
        tmp_path / "1", ["seed=1"], {"status": "completed", "test": {"mse": {"mean": 0.7}, "loss": {"mean": 2.0}}}
    )
    write_job(tmp_path / "2", ["seed=2"], both)
    status, rows, err = summarize(capsys, tmp_path)
    assert status == 0 and rows == [f"| (none) | 3 | {interval([0.5, 0.7, 0.9])} | {interval([1.0, 2.0])} (n=2) |"]
    assert "partly used 2: test/loss null (NaN or infinite), left out" in err


def test_an_interrupted_jobs_value_is_not_a_seed_and_one_value_has_no_interval(tmp_path, capsys):
    """Before: "2 seeds ± 0.0000" from one completed job and one interrupted one."""
    write_job(tmp_path / "0", ["algo.inner_lr=0.1", "seed=0"], completed(0.5))
    write_job(tmp_path / "1", ["algo.inner_lr=0.1", "seed=1"], {**INTERRUPTED, "test": {"mse": {"mean": 9.0}}})
    write_job(tmp_path / "2", ["algo.inner_lr=0.2", "seed=0"], completed(0.6))
    write_job(tmp_path / "3", ["algo.inner_lr=0.2", "seed=1"], completed(0.8))
    status, rows, err = summarize(capsys, tmp_path)
    assert status == 0
    assert rows == ["| algo.inner_lr=0.1 | 1 | 0.5000 (n=1) |", f"| algo.inner_lr=0.2 | 2 | {interval([0.6, 0.8])} |"]
    assert "skipped 1: was interrupted by SIGTERM at iteration 4" in err.splitlines()


def test_with_most_jobs_missing_results_every_setting_keeps_its_row(tmp_path, capsys):
    """Before: the settings were read from the jobs with results only, and the table became one row."""
    for job, lr in enumerate(["0.1", "0.2", "0.3"]):
        write_job(tmp_path / str(job), [f"algo.inner_lr={lr}", "seed=0"], completed(0.5) if job == 1 else None)
    status, rows, err = summarize(capsys, tmp_path)
    assert status == 0
    assert rows == [
        "| algo.inner_lr=0.1 | 0 | - |",
        "| algo.inner_lr=0.2 | 1 | 0.5000 (n=1) |",
        "| algo.inner_lr=0.3 | 0 | - |",
    ]
    assert err.count("results.json does not exist") == 2 and "summarized 1 of 3 jobs" in err


def test_a_delete_override_is_a_setting_like_any_other(tmp_path, capsys):
    """Before: ValueError on `~key` (no "=" to split on)."""
    write_job(tmp_path / "0", ["~trainer.meta_optimizer.weight_decay", "seed=0"], completed(0.5))
    write_job(tmp_path / "1", ["++trainer.meta_optimizer.weight_decay=0.1", "seed=0"], completed(0.6))
    status, rows, _ = summarize(capsys, tmp_path)
    assert status == 0
    assert rows == [
        "| trainer.meta_optimizer.weight_decay=0.1 | 1 | 0.6000 (n=1) |",
        "| ~trainer.meta_optimizer.weight_decay | 1 | 0.5000 (n=1) |",
    ]


def test_jobs_without_hydra_or_with_a_truncated_record_are_skipped_saying_why(tmp_path, capsys):
    write_job(tmp_path / "0", ["seed=0"], completed(0.5))
    write_job(tmp_path / "1", None, completed(0.6))
    write_job(tmp_path / "2", ["seed=2"], '{"status": "completed", "test": {"mse": {"me')
    write_job(tmp_path / "3", ["seed=3"], "")
    status, rows, err = summarize(capsys, tmp_path)
    assert status == 0 and rows == ["| (none) | 1 | 0.5000 (n=1) |"]
    lines = err.splitlines()
    assert "skipped 1: has no .hydra/overrides.yaml, so which setting it ran is unknown" in lines
    assert any(line.startswith("skipped 2: results.json is truncated or not JSON (") for line in lines)
    assert "skipped 3: results.json is empty (the run was killed while writing it)" in lines


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda root: root / "missing", ["missing does not exist: pass the folder Hydra printed"]),
        (lambda root: (root / "file").touch() or root / "file", ["file is not a folder"]),
        (lambda root: root, ["holds no job folders"]),
        (lambda root: write_job(root / "run", ["seed=0"], completed(0.5)), ["is one run's directory, not a multirun"]),
        (
            lambda root: write_job(root / "0", ["seed=0"], INTERRUPTED).parent,
            ["has test results to summarize (was interrupted by SIGTERM at iteration 4)"],
        ),
    ],
)
def test_a_path_it_cannot_summarize_is_refused_in_one_sentence(tmp_path, capsys, make, words):
    status, _, err = summarize(capsys, make(tmp_path))
    assert_refused(status, err, 2, *words)


def test_as_a_user_types_it_an_empty_path_and_a_broken_sweep(tmp_path):
    """The command line itself: an empty argument is refused; a sweep of broken jobs prints its table."""
    empty = run_script("summarize", "")
    assert_refused(empty.returncode, empty.stderr, 2, "argument sweep_dir: is empty: pass a path")
    write_job(tmp_path / "0", ["~x", "seed=0"], completed(None))
    write_job(tmp_path / "1", None, completed(0.5))
    write_job(tmp_path / "2", ["seed=2"], '{"tru')
    write_job(tmp_path / "3", ["seed=3"], completed(0.25))
    result = run_script("summarize", str(tmp_path))
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "| x=(default) | 1 | 0.2500 (n=1) |" in result.stdout and "summarized 1 of 4 jobs" in result.stderr


def test_a_metric_equal_to_another_in_every_job_is_one_column_naming_both(tmp_path, capsys):
    """Regression: loss == mse in results.json; before, two identical columns."""
    for job, (lr, seed, mse) in enumerate([("0.1", 0, 0.5), ("0.1", 1, 0.7), ("0.2", 0, 0.6), ("0.2", 1, 0.8)]):
        test = {"loss": {"mean": mse}, "mse": {"mean": mse}, "accuracy": {"mean": 1 - mse}}
        write_job(tmp_path / str(job), [f"algo.inner_lr={lr}", f"seed={seed}"], {"status": "completed", "test": test})
    status = script("summarize").main([str(tmp_path)])
    header, _, *rows = capsys.readouterr().out.splitlines()
    assert status == 0 and header == "| swept values | seeds | loss = mse | accuracy |"
    assert rows == [
        f"| algo.inner_lr=0.1 | 2 | {interval([0.5, 0.7])} | {interval([0.5, 0.3])} |",
        f"| algo.inner_lr=0.2 | 2 | {interval([0.6, 0.8])} | {interval([0.4, 0.2])} |",
    ]


def test_metrics_equal_in_some_jobs_only_keep_their_own_columns(tmp_path, capsys):
    write_job(
        tmp_path / "0", ["seed=0"], {"status": "completed", "test": {"loss": {"mean": 1.0}, "mse": {"mean": 1.0}}}
    )
    write_job(
        tmp_path / "1", ["seed=1"], {"status": "completed", "test": {"loss": {"mean": 2.0}, "mse": {"mean": 1.5}}}
    )
    status, rows, _ = summarize(capsys, tmp_path)
    assert status == 0 and rows == [f"| (none) | 2 | {interval([1.0, 2.0])} | {interval([1.0, 1.5])} |"]
