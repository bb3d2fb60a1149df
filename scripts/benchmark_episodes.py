"""Episodes per second of the Omniglot sampler, against a per-task Python loop on the same data.

    python scripts/benchmark_episodes.py                  # cuda if present, else the CPU with 1 and 2 threads
    python scripts/benchmark_episodes.py --device cpu --threads 2 --seconds 1

Meta-batches of 32 tasks, 5-way and 20-way 1-shot (query = shots, as in MAML), on two data sets:
the real Omniglot subset (136 characters, so 372 training classes with rotations) and a
full-size stand-in with random pixels (1,623 characters: 4,400 training classes), since the
cost of choosing classes grows with their number. The baseline draws each task the way common
implementations do, a loop over tasks and classes (``randperm`` per class, ``torch.stack``),
from the same resident tensor. For scale, "copy bound" is the rate at which the machine can
merely copy a batch's worth of float32 images (one ``copy_`` of that many bytes): no sampler
can beat it. Prints a markdown table; every figure is the median over repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from metalab.tasks.episodic.episodes import ImageEpisodes, episode_shapes
from metalab.tasks.episodic.omniglot import Omniglot
from metalab.types import TaskBatch

__all__ = ["main"]

META_BATCH = 32


def loop_sampler(sampler: ImageEpisodes, ways: int, shots: int, query: int) -> Callable[[torch.Generator], TaskBatch]:
    """The baseline: one task, then one class, at a time."""
    classes = sampler.split_classes["train"]
    images = sampler.images

    def sample(generator: torch.Generator) -> TaskBatch:
        tasks = []
        for _ in range(META_BATCH):
            chosen = classes[torch.randperm(classes.numel(), generator=generator, device=classes.device)[:ways]]
            support, query_set = [], []
            for cls in chosen.tolist():
                picks = torch.randperm(images.shape[1], generator=generator, device=classes.device)[: shots + query]
                drawn = images[cls, picks]
                support.append(drawn[:shots])
                query_set.append(drawn[shots:])
            labels = torch.arange(ways, device=classes.device)
            y_support, y_query = labels.repeat_interleave(shots), labels.repeat_interleave(query)
            tasks.append((torch.cat(support), y_support, torch.cat(query_set), y_query))
        return TaskBatch(*(torch.stack(parts) for parts in zip(*tasks)))

    return sample


def copy_bound(sampler: ImageEpisodes) -> Callable[[torch.Generator], object]:
    """Copying the bytes of one batch's images, and nothing else."""
    batch = sampler.sample(META_BATCH, "train", sampler.generator(0))
    source = torch.cat([batch.x_support.flatten(), batch.x_query.flatten()])
    target = torch.empty_like(source)
    return lambda generator: target.copy_(source)


def episodes_per_second(sample: Callable[[torch.Generator], object], device: torch.device, seconds: float) -> float:
    """Median over 5 repeats of ~``seconds`` / 5 each, after a warm-up."""
    generator = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        sample(generator)
    sync()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 10:
        sample(generator)
        calls += 1
    sync()
    per_repeat = max(1, int(calls * 2))  # ~seconds / 5 per repeat
    rates = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(per_repeat):
            sample(generator)
        sync()
        rates.append(per_repeat * META_BATCH / (time.perf_counter() - start))
    return statistics.median(rates)


def full_size(ways: int, device: torch.device) -> ImageEpisodes:
    """1,623 characters x 4 rotations of random drawings, split 1100 / 100 / 423 characters."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4 * 1623, 20, 1, 28, 28), dtype=torch.uint8, generator=generator)
    order = torch.randperm(1623, generator=generator)
    rotated = lambda ids: torch.cat([ids + r * 1623 for r in range(4)])  # noqa: E731
    splits = {"train": rotated(order[:1100]), "val": rotated(order[1100:1200]), "test": rotated(order[1200:])}
    return ImageEpisodes(images, splits, episode_shapes(ways, 1, 1), device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", default="1,2", help="CPU threads to try, comma-separated (CPU only)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--root", default=None, help="Omniglot root (default: the config's default)")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]

    print(
        f"device: {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"torch {torch.__version__}, meta-batch {META_BATCH}, 1-shot, query = shots\n"
    )
    print("| data | train classes | ways | threads | episodes/s | per-task loop | speed-up | copy bound |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for ways in (5, 20):
        samplers = {
            "Omniglot subset": Omniglot(root=args.root, ways=ways, cache_dir=args.cache_dir, device=device),
            "full-size, random pixels": full_size(ways, device),
        }
        for name, sampler in samplers.items():
            for count in threads:
                torch.set_num_threads(count)
                fast = episodes_per_second(lambda g: sampler.sample(META_BATCH, "train", g), device, args.seconds)
                slow = episodes_per_second(loop_sampler(sampler, ways, 1, 1), device, args.seconds)
                bound = episodes_per_second(copy_bound(sampler), device, args.seconds)
                print(
                    f"| {name} | {sampler.split_classes['train'].numel()} | {ways} | {count} | "
                    f"{fast:,.0f} | {slow:,.0f} | {fast / slow:.0f}x | {bound:,.0f} |"
                )


if __name__ == "__main__":
    main()
