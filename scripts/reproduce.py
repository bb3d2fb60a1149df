"""Run the paper-row experiments and print our numbers beside the papers'.

    python scripts/reproduce.py                      # table of every experiment with a finished run
    python scripts/reproduce.py --run maml_sinusoid  # run it first (outputs/reproduce/<name>/)
    python scripts/reproduce.py --run maml_omniglot_5w1s -- trainer.iterations=2000   # extra overrides

Each configs/experiment/<name>.yaml states the paper's numbers under `paper:`; the run's
results.json holds ours (mean ± 95% CI over the test tasks).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from metalab.cli import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]


def experiments() -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / "experiment").glob("*.yaml"))


def paper_of(name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+experiment={name}"])
    return dict(cfg.paper or {})


def run_dir_of(name: str) -> Path:
    return ROOT / "outputs" / "reproduce" / name


def run(name: str, overrides: list[str]) -> int:
    command = [sys.executable, str(ROOT / "train.py"), f"+experiment={name}", f"hydra.run.dir={run_dir_of(name)}",
               "trainer.progress=false", *overrides]
    print("$", " ".join(command[1:]), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


def rows(name: str) -> list[str]:
    paper = paper_of(name)
    results_file = run_dir_of(name) / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else None
    out = []
    for metric, value in (paper.get("metrics") or {}).items():
        ours = "not run"
        if results is not None:
            entry = results.get(paper.get("split", "test"), {}).get(metric)
            scale = 100 if metric == "accuracy" else 1  # papers print accuracy in percent
            ours = f"{scale * entry['mean']:.4g} ± {scale * entry['ci95']:.2g}" if entry else f"({results['status']})"
            if results["iteration"] != results["config"]["trainer"]["iterations"]:
                ours += f" at {results['iteration']} it"
        out.append(f"| {name} | {metric} | {value} | {ours} | {paper.get('source', '')} |")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs="*", metavar="NAME", help="experiments to run first (none: all)")
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
    print("| experiment | metric | paper | ours (mean ± 95% CI) | source |")
    print("|---|---|---|---|---|")
    for name in names:
        print("\n".join(rows(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
