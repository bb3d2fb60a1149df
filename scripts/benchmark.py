"""Meta-iterations per second of the vmapped MAML step against an explicit per-task Python loop
of the same computation (torch.autograd, one task at a time), in the same process.

    python scripts/benchmark.py [--device cpu|cuda] [--seconds 10] [--norm support|transductive] [--profile]

Rows: sinusoid (MLP 40-40, meta-batch 25, K = 10, one inner step) and conv4 on random 28x28
images (5-way 1-shot, 5 query per class, meta-batch 32, one inner step, batch norm protocol
``--norm``: model.norm, the support set's statistics by default); second order throughout.
"""
from __future__ import annotations

import argparse
import functools
import time

import torch
from torch.func import functional_call

from metalab.algorithms import MAML
from metalab.hypergrad import unroll
from metalab.models import MLP, Conv4
from metalab.tasks.base import ClassificationTasks
from metalab.tasks.sinusoid import Sinusoid
from metalab.types import TaskBatch


def loop_step(algo: MAML, batch: TaskBatch) -> None:
    """The same meta-update, one task at a time with torch.autograd."""
    params = algo.initial_params()
    total = 0.0
    for t in range(batch.num_tasks):
        fast = params
        for _ in range(algo.inner_steps):
            loss = algo.tasks.loss(functional_call(algo.model, fast, (batch.x_support[t],)), batch.y_support[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {k: v - algo.inner_lr * g for (k, v), g in zip(fast.items(), grads)}
        # the support set is the query's normalisation context, as in EpisodicAlgorithm.query_scores
        query = functional_call(algo.model, fast, (batch.x_query[t],), {"context": batch.x_support[t]})
        total = total + algo.tasks.loss(query, batch.y_query[t])
    algo.meta_step(total / batch.num_tasks)


def vmap_step(algo: MAML, batch: TaskBatch) -> None:
    algo.train_step(batch)


def rate(step, algo: MAML, batch: TaskBatch, seconds: float, device: torch.device) -> float:
    """Meta-iterations per second, after two warm-up steps."""
    for _ in range(2):
        step(algo, batch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        step(algo, batch)
        count += 1
    sync()
    return count / (time.perf_counter() - start)


class RandomImages(ClassificationTasks):
    """Only the scoring of a 5-way image task; the benchmark feeds one fixed random batch."""

    input_shape, output_dim = (1, 28, 28), 5

    def sample(self, batch_size, split, generator):
        raise NotImplementedError


def image_setup(device: torch.device, norm: str = "support") -> tuple[MAML, TaskBatch]:
    ways, shots, query, meta_batch = 5, 1, 5, 32
    model = Conv4((1, 28, 28), ways, norm=norm).to(device)
    algo = MAML(model, RandomImages(device), unroll(), functools.partial(torch.optim.Adam, lr=1e-3), inner_lr=0.4, inner_steps=1)
    g = torch.Generator(device=device).manual_seed(0)
    labels = lambda n: torch.arange(ways, device=device).repeat_interleave(n).expand(meta_batch, -1).contiguous()
    batch = TaskBatch(torch.rand(meta_batch, ways * shots, 1, 28, 28, generator=g, device=device), labels(shots),
                      torch.rand(meta_batch, ways * query, 1, 28, 28, generator=g, device=device), labels(query))
    return algo, batch


def sinusoid_setup(device: torch.device) -> tuple[MAML, TaskBatch]:
    tasks = Sinusoid(device=device)
    algo = MAML(MLP((1,), 1).to(device), tasks, unroll(), functools.partial(torch.optim.Adam, lr=1e-3), inner_lr=0.01)
    return algo, tasks.sample(25, "train", tasks.generator(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=10.0, help="timing window per measurement")
    parser.add_argument("--norm", default="support", choices=("support", "transductive"), help="conv4's model.norm")
    parser.add_argument("--profile", action="store_true", help="also print where one conv4 step spends its time")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), torch {torch.__version__}")
    print("| problem | vmapped it/s | per-task loop it/s | speed-up |")
    print("|---|---|---|---|")
    conv4 = functools.partial(image_setup, norm=args.norm)
    for name, setup in (("sinusoid MLP, meta-batch 25", sinusoid_setup), (f"conv4 28x28 5w1s, meta-batch 32, norm={args.norm}", conv4)):
        algo, batch = setup(device)
        vmapped = rate(vmap_step, algo, batch, args.seconds, device)
        looped = rate(loop_step, algo, batch, args.seconds, device)
        print(f"| {name} | {vmapped:.3g} | {looped:.3g} | {vmapped / looped:.2f}x |")
    if args.profile:
        algo, batch = conv4(device)
        for label, step in (("vmapped", vmap_step), ("per-task loop", loop_step)):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step(algo, batch)
            print(f"\nconv4 step, {label}:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
