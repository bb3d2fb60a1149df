"""Run the paper-row experiments and print our numbers beside the papers'.

    python scripts/reproduce.py                      # table of every experiment with a finished run
    python scripts/reproduce.py --run maml_sinusoid  # run it first (outputs/reproduce/<name>/)
    python scripts/reproduce.py --run maml_omniglot_5w1s -- trainer.iterations=2000   # extra overrides
    python scripts/reproduce.py --outputs /scratch/outputs   # also look there

Each configs/experiment/<name>.yaml states the paper's numbers under `paper:`; the run's
results.json holds ours (mean ± 95% CI over the test tasks). A run counts for <name> when it was
started with `+experiment=<name>` (`python train.py +experiment=<name> ...`, or --run here) and
lies under ./outputs, the checkout's outputs/ or an --outputs folder. Of several, the table shows
a completed one over an interrupted one, one without other overrides over one with, then the
newest; the last column names it and any overrides that change it from the paper's setting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir

from metalab.app.cli import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]


def experiments() -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / "experiment").glob("*.yaml"))


def paper_of(name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+experiment={name}"])
    return dict(cfg.paper or {})


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


def runs_of(name: str, roots: list[Path]) -> list[tuple[Path, list[str]]]:
    """(run directory, overrides beyond the experiment) of every run under ``roots`` that was
    started with +experiment=<name> and wrote results.json, best first (see the module docstring)."""
    found: dict[Path, list[str]] = {}
    for root in roots:
        for saved in root.glob("**/.hydra/overrides.yaml"):
            run_dir = saved.parent.parent.resolve()
            overrides = yaml.safe_load(saved.read_text()) or []
            if (run_dir / "results.json").is_file() and any(o.lstrip("+") == f"experiment={name}" for o in overrides):
                found[run_dir] = [o for o in overrides if o.lstrip("+~").split("=")[0] not in ("experiment", *NEUTRAL)]

    def rank(item: tuple[Path, list[str]]) -> tuple[bool, bool, float]:
        run_dir, extra = item
        status = json.loads((run_dir / "results.json").read_text()).get("status")
        return status == "completed", not extra, (run_dir / "results.json").stat().st_mtime

    return sorted(found.items(), key=rank, reverse=True)


def rows(name: str, roots: list[Path]) -> list[str]:
    paper = paper_of(name)
    runs = runs_of(name, roots)
    results = json.loads((runs[0][0] / "results.json").read_text()) if runs else None
    where = ""
    if runs:
        run_dir, extra = runs[0]
        where = f"{_relative(run_dir)}" + (f" ({' '.join(extra)})" if extra else "")
    out = []
    for metric, value in (paper.get("metrics") or {}).items():
        ours = "not run"
        if results is not None:
            entry = results.get(paper.get("split", "test"), {}).get(metric)
            scale = 100 if metric == "accuracy" else 1  # papers print accuracy in percent
            ours = (
                f"{scale * entry['mean']:.4g} ± {scale * entry['ci95']:.2g}"
                if entry and entry.get("mean") is not None
                else f"({results['status']})"
            )
            if results["iteration"] != results["config"]["trainer"]["iterations"]:
                ours += f" at {results['iteration']} it"
        out.append(f"| {name} | {metric} | {value} | {ours} | {paper.get('source', '')} | {where} |")
    return out


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs="*", metavar="NAME", help="experiments to run first (none: all)")
    parser.add_argument(
        "--outputs",
        nargs="*",
        type=Path,
        default=[],
        metavar="DIR",
        help="more folders to look for runs in (besides ./outputs and the checkout's outputs/)",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the runs, after --")
    args = parser.parse_args()
    names = experiments()
    if args.run is not None:
        unknown = sorted(set(args.run) - set(names))
        if unknown:
            print(f"error: no experiment named {', '.join(unknown)}; choose from {', '.join(names)}.", file=sys.stderr)
            return 2
        for name in args.run or names:
            if run(name, args.overrides) != 0:
                print(f"warning: {name} failed; its row shows what it left", file=sys.stderr)
    roots = list(
        dict.fromkeys(p.resolve() for p in [Path.cwd() / "outputs", ROOT / "outputs", *args.outputs] if p.is_dir())
    )
    print("| experiment | metric | paper | ours (mean ± 95% CI) | source | run |")
    print("|---|---|---|---|---|---|")
    for name in names:
        print("\n".join(rows(name, roots)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
