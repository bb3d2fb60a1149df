"""Pointing a configuration at the real MNIST subset, or skipping (saying why) when it is absent."""

from __future__ import annotations

import pytest

from tests.helpers.configs import MNIST

__all__ = ["MNIST_OVERRIDES", "mnist_or_skip"]

MNIST_OVERRIDES = [f"tasks.root={MNIST}"]


def mnist_or_skip() -> None:
    if not MNIST.is_dir():
        pytest.skip(f"the MNIST subset is not at {MNIST} (set METALAB_MNIST to its folder)")
