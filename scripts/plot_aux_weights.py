"""The effective weight of each auxiliary task over training (``train/weight/<aux>`` in metrics.jsonl,
logged by algo=auxilearn), as a PNG: one panel per auxiliary, one line per combiner (the mean over
seeds, with a band from the lowest to the highest seed when there are several).

    python scripts/plot_aux_weights.py <run dir or multirun dir> [--out weights.png]

A multirun's jobs are grouped by algo.combiner (and any other swept value but the seed); the
figure goes to <dir>/aux_weights.png unless --out says otherwise; the numbers plotted go beside it,
as aux_weights.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import yaml

PREFIX = "train/weight/"


def weight_curves(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{aux name: (iterations, weights)} from one run's metrics.jsonl."""
    curves: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        for key, value in record.items():
            if key.startswith(PREFIX) and value is not None:
                curves[key[len(PREFIX) :]][0].append(record["iteration"])
                curves[key[len(PREFIX) :]][1].append(value)
    return dict(curves)


def settings(run_dir: Path) -> dict[str, str]:
    """The run's command-line overrides, from Hydra's record ({} when it has none)."""
    overrides = run_dir / ".hydra" / "overrides.yaml"
    items = (yaml.safe_load(overrides.read_text()) or []) if overrides.is_file() else []
    return dict(o.lstrip("+").split("=", 1) for o in items)


def collect(path: Path) -> dict[str, dict[str, dict[int, list[float]]]]:
    """{group label: {aux name: {iteration: [weight per seed]}}} of a run or a multirun directory."""
    runs = [path] if (path / "metrics.jsonl").is_file() else sorted(p.parent for p in path.glob("*/metrics.jsonl"))
    runs_settings = [settings(run) for run in runs]
    keys = sorted({k for s in runs_settings for k in s})
    swept = [k for k in keys if k != "seed" and len({s.get(k) for s in runs_settings}) > 1]
    groups: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for run, run_settings in zip(runs, runs_settings):
        group = " ".join(f"{k}={run_settings.get(k)}" for k in swept) or run.name
        for name, (iterations, weights) in weight_curves(run).items():
            for iteration, weight in zip(iterations, weights):
                groups[group][name][iteration].append(weight)
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a run directory or a multirun directory")
    parser.add_argument("--out", type=Path, default=None, help="the PNG (default <path>/aux_weights.png)")
    args = parser.parse_args(argv)
    groups = collect(args.path)
    names = sorted({name for curves in groups.values() for name in curves})
    if not names:
        print(
            f"error: no {PREFIX}<aux> records under {args.path}: pass an algo=auxilearn run or multirun directory.",
            file=sys.stderr,
        )
        return 2
    try:
        import matplotlib
    except ImportError:
        print("error: scripts/plot_aux_weights.py needs matplotlib: pip install matplotlib.", file=sys.stderr)
        return 2
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
            (line,) = axis.plot(iterations, means, label=group)
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
    out = args.out or args.path / "aux_weights.png"
    figure.savefig(out, dpi=120)
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
