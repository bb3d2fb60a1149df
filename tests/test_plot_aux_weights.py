"""scripts/plot_aux_weights.py on runs and multiruns with cut metrics.jsonl files, jobs that never
logged, Hydra delete overrides and outputs it cannot write: the numbers it plots (aux_weights.json)
are those the complete lines hold."""

from __future__ import annotations

import json

import pytest
import yaml

from metalab.training.sinks import JsonlSink
from tests.helpers.scripts import assert_refused, read_only, run_script, script, write_job

WEIGHTS = {1: 0.5, 2: 0.75, 3: 1.25}


def write_weights(run_dir, scale: float = 1.0, partial: str = ""):
    """metrics.jsonl of an algo=auxilearn run: train/weight/helpful = scale * WEIGHTS, then ``partial``."""
    sink = JsonlSink(run_dir / "metrics.jsonl")
    for iteration, weight in WEIGHTS.items():
        sink.log({"train/loss": 1.0, "train/weight/helpful": scale * weight}, iteration)
    sink.close()
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write(partial)
    return run_dir


def plot(capsys, *args):
    status = script("plot_aux_weights").main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_a_partial_last_line_is_left_out_and_the_weights_are_the_complete_rows(tmp_path, capsys):
    """Before: JSONDecodeError on the line a kill left half-written."""
    write_weights(tmp_path, partial='{"iteration": 4, "train/weight/helpful": 9')
    status, out, err = plot(capsys, tmp_path)
    assert status == 0 and out == f"wrote {tmp_path / 'aux_weights.png'}\n"
    assert "its partial last line (a run killed mid-write)" in err
    table = json.loads((tmp_path / "aux_weights.json").read_text())
    assert table == {tmp_path.name: {"helpful": [[i, w] for i, w in WEIGHTS.items()]}}


def test_a_multirun_with_a_silent_job_and_a_delete_override_is_grouped_by_its_settings(tmp_path, capsys):
    """Seeds are averaged within a setting; a job that logged nothing is skipped with a note."""
    for job, (overrides, scale) in enumerate(
        [
            (["algo.combiner=linear", "seed=0"], 1.0),
            (["algo.combiner=linear", "seed=1"], 3.0),
            (["~algo.combiner"], 2.0),
        ]
    ):
        write_weights(write_job(tmp_path / str(job), overrides, None), scale)
    write_job(tmp_path / "3", ["algo.combiner=nonlinear", "seed=0"], None)  # killed before it logged
    status, _, err = plot(capsys, tmp_path)
    assert status == 0 and "note: skipped 3: it holds no metrics.jsonl" in err
    table = json.loads((tmp_path / "aux_weights.json").read_text())
    assert table == {
        "algo.combiner=linear": {"helpful": [[i, 2.0 * w] for i, w in WEIGHTS.items()]},
        "~algo.combiner": {"helpful": [[i, 2.0 * w] for i, w in WEIGHTS.items()]},
    }


def test_a_job_with_a_foreign_overrides_record_is_grouped_alone(tmp_path, capsys):
    write_weights(write_job(tmp_path / "0", ["seed=0"], None))
    (write_job(tmp_path / "1", [], None) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump({"a": 1}))
    write_weights(tmp_path / "1")
    status, _, err = plot(capsys, tmp_path)
    assert status == 0 and "note: grouped 1 alone:" in err and "is not a list of key=value overrides" in err


def test_an_output_it_cannot_write_is_refused_before_anything_is_read(tmp_path, capsys):
    run_dir = write_weights(tmp_path / "run")
    with read_only(run_dir):
        status, _, err = plot(capsys, run_dir)
        assert_refused(status, err, 2, f"cannot write {run_dir / 'aux_weights.png'} (", "pass --out FILE")
        status, _, _ = plot(capsys, run_dir, "--out", tmp_path / "w.png")
    assert status == 0 and json.loads((tmp_path / "w.json").read_text())["run"]["helpful"][0] == [1, 0.5]
    status, _, err = plot(capsys, run_dir, "--out", tmp_path / "w.txt")
    assert_refused(status, err, 2, "--out", "must end in .png, .pdf, .svg")


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda root: root / "missing", ["missing does not exist: pass an algo=auxilearn run or multirun directory"]),
        (lambda root: (root / "file").write_text("x") and root / "file", ["file is not a folder"]),
        (lambda root: root, ["holds no job folders"]),
        (lambda root: write_job(root / "0", ["seed=0"], None).parent, ["no train/weight/<aux> records under"]),
        (
            lambda root: (root / "metrics.jsonl").write_text('{"iteration": 1, "train/loss": 1}\n') and root,
            ["no train"],
        ),
    ],
)
def test_a_path_without_weights_is_refused_in_one_sentence(tmp_path, capsys, make, words):
    status, _, err = plot(capsys, make(tmp_path))
    assert_refused(status, err, 2, *words)


def test_as_a_user_types_it(tmp_path):
    result = run_script("plot_aux_weights", "")
    assert_refused(result.returncode, result.stderr, 2, "argument path: is empty: pass a path")
    result = run_script("plot_aux_weights", str(write_weights(tmp_path, partial="{")))
    assert result.returncode == 0 and "Traceback" not in result.stderr and "partial last line" in result.stderr


def test_a_run_that_logged_its_weights_once_is_drawn_as_markers_and_said_too_short(tmp_path, capsys):
    """Before: one point per curve drew no line, and the figure was blank without a word."""
    import matplotlib.pyplot as plt

    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.log({"train/loss": 1.0, "train/weight/helpful": 0.5, "train/weight/harmful": 0.25}, 5)
    sink.close()
    plt.close("all")
    status, out, err = plot(capsys, tmp_path)
    assert status == 0 and out == f"wrote {tmp_path / 'aux_weights.png'}\n" and "Traceback" not in err
    assert f"note: {tmp_path.name} logged its weights once (harmful at iteration 5, helpful at iteration 5)" in err
    assert "too short to show a trend" in err
    drawn = {axis.get_title(): axis.lines[0] for axis in plt.gcf().axes}
    for name, weight in [("harmful", 0.25), ("helpful", 0.5)]:
        assert drawn[f"auxiliary: {name}"].get_marker() == "o"
        assert drawn[f"auxiliary: {name}"].get_xydata().tolist() == [[5, weight]]
    assert (tmp_path / "aux_weights.png").stat().st_size > 0


def test_a_run_with_a_trend_is_drawn_as_a_line_without_a_note(tmp_path, capsys):
    status, _, err = plot(capsys, write_weights(tmp_path))
    assert status == 0 and "too short" not in err
