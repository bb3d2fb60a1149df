"""Data-parallel meta-training under torchrun: 2 gloo processes on CPU train exactly as one process
with the same seed and global meta-batch (the oracle: a 1-process run of the same config, in this
process), write one set of files, stop together on a signal to one rank, and refuse what they
cannot do in one sentence."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from metalab import distributed
from metalab.algorithms import MAML, LSTMOptimizer
from metalab.app.build import config_catalog, make_trainer
from metalab.errors import ConfigError
from tests.helpers.configs import compose_config, listed

ROOT = Path(__file__).resolve().parents[1]
#: a tiny sinusoid run; 5 test tasks in batches of 4 leave one rank an empty slice of the last batch
TINY = [
    "trainer.iterations=3",
    "trainer.meta_batch_size=4",
    "trainer.eval_tasks=6",
    "trainer.test_tasks=5",
    "trainer.eval_batch_size=4",
    "trainer.eval_every=1",
    "trainer.log_every=1",
    "trainer.progress=false",
    "trainer.device=cpu",
    "algo.inner_steps=2",
    "algo.eval_inner_steps=2",
]
RUN_FILES = {".hydra", ".lock", "best.pt", "checkpoint.pt", "metrics.jsonl", "results.json"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: train.py in float64: the comparison with one process then measures the algorithm, not float32 rounding
#: (summing a meta-batch in two halves changes the last bits, and iMAML's CG solve amplifies them to ~1e-6)
FLOAT64_TRAIN = (
    "import runpy, sys, torch; torch.set_default_dtype(torch.float64); "
    f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')"
)


def torchrun(
    args: list[str], cwd: Path, float64: bool = False, launcher: str = "torch.distributed.run", **kwargs
) -> subprocess.Popen:
    """2 processes of train.py under ``launcher``: torchrun's module, or metalab's (metalab.app.torchrun)."""
    script = [str(ROOT / "train.py")]
    if float64:
        (cwd / "train64.py").write_text(FLOAT64_TRAIN)
        script = [str(cwd / "train64.py")]
    command = [
        sys.executable,
        "-m",
        launcher,
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *script,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs
    )


def rank_pid(process: subprocess.Popen, rank: int) -> int:
    """The process id of torchrun's worker of ``rank``, found by its environment."""
    for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise AssertionError(f"torchrun has no worker of rank {rank}")


def one_process(overrides: list[str], run_dir: Path) -> dict:
    """The oracle: the same config trained by one process, in this one, in float64."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return make_trainer(compose_config(overrides), run_dir).fit()
    finally:
        torch.set_default_dtype(default)


def assert_close(actual: float | torch.Tensor, expected: float | torch.Tensor, what: str) -> None:
    """|actual - expected| <= 1e-6 |expected| (max norm over a tensor's entries): far looser than
    float64 rounding, far tighter than any difference in what is computed."""
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    error, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert error <= 1e-6 * scale, f"{what}: differs by {error:.3g}, relative {error / scale:.3g}"


@pytest.mark.slow
def test_two_processes_train_maml_and_imaml_as_one_process_does(tmp_path):
    """One torchrun command sweeps MAML and iMAML (Hydra multirun, each rank in turn): the
    meta-parameters, logged training losses and the gathered validation and test
    statistics equal a 1-process run's to 1e-6 relative, and the sweep holds one set of files."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    process = torchrun(["-m", *TINY, "algo=maml,imaml", "hydra.sweep.dir=sweep"], cwd, float64=True)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert sorted(p.name for p in cwd.iterdir()) == ["sweep", "train64.py"]  # no rank wrote beside the run dirs
    jobs = sorted(p for p in (cwd / "sweep").iterdir() if p.is_dir())
    assert [p.name[:2] for p in jobs] == ["0_", "1_"]
    assert out.count("metalab: algo=") == 2 and out.count("test mse:") == 2  # rank 0 alone prints
    for job, algo in zip(jobs, ("maml", "imaml")):
        assert {p.name for p in job.iterdir()} == RUN_FILES
        reference = tmp_path / f"one_{algo}"
        expected = one_process([*TINY, f"algo={algo}"], reference)
        ours, theirs = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (job, reference))
        assert ours["iteration"] == theirs["iteration"] == 3
        assert ours["algorithm"]["meta_parameters"]["net.0.weight"].dtype == torch.float64
        for key, value in theirs["algorithm"]["meta_parameters"].items():
            assert_close(ours["algorithm"]["meta_parameters"][key], value, f"{algo} {key}")
        rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (job, reference)]
        assert [sorted(r) for r in rows[0]] == [sorted(r) for r in rows[1]]
        for mine, single in zip(*rows):
            for key, value in single.items():
                assert_close(mine[key], value, f"{algo} metrics.jsonl {key} at {single['iteration']}")
        results = json.loads((job / "results.json").read_text())
        assert results["processes"] == 2 and expected["processes"] == 1 and results["status"] == "completed"
        for split in ("val", "test"):
            for key, stats in expected[split].items():
                assert_close(results[split][key]["mean"], stats["mean"], f"{algo} {split} {key}")
                assert_close(results[split][key]["ci95"], stats["ci95"], f"{algo} {split} {key} ci95")


@pytest.mark.slow
def test_a_meta_batch_the_processes_cannot_split_is_refused_in_one_sentence_and_exit_2(tmp_path):
    """Under metalab-torchrun the refusal is metalab's sentence, once, and exit status 2, with no traceback or
    failure table from the launcher; plain torchrun prints the same sentence, then its report, and exits 1."""
    args = ["trainer.meta_batch_size=3", "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'run'}"]
    expected = (
        "error: trainer.meta_batch_size=3 does not split evenly over the 2 processes: pass a multiple of 2, "
        "e.g. trainer.meta_batch_size=2."
    )
    for launcher, status in (("metalab.app.torchrun", 2), ("torch.distributed.run", 1)):
        process = torchrun(args, tmp_path, launcher=launcher)
        out, err = process.communicate(timeout=300)
        assert process.returncode == status, (launcher, err)
        assert [line for line in err.splitlines() if line.startswith("error:")] == [expected]  # once, not per rank
        if launcher == "metalab.app.torchrun":
            assert err.strip() == expected and "Traceback" not in out
        assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_with_one_checkpoint_and_resume_finishes_the_run(tmp_path):
    args = [
        *TINY[1:],
        "trainer.iterations=100000",
        "trainer.eval_every=0",
        "trainer.eval_tasks=4",
        "trainer.checkpoint_every=100000",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    process = torchrun(args, tmp_path, launcher="metalab.app.torchrun")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.1)
    os.kill(rank_pid(process, 1), signal.SIGTERM)  # rank 1 only: rank 0 learns of it through the collective stop flag
    out, err = process.communicate(timeout=300)
    assert process.returncode == 143 and "stopped by SIGTERM at iteration" in out, err
    assert "Traceback" not in err and "ChildFailedError" not in err, err  # metalab's status, no launcher report
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "interrupted" and results["stopped_by"] == "SIGTERM"
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["iteration"] == results["iteration"] >= 3
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(RUN_FILES - {"best.pt"})
    done = checkpoint["iteration"] + 2
    resumed = torchrun([*args, f"trainer.iterations={done}", f"resume={tmp_path / 'run'}"], tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "(resumed)" in out, err
    final = json.loads((tmp_path / "run" / "results.json").read_text())
    assert final["status"] == "completed" and final["iteration"] == done
    logged = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines() if "train/loss" in line]
    assert logged == list(range(1, done + 1))  # continued where both stopped, nothing twice


@pytest.mark.parametrize(
    "variables",
    [
        {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
        {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1"},
    ],
)
def test_refusals_before_the_group_exists(monkeypatch, variables):
    """torchrun's and SLURM's variables are read alike; the learned optimizer is refused in one sentence
    that names the configured algorithms declaring ``distributed_ok``."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    rank = int(variables.get("RANK", variables.get("SLURM_PROCID")))
    assert distributed.environment() == (rank, 2, rank) and distributed.is_main() == (rank == 0)
    with pytest.raises(ConfigError) as refusal:
        distributed.check_supported(LSTMOptimizer, 4, config_catalog().parallel())
    sentence, _, partners = str(refusal.value).partition(", or use algo=")
    assert sentence == (
        "algo=lstm_optimizer does not support several processes (2 were started): run it "
        "as one process (python train.py ...)"
    )
    named = listed(partners.removesuffix(" under torchrun."))
    assert {"imaml", "maml"} <= named and not named & {"lstm_optimizer", "auxilearn"}
    with pytest.raises(ConfigError, match="e.g. trainer.meta_batch_size=4"):
        distributed.check_supported(MAML, 5)
    distributed.check_supported(MAML, 4)


def test_slurm_first_host():
    assert distributed._first_host("gpu[03-05,9],cpu1") == "gpu03"
    assert distributed._first_host("node7,node8") == "node7"
    assert distributed._first_host("a-b[1]") == "a-b1"


def _primitives(rank: int, port: int, failures) -> None:
    """Rank ``rank`` of 2 gloo processes: each primitive against what one process computes itself."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    try:
        distributed.init(torch.device("cpu"))
        from metalab.errors import MetalabError, require
        from metalab.types import TaskBatch

        full = torch.arange(5 * 3, dtype=torch.float64).reshape(5, 3)
        part = distributed.shard(TaskBatch(full, full[:, 0], full, full[:, 0]))  # 5 tasks: rank 0 gets 2, rank 1 gets 3
        assert torch.equal(part.x_support, full[:2] if rank == 0 else full[2:])
        weight = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        (part.x_support @ weight).sum().backward()
        assert distributed.average_gradients([weight], finite=True)
        assert torch.equal(weight.grad, (full[:2].sum(0) + full[2:].sum(0)) / 2)  # the mean of the two ranks' gradients
        assert not distributed.average_gradients([weight], finite=rank == 0)  # a NaN loss on rank 1 alone: both know
        matrix = torch.nn.Parameter(
            torch.zeros(2, 2, dtype=torch.float32)
        )  # another shape and dtype, no grad on rank 0
        weight.grad = torch.full((3,), float(rank), dtype=torch.float64)
        matrix.grad = torch.full((2, 2), 3.0) if rank == 1 else None
        assert distributed.average_gradients([weight, matrix])
        assert torch.equal(weight.grad, torch.full((3,), 0.5, dtype=torch.float64))
        assert matrix.grad.dtype == torch.float32 and torch.equal(matrix.grad, torch.full((2, 2), 1.5))
        gathered = distributed.gather_chunks(
            [
                {"m": full[:2, 0] if rank == 0 else full[2:, 0]},
                {} if rank == 0 else {"m": torch.tensor([99.0], dtype=torch.float64)},
            ]
        )
        assert torch.equal(torch.cat(gathered["m"]), torch.cat([full[:, 0], torch.tensor([99.0], dtype=torch.float64)]))
        assert distributed.stop_requested(15 if rank == 1 else None) == 15  # a signal to rank 1 stops both
        assert distributed.average({"loss": float(rank)}) == {"loss": 0.5}
        assert distributed.from_main(lambda: f"decided by {rank}") == "decided by 0"
        try:
            distributed.agree(lambda: require(rank == 0, f"refused on rank {rank}"))
        except MetalabError as error:
            assert str(error) == "refused on rank 1", error  # raised on both ranks, the lowest failing rank's error
        else:
            raise AssertionError("agree let a refusal on rank 1 pass")
        distributed.destroy()
    except BaseException as error:  # noqa: BLE001 - reported to the test
        failures.put(f"rank {rank}: {type(error).__name__}: {error} at {traceback.format_exc().splitlines()[-3:]}")


@pytest.mark.slow
def test_the_primitives_with_two_gloo_processes():
    """Shards, the averaged meta-gradient and its finiteness flag, gathered per-task values in
    episode order, the collective stop, and errors raised on every rank, in 2 spawned processes."""
    context = torch.multiprocessing.get_context("spawn")
    failures = context.SimpleQueue()
    torch.multiprocessing.start_processes(_primitives, args=(free_port(), failures), nprocs=2, start_method="spawn")
    reported = []
    while not failures.empty():
        reported.append(failures.get())
    assert not reported, reported


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """cuda and auto become cuda:<LOCAL_RANK> (a machine with 2 GPUs stood in for); a named GPU, or
    more processes than GPUs, is refused in one sentence."""
    from metalab.app.build import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for local_rank in (0, 1):
        monkeypatch.setenv("RANK", str(local_rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", local_rank)
        assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^trainer.device=cuda:0 names one GPU but 2 processes were started"):
        resolve_device("cuda:0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match=r"^process 2 of this node has no GPU \(the node has 2\)"):
        resolve_device("cuda")
