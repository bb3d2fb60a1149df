"""Figures of a run or a multirun directory (matplotlib, PNG), written into it:

    python scripts/plot.py PATH [--problems 100] [--steps N] [--checkpoint best|last] [--out-dir DIR]

- validation.png (any run of any algorithm): the learning curves from metrics.jsonl, one panel per
  distinct metric: the training loss and every validation metric against the iteration. One run:
  the validation mean with its 95% CI band (val/<m>_ci95). A multirun: its runs grouped by the values
  swept (the seed excepted), each group's mean over seeds with a band from the lowest to the highest
  seed. A metric equal to another at every point (a regression's loss and mse) is drawn once, its
  panel titled with both names; the y-axis is logarithmic only where every line is positive and spans
  more than a decade (see metalab.training.curves).
- loss_vs_step.png (a learned-optimizer run on an optimizee family): the loss against optimizee
  step, the mean over ``--problems`` test problems (the trainer's test problems: the same seed) with
  the band from the 25th to the 75th percentile, of the learned rule and of every baseline the family
  has tuned rates for, as in the paper's Figures 2-5; the numbers also go to loss_vs_step.json.

The figures go into PATH, or into ``--out-dir`` (a read-only directory is refused before anything is
drawn). A partial last line of metrics.jsonl (a run killed mid-write) is left out, and a job of a
multirun without metrics.jsonl is, each with a note on stderr.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

from metalab.app.scripting import ScriptParser, path_argument, positive_int, require_writable, script_main
from metalab.checkpoint import METRICS, has_checkpoint
from metalab.errors import ConfigError, MetalabError, require
from metalab.training.curves import Curve, Panel, curve_panels, make_panel, marker_style
from metalab.training.evaluation import confidence_interval, episode_seed
from metalab.training.records import UnusableRecord, group_runs, read_config, read_metrics, runs_with_metrics

USAGE = "python scripts/plot.py PATH [--problems 100] [--steps N] [--checkpoint best|last] [--out-dir DIR]"
REMEDY = "pass a run directory or a multirun directory"


def draw(
    axis, panel: Panel, ylabel: str | None = None, alpha: float = 0.2, colors: dict[str, str] | None = None
) -> None:
    """``panel`` on ``axis``: each curve a line (markers on a short one) and its band, in one colour
    (``colors[label]``: the same in every panel, where a group may be missing)."""
    for curve in panel.curves:
        style = {"color": colors[curve.label]} if colors else {}
        (line,) = axis.plot(curve.x, curve.y, label=curve.label, **style, **marker_style(len(curve.x)))
        if curve.lo is not None and curve.hi is not None:
            axis.fill_between(curve.x, curve.lo, curve.hi, color=line.get_color(), alpha=alpha, linewidth=0)
    axis.set(yscale=panel.scale, title=panel.title, xlabel="iteration", ylabel=ylabel or panel.keys[0].split("/")[-1])
    axis.grid(True, which="major", alpha=0.3)


def plot_learning_curves(panels: list[Panel], title: str, legend: bool, out_dir: Path, plt) -> Path:
    """validation.png: one panel per metric, two columns when there are more than one; with ``legend``
    (a sweep), one legend of the groups under the panels, long labels wrapped."""
    columns = 1 if len(panels) == 1 else 2
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.2 * rows + 0.4), squeeze=False)
    groups = list(dict.fromkeys(curve.label for panel in panels for curve in panel.curves))
    colors = {label: f"C{index % 10}" for index, label in enumerate(groups)}
    for axis, panel in zip(axes.flat, panels):
        draw(axis, panel, colors=colors)
    for axis in axes.flat[len(panels) :]:
        axis.remove()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    if legend:
        handles = {line.get_label(): line for axis in reversed(figure.axes) for line in axis.lines}
        handles = {label: handles[label] for label in groups}
        labels = [textwrap.fill(label, 100, subsequent_indent="  ") for label in handles]
        figure.legend(list(handles.values()), labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8)
    path = out_dir / "validation.png"
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return path


def learned_optimizer_run(run_dir: Path) -> bool:
    """Whether the run's saved config names algo=lstm_optimizer; without .hydra/config.yaml, whether it
    has a checkpoint (which then decides)."""
    config = read_config(run_dir)
    if config is None:
        return has_checkpoint(run_dir)
    algo = config.get("algo")
    return isinstance(algo, dict) and str(algo.get("_target_", "")).endswith("LSTMOptimizer")


def learned_optimizer_sweep(runs: list[Path]) -> bool:
    """Whether any of a multirun's jobs is a learned-optimizer run (a job whose config is unreadable: not)."""
    readable = []
    for run in runs:
        try:
            readable.append(learned_optimizer_run(run))
        except UnusableRecord:
            readable.append(False)
    return any(readable)


def plot_curves(run_dir: Path, problems: int, steps: int | None, checkpoint: str, out_dir: Path, plt) -> Path | None:
    """loss_vs_step.png and .json of a learned-optimizer run on an optimizee family; None otherwise."""
    if not learned_optimizer_run(run_dir):
        return None
    from metalab.algorithms import LSTMOptimizer
    from metalab.inference import load_run
    from metalab.tasks.optimizees.base import OptimizeeTasks

    tasks, algorithm, cfg = load_run(run_dir, device="cpu", checkpoint=checkpoint)
    if not isinstance(algorithm, LSTMOptimizer) or not isinstance(tasks, OptimizeeTasks):
        return None
    batch = tasks.sample(problems, "test", tasks.generator(episode_seed(cfg.trainer.eval_seed, "test")))
    summary, lines = {}, []
    for name, curve in algorithm.curves(batch, steps).items():
        stats = [confidence_interval(curve[:, step]) for step in range(curve.shape[1])]
        means, cis = (torch.tensor(column) for column in zip(*stats))
        low, high = torch.quantile(curve.double(), torch.tensor([0.25, 0.75], dtype=torch.float64), dim=0)
        summary[name] = {"mean": means.tolist(), "ci95": cis.tolist(), "q25": low.tolist(), "q75": high.tolist()}
        label = f"{name} (lr {tasks.baseline_lrs[name]:g})" if name in tasks.baseline_lrs else "learned (LSTM)"
        lines.append(Curve(label, list(range(len(means))), means.tolist(), low.tolist(), high.tolist()))
    figure, axis = plt.subplots(figsize=(8, 4))
    draw(axis, make_panel((f"{type(tasks).__name__}: {problems} test problems",), lines), ylabel="loss", alpha=0.12)
    axis.set(xlabel="optimizee step")
    legend = {"title": "mean over problems;\nband: 25th-75th\npercentile", "title_fontsize": 8, "fontsize": 8}
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), **legend)
    figure.tight_layout()
    path = out_dir / "loss_vs_step.png"
    figure.savefig(path, dpi=100)
    (out_dir / "loss_vs_step.json").write_text(json.dumps({"problems": problems, "curves": summary}, indent=1))
    return path


def learning_curves(path: Path) -> tuple[list[Panel], str, bool, list[Path]]:
    """(the panels of validation.png, its title, whether it needs a legend, the runs read) of a run
    or a multirun directory, with a note on stderr for each line or job left out."""
    runs, notes = runs_with_metrics(path, REMEDY)
    require(runs, f"no job under {path} holds a {METRICS} (none has logged yet): {REMEDY}.")
    groups, grouping_notes = group_runs(runs)
    for note in notes + grouping_notes:
        print(f"note: {note}", file=sys.stderr)
    records: dict[str, list[list[dict[str, Any]]]] = {}
    for label, members in groups.items():
        for run in members:
            metrics = read_metrics(run / METRICS)
            for skipped in metrics.skipped:
                print(f"note: left out of {run / METRICS}: {skipped}", file=sys.stderr)
            records.setdefault(label, []).append(metrics.records)
    if len(runs) == 1:
        return (
            curve_panels(records),
            f"{runs[0].name}: band = 95% CI of the validation mean (val/<m>_ci95)",
            False,
            runs,
        )
    seeds = sorted({len(members) for members in groups.values()})
    named = {
        f"{label} ({len(members)} seed{'s' * (len(members) > 1)})": records[label] for label, members in groups.items()
    }
    band = "band = min..max over seeds" if seeds[-1] > 1 else "one seed each: no band"
    title = f"{path.name}: {len(runs)} runs; line = mean over seeds, {band}"
    return curve_panels(named), title, True, runs


@script_main
def main(argv: list[str]) -> int:
    parser = ScriptParser(USAGE, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=path_argument)
    parser.add_argument("--problems", type=positive_int, default=100)
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="optimizee steps (default: the run's eval_optimizee_steps)"
    )
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    parser.add_argument("--out-dir", type=path_argument, default=None, help="where the figures go (default: PATH)")
    args = parser.parse_args(argv)
    path = args.run_dir
    why = "is not a folder" if path.exists() else "does not exist"
    require(path.is_dir(), f"{path} {why}: {REMEDY}.")
    jobs = [child for child in path.iterdir() if child.is_dir() and not child.name.startswith(".")]
    require((path / METRICS).is_file() or jobs, f"{path} holds no {METRICS}: {REMEDY}.")
    out_dir = args.out_dir or path
    if args.out_dir is not None:
        require(not out_dir.is_file(), f"--out-dir {out_dir} is a file: pass a folder.")
        out_dir.mkdir(parents=True, exist_ok=True)
    require_writable(out_dir, "--out-dir DIR", folder=True)
    try:
        import matplotlib
    except ImportError:
        raise MetalabError("scripts/plot.py needs matplotlib: pip install matplotlib.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels, title, legend, runs = learning_curves(path)
    if panels:
        print(f"wrote {plot_learning_curves(panels, title, legend, out_dir, plt)}")
    curves = plot_curves(path, args.problems, args.steps, args.checkpoint, out_dir, plt) if runs == [path] else None
    if runs != [path] and learned_optimizer_sweep(runs):
        print(f"note: loss_vs_step.png is drawn for one run: pass a job's folder, e.g. {runs[0]}", file=sys.stderr)
    if curves is not None:
        print(f"wrote {curves}")
    elif not panels:
        single = runs == [path]
        what = (
            f"its {METRICS} holds no training loss and no validation value"
            if single
            else (f"no job's {METRICS} holds a training loss or a validation value")
        )
        raise ConfigError(
            f"{path} has nothing to plot: {what} (stopped before logging) and it is no learned-optimizer run: "
            "plot it after trainer.log_every iterations or an evaluation."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
