"""scripts/reproduce.py when a run it launched fails, and on output folders holding runs a kill cut short:
the failure reaches the exit status, and an unreadable record is skipped with a note, not a traceback."""

from __future__ import annotations

import pytest

from tests.helpers.scripts import assert_refused, completed, run_script, script, write_job

EXPERIMENT = ["+experiment=maml_sinusoid", "trainer.iterations=2"]


def test_an_unreadable_results_json_is_skipped_with_a_note_and_the_readable_run_is_shown(tmp_path, capsys):
    good = write_job(tmp_path / "a" / "good", EXPERIMENT, completed(0.5, metric="mse@1"))
    write_job(tmp_path / "b" / "cut", EXPERIMENT, '{"status": "completed", "test": {"mse@1": {"mean": 0.')
    write_job(tmp_path / "c" / "other", ["+experiment=lstm_mnist"], "")  # another experiment's: not looked at
    (found,) = script("reproduce").runs_of("maml_sinusoid", [tmp_path])
    assert found == (good.resolve(), ["trainer.iterations=2"], completed(0.5, metric="mse@1"))
    err = capsys.readouterr().err
    assert err.startswith("note: skipped ") and "cut: results.json is truncated or not JSON (" in err
    assert err.count("\n") == 1


def test_a_run_that_swaps_a_config_group_is_another_method_not_the_row(tmp_path, capsys):
    """+experiment=maml_sinusoid algo=anil is ANIL on MAML's settings: newer, it must not fill MAML's cell."""
    maml = write_job(tmp_path / "a" / "maml", EXPERIMENT, completed(0.5, metric="mse@1"))
    write_job(tmp_path / "b" / "anil", [*EXPERIMENT, "algo=anil"], completed(0.1, metric="mse@1"))
    (found,) = script("reproduce").runs_of("maml_sinusoid", [tmp_path])
    assert found[0] == maml.resolve()
    assert capsys.readouterr().err.strip().endswith("anil is not a run of maml_sinusoid: it swaps algo=anil")


def test_a_record_without_config_or_iteration_still_makes_a_row(tmp_path):
    """An interrupted or older results.json lacks keys the row once indexed (KeyError)."""
    write_job(tmp_path / "run", ["+experiment=maml_sinusoid", "~trainer.foo"], {"status": "interrupted", "test": {}})
    rows = script("reproduce").rows("maml_sinusoid", [tmp_path])
    assert rows and all(" | (interrupted) | " in row and row.endswith(" (~trainer.foo) |") for row in rows)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--outputs", "MISSING"], ["--outputs ", "missing does not exist: pass a folder that holds runs"]),
        (["--outputs", ""], ["argument --outputs: is empty: pass a path"]),
        (["--run", "nope"], ["no experiment named nope; choose from ", "maml_sinusoid"]),
        (["--run"], ["--run needs the experiments to run", "or pass --run all; the experiments are ", "lstm_mnist"]),
    ],
)
def test_a_path_or_name_it_cannot_use_is_refused_in_one_sentence(tmp_path, capsys, args, words):
    args = [arg.replace("MISSING", str(tmp_path / "missing")) for arg in args]
    status = script("reproduce").main(args)
    assert_refused(status, capsys.readouterr().err, 2, *words)


def test_a_child_killed_by_a_signal_reports_the_shells_status():
    from metalab.app.scripting import exit_status

    assert exit_status(-15) == 143 and exit_status(2) == 2 and exit_status(-9) == 137


@pytest.mark.slow
def test_a_failed_run_is_named_and_its_status_is_the_scripts(tmp_path):
    """Before: "warning: ... failed", then exit status 0."""
    result = run_script("reproduce", "--run", "maml_sinusoid", "--", "trainer.iterations=-1", cwd=tmp_path)
    assert "| experiment | metric | paper |" in result.stdout  # the table is still printed
    assert_refused(
        result.returncode,
        result.stderr,
        2,
        "the run of maml_sinusoid (exit status 2, in outputs/reproduce/maml_sinusoid) failed: see its output above",
    )
