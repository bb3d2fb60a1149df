"""Re-evaluate a trained run on many tasks and print each metric as mean ± 95% CI.

    python scripts/evaluate.py run_dir=outputs/runs/... [split=test] [num_tasks=600] [checkpoint=best|last] [algo.eval_inner_steps=20]

``split`` may also be given as ``tasks.split=test`` (val | test | train). Any other key=value
changes the run's saved config before building (e.g. tasks.eval_query=15). Results are
printed and written to <run_dir>/eval_<split>.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from metalab.errors import MetalabError
from metalab.evaluation import episode_seed, evaluate_tasks
from metalab.inference import load_run
from metalab.tasks.base import SPLITS


def main(argv: list[str]) -> int:
    options = {"split": "test", "num_tasks": "600", "batch_size": None, "seed": None, "device": "auto", "checkpoint": "best"}
    overrides, run_dir = [], None
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            print(__doc__, file=sys.stderr)
            return 2
        if key == "run_dir":
            run_dir = value
        elif key == "tasks.split" and value in SPLITS:
            options["split"] = value
        elif key in options:
            options[key] = value
        else:
            overrides.append(arg)
    if run_dir is None or options["split"] not in SPLITS:
        print(f"error: give run_dir=<run directory> and split in {SPLITS}.", file=sys.stderr)
        return 2
    try:
        tasks, algorithm, cfg = load_run(run_dir, options["device"], overrides, options["checkpoint"])
        results = evaluate_tasks(algorithm, tasks, options["split"], int(options["num_tasks"]),
                                 int(options["batch_size"] or cfg.trainer.eval_batch_size),
                                 int(options["seed"] or episode_seed(cfg.trainer.eval_seed, options["split"])))
    except MetalabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{run_dir}: {options['num_tasks']} {options['split']} tasks")
    for key, (mean, ci) in results.items():
        print(f"{options['split']} {key}: {mean:.4f} ± {ci:.4f}")
    out = {key: {"mean": mean, "ci95": ci} for key, (mean, ci) in results.items()}
    (Path(run_dir) / f"eval_{options['split']}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
