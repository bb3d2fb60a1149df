"""Omniglot sampler: the real subset's layout and splits, episodes checked image by image against
the decoded drawings, the cache, the errors, and the config file."""

from __future__ import annotations

import inspect
import io
import itertools
import os
import re
import shutil
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from omegaconf import OmegaConf

from metalab.errors import ConfigError
from metalab.tasks.episodic.episodes import sample_distinct
from metalab.tasks.episodic.omniglot import Omniglot
from metalab.tasks.spec import TaskSpec

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("METALAB_OMNIGLOT") or REPO.parent / "shared" / "data" / "omniglot")
SUBSET = DATA / "images_background_small1.zip"
needs_subset = pytest.mark.skipif(
    not SUBSET.is_file(), reason=f"the Omniglot subset is not at {SUBSET} (set METALAB_OMNIGLOT to its folder)"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def omniglot(cache: Path) -> Omniglot:
    return Omniglot(root=str(SUBSET), cache_dir=str(cache))


@pytest.fixture(scope="module")
def drawing_table(omniglot: Omniglot) -> dict[bytes, list[tuple[int, int, int]]]:
    """Oracle: the bytes of every cached drawing under every rotation -> its (character, drawing, rotation)."""
    table: dict[bytes, list[tuple[int, int, int]]] = {}
    for rotation in range(4):
        rotated = torch.rot90(omniglot.drawings, rotation, dims=(-2, -1)).contiguous()
        for character in range(rotated.shape[0]):
            for drawing in range(rotated.shape[1]):
                table.setdefault(rotated[character, drawing].numpy().tobytes(), []).append(
                    (character, drawing, rotation)
                )
    return table


def locate(image: torch.Tensor, table: dict[bytes, list[tuple[int, int, int]]]) -> list[tuple[int, int, int]]:
    """Every (character, drawing, rotation) whose cached drawing equals ``image`` ([1, H, W] in [0, 1])."""
    pixels = (image[0] * 255).round().to(torch.uint8).contiguous()
    return table.get(pixels.numpy().tobytes(), [])


def write_sets(folder: Path, sets: dict[str, int], as_zip: bool = False, drawings: int = 20) -> None:
    """Synthetic sets in the official layout: {set name: characters}, 2 alphabets each, random strokes."""
    rng = np.random.default_rng(len(sets))
    files: dict[str, bytes] = {}
    for name, characters in sets.items():
        for index in range(characters):
            for drawing in range(drawings):
                pixels = rng.random((105, 105)) > 0.1  # mode "1": black strokes on white
                buffer = io.BytesIO()
                PIL.Image.fromarray(pixels).save(buffer, format="PNG")
                files[f"{name}/alphabet{index % 2}/character{index:02d}/{index:02d}_{drawing:02d}.png"] = (
                    buffer.getvalue()
                )
    for name in sets:
        if as_zip:
            with zipfile.ZipFile(folder / f"{name}.zip", "w") as archive:
                for path, data in files.items():
                    if path.startswith(f"{name}/"):
                        archive.writestr(path, data)
        else:
            for path, data in files.items():
                if path.startswith(f"{name}/"):
                    (folder / path).parent.mkdir(parents=True, exist_ok=True)
                    (folder / path).write_bytes(data)


@needs_subset
def test_reads_the_subset_zip(omniglot: Omniglot, cache: Path) -> None:
    assert len(omniglot.characters) == 136
    assert len({name.split("/")[1] for name in omniglot.characters}) == 5
    assert omniglot.num_classes == 136 * 4 == 544
    assert omniglot.drawings.shape == (136, 20, 28, 28) and omniglot.drawings.dtype == torch.uint8
    assert omniglot.images.shape == (544, 20, 1, 28, 28)
    assert omniglot.input_shape == (1, 28, 28) and omniglot.output_dim == 5
    # Oracle: decode a few drawings straight from the zip; strokes (black in the file) become 255.
    with zipfile.ZipFile(SUBSET) as archive:
        for character in (0, 57, 135):
            name = omniglot.characters[character]
            members = sorted(n for n in archive.namelist() if n.startswith(name + "/") and n.endswith(".png"))
            assert len(members) == 20
            for drawing in (0, 19):
                with PIL.Image.open(io.BytesIO(archive.read(members[drawing]))) as image:
                    expected = 255 - np.asarray(image.convert("L").resize((28, 28), PIL.Image.Resampling.LANCZOS))
                assert np.array_equal(omniglot.drawings[character, drawing].numpy(), expected)
    # The folder holding the zip is found and gives the same data.
    assert torch.equal(Omniglot(root=str(SUBSET.parent), cache_dir=str(cache)).drawings, omniglot.drawings)


@needs_subset
def test_episode_shapes_dtypes_and_range(omniglot: Omniglot, cache: Path) -> None:
    batch = omniglot.sample(8, "train", omniglot.generator(0))
    assert batch.x_support.shape == (8, 5, 1, 28, 28) and batch.x_query.shape == (8, 5, 1, 28, 28)
    assert batch.y_support.shape == (8, 5) and batch.y_query.shape == (8, 5)
    assert batch.x_support.dtype == torch.float32 and batch.y_support.dtype == torch.long
    assert 0.0 <= float(batch.x_support.min()) and float(batch.x_support.max()) <= 1.0
    assert float(batch.x_support.mean()) < 0.5  # strokes are 1 on a background of 0
    assert all(t.is_contiguous() for t in (batch.x_support, batch.y_support, batch.x_query, batch.y_query))
    wide = Omniglot(root=str(SUBSET), cache_dir=str(cache), ways=20, shots=5)  # query defaults to shots
    assert wide.sample(2, "train", wide.generator(0)).x_query.shape == (2, 100, 1, 28, 28)
    held_out = Omniglot(root=str(SUBSET), cache_dir=str(cache), shots=1, query=2, eval_shots=5, eval_query=3)
    assert held_out.sample(2, "train", held_out.generator(0)).x_query.shape == (2, 10, 1, 28, 28)
    test = held_out.sample(2, "test", held_out.generator(0))
    assert test.x_support.shape == (2, 25, 1, 28, 28) and test.x_query.shape == (2, 15, 1, 28, 28)


@needs_subset
def test_the_spec_from_the_config_alone_is_the_built_samplers(cache: Path) -> None:
    keys = {"root": str(SUBSET), "cache_dir": str(cache), "ways": 3, "shots": 2, "image_size": 20, "rotations": False}
    built = Omniglot(**keys).spec
    assert Omniglot.describe(**{**keys, "root": "no/such/data"}) == built  # the data's location plays no part
    assert built.input_shape == (1, 20, 20) and built.output_dim == 3 and built.metric_name == "accuracy"
    assert TaskSpec.from_state_dict(built.state_dict()) == built


@needs_subset
@pytest.mark.parametrize(("split", "ways", "shots", "query", "tasks"), [("train", 5, 1, 2, 16), ("val", 20, 2, 3, 3)])
def test_episodes_match_the_drawings(omniglot, cache, drawing_table, split, ways, shots, query, tasks) -> None:
    sampler = Omniglot(root=str(SUBSET), cache_dir=str(cache), ways=ways, shots=shots, query=query)
    batch = sampler.sample(tasks, split, sampler.generator(3))
    allowed = {omniglot.characters.index(name) for name in sampler.split_characters[split]}
    for task in range(tasks):
        assert torch.bincount(batch.y_support[task], minlength=ways).tolist() == [shots] * ways
        assert torch.bincount(batch.y_query[task], minlength=ways).tolist() == [query] * ways
        classes = []
        for label in range(ways):
            support = batch.x_support[task][batch.y_support[task] == label]
            images = torch.cat([support, batch.x_query[task][batch.y_query[task] == label]])
            assert len(images) == shots + query
            matches = [locate(image, drawing_table) for image in images]
            assert all(matches), "an episode image is none of the cached drawings under any rotation"
            # One character under one rotation for the whole class (the class identity) ...
            identities = set.intersection(*({(c, r) for c, _, r in m} for m in matches))
            assert len(identities) == 1
            ((character, rotation),) = identities
            assert character in allowed
            # ... and K + Q different drawings of it, so support and query share none.
            drawings = {d for m in matches for c, d, r in m if (c, r) == (character, rotation)}
            assert len(drawings) == shots + query
            classes.append((character, rotation))
        assert len(set(classes)) == ways


@needs_subset
def test_labels_are_a_random_permutation_per_task(omniglot: Omniglot, drawing_table) -> None:
    batch = omniglot.sample(200, "train", omniglot.generator(1))
    label_of_smallest, rotations = Counter(), Counter()
    for task in range(200):
        class_ids = {}
        for image, label in zip(batch.x_support[task], batch.y_support[task].tolist()):
            character, _, rotation = locate(image, drawing_table)[0]
            class_ids[label] = rotation * 136 + character
            rotations[rotation] += 1
        label_of_smallest[min(class_ids, key=class_ids.get)] += 1
    # The class with the smallest id gets each label about 1/5 of the time, not always label 0.
    assert set(label_of_smallest) == set(range(5)) and max(label_of_smallest.values()) < 80
    assert set(rotations) == {0, 1, 2, 3}
    for y in (batch.y_support, batch.y_query):  # examples are shuffled: any label comes first
        first = Counter(y[:, 0].tolist())
        assert set(first) == set(range(5)) and max(first.values()) < 70


@needs_subset
def test_maml_split_is_proportional_and_disjoint(omniglot: Omniglot, cache: Path) -> None:
    parts = {name: set(chars) for name, chars in omniglot.split_characters.items()}
    train_val = round(136 * 1200 / 1623)
    val = round(136 * 100 / 1623)
    sizes = (len(parts["train"]), len(parts["val"]), len(parts["test"]))
    assert sizes == (train_val - val, val, 136 - train_val) == (93, 8, 35)
    for one, other in itertools.combinations(parts.values(), 2):
        assert not one & other
    assert parts["train"] | parts["val"] | parts["test"] == set(omniglot.characters)
    assert len({name.split("/")[1] for name in parts["train"]}) == 5  # chosen regardless of alphabet
    for split in ("train", "val", "test"):  # every rotation of a character stays in its split
        assert omniglot.split_classes[split].numel() == 4 * len(parts[split])
    reseeded = Omniglot(root=str(SUBSET), cache_dir=str(cache), split_seed=1)
    assert set(reseeded.split_characters["train"]) != parts["train"]


@needs_subset
def test_sampling_is_deterministic_under_a_seed(omniglot: Omniglot) -> None:
    first, again, other = (omniglot.sample(4, "train", omniglot.generator(seed)) for seed in (7, 7, 8))
    for name in ("x_support", "y_support", "x_query", "y_query"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.x_support, other.x_support)
    assert omniglot.to("cpu") is omniglot


@needs_subset
def test_second_start_reads_the_cache(omniglot: Omniglot, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image although the cache holds them")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    start = time.perf_counter()
    again = Omniglot(root=str(SUBSET), cache_dir=str(cache))
    assert time.perf_counter() - start < 2.0
    assert torch.equal(again.drawings, omniglot.drawings) and again.characters == omniglot.characters


def test_stale_or_corrupt_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_sets(tmp_path, {"images_background": 6}, as_zip=True)
    source, cache_dir = tmp_path / "images_background.zip", tmp_path / "cache"
    opened: list[int] = []
    real_open = PIL.Image.open

    def counting_open(*args, **kwargs):
        opened.append(1)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)

    def build() -> tuple[torch.Tensor, int]:
        before = len(opened)
        drawings = Omniglot(root=str(source), cache_dir=str(cache_dir), ways=2).drawings
        return drawings, len(opened) - before

    first, decoded = build()
    assert first.shape == (6, 20, 28, 28) and decoded == 120
    assert build()[1] == 0
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))  # the source changed: stale
    drawings, decoded = build()
    assert decoded == 120 and torch.equal(drawings, first)
    (cached,) = cache_dir.glob("omniglot-*.pt")
    cached.write_bytes(b"not a torch file")
    drawings, decoded = build()
    assert decoded == 120 and torch.equal(drawings, first)
    assert build()[1] == 0 and len(list(cache_dir.iterdir())) == 1  # rewritten in place, no temporary left


def test_background_evaluation_split(tmp_path: Path) -> None:
    write_sets(tmp_path, {"images_background": 12, "images_evaluation": 6})
    write_sets(tmp_path, {"images_background": 12}, as_zip=True)  # the zip the folder came from
    sampler = Omniglot(root=str(tmp_path), cache_dir=str(tmp_path / "cache"), ways=3, split="background_evaluation")
    assert len(sampler.characters) == 18  # the zip beside its extracted folder is not read twice
    parts = sampler.split_characters
    assert len(parts["val"]) == round(12 * 100 / 1200) and len(parts["train"]) == 11
    assert all(name.startswith("images_background/") for name in parts["train"] + parts["val"])
    assert sorted(parts["test"]) == sorted(n for n in sampler.characters if n.startswith("images_evaluation/"))
    with pytest.raises(ConfigError, match="background_evaluation"):
        only_background = str(tmp_path / "images_background")
        Omniglot(root=only_background, cache_dir=str(tmp_path / "cache"), ways=3, split="background_evaluation")


@pytest.mark.parametrize(("rows", "calls"), [(30, 1000), (30000, 1)])
def test_sample_distinct_is_uniform(rows: int, calls: int) -> None:
    # Few rows take the top-k of random keys, many rows rejection (see sample_distinct); either
    # way every ordered pair of distinct values must be equally likely.
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([sample_distinct((rows,), 6, 2, generator) for _ in range(calls)])
    assert (drawn[:, 0] != drawn[:, 1]).all() and drawn.min() >= 0 and drawn.max() < 6
    counts = torch.bincount(drawn[:, 0] * 6 + drawn[:, 1], minlength=36)
    pairs = counts[[a * 6 + b for a in range(6) for b in range(6) if a != b]].float()
    assert (pairs - 1000).abs().max() < 150  # 30,000 draws over 30 pairs: 1000 each, std 31


@needs_subset
def test_bad_configs_are_rejected_with_the_numbers(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tasks\.ways=33 .* 32 classes of the val split"):
        Omniglot(root=str(SUBSET), cache_dir=str(cache), ways=33)
    with pytest.raises(ConfigError, match=r"10 \+ 11 = 21 .* has 20"):
        Omniglot(root=str(SUBSET), cache_dir=str(cache), shots=10, query=11)
    with pytest.raises(ConfigError, match="background_evaluation"):
        Omniglot(root=str(SUBSET), cache_dir=str(cache), split="background_evaluation")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ways", 1),
        ("shots", 0),
        ("query", 0),
        ("eval_shots", 0),
        ("eval_query", -1),
        ("image_size", 0),
        ("split", "random"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"tasks\.{key}="):
        Omniglot(root=str(tmp_path), **{key: value})


def test_missing_data_says_where_it_looked_and_what_to_do(tmp_path: Path) -> None:
    where = re.escape(str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=rf"No Omniglot images found at {where}.*tasks\.download=true"):
        Omniglot(root=str(tmp_path / "absent"))
    try:
        import torchvision  # noqa: F401  (with it, download=true would go to the network)
    except Exception:
        with pytest.raises(ConfigError, match="pip install torchvision"):
            Omniglot(root=str(tmp_path / "absent"), download=True)


def test_corrupt_drawing_is_named(tmp_path: Path) -> None:
    write_sets(tmp_path, {"images_background": 2})
    broken = next((tmp_path / "images_background").glob("*/*/*.png"))
    broken.write_bytes(b"\x89PNG but not really")
    with pytest.raises(ConfigError, match=rf"Could not decode the image {re.escape(str(broken))}"):
        Omniglot(root=str(tmp_path), cache_dir=str(tmp_path / "cache"), ways=2)


def test_config_file_names_every_key(tmp_path: Path) -> None:
    text = (REPO / "src" / "metalab" / "configs" / "tasks" / "omniglot.yaml").read_text()
    assert text.startswith(
        "# @package _global_\ndefaults:\n  - override /model: conv4\ntasks:\n  _target_: metalab.tasks.episodic.omniglot.Omniglot\n"
    )
    config = OmegaConf.load(REPO / "src" / "metalab" / "configs" / "tasks" / "omniglot.yaml").tasks
    keys = set(inspect.signature(Omniglot).parameters) - {"device"}
    assert set(config) - {"_target_"} == keys
    defaults = {k: p.default for k, p in inspect.signature(Omniglot).parameters.items() if k in keys - {"root"}}
    assert {k: config[k] for k in defaults} == defaults


def test_config_composes_and_instantiates(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    # A stand-in primary config: the tasks file must switch the model group to conv4.
    (tmp_path / "tasks").mkdir()
    (tmp_path / "model").mkdir()
    shutil.copy(REPO / "src" / "metalab" / "configs" / "tasks" / "omniglot.yaml", tmp_path / "tasks")
    (tmp_path / "model" / "mlp.yaml").write_text("name: mlp\n")
    (tmp_path / "model" / "conv4.yaml").write_text("name: conv4\n")
    (tmp_path / "train.yaml").write_text("defaults:\n  - model: mlp\n  - tasks: omniglot\n  - _self_\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        config = compose(config_name="train", overrides=["tasks.ways=20", f"tasks.cache_dir={cache}"])
    assert config.model.name == "conv4" and config.tasks.ways == 20
    monkeypatch.delenv("METALAB_OMNIGLOT", raising=False)
    monkeypatch.chdir(REPO)
    if not (REPO / config.tasks.root).exists():
        pytest.skip(f"the Omniglot subset is not at {REPO / config.tasks.root}")
    sampler = instantiate(config.tasks, device="cpu")
    assert isinstance(sampler, Omniglot) and sampler.output_dim == 20
