"""MiniImageNet few-shot classification (Vinyals et al. 2016) on Ravi & Larochelle's split (2017).

64 training, 16 validation and 20 test classes of 600 84x84 images each, read from either of the
two forms it is distributed in:

- an image folder: ``root/images/*.jpg`` with ``root/{train,val,test}.csv`` (header
  ``filename,label``), the form of Ravi & Larochelle's code;
- pickle caches ``root/mini-imagenet-cache-{train,val,test}.pkl``, each a dict with
  ``image_data`` uint8 [N, 84, 84, 3] and ``class_dict`` {class name: [indices into image_data]}.

Either is decoded once into one cached uint8 tensor [100, 600, 3, 84, 84] (1.3 GB), which is
memory-mapped from the cache file, so that it costs no RAM until used and can stay on the host
when the accelerator cannot hold it. Episodes are normalised with the per-channel mean and std
of the training classes.
"""

from __future__ import annotations

import csv
import os
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metalab.errors import ConfigError, require
from metalab.tasks.base import SPLITS
from metalab.tasks.episodic.episodes import ImageEpisodes, episode_shapes
from metalab.tasks.io.image_cache import decode_images, default_cache_dir, fingerprint, load_or_build
from metalab.tasks.spec import ImageFormat

__all__ = ["MiniImageNet", "image_format", "load_images"]

_PICKLES = {split: f"mini-imagenet-cache-{split}.pkl" for split in SPLITS}
_CSVS = {split: f"{split}.csv" for split in SPLITS}


class MiniImageNet(ImageEpisodes):
    """N-way K-shot MiniImageNet episodes, x normalised per channel: [B, ways*shots, 3, H, W].

    Args (the config keys):
        root: the folder holding either form (see the module docstring); a relative path is
            resolved against the working directory. None = $METALAB_MINIIMAGENET or data/miniimagenet.
        ways, shots: N and K of every episode.
        query: query images per class (15 in MAML and iMAML).
        eval_shots, eval_query: K and Q of "val" and "test" episodes; None = as for "train".
        image_size: side in pixels of the (antialiased) resized images; 84 as everyone uses.
        on_device: true holds the images on the device, false keeps them memory-mapped on the
            host and copies each batch's images over, "auto" holds them on an accelerator when
            they take at most half of its free memory.
        cache_dir: where the decoded tensor is cached; None = $METALAB_CACHE or ~/.cache/metalab.
        device: where the episodes (and, per on_device, the images) live.
    """

    def __init__(
        self,
        root: str | None = None,
        ways: int = 5,
        shots: int = 1,
        query: int = 15,
        eval_shots: int | None = None,
        eval_query: int | None = None,
        image_size: int = 84,
        on_device: bool | str = "auto",
        cache_dir: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        shapes = episode_shapes(ways, shots, query, eval_shots, eval_query)
        require(
            isinstance(image_size, int) and image_size >= 1,
            f"tasks.image_size={image_size!r} is invalid; set it to a positive integer.",
        )
        folder, payload = load_images(root, image_size, cache_dir)
        sizes = payload["split_sizes"]
        #: The class names of the splits in order: classes [0, 64) train, [64, 80) val, [80, 100) test.
        self.class_names: list[str] = list(payload["classes"])
        #: Per-channel mean and std of the training images / 255, which episodes are normalised by.
        self.mean: Tensor = payload["mean"]
        self.std: Tensor = payload["std"]
        starts = np.cumsum([0, *sizes]).tolist()
        split_classes = {split: torch.arange(starts[i], starts[i + 1]) for i, split in enumerate(SPLITS)}
        super().__init__(
            payload["images"],
            split_classes,
            shapes,
            image_format=image_format(image_size, self.mean, self.std),
            on_device=on_device,
            device=device,
            name=f"MiniImageNet at {folder}",
        )

    # No describe(): the normalisation comes from the training images, so only a built sampler's
    # spec (which every checkpoint keeps) knows it.


def load_images(root: str | None, image_size: int, cache_dir: str | None = None) -> tuple[Path, dict[str, object]]:
    """(the resolved folder, the decoded and cached payload) of MiniImageNet at ``root`` (as
    ``tasks.root``): "images" uint8 [classes, per_class, 3, S, S] memory-mapped, "split_sizes"
    (train, val, test classes, in that order), "classes" (names), "mean" and "std" (per channel, of
    the training classes). Missing or incomplete data is refused in one sentence."""
    if root is None:
        root = os.environ.get("METALAB_MINIIMAGENET") or "data/miniimagenet"
    # Hydra 1.3 keeps the working directory by default, so the user's cwd is the reference.
    folder = Path(os.path.expanduser(str(root))).absolute()
    form, sources = _find_form(folder)
    payload = load_or_build(
        default_cache_dir() if cache_dir is None else cache_dir,
        kind="miniimagenet",
        identity={"root": str(folder), "form": form, "image_size": image_size},
        source_state=fingerprint(sources),
        build=lambda: _build(folder, form, image_size),
        mmap=True,
    )
    return folder, payload


def image_format(image_size: int, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> ImageFormat:
    """RGB images resized to image_size, x = (pixels / 255 - mean) / std per channel."""
    return ImageFormat(image_size, "RGB", mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


def _find_form(folder: Path) -> tuple[str, list[Path]]:
    """("pickle" | "images", the source files whose state keys the cache)."""
    pickles = [folder / name for name in _PICKLES.values()]
    if all(path.is_file() for path in pickles):
        return "pickle", pickles
    listed = [folder / name for name in _CSVS.values()] + [folder / "images"]
    if all(path.exists() for path in listed):
        return "images", listed
    for expected in (pickles, listed):
        if any(path.exists() for path in expected):
            missing = ", ".join(str(path) for path in expected if not path.exists())
            raise ConfigError(f"MiniImageNet at {folder} is incomplete: {missing} missing; add them.")
    raise ConfigError(
        f"No MiniImageNet found at {folder}: it needs images/ with train.csv, val.csv and test.csv "
        f"(header filename,label) or mini-imagenet-cache-{{train,val,test}}.pkl; put the data there "
        f"or set tasks.root to where it is."
    )


def _build(folder: Path, form: str, image_size: int) -> dict[str, object]:
    """Decode every image: {"images": uint8 [classes, per_class, 3, S, S], "split_sizes", "classes", "mean", "std"}."""
    per_split = [_decode_split(folder, split, form, image_size) for split in SPLITS]
    counts = {images.shape[1] for _, images in per_split}
    per_class = min(counts)
    if len(counts) > 1:
        warnings.warn(f"MiniImageNet classes have {sorted(counts)} images; using the first {per_class} of each.")
    images = torch.cat([torch.from_numpy(images[:, :per_class]) for _, images in per_split])
    mean, std = _channel_statistics(images[: len(per_split[0][0])])
    return {
        "images": images,
        "split_sizes": [len(names) for names, _ in per_split],
        "classes": [name for names, _ in per_split for name in names],
        "mean": mean,
        "std": std,
    }


def _decode_split(folder: Path, split: str, form: str, image_size: int) -> tuple[list[str], np.ndarray]:
    """The class names of ``split`` (sorted) and their images, uint8 [classes, per_class, 3, S, S]."""
    if form == "pickle":
        path = folder / _PICKLES[split]
        data = _load_pickle(path)
        names = sorted(data["class_dict"])
        members = [list(data["class_dict"][name]) for name in names]
        per_class = min(len(m) for m in members)
        pixels = np.asarray(data["image_data"])[np.array([m[:per_class] for m in members]).reshape(-1)]
        require(
            pixels.ndim == 4 and pixels.shape[-1] == 3,
            f"{path} holds image_data of shape {pixels.shape[1:]} per image, not [H, W, 3]; rebuild that pickle.",
        )
        if pixels.shape[1:3] == (image_size, image_size):
            images = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
        else:
            labels = [f"{path}[{index}]" for index in range(len(pixels))]
            images = decode_images(list(pixels), labels, image_size, "RGB")
    else:
        listed = _read_csv(folder / _CSVS[split])
        names = sorted(listed)
        per_class = min(len(listed[name]) for name in names)
        files = [str(folder / "images" / f) for name in names for f in listed[name][:per_class]]
        images = decode_images(files, files, image_size, "RGB")
    return names, images.reshape(len(names), per_class, 3, image_size, image_size)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as file:
            data = pickle.load(file)
    except UnicodeDecodeError:  # written by Python 2, as some of the circulating copies were
        with open(path, "rb") as file:
            data = pickle.load(file, encoding="latin1")
    except Exception as err:
        raise ConfigError(f"Could not read the pickle {path} ({err}); replace that file.") from None
    require(
        isinstance(data, dict) and "image_data" in data and "class_dict" in data and data["class_dict"],
        f"{path} is not a MiniImageNet cache (a dict with image_data and class_dict); replace that file.",
    )
    return data


def _read_csv(path: Path) -> dict[str, list[str]]:
    """label -> file names under images/, in file order."""
    with open(path, newline="") as file:
        rows = [row for row in csv.reader(file) if row]
    require(
        bool(rows) and [cell.strip() for cell in rows[0][:2]] == ["filename", "label"],
        f"{path} must start with the header line filename,label; fix that file.",
    )
    listed: dict[str, list[str]] = {}
    for row in rows[1:]:
        require(len(row) >= 2, f"{path} has a line without a label: {','.join(row)}; fix that file.")
        listed.setdefault(row[1].strip(), []).append(row[0].strip())
    require(bool(listed), f"{path} lists no images; fix that file.")
    return listed


def _channel_statistics(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of images / 255 over uint8 [classes, per_class, 3, H, W],
    a class at a time so that the float copy stays small."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for one_class in images:
        pixels = one_class.double().div_(255.0)
        total += pixels.sum(dim=(0, 2, 3))
        squares += pixels.square().sum(dim=(0, 2, 3))
    count = images.numel() / 3
    mean = total / count
    return mean.float(), (squares / count - mean.square()).sqrt().float()
