"""Every key of the groups beyond episodes (algo=auxilearn, algo=lstm_optimizer, their samplers and the model
and solver keys they use) crossed with values a user may mistype: a string, a bool, -1, 0, huge, nan, inf
(and each inside a list for a list key). Each case ends in one sentence naming the key, or in a run that
trains and is scored: the schema's answer is checked for every case (quick), and every value it accepts is
built and trained for one iteration (slow), where nothing but a MetalabError may escape."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from metalab.app.build import make_trainer
from metalab.app.schema import validate_config
from metalab.errors import ConfigError, MetalabError
from tests.helpers.configs import TINY, compose_config

VALUES = ["abc", "true", "-1", "0", "1e30", "1000000000000", "nan", "inf"]
HUGE = ("1e30", "1000000000000")
ONE_ITERATION = [*TINY, "trainer.iterations=1"]
LSTM_SHORT = ["algo.optimizee_steps=4", "algo.unroll=2", "algo.eval_optimizee_steps=4"]
AUX_EVERY_STEP = ["algo.update_every=1"]  # a combiner step (the hypergradient) in the one iteration

#: setup -> (overrides, the groups whose keys are swept), each swept beside the setup's other defaults
SETUPS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "auxilearn": (["tasks=aux_toy", *AUX_EVERY_STEP], ("algo", "solver", "model")),
    "aux_toy": (["tasks=aux_toy", *AUX_EVERY_STEP], ("tasks",)),
    "lstm_optimizer": (["tasks=quadratic", *LSTM_SHORT], ("algo",)),
    "quadratic": (["tasks=quadratic", *LSTM_SHORT], ("tasks",)),
    "mnist_mlp": (["tasks=mnist_mlp", *LSTM_SHORT], ("tasks",)),
    "aux_mnist": (["tasks=aux_mnist", *AUX_EVERY_STEP, "model.hidden_channels=4"], ("tasks", "model")),
    "aux_omniglot": (["tasks=aux_omniglot", *AUX_EVERY_STEP, "model.hidden_channels=4"], ("tasks",)),
    "aux_miniimagenet": (["tasks=aux_miniimagenet", *AUX_EVERY_STEP, "model.hidden_channels=4"], ("tasks",)),
}
#: the mnist_mlp variants: the keys each one sets (its other keys are mnist_mlp's, swept above)
VARIANTS = {
    "mnist_mlp_40units": "tasks.hidden_sizes",
    "mnist_mlp_2layers": "tasks.hidden_sizes",
    "mnist_mlp_relu": "tasks.activation",
    "mnist_mlp_200steps": "algo.eval_optimizee_steps",
}
#: a combiner's own setting is swept beside the combiner that reads it (beside another it is refused)
CONTEXT = {
    "algo.weights": ["algo.combiner=fixed"],
    "algo.hidden_sizes": ["algo.combiner=nonlinear"],
    "algo.init_upper": ["algo.combiner=nonlinear"],
    "algo.alpha": ["algo.combiner=gradnorm"],
    "algo.gradnorm_lr": ["algo.combiner=gradnorm"],
    "algo.temperature": ["algo.combiner=dwa"],
    "algo.gcs_variant": ["algo.combiner=gcs"],
    "algo.olaux_lr": ["algo.combiner=olaux"],
}
#: sizes whose huge values the memory estimate (app/memory.py) is to refuse; some would allocate terabytes
#: or loop for ever before it does, so their build is not tried here
SIZES = {
    "algo.hidden_sizes",
    "algo.hidden_size",
    "algo.num_layers",
    "model.hidden_sizes",
    "model.hidden_channels",
    "tasks.dim",
    "tasks.train_size",
    "tasks.aux_size",
    "tasks.val_size",
    "tasks.test_size",
    "tasks.aux_batch_size",
    "tasks.hidden_sizes",
    "tasks.minibatch_size",
    "tasks.random_classes",
    "tasks.image_size",
}
#: values no key of these groups takes, but for the keys named: a string, a bool, a non-finite number
TAKES = {
    "abc": {"tasks.root", "tasks.cache_dir", "algo.init_rule", "model.downsample", "model.norm", "model.activation"},
    "true": {"tasks.download"},
    "[abc]": {"tasks.auxiliaries"},
}
NOT_NUMBERS = ("abc", "true", "nan", "inf", "[abc]", "[true]", "[nan]", "[inf]")
#: step counts whose huge values are accepted and run as long as asked: not tried here
STEPS = {"solver.terms", "algo.optimizee_steps", "algo.eval_optimizee_steps"}


def leaves(node: dict[str, Any], prefix: str) -> list[tuple[str, Any]]:
    """(dotted key, default) of every setting under ``node``, nested optimizers and mappings included."""
    found = []
    for key, value in node.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            found += leaves(value, f"{prefix}.{key}")
        else:
            found.append((f"{prefix}.{key}", value))
    return found


def cases() -> list[tuple[str, list[str], str, str]]:
    """(setup, its overrides, key, value) for every key of every setup and variant, and every value."""
    table = []
    plans = [(name, overrides, groups, None) for name, (overrides, groups) in SETUPS.items()]
    plans += [(v, [f"tasks={v}", *LSTM_SHORT], ("tasks", "algo"), key) for v, key in VARIANTS.items()]
    for name, overrides, groups, only in plans:
        config = OmegaConf.to_container(compose_config([*TINY, *overrides]), resolve=False)
        for group in groups:
            for key, default in leaves(config[group], group):
                if only not in (None, key):
                    continue
                values = VALUES + ([f"[{value}]" for value in VALUES] if isinstance(default, list) else [])
                table += [(name, overrides + CONTEXT.get(key, []), key, value) for value in values]
    return table


CASES = cases()
IDS = [f"{name}:{key}={value}" for name, _, key, value in CASES]


@functools.cache
def composed(overrides: tuple[str, ...]) -> DictConfig:
    return compose_config([*ONE_ITERATION, *overrides])


def with_value(overrides: list[str], key: str, value: str) -> DictConfig:
    """The config of ``overrides`` and ``key=value``, the value parsed as Hydra parses it on the command line:
    one composition per setup rather than one per case (the slow test composes each case itself)."""
    cfg = copy.deepcopy(composed(tuple(overrides)))
    OmegaConf.update(cfg, key, OverridesParser.create().parse_override(f"{key}={value}").value(), merge=False)
    return cfg


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and "Traceback" not in message


@pytest.mark.parametrize("name, overrides, key, value", CASES, ids=IDS)
def test_the_schema_names_the_key_or_accepts_the_value(name, overrides, key, value):
    try:
        validate_config(with_value(overrides, key, value))
    except ConfigError as error:
        assert key in str(error) and one_sentence(str(error)), str(error)
    else:
        assert value not in NOT_NUMBERS or key in TAKES.get(value, ()), f"{key}={value} was accepted"


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides, key, value", CASES, ids=IDS)
def test_an_accepted_value_trains_or_is_refused_in_one_sentence(
    name, overrides, key, value, tmp_path, monkeypatch, image_task_overrides
):
    try:
        validate_config(with_value(overrides, key, value))  # one composition per setup: a refusal costs little
    except ConfigError:
        pytest.skip("refused by the schema (the quick test checks the sentence)")
    if value.strip("[]") in HUGE and key in SIZES | STEPS:
        pytest.skip(f"{key}={value}: {'the memory estimate' if key in SIZES else 'as long as asked'}")
    monkeypatch.chdir(tmp_path)  # a relative tasks.cache_dir=abc lands here
    extra = image_task_overrides(overrides)
    cfg = compose_config([*ONE_ITERATION, *overrides, *extra, f"{key}={value}"])  # the swept value last: it wins
    try:
        results = make_trainer(cfg, tmp_path / "run").fit()
    except MetalabError as error:
        assert one_sentence(str(error)), str(error)
        return
    diverged = [entry for entry in results["nonfinite"] if not entry.startswith(f"test/{key.split('.')[-1]}/")]
    assert results["status"] in ("completed", "nonfinite_evaluation") and not diverged, results["nonfinite"]
    assert results["iteration"] == 1
