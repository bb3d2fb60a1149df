"""Meta-iterations per second of the learned LSTM optimizer, with all coordinates of all problems in
one LSTM call per step, against the same meta-iteration with one LSTM call per problem per step
(a Python loop over problems), in the same process.

    python scripts/benchmark_lstm_optimizer.py [--device cpu|cuda] [--seconds 10] [--mnist-root DIR]

One meta-iteration: a batch of fresh problems optimised for 100 steps, a meta-update every 20
(first_order, the paper's settings). Rows: quadratic (10 dimensions, 128 problems a batch) and the
MNIST MLP (20 sigmoid units, 15,910 parameters, minibatches of 128; 1 and 8 problems a batch).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from torch import Tensor

from metalab.algorithms import LSTMOptimizer
from metalab.hypergrad import first_order
from metalab.models import MLP
from metalab.optim.lstm_rule import CoordinatewiseLSTM, LSTMState
from metalab.tasks.optimizees.mnist_mlp import MnistMLP
from metalab.tasks.optimizees.quadratic import Quadratic


class PerProblemRule(torch.nn.Module):
    """The same rule called once per problem (a row of the gradient [B, D]): the loop baseline."""

    def __init__(self, rule: CoordinatewiseLSTM):
        super().__init__()
        self.rule = rule

    def initial_state(self, *args, **kwargs) -> LSTMState:
        return self.rule.initial_state(*args, **kwargs)

    def forward(self, grad: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        width = grad.shape[-1]
        updates, hidden, cell = [], [], []
        for b in range(grad.shape[0]):
            part = LSTMState(state.hidden[:, b * width : (b + 1) * width], state.cell[:, b * width : (b + 1) * width])
            update, part = self.rule(grad[b], part)
            updates.append(update)
            hidden.append(part.hidden)
            cell.append(part.cell)
        return torch.stack(updates), LSTMState(torch.cat(hidden, dim=1), torch.cat(cell, dim=1))


def rate(algo: LSTMOptimizer, tasks, problems: int, seconds: float) -> float:
    """Meta-iterations per second over about ``seconds`` (after one warm-up iteration)."""
    generator = tasks.generator(0)
    algo.train_step(tasks.sample(problems, "train", generator))
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count == 0:
        algo.train_step(tasks.sample(problems, "train", generator))
        count += 1
    if tasks.device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--mnist-root", default="../shared/data/mnist")
    args = parser.parse_args()
    rows = [("quadratic", lambda: Quadratic(device=args.device), 128)]
    rows += [("mnist_mlp", lambda: MnistMLP(args.mnist_root, device=args.device), n) for n in (1, 8)]
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'family':<12}{'problems':>9}{'batched it/s':>14}{'loop it/s':>11}{'speed-up':>10}")
    for name, make_tasks, problems in rows:
        tasks = make_tasks()
        speeds = []
        for looped in (False, True):
            torch.manual_seed(0)
            algo = LSTMOptimizer(MLP((1,), 1), tasks, first_order(), functools.partial(torch.optim.Adam, lr=1e-3))
            algo.to(args.device)
            if looped:
                algo.rule = PerProblemRule(algo.rule)
            speeds.append(rate(algo, tasks, problems, args.seconds))
        print(f"{name:<12}{problems:>9}{speeds[0]:>14.3g}{speeds[1]:>11.3g}{speeds[0] / speeds[1]:>9.1f}x")


if __name__ == "__main__":
    main()
