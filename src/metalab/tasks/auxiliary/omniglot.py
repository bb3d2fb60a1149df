"""Omniglot with auxiliary tasks: character classification from a few labelled drawings per
character, helped (or not) by alphabet classification, rotation prediction and random labels.

Every character is a class (all of them, whatever Omniglot set it comes from). Its drawings, in a
random order fixed by ``split_seed``, go: the first ``test_shots`` to "test", the next ``val_shots``
to "val", the next ``aux_shots`` to "aux", the next ``shots`` to "train" (labelled), and the rest
to "train" unlabelled (rotation and random targets only). Test, val and aux drawings therefore do
not change with ``shots``. On the 136-character subset with the defaults (1 / 1 / 2 / 5 of 20):
136 labelled training drawings, 1,496 unlabelled, 136 aux, 272 val, 680 test.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metalab.tasks.auxiliary.images import AuxImageTasks, check_count, split_per_class
from metalab.tasks.episodic.omniglot import image_format, load_drawings

__all__ = ["AuxOmniglot"]


class AuxOmniglot(AuxImageTasks):
    """Omniglot characters with auxiliary tasks; x in [0, 1] with strokes = 1, [V, N, 1, S, S].

    Args (the config keys):
        root, image_size, cache_dir, download: where the drawings are and how they are decoded, as
            for ``tasks=omniglot``.
        shots: labelled training drawings per character (K, 1 to 5).
        aux_shots, val_shots, test_shots: drawings per character of the "aux", "val" and "test" splits.
        auxiliaries: the auxiliary tasks, in head order: any of alphabet, rotation, random.
        random_classes: classes of the random task (None = the number of characters).
        labelled_fraction, aux_batch_size: see ``AuxImageTasks``.
        split_seed: seeds the split of the drawings and the random labels.
        device: where the drawings and the batches live.
    """

    def __init__(
        self,
        root: str | Sequence[str] | None = None,
        shots: int = 1,
        aux_shots: int = 1,
        val_shots: int = 2,
        test_shots: int = 5,
        auxiliaries: Sequence[str] = ("alphabet", "rotation", "random"),
        random_classes: int | None = None,
        labelled_fraction: float = 0.5,
        aux_batch_size: int = 64,
        image_size: int = 28,
        split_seed: int = 0,
        cache_dir: str | None = None,
        download: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        sizes = {
            "test": check_count("test_shots", test_shots, 1),
            "val": check_count("val_shots", val_shots, 1),
            "aux": check_count("aux_shots", aux_shots, 1),
            "train": check_count("shots", shots, 1, 5),
        }
        check_count("image_size", image_size, 1)
        drawings, self.characters = load_drawings(root, image_size, cache_dir, download)
        count, per_character = drawings.shape[:2]
        labels = torch.arange(count).repeat_interleave(per_character)
        splits = split_per_class(labels, sizes, split_seed, f"Omniglot ({per_character} drawings per character)")
        #: alphabet names "set/alphabet", sorted; the alphabet task's label is the index here
        self.alphabets = sorted({name.rsplit("/", 1)[0] for name in self.characters})
        alphabet_of = torch.tensor([self.alphabets.index(name.rsplit("/", 1)[0]) for name in self.characters])
        super().__init__(
            drawings.flatten(0, 1).unsqueeze(1),
            labels,
            splits,
            auxiliaries,
            image_format(image_size),
            hierarchy=("alphabet", alphabet_of),
            random_classes=random_classes,
            labelled_fraction=labelled_fraction,
            aux_batch_size=aux_batch_size,
            seed=split_seed,
            class_names=self.characters,
            device=device,
        )
