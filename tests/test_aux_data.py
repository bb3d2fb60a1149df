"""Data with auxiliary tasks on real data (Omniglot, MNIST) and the synthetic MiniImageNet: splits,
views, targets and per-example losses against oracles computed here, independently."""

from __future__ import annotations

import io
import zipfile
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from metalab.errors import ConfigError
from metalab.tasks.auxiliary.miniimagenet import AuxMiniImageNet
from metalab.tasks.auxiliary.mnist import AuxMNIST
from metalab.tasks.auxiliary.omniglot import AuxOmniglot
from metalab.tasks.io.mnist import read_idx
from tests.helpers.configs import MNIST, OMNIGLOT

OMNIGLOT_ZIP = OMNIGLOT / "images_background_small1.zip"
SPLITS = ("train", "unlabelled", "aux", "val", "test")


def names(tasks) -> list[str]:
    return [task.name for task in tasks.aux_tasks]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def omniglot(cache):
    if not OMNIGLOT_ZIP.is_file():
        pytest.skip(f"the Omniglot subset is not at {OMNIGLOT_ZIP} (set METALAB_OMNIGLOT to its folder)")
    return AuxOmniglot(root=str(OMNIGLOT), cache_dir=str(cache), shots=2, aux_shots=1, val_shots=3, test_shots=4)


@pytest.fixture(scope="module")
def mnist():
    if not MNIST.is_dir():
        pytest.skip(f"the MNIST subset is not at {MNIST} (set METALAB_MNIST to its folder)")
    return AuxMNIST(root=str(MNIST), shots=3, aux_shots=4, val_shots=20)


@pytest.fixture(scope="module")
def miniimagenet(image_data):
    root, cache_dir = (item.split("=", 1)[1] for item in image_data["miniimagenet"][:2])
    return AuxMiniImageNet(
        root=root,
        cache_dir=cache_dir,
        image_size=28,
        shots=2,
        aux_shots=1,
        val_shots=1,
        test_shots=2,
        auxiliaries=["rotation", "random"],
        aux_batch_size=5,
    )


def disk_drawings() -> dict[tuple[str, str], list[str]]:
    """(alphabet folder, character folder) -> its drawings' names in the zip, read here with zipfile."""
    with zipfile.ZipFile(OMNIGLOT_ZIP) as archive:
        names = [n for n in archive.namelist() if n.endswith(".png")]
    drawings: dict[tuple[str, str], list[str]] = {}
    for name in names:
        _, alphabet, character, _ = name.split("/")
        drawings.setdefault((alphabet, character), []).append(name)
    return drawings


def check_splits(tasks, per_class: dict[str, int], classes: int, total: int):
    """Every split holds per_class[split] examples of each class, the splits are disjoint and cover
    all ``total`` examples; counted here with a Counter over the labels."""
    ids = {split: tasks.splits[split].tolist() for split in SPLITS}
    for split, size in per_class.items():
        counts = Counter(tasks.labels[tasks.splits[split]].tolist())
        assert sorted(counts) == list(range(classes)) and set(counts.values()) == {size}, split
    seen = [i for split in SPLITS for i in ids[split]]
    assert len(seen) == len(set(seen)) == total


def test_omniglot_splits_have_their_sizes_per_character_and_are_disjoint(omniglot, cache):
    characters, drawings = 136, 20
    check_splits(omniglot, {"train": 2, "aux": 1, "val": 3, "test": 4}, characters, characters * drawings)
    assert omniglot.split_size("unlabelled") == characters * (drawings - 2 - 1 - 3 - 4)
    # test, val and aux drawings do not depend on shots; the same split_seed gives the same splits
    five = AuxOmniglot(root=str(OMNIGLOT), cache_dir=str(cache), shots=5, aux_shots=1, val_shots=3, test_shots=4)
    for split in ("aux", "val", "test"):
        assert torch.equal(five.splits[split], omniglot.splits[split])
    assert set(omniglot.splits["train"].tolist()) < set(five.splits["train"].tolist())
    other = AuxOmniglot(
        root=str(OMNIGLOT), cache_dir=str(cache), shots=2, aux_shots=1, val_shots=3, test_shots=4, split_seed=1
    )
    assert not torch.equal(other.splits["test"], omniglot.splits["test"])


def test_omniglot_alphabet_labels_and_pixels_match_the_folders_on_disk(omniglot):
    on_disk = disk_drawings()
    assert len({alphabet for alphabet, _ in on_disk}) == omniglot.aux_tasks[0].width == 5
    batch = omniglot.sample(40, "train", omniglot.generator(3))
    column = names(omniglot).index("alphabet")
    labelled = torch.nonzero(batch.y >= 0).flatten().tolist()
    assert len(labelled) == 20  # labelled_fraction 0.5
    assert (batch.aux_y[batch.y < 0, column] == -1).all()  # no alphabet where the character is hidden
    with zipfile.ZipFile(OMNIGLOT_ZIP) as archive:
        for i in labelled:
            _, alphabet, character = omniglot.characters[batch.y[i]].split("/")
            assert omniglot.alphabets[batch.aux_y[i, column]].split("/")[-1] == alphabet
            # the drawing is one of that folder's files, decoded here with PIL
            candidates = []
            for name in on_disk[(alphabet, character)]:
                image = (
                    Image.open(io.BytesIO(archive.read(name))).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
                )
                candidates.append(torch.from_numpy(255 - np.asarray(image, dtype=np.float32)) / 255)
            distances = [(batch.x[0, i, 0] - c).abs().max().item() for c in candidates]
            assert min(distances) < 1e-6, (i, alphabet, character)


@pytest.mark.parametrize("data", ["omniglot", "mnist", "miniimagenet"])
def test_rotation_view_is_torch_rot90_of_the_inputs(data, request):
    tasks = request.getfixturevalue(data)
    batch = tasks.sample(32, "train", tasks.generator(0))
    task = tasks.aux_tasks[names(tasks).index("rotation")]
    turns = batch.aux_y[:, names(tasks).index("rotation")]
    assert batch.x.shape == (2, 32, *tasks.input_shape) and task.view == 1
    assert set(turns.tolist()) == {0, 1, 2, 3}
    for i in range(32):
        assert torch.equal(batch.x[1, i], torch.rot90(batch.x[0, i], int(turns[i]), dims=(-2, -1)))


@pytest.mark.parametrize("data", ["omniglot", "mnist", "miniimagenet"])
def test_random_labels_are_fixed_per_example_across_batches(data, request):
    tasks = request.getfixturevalue(data)
    column = names(tasks).index("random")
    generator = tasks.generator(5)
    label_of: dict[bytes, int] = {}
    repeats = 0
    for _ in range(30):
        batch = tasks.sample(64, "train", generator)
        for x, label in zip(batch.x[0], batch.aux_y[:, column].tolist()):
            key = x.numpy().tobytes()
            repeats += key in label_of
            assert label_of.setdefault(key, label) == label
    assert repeats > 100 and len(set(label_of.values())) > 1
    assert all(0 <= label < tasks.aux_tasks[column].width for label in label_of.values())


@pytest.mark.parametrize("data", ["omniglot", "mnist", "miniimagenet"])
def test_example_losses_equal_an_explicit_loop(data, request):
    tasks = request.getfixturevalue(data)
    batch = tasks.sample(12, "train", tasks.generator(1))
    outputs = torch.randn(batch.x.shape[0], 12, tasks.output_dim, generator=torch.Generator().manual_seed(0))
    main, aux = tasks.example_losses(outputs, batch)
    heads = tasks.head_slices
    for i in range(12):
        expected = F.cross_entropy(outputs[0, i, heads[0]], batch.y[i]).item() if batch.y[i] >= 0 else 0.0
        assert main[i].item() == pytest.approx(expected, abs=1e-5)
        for k, task in enumerate(tasks.aux_tasks):
            target = batch.aux_y[i, k]
            expected = F.cross_entropy(outputs[task.view, i, heads[k + 1]], target).item() if target >= 0 else 0.0
            assert aux[i, k].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("data", ["omniglot", "mnist", "miniimagenet"])
def test_batches_are_deterministic_and_hold_the_aux_split(data, request):
    tasks = request.getfixturevalue(data)
    first, second = (tasks.sample(16, "train", tasks.generator(7)) for _ in range(2))
    for name in ("x", "y", "aux_y", "x_aux", "y_aux"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert first.x_aux.shape == (tasks.aux_batch_size, *tasks.input_shape)
    aux_pixels = {
        x.numpy().tobytes(): int(y)
        for x, y in zip(tasks._inputs(tasks.splits["aux"]), tasks.labels[tasks.splits["aux"]])
    }
    assert all(aux_pixels.get(x.numpy().tobytes()) == int(y) for x, y in zip(first.x_aux, first.y_aux))


def test_an_evaluation_batch_as_large_as_its_split_is_the_whole_split_once(omniglot, mnist):
    for tasks, split in ((omniglot, "test"), (omniglot, "val"), (mnist, "val")):
        size = tasks.split_size(split)
        batch = tasks.sample(size + 50, split, tasks.generator(0))
        assert batch.x.shape[:2] == (1, size) and batch.x_aux.shape[0] == 0
        expected = sorted(x.numpy().tobytes() for x in tasks._inputs(tasks.splits[split]))
        assert sorted(x.numpy().tobytes() for x in batch.x[0]) == expected
        assert (batch.aux_y == -1).all()


def test_mnist_splits_per_digit_and_test_is_the_t10k_file(mnist):
    check_splits(mnist, {"train": 3, "aux": 4, "val": 20}, 10, 5000)
    assert mnist.split_size("unlabelled") == 4000 - 10 * (3 + 4 + 20)
    images = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    test = mnist.splits["test"]
    assert torch.equal((mnist.images[test, 0] * 255).round().to(torch.uint8), torch.from_numpy(images))
    assert torch.equal(mnist.labels[test], torch.from_numpy(labels).long())


def test_miniimagenet_splits_per_class(miniimagenet):
    from tests.helpers.images import CLASSES, PER_CLASS

    classes = sum(CLASSES.values())
    check_splits(miniimagenet, {"train": 2, "aux": 1, "val": 1, "test": 2}, classes, classes * PER_CLASS)
    assert miniimagenet.input_shape == (3, 28, 28) and miniimagenet.output_dim == classes + 4 + classes


def test_bad_inputs_are_one_sentence_before_any_work(tmp_path, image_data):
    missing = tmp_path / "nothing"
    with pytest.raises(ConfigError, match="tasks.shots=6 is invalid; set it to an integer from 1 to 5"):
        AuxOmniglot(root=str(missing), shots=6)  # refused before looking for the data
    with pytest.raises(ConfigError, match="tasks.shots=0 is invalid"):
        AuxOmniglot(root=str(missing), shots=0)
    with pytest.raises(ConfigError, match="No Omniglot images found"):
        AuxOmniglot(root=str(missing), cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="MNIST's train-images-idx3-ubyte.*is not in"):
        AuxMNIST(root=str(missing))
    with pytest.raises(ConfigError, match="No MiniImageNet found"):
        AuxMiniImageNet(root=str(missing), cache_dir=str(tmp_path))
    root, cache_dir = (item.split("=", 1)[1] for item in image_data["miniimagenet"][:2])
    with pytest.raises(ConfigError, match=r"= 70 examples per class but MiniImageNet .* has only 8"):
        AuxMiniImageNet(root=root, cache_dir=cache_dir, image_size=28)
    with pytest.raises(ConfigError, match="tasks.auxiliaries names 'alphabet'.*choose among rotation, random"):
        AuxMiniImageNet(
            root=root,
            cache_dir=cache_dir,
            image_size=28,
            shots=1,
            aux_shots=1,
            val_shots=1,
            test_shots=1,
            auxiliaries=["alphabet"],
        )


@pytest.mark.skipif(not OMNIGLOT_ZIP.is_file(), reason=f"the Omniglot subset is not at {OMNIGLOT_ZIP}")
def test_omniglot_too_few_drawings_for_the_splits(cache):
    with pytest.raises(
        ConfigError, match=r"= 23 examples per class but Omniglot \(20 drawings per character\) has only 20"
    ):
        AuxOmniglot(root=str(OMNIGLOT), cache_dir=str(cache), shots=5, aux_shots=3, val_shots=5, test_shots=10)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["aux_omniglot", "aux_mnist", "aux_miniimagenet"])
def test_each_sampler_trains_two_iterations_with_auxilearn(data, tiny_config, image_task_overrides, tmp_path):
    """Through the trainer (algo=auxilearn is the default of these configs), with a hypergradient
    step at each iteration; the combiners are tested on the toy (test_auxilearn.py)."""
    overrides = [f"tasks={data}", "algo.update_every=1", "model.hidden_channels=4", "model.blocks=2"]
    cfg = tiny_config(*overrides, *image_task_overrides(overrides))
    from metalab.app.build import make_trainer

    results = make_trainer(cfg, tmp_path).fit()
    assert results["status"] == "completed" and results["iteration"] == 2
    assert 0 <= results["test"]["accuracy"]["mean"] <= 1
