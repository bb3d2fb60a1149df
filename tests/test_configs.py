"""Every option of every config group composes and trains for two iterations."""

from __future__ import annotations

import pytest
from hydra.utils import get_class

from metalab.app.build import make_trainer
from metalab.app.cli import CONFIG_DIR
from tests.helpers.configs import compose_config

GROUPS = ("algo", "solver", "tasks", "model", "logger")


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


def algorithm_class(algo: str):
    return get_class(compose_config([f"algo={algo}"]).algo._target_)


def partners(group: str, option: str) -> list[str]:
    """Other choices an option needs to make a supported combination."""
    if group == "solver":
        default = get_class(compose_config([]).algo._target_)  # first, since it fits the default tasks
        candidates = sorted(
            options("algo"),
            key=lambda a: (algorithm_class(a) is not default, "episodes" not in algorithm_class(a).accepts),
        )
        algo = next((a for a in candidates if option in algorithm_class(a).solvers), None)
        assert algo is not None, f"no algorithm supports solver={option}"
        return [f"algo={algo}", *partners("algo", algo)]
    if group == "model" and option == "conv4":
        return ["tasks=omniglot"]
    if group == "algo" and "episodes" not in algorithm_class(option).accepts:  # AuxiLearn: data with auxiliary tasks
        return ["tasks=aux_toy"]
    if group == "algo" and not algorithm_class(option).trains_on(get_class(compose_config([]).tasks._target_)):
        return ["tasks=omniglot"]  # ProtoNet: classification episodes
    return []


LSTM_TINY = ["algo.optimizee_steps=4", "algo.unroll=2", "algo.eval_optimizee_steps=4"]
CASES = [(group, option) for group in GROUPS for option in options(group)]


@pytest.mark.slow
@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_trains_two_iterations(tiny_config, tmp_path, group, option, image_task_overrides):
    overrides = [f"{group}={option}", *partners(group, option)]
    overrides += image_task_overrides(overrides)
    if compose_config(overrides).algo._target_.endswith("LSTMOptimizer"):  # the wiring, not 100 optimizee steps
        overrides += LSTM_TINY
    cfg = tiny_config(*overrides)
    assert cfg[group] is not None
    results = make_trainer(cfg, tmp_path).fit()
    assert results["status"] == "completed" and results["iteration"] == 2
    metric = results["test"][results["metric"]]["mean"]
    assert metric == metric  # finite, not NaN


@pytest.mark.slow
def test_each_algo_names_its_default_solver_and_each_task_its_default_model():
    for algo in options("algo"):
        cfg = compose_config([f"algo={algo}"])
        assert cfg.solver.get("_target_"), algo
        assert any(cfg.solver._target_.endswith(s) for s in algorithm_class(algo).solvers), algo
    for tasks in options("tasks"):
        assert compose_config([f"tasks={tasks}"]).model.get("_target_"), tasks
    # and both are overridable
    assert compose_config(["algo=maml", "solver=first_order"]).solver._target_.endswith("first_order")


#: the cheapest data first (the toys, the sinusoid), so that a part is trained where it costs least
EXPERIMENTS = sorted(options("experiment"), key=lambda name: ("toy" not in name and "sinusoid" not in name, name))


@pytest.fixture(scope="module")
def rule_run(tmp_path_factory):
    """A learned-optimizer run of the paper's rule shape (2 tiny iterations): what experiments that
    evaluate a trained rule (algo.init_rule, the generalisation rows) read."""
    from tests.helpers.configs import TINY

    run = tmp_path_factory.mktemp("rule") / "run"
    make_trainer(compose_config([*TINY, "+experiment=lstm_quadratic", *LSTM_TINY]), run).fit()
    return run


def experiment_overrides(name, image_task_overrides, request) -> list[str]:
    """+experiment=<name> with its data location and, when it evaluates a trained rule, a trained rule."""
    overrides = [f"+experiment={name}", *image_task_overrides([f"+experiment={name}"])]
    if compose_config(overrides).algo.get("init_rule"):
        overrides.append(f"algo.init_rule={request.getfixturevalue('rule_run')}")
    return overrides


#: each part of an experiment's wiring trained so far (its algorithm, inner loop or combiner, sampler, model,
#: solver, and the algorithm with its sampler), with the row that first trained it: a row trains when it
#: brings a part no earlier row trained; rows that differ only in numbers (ways, shots, rates, sizes) or
#: combine parts already trained are composed and checked, not trained again
TRAINED: dict[tuple, str] = {}


def wiring(cfg) -> set[tuple]:
    algo = cfg.algo
    parts = {("algo", algo._target_), ("tasks", cfg.tasks._target_), ("model", cfg.model._target_)}
    parts |= {("solver", cfg.solver._target_), ("pair", algo._target_, cfg.tasks._target_)}
    return parts | {(key, str(algo.get(key))) for key in ("combiner", "inner_optimizer", "init_rule")}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_paper_numbers_and_trains_two_iterations(
    tiny_config, tmp_path, name, image_task_overrides, request
):
    overrides = experiment_overrides(name, image_task_overrides, request)
    cfg = tiny_config(*overrides)
    assert cfg.paper.metrics and cfg.paper.source  # a paper with curves only states its claim per metric in words
    parts = wiring(cfg)
    if parts <= TRAINED.keys():
        pytest.skip(f"every part of its wiring trained already, in {', '.join(sorted({TRAINED[p] for p in parts}))}")
    for part in parts - TRAINED.keys():
        TRAINED[part] = name
    extra = []
    if cfg.algo._target_.endswith("LSTMOptimizer"):
        extra = LSTM_TINY
    elif "inner_steps" in cfg.algo and not cfg.algo.get("report_steps"):  # the wiring, not 5-25 second-order steps
        extra = ["algo.inner_steps=1", "algo.eval_inner_steps=1"]
    if cfg.model.get("hidden_channels"):  # nor 32-64 filters at full resolution (ProtoNet's max-pooling) on CPU
        extra = [*extra, "model.hidden_channels=8"]
    cfg = tiny_config(*overrides, *extra)
    results = make_trainer(cfg, tmp_path).fit()
    assert results["status"] == "completed"
    for metric in cfg.paper.metrics:
        assert metric in results["test"], metric


#: the one experiment -m "not slow" builds with every solver: no image data, under a second
QUICK_EXPERIMENT = "maml_sinusoid"


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=() if name == QUICK_EXPERIMENT else pytest.mark.slow) for name in EXPERIMENTS]
)
def test_experiment_builds_with_every_solver_its_algorithm_supports(tiny_config, name, image_task_overrides, request):
    """`+experiment=<name> solver=<other>` composes and builds: an experiment sets no solver options
    that another solver would not take. (The default solver trains in the test above.)"""
    import torch

    from metalab.app.build import build
    from metalab.errors import ConfigError

    overrides = experiment_overrides(name, image_task_overrides, request)
    composed = tiny_config(*overrides)
    default = composed.solver._target_.rsplit(".", 1)[-1]
    for solver in get_class(composed.algo._target_).solvers:
        if solver == default:
            continue
        cfg = tiny_config(*overrides, f"solver={solver}")
        try:
            _, algorithm = build(cfg, torch.device("cpu"))
        except ConfigError as error:  # refused up front, by design, for a model too large for a dense matrix
            assert solver == "exact" and "solver=exact builds a dense" in str(error), (solver, error)
            continue
        assert algorithm.solver.name == solver, (solver, algorithm.solver)
