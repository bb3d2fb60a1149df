"""scripts/gpu_check.py cannot rot: its CPU dry run goes through every section and writes the report and
its JSON; without a CUDA device it refuses in one sentence; the meta-gradient it reads off a step is
autograd's, and the step leaves the model as it was."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest
import torch

from tests.helpers.configs import OMNIGLOT, REPO
from tests.helpers.scripts import assert_refused, run_script, script

benchmark, check = script("benchmark"), script("meta_gradients")
SECTIONS = ("## Benchmark rows", "## Float64 meta-gradient agreement", "## Precision", "## Training runs")


def test_the_dry_run_writes_every_section(tmp_path):
    if not OMNIGLOT.is_dir():
        pytest.skip(f"the Omniglot subset is not at {OMNIGLOT} (set METALAB_OMNIGLOT to its folder)")
    done = run_script("gpu_check", "--device", "cpu", "--quick", "--out", str(tmp_path), "--omniglot", str(OMNIGLOT))
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "report.md").read_text()
    assert report in done.stdout  # after the training runs' autotune lines
    assert all(section in report for section in SECTIONS), report
    record = json.loads((tmp_path / "report.json").read_text())
    assert set(record) >= {"machine", "quick", "rows", "agreement", "precision", "training", "wall_seconds"}
    [row] = record["rows"]  # the sinusoid row, its vmapped step and per-task loop
    assert set(row["seconds"]) >= {"vmapped", "loop"} and all(v > 0 for v in row["seconds"].values())
    assert set(row["seconds"]) == {"vmapped", "loop", "chosen"}
    assert row["execution"]["chosen"] in {"vmap", "vmap/2", "loop"} and "chosen execution" in report
    columns = ["vmapped", "chosen", "execution vmap", "execution vmap/2", "execution loop"]  # all 4-task candidates
    assert [a["column"] for a in record["agreement"]] == columns
    assert all(a["relative_error"] < 1e-10 for a in record["agreement"]), record["agreement"]
    errors = {p["precision"]: p["relative_error"] for p in record["precision"]}
    assert set(errors) == {"32", "tf32", "bf16"} and errors["32"] < 1e-5 and errors["bf16"] < 0.15, errors
    assert [r["experiment"] for r in record["training"]] == ["maml_omniglot_5w1s", "imaml_omniglot_5w1s"]
    for run in record["training"]:
        rate = run["iterations_per_second"]
        assert rate > 0 and math.isclose(run["projected_hours"], run["paper_iterations"] / rate / 3600)
    assert record["training"][0]["paper_iterations"] == 60000


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_a_cuda_device_it_says_so_and_exits_2(tmp_path, capsys):
    status = script("gpu_check").main(["--out", str(tmp_path / "report")])
    assert_refused(status, capsys.readouterr().err, 2, "no CUDA device", "--device cpu --quick")
    assert not (tmp_path / "report").exists()


def test_the_one_call_script_refuses_before_installing_anything_without_a_gpu(tmp_path):
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        pytest.skip("this machine has a CUDA device: the script would install and run")
    copy = tmp_path / "clone" / "scripts"
    copy.mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "gpu_check.sh", copy)
    done = subprocess.run(["bash", str(copy / "gpu_check.sh")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no CUDA device" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "clone").iterdir()) == ["scripts"]  # no virtualenv was made


def test_the_meta_gradient_read_off_a_step_is_autograds_and_nothing_moves():
    algo, batch = check.float64(benchmark.sinusoid_setup(torch.device("cpu")))
    batch = type(batch)(*(tensor[:4] for tensor in vars(batch).values()))
    before = {k: v.detach().clone() for k, v in algo.meta_parameters().items()}
    read = check.meta_gradient(benchmark.vmap_step, algo, batch)
    params = algo.meta_parameters()
    expected = torch.autograd.grad(algo.meta_loss(batch)[0].mean(), list(params.values()))
    for (key, value), gradient in zip(params.items(), expected):
        torch.testing.assert_close(read[key], gradient, rtol=1e-12, atol=0)
        assert torch.equal(value, before[key]), key
    assert not algo.optimizer.state  # no step was taken
    looped = check.meta_gradient(benchmark.loop_step, algo, batch)
    assert check.relative_error(looped, read) < 1e-12


def test_relative_error_is_the_norm_of_the_difference_over_the_reference_norm():
    value = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[1.0]])}
    reference = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[2.0]])}
    assert check.relative_error(value, reference) == pytest.approx(math.sqrt(9 + 1) / 2)
