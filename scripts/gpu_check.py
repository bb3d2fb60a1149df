"""The GPU rows in one call: on a machine with a CUDA device, in a fresh clone (the shared data beside
it, ../shared/data/omniglot, or $METALAB_OMNIGLOT), ``bash scripts/gpu_check.sh``: a new virtualenv,
the README's install command, then this check (arguments pass through):

    python scripts/gpu_check.py          # --device cuda; --out DIR; meant to take under 8 minutes

It measures, in one process, and writes report.md and report.json under one folder (default
outputs/gpu_check/<timestamp>/), then prints the Markdown:

* the rows of ``scripts/benchmark.py`` on the device: seconds per meta-iteration of every column it
  has (vmapped, the per-task loop, the torch-layers loop, and the execution autotune chooses, with its
  name and tuning time), with the peak GPU memory of each (its model, batch and step, measured alone);
* the float64 meta-gradient of every column, and of every execution autotune could choose, against the
  per-task loop's, on the device;
* each row under trainer.precision=tf32 and bf16: the speed-up of the vmapped step over float32 and its
  meta-gradient's relative error against float64;
* a short MAML Omniglot 5-way 1-shot run and a short iMAML (cg) run from their paper configs on the
  shared subset: iterations per second and the projected time of the paper's iterations.

Without a CUDA device it says so and exits 2. ``--device cpu --quick`` is a dry run with tiny sizes
through every section (the sinusoid row on 4 tasks, 4-iteration runs of a 4-channel conv4; about 10
seconds; the tests run it). It lives in scripts/ beside benchmark.py, whose rows it times (scripts/ is
not part of the installed package), and it needs a clone anyway. No GPU has run it yet: its time on one
is unmeasured.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402  (scripts/benchmark.py: the rows and their columns)
from meta_gradients import float64, meta_gradient, relative_error  # noqa: E402

from metalab.app.build import CONFIG_DIR, make_trainer, resolve_device  # noqa: E402
from metalab.errors import MetalabError  # noqa: E402
from metalab.training.precision import Precision  # noqa: E402
from metalab.types import TaskBatch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = Path(os.environ.get("METALAB_OMNIGLOT") or REPO.parent / "shared" / "data" / "omniglot")
#: the report's names of benchmark.py's columns (any other column: its own name)
LABELS = {"vmapped": "vmapped", "loop": "loop", "peer": "torch-layers loop", "chosen": "chosen execution"}
PRECISIONS = ("tf32", "bf16")
#: (name, experiment, iterations timed); the projection is for the experiment's own trainer.iterations
RUNS = (("MAML Omniglot 5w1s", "maml_omniglot_5w1s", 200), ("iMAML cg Omniglot 5w1s", "imaml_omniglot_5w1s", 60))
QUICK_RUN = ["model.hidden_channels=4", "trainer.meta_batch_size=2", "algo.inner_steps=1"]


def peak_memory(device: torch.device, step: Callable, setup: Callable) -> int | None:
    """Peak bytes allocated on a CUDA ``device`` by ``step(*setup())``: the model, its batch and the step,
    over what was allocated before (None off CUDA, where the step still runs once)."""
    if device.type != "cuda":
        step(*setup())
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step(*setup())
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def first_tasks(setup: Callable, count: int) -> tuple[Any, TaskBatch]:
    """``setup()``'s algorithm with the first ``count`` tasks of its batch (the dry run's tiny sizes)."""
    algo, batch = setup()
    return algo, TaskBatch(*(tensor[:count] for tensor in vars(batch).values()))


def in_precision(precision: Precision, step: Callable, algo: Any, batch: Any) -> None:
    with precision.applied():
        step(algo, batch)


def benchmark_rows(args: argparse.Namespace, device: torch.device) -> tuple[list, list, list]:
    """(rows, agreement, precision) records for the rows of scripts/benchmark.py asked for."""
    rows, agreement, precisions = [], [], []
    options = argparse.Namespace(device=str(device), rows=args.rows, ways=args.ways, queries=args.queries)
    options.norm = "support,transductive"
    for name, setup, columns in benchmark.problems(options):
        if args.quick:
            setup, name = functools.partial(first_tasks, setup, 4), f"{name} (its first 4 tasks)"
        print(f"gpu_check: {name}", file=sys.stderr, flush=True)
        seconds, tuning = benchmark.measure(setup, columns, args.repeats, device)
        steps = {**columns, "chosen": benchmark.executed_as(tuning.chosen)}
        peaks = {column: peak_memory(device, step, setup) for column, step in steps.items()}
        rows.append({"problem": name, "seconds": seconds, "peak_bytes": peaks, "execution": tuning.record()})
        if "loop" in columns:  # float64, on the device, against the per-task loop: every column and candidate
            algo, batch = float64(setup())  # the reference's own, which also lists the candidates
            candidates = {f"execution {e.name}": benchmark.executed_as(e) for e in algo.executions(batch)}
            reference = meta_gradient(columns["loop"], algo, batch)
            for column, step in {**steps, **candidates}.items():
                if column != "loop":
                    error = relative_error(meta_gradient(step, *float64(setup())), reference)
                    agreement.append({"problem": name, "column": column, "relative_error": error})
        precisions += precision_rows(name, setup, device, args.repeats)
    return rows, agreement, precisions


def precision_rows(name: str, setup: Callable, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """The vmapped step of one row under each precision, timed in turns against float32, and the relative
    error of its meta-gradient against the float64 one."""
    exact = meta_gradient(benchmark.vmap_step, *float64(setup()))
    policies = {"32": Precision.of("32", device), **{p: Precision.of(p, device) for p in PRECISIONS}}

    def run(policy: Precision) -> Callable[..., None]:
        return functools.partial(in_precision, policy, benchmark.vmap_step)

    runs = {p: functools.partial(run(policy), *setup()) for p, policy in policies.items()}
    times = benchmark.timed(runs, repeats, device)
    del runs
    found = []
    for p, policy in policies.items():
        with policy.applied():
            error = relative_error(meta_gradient(benchmark.vmap_step, *setup()), exact)
        found.append(
            {
                "problem": name,
                "precision": p,
                "seconds": times[p],
                "speedup": times["32"] / times[p],
                "relative_error": error,
                "peak_bytes": peak_memory(device, run(policy), setup),
            }
        )
    return found


def run_overrides(args: argparse.Namespace, iterations: int) -> list[str]:
    """A short run of ``iterations`` on ``args.device``: no validation, test nor progress bar."""
    return [
        f"tasks.root={args.omniglot}",
        f"tasks.cache_dir={args.out / 'cache'}",
        f"trainer.device={args.device}",
        f"trainer.iterations={iterations}",
        f"trainer.checkpoint_every={iterations}",
        "trainer.eval_every=0",
        "trainer.eval_tasks=0",
        "trainer.test_tasks=0",
        "trainer.progress=false",
        *(QUICK_RUN if args.quick else []),
    ]


def training_runs(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Short runs of the paper configs on the shared Omniglot subset: iterations per second after a warm-up."""
    found = []
    for label, experiment, iterations in RUNS:
        iterations = 4 if args.quick else iterations
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            paper_iterations = compose(config_name="train", overrides=[f"+experiment={experiment}"]).trainer.iterations
            cfg = compose(
                config_name="train", overrides=[f"+experiment={experiment}", *run_overrides(args, iterations)]
            )

        print(f"gpu_check: {label}, {iterations} iterations", file=sys.stderr, flush=True)
        trainer = make_trainer(cfg, args.out / "runs" / experiment)
        stamps: list[float] = []
        step = trainer.algorithm.train_step

        def timed_step(batch, step=step, stamps=stamps):
            metrics = step(batch)  # its .item() metrics wait for the device
            stamps.append(time.perf_counter())
            return metrics

        trainer.algorithm.train_step = timed_step
        tune = trainer._tune

        def tune_then_time(tune=tune, stamps=stamps) -> None:  # autotune's steps are not the run's
            tune()
            stamps.clear()

        trainer._tune = tune_then_time
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.fit()
        warm = max(1, len(stamps) // 10)  # the first steps warm up (cuDNN's choices, the allocator)
        rate = (len(stamps) - warm) / (stamps[-1] - stamps[warm - 1])
        found.append(
            {
                "run": label,
                "experiment": experiment,
                "iterations": iterations,
                "iterations_per_second": rate,
                "paper_iterations": paper_iterations,
                "projected_hours": paper_iterations / rate / 3600,
                "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                "execution": trainer.tuning.record(),
            }
        )
    return found


def megabytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def markdown(record: dict[str, Any]) -> str:
    """The report: one table per section."""
    machine = record["machine"]
    lines = [
        f"# GPU check: {machine['name']}",
        "",
        f"device {machine['device']}, torch {machine['torch']}, CUDA {machine['cuda']}, "
        f"{'quick dry run, ' if record['quick'] else ''}{record['wall_seconds']:.0f} s in all; "
        f"seconds per meta-iteration, median of {record['repeats']}.",
        "",
        "## Benchmark rows",
        "",
    ]
    columns = list(dict.fromkeys(c for row in record["rows"] for c in row["seconds"]))
    others = [c for c in columns if c != "vmapped"]
    lines += [
        "| problem | "
        + " | ".join(f"{LABELS.get(c, c)} | peak memory" for c in columns)
        + "".join(f" | {LABELS.get(c, c)} / vmapped" for c in others)
        + " | chosen execution | tuning s |",
        "|---|" + "---|---|" * len(columns) + "---|" * len(others) + "---|---|",
    ]
    for row in record["rows"]:
        seconds = row["seconds"]
        cells = [f"{seconds[c]:.3g} | {megabytes(row['peak_bytes'][c])}" if c in seconds else " | " for c in columns]
        cells += [f"{seconds[c] / seconds['vmapped']:.2f}x" if c in seconds else "" for c in others]
        cells += [str(row["execution"]["chosen"]), f"{row['execution']['tuning_seconds']:.3g}"]
        lines.append(f"| {row['problem']} | " + " | ".join(cells) + " |")
    lines += ["", "## Float64 meta-gradient agreement", "", "| problem | column | relative error against the loop |"]
    lines += ["|---|---|---|"] + [
        f"| {a['problem']} | {LABELS.get(a['column'], a['column'])} | {a['relative_error']:.2e} |"
        for a in record["agreement"]
    ]
    lines += ["", "## Precision", "", "vmapped step; relative error of its meta-gradient against float64.", ""]
    lines += ["| problem | precision | seconds | speed-up over 32 | relative error | peak memory |"]
    lines += ["|---|---|---|---|---|---|"] + [
        f"| {p['problem']} | {p['precision']} | {p['seconds']:.3g} | {p['speedup']:.2f}x | {p['relative_error']:.2e} "
        f"| {megabytes(p['peak_bytes'])} |"
        for p in record["precision"]
    ]
    lines += [
        "",
        "## Training runs",
        "",
        "| run | iterations | it/s | projected | peak memory | chosen execution |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['run']} | {r['iterations']} | {r['iterations_per_second']:.2f} | "
        f"{r['projected_hours']:.2f} h for {r['paper_iterations']:,} | {megabytes(r['peak_bytes'])} "
        f"| {r['execution']['chosen']} |"
        for r in record["training"]
    ]
    return "\n".join(lines) + "\n"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:<index>, or cpu for a dry run")
    parser.add_argument("--out", type=Path, default=None, help="the report's folder (outputs/gpu_check/<timestamp>/)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a dry run through every section")
    parser.add_argument("--omniglot", type=Path, default=OMNIGLOT, help="the Omniglot data ($METALAB_OMNIGLOT)")
    args = parser.parse_args(argv)
    args.rows, args.repeats = ("sinusoid", 1) if args.quick else ("sinusoid,conv4,imaml", 5)
    args.ways, args.queries = [5, 20], [1, 5, 15]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    args.out = args.out or REPO / "outputs" / "gpu_check" / stamp
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise MetalabError(
                "no CUDA device is visible on this machine: run the GPU check where nvidia-smi lists a GPU, "
                "or pass --device cpu --quick for a dry run."
            )
        device = resolve_device(args.device, "--device")
        if not args.omniglot.is_dir():
            raise MetalabError(
                f"the Omniglot data is not at {args.omniglot}: set METALAB_OMNIGLOT or --omniglot to its folder."
            )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        args.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        rows, agreement, precisions = benchmark_rows(args, device)
        training = training_runs(args, device)
    except MetalabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    record = {
        "machine": {
            "device": str(device),
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "quick": args.quick,
        "repeats": args.repeats,
        "rows": rows,
        "agreement": agreement,
        "precision": precisions,
        "training": training,
        "wall_seconds": time.perf_counter() - start,
    }
    report = markdown(record)
    (args.out / "report.md").write_text(report)
    (args.out / "report.json").write_text(json.dumps(record, indent=2))
    print(report + f"\nwritten to {args.out}/report.md and report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
