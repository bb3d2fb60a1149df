"""The reading side of a run directory, for the scripts that summarise, plot and compare runs:
metrics.jsonl (what ``JsonlSink`` wrote, a partial last line left out), results.json (what
``write_results`` wrote) and Hydra's records of the command line (.hydra/overrides.yaml, config.yaml).
A file that cannot be read as what metalab writes there is an ``UnusableRecord`` whose ``reason`` says
why in a few words, so a script can skip one job of a multirun with a line, or refuse a single run in
one sentence.

The scripts' own refusal path (one-sentence argparse errors, ``script_main``) is ``metalab.app.scripting``.

    rows = read_metrics(run_dir / METRICS)   # rows.records: list of dicts; rows.skipped: what was left out
    results = read_results(run_dir)          # dict, or UnusableRecord("is truncated or not JSON ...")
    overrides = read_overrides(run_dir)      # {"algo.inner_lr": "algo.inner_lr=0.1", "foo": "~foo"} or None
    runs, notes = runs_with_metrics(path, remedy)   # a run, or the jobs of a multirun that logged
    groups, notes = group_runs(runs)         # {"algo.inner_lr=0.1": [seed 0's dir, seed 1's dir], ...}
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from metalab.checkpoint import METRICS, RESULTS
from metalab.errors import ConfigError

__all__ = [
    "CONFIG",
    "FINISHED",
    "OVERRIDES",
    "MetricRows",
    "UnusableRecord",
    "complete_lines",
    "finite_means",
    "group_runs",
    "job_dirs",
    "numeric_points",
    "read_config",
    "read_metrics",
    "read_overrides",
    "read_results",
    "runs_with_metrics",
    "swept_keys",
    "unfinished",
]

#: Hydra's record of a run's command-line overrides, inside the run directory.
OVERRIDES = Path(".hydra") / "overrides.yaml"
#: Hydra's record of a run's composed config.
CONFIG = Path(".hydra") / "config.yaml"
#: results.json statuses whose val and test numbers are those of a run that ended (NaN as null).
FINISHED = ("completed", "nonfinite_evaluation")


class UnusableRecord(ConfigError):
    """A file of a run directory that cannot be read as what metalab writes there. ``reason`` (e.g.
    "is truncated or not JSON") follows the path in the message; ``remedy`` ends the sentence."""

    def __init__(self, path: Path, reason: str, remedy: str = "pass a run directory that metalab wrote"):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} {reason}: {remedy}.")


# -- metrics.jsonl ------------------------------------------------------------------------------
def _lines(path: Path) -> tuple[list[str], str]:
    """(newline-terminated lines, what follows the last newline) of ``path``; bytes that are not
    UTF-8 (a foreign or damaged file: metalab writes ASCII) become U+FFFD."""
    *complete, partial = path.read_text(errors="replace").split("\n")
    return complete, partial


def complete_lines(path: str | Path) -> list[str]:
    """The newline-terminated lines of ``path`` ([] when it is absent); a partial last line (a crash
    or a full disk mid-write) is left out. ``JsonlSink`` counts and cuts its records with it."""
    path = Path(path)
    return _lines(path)[0] if path.is_file() else []


class MetricRows(NamedTuple):
    """The records of a metrics.jsonl and what was left out of it, in words ([] when nothing)."""

    records: list[dict[str, Any]]
    skipped: list[str]


def read_metrics(path: str | Path) -> MetricRows:
    """The JSON-object lines of a metrics.jsonl, in order. Left out, and said in ``skipped``: a
    partial last line (what a kill or a full disk leaves mid-write, and what a resume cuts) and any
    complete line that is not a JSON object. A missing file or a folder is an ``UnusableRecord``."""
    path = Path(path)
    if not path.is_file():
        raise UnusableRecord(path, "does not exist" if not path.exists() else "is not a file")
    lines, partial = _lines(path)
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
    skipped = []
    if partial:
        skipped.append("its partial last line (a run killed mid-write)")
    if bad := sum(1 for line in lines if line.strip()) - len(records):
        skipped.append(f"{bad} line{'s' * (bad > 1)} that {'are' if bad > 1 else 'is'} not a JSON object")
    return MetricRows(records, skipped)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_points(records: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float, dict[str, Any]]]:
    """(iteration, value of ``key``, the record) for every record where both are numbers; records
    with null there (NaN when it was logged), or no such key, are left out."""
    return [
        (record["iteration"], float(record[key]), record)
        for record in records
        if _is_number(record.get("iteration")) and _is_number(record.get(key))
    ]


# -- results.json -------------------------------------------------------------------------------
def read_results(run_dir: str | Path) -> dict[str, Any]:
    """The results.json of ``run_dir`` as a dict; an ``UnusableRecord`` saying why when it is missing,
    empty, truncated (a kill or a full disk mid-write), or not a JSON object."""
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise UnusableRecord(path, "does not exist (the run is still going, or stopped before its end)")
    text = path.read_text(errors="replace")
    if not text.strip():
        raise UnusableRecord(path, "is empty (the run was killed while writing it)")
    try:
        results = json.loads(text)
    except ValueError as error:
        raise UnusableRecord(path, f"is truncated or not JSON ({error})") from None
    if not isinstance(results, dict):
        raise UnusableRecord(path, f"holds a JSON {type(results).__name__}, not a metalab results record")
    return results


def unfinished(results: dict[str, Any]) -> str | None:
    """Why ``results`` are not those of a run that ended (interrupted, diverged, another status), in a
    few words; None when it ended (or the record is older than the status field)."""
    status = results.get("status")
    if status is None or status in FINISHED:
        return None
    at = f" at iteration {results['iteration']}" if _is_number(results.get("iteration")) else ""
    if status == "interrupted":
        return f"was interrupted by {results.get('stopped_by') or 'a signal'}{at}"
    if status == "diverged":
        return f"diverged{at}"
    return f"has status {status!r}"


def finite_means(results: dict[str, Any], split: str) -> tuple[dict[str, float], list[str]]:
    """({metric: mean} of ``split`` where the mean is a finite number, [metrics whose mean is null or
    not a number]): results.json writes a NaN or infinite mean as null."""
    table = results.get(split)
    means: dict[str, float] = {}
    missing: list[str] = []
    for metric, entry in (table if isinstance(table, dict) else {}).items():
        mean = entry.get("mean") if isinstance(entry, dict) else None
        if _is_number(mean) and math.isfinite(mean):
            means[metric] = float(mean)
        else:
            missing.append(metric)
    return means, missing


# -- .hydra/overrides.yaml ----------------------------------------------------------------------
def read_overrides(run_dir: str | Path) -> dict[str, str] | None:
    """{key: the override that set it} from Hydra's record of ``run_dir``'s command line, the key
    without Hydra's ``+``/``++``/``~`` prefix and the override as ``key=value``, or ``~key`` (and
    ``~key=value``) for a deletion; None when the run has no .hydra/overrides.yaml (it was not
    started by Hydra). A record that is not a YAML list of strings is an ``UnusableRecord``."""
    path = Path(run_dir) / OVERRIDES
    if not path.is_file():
        return None
    try:
        overrides = yaml.safe_load(path.read_text(errors="replace")) or []
    except yaml.YAMLError as error:
        raise UnusableRecord(path, f"is not YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UnusableRecord(path, "is not a list of key=value overrides")
    settings = {}
    for override in overrides:
        deleted = override.startswith("~")
        key, sep, value = override.lstrip("+~").partition("=")
        settings[key] = ("~" if deleted else "") + key + (f"={value}" if sep else "")
    return settings


def read_config(run_dir: str | Path) -> dict[str, Any] | None:
    """Hydra's composed config of ``run_dir`` (.hydra/config.yaml, interpolations as written) as a
    dict; None when the run has none; an ``UnusableRecord`` when it is not a YAML mapping."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text(errors="replace"))
    except yaml.YAMLError as error:
        raise UnusableRecord(path, f"is not YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise UnusableRecord(path, "is not a config (a YAML mapping)")
    return config


def job_dirs(sweep_dir: str | Path, remedy: str) -> list[Path]:
    """The job folders of a multirun directory (its subfolders but hidden ones, in Hydra's job
    order); a missing path, a file or a folder with no subfolder is refused: "...: <remedy>."."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"{sweep_dir} {'is not a folder' if sweep_dir.exists() else 'does not exist'}: {remedy}.")
    jobs = [path for path in sweep_dir.iterdir() if path.is_dir() and not path.name.startswith(".")]
    if not jobs:
        raise ConfigError(f"{sweep_dir} holds no job folders: {remedy}.")
    return sorted(
        jobs, key=lambda path: (not path.name.isdigit(), int(path.name) if path.name.isdigit() else 0, path.name)
    )


def runs_with_metrics(path: str | Path, remedy: str) -> tuple[list[Path], list[str]]:
    """([path], []) when ``path`` holds a metrics.jsonl; else (the jobs of the multirun ``path`` that
    hold one, a note for each that does not). A path that is neither is refused ("...: <remedy>.")."""
    path = Path(path)
    if (path / METRICS).is_file():
        return [path], []
    runs, notes = [], []
    for job in job_dirs(path, remedy):
        if (job / METRICS).is_file():
            runs.append(job)
        else:
            notes.append(f"skipped {job.name}: it holds no {METRICS}")
    return runs, notes


def swept_keys(settings: Sequence[dict[str, str]]) -> list[str]:
    """The keys, seed excepted, whose override differs between the runs' ``settings`` (a key that only
    some runs set counts as differing), sorted."""
    keys = sorted({key for run in settings for key in run})
    return [key for key in keys if key != "seed" and len({run.get(key) for run in settings}) > 1]


def group_runs(runs: Sequence[Path]) -> tuple[dict[str, list[Path]], list[str]]:
    """({label: [runs]}, notes): the runs of a multirun grouped by the values swept (``swept_keys``,
    so the seeds of one setting are one group), labelled by their overrides ("algo.inner_lr=0.1",
    "key=(default)" where a run did not set it). With nothing swept, runs that Hydra started are one
    group, "all runs", and a single run, or one without a readable record, is a group named after its
    folder; a note says which record could not be read."""
    settings: list[dict[str, str] | None] = []
    notes = []
    for run in runs:
        try:
            settings.append(read_overrides(run))
        except UnusableRecord as error:
            notes.append(f"grouped {run.name} alone: {error.path} {error.reason}")
            settings.append(None)
    swept = swept_keys([s or {} for s in settings])
    groups: dict[str, list[Path]] = {}
    for run, run_settings in zip(runs, settings):
        label = " ".join((run_settings or {}).get(k, f"{k}=(default)") for k in swept)
        if not label:
            label = "all runs" if run_settings is not None and len(runs) > 1 else run.name
        groups.setdefault(label, []).append(run)
    return groups, notes
