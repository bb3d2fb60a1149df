"""Running training and reading what a run wrote: in process through make_trainer (as the CLI does),
or as a subprocess of train.py as a user types it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from metalab.app.build import make_trainer
from metalab.app.resume import resume_state
from tests.helpers.configs import REPO

__all__ = ["ROOT", "TRAIN", "records", "run_dirs", "run_train", "train", "train_records"]

#: the checkout's root, where train.py and scripts/ are
ROOT = REPO
#: `python train.py`, to extend with the overrides
TRAIN = [sys.executable, str(ROOT / "train.py")]


def train(cfg, run_dir, stop_after=None, resume=False):
    """(trainer, results) of fitting ``cfg`` into ``run_dir``; ``stop_after``: as if SIGTERM arrived during that
    iteration; ``resume``: continue from the run directory's checkpoint when there is one."""
    trainer = make_trainer(cfg, run_dir)
    if stop_after is not None:  # behave as if SIGTERM arrived during iteration `stop_after`
        step = trainer.algorithm.train_step

        def stepping(batch):
            if trainer.iteration + 1 == stop_after:
                trainer.stops.request(signal.SIGTERM)
            return step(batch)

        trainer.algorithm.train_step = stepping
    resumable = resume and (Path(run_dir) / "checkpoint.pt").is_file()
    return trainer, trainer.fit(resume_state(Path(run_dir), trainer.config) if resumable else None)  # as the CLI does


def train_records(run_dir):
    """The training rows of metrics.jsonl."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]


def records(run_dir):
    """metrics.jsonl, each line parsed by a strict JSON reader (NaN/Infinity rejected)."""

    def reject(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return [json.loads(line, parse_constant=reject) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_train(args, cwd, **kwargs):
    """`python train.py <args>` in ``cwd``, its output captured."""
    return subprocess.run([*TRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


def run_dirs(cwd):
    """The run directories train.py wrote under ``cwd``, oldest first."""
    return sorted((cwd / "outputs" / "runs").glob("*/*"))
