"""Image classification with auxiliary tasks (AuxiLearn's few-label setting), the logic shared by
Omniglot, MNIST and MiniImageNet (``aux_omniglot``, ``aux_mnist``, ``aux_miniimagenet`` only read
their files and say how examples split).

Every example of the data set is in one tensor [E, C, H, W] resident on the device, with its main
label (the class); each split is a tensor of example ids, so a batch is a few gathers:

- "train": examples with a main label (``shots`` per class), and "unlabelled" ones beside them whose
  main label is hidden (-1) but whose self-supervised targets are not; a training batch of n holds
  ``round(n * labelled_fraction)`` labelled examples and the rest unlabelled, each drawn uniformly
  with replacement;
- "aux": the small labelled set of the hypergradient's L_A (``aux_batch_size`` of it per batch);
- "val", "test": held-out labelled examples.

Auxiliary tasks, chosen by name (``auxiliaries``):

- a hierarchical label of the class (Omniglot's "alphabet"): known where the main label is known;
- "rotation": view 1 of the batch is each example rotated by r * 90 degrees (``torch.rot90`` over
  the last two dimensions), r drawn per example and per batch, and r (0..3) is the target, on every
  training example (self-supervised);
- "random": a label in [0, random_classes) drawn once per example from ``seed`` (so fixed across
  batches) on every training example: a deliberately harmful task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metalab.errors import require
from metalab.tasks.auxiliary.base import AuxBatch, AuxiliaryTasks, AuxTask
from metalab.tasks.episodic.episodes import FLOAT_RESIDENT_BYTES
from metalab.tasks.spec import ClassificationScoring, ImageFormat

__all__ = ["AuxImageTasks", "check_count", "split_per_class"]

#: The splits ``AuxImageTasks`` reads; "unlabelled" may be empty.
AUX_SPLITS = ("train", "unlabelled", "aux", "val", "test")


def check_count(key: str, value: object, least: int, most: int | None = None) -> int:
    """``value`` of ``tasks.<key>`` as an int in [least, most], or one sentence saying what to set."""
    valid = (
        isinstance(value, int) and not isinstance(value, bool) and value >= least and (most is None or value <= most)
    )
    bounds = f"an integer >= {least}" if most is None else f"an integer from {least} to {most}"
    require(valid, f"tasks.{key}={value!r} is invalid; set it to {bounds}.")
    return value  # type: ignore[return-value]


def split_per_class(labels: Tensor, sizes: dict[str, int], seed: int, name: str) -> dict[str, Tensor]:
    """Example ids of each split, taken class by class: within each class, the examples in a random
    order (from ``seed``) go ``sizes[first]`` to the first split, the next ``sizes[second]`` to the
    second, and so on; the rest to "unlabelled". Returns sorted long ids per split (the keys of
    ``sizes`` and "unlabelled"). A class with fewer examples than ``sum(sizes)`` is refused in one
    sentence naming ``name`` and the numbers."""
    counts = torch.bincount(labels)
    needed = sum(sizes.values())
    fewest = int(counts[counts > 0].min())
    require(
        needed <= fewest,
        f"The splits need {' + '.join(f'{size} ({split})' for split, size in sizes.items())} = {needed} examples per "
        f"class but {name} has only {fewest} in some class; lower tasks.shots or the other split sizes.",
    )
    shuffle = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = shuffle[torch.sort(labels[shuffle], stable=True).indices]  # by class, shuffled within a class
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels)) - starts[labels[order]]  # position of each example in its class
    ids, first = {}, 0
    for split, size in sizes.items():
        ids[split] = torch.nonzero((rank >= first) & (rank < first + size)).flatten()
        first += size
    ids["unlabelled"] = torch.nonzero(rank >= first).flatten()
    return ids


class AuxImageTasks(ClassificationScoring, AuxiliaryTasks):
    """Classification of ``images`` by ``labels`` with auxiliary tasks (see the module docstring).

    images: uint8 [E, C, H, W] (H = W), pixels as ``image_format`` decoded them; labels: long [E]
    main classes 0..classes-1; splits: long example ids of each of AUX_SPLITS (disjoint);
    auxiliaries: the auxiliary tasks in head order, each "rotation", "random" or the name of
    ``hierarchy``; hierarchy: (name, long [classes] the group of each class) or None;
    random_classes: width of the random task (None = the number of main classes);
    labelled_fraction: share of a training batch drawn from the labelled examples (all of it when no
    example is unlabelled); aux_batch_size: "aux" examples per training batch; seed: draws the
    random labels; class_names: the name of each main class.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        splits: dict[str, Tensor],
        auxiliaries: Sequence[str],
        image_format: ImageFormat,
        hierarchy: tuple[str, Tensor] | None = None,
        random_classes: int | None = None,
        labelled_fraction: float = 0.5,
        aux_batch_size: int = 64,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(device)
        self.main_width = int(labels.max()) + 1
        random_classes = self.main_width if random_classes is None else random_classes
        known = {"rotation": (4, 1), "random": (check_count("random_classes", random_classes, 2), 0)}
        if hierarchy is not None:
            known[hierarchy[0]] = (int(hierarchy[1].max()) + 1, 0)
        auxiliaries = list(auxiliaries)
        for name in auxiliaries:
            require(
                name in known,
                f"tasks.auxiliaries names {name!r}, which this data set does not have; "
                f"choose among {', '.join(known)}.",
            )
        require(len(set(auxiliaries)) == len(auxiliaries), f"tasks.auxiliaries={auxiliaries} names a task twice.")
        require(
            isinstance(labelled_fraction, (int, float)) and 0 < labelled_fraction <= 1,
            f"tasks.labelled_fraction={labelled_fraction!r} is invalid; set it in (0, 1].",
        )
        self.aux_batch_size = check_count("aux_batch_size", aux_batch_size, 1)
        self.aux_tasks = tuple(AuxTask(name, *known[name]) for name in auxiliaries)
        self.labelled_fraction = float(labelled_fraction)
        self.input_shape = tuple(images.shape[1:])
        self.image_format = image_format
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(self.main_width)]
        self.splits = {split: splits[split].long() for split in AUX_SPLITS}
        self.labels = labels.long()
        #: the fixed label of the random task, per example
        self.random_labels = torch.randint(random_classes, labels.shape, generator=torch.Generator().manual_seed(seed))
        self.hierarchy = None if hierarchy is None else hierarchy[1].long()
        self._scale, self._shift = image_format.scale_shift()
        if images.numel() * 4 <= FLOAT_RESIDENT_BYTES:  # small sets are held normalised, a batch is a bare gather
            images = image_format.normalise(images)
        #: [E, C, H, W]: float32 normalised, or uint8 for large sets (normalised batch by batch)
        self.images = images
        self.to(self.device)

    def to(self, device: torch.device | str) -> AuxImageTasks:
        """Move the images, labels and split ids to ``device``."""
        self.device = torch.device(device)
        for key in ("images", "labels", "random_labels", "hierarchy", "_scale", "_shift"):
            value = getattr(self, key)
            setattr(self, key, None if value is None else value.to(self.device))
        self.splits = {split: ids.to(self.device) for split, ids in self.splits.items()}
        return self

    def split_size(self, split: str) -> int:
        """Number of examples of ``split`` (one of AUX_SPLITS)."""
        return self.splits[split].numel()

    def _inputs(self, ids: Tensor) -> Tensor:
        x = self.images.index_select(0, ids)
        if x.dtype == torch.uint8:
            x = x.float().mul_(self._scale)
            x = x if self._shift is None else x.add_(self._shift)
        return x

    def _draw(self, split: str, count: int, generator: torch.Generator) -> Tensor:
        ids = self.splits[split]
        return ids[torch.randint(ids.numel(), (count,), generator=generator, device=self.device)]

    def sample(self, batch_size: int, split: str, generator: torch.Generator) -> AuxBatch:
        """A training batch (``split="train"``: ``batch_size`` examples with every view and target,
        and ``aux_batch_size`` "aux" examples), or ``batch_size`` distinct examples of "val" or
        "test" (all of the split when it has fewer; one view, auxiliary targets -1)."""
        if split == "train":
            return self._train_batch(batch_size, generator)
        return self.sample_held_out(batch_size, split, generator)

    def held_out(self, split: str, positions: Tensor) -> AuxBatch:
        ids = self.splits[split][positions]
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        return AuxBatch(
            self._inputs(ids).unsqueeze(0),
            self.labels[ids],
            torch.full((ids.numel(), len(self.aux_tasks)), -1, dtype=torch.long, device=self.device),
            self._inputs(empty),
            empty,
        )

    @classmethod
    def footprint_views(cls, keys: dict[str, Any]) -> int:
        """The inputs as they are, and rotated copies when "rotation" is among ``auxiliaries``."""
        return 1 + ("rotation" in list(keys.get("auxiliaries") or ()))

    def _train_batch(self, batch_size: int, generator: torch.Generator) -> AuxBatch:
        has_unlabelled = self.split_size("unlabelled") > 0
        labelled = batch_size if not has_unlabelled else round(batch_size * self.labelled_fraction)
        ids = torch.cat(
            [self._draw("train", labelled, generator), self._draw("unlabelled", batch_size - labelled, generator)]
        )
        x = self._inputs(ids)
        y = self.labels[ids].clone()
        y[labelled:] = -1
        columns, views = [], [x]
        for task in self.aux_tasks:
            if task.name == "rotation":
                turns = torch.randint(4, (batch_size,), generator=generator, device=self.device)
                rotated = torch.stack([x.rot90(k, (-2, -1)) for k in range(4)])  # [4, N, C, H, W]
                views.append(rotated[turns, torch.arange(batch_size, device=self.device)])
                columns.append(turns)
            elif task.name == "random":
                columns.append(self.random_labels[ids])
            else:  # the hierarchical label, where the main label is known
                columns.append(torch.where(y >= 0, self.hierarchy[self.labels[ids]], -1))
        aux_ids = self._draw("aux", self.aux_batch_size, generator)
        aux_y = torch.stack(columns, 1) if columns else torch.empty(batch_size, 0, dtype=torch.long, device=self.device)
        return AuxBatch(torch.stack(views), y, aux_y, self._inputs(aux_ids), self.labels[aux_ids])

    def example_losses(self, outputs: Tensor, batch: AuxBatch) -> tuple[Tensor, Tensor]:
        """Cross-entropy of each head on its view, per example: (main [N], aux [N, K]); 0 where the
        target is -1 (missing)."""
        heads = self.head_slices

        def masked_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
            known = targets >= 0
            return F.cross_entropy(logits, targets.clamp(min=0), reduction="none") * known

        main = masked_cross_entropy(outputs[0, :, heads[0]], batch.y)
        aux = [
            masked_cross_entropy(outputs[task.view, :, head], batch.aux_y[:, k])
            for k, (task, head) in enumerate(zip(self.aux_tasks, heads[1:]))
        ]
        return main, torch.stack(aux, 1) if aux else main.new_zeros(main.shape[0], 0)
