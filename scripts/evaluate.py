"""Re-evaluate a trained run on many tasks and print each metric as mean ± 95% CI.

    python scripts/evaluate.py RUN_DIR [--split test] [--num-tasks N] [--checkpoint last] [--output F] [key=value ...]

``--split`` (val | test | train) chooses which episodes to evaluate on. It is not ``tasks.split``:
that key is the Omniglot sampler's split protocol (maml | background_evaluation), and
``tasks.split=test`` is refused. Trailing key=value arguments change the run's saved config before
building (e.g. tasks.eval_query=15). Results are printed and written to <run_dir>/eval_<split>.json,
or to ``--output FILE``; a file that cannot be written (a read-only run directory) is refused before
anything is evaluated, so no evaluation is lost.
"""

from __future__ import annotations

import argparse
import sys

from metalab.app.build import resolve_device
from metalab.app.scripting import ScriptParser, path_argument, require_writable, script_main
from metalab.checkpoint import CHECKPOINT
from metalab.errors import require
from metalab.inference import load_run
from metalab.tasks.base import SPLITS
from metalab.training.evaluation import episode_seed, evaluate_tasks, metric_lines
from metalab.training.sinks import strict_json

USAGE = __doc__.splitlines()[2].strip()


def parse(argv: list[str]) -> argparse.Namespace:
    """The run directory, this script's options and the overrides of the saved config (``overrides``);
    ConfigError in one sentence for anything it cannot use."""
    parser = ScriptParser(USAGE, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=path_argument, help="the run directory (with checkpoint.pt and .hydra/)")
    parser.add_argument("--split", default="test", help="val | test | train")
    parser.add_argument("--num-tasks", default="600", help="episodes to evaluate")
    parser.add_argument("--batch-size", default=None, help="episodes adapted at once (default: the run's)")
    parser.add_argument("--seed", default=None, help="episode seed (default: the run's for that split)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    parser.add_argument(
        "--output", type=path_argument, default=None, help="the JSON (default RUN_DIR/eval_<split>.json)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value changes to the saved config")
    args = parser.parse_intermixed_args(argv)  # key=value after the options too, as the usage line shows
    for override in args.overrides:
        key, sep, value = override.partition("=")
        require(bool(sep), f"{override!r} is not key=value: usage is {USAGE}")
        require(
            key != "tasks.split" or value not in SPLITS,
            f"tasks.split is the sampler's split protocol (maml or background_evaluation), not the "
            f"episodes to evaluate: write --split {value} instead.",
        )
    require(args.split in SPLITS, f"--split must be one of {', '.join(SPLITS)} (got {args.split!r}).")
    for key, least in (("num_tasks", 1), ("batch_size", 1), ("seed", 0)):
        value = getattr(args, key)
        require(
            value is None or (value.isdigit() and int(value) >= least),
            f"--{key.replace('_', '-')} must be an integer >= {least} (got {value!r}).",
        )
    return args


@script_main
def main(argv: list[str]) -> int:
    args = parse(argv)
    resolve_device(args.device, key="--device")
    output = args.output or args.run_dir / f"eval_{args.split}.json"
    if (args.run_dir / CHECKPOINT).is_file():  # a wrong run directory is refused by load_run, in its words
        require_writable(output, "--output FILE")
    tasks, algorithm, cfg = load_run(args.run_dir, args.device, args.overrides, args.checkpoint)
    num_tasks = int(args.num_tasks)
    seed = int(args.seed) if args.seed is not None else episode_seed(cfg.trainer.eval_seed, args.split)
    results = evaluate_tasks(
        algorithm,
        tasks,
        args.split,
        num_tasks,
        int(args.batch_size or cfg.trainer.eval_batch_size),
        seed,
        compare=algorithm.compare if args.split == "test" else None,
    )
    unit = getattr(tasks, "unit_name", "tasks")
    print(f"{args.run_dir}: {num_tasks} {args.split} {unit}")
    print("\n".join(metric_lines(args.split, results, num_tasks, unit)))
    out = {key: {"mean": mean, "ci95": ci} for key, (mean, ci) in results.items()}
    output.write_text(strict_json(out, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
