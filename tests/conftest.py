"""Shared fixtures; the helpers they use live in tests/helpers/."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.configs import MNIST, OMNIGLOT, TINY, compose_config
from tests.helpers.images import write_image_folder

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one thread each,
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and so do the processes the tests start
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def tiny_config():
    return lambda *overrides: compose_config([*TINY, *overrides])


@pytest.fixture(scope="session")
def image_data(tmp_path_factory) -> dict[str, list[str]]:
    """Overrides pointing each image task at test data: the real Omniglot subset (skip, saying why,
    when absent) and a small synthetic MiniImageNet in its image-folder form."""
    cache = tmp_path_factory.mktemp("cache")
    mini = tmp_path_factory.mktemp("miniimagenet") / "data"
    write_image_folder(mini)
    return {
        "omniglot": [f"tasks.root={OMNIGLOT}", f"tasks.cache_dir={cache}"],
        # 28x28 instead of 84x84: the config tests check wiring; test_miniimagenet checks the images.
        # One shot: the synthetic folder has 8 images per class, fewer than Reptile's 15 training shots.
        "miniimagenet": [
            f"tasks.root={mini}",
            f"tasks.cache_dir={cache}",
            "tasks.shots=1",
            "tasks.query=2",
            "tasks.eval_query=2",
            "tasks.image_size=28",
        ],
        # the same data with auxiliary tasks, splits small enough for the synthetic 8 images per class
        "auxomniglot": [f"tasks.root={OMNIGLOT}", f"tasks.cache_dir={cache}"],
        "auxminiimagenet": [
            f"tasks.root={mini}",
            f"tasks.cache_dir={cache}",
            "tasks.image_size=28",
            "tasks.shots=1",
            "tasks.aux_shots=1",
            "tasks.val_shots=1",
            "tasks.test_shots=1",
        ],
    }


@pytest.fixture
def image_task_overrides(image_data):
    """overrides -> the extra overrides their composed task needs (data location, a small query set);
    skips, saying why, when the real Omniglot or MNIST subset it needs is absent."""

    def extra(overrides):
        task = compose_config(list(overrides)).tasks._target_.rsplit(".", 1)[-1].lower()
        if task in ("omniglot", "auxomniglot") and not OMNIGLOT.is_dir():
            pytest.skip(f"the Omniglot subset is not at {OMNIGLOT} (set METALAB_OMNIGLOT to its folder)")
        if task in ("mnistmlp", "auxmnist"):
            if not MNIST.is_dir():
                pytest.skip(f"the MNIST subset is not at {MNIST} (set METALAB_MNIST to its folder)")
            return [f"tasks.root={MNIST}"]
        return image_data.get(task, [])

    return extra
