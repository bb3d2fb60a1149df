"""scripts/plot.py on the run directories a kill, a full disk or a read-only mount leaves: what it
draws is what metrics.jsonl completely holds, and what it cannot use is refused in one sentence."""

from __future__ import annotations

import matplotlib
import pytest
import yaml

from metalab.training.sinks import JsonlSink
from tests.helpers.scripts import assert_refused, read_only, run_script, script

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend that draws no window)

PNG = b"\x89PNG\r\n\x1a\n"
VALIDATION = [(1, 0.9, 0.2), (2, 0.7, 0.1), (3, 0.6, 0.1)]


def write_run(run_dir, partial: str = "", algo: str | None = None):
    """metrics.jsonl as JsonlSink writes it (a training and a validation row per iteration), then
    ``partial``: the start of a line a kill cut; with ``algo``, Hydra's config naming that algorithm."""
    sink = JsonlSink(run_dir / "metrics.jsonl")
    for iteration, mse, ci in VALIDATION:
        sink.log({"train/loss": 1.0 / iteration}, iteration)
        sink.log({"val/mse": mse, "val/mse_ci95": ci}, iteration)
    sink.close()
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write(partial)
    if algo is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"algo": {"_target_": algo}}))
    return run_dir


def plot(capsys, *args):
    plt.close("all")
    status = script("plot").main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_a_partial_last_line_is_left_out_and_the_curve_is_the_complete_rows(tmp_path, capsys):
    """Before: JSONDecodeError on the line a kill left half-written."""
    write_run(tmp_path, partial='{"iteration": 4, "val/mse": 0.')
    status, out, err = plot(capsys, tmp_path)
    assert status == 0 and out == f"wrote {tmp_path / 'validation.png'}\n"
    assert err == f"note: left out of {tmp_path / 'metrics.jsonl'}: its partial last line (a run killed mid-write)\n"
    assert (tmp_path / "validation.png").read_bytes()[:8] == PNG
    axes = {axis.get_title(): axis for axis in plt.gcf().axes}  # the training loss has its own panel
    assert axes["val/mse"].lines[0].get_xydata().tolist() == [[i, mse] for i, mse, _ in VALIDATION]


@pytest.mark.parametrize("option", [["--problems", "0"], ["--problems", "-3"], ["--steps", "0"]])
def test_a_count_below_one_is_refused_by_the_argument_parser(tmp_path, capsys, option):
    """Before: --problems 0 ended in ZeroDivisionError."""
    status, _, err = plot(capsys, write_run(tmp_path), *option)
    assert_refused(status, err, 2, f"argument {option[0]}: must be an integer >= 1 (got '{option[1]}')")
    assert not (tmp_path / "validation.png").exists()


def test_a_read_only_run_directory_is_refused_before_drawing_and_out_dir_writes_elsewhere(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    with read_only(run_dir):
        status, _, err = plot(capsys, run_dir)
        assert_refused(status, err, 2, f"cannot write {run_dir} (", "pass --out-dir DIR to write elsewhere")
        status, out, _ = plot(capsys, run_dir, "--out-dir", tmp_path / "figures")
    assert status == 0 and (tmp_path / "figures" / "validation.png").read_bytes()[:8] == PNG
    assert not (run_dir / "validation.png").exists()


def test_a_learned_optimizer_run_without_checkpoint_draws_validation_then_says_why_not_the_curves(tmp_path, capsys):
    write_run(tmp_path, algo="metalab.algorithms.LSTMOptimizer")
    status, out, err = plot(capsys, tmp_path)
    assert out == f"wrote {tmp_path / 'validation.png'}\n"
    assert_refused(status, err, 2, f"{tmp_path} holds no checkpoint.pt")


def written(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda root: root / "missing", ["missing does not exist: pass a run directory"]),
        (lambda root: written(root / "file", b"{}"), ["file is not a folder: pass a run directory"]),
        (lambda root: root, ["holds no metrics.jsonl: pass a run directory"]),
        (lambda root: written(root / "metrics.jsonl", b"").parent, ["has nothing to plot", "no validation value"]),
        (lambda root: written(root / "metrics.jsonl", b"\x00\xffELF\n\x01").parent, ["has nothing to plot"]),
    ],
)
def test_a_run_directory_it_cannot_plot_is_refused_in_one_sentence(tmp_path, capsys, make, words):
    status, _, err = plot(capsys, make(tmp_path))
    assert_refused(status, err, 2, *words)


def test_as_a_user_types_it(tmp_path):
    for args, words in [
        (["", "--problems", "2"], "argument run_dir: is empty: pass a path"),
        ([str(write_run(tmp_path)), "--problems", "0"], "argument --problems: must be an integer >= 1 (got '0')"),
        ([str(tmp_path), "--out-dir", str(tmp_path / "metrics.jsonl")], "is a file: pass a folder"),
    ]:
        result = run_script("plot", *args)
        assert_refused(result.returncode, result.stderr, 2, words)
