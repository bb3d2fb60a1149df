"""Choose each baseline's learning rate for an optimizee family by grid search on training problems.

    python scripts/tune_baselines.py tasks=quadratic [--problems 100] [--steps 100] [--seed 7]
    python scripts/tune_baselines.py tasks=mnist_mlp tasks.root=/data/mnist --problems 20

For SGD, Nesterov momentum, RMSprop and Adam (``metalab.optim.baselines``) and every rate of the grid
(1e-4 to 10, three a decade), it optimises the same ``--problems`` problems of the "train" split
(drawn with ``--seed``, apart from the trainer's evaluation seeds) for ``--steps`` steps, and picks
the rate with the lowest mean final loss. It prints the table and the ``tasks.baseline_lrs`` block to
paste into the family's config (configs/tasks/<family>.yaml), with this command. A baseline whose
loss no rate of the grid keeps finite gets no rate: the block says so and the script exits with 1.
"""

from __future__ import annotations

import math
import sys

import torch
from hydra import compose, initialize_config_dir

from metalab.app.build import instantiate
from metalab.app.cli import CONFIG_DIR
from metalab.app.scripting import ScriptParser, positive_int, script_main
from metalab.errors import require
from metalab.optim.baselines import BASELINES, baseline_trajectory
from metalab.tasks.optimizees.base import OptimizeeTasks

USAGE = "python scripts/tune_baselines.py tasks=<family> [key=value ...] [--problems 100] [--steps 100] [--seed 7]"

GRID = [round(m * 10.0**e, 10) for e in range(-4, 1) for m in (1, 2, 5)] + [10.0]


def tune(tasks: OptimizeeTasks, problems: int, steps: int, seed: int) -> dict[str, dict[float, float]]:
    """{baseline: {lr: mean final loss}} on ``problems`` training problems."""
    batch = tasks.sample(problems, "train", tasks.generator(seed))

    def loss(theta: torch.Tensor, step: int) -> torch.Tensor:
        return tasks.optimizee_loss(theta, batch, step)

    return {
        name: {lr: baseline_trajectory(name, lr, batch.params, loss, steps)[:, -1].mean().item() for lr in GRID}
        for name in BASELINES
    }


@script_main
def main(argv: list[str]) -> int:
    parser = ScriptParser(USAGE, description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="+", help="config overrides, e.g. tasks=quadratic")
    parser.add_argument("--problems", type=positive_int, default=100)
    parser.add_argument("--steps", type=positive_int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    tasks = instantiate(cfg.tasks, device="cpu")
    require(
        isinstance(tasks, OptimizeeTasks),
        f"{' '.join(args.overrides)} is not an optimizee family: use tasks=quadratic or tasks=mnist_mlp.",
    )
    results = tune(tasks, args.problems, args.steps, args.seed)
    print("lr".rjust(8) + "".join(name.rjust(12) for name in results))
    for lr in GRID:
        print(f"{lr:8g}" + "".join(f"{results[name][lr]:12.4g}" for name in results))
    command = " ".join(
        [
            "python scripts/tune_baselines.py",
            *args.overrides,
            f"--problems {args.problems}",
            f"--steps {args.steps}",
            f"--seed {args.seed}",
        ]
    )
    print(
        f"\n  baseline_lrs:  # mean final loss after {args.steps} steps on {args.problems} training problems; "
        "chosen by\n"
        f"                 # {command}"
    )
    diverged = []
    for name, scores in results.items():
        finite = {lr: value for lr, value in scores.items() if math.isfinite(value)}
        if not finite:
            diverged.append(name)
            print(f"    # {name}: none; every rate of the grid gave a NaN or infinite final loss")
            continue
        best = min(finite, key=finite.get)
        print(f"    {name}: {best:g}".ljust(24) + f"# final loss {finite[best]:.4g}")
    if diverged:
        print(
            f"error: no rate of the grid keeps the final loss of {', '.join(diverged)} finite on these problems: "
            "check the family's settings, or choose that rate by hand.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
