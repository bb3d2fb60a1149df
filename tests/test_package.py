"""`pip install .` (not editable) gives a working command line with the configs inside the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """metalab built and installed from the checkout into a fresh folder, as `pip install .` does."""
    source, target = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("site")
    # a copy, so that setuptools' build/ and egg-info never land in (or go stale in) the checkout
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        cwd=source,
    )
    return target


def run_installed(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_installed_package_holds_every_config(installed: Path) -> None:
    shipped = {
        p.relative_to(installed / "metalab" / "configs") for p in (installed / "metalab" / "configs").rglob("*.yaml")
    }
    source = {
        p.relative_to(REPO / "src" / "metalab" / "configs")
        for p in (REPO / "src" / "metalab" / "configs").rglob("*.yaml")
    }
    assert shipped == source and len(source) > 20


@pytest.mark.slow
def test_python_m_metalab_trains_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    where = run_installed(installed, tmp_path, sys.executable, "-c", "import metalab; print(metalab.__file__)")
    assert where.stdout.strip().startswith(str(installed)), where.stdout + where.stderr  # not the checkout's copy
    done = run_installed(
        installed,
        tmp_path,
        sys.executable,
        "-m",
        "metalab",
        "trainer.iterations=2",
        "trainer.meta_batch_size=2",
        "trainer.eval_tasks=4",
        "trainer.test_tasks=4",
        "trainer.eval_every=0",
        "trainer.progress=false",
        "trainer.device=cpu",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (results,) = tmp_path.glob("outputs/runs/*/*/results.json")  # written where Hydra's run dir says, under the cwd
    assert json.loads(results.read_text())["iteration"] == 2


@pytest.mark.slow
def test_console_script_composes_the_config(installed: Path, tmp_path: Path) -> None:
    script = installed / "bin" / "metalab"
    done = run_installed(installed, tmp_path, str(script), "algo=imaml", "--cfg", "job")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "metalab.algorithms.IMAML" in done.stdout and "metalab.hypergrad.cg" in done.stdout
