"""MiniImageNet sampler on small synthetic copies of both on-disk forms: shapes, normalisation and
episodes checked against the pixels written, both forms giving the same data, and the errors."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from omegaconf import OmegaConf

import metalab.tasks.episodic.episodes as episodes
from metalab.errors import ConfigError
from metalab.tasks.episodic.miniimagenet import MiniImageNet
from tests.helpers.images import CLASSES, PER_CLASS, write_image_folder, write_pickles

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp("miniimagenet")
    pixels = write_image_folder(base / "folder")
    write_pickles(base / "pickles", pixels)
    return base / "folder", base / "pickles", pixels


def make(root: Path, **kwargs) -> MiniImageNet:
    return MiniImageNet(root=str(root), cache_dir=str(root.parent / "cache"), query=kwargs.pop("query", 2), **kwargs)


def oracle(pixels: dict[str, dict[str, list[np.ndarray]]]) -> tuple[dict[bytes, tuple], np.ndarray, np.ndarray]:
    """Every image's bytes (CHW) -> (split, class, index); per-channel mean and std of the training images."""
    table = {
        np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes(): (split, name, index)
        for split, classes in pixels.items()
        for name, images in classes.items()
        for index, image in enumerate(images)
    }
    train = np.stack([image for images in pixels["train"].values() for image in images]).astype(np.float64) / 255
    return table, train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))


def test_shapes_and_normalisation(fixture) -> None:
    folder, _, pixels = fixture
    sampler = make(folder)
    _, mean, std = oracle(pixels)
    assert sampler.images.shape == (16, PER_CLASS, 3, 84, 84)
    assert sampler.input_shape == (3, 84, 84) and sampler.output_dim == 5
    batch = sampler.sample(4, "train", sampler.generator(0))
    assert batch.x_support.shape == (4, 5, 3, 84, 84) and batch.x_query.shape == (4, 10, 3, 84, 84)
    assert batch.y_support.shape == (4, 5) and batch.y_query.shape == (4, 10) and batch.y_query.dtype == torch.long
    assert batch.x_support.dtype == torch.float32
    # All training images, normalised: per channel mean 0 and std 1 (the statistics are the training set's).
    every = sampler.images[sampler.split_classes["train"]].flatten(0, 1).double()
    assert torch.allclose(every.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(every.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4)
    assert np.allclose(sampler.mean.numpy(), mean, atol=1e-6) and np.allclose(sampler.std.numpy(), std, atol=1e-6)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_episodes_match_the_written_images(fixture, split: str) -> None:
    folder, _, pixels = fixture
    table, mean, std = oracle(pixels)
    sampler = make(folder, ways=5, shots=2, query=3)
    batch = sampler.sample(6, split, sampler.generator(1))
    for task in range(6):
        seen_classes = set()
        for label in range(5):
            support = batch.x_support[task][batch.y_support[task] == label]
            images = torch.cat([support, batch.x_query[task][batch.y_query[task] == label]])
            assert len(images) == 5 and (batch.y_support[task] == label).sum() == 2
            # Undo the normalisation with the oracle's statistics and look each image up.
            raw = ((images.double().numpy() * std[:, None, None] + mean[:, None, None]) * 255).round().astype(np.uint8)
            found = [table[image.tobytes()] for image in raw]
            assert {s for s, _, _ in found} == {split}
            assert len({name for _, name, _ in found}) == 1  # one class per label
            assert len({index for _, _, index in found}) == 5  # support and query share no image
            seen_classes.add(found[0][1])
        assert len(seen_classes) == 5


def test_both_forms_give_the_same_data(fixture) -> None:
    folder, pickles, _ = fixture
    from_images, from_pickles = make(folder), make(pickles)
    expected = [f"n{split}{index:03d}" for split, count in CLASSES.items() for index in range(count)]
    assert from_images.class_names == from_pickles.class_names == expected
    assert torch.equal(from_images.images, from_pickles.images)
    for split in ("train", "val", "test"):
        a, b = (s.sample(3, split, s.generator(5)) for s in (from_images, from_pickles))
        assert torch.equal(a.x_support, b.x_support) and torch.equal(a.y_query, b.y_query)


def test_uint8_and_host_resident_paths_agree(fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _, _ = fixture
    held = make(folder)
    monkeypatch.setattr(episodes, "FLOAT_RESIDENT_BYTES", 0)  # as the real 1.3 GB set: uint8, converted per batch
    as_uint8 = make(folder, on_device=False)
    assert as_uint8.images.dtype == torch.uint8 and held.images.dtype == torch.float32
    a, b = (s.sample(4, "val", s.generator(2)) for s in (held, as_uint8))
    assert torch.allclose(a.x_support, b.x_support, atol=1e-5) and torch.equal(a.y_support, b.y_support)


def test_other_image_size_and_second_start_from_cache(fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, pickles, _ = fixture
    for root in (folder, pickles):
        small = make(root, image_size=32)
        assert small.sample(2, "test", small.generator(0)).x_query.shape == (2, 10, 3, 32, 32)
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: pytest.fail("decoded an image although the cache holds it"))
    assert make(folder).images.shape == (16, PER_CLASS, 3, 84, 84)


def test_missing_or_incomplete_data_is_explained(tmp_path: Path) -> None:
    where = re.escape(str(tmp_path))
    with pytest.raises(ConfigError, match=rf"No MiniImageNet found at {where}.*train\.csv.*mini-imagenet-cache"):
        make(tmp_path)
    (tmp_path / "train.csv").write_text("filename,label\n")
    with pytest.raises(ConfigError, match=r"incomplete: .*val\.csv.*test\.csv.*images missing"):
        make(tmp_path)


def test_corrupt_image_is_named(fixture, tmp_path: Path) -> None:
    folder, _, _ = fixture
    copy = tmp_path / "copy"
    (copy / "images").mkdir(parents=True)
    for path in folder.glob("*.csv"):
        (copy / path.name).write_bytes(path.read_bytes())
    for path in (folder / "images").iterdir():
        (copy / "images" / path.name).write_bytes(path.read_bytes())
    broken = sorted((copy / "images").iterdir())[7]
    broken.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ConfigError, match=rf"Could not decode the image {re.escape(str(broken))}"):
        make(copy)


def test_impossible_episodes_are_rejected_with_the_numbers(fixture) -> None:
    folder, _, _ = fixture
    with pytest.raises(ConfigError, match=r"tasks\.ways=6 is more than the 5 classes of the val split"):
        make(folder, ways=6)
    with pytest.raises(ConfigError, match=r"1 \+ 15 = 16 images per class but .* has 8"):
        MiniImageNet(root=str(folder), cache_dir=str(folder.parent / "cache"))  # query defaults to 15
    with pytest.raises(ConfigError, match=r"tasks\.on_device='gpu'"):
        make(folder, on_device="gpu")
    with pytest.raises(ConfigError, match=r"tasks\.shots=0"):
        make(folder, shots=0)


def test_config_file_names_every_key() -> None:
    text = (REPO / "src" / "metalab" / "configs" / "tasks" / "miniimagenet.yaml").read_text()
    assert text.startswith(
        "# @package _global_\ndefaults:\n  - override /model: conv4\ntasks:\n  _target_: metalab.tasks.episodic.miniimagenet.MiniImageNet\n"
    )
    config = OmegaConf.load(REPO / "src" / "metalab" / "configs" / "tasks" / "miniimagenet.yaml").tasks
    parameters = inspect.signature(MiniImageNet).parameters
    assert set(config) - {"_target_"} == set(parameters) - {"device"}
    assert {k: config[k] for k in parameters if k not in ("device", "root")} == {
        k: p.default for k, p in parameters.items() if k not in ("device", "root")
    }
