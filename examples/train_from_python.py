"""Train MAML on sinusoid regression from plain Python: no Hydra, no config files.

    python examples/train_from_python.py [run_dir]      # default: outputs/python/maml_sinusoid

It builds a task sampler, a model, a hypergradient solver and the algorithm, trains them for a few
iterations with the Trainer, evaluates, then loads the run directory back with
``metalab.load_learner`` and adapts the loaded learner to a new sine wave. docs/python.md explains
each step. The last line it prints is JSON, for tests/test_python_example.py.
"""

from __future__ import annotations

import functools
import json
import math
import sys

import torch

import metalab
from metalab.hypergrad import unroll
from metalab.models import MLP
from metalab.tasks.episodic.sinusoid import Sinusoid


def main(run_dir: str) -> dict:
    torch.manual_seed(0)  # the model's initialisation

    # 1. The objects: a sampler of episodes, a model, a solver and the algorithm that owns them.
    tasks = Sinusoid(shots=10, query=10, device="cpu")  # y = A sin(x - phase), 10 support + 10 query points
    model = MLP(tasks.input_shape, tasks.output_dim, hidden_sizes=[40, 40])
    maml = metalab.MAML(
        model,
        tasks,
        unroll(),  # second-order MAML; metalab.hypergrad.first_order() for FOMAML
        functools.partial(torch.optim.Adam, lr=1e-2),  # the meta-optimizer, given the meta-parameters
        inner_lr=0.01,
        inner_steps=1,
        eval_inner_steps=10,
    )

    # 2. Train: the trainer writes checkpoint.pt, best.pt, metrics.jsonl and results.json to run_dir.
    trainer = metalab.Trainer(
        maml,
        tasks,
        run_dir,
        iterations=60,
        meta_batch_size=10,
        eval_every=30,  # validate every 30 iterations on eval_tasks episodes; best.pt keeps the best
        eval_tasks=20,
        test_tasks=50,  # the final test, on the meta-parameters best on validation
        log_every=10,
        progress=False,
    )
    results = trainer.fit()
    test = results["test"]["mse"]
    print(f"test mse after {results['iteration']} iterations: {test['mean']:.4f} ± {test['ci95']:.4f}")

    # 3. Evaluate again: the same fixed test episodes (trainer.eval_seed), so the same mean as results.json.
    mean, ci95 = trainer.evaluate("test", trainer.test_tasks)["mse"]
    print(f"evaluated again: {mean:.4f} ± {ci95:.4f}")

    # 4. Load the run directory (any process, no training data) and adapt to a new sine wave.
    learner = metalab.load_learner(run_dir, device="cpu")
    x_support = torch.linspace(-5.0, 5.0, 10).unsqueeze(1)  # [10, 1]: inputs of one example each
    y_support = 2.0 * torch.sin(x_support.squeeze(1) - 0.5)  # [10]: amplitude 2, phase 0.5
    x_query = torch.linspace(-4.5, 4.5, 5).unsqueeze(1)
    predictions = learner.adapt(x_support, y_support).predict(x_query)  # [5], after eval_inner_steps steps
    in_process = metalab.Learner(maml, tasks.spec).adapt(x_support, y_support).predict(x_query)
    print("loaded learner predicts", [round(p, 3) for p in predictions.tolist()])
    print("true values            ", [round(2.0 * math.sin(x - 0.5), 3) for x in x_query.squeeze(1).tolist()])

    return {
        "run_dir": str(run_dir),
        "test_mse": test["mean"],
        "evaluated_mse": mean,
        "x_support": x_support.squeeze(1).tolist(),
        "y_support": y_support.tolist(),
        "x_query": x_query.squeeze(1).tolist(),
        "predictions": predictions.tolist(),
        "in_process_predictions": in_process.tolist(),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "outputs/python/maml_sinusoid")))
