"""MiniImageNet with auxiliary tasks, in the form of ``aux_omniglot``: classification of all its
classes (64 + 16 + 20 in Ravi & Larochelle's files) from a few labelled images per class, with
rotation prediction (and, if asked, random labels) as auxiliaries.

Each class's images, in a random order fixed by ``split_seed``, go: the first ``test_shots`` to
"test", the next ``val_shots`` to "val", the next ``aux_shots`` to "aux", the next ``shots`` to
"train" (labelled), and the rest to "train" unlabelled (rotation and random targets only).
Images stay uint8 on the device (1.3 GB for 100 x 600 at 84 x 84) and are normalised per batch
with the training classes' per-channel mean and std.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metalab.tasks.auxiliary.images import AuxImageTasks, check_count, split_per_class
from metalab.tasks.episodic.miniimagenet import image_format, load_images

__all__ = ["AuxMiniImageNet"]


class AuxMiniImageNet(AuxImageTasks):
    """MiniImageNet classes with auxiliary tasks; x normalised per channel, [V, N, 3, S, S].

    Args (the config keys):
        root, image_size, cache_dir: where the images are and how they are decoded, as for
            ``tasks=miniimagenet``.
        shots: labelled training images per class.
        aux_shots, val_shots, test_shots: images per class of the "aux", "val" and "test" splits.
        auxiliaries: the auxiliary tasks, in head order: any of rotation, random.
        random_classes: classes of the random task (None = the number of classes).
        labelled_fraction, aux_batch_size: see ``AuxImageTasks``.
        split_seed: seeds the split of the images and the random labels.
        device: where the images and the batches live.
    """

    def __init__(
        self,
        root: str | None = None,
        shots: int = 5,
        aux_shots: int = 5,
        val_shots: int = 10,
        test_shots: int = 50,
        auxiliaries: Sequence[str] = ("rotation",),
        random_classes: int | None = None,
        labelled_fraction: float = 0.5,
        aux_batch_size: int = 64,
        image_size: int = 84,
        split_seed: int = 0,
        cache_dir: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        sizes = {
            "test": check_count("test_shots", test_shots, 1),
            "val": check_count("val_shots", val_shots, 1),
            "aux": check_count("aux_shots", aux_shots, 1),
            "train": check_count("shots", shots, 1),
        }
        check_count("image_size", image_size, 1)
        folder, payload = load_images(root, image_size, cache_dir)
        images = payload["images"]
        classes, per_class = images.shape[:2]
        labels = torch.arange(classes).repeat_interleave(per_class)
        splits = split_per_class(labels, sizes, split_seed, f"MiniImageNet at {folder} ({per_class} images per class)")
        super().__init__(
            images.flatten(0, 1),
            labels,
            splits,
            auxiliaries,
            image_format(image_size, payload["mean"], payload["std"]),
            random_classes=random_classes,
            labelled_fraction=labelled_fraction,
            aux_batch_size=aux_batch_size,
            seed=split_seed,
            class_names=payload["classes"],
            device=device,
        )
