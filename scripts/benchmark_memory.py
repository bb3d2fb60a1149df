"""Peak memory and time per meta-iteration of MAML (solver=unroll, second order) against iMAML
(solver=cg, 5 CG iterations, lam = 2) as the number of inner steps grows: the iMAML paper's claim
that the implicit meta-gradient's memory does not grow with the inner steps, while MAML's grows
linearly (docs: shared/design/PAPERS.md, iMAML section).

    python scripts/benchmark_memory.py [--device cpu|cuda] [--steps 1,2,4,8,16,32]
                                       [--meta-batch 16] [--repeats 3] [--budget 40] [--threads 1]

Problem: conv4 (64 filters, stride 2) on one fixed batch of random 28x28x1 images shaped like
5-way 1-shot Omniglot, 5 query images per class, meta-batch 16; MAML with inner lr 0.4, iMAML
with inner SGD lr 0.1; Adam(lr 1e-3) outside. One meta-iteration = ``algo.train_step(batch)``.

Memory, the peak growth during the meta-iterations over what was resident just before them
(model, batch and meta-optimizer built, nothing run yet):
  * cuda: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
    memory_allocated() before the steps: the tensors' bytes, exactly, without the caching
    allocator's reserve. One process measures every configuration in turn.
  * cpu: torch keeps no allocation statistics for the CPU, so each (algorithm, inner steps)
    configuration runs in a fresh subprocess (this script re-invoked with a hidden --_worker
    flag) and reports the peak resident set size: ru_maxrss (resource.getrusage, KiB on Linux)
    after the first --memory-iterations meta-iterations (default 1, the warm-up), minus VmRSS
    (/proc/self/status) read right before the first one. Before that read the kernel's high-water mark
    is reset (writing "5" to
    /proc/self/clear_refs, Linux >= 4.0; ru_maxrss follows it), so the imports and set-up cannot
    hide a smaller peak; where that file cannot be written the script says so and ru_maxrss is
    the lifetime peak (still >= the steps' peak). During the measured iteration the child fixes
    glibc's mmap threshold at 64 KiB (mallopt(M_MMAP_THRESHOLD), as MALLOC_MMAP_THRESHOLD_=65536
    would): every tensor larger than that gets its own mmap and goes back to the kernel when
    freed, so RSS follows the live tensors. With glibc's default, *dynamic* threshold, freed
    activations stay in the heap and RSS measures fragmentation as much as the algorithm (here
    342 instead of 201 MiB for MAML with 1 step, 529 instead of 332 with 4).
    RSS rather than torch.profiler(profile_memory=True): the profiler records each operator's
    allocations and frees but not a peak of live memory, which would have to be rebuilt from its
    event stream, and it slows the second-order steps down; RSS is the number the operating
    system holds the process to. Its resolution is one page, far below the tens of MiB at stake.
Time: median seconds per meta-iteration over up to --repeats iterations after the memory
measurement (which is the warm-up), fewer (at least 1) where the warm-up shows that --repeats would
take longer than --budget seconds: MAML with 16-32 second-order steps on a CPU. On the CPU these
run with the mmap threshold raised back to 32 MiB (freed memory reused from the heap, as glibc
does by default once warm), since 64 KiB costs a page fault per fresh page: 1.3-1.7x slower
steps. --threads 1 by default on the CPU: on a shared 2-core machine, two OpenMP threads that
spin-wait for a descheduled sibling made MAML's steps ~3x slower than one thread.

The peak is taken over the first meta-iteration only (--memory-iterations 1), to keep the full
run near 10 minutes on 2 CPU cores; later iterations allocate the same tensors (with 3
iterations the CPU numbers come out ~7 MiB higher for every configuration: small heap
allocations and Adam's state, constant in the inner steps).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import metalab.hypergrad
from metalab.algorithms import IMAML, MAML
from metalab.algorithms.base import Algorithm
from metalab.app.allocator import M_MMAP_THRESHOLD, mallopt
from metalab.models import Conv4
from metalab.types import TaskBatch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import RandomImages  # noqa: E402  (scripts/benchmark.py: scoring of an image task)

WAYS, SHOTS, QUERY = 5, 1, 5
ALGORITHMS = ("maml", "imaml")
MIB = 2.0**20
MMAP_THRESHOLD = 64 * 2**10  # bytes; see the module docstring


def build(name: str, steps: int, meta_batch: int, device: torch.device) -> tuple[Algorithm, TaskBatch]:
    torch.manual_seed(0)
    model = Conv4((1, 28, 28), WAYS).to(device)
    tasks = RandomImages(device, 5)
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    if name == "maml":
        algo: Algorithm = MAML(model, tasks, metalab.hypergrad.unroll(), adam, inner_lr=0.4, inner_steps=steps)
    else:
        algo = IMAML(model, tasks, metalab.hypergrad.cg(maxiter=5), adam, lam=2.0, inner_lr=0.1, inner_steps=steps)
    g = torch.Generator(device=device).manual_seed(0)

    def labels(n):
        return torch.arange(WAYS, device=device).repeat_interleave(n).expand(meta_batch, -1).contiguous()

    batch = TaskBatch(
        torch.rand(meta_batch, WAYS * SHOTS, 1, 28, 28, generator=g, device=device),
        labels(SHOTS),
        torch.rand(meta_batch, WAYS * QUERY, 1, 28, 28, generator=g, device=device),
        labels(QUERY),
    )
    return algo, batch


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(
    name: str,
    steps: int,
    meta_batch: int,
    repeats: int,
    budget: float,
    device: torch.device,
    memory_iterations: int = 1,
) -> dict:
    """Peak memory growth (MiB) over the first ``memory_iterations`` meta-iterations (the first
    is the warm-up), then the median s/it of up to ``repeats`` more."""
    algo, batch = build(name, steps, meta_batch, device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    gc.collect()
    if cuda:
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before, reset, exact_malloc = torch.cuda.memory_allocated(device), True, True
    else:
        exact_malloc = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)  # a fixed value also ends glibc's adjustment
        gc.collect()
        reset = _reset_rss_peak()
        before = _status_kib("VmRSS")

    start = time.perf_counter()
    for _ in range(memory_iterations):
        algo.train_step(batch)
    sync()
    warm = (time.perf_counter() - start) / memory_iterations
    if cuda:
        peak = (torch.cuda.max_memory_allocated(device) - before) / MIB
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        mallopt(M_MMAP_THRESHOLD, 32 * 2**20)  # timing: freed memory is reused from the heap, as by default

    count = max(1, min(repeats, int(budget // max(warm, 1e-9))))
    times = []
    for _ in range(count):
        start = time.perf_counter()
        metrics = algo.train_step(batch)
        sync()
        times.append(time.perf_counter() - start)
    return {
        "algo": name,
        "steps": steps,
        "peak_mib": peak,
        "sec_per_it": statistics.median(times),
        "measured": count,
        "warmup_s": warm,
        "hwm_reset": reset,
        "fixed_mmap_threshold": exact_malloc,
        "loss": metrics["loss"],
    }


def run_worker(name: str, steps: int, args: argparse.Namespace) -> dict:
    """One configuration in a fresh CPU process: nothing of the previous one is resident."""
    cmd = [
        sys.executable,
        __file__,
        "--_worker",
        f"{name}:{steps}",
        "--device",
        "cpu",
        "--meta-batch",
        str(args.meta_batch),
        "--repeats",
        str(args.repeats),
        "--budget",
        str(args.budget),
        "--memory-iterations",
        str(args.memory_iterations),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} with {steps} inner steps failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", default="1,2,4,8,16,32", help="comma-separated inner step counts")
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="measured meta-iterations after 1 warm-up")
    parser.add_argument(
        "--budget",
        type=float,
        default=40.0,
        help="seconds of timed iterations per configuration; fewer repeats where exceeded",
    )
    parser.add_argument(
        "--memory-iterations",
        type=int,
        default=1,
        help="meta-iterations the memory peak is taken over (the first is the warm-up)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (cpu only; 0 = torch's default). 1 by default: on a shared machine "
        "OpenMP threads that spin-wait for a descheduled sibling made each step ~3x slower",
    )
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)

    if args._worker:
        name, steps = args._worker.split(":")
        print(
            json.dumps(
                measure(name, int(steps), args.meta_batch, args.repeats, args.budget, device, args.memory_iterations)
            )
        )
        return

    steps_list = [int(s) for s in args.steps.split(",")]
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{torch.get_num_threads()} thread(s), one subprocess per configuration, peak RSS growth"
    )
    print(f"device: {device} ({where}), torch {torch.__version__}")
    print(
        f"conv4 28x28x1, 5-way 1-shot, 5 query/class, meta-batch {args.meta_batch}; "
        "MAML unroll (2nd order, inner lr 0.4) vs iMAML cg(maxiter=5), lam 2, inner lr 0.1",
        flush=True,
    )
    results: dict[tuple[str, int], dict] = {}
    for steps in steps_list:
        for name in ALGORITHMS:
            if device.type == "cuda":
                result = measure(
                    name, steps, args.meta_batch, args.repeats, args.budget, device, args.memory_iterations
                )
            else:
                result = run_worker(name, steps, args)
            results[name, steps] = result
            print(
                f"  {name:5s} {steps:2d} steps: peak {result['peak_mib']:8.1f} MiB, "
                f"{result['sec_per_it']:.3f} s/it ({result['measured']} measured, warm-up {result['warmup_s']:.1f} s)"
                + ("" if result["hwm_reset"] else "  [RSS high-water mark not reset]")
                + ("" if result["fixed_mmap_threshold"] else "  [mallopt failed: RSS includes glibc's heap]"),
                file=sys.stderr,
                flush=True,
            )

    print()
    print("| inner steps | MAML peak MiB | iMAML peak MiB | MAML s/it | iMAML s/it |")
    print("|---|---|---|---|---|")
    for steps in steps_list:
        m, i = results["maml", steps], results["imaml", steps]
        print(
            f"| {steps} | {m['peak_mib']:.1f} | {i['peak_mib']:.1f} | {m['sec_per_it']:.3f} | {i['sec_per_it']:.3f} |"
        )
    print()
    first, last = steps_list[0], steps_list[-1]
    for label, name, target in (("iMAML", "imaml", " (target <= 1.25)"), ("MAML", "maml", "")):
        ratio = results[name, last]["peak_mib"] / results[name, first]["peak_mib"]
        print(f"{label} peak({last}) / peak({first}) = {ratio:.2f}{target}")


if __name__ == "__main__":
    main()
