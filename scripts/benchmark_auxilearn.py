"""AuxiLearn's speed: primary steps per second, and the cost of one combiner (hypergradient) step with
each solver, in seconds and in primary steps, measured in the same process.

    python scripts/benchmark_auxilearn.py [--device cpu|cuda] [--seconds 5] [--omniglot-root DIR]

Rows: the toy regression (tasks=aux_toy, a linear primary network, 11 parameters, batches of 25) and
Omniglot with auxiliary tasks (tasks=aux_omniglot's defaults on the 136-character subset: Conv4 with
64 channels, heads for the 136 characters, 5 alphabets, 4 rotations read from a rotated view and 136
random labels; batches of 32 drawings, auxiliary-split batches of 64). A primary step: the network
on every view, per-example losses of all heads (one batched call, no loop over examples), L_T,
backward, Adam.
A combiner step: L_T and L_A at the current w, the hypergradient through ``metalab.hypergrad`` (linear
combiner), clipping, SGD.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch

from metalab.algorithms import AuxiLearn
from metalab.hypergrad import cg, exact, gmres, neumann
from metalab.models import MLP, Conv4
from metalab.tasks.auxiliary.base import AuxiliaryTasks
from metalab.tasks.auxiliary.omniglot import AuxOmniglot
from metalab.tasks.auxiliary.toy import AuxToy

OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"


def build(row: str, solver, device: torch.device, root: Path) -> tuple[AuxiLearn, AuxiliaryTasks, int]:
    torch.manual_seed(0)
    if row == "toy":
        tasks, batch_size = AuxToy(device=device), 25
        model = MLP(tasks.input_shape, tasks.output_dim, hidden_sizes=[])
    else:
        tasks, batch_size = AuxOmniglot(str(root), device=device), 32
        model = Conv4(tasks.input_shape, tasks.output_dim)
    algorithm = AuxiLearn(
        model.to(device),
        tasks,
        solver,
        None,
        update_every=10**9,
        primary_optimizer=functools.partial(torch.optim.Adam, lr=1e-4),
        combiner_optimizer=functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9),
    )
    return algorithm, tasks, batch_size


def timed(function, seconds: float, device: torch.device) -> float:
    """Seconds per call of ``function`` over about ``seconds`` (after one warm-up call)."""
    function()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count == 0:
        function()
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--omniglot-root", type=Path, default=OMNIGLOT, help="Omniglot (the subset beside the checkout)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| data (parameters) | primary steps/s | solver | one hypergradient step | in primary steps |")
    print("|---|---|---|---|---|")
    for row in ("toy", "aux_omniglot conv4"):
        if row != "toy" and not args.omniglot_root.is_dir():
            print(f"(no Omniglot at {args.omniglot_root}: pass --omniglot-root to add its row)")
            continue
        solvers = [neumann(terms=3), cg(maxiter=5), gmres(maxiter=5)] + ([exact()] if row == "toy" else [])
        for index, solver in enumerate(solvers):
            algorithm, tasks, batch_size = build(row, solver, device, args.omniglot_root)
            generator = tasks.generator(0)
            batch = tasks.sample(batch_size, "train", generator)
            step = timed(
                lambda: algorithm.train_step(tasks.sample(batch_size, "train", generator)), args.seconds, device
            )
            hyper = timed(lambda: algorithm.combiner_step(batch), args.seconds, device)
            size = sum(p.numel() for p in algorithm.model.parameters())
            print(
                f"| {row} ({size:,}) | {1 / step:.1f} | {solver.name} | {1000 * hyper:.1f} ms | {hyper / step:.1f} |"
                if index == 0
                else f"| | {1 / step:.1f} | {solver.name} | {1000 * hyper:.1f} ms | {hyper / step:.1f} |"
            )


if __name__ == "__main__":
    main()
