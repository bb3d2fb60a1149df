"""scripts/plot.py on the run directories a kill, a full disk or a read-only mount leaves: what it
draws is what metrics.jsonl completely holds, and what it cannot use is refused in one sentence."""

from __future__ import annotations

import json

import matplotlib
import pytest
import yaml
from numpy.testing import assert_allclose

from metalab.training.sinks import JsonlSink
from tests.helpers.configs import TINY
from tests.helpers.runs import run_dirs, run_train
from tests.helpers.scripts import assert_refused, band_edges, read_only, run_script, script, write_job, write_metrics

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


# -- the learning curves: what is drawn, checked against the metrics.jsonl each test writes -------------
REGRESSION = [  # iteration, train/loss, val mse (== val loss), its ci95, val/accuracy
    (10, 4.0, 3.0, 0.5, 0.2),
    (20, 2.0, 0.5, 0.8, 0.4),
    (30, 1.0, 0.2, 0.1, 0.5),
]


def regression_rows(scale: float = 1.0):
    """A run's records: a training row and a validation row per iteration, val/loss == val/mse."""
    rows = []
    for i, train, mse, ci, accuracy in REGRESSION:
        rows.append({"iteration": i, "train/loss": scale * train})
        val = {"val/loss": scale * mse, "val/loss_ci95": ci, "val/mse": scale * mse, "val/mse_ci95": ci}
        rows.append({"iteration": i, **val, "val/accuracy": accuracy, "val/accuracy_ci95": 0.05})
    return rows


def assert_close(drawn, expected):
    assert_allclose(drawn, expected, rtol=1e-12)


def panels_drawn(capsys, path):
    """{panel title: axis} of the validation.png that plot.py drew for ``path``."""
    status, out, err = plot(capsys, path)
    assert status == 0 and "Traceback" not in err and out.startswith(f"wrote {path / 'validation.png'}"), err
    return {axis.get_title(): axis for axis in plt.gcf().axes}


def test_one_run_draws_the_training_loss_and_each_distinct_validation_metric_with_its_ci(tmp_path, capsys):
    axes = panels_drawn(capsys, write_metrics(tmp_path, regression_rows()))
    assert list(axes) == ["train/loss", "val/loss = val/mse", "val/accuracy"]  # loss == mse: one panel
    assert axes["train/loss"].lines[0].get_xydata().tolist() == [[i, t] for i, t, _, _, _ in REGRESSION]
    assert not axes["train/loss"].collections  # no interval is logged for the training loss
    mse = axes["val/loss = val/mse"]
    assert mse.lines[0].get_xydata().tolist() == [[i, m] for i, _, m, _, _ in REGRESSION]
    edges = [(i, m - c, m + c) for i, _, m, c, _ in REGRESSION]
    lowest = min(v for _, *values in edges for v in values if v > 0)  # 0.5 - 0.8 < 0: raised to the lowest drawn
    expected = [(i, low if low > 0 else lowest, high) for i, low, high in edges]
    assert_close(band_edges(mse), expected)
    accuracy = axes["val/accuracy"]
    assert_close(band_edges(accuracy), [(i, a - 0.05, a + 0.05) for i, _, _, _, a in REGRESSION])
    assert "95% CI" in plt.gcf().texts[0].get_text()


@pytest.mark.parametrize(
    "values, scale",
    [
        ([3.0, 0.5, 0.2], "log"),  # positive, 15x: log
        ([3.0, 1.0, 0.5], "linear"),  # positive, 6x: less than a decade
        ([3.0, 0.0, 0.2], "linear"),  # a zero cannot be drawn on a log axis
        ([-3.0, -0.5, -0.02], "linear"),  # a log-likelihood: negative
    ],
)
def test_the_y_axis_is_logarithmic_only_for_positive_data_spanning_a_decade(tmp_path, capsys, values, scale):
    rows = [{"iteration": i, "val/nll": v, "val/nll_ci95": 0.1} for i, v in zip((1, 2, 3), values)]
    axis = panels_drawn(capsys, write_metrics(tmp_path, rows))["val/nll"]
    assert axis.get_yscale() == scale
    if scale == "linear":  # nothing clipped: the band is mean ± ci
        assert_close(band_edges(axis), [(i, v - 0.1, v + 0.1) for i, v in zip((1, 2, 3), values)])
    else:
        low, high = axis.get_ylim()
        assert low > 0.05 and high < 5  # the axis spans the data, not 1e-12


def test_a_metric_equal_to_another_only_at_some_points_keeps_its_own_panel(tmp_path, capsys):
    rows = regression_rows()
    rows[-1]["val/mse"] = 0.25  # differs at the last point
    axes = panels_drawn(capsys, write_metrics(tmp_path, rows))
    assert {"val/loss", "val/mse"} <= set(axes) and "val/loss = val/mse" not in axes


def test_a_sweep_of_two_values_and_two_seeds_draws_each_values_seed_mean_and_spread(tmp_path, capsys):
    scales = {("0.001", "0"): 1.0, ("0.001", "1"): 3.0, ("0.01", "0"): 0.5, ("0.01", "1"): 0.25}
    for job, ((lr, seed), scale) in enumerate(scales.items()):
        run = write_job(tmp_path / f"{job}_lr{lr}_seed{seed}", [f"algo.inner_lr={lr}", f"seed={seed}"], None)
        write_metrics(run, regression_rows(scale))
    write_job(tmp_path / "4_killed", ["algo.inner_lr=0.1", "seed=0"], None)  # killed before it logged
    status, _, err = plot(capsys, tmp_path)
    assert status == 0 and "note: skipped 4_killed: it holds no metrics.jsonl" in err
    axes = {axis.get_title(): axis for axis in plt.gcf().axes}
    assert "min..max over seeds" in plt.gcf().texts[0].get_text()
    mse = axes["val/loss = val/mse"]
    assert [line.get_label() for line in mse.lines] == ["algo.inner_lr=0.001 (2 seeds)", "algo.inner_lr=0.01 (2 seeds)"]
    for index, lr in enumerate(["0.001", "0.01"]):
        seeds = [scales[(lr, "0")], scales[(lr, "1")]]
        drawn = mse.lines[index].get_xydata().tolist()
        assert_close(drawn, [[i, m * sum(seeds) / 2] for i, _, m, _, _ in REGRESSION])
        assert_close(band_edges(mse, index), [(i, m * min(seeds), m * max(seeds)) for i, _, m, _, _ in REGRESSION])
    assert mse.get_yscale() == "log"  # 0.05 .. 9: positive over two decades
    assert axes["train/loss"].lines[1].get_xydata()[:, 1].tolist() == pytest.approx(
        [0.375 * t for _, t, _, _, _ in REGRESSION]
    )


def test_a_one_point_curve_is_drawn_as_a_marker(tmp_path, capsys):
    axes = panels_drawn(capsys, write_metrics(tmp_path, [{"iteration": 5, "val/mse": 0.5, "val/mse_ci95": 0.1}]))
    (line,) = axes["val/mse"].lines
    assert line.get_marker() == "o" and line.get_xydata().tolist() == [[5, 0.5]]


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda root: write_job(root / "0", ["seed=0"], None).parent, ["no job under", "holds a metrics.jsonl"]),
        (
            lambda root: (
                write_metrics(write_job(root / "0", ["seed=0"], None), [{"iteration": 1, "test/mse": 1.0}]).parent
            ),
            ["has nothing to plot", "no job's metrics.jsonl holds a training loss or a validation value"],
        ),
    ],
)
def test_a_multirun_with_nothing_to_draw_is_refused_in_one_sentence(tmp_path, capsys, make, words):
    status, _, err = plot(capsys, make(tmp_path))
    assert_refused(status, err, 2, *words)
    assert not (tmp_path / "validation.png").exists()


def test_a_real_run_of_train_py_is_drawn_from_its_metrics(tmp_path, capsys):
    """End to end: `python train.py` (MAML on sinusoids, tiny) writes the run; plot.py draws what it logged."""
    result = run_train([*TINY, "trainer.iterations=3"], tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path)
    axes = panels_drawn(capsys, run_dir)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [[r["iteration"], r["val/mse"]] for r in logged if "val/mse" in r]
    assert list(axes) == ["train/loss", "val/loss = val/mse"] and len(val) == 3
    assert axes["val/loss = val/mse"].lines[0].get_xydata().tolist() == val
    assert (run_dir / "validation.png").read_bytes()[:8] == PNG


def test_a_setting_keeps_its_colour_in_every_panel_even_where_another_is_missing(tmp_path, capsys):
    """Before: colours were given per panel, so a setting missing from one panel shifted the others'."""
    write_metrics(write_job(tmp_path / "0", ["a=1"], None), [{"iteration": 1, "train/loss": 1.0}])
    rows = [{"iteration": 1, "train/loss": 2.0}, {"iteration": 1, "val/accuracy": 0.5}]
    write_metrics(write_job(tmp_path / "1", ["a=2"], None), rows)
    axes = panels_drawn(capsys, tmp_path)
    colour = {(title, line.get_label()): line.get_color() for title, axis in axes.items() for line in axis.lines}
    assert colour[("val/accuracy", "a=2 (1 seed)")] == colour[("train/loss", "a=2 (1 seed)")]
    assert colour[("train/loss", "a=1 (1 seed)")] != colour[("train/loss", "a=2 (1 seed)")]
    (legend,) = plt.gcf().legends
    assert [text.get_text() for text in legend.get_texts()] == ["a=1 (1 seed)", "a=2 (1 seed)"]
    assert [line.get_color() for line in legend.legend_handles] == [
        colour[("train/loss", f"a={a} (1 seed)")] for a in (1, 2)
    ]
