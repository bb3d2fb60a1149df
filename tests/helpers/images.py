"""A small synthetic MiniImageNet, in its image-folder (CSV + JPEG) and pickle forms."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import PIL.Image

__all__ = ["CLASSES", "PER_CLASS", "write_image_folder", "write_pickles"]

CLASSES = {"train": 6, "val": 5, "test": 5}  # Ravi & Larochelle's 64/16/20, shrunk
PER_CLASS = 8


def write_image_folder(root: Path) -> dict[str, dict[str, list[np.ndarray]]]:
    """The CSV form with random 84x84 JPEGs; returns split -> class -> the pixels as PIL decodes them."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    pixels: dict[str, dict[str, list[np.ndarray]]] = {}
    for split, count in CLASSES.items():
        lines = ["filename,label"]
        pixels[split] = {}
        for index in reversed(range(count)):  # classes listed out of order: the sampler sorts them
            label = f"n{split}{index:03d}"
            pixels[split][label] = []
            for image in range(PER_CLASS):
                name = f"{label}{image:08d}.jpg"
                PIL.Image.fromarray(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(root / "images" / name)
                with PIL.Image.open(root / "images" / name) as decoded:
                    pixels[split][label].append(np.asarray(decoded.convert("RGB")))
                lines.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return pixels


def write_pickles(root: Path, pixels: dict[str, dict[str, list[np.ndarray]]]) -> None:
    """The pickle form of the same pixels, classes interleaved in image_data as in the real files."""
    root.mkdir(parents=True)
    for split, classes in pixels.items():
        names = list(classes)[::-1]
        order = [(name, i) for i in range(PER_CLASS) for name in names]
        image_data = np.stack([classes[name][i] for name, i in order])
        class_dict = {name: [k for k, (n, _) in enumerate(order) if n == name] for name in names}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as file:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, file)
