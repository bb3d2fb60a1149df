"""Every value a user can type gets one clear sentence before anything is built: one table of
(overrides, the sentence expected), run through ``cli.make_trainer`` as ``python train.py`` does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import get_class

from metalab.app.build import config_catalog, make_trainer
from metalab.app.cli import CONFIG_DIR
from metalab.app.schema import validate_config
from metalab.errors import ConfigError
from tests.helpers.configs import TINY, compose_config

NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")

BAD_INPUTS = [
    # strings where numbers go
    (["algo.inner_lr=abc"], "algo.inner_lr must be a finite number (got 'abc'): e.g. algo.inner_lr=0.01."),
    (
        ["trainer.meta_optimizer.lr=abc"],
        "trainer.meta_optimizer.lr must be a finite number (got 'abc'): e.g. trainer.meta_optimizer.lr=0.001.",
    ),
    (["algo=imaml", "algo.lam=abc"], "algo.lam must be a finite number (got 'abc'): e.g. algo.lam=2.0."),
    (["trainer.grad_clip_norm=abc"], "trainer.grad_clip_norm must be a finite number or null (got 'abc')."),
    (["trainer.grad_clip_value=abc"], "trainer.grad_clip_value must be a finite number or null (got 'abc')."),
    (["algo.report_steps=abc"], "algo.report_steps must be a list of integers (got 'abc'): e.g. algo.report_steps=[]."),
    (["algo.report_steps=[1,abc]"], "algo.report_steps must be a list of integers (got [1,'abc'])"),
    (
        ["model.hidden_sizes=abc"],
        "model.hidden_sizes must be a list of integers (got 'abc'): e.g. model.hidden_sizes=[40,40].",
    ),
    (["model.hidden_sizes=40"], "model.hidden_sizes must be a list of integers (got 40)"),
    (["trainer.eval_seed=abc"], "trainer.eval_seed must be an integer (got 'abc'): e.g. trainer.eval_seed=1234."),
    (["algo=imaml", "solver.maxiter=abc"], "solver.maxiter must be an integer (got 'abc'): e.g. solver.maxiter=5."),
    (["tasks.amplitude=[1,2,3]"], "tasks.amplitude must be a list of 2 finite numbers (got [1,2,3])"),
    (["algo.inner_lr=nan"], "algo.inner_lr must be a finite number (got nan)"),
    (["trainer.meta_optimizer.lr=inf"], "trainer.meta_optimizer.lr must be a finite number (got inf)"),
    # booleans where integers go, numbers and strings where booleans go
    (["tasks.shots=true"], "tasks.shots must be an integer (got true): e.g. tasks.shots=10."),
    (["trainer.meta_batch_size=true"], "trainer.meta_batch_size must be an integer (got true)."),
    (["algo.inner_steps=1.0"], "algo.inner_steps must be an integer (got 1.0): e.g. algo.inner_steps=1."),
    (
        ["algo.learn_inner_lr=abc"],
        "algo.learn_inner_lr must be true or false (got 'abc'): e.g. algo.learn_inner_lr=false.",
    ),
    (["trainer.progress=1"], "trainer.progress must be true or false (got 1): e.g. trainer.progress=true."),
    (
        ["tasks=omniglot", "tasks.rotations=1"],
        "tasks.rotations must be true or false (got 1): e.g. tasks.rotations=true.",
    ),
    (
        ["tasks=omniglot", "tasks.split=test"],
        "tasks.split must be one of maml, background_evaluation, all (got 'test')",
    ),
    (["logger=wandb", "logger.wandb.tags=abc"], "logger.wandb.tags must be a list of strings or null (got 'abc')."),
    (
        ["logger=[wandb,tensorboard]", "logger.wandb.project=0"],
        "logger.wandb.project must be a string (got 0): e.g. logger.wandb.project=metalab.",
    ),
    (
        ["logger=tensorboard", "logger.tensorboard.flush_secs=abc"],
        "logger.tensorboard.flush_secs must be an integer (got 'abc'): e.g. logger.tensorboard.flush_secs=10.",
    ),
    # unknown keys, keys metalab sets itself
    (
        ["+trainer.foo=1"],
        "trainer.foo is not a setting of the trainer; the valid keys are autotune, checkpoint_every, device,",
    ),
    (
        ["+algo.foo=1"],
        "algo.foo is not a setting of metalab.algorithms.MAML; the valid keys are eval_inner_steps, inner_lr,",
    ),
    (
        ["+solver.maxiter=5"],
        "solver.maxiter is not a setting of metalab.hypergrad.unroll, which takes none: remove it.",
    ),
    (
        ["+foo=1"],
        "foo is not a setting of the config; the valid keys are algo, logger, model, paper, resume, seed, solver, tasks, trainer",
    ),
    (["+logger.foo=1"], "logger.foo is not a logger: choose loggers with logger=<name> or logger=[<name>,<name>]."),
    (["+algo.model=1"], "algo.model is set by metalab itself, not by the config: remove it."),
    (["algo._target_=metalab.algorithms.Nope"], "algo._target_=metalab.algorithms.Nope cannot be imported"),
    # devices this machine does not have, and names that are no device
    (["trainer.device=cuda:99"], "trainer.device=cuda:99 but "),
    pytest.param(
        ["trainer.device=mps"],
        "trainer.device=mps but this torch sees no Apple GPU (MPS): use trainer.device=auto or cpu.",
        marks=NO_MPS,
    ),
    (["trainer.device=foo"], "trainer.device=foo is not a device: use auto, cpu, cuda, cuda:<index> or mps."),
    (["trainer.device=meta"], "trainer.device=meta is not supported: use auto, cpu, cuda, cuda:<index> or mps."),
    (["trainer.device=0"], "trainer.device must be a string (got 0): e.g. trainer.device=auto."),
    # seeds outside [0, 2^32)
    (["seed=-1"], "seed must be in [0, 4294967295] (got -1): e.g. seed=0."),
    (["seed=4294967296"], "seed must be in [0, 4294967295] (got 4294967296): e.g. seed=0."),
    (["trainer.eval_seed=-1"], "trainer.eval_seed must be in [0, 4294967295] (got -1)"),
    # a meta learning rate of 0
    (
        ["trainer.meta_optimizer.lr=0"],
        "trainer.meta_optimizer.lr must be > 0 (got 0): e.g. trainer.meta_optimizer.lr=0.001.",
    ),
    # sizes that cannot be allocated: the estimate is stated
    (
        ["model.hidden_sizes=[100000000,100000000]"],
        "the model has 10,000,000,400,000,001 parameters and needs at least",
    ),
    (
        ["model.hidden_sizes=[10000000000,10000000000]"],
        "the model is too large for any memory (Storage size calculation overflowed",
    ),
    (["tasks=omniglot", "model.hidden_channels=0"], "model.hidden_channels must be >= 1 (got 0)."),
    (["tasks=omniglot", "model.blocks=1000000000000"], "model.blocks=1000000000000 is more than a 28x28 input allows"),
    (
        ["trainer.meta_batch_size=100000000"],
        "trainer.meta_batch_size=100000000 episodes of 20 examples on a model of 1,761 parameters need at least",
    ),
    (["tasks.shots=100000000000"], "trainer.meta_batch_size=2 episodes of 100000000010 examples"),
    (
        ["trainer.eval_batch_size=100000000", "trainer.eval_tasks=100000000", "tasks.eval_query=1000"],
        "trainer.eval_batch_size=100000000 episodes of 1010 examples",
    ),
    # the groups beyond episodes: AuxiLearn and its combiners, the learned optimizer, the optimizee families
    (
        ["tasks=aux_toy", "algo.combiner=nonlinear", "algo.init_upper=-1"],
        "algo.init_upper must be a finite number >= 0 (got -1)",
    ),
    (
        ["tasks=aux_toy", "algo.combiner=abc"],
        "algo.combiner must be one of main_only, equal, fixed, linear, nonlinear, uncertainty, gradnorm, dwa, gcs, "
        "olaux (got 'abc'): e.g. algo.combiner=linear.",
    ),
    (["tasks=aux_toy", "algo.convention=abc"], "algo.convention must be one of official, paper (got 'abc')"),
    (
        ["tasks=aux_toy", "algo.weights=[1.0,0.5]"],
        "algo.weights has no effect with algo.combiner=linear: it is a setting of algo.combiner=fixed; remove algo.weights or set algo.combiner=fixed.",
    ),
    (
        ["tasks=aux_toy", "algo.combiner=fixed", "algo.weights=[1.0,0.5]", "algo.init_upper=0.2"],
        "algo.init_upper has no effect with algo.combiner=fixed: it is a setting of algo.combiner=nonlinear;",
    ),
    (
        ["tasks=aux_toy", "algo.combiner=nonlinear", "algo.init_weight=0.5"],
        "algo.init_weight has no effect with algo.combiner=nonlinear: it is a setting of algo.combiner=linear;",
    ),
    (
        ["tasks=aux_toy", "algo.combiner=uncertainty", "algo.hidden_sizes=[10,10]"],
        "algo.hidden_sizes has no effect with algo.combiner=uncertainty: it is a setting of algo.combiner=nonlinear;",
    ),
    (["tasks=aux_toy", "algo.primary_optimizer.lr=0"], "algo.primary_optimizer.lr must be > 0 (got 0)"),
    (["tasks=aux_toy", "algo.combiner_optimizer.lr=-1"], "algo.combiner_optimizer.lr must be > 0 (got -1)"),
    (
        ["tasks=aux_toy", "algo.combiner_optimizer.momentum=1"],
        "algo.combiner_optimizer.momentum must be in [0, 1) (got 1)",
    ),
    (
        ["tasks=aux_toy", "tasks.data_seed=-1"],
        "tasks.data_seed must be in [0, 18446744073709551615] (got -1): e.g. tasks.data_seed=0.",
    ),
    (
        ["tasks=aux_mnist", "tasks.split_seed=-1"],
        "tasks.split_seed must be in [0, 18446744073709551615] (got -1): e.g. tasks.split_seed=0.",
    ),
    (["tasks=quadratic", "algo.preprocess=1e6"], "algo.preprocess must be in (0, 80] or null (got 1000000.0)"),
    (["tasks=quadratic", "tasks.baseline_lrs.sgd=inf"], "tasks.baseline_lrs.sgd must be a finite number (got inf)."),
    (["tasks=quadratic", "tasks.baseline_lrs.adam=0"], "tasks.baseline_lrs.adam must be > 0 (got 0)."),
    (
        ["tasks=quadratic", "algo.unroll=2", "algo.loss_weights=[1.0,-1.0]"],
        "algo.loss_weights must be >= 0, not all 0 (got [1.0, -1.0]): a negative weight trains the rule to raise",
    ),
    (
        ["tasks=quadratic", "algo.unroll=2", "algo.loss_weights=[0,0]"],
        "algo.loss_weights must be >= 0, not all 0 (got [0, 0])",
    ),
    # a run directory that cannot be written (what Hydra gives make_trainer as the run dir)
    (["hydra.run.dir={tmp}/a_file/run"], "cannot write runs to {tmp}/a_file/run (Not a directory)"),
]


@pytest.mark.parametrize(
    "overrides, sentence", BAD_INPUTS, ids=lambda value: " ".join(value) if isinstance(value, list) else ""
)
def test_bad_input_is_one_sentence_before_anything_is_built(overrides, sentence, tmp_path):
    (tmp_path / "a_file").write_text("")
    run_dir = tmp_path / "run"
    config_overrides = []
    for override in overrides:
        if override.startswith("hydra.run.dir="):
            run_dir = Path(override.split("=", 1)[1].format(tmp=tmp_path))
        else:
            config_overrides.append(override)
    cfg = compose_config([*TINY, *config_overrides])
    with pytest.raises(ConfigError) as raised:
        make_trainer(cfg, run_dir)
    message = str(raised.value)
    assert sentence.format(tmp=tmp_path) in message
    assert "\n" not in message and message.endswith("."), message
    if not any(words in message for words in ("need at least", "needs at least", "too large")):
        assert not run_dir.exists()  # refused before the run directory was even made (memory: after the data)


EXPERIMENTS = sorted(path.stem for path in (CONFIG_DIR / "experiment").glob("*.yaml"))


def partner(group: str, option: str) -> list[str]:
    """The sampler (for an algorithm) or algorithm (for a sampler) that ``option`` pairs with, when the
    default one does not: the first the configs offer, by the classes' declarations."""
    catalog, cfg = config_catalog(), compose_config([f"{group}={option}"])
    algorithm, sampler = get_class(cfg.algo._target_), get_class(cfg.tasks._target_)
    if algorithm.trains_on(sampler):
        return []
    if group == "algo":
        return [f"tasks={catalog.yielding(algorithm.accepts, algorithm.task_kinds)[0]}"]
    return [f"algo={catalog.accepting(sampler.batch_kind, sampler.kind)[0]}"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver", ["", "solver=cg", "solver=neumann", "solver=gmres", "solver=exact", "solver=first_order"]
)
def test_every_experiment_with_every_solver_passes_the_schema(solver):
    """No false alarm on the shipped experiments; with a solver override, whose node is all that changes,
    on the first experiment of each family (the name's first word: maml, imaml, reptile, auxilearn, ...)."""
    families = {}
    for name in EXPERIMENTS:
        families.setdefault(name.split("_")[0], name)
    for name in families.values() if solver else EXPERIMENTS:
        if solver and name.startswith(("maml", "fomaml")) and solver != "solver=first_order":
            continue  # MAML takes unroll or first_order; the algorithm says so itself
        validate_config(compose_config([f"+experiment={name}", *[solver] * bool(solver)]))


@pytest.mark.slow
def test_every_option_of_every_group_passes_the_schema():
    """No false alarm on any shipped option (an algorithm or a sampler beside a partner it pairs with),
    nor on valid values of the keys the table tries."""
    options = [
        [f"{group}={path.stem}", *partner(group, path.stem)]
        for group in ("algo", "tasks", "model", "solver", "logger", "trainer")
        for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
    ]
    for overrides in (
        *options,
        ["algo=imaml", "algo.inner_optimizer=adam", "algo.report_steps=[1,2]"],
        ["trainer.grad_clip_norm=10", "trainer.grad_clip_value=1", "seed=4294967295", "algo.inner_lr=1"],
        ["model.hidden_sizes=[]", "trainer.device=cpu", "logger=[wandb,tensorboard]", "logger.wandb.tags=[a,b]"],
    ):
        validate_config(compose_config(overrides))
