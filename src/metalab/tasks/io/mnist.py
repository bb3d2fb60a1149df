"""MNIST from its four standard IDX files (LeCun et al.), plain or gzipped, as the MNIST site
serves them and torchvision's ``datasets.MNIST`` keeps them under ``MNIST/raw/``:

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

    images, labels = load_mnist("../shared/data/mnist", "train")   # uint8 [N, 28, 28], int64 [N]
    load_mnist("data", "train", download=True)  # absent files fetched by torchvision into data/MNIST/raw/
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from metalab.errors import ConfigError, require

__all__ = ["MNIST_FILES", "download_mnist", "find_mnist_file", "load_mnist", "read_idx"]

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """The array in an IDX file (gzipped when the name ends in .gz): the magic number's third byte
    gives the element type, its fourth the number of dimensions, then one big-endian int32 per
    dimension and the data. A file that is not IDX is refused in one sentence."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError) as error:
        raise ConfigError(f"{path} cannot be read ({error}): replace it with the original MNIST file.") from None
    problem = None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        problem = "it does not start with an IDX magic number"
    else:
        dims = raw[3]
        header = 4 + 4 * dims
        shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">i4")) if len(raw) >= header else None
        dtype = np.dtype(_DTYPES[raw[2]])
        if shape is None or len(raw) != header + int(np.prod(shape)) * dtype.itemsize:
            problem = "its size does not match the shape in its header (a truncated download?)"
    if problem:
        raise ConfigError(f"{path} is not an IDX file: {problem}; replace it with the original MNIST file.")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_mnist_file(root: str | Path, name: str) -> Path:
    """``name`` (or name.gz) in ``root``, ``root/raw`` or ``root/MNIST/raw``; refused in one
    sentence naming the folder and what to do when absent."""
    root = Path(root)
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise ConfigError(
        f"MNIST's {name}[.gz] is not in {root} (nor in its raw/ or MNIST/raw/): set tasks.root (or the "
        "METALAB_MNIST environment variable) to the folder holding the four IDX files, or set "
        "tasks.download=true to download them there (needs torchvision and a connection)."
    )


def download_mnist(root: str | Path) -> None:
    """Fetch MNIST's four IDX files into ``root``/MNIST/raw/ with torchvision's ``datasets.MNIST``
    (its mirrors and checksums); a missing torchvision or a failed download is refused in one sentence."""
    try:
        from torchvision.datasets import MNIST
    except Exception:  # missing, or built for another torch: either way it cannot run here
        raise ConfigError(
            "tasks.download=true needs torchvision: pip install torchvision, or put MNIST's four IDX "
            "files in tasks.root."
        ) from None
    try:
        MNIST(str(root), train=True, download=True)
    except Exception as error:
        raise ConfigError(
            f"Downloading MNIST into {root} failed ({error}); check the connection, or put the four IDX "
            "files in tasks.root by hand.".replace("\n", " ")
        ) from None


def load_mnist(root: str | Path, split: Literal["train", "test"], download: bool = False) -> tuple[Tensor, Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of MNIST's ``split`` ("train": the 60,000, or
    whatever the files in ``root`` hold; "test": t10k), read from ``root``. With ``download``, files
    absent from ``root`` are first downloaded there (``download_mnist``); without it nothing is."""
    require(split in MNIST_FILES, f"MNIST has a train and a test split (got {split!r}).")
    if download:
        try:
            for name in MNIST_FILES[split]:
                find_mnist_file(root, name)
        except ConfigError:
            download_mnist(root)
    image_file, label_file = (find_mnist_file(root, name) for name in MNIST_FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    require(
        images.ndim == 3 and labels.ndim == 1 and len(images) == len(labels),
        f"{image_file} and {label_file} do not form an MNIST split (images {images.shape}, labels {labels.shape}): "
        "replace them with the original files.",
    )
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))
