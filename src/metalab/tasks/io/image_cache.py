"""Decode image files once, resize them, and keep the result as one cached uint8 tensor file.

A data set of a few thousand small PNG or JPEG files takes seconds to decode and a sampler
needs it as one tensor anyway, so the decoded tensors are saved with ``torch.save`` under
``cache_dir`` and read back on every later start (memory-mapped when asked, so that a data
set larger than RAM or GPU memory still opens instantly).

A cache file is named by what it holds (the sources' absolute paths, the image size, the
kind of data) and stores a fingerprint of the sources' state (sizes and modification times):
when a source changes, the same file is rebuilt in place instead of a new one piling up
beside it. Files are written to a temporary name and renamed, so an interrupted run or two
runs building at once never leave a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, Union

import numpy as np
import torch
from PIL import Image

from metalab.checkpoint import save_checkpoint
from metalab.errors import ConfigError

__all__ = [
    "ImageSource",
    "decode_image",
    "decode_images",
    "default_cache_dir",
    "fingerprint",
    "load_or_build",
]

#: Bumped whenever the layout of a cache file changes, so old files are rebuilt, not misread.
CACHE_VERSION = 1

#: What an image can be decoded from: a file path, the encoded bytes (e.g. read from a zip),
#: or an already decoded HWC / HW uint8 array (the MiniImageNet pickle caches).
ImageSource = Union[str, Path, bytes, np.ndarray]


def default_cache_dir() -> Path:
    """``$METALAB_CACHE`` if set, else ``~/.cache/metalab``."""
    return Path(os.environ.get("METALAB_CACHE") or "~/.cache/metalab").expanduser()


def fingerprint(paths: Sequence[str | Path]) -> str:
    """The state of ``paths`` as a string: size and mtime of each file; for a folder, the mtime
    of it and of every folder below it.

    A folder's mtime changes when files are added, removed or renamed in it, which is how
    data sets change in practice; stat-ing every one of 60,000 images would make each start slow.
    """
    state = []
    for path in paths:
        path = Path(path).resolve()
        if path.is_dir():
            stamps = [(str(path), path.stat().st_mtime_ns)]
            for folder, subfolders, _ in os.walk(path):
                subfolders.sort()
                stamps += [(os.path.join(folder, s), os.stat(os.path.join(folder, s)).st_mtime_ns) for s in subfolders]
            state.append(stamps)
        else:
            stat = path.stat()
            state.append([str(path), stat.st_size, stat.st_mtime_ns])
    return json.dumps(state)


def load_or_build(
    cache_dir: str | Path,
    kind: str,
    identity: dict[str, Any],
    source_state: str,
    build: Callable[[], dict[str, Any]],
    mmap: bool = False,
) -> dict[str, Any]:
    """The cached payload for ``identity``, built with ``build()`` and saved when missing, stale
    (``source_state`` differs from the one stored) or unreadable.

    ``build`` returns a dict of tensors, strings and lists (whatever ``torch.load(weights_only=True)``
    accepts). With ``mmap=True`` tensors are memory-mapped from the file rather than read into RAM.
    """
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / f"{kind}-{digest}.pt"
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            if payload.get("version") == CACHE_VERSION and payload.get("source_state") == source_state:
                return payload
        except Exception:  # truncated, foreign or from another torch: rebuilding is always safe
            pass
    payload = dict(build(), version=CACHE_VERSION, source_state=source_state)
    try:
        save_checkpoint(payload, path)  # the atomic write the trainer's checkpoints use
    except OSError as err:  # a read-only cache costs start-up time only, so it is not fatal
        warnings.warn(f"Could not write the cache {path} ({err}); set tasks.cache_dir to a writable folder.")
        return payload
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True) if mmap else payload


def decode_image(source: ImageSource, name: str, size: int, mode: Literal["L", "RGB"]) -> np.ndarray:
    """One image as uint8 [size, size] (mode "L") or [size, size, 3] (mode "RGB"), resized with an
    antialiasing (Lanczos) filter; a file that cannot be decoded raises ConfigError naming ``name``."""
    try:
        if isinstance(source, np.ndarray):
            image = Image.fromarray(source)
        else:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with image:
            image.draft(mode, (size, size))  # JPEG only: decode at the smallest power-of-two scale >= size
            image = image.convert(mode)  # also forces the decode, so truncated files fail here
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.LANCZOS)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:  # PIL's ways of saying "not an image"
        raise ConfigError(f"Could not decode the image {name} ({err}); replace or delete that file.") from None


def decode_images(
    sources: Sequence[ImageSource], names: Sequence[str], size: int, mode: Literal["L", "RGB"]
) -> np.ndarray:
    """``decode_image`` over many images, in threads (PIL releases the GIL while decoding), laid
    out channel-first as torch wants them: uint8 [N, size, size] ("L") or [N, 3, size, size] ("RGB")."""
    channels = (3,) if mode == "RGB" else ()
    out = np.empty((len(sources), *channels, size, size), dtype=np.uint8)

    def fill(index: int) -> None:
        pixels = decode_image(sources[index], names[index], size, mode)
        out[index] = pixels.transpose(2, 0, 1) if mode == "RGB" else pixels

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(fill, range(len(sources))):  # iterating re-raises the first error
            pass
    return out
