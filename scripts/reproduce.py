"""Run the paper-row experiments and print our numbers beside the papers'.

    python scripts/reproduce.py                      # table of every experiment with a finished run
    python scripts/reproduce.py --run maml_sinusoid  # run it first (outputs/reproduce/<name>/); --run all: every one
    python scripts/reproduce.py --run maml_omniglot_5w1s -- trainer.iterations=2000   # extra overrides
    python scripts/reproduce.py --outputs /scratch/outputs   # also look there

Each configs/experiment/<name>.yaml states the paper's numbers under `paper:`; the run's
results.json holds ours (mean ± 95% CI over the test tasks). A run counts for <name> when it was
started with `+experiment=<name>` (`python train.py +experiment=<name> ...`, or --run here) and
lies under ./outputs, the checkout's outputs/ or an --outputs folder. Of several, the table shows
a completed one over an interrupted one, one with fewer other overrides over one with more, then
the newest; the last column names it and any overrides that change it from the paper's setting. A run
whose results.json cannot be read (a kill mid-write), or that swaps a config group (algo=anil: another
method on the row's settings), is left out with a note on stderr. When a run
started by --run fails, the table is still printed, then one line names the failed runs, and the
script exits with the failed run's status (1 when several failed).

    python scripts/reproduce.py --table imaml_omniglot   # one paper table: its rows by their columns
    python scripts/reproduce.py --table all              # every table
    python scripts/reproduce.py --table maml_sinusoid --run all   # run that table's rows first

--table lays out the table a paper printed (each config's `paper:` block names its `table`, `row`,
`order` and which metric fills which of the table's `columns`): rows in the paper's order, columns
in the order the rows list them (of one column each: 5w1s < 5w5s < 20w1s < 20w5s), each cell
"paper / ours (mean ± 95% CI)", "—" where the paper has no number, "not run" where no finished run
(completed, or with a NaN evaluation) exists, blank where the table has no such experiment. Under
the table, one line per experiment not run gives the command that runs it, and one line per run
shown that was started with other overrides names them. With --table, `--run all` runs the rows of
the tables shown (named experiments run as without --table).
"""

from __future__ import annotations

import argparse
import functools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metalab.app.cli import CONFIG_DIR
from metalab.app.scripting import ScriptParser, exit_status, path_argument, script_main
from metalab.checkpoint import RESULTS
from metalab.errors import ConfigError, require
from metalab.training.records import FINISHED, OVERRIDES, UnusableRecord, read_overrides, read_results

ROOT = Path(__file__).resolve().parents[1]


def experiments() -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / "experiment").glob("*.yaml"))


@functools.cache
def paper_of(name: str) -> dict:
    """The `paper:` block of experiment ``name`` with what it inherits, a plain dict: the blocks of the
    experiments its defaults list names (``- maml_omniglot_5w1s``), then its own merged over them, as
    Hydra composes them (its own keys last). Read from the YAML files, not by composing the whole training
    config (0.2 s an experiment; ``paper_composed``, which the tests check this against)."""
    node = OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml")
    parents = [entry for entry in node.get("defaults") or [] if isinstance(entry, str) and entry in experiments()]
    block = OmegaConf.merge(*(paper_of(parent) for parent in parents), node.get("paper") or {})
    return OmegaConf.to_container(block)


def paper_composed(name: str) -> dict:
    """The `paper:` block of experiment ``name`` as Hydra composes the training config."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+experiment={name}"])
    return OmegaConf.to_container(cfg.paper) if cfg.get("paper") else {}


#: Config groups: a run of an experiment that swaps one (algo=anil) runs another method, not that row.
GROUPS = ("algo", "solver", "tasks", "model")
#: Overrides that do not change what a run computes.
NEUTRAL = ("trainer.progress", "trainer.device", "resume")


def run_dir_of(name: str) -> Path:
    """Where --run writes: outputs/reproduce/<name> under the working directory, as Hydra would."""
    return Path.cwd() / "outputs" / "reproduce" / name


def run(name: str, overrides: list[str]) -> int:
    command = [
        sys.executable,
        "-m",
        "metalab",
        f"+experiment={name}",
        f"hydra.run.dir={run_dir_of(name)}",
        "trainer.progress=false",
        *overrides,
    ]
    print("$", " ".join(command[1:]), flush=True)
    return subprocess.run(command).returncode


def runs_of(name: str, roots: list[Path]) -> list[tuple[Path, list[str], dict[str, Any]]]:
    """(run directory, overrides beyond the experiment, results) of every run under ``roots`` that
    was started with +experiment=<name> and wrote a readable results.json, best first (see the module
    docstring); a note on stderr for each run of it whose results.json is unreadable."""
    found: dict[Path, tuple[list[str], dict[str, Any]]] = {}
    for root in roots:
        for saved in root.glob(f"**/{OVERRIDES}"):
            run_dir = saved.parent.parent.resolve()
            try:
                overrides = read_overrides(run_dir) or {}
                if overrides.get("experiment") != f"experiment={name}" or not (run_dir / RESULTS).is_file():
                    continue
                if swapped := [overrides[group] for group in GROUPS if group in overrides]:
                    why = f"it swaps {' '.join(swapped)}"
                    print(f"note: {_relative(run_dir)} is not a run of {name}: {why}", file=sys.stderr)
                    continue
                results = read_results(run_dir)
            except UnusableRecord as error:
                print(f"note: skipped {_relative(run_dir)}: {error.path.name} {error.reason}", file=sys.stderr)
                continue
            found[run_dir] = [o for key, o in overrides.items() if key not in ("experiment", *NEUTRAL)], results

    def rank(item: tuple[Path, tuple[list[str], dict[str, Any]]]) -> tuple[bool, int, float]:
        run_dir, (extra, results) = item
        return results.get("status") == "completed", -len(extra), (run_dir / RESULTS).stat().st_mtime

    return [(run_dir, extra, results) for run_dir, (extra, results) in sorted(found.items(), key=rank, reverse=True)]


def ours(metric: str, results: dict[str, Any], split: str) -> str:
    """Our number for ``metric`` in ``results`` (mean ± 95% CI, accuracy in percent as the papers print
    it), "(<status>)" when the record holds none, "at N it" when the run stopped short of its iterations."""
    table = results.get(split)
    entry = table.get(metric) if isinstance(table, dict) else None
    scale = 100 if metric == "accuracy" else 1  # papers print accuracy in percent
    text = (
        f"{scale * entry['mean']:.4g} ± {scale * (entry.get('ci95') or 0):.2g}"
        if isinstance(entry, dict) and isinstance(entry.get("mean"), (int, float))
        else f"({results.get('status', 'no result')})"
    )
    iterations = ((results.get("config") or {}).get("trainer") or {}).get("iterations")
    if iterations is not None and results.get("iteration") != iterations:
        text += f" at {results.get('iteration')} it"
    return text


def rows(name: str, roots: list[Path]) -> list[str]:
    paper = paper_of(name)
    runs = runs_of(name, roots)
    where = ""
    if runs:
        run_dir, extra, _ = runs[0]
        where = f"{_relative(run_dir)}" + (f" ({' '.join(extra)})" if extra else "")
    out = []
    for metric, value in (paper.get("metrics") or {}).items():
        number = ours(metric, runs[0][2], paper.get("split", "test")) if runs else "not run"
        out.append(f"| {name} | {metric} | {value} | {number} | {paper.get('source', '')} | {where} |")
    return out


# -- paper tables (--table) ---------------------------------------------------------------------
def tables(names: list[str]) -> dict[str, dict[str, dict]]:
    """{table: {experiment: its paper block}} of the experiments whose paper block names a table."""
    found: dict[str, dict[str, dict]] = {}
    for name in names:
        paper = paper_of(name)
        if paper.get("table"):
            found.setdefault(str(paper["table"]), {})[name] = paper
    return dict(sorted(found.items()))


def _natural(label: str) -> list:
    """A sort key that orders the numbers inside a label by value: 5w1s < 5w5s < 20w1s, 5 steps < 10 steps."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", label) if part]


def table_lines(table: str, papers: dict[str, dict], roots: list[Path]) -> list[str]:
    """The markdown of ``table`` (the module docstring) from its experiments' ``papers`` blocks and the
    finished runs under ``roots``, then the lines naming what was not run and the overrides of runs shown."""
    position: dict[str, tuple[int, list]] = {}
    for paper in papers.values():
        for index, label in enumerate((paper.get("columns") or {}).values()):
            key = (index, _natural(str(label)))
            position[str(label)] = min(position.get(str(label), key), key)
    columns = sorted(position, key=position.__getitem__)
    by_row: dict[str, dict[str, str]] = {}
    row_order: dict[str, tuple] = {}
    missing: list[str] = []
    notes: list[str] = []
    for name, paper in sorted(papers.items(), key=lambda item: (item[1].get("order", 0), _natural(item[0]))):
        row = str(paper.get("row", name))
        row_order.setdefault(row, (paper.get("order", 0), name))
        finished = [run for run in runs_of(name, roots) if run[2].get("status") in FINISHED]
        for metric, label in (paper.get("columns") or {}).items():
            value = (paper.get("metrics") or {}).get(metric)
            number = ours(metric, finished[0][2], paper.get("split", "test")) if finished else "not run"
            by_row.setdefault(row, {})[str(label)] = f"{'—' if value is None else value} / {number}"
        if not finished:
            missing.append(f"not run: {name} ({row}): python scripts/reproduce.py --run {name}")
        elif finished[0][1]:
            notes.append(f"{name} ({row}): {_relative(finished[0][0])} ran with {' '.join(finished[0][1])}")
    out = [
        f"### {table}: paper / ours (mean ± 95% CI)",
        "",
        "| | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in sorted(by_row, key=row_order.__getitem__):
        out.append(f"| {row} | " + " | ".join(by_row[row].get(column, "") for column in columns) + " |")
    return out + ([""] if missing or notes else []) + missing + notes


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@script_main
def main(argv: list[str]) -> int:
    parser = ScriptParser(
        "python scripts/reproduce.py [--table NAME] [--run NAME ...] [--outputs DIR ...] [-- key=value ...]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", nargs="*", metavar="NAME", help="experiments to run first (all: every one)")
    parser.add_argument("--table", nargs="?", const="", metavar="NAME", help="lay out one paper table (all: every one)")
    parser.add_argument(
        "--outputs",
        nargs="*",
        type=path_argument,
        default=[],
        metavar="DIR",
        help="more folders to look for runs in (besides ./outputs and the checkout's outputs/)",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the runs, after --")
    args = parser.parse_args(argv)
    for folder in args.outputs:
        why = "is not a folder" if folder.exists() else "does not exist"
        require(folder.is_dir(), f"--outputs {folder} {why}: pass a folder that holds runs (e.g. an outputs/).")
    names = experiments()
    shown: dict[str, dict[str, dict]] = {}
    if args.table is not None:
        known = tables(names)
        require(
            args.table == "all" or args.table in known,
            (f"no table named {args.table}" if args.table else "--table needs the table to lay out")
            + f"; choose from {', '.join(known)}, or all.",
        )
        shown = known if args.table == "all" else {args.table: known[args.table]}
    failed: dict[str, int] = {}
    if args.run is not None:
        require(
            bool(args.run),
            f"--run needs the experiments to run (each takes hours at the paper's length): name them, "
            f"e.g. --run maml_sinusoid, or pass --run all; the experiments are {', '.join(names)}.",
        )
        in_tables = sorted(name for papers in shown.values() for name in papers)
        chosen = (in_tables if shown else names) if args.run == ["all"] else args.run
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            raise ConfigError(f"no experiment named {', '.join(unknown)}; choose from {', '.join(names)}, or all.")
        for name in chosen:
            if (returncode := run(name, args.overrides)) != 0:
                failed[name] = exit_status(returncode)
    roots = list(
        dict.fromkeys(p.resolve() for p in [Path.cwd() / "outputs", ROOT / "outputs", *args.outputs] if p.is_dir())
    )
    if shown:
        print("\n\n".join("\n".join(table_lines(table, papers, roots)) for table, papers in shown.items()))
    else:
        print("| experiment | metric | paper | ours (mean ± 95% CI) | source | run |")
        print("|---|---|---|---|---|---|")
        for name in names:
            print("\n".join(rows(name, roots)))
    if failed:
        listed = ", ".join(
            f"{name} (exit status {code}, in {_relative(run_dir_of(name))})" for name, code in failed.items()
        )
        what = (
            f"the run of {listed} failed: see its output"
            if len(failed) == 1
            else f"{len(failed)} runs failed: {listed}: see their outputs"
        )
        print(
            f"error: {what} above; the table shows what {'it' if len(failed) == 1 else 'they'} left.", file=sys.stderr
        )
        return next(iter(failed.values())) if len(failed) == 1 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
