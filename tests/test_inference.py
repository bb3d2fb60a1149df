"""The trained-model API: load_learner adapts to new tasks and predicts, from any directory and
without the training data; every bad input is one sentence; evaluate.py re-tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torch.func import vmap

import metalab
from metalab.app.build import make_trainer
from metalab.checkpoint import CHECKPOINT
from metalab.inference import Learner, load_run
from metalab.tasks.episodic.episodes import ImageEpisodes
from tests.helpers.configs import OMNIGLOT, TINY, compose_config

ROOT = Path(__file__).resolve().parents[1]
SUBSET = OMNIGLOT / "images_background_small1.zip"


@pytest.fixture(scope="module")
def omniglot_run(tmp_path_factory, image_data):
    if not SUBSET.is_file():
        pytest.skip(f"the Omniglot subset is not at {SUBSET} (set METALAB_OMNIGLOT to its folder)")
    run_dir = tmp_path_factory.mktemp("omniglot_run")
    cfg = compose_config(
        [
            *TINY,
            "tasks=omniglot",
            *image_data["omniglot"],
            "trainer.iterations=40",
            "trainer.meta_batch_size=8",
            "algo.inner_lr=0.4",
            "algo.eval_inner_steps=3",
            "trainer.eval_every=0",
        ]
    )
    make_trainer(cfg, run_dir).fit()
    return run_dir


def moved_without_data(run_dir: Path, destination: Path) -> Path:
    """The run directory copied to ``destination``, its saved config's data root and cache pointing nowhere."""
    shutil.copytree(run_dir, destination)
    state = torch.load(destination / CHECKPOINT, weights_only=False)  # best.pt holds only the weights
    state["config"]["tasks"].update(root="no/such/data", cache_dir=str(destination / "no-such-cache"))
    torch.save(state, destination / CHECKPOINT)
    return destination


def without_data(monkeypatch: pytest.MonkeyPatch, elsewhere: Path) -> None:
    """Work from another directory, and fail the test at any attempt to build an image sampler."""
    monkeypatch.chdir(elsewhere)

    def refuse(*args, **kwargs):
        raise AssertionError("load_learner built a task sampler (read the data set)")

    monkeypatch.setattr(ImageEpisodes, "__init__", refuse)


@pytest.fixture(scope="module")
def omniglot_learner(omniglot_run, tmp_path_factory):
    """The Omniglot run, moved, its data root pointing nowhere, loaded from another directory."""
    moved = moved_without_data(omniglot_run, tmp_path_factory.mktemp("moved") / "run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        without_data(monkeypatch, tmp_path_factory.mktemp("elsewhere"))
        return metalab.load_learner(moved, device="cpu")


@pytest.fixture(scope="module")
def omniglot_batch(omniglot_run):
    """24 test episodes, and the oracle: the run's algorithm loaded with its data, vmapped evaluation."""
    tasks, algorithm, _ = load_run(omniglot_run, "cpu")
    batch = tasks.sample(24, "test", tasks.generator(7))
    return batch, algorithm


@pytest.mark.slow
def test_adapting_without_the_data_equals_the_vmapped_evaluation(omniglot_learner, omniglot_batch):
    batch, algorithm = omniglot_batch
    learner = omniglot_learner
    logits, accuracies, unadapted = [], [], []
    for t in range(batch.num_tasks):
        adapted = learner.adapt(batch.x_support[t], batch.y_support[t])
        logits.append(adapted.logits(batch.x_query[t]))
        accuracies.append((torch.tensor(adapted.predict(batch.x_query[t])) == batch.y_query[t]).float().mean())
        before = learner.adapt(batch.x_support[t], batch.y_support[t], steps=0)
        unadapted.append((torch.tensor(before.predict(batch.x_query[t])) == batch.y_query[t]).float().mean())
    accuracies = torch.stack(accuracies)
    # oracles: the algorithm loaded the usual way (sampler and data), adapting all tasks at once under vmap
    torch.testing.assert_close(accuracies, algorithm.evaluate(batch)["accuracy"])
    steps = algorithm.eval_inner_steps

    def per_task(x_support, y_support, x_query):
        return algorithm.predict(
            algorithm.adapt(algorithm.initial_params(), x_support, y_support, steps), x_query, x_support
        )

    with torch.no_grad():
        expected = vmap(per_task)(batch.x_support, batch.y_support, batch.x_query)
    torch.testing.assert_close(torch.stack(logits), expected, atol=1e-4, rtol=1e-4)
    assert accuracies.mean() > 0.2 + 0.15, accuracies.mean()  # 5-way chance is 0.2
    assert accuracies.mean() > torch.stack(unadapted).mean() + 0.1


@pytest.mark.slow
def test_one_query_at_a_time_equals_all_at_once(omniglot_learner, omniglot_batch, omniglot_run):
    batch, _ = omniglot_batch
    adapted = omniglot_learner.adapt(batch.x_support[0], batch.y_support[0])
    x_query = batch.x_query[0]
    together = adapted.logits(x_query)
    one_by_one = torch.cat([adapted.logits(x_query[i : i + 1]) for i in range(len(x_query))])
    torch.testing.assert_close(one_by_one, together, atol=1e-5, rtol=1e-5)
    assert adapted.predict(x_query) == [p for i in range(len(x_query)) for p in adapted.predict(x_query[i : i + 1])]
    # the same check fails under the transductive protocol (statistics of the query batch): it can fail
    spec, transductive, _ = load_run(omniglot_run, "cpu", ["model.norm=transductive"], data=False)
    other = Learner(transductive, spec).adapt(batch.x_support[0], batch.y_support[0])
    single = torch.cat([other.logits(x_query[i : i + 1]) for i in range(len(x_query))])
    assert (single - other.logits(x_query)).abs().max() > 1e-2


@pytest.mark.slow
def test_image_paths_get_the_training_preprocessing_and_named_labels(omniglot_learner, tmp_path):
    learner = omniglot_learner
    with zipfile.ZipFile(SUBSET) as archive:
        members = sorted(n for n in archive.namelist() if n.endswith(".png"))
        characters = sorted({m.rsplit("/", 1)[0] for m in members})[:5]
        support, query = [], []
        for character in characters:
            drawings = [m for m in members if m.startswith(character + "/")][:2]
            for member, bucket in zip(drawings, (support, query)):
                path = tmp_path / member.replace("/", "_")
                path.write_bytes(archive.read(member))
                bucket.append(path)
    # oracle: PIL by hand, as the data set was built (grey, Lanczos to 28x28, strokes = 1)
    with PIL.Image.open(support[0]) as image:
        expected = (
            1 - np.asarray(image.convert("L").resize((28, 28), PIL.Image.Resampling.LANCZOS), dtype=np.float32) / 255
        )
    torch.testing.assert_close(learner.examples(support[:1])[0, 0], torch.from_numpy(expected), atol=1e-6, rtol=0)
    names = [c.rsplit("/", 1)[-1] for c in characters]
    adapted = learner.adapt(support, names)
    predicted = adapted.predict(query)
    assert len(predicted) == 5 and set(predicted) <= set(names)
    assert adapted.logits(query).shape == (5, 5)
    # a label order that sorts differently maps to the same classes: the same logits, permuted
    shuffled = learner.adapt(support[::-1], names[::-1])
    assert shuffled.predict(query) == predicted


@pytest.mark.slow
def test_miniimagenet_learner_keeps_the_training_normalisation_without_the_data(
    image_data, tmp_path_factory, monkeypatch, tmp_path
):
    from tests.helpers.images import CLASSES, PER_CLASS

    run_dir = tmp_path_factory.mktemp("mini_run")
    make_trainer(
        compose_config(
            [
                *TINY,
                "tasks=miniimagenet",
                *image_data["miniimagenet"],
                "model.hidden_channels=4",
                "trainer.eval_tasks=0",
                "trainer.test_tasks=0",
            ]
        ),
        run_dir,
    ).fit()
    root = Path(next(o for o in image_data["miniimagenet"] if o.startswith("tasks.root=")).split("=", 1)[1])
    tasks, algorithm, _ = load_run(run_dir, "cpu")
    batch = tasks.sample(3, "test", tasks.generator(0))
    without_data(monkeypatch, tmp_path)
    learner = metalab.load_learner(moved_without_data(run_dir, tmp_path_factory.mktemp("moved") / "run"), device="cpu")

    # oracle for the preprocessing: PIL and numpy by hand (JPEG decoded at reduced scale, Lanczos to
    # 28x28), normalised with the statistics of the training images at that size
    def pixels(path: Path) -> np.ndarray:
        with PIL.Image.open(path) as image:
            image.draft("RGB", (28, 28))
            return (
                np.asarray(image.convert("RGB").resize((28, 28), PIL.Image.Resampling.LANCZOS), dtype=np.float64) / 255
            )

    files = sorted((root / "images").glob("ntrain*.jpg"))
    assert len(files) == CLASSES["train"] * PER_CLASS
    train = np.stack([pixels(f) for f in files])
    mean, std = train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))
    expected = torch.from_numpy(((pixels(files[0]) - mean) / std).transpose(2, 0, 1)).float()
    torch.testing.assert_close(learner.examples(files[:1])[0], expected, atol=1e-4, rtol=0)
    accuracies = [
        (
            torch.tensor(learner.adapt(batch.x_support[t], batch.y_support[t]).predict(batch.x_query[t]))
            == batch.y_query[t]
        )
        .float()
        .mean()
        for t in range(3)
    ]
    torch.testing.assert_close(torch.stack(accuracies), algorithm.evaluate(batch)["accuracy"])


def test_a_run_saved_before_checkpoints_kept_the_task_spec_loads_from_its_config(
    omniglot_run, omniglot_batch, tmp_path, monkeypatch
):
    moved = moved_without_data(omniglot_run, tmp_path / "run")
    state = torch.load(moved / CHECKPOINT, weights_only=False)
    del state["task_spec"]
    torch.save(state, moved / CHECKPOINT)
    batch, algorithm = omniglot_batch
    without_data(monkeypatch, tmp_path)
    learner = metalab.load_learner(moved, device="cpu")
    assert learner.spec == algorithm.tasks.spec
    accuracy = (
        (
            torch.tensor(learner.adapt(batch.x_support[0], batch.y_support[0]).predict(batch.x_query[0]))
            == batch.y_query[0]
        )
        .float()
        .mean()
    )
    torch.testing.assert_close(accuracy, algorithm.evaluate(batch)["accuracy"][0])


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sinusoid_run")
    make_trainer(compose_config([*TINY, "trainer.iterations=30"]), run_dir).fit()
    return run_dir


@pytest.mark.slow
def test_regression_learner_adapts(sinusoid_run):
    learner = metalab.load_learner(sinusoid_run, device="cpu")
    tasks, algorithm, _ = load_run(sinusoid_run, "cpu")
    batch = tasks.sample(16, "test", tasks.generator(0))
    errors = {0: [], 10: [], None: []}
    for t in range(16):
        for steps in errors:
            predicted = learner.adapt(batch.x_support[t], batch.y_support[t], steps=steps).predict(batch.x_query[t])
            errors[steps].append(((predicted - batch.y_query[t]) ** 2).mean())
    assert torch.stack(errors[10]).mean() < torch.stack(errors[0]).mean()
    # oracle: the vmapped evaluation of the same episodes (after eval_inner_steps, the default)
    torch.testing.assert_close(torch.stack(errors[None]), algorithm.evaluate(batch)["mse"])
    # targets [N, 1] are the same targets as [N]
    column = learner.adapt(batch.x_support[0], batch.y_support[0].unsqueeze(-1)).predict(batch.x_query[0])
    torch.testing.assert_close(column, learner.adapt(batch.x_support[0], batch.y_support[0]).predict(batch.x_query[0]))


def _images(n=5, ways=5):
    x = torch.rand(n, 1, 28, 28)
    return x, torch.arange(n) % ways


def _nan(x):
    x = x.clone()
    x[2, 0, 3, 3] = float("nan")
    return x


_X, _Y = _images()
_XR, _YR = torch.rand(6, 1), torch.rand(6)

#: (learner, bad call, a fragment of the one sentence it must raise)
BAD_CALLS = {
    "fewer classes than ways": (
        "omniglot",
        lambda L: L.adapt(_X[:3], [0, 1, 2]),
        "has 3 classes but the model was trained 5-way",
    ),
    "more classes than ways": (
        "omniglot",
        lambda L: L.adapt(torch.rand(6, 1, 28, 28), list(range(6))),
        "has 6 classes",
    ),
    "empty support set": ("omniglot", lambda L: L.adapt(_X[:0], []), "the support set is empty"),
    "empty list of paths": ("omniglot", lambda L: L.adapt([], []), "the support set is empty"),
    "unhashable labels": ("omniglot", lambda L: L.adapt(_X, [[0], [1], [2], [3], [4]]), "label [0] is a list"),
    "labels as one string": ("omniglot", lambda L: L.adapt(_X, "abcde"), "one label per example"),
    "too few labels": ("omniglot", lambda L: L.adapt(_X, [0, 1, 2, 3]), "5 support examples but 4 labels"),
    "NaN support inputs": ("omniglot", lambda L: L.adapt(_nan(_X), _Y), "positions [2] hold NaN or infinite"),
    "infinite support inputs": ("omniglot", lambda L: L.adapt(_X / 0, _Y), "hold NaN or infinite"),
    "support without batch axis": ("omniglot", lambda L: L.adapt(_X[0], _Y), "the model takes [N, 1, 28, 28]"),
    "support of wrong size": ("omniglot", lambda L: L.adapt(_X[:, :, :14], _Y), "have shape [5, 1, 14, 28]"),
    "support not a tensor": ("omniglot", lambda L: L.adapt(42, _Y), "are a int"),
    "missing image file": (
        "omniglot",
        lambda L: L.adapt(["no/such.png"] * 5, _Y.tolist()),
        "Could not decode the image no/such.png",
    ),
    "raw uint8 pixels": ("omniglot", lambda L: L.adapt((_X * 255).to(torch.uint8), _Y), "are uint8 pixels"),
    "array of strings": ("omniglot", lambda L: L.adapt(np.array(["a.png"] * 5), _Y), "array of <U5"),
    "negative steps": ("omniglot", lambda L: L.adapt(_X, _Y, steps=-1), "steps must be an integer >= 0"),
    "fractional steps": ("omniglot", lambda L: L.adapt(_X, _Y, steps=1.5), "steps must be an integer >= 0"),
    "boolean steps": ("omniglot", lambda L: L.adapt(_X, _Y, steps=True), "steps must be an integer >= 0"),
    "query of wrong shape": (
        "omniglot",
        lambda L: L.adapt(_X, _Y).predict(_X[0]),
        "query examples have shape [1, 28, 28]",
    ),
    "NaN query": ("omniglot", lambda L: L.adapt(_X, _Y).predict(_nan(_X)), "query examples at positions [2] hold NaN"),
    "empty query": ("omniglot", lambda L: L.adapt(_X, _Y).logits(_X[:0]), "the query set is empty"),
    "boolean query": ("omniglot", lambda L: L.adapt(_X, _Y).predict(_X > 0.5), "are torch.bool"),
    "targets of wrong shape": ("sinusoid", lambda L: L.adapt(_XR, torch.rand(6, 2)), "targets have shape [6, 2]"),
    "targets one per example too many": (
        "sinusoid",
        lambda L: L.adapt(_XR, torch.rand(12)),
        "6 support examples but 12 labels",
    ),
    "targets not numbers": ("sinusoid", lambda L: L.adapt(_XR, list("abcdef")), "targets are not numbers"),
    "array targets of wrong shape": ("sinusoid", lambda L: L.adapt(_XR, np.ones((6, 3))), "targets have shape [6, 3]"),
    "NaN targets": ("sinusoid", lambda L: L.adapt(_XR, _YR / 0 * 0), "targets hold NaN"),
    "NaN regression inputs": ("sinusoid", lambda L: L.adapt(_XR * float("nan"), _YR), "hold NaN or infinite"),
    "regression inputs without feature axis": ("sinusoid", lambda L: L.adapt(_XR[:, 0], _YR), "the model takes [N, 1]"),
    "paths for a regression task": ("sinusoid", lambda L: L.adapt(["a.png"], [1.0]), "take tensors, not file paths"),
    "regression query of wrong shape": (
        "sinusoid",
        lambda L: L.adapt(_XR, _YR).predict(torch.rand(3, 2)),
        "query examples have shape [3, 2]",
    ),
    "negative steps (regression)": ("sinusoid", lambda L: L.adapt(_XR, _YR, steps=-3), "(got -3)"),
    "no run directory": (
        "sinusoid",
        lambda L: metalab.load_learner("no/such/run"),
        "no/such/run holds no checkpoint.pt",
    ),
    "a torch file that is not a checkpoint": (
        "foreign",
        lambda L: metalab.load_learner(L),
        "is not a metalab checkpoint",
    ),
    "diverging adaptation": ("diverging", lambda L: L.adapt(_XR, _YR * 1e3, steps=50), "adaptation diverged"),
}


@pytest.fixture(scope="module")
def learners(sinusoid_run, tmp_path_factory):
    foreign = tmp_path_factory.mktemp("foreign")
    torch.save({"weights": torch.zeros(3)}, foreign / CHECKPOINT)
    made = {"sinusoid": metalab.load_learner(sinusoid_run, device="cpu"), "foreign": foreign}
    spec, algorithm, _ = load_run(sinusoid_run, "cpu", ["algo.inner_lr=1e30"], data=False)
    made["diverging"] = Learner(algorithm, spec)
    return made


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_is_one_sentence(case, learners, request):
    name, call, fragment = BAD_CALLS[case]
    learner = request.getfixturevalue("omniglot_learner") if name == "omniglot" else learners[name]
    with pytest.raises(metalab.ConfigError) as error:
        call(learner)
    message = str(error.value)
    assert fragment in message and "\n" not in message, message


@pytest.mark.slow
def test_evaluate_script_reproduces_the_runs_test(tmp_path, tiny_config):
    make_trainer(
        tiny_config("trainer.iterations=5", "trainer.test_tasks=8", "trainer.eval_batch_size=8"), tmp_path
    ).fit()
    tested = json.loads((tmp_path / "results.json").read_text())["test"]["mse"]["mean"]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "evaluate.py"),
            str(tmp_path),
            "--split",
            "test",
            "--num-tasks",
            "8",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    again = json.loads((tmp_path / "eval_test.json").read_text())["mse"]["mean"]
    assert again == pytest.approx(tested, rel=1e-6) and "test mse:" in result.stdout
    # a key=value after the options, as the usage line writes it, is applied: no adaptation scores otherwise
    unadapted = tmp_path / "unadapted.json"
    command = [*result.args, "--output", str(unadapted), "algo.eval_inner_steps=0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(unadapted.read_text())["mse"]["mean"] != pytest.approx(again, rel=1e-3)


def test_a_run_saved_before_model_norm_existed_loads_with_the_transductive_protocol(
    omniglot_run, omniglot_batch, tmp_path, monkeypatch
):
    """Such runs normalised with each batch's statistics: their learner must, too (logits of a query batch
    equal the model run on that batch alone, without the support set as context)."""
    moved = moved_without_data(omniglot_run, tmp_path / "run")
    state = torch.load(moved / CHECKPOINT, weights_only=False)
    del state["config"]["model"]["norm"]
    torch.save(state, moved / CHECKPOINT)
    batch, _ = omniglot_batch
    without_data(monkeypatch, tmp_path)
    learner = metalab.load_learner(moved, device="cpu")
    assert learner.algorithm.model.norm == "transductive"
    adapted = learner.adapt(batch.x_support[0], batch.y_support[0])
    alone = learner.algorithm.predict(adapted.params, batch.x_query[0])
    torch.testing.assert_close(adapted.logits(batch.x_query[0]), alone)
