"""Print one table of a multirun: rows grouped by the swept values (all but seed), each metric as
the mean over seeds ± t std / sqrt(seeds), the 95% confidence interval of Student's t with
seeds - 1 degrees of freedom (a few seeds: t_{0.975,1} = 12.71, t_{0.975,4} = 2.776, not 1.96).

    python scripts/summarize.py outputs/multirun/2026-11-22/10-00-00 [--split test]

Only real values count: a job without results.json (still running, killed), with an unreadable one,
an interrupted or diverged job, and a metric whose mean is null (NaN) are left out, one line each on
stderr saying why. "seeds" is the number of jobs counted in the row; a cell with fewer values says
"(n=...)", and one value has no interval: "0.5000 (n=1)". A metric whose value equals another's in
every job (a regression's loss and mse) is one column, headed with both names ("loss = mse").
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

import torch

from metalab.app.scripting import ScriptParser, path_argument, script_main
from metalab.checkpoint import RESULTS
from metalab.errors import ConfigError, require
from metalab.training.curves import merge_identical
from metalab.training.evaluation import confidence_interval
from metalab.training.records import (
    OVERRIDES,
    UnusableRecord,
    finite_means,
    job_dirs,
    read_overrides,
    read_results,
    swept_keys,
    unfinished,
)


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


class Job(NamedTuple):
    """One job folder of the multirun: its overrides ({key: override}) and, when it counts, its
    {metric: finite mean}; ``note`` says what was left out of it and why (None: nothing)."""

    name: str
    settings: dict[str, str]
    values: dict[str, float] | None
    note: str | None


def read_job(job_dir: Path, split: str) -> Job:
    """What one job contributes: the finite means of ``split`` of a run that ended; nothing (and the
    reason) for a job without results, an unreadable record, an interrupted or diverged run."""
    try:
        settings = read_overrides(job_dir)
    except UnusableRecord as error:
        return Job(job_dir.name, {}, None, f"{OVERRIDES} {error.reason}")
    try:
        results = read_results(job_dir)
    except UnusableRecord as error:
        return Job(job_dir.name, settings or {}, None, f"{error.path.name} {error.reason}")
    if settings is None:
        return Job(job_dir.name, {}, None, f"has no {OVERRIDES}, so which setting it ran is unknown")
    if why := unfinished(results):
        return Job(job_dir.name, settings, None, why)
    values, nulls = finite_means(results, split)
    if not values:
        why = f"its {split} metrics are all null (NaN or infinite)" if nulls else f"has no {split} metrics"
        return Job(job_dir.name, settings, None, why)
    note = f"{', '.join(f'{split}/{m}' for m in nulls)} null (NaN or infinite), left out" if nulls else None
    return Job(job_dir.name, settings, values, note)


def collect(jobs: list[Job]) -> tuple[dict[tuple[str, ...], list[dict[str, float]]], list[str]]:
    """{swept settings but seed: [{metric: mean} of each job that counts]} and the metric names.
    Swept = a key whose override differs between jobs, those without results included, so that a
    setting whose jobs all failed keeps its row (with no seeds)."""
    swept = swept_keys([job.settings for job in jobs])
    groups: dict[tuple[str, ...], list[dict[str, float]]] = defaultdict(list)
    metrics: list[str] = []
    for job in jobs:
        if not job.settings and job.values is None:
            continue  # neither a setting nor a value: it names no row
        group = groups[tuple(job.settings.get(key, f"{key}=(default)") for key in swept)]
        if job.values is not None:
            group.append(job.values)
            metrics += [metric for metric in job.values if metric not in metrics]
    return groups, metrics


def cell(values: list[float], seeds: int) -> str:
    """mean ± t-interval; one value has no interval ("(n=1)"); n is named when below the row's seeds."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f} (n=1)"
    text = "{:.4f} ± {:.4f}".format(*seed_interval(values))
    return text if len(values) == seeds else f"{text} (n={len(values)})"


@script_main
def main(argv: list[str]) -> int:
    parser = ScriptParser(
        "python scripts/summarize.py SWEEP_DIR [--split test]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep_dir", type=path_argument, help="a multirun directory (holds one folder per job)")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    args = parser.parse_args(argv)
    remedy = "pass the folder Hydra printed for the multirun (it holds one folder per job)"
    require(
        not (args.sweep_dir / RESULTS).is_file() and not (args.sweep_dir / OVERRIDES).is_file(),
        f"{args.sweep_dir} is one run's directory, not a multirun: {remedy}.",
    )
    jobs = [read_job(job_dir, args.split) for job_dir in job_dirs(args.sweep_dir, remedy)]
    groups, metrics = collect(jobs)
    counted = sum(job.values is not None for job in jobs)
    if not counted:
        reasons = Counter(job.note for job in jobs)
        listed = "; ".join(f"{count} {reason}" if count > 1 else reason for reason, count in reasons.items())
        raise ConfigError(f"no job under {args.sweep_dir} has {args.split} results to summarize ({listed}): {remedy}.")
    for job in jobs:
        if job.note:
            print(f"{'skipped' if job.values is None else 'partly used'} {job.name}: {job.note}", file=sys.stderr)
    if counted < len(jobs):
        print(f"summarized {counted} of {len(jobs)} jobs", file=sys.stderr)
    rows = sorted(groups.items())
    columns = {metric: tuple(tuple(run.get(metric) for run in runs) for _, runs in rows) for metric in metrics}
    merged = merge_identical(columns)  # a metric equal to another in every job (a regression's loss and mse): once
    print("| swept values | seeds | " + " | ".join(" = ".join(names) for names in merged) + " |")
    print("|---|---|" + "---|" * len(merged))
    for key, runs in rows:
        cells = [cell([run[names[0]] for run in runs if names[0] in run], len(runs)) for names in merged]
        print(f"| {' '.join(key) or '(none)'} | {len(runs)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
