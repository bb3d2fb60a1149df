"""metalab.training.records: the readers of a run directory the scripts share with JsonlSink, and the
scripts' one-sentence refusal path, on the files a kill, a full disk or another tool leaves."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from metalab.app.cli import CONFIG_DIR
from metalab.app.scripting import positive_int, require_writable, script_main
from metalab.errors import ConfigError, TrainingDiverged
from metalab.training.records import (
    UnusableRecord,
    finite_means,
    read_metrics,
    read_overrides,
    read_results,
    unfinished,
)
from metalab.training.sinks import JsonlSink, count_jsonl_rows, truncate_jsonl
from tests.helpers.scripts import read_only, write_job

ROWS = [{"iteration": 1, "train/loss": 0.5}, {"iteration": 1, "val/mse": 0.25, "val/mse_ci95": None}]


def test_a_partial_last_line_is_left_out_and_said_and_the_sink_counts_the_same_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS) + '{"iteration": 2, "train/lo')
    metrics = read_metrics(path)
    assert metrics.records == ROWS
    assert metrics.skipped == ["its partial last line (a run killed mid-write)"]
    assert count_jsonl_rows(path) == JsonlSink(path).rows == 2  # the sink resumes from the same rows
    assert truncate_jsonl(path, None, last_iteration=1) == 2
    assert read_metrics(path) == (ROWS, [])  # the cut file has no partial line left


def test_complete_lines_that_are_not_json_objects_are_counted_not_fatal(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"not json\n[1, 2]\n\xff\xfe\n" + json.dumps(ROWS[0]).encode() + b"\n\n")
    assert read_metrics(path) == ([ROWS[0]], ["3 lines that are not a JSON object"])


def test_a_missing_metrics_file_is_an_unusable_record(tmp_path):
    with pytest.raises(UnusableRecord) as error:
        read_metrics(tmp_path / "metrics.jsonl")
    assert error.value.reason == "does not exist" and isinstance(error.value, ConfigError)


@pytest.mark.parametrize(
    "text, reason",
    [
        (None, "does not exist"),
        ("", "is empty"),
        ('{"status": "completed", "test": {"mse": {"mean": 0.', "is truncated or not JSON"),
        ("[1, 2]", "holds a JSON list, not a metalab results record"),
    ],
)
def test_an_unreadable_results_json_says_why(tmp_path, text, reason):
    write_job(tmp_path, None, text)
    with pytest.raises(UnusableRecord) as error:
        read_results(tmp_path)
    assert error.value.reason.startswith(reason)
    assert str(error.value).startswith(f"{tmp_path / 'results.json'} {reason}") and "\n" not in str(error.value)


def test_results_json_is_read_as_written(tmp_path):
    record = {"status": "completed", "iteration": 3, "test": {"mse": {"mean": 0.5, "ci95": 0.1}}}
    assert read_results(write_job(tmp_path, None, record)) == record


def test_overrides_of_every_hydra_form(tmp_path):
    """Appending (+, ++), deleting (~key, ~key=value) and plain overrides: keyed by the config key."""
    write_job(tmp_path, ["+a=1", "++b=x=y", "~c", "~d=3", "e=4", "seed=2"], None)
    assert read_overrides(tmp_path) == {"a": "a=1", "b": "b=x=y", "c": "~c", "d": "~d=3", "e": "e=4", "seed": "seed=2"}


def test_a_run_without_hydra_has_no_overrides_and_a_foreign_record_is_unusable(tmp_path):
    assert read_overrides(tmp_path) is None
    write_job(tmp_path, None, None)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("a: 1\n")
    with pytest.raises(UnusableRecord, match="is not a list of key=value overrides"):
        read_overrides(tmp_path)


def test_null_and_nan_means_are_not_values():
    """results.json writes a NaN mean as null; an older file may hold NaN itself."""
    results = json.loads('{"test": {"mse": {"mean": null}, "acc": {"mean": 0.5}, "loss": {"mean": NaN}}}')
    assert finite_means(results, "test") == ({"acc": 0.5}, ["mse", "loss"])
    assert finite_means(results, "val") == ({}, [])


@pytest.mark.parametrize(
    "results, why",
    [
        ({"status": "completed"}, None),
        ({"status": "nonfinite_evaluation"}, None),
        ({}, None),  # a record older than the status field
        (
            {"status": "interrupted", "stopped_by": "SIGTERM", "iteration": 4},
            "was interrupted by SIGTERM at iteration 4",
        ),
        ({"status": "diverged", "iteration": 7}, "diverged at iteration 7"),
    ],
)
def test_unfinished_names_how_a_run_stopped(results, why):
    assert unfinished(results) == why


def test_positive_int_refuses_zero_and_negative():
    assert positive_int("3") == 3
    for text in ("0", "-1", "x", ""):
        with pytest.raises(Exception, match=f"must be an integer >= 1 \\(got {text!r}\\)"):
            positive_int(text)


def test_a_read_only_folder_is_refused_and_a_writable_one_left_as_it_was(tmp_path):
    require_writable(tmp_path, "--out-dir DIR", folder=True)
    require_writable(tmp_path / "eval.json", "--output FILE")
    assert list(tmp_path.iterdir()) == []  # the probes left nothing behind
    with read_only(tmp_path):
        with pytest.raises(ConfigError) as error:
            require_writable(tmp_path / "eval.json", "--output FILE")
    assert str(error.value).startswith(f"cannot write {tmp_path / 'eval.json'} (")
    assert str(error.value).endswith("): pass --output FILE to write elsewhere.")
    with pytest.raises(ConfigError, match=f"cannot write {tmp_path} \\(a folder, not a file\\): pass --output FILE"):
        require_writable(tmp_path, "--output FILE")


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize(
    "fails, status, words",
    [
        (lambda: (_ for _ in ()).throw(ConfigError("tasks.dim must be >= 1.")), 2, ["tasks.dim must be >= 1."]),
        (lambda: (_ for _ in ()).throw(TrainingDiverged("the loss became NaN.")), 1, ["the loss became NaN."]),
        (lambda: _compose(["tasks=nope"]), 2, ["Could not find 'tasks/nope'", "quadratic, sinusoid"]),
        (lambda: _compose(["nokey=1"]), 2, ["Could not override 'nokey'; To append to your config use +nokey=1"]),
        (lambda: open("/nonexistent/x"), 1, ["cannot use /nonexistent/x (No such file or directory)"]),
    ],
)
def test_script_main_prints_one_sentence_and_returns_the_status(capsys, fails, status, words):
    main = script_main(lambda argv: fails())
    assert main([]) == status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word in err


def test_script_main_lets_a_bug_keep_its_traceback():
    with pytest.raises(ZeroDivisionError):
        script_main(lambda argv: 1 / 0)([])
