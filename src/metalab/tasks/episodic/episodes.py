"""Batched N-way K-shot episodes, gathered from one tensor of images grouped by class.

Every image data set here (Omniglot, MiniImageNet) is held as ``images``
[num_classes, images_per_class, C, H, W]; a split is a tensor of class ids. A batch of B
episodes is then about fifteen tensor ops on the device, whatever B, N and K are:

1. per task, N distinct classes of the split, in random order: the position of a class in that
   order is its label, so labels are a random permutation per task;
2. per chosen class, K + Q distinct images, the first K for support and the rest for query;
3. one sort that shuffles the support examples and the query examples of every task;
4. one ``index_select`` into the flattened images (plus the uint8 -> float map for uint8 images).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from metalab.errors import ConfigError, require
from metalab.tasks.base import SPLITS, ClassificationTasks, Split
from metalab.tasks.spec import ImageFormat
from metalab.types import TaskBatch

__all__ = ["EpisodeShape", "ImageEpisodes", "episode_shapes", "gather_episodes", "sample_distinct"]


@dataclass(frozen=True)
class EpisodeShape:
    """N-way, K-shot, with Q query images per class: support S = ways*shots, query ways*query."""

    ways: int
    shots: int
    query: int


def episode_shapes(
    ways: int, shots: int, query: int, eval_shots: int | None = None, eval_query: int | None = None
) -> dict[str, EpisodeShape]:
    """The episode shape of each split, checked: "train" uses shots/query, "val" and "test" use
    eval_shots/eval_query where given (None = same as train)."""
    eval_shots = shots if eval_shots is None else eval_shots
    eval_query = query if eval_query is None else eval_query
    for key, value, least in [
        ("ways", ways, 2), ("shots", shots, 1), ("query", query, 1),
        ("eval_shots", eval_shots, 1), ("eval_query", eval_query, 1),
    ]:  # fmt: skip
        require(
            isinstance(value, int) and not isinstance(value, bool) and value >= least,
            f"tasks.{key}={value!r} is invalid; set it to an integer >= {least}.",
        )
    train = EpisodeShape(ways, shots, query)
    held_out = EpisodeShape(ways, eval_shots, eval_query)
    return {"train": train, "val": held_out, "test": held_out}


def sample_distinct(batch_shape: tuple[int, ...], population: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` distinct integers from [0, population) per row, uniformly over ordered tuples
    (so in uniformly random order): long [*batch_shape, count], on the generator's device.

    Two exact methods; the sizes and the device pick the faster one, never the distribution.
    Top-k of ``population`` uniform keys per row costs O(population) per row: nothing on a GPU,
    but on a CPU drawing 4,400 keys for each of 32 Omniglot tasks was most of a batch's time.
    Rejection draws ``count`` values per row and redraws the rows holding a repeat until none
    does (every distinct ordered tuple stays equally likely); a round of it costs about as much
    as 5,000 keys (measured on a 2-core CPU), and it takes more rounds the likelier a repeat is.
    """
    device = generator.device
    rows = math.prod(batch_shape)
    passes = math.prod(1 - i / population for i in range(count))  # P(a row holds no repeat)
    if passes >= 1:
        rounds = 1.0
    elif passes > 0:
        rounds = 1 + math.log(max(rows, 2)) / -math.log(1 - passes)  # until the last row passes
    else:
        rounds = math.inf
    if device.type != "cpu" or rows * population < 5000 * rounds:
        keys = torch.rand(*batch_shape, population, generator=generator, device=device)
        return keys.topk(count, dim=-1).indices  # sorted by key: a uniformly random order
    drawn = torch.randint(population, (*batch_shape, count), generator=generator, device=device)
    while True:
        # Equal pairs, the diagonal's ``count`` included: more than that means a repeat.
        repeated = (drawn.unsqueeze(-1) == drawn.unsqueeze(-2)).sum(dim=(-2, -1)) > count
        if not repeated.any():
            return drawn
        redrawn = torch.randint(population, drawn.shape, generator=generator, device=device)
        drawn = torch.where(repeated.unsqueeze(-1), redrawn, drawn)


def gather_episodes(
    images: Tensor,
    classes: Tensor,
    batch_size: int,
    shape: EpisodeShape,
    generator: torch.Generator,
    scale: Tensor | float = 1.0,
    shift: Tensor | float | None = None,
) -> TaskBatch:
    """``batch_size`` episodes of ``shape`` drawn from the class ids ``classes`` (long [num_split_classes]).

    images: [num_classes, images_per_class, *example_shape], on the generator's device or on the
    host (then only the chosen images are copied to the device); float images are returned as
    they are, uint8 ones as x * scale + shift (None: no shift).
    Returns x_support [B, ways*shots, *example_shape] float, y_support long [B, ways*shots] with
    values 0..ways-1, x_query [B, ways*query, *example_shape], y_query [B, ways*query].
    """
    device = generator.device
    ways, shots, query = shape.ways, shape.shots, shape.query
    per_class, per_task = images.shape[1], shots + query
    chosen = classes[sample_distinct((batch_size,), classes.numel(), ways, generator)]  # [B, N]; label = position
    picks = sample_distinct((batch_size, ways), per_class, per_task, generator)  # [B, N, K+Q]
    rows = (chosen.unsqueeze(-1) * per_class + picks).flatten()  # slot (b, n, k) -> row of images.flatten(0, 1)
    # One sort of all B*N*(K+Q) slots orders them [all support slots, all query slots], by task,
    # at random within a task: key = task (+ B for a query slot) + a uniform fraction, in float64
    # so that ~40 random bits remain beside the integer part (a tie would only bias the shuffle).
    keys = torch.rand(batch_size, ways, per_task, generator=generator, device=device, dtype=torch.float64)
    order = keys.add_(_slot_offsets(batch_size, ways, shots, query, device)).flatten().argsort()
    slot = order % (ways * per_task)  # slot n * (K+Q) + k of its task holds class n
    labels = slot.div_(per_task, rounding_mode="floor")
    rows = rows.index_select(0, order).to(images.device)
    x = images.flatten(0, 1).index_select(0, rows).to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().mul_(scale)  # convert, then scale in place: type-promoting ops are slower
        if shift is not None:
            x = x.add_(shift)
    # One buffer for the batch: support and query are contiguous views of its two halves, and
    # one allocation per batch is what the allocator reuses rather than faulting in new pages.
    support = batch_size * ways * shots
    return TaskBatch(
        x[:support].view(batch_size, ways * shots, *images.shape[2:]),
        labels[:support].view(batch_size, ways * shots),
        x[support:].view(batch_size, ways * query, *images.shape[2:]),
        labels[support:].view(batch_size, ways * query),
    )


@functools.lru_cache(maxsize=64)
def _slot_offsets(batch_size: int, ways: int, shots: int, query: int, device: torch.device) -> Tensor:
    """float64 [B, N, K+Q]: task index b, plus B for query slots (k >= K)."""
    task = torch.arange(batch_size, device=device, dtype=torch.float64).view(-1, 1, 1)
    is_query = (torch.arange(shots + query, device=device) >= shots).to(torch.float64)
    return (task + batch_size * is_query).expand(batch_size, ways, shots + query).contiguous()


#: Image sets that take at most this much as float32 are held as float32, already normalised, so
#: that a batch is a bare gather: the per-batch uint8 -> float pass doubled a CPU batch's time.
#: Larger ones (MiniImageNet: 5 GB as float) stay uint8 and are converted batch by batch.
FLOAT_RESIDENT_BYTES = 1 << 30


class ImageEpisodes(ClassificationTasks):
    """N-way K-shot image classification: the sampling half of Omniglot and MiniImageNet, which
    differ only in how they read their files.

    images: uint8 [num_classes, images_per_class, C, H, W]; split_classes: long class ids of each
    of "train", "val", "test" ("test" may be absent: data kept whole for training); shapes: the
    EpisodeShape of each split; image_format: how the images were decoded and how they are
    normalised (None: x = images / 255 in [0, 1], and image files cannot be loaded for inference);
    on_device: True holds the images on the device, False leaves them on the host (memory-mapped if they were loaded
    so) and copies only each batch's images over, "auto" holds them on an accelerator when they
    take at most half of its free memory. ``name`` says which data set in error messages.
    """

    def __init__(
        self,
        images: Tensor,
        split_classes: dict[str, Tensor],
        shapes: dict[str, EpisodeShape],
        image_format: ImageFormat | None = None,
        on_device: bool | str = True,
        device: torch.device | str = "cpu",
        name: str = "the data set",
    ) -> None:
        super().__init__(device)
        require(
            on_device in (True, False, "auto"), f"tasks.on_device={on_device!r} is invalid; use true, false or auto."
        )
        per_class = images.shape[1]
        for split in split_classes:
            shape, available = shapes[split], split_classes[split].numel()
            require(
                shape.ways <= available,
                f"tasks.ways={shape.ways} is more than the {available} classes of the {split} split of "
                f"{name}; lower tasks.ways or add data.",
            )
            require(
                shape.shots + shape.query <= per_class,
                f"{split} episodes need shots + query = {shape.shots} + {shape.query} = "
                f"{shape.shots + shape.query} images per class but {name} has {per_class}; lower them.",
            )
        self.shapes = shapes
        self.output_dim = shapes["train"].ways
        self.input_shape = tuple(images.shape[2:])
        self.num_classes = images.shape[0]
        self.on_device = on_device
        self.split_classes = split_classes
        self.image_format = image_format
        # x = (images / 255 - mean) / std = images * scale + shift, per channel.
        if image_format is None:
            self._scale, self._shift = torch.ones(images.shape[2], 1, 1) / 255.0, None
        else:
            self._scale, self._shift = image_format.scale_shift()
        if images.numel() * 4 <= FLOAT_RESIDENT_BYTES:
            images = images.float().mul_(self._scale)
            images = images if self._shift is None else images.add_(self._shift)
        #: [num_classes, images_per_class, C, H, W]: float32 normalised, or uint8 for large sets.
        self.images = images
        self.to(device)

    def to(self, device: torch.device | str) -> ImageEpisodes:
        """Move the class ids (and the images, as ``on_device`` says) to ``device``."""
        self.device = torch.device(device)
        self.split_classes = {split: ids.to(self.device) for split, ids in self.split_classes.items()}
        self._scale = self._scale.to(self.device)
        self._shift = None if self._shift is None else self._shift.to(self.device)
        self.images = self.images.to(self.device if self._hold_on_device() else "cpu")
        return self

    def _hold_on_device(self) -> bool:
        if self.on_device != "auto":
            return bool(self.on_device)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return self.images.numel() * self.images.element_size() <= free // 2
        return True  # the host: memory-mapped images are paged in by the OS as they are used

    def split_size(self, split: str) -> int | None:
        """0 for a split this data does not have (no "test" under Omniglot's tasks.split=all), else
        None: episodes are drawn afresh."""
        return 0 if split in SPLITS and split not in self.split_classes else None

    def sample(self, batch_size: int, split: Split, generator: torch.Generator) -> TaskBatch:
        """``batch_size`` episodes of ``split``: x [B, ways*shots | ways*query, C, H, W] float."""
        if split not in self.split_classes:
            kept = ", ".join(self.split_classes)
            raise ConfigError(
                f"Unknown split {split!r}; use one of {', '.join(SPLITS)}."
                if split not in SPLITS
                else f"this data has no {split} split (its tasks.split keeps {kept} only): use one of {kept}."
            )
        return gather_episodes(
            self.images, self.split_classes[split], batch_size, self.shapes[split], generator, self._scale, self._shift
        )
