"""Composing the real config tree with Hydra's compose API, shrunk, and where the test data lives."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from metalab.app.cli import CONFIG_DIR

__all__ = ["MNIST", "OMNIGLOT", "REPO", "TINY", "compose_config", "listed"]

#: Overrides that shrink any configuration to a seconds-long CPU run.
TINY = [
    "trainer.iterations=2",
    "trainer.meta_batch_size=2",
    "trainer.eval_tasks=4",
    "trainer.test_tasks=4",
    "trainer.eval_batch_size=4",
    "trainer.eval_every=1",
    "trainer.log_every=1",
    "trainer.progress=false",
    "trainer.device=cpu",
    "trainer.autotune=false",  # timing the executions would take more steps than these runs train
]


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config `python train.py <overrides>` would run."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


REPO = Path(__file__).resolve().parents[2]
OMNIGLOT = Path(os.environ.get("METALAB_OMNIGLOT") or REPO.parent / "shared" / "data" / "omniglot")
MNIST = Path(os.environ.get("METALAB_MNIST") or REPO.parent / "shared" / "data" / "mnist")


def listed(text: str) -> set[str]:
    """The names of a generated list, "a, b or c" or "a or b or c" (what the refusals name), as a set: tests
    check what it must and must not hold, so that a new plugin, named there too, breaks no test."""
    return set(re.split(r", | or ", text.strip().removesuffix(".")))
