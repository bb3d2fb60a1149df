"""Running the files of scripts/ (not a package): loaded as modules to call in process, or as a user
types them; writing the run directories they read, and checking their one-sentence refusals."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.configs import REPO

__all__ = [
    "assert_refused",
    "band_edges",
    "completed",
    "read_only",
    "run_script",
    "script",
    "write_job",
    "write_metrics",
]


def script(name: str):
    """scripts/<name>.py, loaded as a module."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python scripts/<name>.py <args>` as a user types it, its output captured."""
    command = [sys.executable, str(REPO / "scripts" / f"{name}.py"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_refused(status: int, err: str, expected_status: int, *words: str) -> None:
    """The script exited with ``expected_status``, and its last stderr line is one "error: ..." sentence
    holding ``words``, with no traceback anywhere."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert status == expected_status, err
    assert last.startswith("error: "), err
    for word in words:
        assert word in last, (word, last)


def completed(mean: float | None, split: str = "test", metric: str = "mse") -> dict[str, Any]:
    """A results.json record of a run that ended, with one metric (None: written as null, a NaN)."""
    return {"status": "completed", "iteration": 10, split: {metric: {"mean": mean, "ci95": 0.1}}}


def write_job(folder: Path, overrides: list[str] | None, results: dict[str, Any] | str | None) -> Path:
    """A run directory as Hydra and metalab leave it: .hydra/overrides.yaml (None: no .hydra/) and
    results.json (a record, raw text such as a truncated file, or None: not written)."""
    if overrides is not None:
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    folder.mkdir(parents=True, exist_ok=True)
    if results is not None:
        (folder / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    return folder


@contextmanager
def read_only(folder: Path):
    """``folder`` made immutable (chattr +i: no file can be created in it, even by root) while inside;
    skips, saying why, where the file system does not allow it."""
    try:
        made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("cannot make a folder read-only for root here: chattr is not installed")
    if made.returncode != 0:
        pytest.skip(f"cannot make {folder} read-only here (chattr +i: {made.stderr.strip() or made.returncode})")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """``run_dir``/metrics.jsonl as JsonlSink writes it, one record per row (its "iteration" the step)."""
    from metalab.training.sinks import JsonlSink

    sink = JsonlSink(run_dir / "metrics.jsonl")
    for row in rows:
        sink.log({k: v for k, v in row.items() if k != "iteration"}, row["iteration"])
    sink.close()
    return run_dir


def band_edges(axis, index: int = 0) -> list[tuple[float, float, float]]:
    """[(x, lower, upper)] of the ``index``-th band (fill_between's PolyCollection) drawn on ``axis``,
    read back from its polygon, sorted by x."""
    vertices = axis.collections[index].get_paths()[0].vertices
    edges: dict[float, list[float]] = {}
    for x, y in vertices.tolist():
        edges.setdefault(x, []).append(y)
    return [(x, min(ys), max(ys)) for x, ys in sorted(edges.items())]
