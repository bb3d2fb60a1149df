"""Re-evaluate a trained run on many tasks and print each metric as mean ± 95% CI.

    python scripts/evaluate.py run_dir=outputs/runs/... [split=test] [num_tasks=600] [checkpoint=best|last] [algo.eval_inner_steps=20]

``split`` (val | test | train) chooses which episodes to evaluate on. It is not ``tasks.split``:
that key is the Omniglot sampler's split protocol (maml | background_evaluation), and
``tasks.split=test`` is refused. Any other key=value changes the run's saved config before
building (e.g. tasks.eval_query=15). Results are printed and written to <run_dir>/eval_<split>.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

from metalab.app.build import resolve_device
from metalab.errors import ConfigError, MetalabError, require
from metalab.training.evaluation import episode_seed, evaluate_tasks, metric_lines
from metalab.inference import load_run
from metalab.training.sinks import strict_json
from metalab.tasks.base import SPLITS

OPTIONS = {"split": "test", "num_tasks": "600", "batch_size": None, "seed": None, "device": "auto", "checkpoint": "best"}


def parse(argv: list[str]) -> tuple[str, dict[str, str | None], list[str]]:
    """(run_dir, this script's options, overrides of the saved config) from key=value arguments;
    ConfigError in one sentence for anything it cannot use."""
    options, overrides, run_dir = dict(OPTIONS), [], None
    for arg in argv:
        key, sep, value = arg.partition("=")
        require(bool(sep), f"{arg!r} is not key=value: usage is {__doc__.splitlines()[2].strip()}")
        if key == "run_dir":
            run_dir = value
        elif key == "tasks.split" and value in SPLITS:
            raise ConfigError(f"tasks.split is the sampler's split protocol (maml or background_evaluation), not the "
                              f"episodes to evaluate: write split={value} instead.")
        elif key in options:
            options[key] = value
        else:
            overrides.append(arg)
    require(run_dir is not None, "give run_dir=<run directory> (the folder with checkpoint.pt and .hydra/).")
    require(options["split"] in SPLITS, f"split must be one of {', '.join(SPLITS)} (got {options['split']!r}).")
    for key, least in (("num_tasks", 1), ("batch_size", 1), ("seed", 0)):
        value = options[key]
        require(value is None or (value.isdigit() and int(value) >= least),
                f"{key} must be an integer >= {least} (got {value!r}).")
    return run_dir, options, overrides


def main(argv: list[str]) -> int:
    try:
        run_dir, options, overrides = parse(argv)
        resolve_device(options["device"], key="device")
        tasks, algorithm, cfg = load_run(run_dir, options["device"], overrides, options["checkpoint"])
        num_tasks = int(options["num_tasks"])
        results = evaluate_tasks(algorithm, tasks, options["split"], num_tasks,
                                 int(options["batch_size"] or cfg.trainer.eval_batch_size),
                                 int(options["seed"] if options["seed"] is not None else episode_seed(cfg.trainer.eval_seed, options["split"])),
                                 compare=algorithm.compare if options["split"] == "test" else None)
    except MetalabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{run_dir}: {num_tasks} {options['split']} tasks")
    print("\n".join(metric_lines(options["split"], results, num_tasks)))
    out = {key: {"mean": mean, "ci95": ci} for key, (mean, ci) in results.items()}
    (Path(run_dir) / f"eval_{options['split']}.json").write_text(strict_json(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
