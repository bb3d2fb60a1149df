"""MNIST with auxiliary tasks: digit classification from a few labels per class, helped (or not) by
rotation prediction and random labels.

MNIST's training file gives, per digit and in a random order fixed by ``split_seed``: the first
``val_shots`` images to "val", the next ``aux_shots`` to "aux", the next ``shots`` to "train"
(labelled), and the rest to "train" unlabelled (rotation and random targets only). "test" is the
whole t10k file. On the 5,000-digit subset (4,000 + 1,000) with the defaults (5 / 5 / 50 per
digit): 50 labelled training images, 3,400 unlabelled, 50 aux, 500 val, 1,000 test.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from metalab.tasks.auxiliary.images import AuxImageTasks, check_count, split_per_class
from metalab.tasks.io.mnist import load_mnist
from metalab.tasks.spec import ImageFormat

__all__ = ["AuxMNIST"]


class AuxMNIST(AuxImageTasks):
    """MNIST digits with auxiliary tasks; x = pixels / 255, [V, N, 1, 28, 28].

    Args (the config keys):
        root: the folder of MNIST's four IDX files (or its raw/ or MNIST/raw/; ``metalab.tasks.io.mnist``).
        shots: labelled training images per digit.
        aux_shots, val_shots: images per digit of the "aux" and "val" splits.
        auxiliaries: the auxiliary tasks, in head order: any of rotation, random.
        random_classes: classes of the random task (None = 10).
        labelled_fraction, aux_batch_size: see ``AuxImageTasks``.
        split_seed: seeds the split of the training images and the random labels.
        download: fetch the IDX files into ``root`` when absent (needs torchvision; never by default).
        device: where the images and the batches live.
    """

    def __init__(
        self,
        root: str | Path = "../shared/data/mnist",
        shots: int = 5,
        aux_shots: int = 5,
        val_shots: int = 50,
        auxiliaries: Sequence[str] = ("rotation", "random"),
        random_classes: int | None = None,
        labelled_fraction: float = 0.5,
        aux_batch_size: int = 64,
        split_seed: int = 0,
        download: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        sizes = {
            "val": check_count("val_shots", val_shots, 1),
            "aux": check_count("aux_shots", aux_shots, 1),
            "train": check_count("shots", shots, 1),
        }
        train_images, train_labels = load_mnist(root, "train", download)
        test_images, test_labels = load_mnist(root, "test", download)
        splits = split_per_class(train_labels, sizes, split_seed, f"MNIST's training file at {root}")
        splits["test"] = torch.arange(len(test_labels)) + len(train_labels)
        images = torch.cat([train_images, test_images]).unsqueeze(1)
        super().__init__(
            images,
            torch.cat([train_labels, test_labels]),
            splits,
            auxiliaries,
            ImageFormat(28, "L"),
            random_classes=random_classes,
            labelled_fraction=labelled_fraction,
            aux_batch_size=aux_batch_size,
            seed=split_seed,
            device=device,
        )
