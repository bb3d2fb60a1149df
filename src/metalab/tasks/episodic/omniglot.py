"""Omniglot few-shot classification (Lake et al. 2015) with MAML's protocol (Finn et al. 2017).

Reads the official layout ``<set>/<alphabet>/<character>/<drawing>.png`` from folders or zips
(images_background, images_evaluation, or any such set), decodes every drawing once into a
cached uint8 tensor [characters, drawings, H, W], and samples episodes from it on the device.
With ``rotations`` each character rotated by 0/90/180/270 degrees is a class of its own; the
rotated copies are made once at start-up (a 4x larger tensor, 100 MB for all 1,623 characters at
28x28), so that sampling a batch stays a single gather.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from metalab.errors import ConfigError, require
from metalab.tasks.episodic.episodes import ImageEpisodes, episode_shapes
from metalab.tasks.io.image_cache import ImageSource, default_cache_dir, fingerprint, load_or_build
from metalab.tasks.spec import ImageFormat, TaskSpec

__all__ = ["Omniglot", "image_format", "load_drawings"]

# torchvision.datasets.Omniglot's sources, used by download=true.
_DOWNLOAD_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
_ZIPS_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
# MAML's split of the 1,623 characters: 1,100 train + 100 val (its code), 423 test; scaled to other sizes.
_MAML_TOTAL, _MAML_TRAIN_VAL, _MAML_VAL = 1623, 1200, 100


@dataclass(frozen=True)
class _ImageSet:
    """One set in the official layout: a folder, or a folder inside a zip (``prefix``)."""

    name: str
    path: Path
    prefix: str = ""


class Omniglot(ImageEpisodes):
    """N-way K-shot Omniglot episodes, x in [0, 1] with strokes = 1: [B, ways*shots, 1, H, W].

    Args (the config keys):
        root: a folder or a .zip holding sets in the official layout, or a folder with such folders
            or zips inside (up to two levels down); a list of them is merged. Relative paths are
            resolved against the working directory at construction. None = $METALAB_OMNIGLOT or
            ../shared/data/omniglot.
        ways, shots: N and K of every episode.
        query: query images per class; None = shots (as in MAML's code).
        eval_shots, eval_query: K and Q of "val" and "test" episodes; None = as for "train".
        image_size: side in pixels of the (antialiased) resized drawings; 28 as in MAML.
        rotations: rotations by 90, 180 and 270 degrees make three new classes per character.
        split: "maml": characters of all sets pooled and shuffled with ``split_seed`` regardless of
            alphabet, 1,100 train / 100 val / 423 test, scaled proportionally to other totals;
            "background_evaluation": images_background trains (minus 100/1200 of its characters
            for val) and images_evaluation tests; "all" (a folder of one's own characters to
            meta-train on): every character trains but a validation slice of MAML's proportion
            (100/1623, at least one), and there is no test split (the trainer skips the test).
        split_seed: seed of the character shuffle behind the splits.
        cache_dir: where the decoded tensor is cached; None = $METALAB_CACHE or ~/.cache/metalab.
        download: fetch images_background and images_evaluation into ``root`` when no set is found
            there (needs torchvision).
        device: where the images and the episodes live.
    """

    def __init__(
        self,
        root: str | Sequence[str] | None = None,
        ways: int = 5,
        shots: int = 1,
        query: int | None = None,
        eval_shots: int | None = None,
        eval_query: int | None = None,
        image_size: int = 28,
        rotations: bool = True,
        split: Literal["maml", "background_evaluation", "all"] = "maml",
        split_seed: int = 0,
        cache_dir: str | None = None,
        download: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        shapes = episode_shapes(ways, shots, shots if query is None else query, eval_shots, eval_query)
        require(
            isinstance(image_size, int) and image_size >= 1,
            f"tasks.image_size={image_size!r} is invalid; set it to a positive integer.",
        )
        require(
            split in ("maml", "background_evaluation", "all"),
            f"tasks.split={split!r} is unknown; use maml, background_evaluation or all.",
        )
        roots = _resolve_roots(root)
        #: uint8 [characters, drawings, H, W], unrotated, strokes = 255; character names "set/alphabet/character".
        self.drawings, self.characters = load_drawings(roots, image_size, cache_dir, download)
        split_ids = _split_characters(self.characters, split, split_seed)
        #: The character names of each split (a rotated character stays in its character's split).
        self.split_characters = {name: [self.characters[i] for i in ids] for name, ids in split_ids.items()}

        angles = 4 if rotations else 1
        count = len(self.characters)
        # Class r * count + c is character c rotated by r * 90 degrees.
        images = torch.cat([torch.rot90(self.drawings, r, dims=(-2, -1)) for r in range(angles)]).unsqueeze(2)
        split_classes = {
            name: torch.cat([torch.tensor(ids, dtype=torch.long) + r * count for r in range(angles)])
            for name, ids in split_ids.items()
        }
        super().__init__(
            images,
            split_classes,
            shapes,
            image_format=image_format(image_size),
            device=device,
            name=f"Omniglot at {roots[0]}",
        )

    @classmethod
    def describe(cls, ways: int = 5, image_size: int = 28, **data_keys: Any) -> TaskSpec:
        """The spec of ``ways``-way Omniglot at ``image_size`` (the other keys only locate and split the data)."""
        return TaskSpec((1, image_size, image_size), ways, cls.kind, image_format(image_size))


def load_drawings(
    root: str | Path | Sequence[str | Path] | None,
    image_size: int,
    cache_dir: str | None = None,
    download: bool = False,
) -> tuple[Tensor, list[str]]:
    """Every drawing of the sets found at ``root`` (as ``tasks.root`` of Omniglot), decoded once and
    cached: (uint8 [characters, drawings, H, W] with strokes = 255, character names
    "set/alphabet/character"). No set found (after a download when ``download``) is refused in one sentence."""
    roots = _resolve_roots(root)
    sets = _find_all_sets(roots)
    if not sets and download:
        _download(roots[0])
        sets = _find_all_sets(roots)
    require(
        bool(sets),
        f"No Omniglot images found at {', '.join(map(str, roots))} (looked for <set>/<alphabet>/<character>/*.png "
        f"folders and zips); set tasks.root to where they are, or tasks.download=true to fetch them.",
    )
    payload = load_or_build(
        default_cache_dir() if cache_dir is None else cache_dir,
        kind="omniglot",
        identity={"sets": [(str(s.path), s.prefix) for s in sets], "image_size": image_size},
        source_state=fingerprint(sorted({s.path for s in sets})),
        build=lambda: _decode_sets(sets, image_size),
    )
    return payload["images"], list(payload["characters"])


def image_format(image_size: int) -> ImageFormat:
    """Grey drawings resized to image_size and inverted, so that x = pixels / 255 has strokes = 1
    (common practice); the data set and load_learner's image files both go through it."""
    return ImageFormat(image_size, "L", invert=True)


def _resolve_roots(root: str | Sequence[str] | None) -> list[Path]:
    if root is None:
        root = os.environ.get("METALAB_OMNIGLOT") or "../shared/data/omniglot"
    roots = [root] if isinstance(root, (str, os.PathLike)) else list(root)
    require(bool(roots), "tasks.root is an empty list; give at least one Omniglot folder or zip.")
    # Hydra 1.3 keeps the working directory by default, so the user's cwd is the reference.
    return [Path(os.path.expanduser(str(r))).absolute() for r in roots]


def _find_all_sets(roots: list[Path]) -> list[_ImageSet]:
    found: dict[tuple[str, str], _ImageSet] = {}
    for root in roots:
        for image_set in _find_sets(root):
            found.setdefault((str(image_set.path), image_set.prefix), image_set)
    return list(found.values())


def _find_sets(root: Path) -> list[_ImageSet]:
    """The sets at ``root``: itself, a zip, or folders and zips one or two levels below it.
    A folder wins over a zip of the same name (the zip it was extracted from)."""
    if root.is_file():
        return _sets_in_zip(root)
    if not root.is_dir():
        return []
    if _is_set_folder(root):
        return [_ImageSet(root.name, root)]
    candidates = sorted(root.glob("*")) + sorted(root.glob("*/*"))
    found: dict[str, _ImageSet] = {}
    for path in candidates:
        if path.is_dir() and _is_set_folder(path):
            found.setdefault(path.name, _ImageSet(path.name, path))
    for path in candidates:
        if path.suffix.lower() == ".zip" and path.is_file():
            for image_set in _sets_in_zip(path):
                found.setdefault(image_set.name, image_set)
    return list(found.values())


def _is_set_folder(folder: Path) -> bool:
    return next(iter(folder.glob("*/*/*.png")), None) is not None


def _is_drawing(name: str) -> bool:
    # Zips made on macOS carry resource forks (__MACOSX/..., ._name.png) that are not images.
    return name.lower().endswith(".png") and "__MACOSX" not in name and not name.rsplit("/", 1)[-1].startswith("._")


def _sets_in_zip(path: Path) -> list[_ImageSet]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ConfigError(f"Could not read the zip {path} ({err}); replace it or remove it from tasks.root.") from None
    prefixes = sorted({name.rsplit("/", 3)[0] if name.count("/") >= 3 else "" for name in names if _is_drawing(name)})
    return [_ImageSet(prefix.rsplit("/", 1)[-1] or path.stem, path, prefix) for prefix in prefixes]


def _list_characters(image_set: _ImageSet) -> dict[str, list[str]]:
    """Character name "set/alphabet/character" -> its drawings (paths or names in the zip), sorted."""
    characters: dict[str, list[str]] = {}
    if image_set.path.is_dir():
        relative = [p.relative_to(image_set.path).as_posix() for p in image_set.path.glob("*/*/*.png")]
        relative = [name for name in relative if _is_drawing(name)]
        drawings = [str(image_set.path / name) for name in relative]
    else:
        start = f"{image_set.prefix}/" if image_set.prefix else ""
        with zipfile.ZipFile(image_set.path) as archive:
            drawings = [
                name for name in archive.namelist()
                if name.startswith(start) and _is_drawing(name) and name.count("/") == start.count("/") + 2
            ]  # fmt: skip
        relative = [name[len(start) :] for name in drawings]
    for drawing, name in sorted(zip(drawings, relative), key=lambda pair: pair[1]):
        alphabet, character, _ = name.split("/")
        characters.setdefault(f"{image_set.name}/{alphabet}/{character}", []).append(drawing)
    return characters


def _decode_sets(sets: list[_ImageSet], image_size: int) -> dict[str, object]:
    """Decode every drawing of ``sets``: {"images": uint8 [characters, drawings, H, W], "characters": names}."""
    per_set = [(image_set, _list_characters(image_set)) for image_set in sets]
    counts = {len(drawings) for _, characters in per_set for drawings in characters.values()}
    drawings_per_character = min(counts)
    if len(counts) > 1:
        warnings.warn(
            f"Omniglot characters have {sorted(counts)} drawings; using the first {drawings_per_character} of each."
        )
    names: list[str] = []
    seen: set[str] = set()
    sources: list[ImageSource] = []
    labels: list[str] = []
    for image_set, characters in per_set:
        archive = zipfile.ZipFile(image_set.path) if image_set.path.is_file() else None
        for character, drawings in characters.items():
            if character in seen:  # the same set reached through two roots
                continue
            seen.add(character)
            names.append(character)
            for drawing in drawings[:drawings_per_character]:
                # Zip members are read here, in one thread; decoding then runs in parallel.
                sources.append(archive.read(drawing) if archive else drawing)
                labels.append(f"{image_set.path}:{drawing}" if archive else drawing)
        if archive:
            archive.close()
    images = image_format(image_size).decode(sources, labels)
    images = images.view(len(names), drawings_per_character, image_size, image_size)
    return {"images": images.contiguous(), "characters": names}


def _split_characters(characters: list[str], protocol: str, seed: int) -> dict[str, list[int]]:
    """Indices of the characters of "train", "val", "test" under ``protocol`` (no "test" under "all"), sorted."""

    def shuffled(ids: list[int]) -> list[int]:
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
        return [ids[i] for i in order]

    if protocol == "maml":
        ids = shuffled(list(range(len(characters))))
        train_val = round(len(ids) * _MAML_TRAIN_VAL / _MAML_TOTAL)
        val = max(1, round(len(ids) * _MAML_VAL / _MAML_TOTAL))
        parts = {"train": ids[: train_val - val], "val": ids[train_val - val : train_val], "test": ids[train_val:]}
    elif protocol == "all":
        ids = shuffled(list(range(len(characters))))
        val = max(1, round(len(ids) * _MAML_VAL / _MAML_TOTAL))
        parts = {"train": ids[val:], "val": ids[:val]}
    else:
        background = [i for i, c in enumerate(characters) if "background" in c.split("/")[0]]
        evaluation = [i for i, c in enumerate(characters) if "evaluation" in c.split("/")[0]]
        sets = sorted({c.split("/")[0] for c in characters})
        require(
            bool(background) and bool(evaluation),
            f"tasks.split=background_evaluation needs a *background* and an *evaluation* set in tasks.root but "
            f"found {sets}; add the missing one or use tasks.split=maml.",
        )
        background = shuffled(background)
        val = max(1, round(len(background) * _MAML_VAL / _MAML_TRAIN_VAL))
        parts = {"train": background[val:], "val": background[:val], "test": evaluation}
    for name, ids in parts.items():
        require(bool(ids), f"The {name} split of Omniglot is empty ({len(characters)} characters in all); add data.")
    return {name: sorted(ids) for name, ids in parts.items()}


def _download(root: Path) -> None:
    try:
        from torchvision.datasets.utils import download_and_extract_archive
    except Exception:  # missing, or built for another torch: either way it cannot run here
        raise ConfigError(
            "tasks.download=true needs torchvision: pip install torchvision, or put the Omniglot zips in tasks.root."
        ) from None
    for name, md5 in _ZIPS_MD5.items():
        url = f"{_DOWNLOAD_URL}/{name}.zip"
        try:
            download_and_extract_archive(url, download_root=str(root), md5=md5)
        except Exception as err:
            raise ConfigError(
                f"Downloading {url} into {root} failed ({err}); check the connection or fetch it by hand."
            ) from None
