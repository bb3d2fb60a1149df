"""AuxiLearn: the hypergradient against finite differences of L_A(w*(phi)) with the closed-form w* of
the toy regression, for every solver; the combiners; the toy's harmful weight; the pairing refusals."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from metalab.algorithms import AuxiLearn
from metalab.algorithms.combiners import Linear, Nonlinear, Uncertainty, make_combiner
from metalab.app.build import build, make_trainer
from metalab.errors import ConfigError
from metalab.hypergrad import cg, exact, gmres, neumann
from metalab.models import MLP
from metalab.tasks.auxiliary.mnist import AuxMNIST
from metalab.tasks.auxiliary.toy import AuxToy
from metalab.tasks.episodic.sinusoid import Sinusoid
from tests.helpers.auxilearn import PHI, at_inner_solution, aux_set_loss, closed_form, finite_differences, toy_algorithm
from tests.helpers.configs import TINY, compose_config, listed
from tests.helpers.runs import run_train, train, train_records
from tests.helpers.scripts import run_script, script


@pytest.mark.parametrize("solver", [exact(), cg(maxiter=10), gmres(maxiter=10)], ids=["exact", "cg", "gmres"])
def test_hypergradient_matches_finite_differences_of_the_closed_form_solution(solver):
    algorithm = toy_algorithm(solver)
    batch = at_inner_solution(algorithm, PHI)
    hypergrad, value = algorithm.hypergradient(batch)
    assert torch.allclose(value, aux_set_loss(batch, closed_form(algorithm, batch, PHI)))
    expected = finite_differences(algorithm, batch, PHI)
    assert torch.allclose(hypergrad["weight"], expected, rtol=1e-6, atol=1e-9), (hypergrad["weight"], expected)


def test_neumann_hypergradient_error_falls_as_terms_grow_and_official_convention_is_one_over_hpo_lr():
    algorithm = toy_algorithm()
    batch = at_inner_solution(algorithm, PHI)
    expected = finite_differences(algorithm, batch, PHI)
    w = algorithm.primary_parameters()
    flat = torch.cat([w["net.0.weight"].flatten(), w["net.0.bias"]])

    def loss_of(vector):
        params = {"net.0.weight": vector[:-1].view(1, -1), "net.0.bias": vector[-1:]}
        return algorithm.train_loss(params, algorithm.meta_parameters(), batch)

    hpo_lr = 1.0 / torch.linalg.eigvalsh(torch.func.hessian(loss_of)(flat)).max().item()
    errors = []
    for terms in (0, 2, 8, 32, 128):
        paper = toy_algorithm(neumann(terms=terms), hpo_lr=hpo_lr)
        at_inner_solution(paper, PHI)
        hypergrad = paper.hypergradient(batch)[0]["weight"]
        errors.append((hypergrad - expected).norm().item())
        official = toy_algorithm(neumann(terms=terms), hpo_lr=hpo_lr, convention="official")
        at_inner_solution(official, PHI)
        assert torch.allclose(official.hypergradient(batch)[0]["weight"], hypergrad / hpo_lr)
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 * expected.norm().item(), errors


@pytest.mark.parametrize("max_grad_norm, grad_clip_norm", [(1e-4, 10.0), (10.0, 1e-4), (1e-4, None)])
def test_a_combiner_step_is_the_hypergradient_clipped_to_the_smaller_limit(max_grad_norm, grad_clip_norm):
    """combiner_step against the hypergradient computed apart: phi moves by lr * 1e-4 along it (the
    smaller of algo.max_grad_norm and trainer.grad_clip_norm) and the step reports its norm unclipped."""
    algorithm = toy_algorithm(max_grad_norm=max_grad_norm, grad_clip_norm=grad_clip_norm)
    batch = algorithm.tasks.sample(30, "train", algorithm.tasks.generator(0))
    hypergrad = algorithm.hypergradient(batch)[0]["weight"]
    assert hypergrad.norm() > 1e-3  # so the clip binds
    before = algorithm.combiner.weight.detach().clone()
    report = algorithm.combiner_step(batch)
    assert report["hypergrad_norm"] == pytest.approx(hypergrad.norm().item(), rel=1e-10)
    step = 0.01 * 1e-4 * hypergrad / (hypergrad.norm() + 1e-6)  # SGD lr 0.01; clip_grad_norm_'s 1e-6
    torch.testing.assert_close(algorithm.combiner.weight.detach(), (before - step).clamp(min=0), rtol=1e-12, atol=0)


def test_combiners_are_non_negative_after_steps_that_push_them_below_zero():
    torch.manual_seed(0)
    aux = torch.rand(64, 3) * 5
    for combiner in (make_combiner("linear", 3), make_combiner("nonlinear", 3, hidden_sizes=[8, 8])):
        optimizer = torch.optim.SGD(combiner.parameters(), lr=10.0)
        for _ in range(3):
            optimizer.zero_grad()
            combiner.aux_term(aux).sum().backward()  # the gradient of g in phi is >= 0: SGD pushes phi below 0
            optimizer.step()
            combiner.clamp()
        assert all((p >= 0).all() for name, p in combiner.named_parameters() if "weight" in name)
        assert (combiner.aux_term(torch.rand(100, 3) * 10) >= 0).all()
        assert (combiner.weights(aux) >= 0).all()


def test_effective_weights_against_their_definitions():
    aux = torch.rand(16, 2)
    linear = Linear(2, init=0.5)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([0.3, 2.0]))
    assert torch.allclose(linear.weights(aux), torch.tensor([0.3, 2.0]))
    uncertainty = Uncertainty(2)
    with torch.no_grad():
        uncertainty.log_variance.copy_(torch.tensor([0.5, -1.0, 2.0]))
    assert torch.allclose(uncertainty.weights(aux), torch.exp(0.5 - torch.tensor([-1.0, 2.0])))
    nonlinear = Nonlinear(2, hidden_sizes=[4])
    eps = 1e-3  # the weight of l_k: d mean(g) / d (mean l_k) = mean_i dg/dl_ik, by central differences
    expected = torch.stack(
        [
            (
                nonlinear.aux_term(aux + eps * torch.eye(2)[k]).mean()
                - nonlinear.aux_term(aux - eps * torch.eye(2)[k]).mean()
            )
            / (2 * eps)
            for k in range(2)
        ]
    )
    assert torch.allclose(nonlinear.weights(aux), expected.detach(), rtol=1e-3)


def test_learned_weight_of_the_harmful_auxiliary_falls_to_zero_and_the_helpful_one_stays():
    toy = AuxToy()
    torch.manual_seed(0)
    model = MLP(toy.input_shape, toy.output_dim, hidden_sizes=[])
    algorithm = AuxiLearn(
        model,
        toy,
        neumann(),
        None,
        update_every=5,
        primary_optimizer=functools.partial(torch.optim.Adam, lr=0.01),
        combiner_optimizer=functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9, weight_decay=1e-4),
    )
    generator = toy.generator(0)
    for _ in range(300):
        metrics = algorithm.train_step(toy.sample(25, "train", generator))
    assert metrics["weight/harmful"] < 0.05, metrics
    assert metrics["weight/helpful"] > 1.0, metrics


def test_episodic_data_and_auxiliary_data_are_refused_with_the_pairs_that_work():
    """The pairs are generated from the configured algorithms' ``accepts`` and samplers' ``batch_kind``,
    and refused from the config alone, before any data is read (and again by a hand-built algorithm)."""
    with pytest.raises(ConfigError) as error:
        build(compose_config(["algo=auxilearn", "tasks=sinusoid"]), torch.device("cpu"))
    sentence, _, partners = str(error.value).partition(", or give Sinusoid to algo=")
    assert sentence == (
        "algo=auxilearn trains on data with auxiliary tasks, but Sinusoid yields episodes: "
        "pair algo=auxilearn with tasks=aux_miniimagenet, aux_mnist, aux_omniglot or aux_toy"
    )
    assert {"imaml", "lstm_optimizer", "maml"} <= listed(partners) and "auxilearn" not in listed(partners)
    with pytest.raises(ConfigError) as error:
        build(compose_config(["algo=maml", "tasks=aux_toy"]), torch.device("cpu"))
    assert str(error.value) == (
        "algo=maml trains on episodes, but AuxToy yields data with auxiliary tasks: pair "
        "algo=maml with tasks=miniimagenet, omniglot or sinusoid, or give AuxToy to "
        "algo=auxilearn."
    )
    with pytest.raises(ConfigError, match=r"^algo=auxilearn trains on data with auxiliary tasks, but Sinusoid yields"):
        AuxiLearn(
            MLP((1,), 1),
            Sinusoid(),
            neumann(),
            None,
            primary_optimizer=torch.optim.SGD,
            combiner_optimizer=torch.optim.SGD,
        )
    with pytest.raises(ConfigError, match="solver=neumann"):
        build(compose_config(["tasks=aux_toy", "solver=first_order"]), torch.device("cpu"))
    with pytest.raises(ConfigError, match="algo.weights"):
        build(compose_config(["tasks=aux_toy", "algo.combiner=fixed"]), torch.device("cpu"))
    with pytest.raises(ConfigError, match="algo.primary_optimizer.lr must be a finite number"):
        build(compose_config(["tasks=aux_toy", "algo.primary_optimizer.lr=abc"]), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"^algo.combiner_optimizer rejected its settings \(Invalid weight_decay"):
        build(compose_config(["tasks=aux_toy", "algo.combiner_optimizer.weight_decay=-1"]), torch.device("cpu"))


@pytest.mark.parametrize(
    "override, sentence",
    [
        (
            "+trainer.meta_optimizer.eps=-1",
            "trainer.meta_optimizer rejected its settings (Invalid epsilon value: -1): "
            "fix that value, e.g. trainer.meta_optimizer.lr=0.001.",
        ),
        (
            "+algo.primary_optimizer.eps=-1",
            "algo.primary_optimizer rejected its settings (Invalid epsilon value: -1): "
            "fix that value (`python train.py --cfg job` shows the config).",
        ),
    ],
)
def test_an_optimizer_that_torch_rejects_is_named_by_its_key(override, sentence):
    """The one helper (base.build_optimizer) behind the base class's meta-optimizer and AuxiLearn's own two."""
    algo = ["algo=maml", "tasks=sinusoid"] if override.startswith("+trainer") else ["tasks=aux_toy"]
    with pytest.raises(ConfigError) as error:
        build(compose_config([*algo, override]), torch.device("cpu"))
    assert str(error.value) == sentence


def test_the_memory_check_sizes_no_episodes_for_auxiliary_data():
    """aux_mnist's tasks.shots (labels per digit) is no episode size: its sampler's footprints hold no
    episodes and do not change with it, while an episodic sampler is sized from the same keys."""
    cfg = compose_config(["tasks=aux_mnist"])
    assert cfg.tasks.shots == 5
    more_shots = compose_config(["tasks=aux_mnist", "tasks.shots=50"])
    footprints = AuxMNIST.footprints(cfg.tasks, cfg.trainer)
    assert all(batch.noun != "episodes" for batch in footprints)
    assert footprints == AuxMNIST.footprints(more_shots.tasks, more_shots.trainer)
    train = next(b for b in Sinusoid.footprints(cfg.tasks, cfg.trainer) if b.key == "trainer.meta_batch_size")
    assert (train.noun, train.units, train.examples) == (
        "episodes",
        cfg.trainer.meta_batch_size,
        2 * 5,
    )  # query = shots


COMBINERS = ["main_only", "equal", "fixed", "linear", "nonlinear", "uncertainty", "gradnorm", "dwa", "gcs", "olaux"]
#: the multirun's combiners: not fixed, which needs algo.weights (every other combiner refuses it)
SWEPT = ["main_only", "equal", "linear", "nonlinear", "uncertainty"]


@pytest.mark.parametrize("combiner", COMBINERS)
def test_every_combiner_trains_two_iterations_and_logs_its_weights(tiny_config, tmp_path, combiner):
    extra = ["algo.weights=[1.0,0.25]"] if combiner == "fixed" else []
    cfg = tiny_config("tasks=aux_toy", f"algo.combiner={combiner}", "algo.update_every=1", *extra)
    trainer = make_trainer(cfg, tmp_path)
    results = trainer.fit()
    assert results["status"] == "completed" and results["iteration"] == 2
    rows = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert len(rows) == 2 and all("train/weight/harmful" in row for row in rows)
    weights = trainer.algorithm.combiner.weights(torch.rand(5, 2))
    expected = {"main_only": [0.0, 0.0], "equal": [1.0, 1.0], "fixed": [1.0, 0.25]}.get(combiner)
    if expected is not None:
        assert weights.tolist() == expected
    if combiner == "linear":  # the weight plot draws what metrics.jsonl holds
        assert script("plot_aux_weights").main([str(tmp_path), "--out", str(tmp_path / "w.png")]) == 0
        plotted = json.loads((tmp_path / "w.json").read_text())[tmp_path.name]
        logged = [json.loads(row) for row in rows]
        for name in ("helpful", "harmful"):
            assert plotted[name] == [[r["iteration"], r[f"train/weight/{name}"]] for r in logged]
        assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("combiner", ["linear", "uncertainty"])
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tiny_config, tmp_path, combiner):
    """The primary network, both optimizers, the combiner and the data order persist across the resume."""
    cfg = tiny_config(
        "tasks=aux_toy",
        f"algo.combiner={combiner}",
        "trainer.iterations=30",
        "trainer.checkpoint_every=7",
        "trainer.eval_every=10",
        "algo.update_every=4",
        "algo.primary_optimizer.lr=0.01",
        "seed=5",
    )
    full, full_results = train(cfg, tmp_path / "full")
    _, stopped = train(cfg, tmp_path / "split", stop_after=13)
    assert stopped["status"] == "interrupted" and stopped["iteration"] == 13
    resumed, resumed_results = train(cfg, tmp_path / "split", resume=True)
    assert resumed_results["iteration"] == 30
    for module in ("model", "combiner"):
        for (key, value), other in zip(
            getattr(full.algorithm, module).state_dict().items(),
            getattr(resumed.algorithm, module).state_dict().values(),
        ):
            assert torch.equal(value, other), (module, key)
    for optimizer in ("optimizer", "primary_optimizer"):
        states = [getattr(t.algorithm, optimizer).state_dict()["state"] for t in (full, resumed)]
        assert states[0].keys() == states[1].keys()
        for key in states[0]:
            assert all(
                torch.equal(torch.as_tensor(states[0][key][k]), torch.as_tensor(states[1][key][k]))
                for k in states[0][key]
            ), (optimizer, key)
    assert full_results["test"] == resumed_results["test"]
    assert train_records(tmp_path / "full") == train_records(tmp_path / "split")


@pytest.mark.slow
def test_command_line_multirun_of_every_combiner_and_its_summary(tmp_path):
    """`python train.py -m tasks=aux_toy algo.combiner=...` then scripts/summarize.py: one row per combiner
    (but fixed, whose algo.weights the others refuse), each the test MSE its results.json holds."""

    result = run_train(
        [
            "-m",
            *TINY,
            "tasks=aux_toy",
            f"algo.combiner={','.join(SWEPT)}",
            "algo.update_every=1",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    summarized = run_script("summarize", str(sweep_dir))
    assert summarized.returncode == 0, summarized.stderr
    summary = summarized.stdout
    for job in sweep_dir.glob("*/results.json"):
        results = json.loads(job.read_text())
        assert results["status"] == "completed" and results["iteration"] == 2
        row = next(
            line
            for line in summary.splitlines()
            if line.startswith(f"| algo.combiner={results['config']['algo']['combiner']} |")
        )
        assert results["test"]["loss"]["mean"] == results["test"]["mse"]["mean"]  # one column, "loss = mse"
        assert row.endswith(f"| 1 | {results['test']['mse']['mean']:.4f} (n=1) |")  # one seed: no interval
    assert len([line for line in summary.splitlines() if line.startswith("| algo.combiner=")]) == len(SWEPT)


def test_nonlinear_combiner_hypergradient_matches_finite_differences_of_a_newton_solution():
    """For the MLP combiner, L_T is convex in w (a non-negative softplus MLP of squared errors): w*(phi) by
    Newton's method to machine precision, and central differences in the first and last entry of each
    tensor of phi."""
    algorithm = toy_algorithm(exact(), combiner="nonlinear", hidden_sizes=[3])
    batch = algorithm.tasks.sample(30, "train", torch.Generator().manual_seed(0))
    names = list(algorithm.primary_parameters())
    shapes = [value.shape for value in algorithm.primary_parameters().values()]

    def unflatten(vector):
        sizes = [s.numel() for s in shapes]
        return {n: part.view(s) for n, part, s in zip(names, vector.split(sizes), shapes)}

    def solve(phi, w, steps):
        objective = lambda v: algorithm.train_loss(unflatten(v), phi, batch)  # noqa: E731
        for _ in range(steps):
            w = w - torch.linalg.solve(torch.func.hessian(objective)(w), torch.func.grad(objective)(w))
        assert torch.func.grad(objective)(w).norm() < 1e-12
        return w

    phi = {k: v.detach().clone() for k, v in algorithm.meta_parameters().items()}
    w_star = solve(phi, torch.zeros(sum(s.numel() for s in shapes), dtype=torch.float64), 15)
    with torch.no_grad():
        for name, value in unflatten(w_star).items():
            algorithm.primary_parameters()[name].copy_(value)
    hypergrad, _ = algorithm.hypergradient(batch)
    eps = 1e-6
    for key, value in phi.items():
        for index in sorted({0, value.numel() - 1}):  # the first and last entry of each tensor of phi
            shifted = []
            for sign in (1, -1):
                moved = {k: v.clone() for k, v in phi.items()}
                moved[key].view(-1)[index] += sign * eps
                shifted.append(algorithm.aux_set_loss(unflatten(solve(moved, w_star, 3)), moved, batch))
            expected = (shifted[0] - shifted[1]) / (2 * eps)
            assert torch.allclose(hypergrad[key].view(-1)[index], expected, rtol=1e-5, atol=1e-9), (key, index)


@pytest.mark.parametrize("combiner", COMBINERS)
def test_every_combiner_trains_two_iterations_on_real_data_with_three_auxiliaries(
    tiny_config, tmp_path, combiner, image_task_overrides
):
    """Omniglot with alphabet, rotation (a second view) and random-label auxiliaries, a conv4 primary network;
    the learned combiners take a hypergradient step every iteration; no weight leaves its feasible set."""
    overrides = [
        "tasks=aux_omniglot",
        f"algo.combiner={combiner}",
        "algo.update_every=1",
        *(["algo.weights=[1.0,0.5,0.0]"] if combiner == "fixed" else []),  # the others refuse it
        "model.hidden_channels=8",
        "tasks.aux_batch_size=4",
    ]
    trainer = make_trainer(tiny_config(*overrides, *image_task_overrides(overrides)), tmp_path)
    results = trainer.fit()
    assert results["status"] == "completed" and results["iteration"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    weights = [
        [row[f"train/weight/{name}"] for name in ("alphabet", "rotation", "random")]
        for row in rows
        if "train/loss" in row
    ]
    assert len(weights) == 2 and all(w >= 0 for row in weights for w in row), weights
    assert ("train/hypergrad_norm" in rows[0]) == (combiner in ("linear", "nonlinear"))
