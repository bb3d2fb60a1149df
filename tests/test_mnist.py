"""The IDX reader against files written byte by byte here, the real MNIST subset, and the MNIST MLP
optimizee against an nn.Sequential on the same minibatch."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from torch import nn

from metalab.errors import ConfigError
from metalab.tasks.io.mnist import find_mnist_file, load_mnist, read_idx
from metalab.tasks.optimizees.mnist_mlp import MnistMLP
from tests.helpers.configs import MNIST as MNIST_DIR
from tests.helpers.mnist import mnist_or_skip

MNIST = str(MNIST_DIR)


def write_idx(path, array: np.ndarray, type_code: int, compress: bool) -> None:
    """An IDX file by the format's definition: 0, 0, type, ndim, big-endian int32 sizes, big-endian data."""
    big_endian = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    raw = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    raw += array.astype(big_endian).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_reads_what_the_format_defines(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, images, 0x08, compress)
    assert np.array_equal(read_idx(path), images)
    ints = np.array([[-5, 70000], [3, 0]], dtype=np.int32)
    write_idx(tmp_path / "b", ints, 0x0C, False)
    assert np.array_equal(read_idx(tmp_path / "b"), ints)
    floats = np.array([1.5, -2.25], dtype=np.float32)
    write_idx(tmp_path / "c", floats, 0x0D, False)
    assert np.array_equal(read_idx(tmp_path / "c"), floats)


def test_bad_and_missing_files_are_refused_in_one_sentence(tmp_path):
    (tmp_path / "junk").write_bytes(b"not an idx file")
    with pytest.raises(ConfigError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    write_idx(tmp_path / "short", np.zeros((3, 2), dtype=np.uint8), 0x08, False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ConfigError, match="truncated"):
        read_idx(tmp_path / "short")
    with pytest.raises(ConfigError, match="METALAB_MNIST"):
        find_mnist_file(tmp_path, "train-images-idx3-ubyte")


def test_files_are_found_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    write_idx(raw / "t10k-images-idx3-ubyte", images, 0x08, False)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(5, dtype=np.uint8), 0x08, True)
    x, y = load_mnist(tmp_path, "test")
    assert torch.equal(x, torch.from_numpy(images)) and y.tolist() == [0, 1, 2, 3, 4] and y.dtype == torch.int64


def test_the_real_subset_loads_with_its_documented_counts():
    mnist_or_skip()
    for split, count in (("train", 4000), ("test", 1000)):
        images, labels = load_mnist(MNIST, split)
        assert images.shape == (count, 28, 28) and images.dtype == torch.uint8
        assert labels.bincount(minlength=10).tolist() == [count // 10] * 10  # README: balanced classes
        assert images.max() == 255 and images.float().mean() < 60  # white digits on black


def test_mlp_loss_equals_an_nn_sequential_on_the_same_minibatch():
    mnist_or_skip()
    tasks = MnistMLP(MNIST, hidden_sizes=[7, 5], activation="sigmoid", minibatch_size=16, init_std=0.3)
    batch = tasks.sample(3, "train", tasks.generator(0))
    assert batch.params.shape == (3, 784 * 7 + 7 + 7 * 5 + 5 + 5 * 10 + 10)
    x, y = tasks.minibatch(batch, step=4)
    x2, y2 = tasks.minibatch(batch, step=4)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # a step always sees the same minibatch
    assert not torch.equal(tasks.minibatch(batch, step=5)[1], y)
    assert x.shape == (3, 16, 784) and 0 <= x.min() and x.max() <= 1
    losses = tasks.optimizee_loss(batch.params, batch, step=4)
    for b in range(3):
        net = nn.Sequential(nn.Linear(784, 7), nn.Sigmoid(), nn.Linear(7, 5), nn.Sigmoid(), nn.Linear(5, 10))
        torch.nn.utils.vector_to_parameters(batch.params[b], net.parameters())  # weight then bias, layer by layer
        expected = nn.functional.cross_entropy(net(x[b]), y[b])
        torch.testing.assert_close(losses[b], expected)


def test_splits_are_disjoint_and_balanced():
    mnist_or_skip()
    tasks = MnistMLP(MNIST, val_fraction=0.25)
    (train_x, train_y), (val_x, val_y) = tasks.data["train"], tasks.data["val"]
    assert len(train_y) == 3000 and len(val_y) == 1000 and len(tasks.data["test"][1]) == 1000
    assert val_y.bincount(minlength=10).min() > 50  # a random subset, not the last (sorted) images
    train_rows = {row.numpy().tobytes() for row in train_x}
    assert not any(row.numpy().tobytes() in train_rows for row in val_x)


def fake_torchvision(monkeypatch, calls: list, write) -> None:
    """A torchvision whose datasets.MNIST(root, train, download) records the call and runs ``write(root)``
    (no network in tests)."""
    import sys
    import types

    class MNISTDataset:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            write(root)

    datasets = types.ModuleType("torchvision.datasets")
    datasets.MNIST = MNISTDataset
    package = types.ModuleType("torchvision")
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_a_missing_root_names_tasks_root_and_the_download_option_and_downloads_nothing(tmp_path, monkeypatch):
    calls: list = []
    fake_torchvision(monkeypatch, calls, lambda root: None)
    with pytest.raises(ConfigError, match=r"tasks\.root.*tasks\.download=true") as error:
        MnistMLP(str(tmp_path / "absent"))
    assert "\n" not in str(error.value) and calls == [] and not (tmp_path / "absent").exists()


def test_download_fetches_the_files_into_root_through_torchvision_and_then_reads_them(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = {
        "train": rng.integers(0, 256, (30, 28, 28)).astype(np.uint8),
        "t10k": rng.integers(0, 256, (8, 28, 28)).astype(np.uint8),
    }

    def write(root):  # what torchvision leaves behind: root/MNIST/raw/<the four files>
        raw = tmp_path / "data" / "MNIST" / "raw"
        assert root == str(tmp_path / "data")
        raw.mkdir(parents=True, exist_ok=True)
        for prefix, array in images.items():
            write_idx(raw / f"{prefix}-images-idx3-ubyte", array, 0x08, False)
            write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(len(array), dtype=np.uint8) % 10, 0x08, False)

    calls: list = []
    fake_torchvision(monkeypatch, calls, write)
    tasks = MnistMLP(str(tmp_path / "data"), download=True, val_fraction=0.1)
    assert calls == [(str(tmp_path / "data"), True, True)]  # once: the test split was then on disk
    assert torch.equal(tasks.data["test"][0], torch.from_numpy(images["t10k"]).flatten(1))
    MnistMLP(str(tmp_path / "data"), download=True)  # present now: no second download
    assert len(calls) == 1


def test_download_without_torchvision_or_a_connection_is_refused_in_one_sentence(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ConfigError, match="needs torchvision: pip install torchvision"):
        load_mnist(tmp_path, "train", download=True)

    def offline(root):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...")

    fake_torchvision(monkeypatch, [], offline)
    with pytest.raises(ConfigError, match="Downloading MNIST into .* failed") as error:
        load_mnist(tmp_path, "train", download=True)
    assert "\n" not in str(error.value)
