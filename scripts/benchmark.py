"""Seconds per meta-iteration of the vmapped meta-step, and of the execution the trainer's autotune
chooses, against per-task Python loops of the same meta-update on the same batch from the same initial
model, in one process.

    python scripts/benchmark.py [--device cpu|cuda] [--threads 1,2] [--ways 5,20] [--queries 1,5,15]
                                [--repeats 5] [--rows sinusoid,conv4,imaml,anil,reptile,protonet]
                                [--norm support,transductive] [--system-malloc] [--profile]

Rows: sinusoid (MLP 40-40, meta-batch 25, K = 10); MAML on conv4 over random 28x28 images, 1-shot, one
inner step, 5-way with meta-batch 32 and 20-way with meta-batch 16 (the MAML paper's), at each number of
queries per class; iMAML conv4 (5-way 1-shot, 1 query, meta-batch 16, 16 inner steps, cg with 5
iterations); ANIL (one inner step on the head), Reptile (5 inner SGD steps) and Prototypical Networks on
conv4 5-way 1-shot, 1 query, meta-batch 32. Every conv4 row runs under each batch-norm protocol of
``--norm`` (model.norm: "support", the support set's statistics, the default; "transductive", each
batch's own, as the paper-row experiments and the peers). Columns:

* vmapped: ``train_step``, the trainer's step, vmapped over the whole meta-batch (trainer.autotune=false).
* chosen: the same step as the execution ``metalab.training.autotune`` chooses for this row (timed on
  the row's batch, as a run does on its first batch), its name, and the seconds choosing took; when the
  choice is full vmap it is the vmapped column.
* loop: the same meta-update one task at a time with torch.autograd, through the same model (MAML
  rows); for iMAML, ANIL, Reptile and ProtoNets the algorithm's own per-task loop execution.
* torch-layers loop: one task at a time through ``F.conv2d`` and torch's fused ``F.batch_norm`` over
  the batch it normalises, the model of learn2learn's and higher's MAML examples; the stand-in for the
  peers. Under "support" the query rows take the support rows' statistics, from ``torch.var_mean``
  (torch's batch norm differentiates no statistics taken from elsewhere), so that it computes the
  same function as the other columns.
* floor: the step's multiply-add FLOPs (counted on the loop) at the rate of one large float32
  matrix product on this machine: no implementation of this arithmetic runs much faster, so
  loop / floor bounds the speed-up any implementation could have over the loop.
* holds: whether the chosen execution is at least as fast as the faster loop, and slower than full vmap
  by no more than its tuning time spread over a 1,000-iteration run.

Each time is the median of ``--repeats`` steps after one warm-up step; a row's columns take turns,
one step each, so that drift in the machine's speed slows them alike. The process keeps freed
memory for reuse as a training run does (``metalab.app.allocator``), unless ``--system-malloc``.
The load averages at the start and the end are printed, and (on Linux) the cores other processes kept
busy meanwhile, with a warning when they did: on a loaded machine the loops slow far more than the
vmapped step, and a ratio can be off by 5x.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from metalab.algorithms import ANIL, IMAML, MAML, ProtoNet, Reptile
from metalab.algorithms.episodic import EpisodicAlgorithm
from metalab.algorithms.execution import Execution
from metalab.app.allocator import reuse_freed_memory
from metalab.hypergrad import cg, first_order, unroll
from metalab.models import MLP, Conv4
from metalab.tasks.base import ClassificationTasks
from metalab.tasks.episodic.sinusoid import Sinusoid
from metalab.training.autotune import choose
from metalab.types import TaskBatch

Step = Callable[[EpisodicAlgorithm, TaskBatch], None]

#: the length of run over which the chosen execution's tuning time is spread (``holds``)
AMORTISED = 1000


def vmap_step(algo: EpisodicAlgorithm, batch: TaskBatch) -> None:
    algo.train_step(batch)


def loop_step(algo: MAML, batch: TaskBatch, forward: Callable | None = None) -> None:
    """MAML's meta-update one task at a time with torch.autograd. ``forward(params, x, context)``
    is the model (by default ``algo.model`` with the support set as context, as the vmapped step)."""
    forward = forward or (lambda params, x, context: functional_call(algo.model, params, (x,), {"context": context}))
    params, total = algo.initial_params(), 0.0
    for t in range(batch.num_tasks):
        fast = params
        for _ in range(algo.inner_steps):
            loss = algo.tasks.loss(forward(fast, batch.x_support[t], None), batch.y_support[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {k: v - algo.inner_lr * g for (k, v), g in zip(fast.items(), grads)}
        total = total + algo.tasks.loss(forward(fast, batch.x_query[t], batch.x_support[t]), batch.y_query[t])
    algo.meta_step(total / batch.num_tasks)


def torch_layers(params: dict, x: torch.Tensor, context: torch.Tensor | None, model: Conv4) -> torch.Tensor:
    """Conv4's function through torch's layers, as the peers' examples write it: ``F.conv2d`` and torch's
    fused ``F.batch_norm`` over the batch it normalises. Under the support protocol (``context``, the
    support set, given) the query rows are normalised with the support rows' statistics, taken with
    ``torch.var_mean`` (torch's batch norm differentiates no statistics taken from elsewhere)."""
    support = context is not None and model.norm == "support"
    for index, layer in enumerate(model.features):
        weight, bias = params.get(f"features.{index}.weight"), params.get(f"features.{index}.bias")
        if isinstance(layer, torch.nn.Conv2d):
            x = F.conv2d(x, weight, bias, layer.stride, layer.padding)
            context = F.conv2d(context, weight, bias, layer.stride, layer.padding) if support else None
        elif weight is not None and support:
            var, mean = torch.var_mean(context, dim=(0, 2, 3), unbiased=False, keepdim=True)
            x = (x - mean) * torch.rsqrt(var + layer.eps) * weight[:, None, None] + bias[:, None, None]
            context = F.batch_norm(context, None, None, weight, bias, training=True, eps=layer.eps)
        elif weight is not None:
            x = F.batch_norm(x, None, None, weight, bias, training=True, eps=layer.eps)
        else:
            x, context = layer(x), layer(context) if support else None
    return F.linear(x, params["head.weight"], params["head.bias"])


def timed(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each of ``runs`` (column name -> call) after one warm-up call each. The
    columns take turns, one call each per round, so that a machine whose speed drifts (a shared
    or throttled CPU) slows them alike and their ratios stay fair."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def executed_as(execution: Execution) -> Step:
    """``train_step`` as ``execution`` (one the algorithm offers)."""

    def step(algo: EpisodicAlgorithm, batch: TaskBatch) -> None:
        algo.use(execution)
        algo.train_step(batch)

    return step


#: ``train_step`` as the algorithm's per-task loop execution: one task at a time, results stacked
own_loop_step = executed_as(Execution(layout=False, loop=True))


def measure(setup: Callable, columns: dict[str, Step], repeats: int, device: torch.device):
    """({column: seconds per step} for ``columns`` and "chosen", the execution autotune chooses on the
    row's batch, as a run does on its first; the ``Tuning``). Each column runs on a fresh ``setup()``, so
    that all start from the same model, and they take turns (``timed``). When the choice is full vmap it
    is the vmapped column's step, and takes its time."""
    runs = {column: functools.partial(step, *setup()) for column, step in columns.items()}
    algo, batch = setup()
    tuning = choose(algo, batch, device)  # leaves algo as it found it, using the chosen execution
    if tuning.chosen != algo.executions(batch)[0]:  # the first is full vmap as this batch runs it
        runs["chosen"] = functools.partial(vmap_step, algo, batch)
    time_of = timed(runs, repeats, device)
    time_of.setdefault("chosen", time_of["vmapped"])
    return time_of, tuning


def peer_step(algo: MAML, batch: TaskBatch) -> None:
    """``loop_step`` through ``torch_layers``, the peers' model."""
    loop_step(algo, batch, functools.partial(torch_layers, model=algo.model))


def matmul_rate(device: torch.device) -> float:
    """FLOP/s of a 2048x2048 float32 matrix product, the best case of this machine's arithmetic."""
    a = torch.randn(2048, 2048, device=device)
    return 2 * 2048**3 / timed({"matmul": lambda: a @ a}, 5, device)["matmul"]


def flops(step: Step, algo: EpisodicAlgorithm, batch: TaskBatch) -> int:
    with FlopCounterMode(display=False) as counter:
        step(algo, batch)
    return counter.get_total_flops()


class RandomImages(ClassificationTasks):
    """Only the scoring of an image task; the benchmark feeds one fixed random batch."""

    input_shape = (1, 28, 28)

    def __init__(self, device: torch.device, ways: int):
        super().__init__(device)
        self.output_dim = ways

    def sample(self, batch_size, split, generator):
        raise NotImplementedError


def image_batch(ways: int, query: int, meta_batch: int, device: torch.device) -> TaskBatch:
    g = torch.Generator(device=device).manual_seed(0)

    def labels(n):
        return torch.arange(ways, device=device).repeat_interleave(n).expand(meta_batch, -1).contiguous()

    def images(n):
        return torch.rand(meta_batch, ways * n, 1, 28, 28, generator=g, device=device)

    return TaskBatch(images(1), labels(1), images(query), labels(query))


def conv4_setup(
    device: torch.device, ways: int, query: int, meta_batch: int, norm: str = "support"
) -> tuple[MAML, TaskBatch]:
    torch.manual_seed(0)
    model = Conv4((1, 28, 28), ways, norm=norm).to(device)
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    return MAML(model, RandomImages(device, ways), unroll(), adam, inner_lr=0.4), image_batch(
        ways, query, meta_batch, device
    )


def imaml_setup(device: torch.device, norm: str = "support") -> tuple[IMAML, TaskBatch]:
    torch.manual_seed(0)
    model = Conv4((1, 28, 28), 5, norm=norm).to(device)
    algo = IMAML(
        model,
        RandomImages(device, 5),
        cg(maxiter=5),
        functools.partial(torch.optim.Adam, lr=1e-3),
        inner_lr=0.1,
        inner_steps=16,
        lam=2.0,
    )
    return algo, image_batch(5, 1, 16, device)


def plugin_setup(name: str, device: torch.device, norm: str = "support") -> tuple[EpisodicAlgorithm, TaskBatch]:
    """ANIL, Reptile or ProtoNet on conv4 5-way 1-shot, 1 query, meta-batch 32."""
    torch.manual_seed(0)
    model, tasks = Conv4((1, 28, 28), 5, norm=norm).to(device), RandomImages(device, 5)
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    algo = {
        "anil": lambda: ANIL(model, tasks, unroll(), adam, inner_lr=0.4),
        "reptile": lambda: Reptile(model, tasks, first_order(), adam, inner_lr=0.4, inner_steps=5),
        "protonet": lambda: ProtoNet(model, tasks, first_order(), adam),
    }[name]()
    return algo, image_batch(5, 1, 32, device)


PLUGIN_ROWS = {
    "anil": "ANIL conv4 5w1s, meta-batch 32, 1 query per class",
    "reptile": "Reptile conv4 5w1s, meta-batch 32, 5 inner steps",
    "protonet": "ProtoNets conv4 5w1s, meta-batch 32, 1 query per class",
}


def sinusoid_setup(device: torch.device) -> tuple[MAML, TaskBatch]:
    torch.manual_seed(0)
    tasks = Sinusoid(device=device)
    algo = MAML(MLP((1,), 1).to(device), tasks, unroll(), functools.partial(torch.optim.Adam, lr=1e-3), inner_lr=0.01)
    return algo, tasks.sample(25, "train", tasks.generator(0))


def protocol_problems(args, device: torch.device, rows: list[str], norm: str) -> list:
    """``problems``'s conv4 rows under the batch-norm protocol ``norm`` (model.norm)."""
    found = []
    loops = {"vmapped": vmap_step, "loop": loop_step}
    if "conv4" in rows:
        for ways in args.ways:
            meta_batch = 32 if ways <= 5 else 16
            found += [
                (
                    f"MAML conv4 {ways}w1s, meta-batch {meta_batch}, {q} {'query' if q == 1 else 'queries'}, {norm}",
                    functools.partial(conv4_setup, device, ways, q, meta_batch, norm),
                    {**loops, "peer": peer_step},
                )
                for q in args.queries
            ]
    if "imaml" in rows:
        found.append(
            (
                f"iMAML conv4 5w1s, meta-batch 16, 16 inner steps, cg(5), {norm}",
                functools.partial(imaml_setup, device, norm),
                {"vmapped": vmap_step, "loop": own_loop_step},
            )
        )
    found += [
        (
            f"{label}, {norm}",
            functools.partial(plugin_setup, name, device, norm),
            {"vmapped": vmap_step, "loop": own_loop_step},
        )
        for name, label in PLUGIN_ROWS.items()
        if name in rows
    ]
    return found


def problems(args) -> list[tuple[str, Callable[[], tuple[EpisodicAlgorithm, TaskBatch]], dict[str, Step]]]:
    """(name, setup, the steps to time: column name -> step) for the rows asked for."""
    device, rows = torch.device(args.device), args.rows.split(",")
    loops = {"vmapped": vmap_step, "loop": loop_step}
    found = (
        [("sinusoid MLP, meta-batch 25", functools.partial(sinusoid_setup, device), loops)]
        if "sinusoid" in rows
        else []
    )
    for norm in args.norm.split(","):
        found += protocol_problems(args, device, rows, norm)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def numbers(text):
        return [int(n) for n in text.split(",")]

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=numbers, default=[1, 2], help="CPU threads, each a set of rows")
    parser.add_argument("--ways", type=numbers, default=[5, 20])
    parser.add_argument("--queries", type=numbers, default=[1, 5, 15], help="query examples per class")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement (the median is shown)")
    parser.add_argument("--rows", default="sinusoid,conv4,imaml,anil,reptile,protonet")
    parser.add_argument(
        "--norm", default="support,transductive", help="conv4's batch-norm protocols (model.norm), comma-separated"
    )
    parser.add_argument(
        "--system-malloc", action="store_true", help="keep glibc's default allocation (as before metalab.app.allocator)"
    )
    parser.add_argument("--profile", action="store_true", help="also print where each conv4 step spends its time")
    args = parser.parse_args()
    device = torch.device(args.device)
    malloc = "glibc defaults" if args.system_malloc or not reuse_freed_memory() else "freed memory reused"
    threads = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(
        f"device: {device} ({machine}), torch {torch.__version__}, {malloc}; "
        f"seconds per meta-iteration, median of {args.repeats}"
    )
    others = OtherProcesses()
    print(
        "| problem | threads | vmapped | chosen | chosen execution | tuning s | loop | loop / vmapped | loop / chosen "
        "| torch-layers loop | torch-layers / chosen | floor | loop / floor | holds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    held, rows = 0, 0
    for count in threads:
        torch.set_num_threads(count)
        peak = matmul_rate(device)
        for name, setup, columns in problems(args):
            time_of, tuning = measure(setup, columns, args.repeats, device)
            vmapped, chosen = time_of["vmapped"], time_of["chosen"]
            cells = [f"{chosen:.3g}", tuning.chosen.name, f"{tuning.seconds:.3g}"] + [""] * 7
            if "loop" in time_of:
                looped = time_of["loop"]
                cells[3:6] = [f"{looped:.3g}", f"{looped / vmapped:.2f}x", f"**{looped / chosen:.2f}x**"]
                if columns["loop"] is loop_step:  # the floor counts the hand-written MAML loop's FLOPs
                    floor = flops(loop_step, *setup()) / peak
                    cells[8:10] = [f"{floor:.3g}", f"{looped / floor:.1f}x"]
            if "peer" in time_of:  # the torch-layers loop
                cells[6:8] = [f"{time_of['peer']:.3g}", f"**{time_of['peer'] / chosen:.2f}x**"]
            verdict = holds(chosen, vmapped, tuning.seconds, [time_of[c] for c in ("loop", "peer") if c in time_of])
            held, rows = held + (verdict == "yes"), rows + 1
            print(f"| {name} | {count} | {vmapped:.3g} | " + " | ".join([*cells, verdict]) + " |", flush=True)
            if args.profile and "peer" in columns:  # the conv4 rows
                for label, step in (("vmapped", vmap_step), ("loop", loop_step)):
                    algo, batch = setup()
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                        step(algo, batch)
                    print(
                        f"\n{name}, {label}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
                    )
    print(f"\nthe chosen execution held on {held} of {rows} rows (holds: {HOLDS})")
    others.report()


#: what the "holds" column checks
HOLDS = (
    "the chosen execution at least as fast as the fastest loop, and slower than full vmap by no more "
    f"than its tuning time spread over a {AMORTISED:,}-iteration run"
)


def holds(chosen: float, vmapped: float, tuning: float, loops: list[float]) -> str:
    """ "yes" when ``chosen`` seconds per step is no slower than the fastest of ``loops`` and than
    ``vmapped`` plus ``tuning`` seconds amortised over ``AMORTISED`` iterations; else what failed."""
    failed = []
    if loops and chosen > min(loops):
        failed.append(f"{min(loops) / chosen:.2f}x the fastest loop")
    if chosen > vmapped + tuning / AMORTISED:
        failed.append(f"{1000 * (chosen - vmapped):.0f} ms/it over full vmap")
    return "yes" if not failed else "no: " + ", ".join(failed)


class OtherProcesses:
    """The machine's load while the benchmark runs: the load averages at the start and the end, and (on
    Linux) the cores other processes kept busy on average, the machine's busy CPU time from /proc/stat
    less this process's own. ``report`` warns when others used more than ``BUSY`` of a core."""

    BUSY = 0.1

    def __init__(self) -> None:
        self.start, self.busy = time.perf_counter(), self._busy_seconds()
        self.own = self._own_seconds()
        print("load average at the start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)

    @staticmethod
    def _busy_seconds() -> float | None:
        try:  # cpu  user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
            fields = [int(v) for v in open("/proc/stat").readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        usage = os.times()
        return usage.user + usage.system

    def report(self) -> None:
        print("load average at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        busy = self._busy_seconds()
        if busy is None or self.busy is None:
            return
        wall = time.perf_counter() - self.start
        others = max(0.0, (busy - self.busy) - (self._own_seconds() - self.own)) / wall
        print(f"other processes kept {others:.2f} cores busy on average while it ran")
        if others > self.BUSY:
            print(
                "warning: the machine was busy: the ratios are unreliable (the loops slow far more than the "
                "vmapped step); rerun on a quiet machine"
            )


if __name__ == "__main__":
    main()
