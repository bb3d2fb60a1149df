"""Print one table of a multirun: rows grouped by the swept values (all but seed), each metric as
the mean over seeds ± t std / sqrt(seeds), the 95% confidence interval of Student's t with
seeds - 1 degrees of freedom (a few seeds: t_{0.975,1} = 12.71, t_{0.975,4} = 2.776, not 1.96).

    python scripts/summarize.py outputs/multirun/2026-11-22/10-00-00 [--split test]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import yaml

from metalab.training.evaluation import confidence_interval


def student_t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (scipy, installed with the sweep
    extra); a one-sentence error when scipy is missing."""
    try:
        from scipy.stats import t
    except ImportError:
        sys.exit("error: scripts/summarize.py needs scipy for Student's t: pip install scipy (or metalab[sweep]).")
    return float(t.ppf(p, df))


def seed_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval) of one value per seed (0 for one seed)."""
    mean, normal_ci = confidence_interval(torch.tensor(values))  # 1.96 * std / sqrt(n)
    return mean, normal_ci / 1.96 * student_t_quantile(0.975, len(values) - 1) if len(values) > 1 else 0.0


def collect(sweep_dir: Path, split: str) -> tuple[dict[tuple[str, ...], list[dict[str, float]]], list[str]]:
    """{swept values but seed: [per-seed {metric: mean}]} and the metric names, from each job's
    results.json and .hydra/overrides.yaml. Swept = an override whose value differs between jobs."""
    jobs = []
    for results_file in sorted(sweep_dir.glob("*/results.json")):
        overrides = yaml.safe_load((results_file.parent / ".hydra" / "overrides.yaml").read_text()) or []
        settings = dict(o.lstrip("+").split("=", 1) for o in overrides)
        jobs.append((settings, json.loads(results_file.read_text()).get(split, {})))
    keys = sorted({k for settings, _ in jobs for k in settings})
    swept = [k for k in keys if k != "seed" and len({settings.get(k) for settings, _ in jobs}) > 1]
    groups: dict[tuple[str, ...], list[dict[str, float]]] = defaultdict(list)
    metrics: list[str] = []
    for settings, results in jobs:
        values = {name: entry["mean"] for name, entry in results.items()}
        metrics += [m for m in values if m not in metrics]
        groups[tuple(f"{k}={settings.get(k)}" for k in swept)].append(values)
    return groups, metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (holds one folder per job)")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    args = parser.parse_args(argv)
    groups, metrics = collect(args.sweep_dir, args.split)
    if not groups:
        print(
            f"error: no */results.json under {args.sweep_dir}: pass the folder Hydra printed for the multirun.",
            file=sys.stderr,
        )
        return 2
    print("| swept values | seeds | " + " | ".join(metrics) + " |")
    print("|---|---|" + "---|" * len(metrics))
    for key, runs in sorted(groups.items()):
        cells = []
        for metric in metrics:
            values = [run[metric] for run in runs if metric in run]
            cells.append("{:.4f} ± {:.4f}".format(*seed_interval(values)) if values else "-")
        print(f"| {' '.join(key) or '(none)'} | {len(runs)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
