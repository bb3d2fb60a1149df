"""Shared test helpers: composing the real config tree with Hydra's compose API, shrunk."""
from __future__ import annotations

from collections.abc import Sequence

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from metalab.cli import CONFIG_DIR

#: Overrides that shrink any configuration to a seconds-long CPU run.
TINY = ["trainer.iterations=2", "trainer.meta_batch_size=2", "trainer.eval_tasks=4", "trainer.test_tasks=4",
        "trainer.eval_batch_size=4", "trainer.eval_every=1", "trainer.log_every=1", "trainer.progress=false",
        "trainer.device=cpu"]


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config `python train.py <overrides>` would run."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def tiny_config():
    return lambda *overrides: compose_config([*TINY, *overrides])


@pytest.fixture
def image_task_overrides():
    """Extra overrides that shrink an image task (real or fixture data), or skip when absent."""
    def extra(overrides):
        return []
    return extra
