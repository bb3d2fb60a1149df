"""Figures of a run directory (matplotlib, PNG), written into it:

    python scripts/plot.py RUN_DIR [--problems 100] [--steps N] [--checkpoint best|last] [--out-dir DIR]

- validation.png: the validation metric against meta-iteration, with its 95% CI band, from
  metrics.jsonl (any run).
- loss_vs_step.png (a learned-optimizer run on an optimizee family): the loss against optimizee
  step on a log scale, mean and 95% CI band over ``--problems`` test problems (the trainer's test
  problems: the same seed), of the learned rule and of every baseline the family has tuned rates
  for, as in the paper's Figures 2-5; the numbers also go to loss_vs_step.json.

The figures go into the run directory, or into ``--out-dir`` (a read-only run directory is refused
before anything is drawn). A partial last line of metrics.jsonl (a run killed mid-write) is left
out, with a note on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from metalab.app.scripting import ScriptParser, path_argument, positive_int, require_writable, script_main
from metalab.checkpoint import METRICS, has_checkpoint
from metalab.errors import ConfigError, MetalabError, require
from metalab.training.evaluation import confidence_interval, episode_seed
from metalab.training.records import numeric_points, read_config, read_metrics

USAGE = "python scripts/plot.py RUN_DIR [--problems 100] [--steps N] [--checkpoint best|last] [--out-dir DIR]"


def plot_validation(records: list[dict[str, Any]], out_dir: Path, plt) -> Path | None:
    """validation.png from the records of metrics.jsonl; None when none holds a validation value."""
    keys = sorted({k for r in records for k in r if k.startswith("val/") and not k.endswith("_ci95")})
    series = {key: points for key in keys if (points := numeric_points(records, key))}
    if not series:
        return None
    figure, axes = plt.subplots(len(series), 1, figsize=(6, 3 * len(series)), squeeze=False)
    for axis, (key, points) in zip(axes[:, 0], series.items()):
        iterations, means = (torch.tensor(column, dtype=torch.float64) for column in list(zip(*points))[:2])
        cis = torch.tensor([_number(record.get(f"{key}_ci95")) for _, _, record in points], dtype=torch.float64)
        axis.plot(iterations, means, marker="o")
        axis.fill_between(iterations, means - cis, means + cis, alpha=0.3)
        axis.set(xlabel="meta-iteration", ylabel=key)
    figure.tight_layout()
    path = out_dir / "validation.png"
    figure.savefig(path, dpi=120)
    return path


def _number(value: Any) -> float:
    """A logged interval half-width, 0 where it is missing or null."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def learned_optimizer_run(run_dir: Path) -> bool:
    """Whether the run's saved config names algo=lstm_optimizer; without .hydra/config.yaml, whether it
    has a checkpoint (which then decides)."""
    config = read_config(run_dir)
    if config is None:
        return has_checkpoint(run_dir)
    algo = config.get("algo")
    return isinstance(algo, dict) and str(algo.get("_target_", "")).endswith("LSTMOptimizer")


def plot_curves(run_dir: Path, problems: int, steps: int | None, checkpoint: str, out_dir: Path, plt) -> Path | None:
    """loss_vs_step.png and .json of a learned-optimizer run on an optimizee family; None otherwise."""
    if not learned_optimizer_run(run_dir):
        return None
    from metalab.algorithms import LSTMOptimizer
    from metalab.inference import load_run
    from metalab.tasks.optimizees.base import OptimizeeTasks

    tasks, algorithm, cfg = load_run(run_dir, device="cpu", checkpoint=checkpoint)
    if not isinstance(algorithm, LSTMOptimizer) or not isinstance(tasks, OptimizeeTasks):
        return None
    batch = tasks.sample(problems, "test", tasks.generator(episode_seed(cfg.trainer.eval_seed, "test")))
    curves = algorithm.curves(batch, steps)
    summary = {}
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        stats = [confidence_interval(curve[:, step]) for step in range(curve.shape[1])]
        means, cis = (torch.tensor(column) for column in zip(*stats))
        summary[name] = {"mean": means.tolist(), "ci95": cis.tolist()}
        label = f"{name} (lr {tasks.baseline_lrs[name]:g})" if name in tasks.baseline_lrs else "learned (LSTM)"
        axis.plot(range(len(means)), means, label=label)
        axis.fill_between(range(len(means)), (means - cis).clamp(min=1e-12), means + cis, alpha=0.2)
    axis.set(yscale="log", xlabel="step", ylabel="loss", title=f"{type(tasks).__name__}: {problems} test problems")
    axis.legend()
    figure.tight_layout()
    path = out_dir / "loss_vs_step.png"
    figure.savefig(path, dpi=120)
    (out_dir / "loss_vs_step.json").write_text(json.dumps({"problems": problems, "curves": summary}, indent=1))
    return path


@script_main
def main(argv: list[str]) -> int:
    parser = ScriptParser(USAGE, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=path_argument)
    parser.add_argument("--problems", type=positive_int, default=100)
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="optimizee steps (default: the run's eval_optimizee_steps)"
    )
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    parser.add_argument("--out-dir", type=path_argument, default=None, help="where the figures go (default: RUN_DIR)")
    args = parser.parse_args(argv)
    why = "is not a folder" if args.run_dir.exists() else "does not exist"
    require(args.run_dir.is_dir(), f"{args.run_dir} {why}: pass a run directory.")
    require((args.run_dir / METRICS).is_file(), f"{args.run_dir} holds no {METRICS}: pass a run directory.")
    out_dir = args.out_dir or args.run_dir
    if args.out_dir is not None:
        require(not out_dir.is_file(), f"--out-dir {out_dir} is a file: pass a folder.")
        out_dir.mkdir(parents=True, exist_ok=True)
    require_writable(out_dir, "--out-dir DIR", folder=True)
    try:
        import matplotlib
    except ImportError:
        raise MetalabError("scripts/plot.py needs matplotlib: pip install matplotlib.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(args.run_dir / METRICS)
    for skipped in metrics.skipped:
        print(f"note: left out of {args.run_dir / METRICS}: {skipped}", file=sys.stderr)
    written = [path for path in [plot_validation(metrics.records, out_dir, plt)] if path is not None]
    for path in written:
        print(f"wrote {path}")
    curves = plot_curves(args.run_dir, args.problems, args.steps, args.checkpoint, out_dir, plt)
    if curves is not None:
        print(f"wrote {curves}")
    elif not written:
        raise ConfigError(
            f"{args.run_dir} has nothing to plot: its {METRICS} holds no validation value (the run stopped "
            "before its first evaluation) and it is no learned-optimizer run; plot it after an evaluation."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
