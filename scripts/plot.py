"""Figures of a run directory (matplotlib, PNG), written into it:

    python scripts/plot.py <run dir> [--problems 100] [--steps N] [--checkpoint best|last]

- validation.png: the validation metric against meta-iteration, with its 95% CI band, from
  metrics.jsonl (any run).
- loss_vs_step.png (a learned-optimizer run on an optimizee family): the loss against optimizee
  step on a log scale, mean and 95% CI band over ``--problems`` test problems (the trainer's test
  problems: the same seed), of the learned rule and of every baseline the family has tuned rates
  for, as in the paper's Figures 2-5; the numbers also go to loss_vs_step.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from metalab.checkpoint import METRICS
from metalab.errors import MetalabError
from metalab.training.evaluation import confidence_interval, episode_seed


def plot_validation(run_dir: Path, plt) -> Path | None:
    """validation.png from metrics.jsonl; None when the run has no validation record."""
    records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line.strip()]
    keys = sorted({k for r in records for k in r if k.startswith("val/") and not k.endswith("_ci95")})
    if not keys:
        return None
    figure, axes = plt.subplots(len(keys), 1, figsize=(6, 3 * len(keys)), squeeze=False)
    for axis, key in zip(axes[:, 0], keys):
        points = [(r["iteration"], r[key], r.get(f"{key}_ci95") or 0.0) for r in records if r.get(key) is not None]
        iterations, means, cis = (torch.tensor(column, dtype=torch.float64) for column in zip(*points))
        axis.plot(iterations, means, marker="o")
        axis.fill_between(iterations, means - cis, means + cis, alpha=0.3)
        axis.set(xlabel="meta-iteration", ylabel=key)
    figure.tight_layout()
    path = run_dir / "validation.png"
    figure.savefig(path, dpi=120)
    return path


def plot_curves(run_dir: Path, problems: int, steps: int | None, checkpoint: str, plt) -> Path | None:
    """loss_vs_step.png and .json of a learned-optimizer run on an optimizee family; None otherwise."""
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
    path = run_dir / "loss_vs_step.png"
    figure.savefig(path, dpi=120)
    (run_dir / "loss_vs_step.json").write_text(json.dumps({"problems": problems, "curves": summary}, indent=1))
    return path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizee steps (default: the run's eval_optimizee_steps)"
    )
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    args = parser.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: scripts/plot.py needs matplotlib: pip install matplotlib.")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (args.run_dir / METRICS).is_file():
        sys.exit(f"error: {args.run_dir} holds no {METRICS}: pass a run directory.")
    try:
        written = [
            plot_validation(args.run_dir, plt),
            plot_curves(args.run_dir, args.problems, args.steps, args.checkpoint, plt),
        ]
    except MetalabError as error:
        sys.exit(f"error: {error}")
    for path in written:
        if path is not None:
            print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
