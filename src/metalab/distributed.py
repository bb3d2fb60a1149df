"""Data-parallel meta-training on torch.distributed, without DistributedDataParallel.

torchrun --nproc_per_node=4 train.py +experiment=maml_miniimagenet_5w1s # one run on 4 GPUs torchrun
--nproc_per_node=2 train.py trainer.device=cpu # the same on CPU (gloo)

Every rank draws the same global meta-batch from the same generator and keeps its own contiguous
slice of the tasks (``shard``), vmapped within the rank; ``average_gradients`` then averages the
meta-gradients with one ``all_reduce`` of a flat buffer (which also carries a flag for a non-finite
loss) before the meta-optimizer steps, so every rank applies the mean over the whole meta-batch
and the result does not depend on the number of processes. DistributedDataParallel is not used:
its hooks support neither double backward nor torch.func transforms.

The rank comes from torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or, when those are absent, from
SLURM's SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID inside an ``srun`` step of several tasks
(one task per GPU, e.g. the submitit launcher with ``tasks_per_node`` > 1); MASTER_ADDR then
defaults to the job's first node and MASTER_PORT to a port derived from the job id. Without either,
everything here is a no-op for a single process. Rank 0 alone writes the run directory; decisions
that must be the same on every rank go through ``from_main`` (rank 0 decides, the others receive) or
``agree`` (every rank checks, and an error on any rank is raised on all)."""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from metalab.errors import MetalabError, require
from metalab.hypergrad.tree import tree_ravel

__all__ = [
    "active",
    "agree",
    "alone",
    "all_finite",
    "average",
    "average_gradients",
    "barrier",
    "broadcast_parameters",
    "check_supported",
    "destroy",
    "environment",
    "from_main",
    "gather_chunks",
    "hydra_overrides",
    "init",
    "is_main",
    "local_device",
    "rank",
    "shard",
    "stop_requested",
    "world_size",
]

T = TypeVar("T")

_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_SLURM = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")  # set by srun, not in the batch script itself


def environment() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) of this process when it was started as one of several, by
    torchrun or by SLURM (an srun step of several tasks); None for a single process."""
    if all(os.environ.get(key) for key in _TORCHRUN):
        values = tuple(int(os.environ[key]) for key in _TORCHRUN)
    elif all(os.environ.get(key) for key in _SLURM):
        values = tuple(int(os.environ[key]) for key in _SLURM)
    else:
        return None
    return values if values[1] > 1 else None


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,9],cpu1" -> "gpu03"."""
    match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
    require(match is not None, f"cannot read the first host of SLURM's node list {nodelist!r}: set MASTER_ADDR.")
    return match.group(1) + (match.group(2) or "")


def _export_slurm_rendezvous() -> None:
    """MASTER_ADDR / MASTER_PORT for the env:// rendezvous of a SLURM job step, unless already set."""
    if os.environ.get("RANK"):
        return  # torchrun set everything
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or "localhost"
    os.environ.setdefault("MASTER_ADDR", _first_host(nodes))
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 40000))


def init(device: torch.device) -> None:
    """Join the process group when this process is one of several (NCCL when ``device``, this
    process's device as ``local_device`` gives it, is a GPU, gloo on CPU) and make ``device`` its
    current GPU; nothing for a single process or when the group already exists."""
    env = environment()
    if env is None or dist.is_initialized():
        return
    rank, world, _ = env
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _export_slurm_rendezvous()
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=30),
    )


_alone = False  # inside ``alone()``: this process acts as if it were the only one


def active() -> bool:
    return not _alone and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def alone() -> Iterator[None]:
    """Within it this process acts as the only one (no collective is called), e.g. to time a step on
    rank 0 while the other ranks wait for its result in ``from_main``."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process writes (rank 0 of the group, or the only process). Before the group
    exists, the rank torchrun or SLURM gave this process."""
    if active():
        return dist.get_rank() == 0
    env = environment()
    return env is None or env[0] == 0


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda`` (or auto's cuda) becomes cuda:<local rank> under several
    processes; a named GPU index with several processes is refused (they would share it)."""
    env = environment()
    if env is None or device.type != "cuda":
        return device
    _, world, local_rank = env
    require(
        device.index is None,
        f"trainer.device={device} names one GPU but {world} processes were started: "
        "use trainer.device=cuda (each process takes the GPU of its LOCAL_RANK).",
    )
    count = torch.cuda.device_count()
    require(
        local_rank < count,
        f"process {local_rank} of this node has no GPU (the node has {count}): start at most "
        f"{count} processes per node, e.g. torchrun --nproc_per_node={count}.",
    )
    return torch.device("cuda", local_rank)


def hydra_overrides() -> list[str]:
    """Hydra overrides for a rank other than 0: Hydra's own files for it go to a scratch folder
    removed at exit, so it writes nothing in the run directory or beside it (rank 0 names the run
    directory; see ``from_main``)."""
    if is_main():
        return []
    scratch = tempfile.mkdtemp(prefix=f"metalab-rank{environment()[0]}-")  # type: ignore[index]
    atexit.register(shutil.rmtree, scratch, True)
    return [
        f"hydra.run.dir={scratch}",
        f"hydra.sweep.dir={scratch}",
        "hydra.sweep.subdir=.",
        "hydra.output_subdir=null",
    ]


def check_supported(algorithm: Any, meta_batch_size: int, parallel: Sequence[str] = ()) -> None:
    """Refuse, in one sentence, an algorithm (class) without data-parallel support (its ``distributed_ok``),
    or a meta-batch that the processes cannot split evenly, when there are several processes.
    ``parallel``: the algorithms that do support them, by config name, for the advice (the application
    lists them from what the algorithms declare)."""
    world = world_size() if active() else (environment() or (0, 1, 0))[1]
    if world == 1:
        return
    others = f", or use algo={' or '.join(parallel)} under torchrun" if parallel else ""
    require(
        algorithm.distributed_ok,
        f"algo={algorithm.name} does not support several processes ({world} were "
        f"started): run it as one process (python train.py ...){others}.",
    )
    require(
        meta_batch_size % world == 0,
        f"trainer.meta_batch_size={meta_batch_size} does not split evenly over the {world} processes: pass a "
        f"multiple of {world}, e.g. trainer.meta_batch_size={max(world, meta_batch_size // world * world)}.",
    )


# -- collectives (no-ops for one process) ---------------------------------------------------------
def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def from_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 alone; its result (or its error, raised again) reaches every rank."""
    if not active():
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as error:
            told = (
                error
                if isinstance(error, MetalabError)
                else MetalabError(f"process 0 failed: {type(error).__name__}: {error}")
            )
            box[0] = ("error", told)
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def agree(fn: Callable[[], T]) -> T:
    """``fn()`` on every rank; when it raised on any rank, every rank raises the error of the
    lowest such rank (a bug elsewhere becomes a MetalabError naming it), so that none waits alone."""
    if not active():
        return fn()
    result, error = None, None
    try:
        result = fn()
    except MetalabError as caught:
        error = caught
    except Exception as caught:  # a bug: raise it here, tell the others
        error = MetalabError(f"process {dist.get_rank()} failed: {type(caught).__name__}: {caught}")
        errors: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        raise
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return result  # type: ignore[return-value]


def shard(batch: T) -> T | None:
    """This rank's contiguous slice of a batch (a dataclass of tensors whose leading dimension is
    the task): rank r of W keeps tasks [n r / W, n (r + 1) / W); None when that slice is empty."""
    if not active():
        return batch
    first = next(getattr(batch, f.name) for f in dataclasses.fields(batch))  # type: ignore[arg-type]
    n, r, w = first.shape[0], dist.get_rank(), dist.get_world_size()
    lo, hi = n * r // w, n * (r + 1) // w
    if lo == hi:
        return None
    return dataclasses.replace(
        batch,
        **{
            f.name: getattr(batch, f.name)[lo:hi]  # type: ignore[arg-type]
            for f in dataclasses.fields(batch)
        },
    )


def average_gradients(params: Iterable[Tensor], finite: bool = True) -> bool:
    """Replace each ``.grad`` of ``params`` by its mean over the ranks, with one all_reduce of one
    flat buffer (a missing gradient counts as zeros) that also counts the ranks whose loss was not
    ``finite``; returns whether it was finite on every rank (``finite`` for one process)."""
    if not active():
        return finite
    params = list(params)
    grads, unravel = tree_ravel(
        {str(i): p.grad if p.grad is not None else torch.zeros_like(p) for i, p in enumerate(params)}
    )
    flat = torch.cat([grads, grads.new_tensor([0.0 if finite else 1.0])])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    everywhere = flat[-1].item() == 0
    for param, grad in zip(params, unravel(flat[:-1] / dist.get_world_size()).values()):
        param.grad = grad
    return everywhere


def all_finite(value: Tensor) -> bool:
    """Whether ``value`` is finite on every rank."""
    finite = bool(torch.isfinite(value).all())
    if not active():
        return finite
    flag = torch.tensor([1.0 if finite else 0.0], device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def stop_requested(signum: int | None) -> int | None:
    """The stop signal any rank has received (the largest signal number), or None: the collective
    decision to stop, taken at the same point on every rank."""
    if not active():
        return signum
    flag = torch.tensor([signum or 0], dtype=torch.int64, device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def average(metrics: dict[str, float]) -> dict[str, float]:
    """Scalar metrics averaged over the ranks (each rank's mean over its equal share of tasks)."""
    if not active() or not metrics:
        return metrics
    values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=_device())
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return dict(zip(metrics, (values / dist.get_world_size()).tolist()))


def broadcast_parameters(params: Iterable[Tensor]) -> None:
    """Overwrite ``params`` on every rank with rank 0's values."""
    if not active():
        return
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=0)


def gather_chunks(chunks: list[dict[str, Tensor]]) -> dict[str, list[Tensor]]:
    """Per-task values of sharded evaluation batches ({metric: values} per batch, this rank's slice;
    {} when the slice was empty) from every rank, in the order of the unsharded episodes."""
    if not active():
        ranks = [chunks]
    else:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, [{k: v.cpu() for k, v in chunk.items()} for chunk in chunks])
    merged: dict[str, list[Tensor]] = {}
    for index in range(len(chunks)):
        for per_rank in ranks:
            for key, values in per_rank[index].items():  # type: ignore[index]
                merged.setdefault(key, []).append(values)
    return merged


def barrier() -> None:
    if active():
        dist.barrier()


def destroy() -> None:
    """Leave the process group (at the end of the command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
