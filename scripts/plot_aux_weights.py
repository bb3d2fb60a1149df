"""The effective weight of each auxiliary task over training (``train/weight/<aux>`` in metrics.jsonl,
logged by algo=auxilearn), as a PNG: one panel per auxiliary, one line per combiner (the mean over
seeds, with a band from the lowest to the highest seed when there are several).

    python scripts/plot_aux_weights.py PATH [--out weights.png]      # PATH: a run or multirun directory

A multirun's jobs are grouped by algo.combiner (and any other swept value but the seed); the
figure goes to <dir>/aux_weights.png unless --out says otherwise; the numbers plotted go beside it,
as aux_weights.json. A job without metrics.jsonl is left out, and a partial last line (a run killed
mid-write) is; each with a note on stderr. A curve of one point is drawn as a marker, and a run that
logged its weights once is said (on stderr) to be too short to show a trend. An output that cannot be
written is refused before anything is read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from metalab.app.scripting import ScriptParser, path_argument, require_writable, script_main
from metalab.checkpoint import METRICS
from metalab.errors import ConfigError, MetalabError, require
from metalab.training.curves import marker_style
from metalab.training.records import group_runs, numeric_points, read_metrics, runs_with_metrics

PREFIX = "train/weight/"
USAGE = "python scripts/plot_aux_weights.py PATH [--out weights.png]"
FORMATS = (".png", ".pdf", ".svg")
REMEDY = "pass an algo=auxilearn run or multirun directory"


def weight_curves(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{aux name: (iterations, weights)} from one run's metrics.jsonl, with a note on stderr for
    what was left out of it (a partial last line)."""
    metrics = read_metrics(run_dir / METRICS)
    for skipped in metrics.skipped:
        print(f"note: left out of {run_dir / METRICS}: {skipped}", file=sys.stderr)
    keys = sorted({key for record in metrics.records for key in record if key.startswith(PREFIX)})
    curves = {}
    for key in keys:
        points = numeric_points(metrics.records, key)
        curves[key[len(PREFIX) :]] = ([int(i) for i, _, _ in points], [value for _, value, _ in points])
    return curves


def collect(path: Path) -> dict[str, dict[str, dict[int, list[float]]]]:
    """{group label: {aux name: {iteration: [weight per seed]}}} of a run or a multirun directory,
    with a note on stderr for each job left out or grouped alone."""
    runs, notes = runs_with_metrics(path, REMEDY)
    groups, grouping_notes = group_runs(runs)
    for note in notes + grouping_notes:
        print(f"note: {note}", file=sys.stderr)
    table: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for group, members in groups.items():
        for run in members:
            for name, (iterations, weights) in weight_curves(run).items():
                for iteration, weight in zip(iterations, weights):
                    table[group][name][iteration].append(weight)
    return table


def too_short(groups: dict[str, dict[str, dict[int, list[float]]]]) -> list[str]:
    """The groups whose every weight curve has one point: too short to show a trend."""
    return [group for group, curves in groups.items() if curves and max(len(points) for points in curves.values()) < 2]


@script_main
def main(argv: list[str]) -> int:
    parser = ScriptParser(USAGE, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=path_argument, help="a run directory or a multirun directory")
    parser.add_argument("--out", type=path_argument, default=None, help="the PNG (default <path>/aux_weights.png)")
    args = parser.parse_args(argv)
    why = "is not a folder" if args.path.exists() else "does not exist"
    require(args.path.is_dir(), f"{args.path} {why}: {REMEDY}.")
    out = args.out or args.path / "aux_weights.png"
    require(out.suffix in FORMATS, f"--out {out} must end in {', '.join(FORMATS)}: name the figure's format.")
    require_writable(out, "--out FILE")
    require_writable(out.with_suffix(".json"), "--out FILE")
    try:
        import matplotlib
    except ImportError:
        raise MetalabError("scripts/plot_aux_weights.py needs matplotlib: pip install matplotlib.") from None
    groups = collect(args.path)
    names = sorted({name for curves in groups.values() for name in curves})
    if not names:
        raise ConfigError(f"no {PREFIX}<aux> records under {args.path}: {REMEDY}.")
    for group in too_short(groups):
        only = ", ".join(f"{name} at iteration {next(iter(curve))}" for name, curve in sorted(groups[group].items()))
        print(
            f"note: {group} logged its weights once ({only}): too short to show a trend; train longer or log "
            "more often (trainer.log_every).",
            file=sys.stderr,
        )
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    table: dict[str, dict[str, list[list[float]]]] = {}
    for axis, name in zip(axes[0], names):
        for group, curves in sorted(groups.items()):
            if name not in curves:
                continue
            iterations = sorted(curves[name])
            per_seed = [curves[name][i] for i in iterations]
            means = [sum(v) / len(v) for v in per_seed]
            (line,) = axis.plot(iterations, means, label=group, **marker_style(len(iterations)))
            if any(len(v) > 1 for v in per_seed):
                axis.fill_between(
                    iterations,
                    [min(v) for v in per_seed],
                    [max(v) for v in per_seed],
                    color=line.get_color(),
                    alpha=0.2,
                )
            table.setdefault(group, {})[name] = [[i, m] for i, m in zip(iterations, means)]
        axis.set(title=f"auxiliary: {name}", xlabel="primary step", ylabel="effective weight (main = 1)")
        axis.axhline(0.0, color="grey", linewidth=0.5)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
