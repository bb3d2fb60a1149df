"""Omniglot's tasks.split=all, for a folder of one's own characters: every character trains but a
validation slice, there is no test split, and a run skips its test saying so."""

from __future__ import annotations

from pathlib import Path

import pytest

from metalab.errors import ConfigError, MetalabWarning
from metalab.tasks.episodic.omniglot import Omniglot
from metalab.training.evaluation import check_units
from tests.helpers.configs import OMNIGLOT, TINY, compose_config
from tests.helpers.runs import train

SUBSET = OMNIGLOT / "images_background_small1.zip"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the subset's decoded drawings are cached; every test here skips, saying why, without the subset."""
    if not SUBSET.is_file():
        pytest.skip(f"the Omniglot subset is not at {SUBSET} (set METALAB_OMNIGLOT to its folder)")
    return tmp_path_factory.mktemp("cache")


def test_every_character_trains_but_a_validation_slice_and_none_is_in_two_splits(cache: Path) -> None:
    sampler = Omniglot(root=str(SUBSET), cache_dir=str(cache), split="all")
    parts = {name: set(characters) for name, characters in sampler.split_characters.items()}
    val = round(136 * 100 / 1623)  # MAML's proportion of validation characters, 8 of the subset's 136
    assert set(parts) == {"train", "val"} and (len(parts["train"]), len(parts["val"])) == (136 - val, val) == (128, 8)
    assert not parts["train"] & parts["val"] and parts["train"] | parts["val"] == set(sampler.characters)
    assert {split: ids.numel() for split, ids in sampler.split_classes.items()} == {"train": 4 * 128, "val": 4 * 8}
    assert sampler.split_size("test") == 0 and sampler.split_size("val") is None
    again = Omniglot(root=str(SUBSET), cache_dir=str(cache), split="all")
    assert again.split_characters == sampler.split_characters  # deterministic given split_seed
    reseeded = Omniglot(root=str(SUBSET), cache_dir=str(cache), split="all", split_seed=1)
    assert set(reseeded.split_characters["val"]) != parts["val"]
    with pytest.raises(ConfigError, match=r"^this data has no test split \(its tasks.split keeps train, val only\)"):
        sampler.sample(2, "test", sampler.generator(0))
    with pytest.raises(ConfigError, match=r"^--num-tasks=600 asks for test tasks but the data holds no test split"):
        check_units(sampler, "test", 600, "--num-tasks")  # scripts/evaluate.py --split test


def test_a_run_validates_and_skips_its_test_saying_so(cache: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        [*TINY, "tasks=omniglot", f"tasks.root={SUBSET}", f"tasks.cache_dir={cache}", "tasks.split=all"]
        + ["model.hidden_channels=4", "trainer.iterations=1", "algo.eval_inner_steps=1"]
    )
    with pytest.warns(MetalabWarning, match=r"^Omniglot holds no test split here .*test_tasks=4 is skipped\.$"):
        _, results = train(cfg, tmp_path)
    assert results["status"] == "completed" and results["iteration"] == 1
    assert results["test"] == {} and results["test_tasks"] == 0 and set(results["val"]) >= {"accuracy"}
