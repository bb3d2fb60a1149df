"""The trained-model API: load_learner adapts to new tasks and predicts; evaluate.py re-tests."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import metalab
from metalab.cli import make_trainer
from tests.conftest import OMNIGLOT

ROOT = Path(__file__).resolve().parents[1]
SUBSET = OMNIGLOT / "images_background_small1.zip"


@pytest.fixture(scope="module")
def omniglot_run(tmp_path_factory, image_data):
    if not SUBSET.is_file():
        pytest.skip(f"the Omniglot subset is not at {SUBSET} (set METALAB_OMNIGLOT to its folder)")
    from tests.conftest import TINY, compose_config

    run_dir = tmp_path_factory.mktemp("omniglot_run")
    cfg = compose_config([*TINY, "tasks=omniglot", *image_data["omniglot"], "trainer.iterations=40",
                          "trainer.meta_batch_size=8", "algo.inner_lr=0.4", "algo.eval_inner_steps=3", "trainer.eval_every=0"])
    make_trainer(cfg, run_dir).fit()
    return run_dir


def test_adapting_beats_chance_and_equals_the_vmapped_evaluation(omniglot_run):
    learner = metalab.load_learner(omniglot_run, device="cpu")
    batch = learner.tasks.sample(24, "test", learner.tasks.generator(7))
    accuracies, unadapted = [], []
    for t in range(batch.num_tasks):
        adapted = learner.adapt(batch.x_support[t], batch.y_support[t])
        predicted = torch.tensor(adapted.predict(batch.x_query[t]))
        accuracies.append((predicted == batch.y_query[t]).float().mean())
        before = learner.adapt(batch.x_support[t], batch.y_support[t], steps=0)
        unadapted.append((torch.tensor(before.predict(batch.x_query[t])) == batch.y_query[t]).float().mean())
    accuracies = torch.stack(accuracies)
    # oracle: the same adaptation, vmapped over the batch inside the algorithm
    torch.testing.assert_close(accuracies, learner.algorithm.evaluate(batch)["accuracy"])
    assert accuracies.mean() > 0.2 + 0.15, accuracies.mean()  # 5-way chance is 0.2
    assert accuracies.mean() > torch.stack(unadapted).mean() + 0.1


def test_image_paths_get_the_training_preprocessing_and_named_labels(omniglot_run, tmp_path):
    learner = metalab.load_learner(omniglot_run, device="cpu")
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
        expected = 1 - np.asarray(image.convert("L").resize((28, 28), PIL.Image.Resampling.LANCZOS), dtype=np.float32) / 255
    torch.testing.assert_close(learner.examples(support[:1])[0, 0], torch.from_numpy(expected), atol=1e-6, rtol=0)
    names = [c.rsplit("/", 1)[-1] for c in characters]
    adapted = learner.adapt(support, names)
    predicted = adapted.predict(query)
    assert len(predicted) == 5 and set(predicted) <= set(names)
    assert adapted.logits(query).shape == (5, 5)


def test_regression_learner_and_bad_input(tmp_path, tiny_config):
    make_trainer(tiny_config("trainer.iterations=30"), tmp_path).fit()
    learner = metalab.load_learner(tmp_path, device="cpu")
    batch = learner.tasks.sample(16, "test", learner.tasks.generator(0))
    errors = {0: [], 10: []}
    for t in range(16):
        for steps in errors:
            predicted = learner.adapt(batch.x_support[t], batch.y_support[t], steps=steps).predict(batch.x_query[t])
            errors[steps].append(((predicted - batch.y_query[t]) ** 2).mean())
    assert torch.stack(errors[10]).mean() < torch.stack(errors[0]).mean()
    with pytest.raises(metalab.ConfigError, match="take tensors, not file paths"):
        learner.adapt(["a.png"], [1.0])
    with pytest.raises(metalab.ConfigError, match="one label per example"):
        learner.adapt(batch.x_support[0], batch.y_support[0][:3])


def test_evaluate_script_reproduces_the_runs_test(tmp_path, tiny_config):
    make_trainer(tiny_config("trainer.iterations=5", "trainer.test_tasks=8", "trainer.eval_batch_size=8"), tmp_path).fit()
    tested = json.loads((tmp_path / "results.json").read_text())["test"]["mse"]["mean"]
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), f"run_dir={tmp_path}",
                             "tasks.split=test", "num_tasks=8", "device=cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    again = json.loads((tmp_path / "eval_test.json").read_text())["mse"]["mean"]
    assert again == pytest.approx(tested, rel=1e-6) and "test mse:" in result.stdout
