"""The AuxiLearn paper's baselines as combiners (GradNorm, DWA, GCS, OL-AUX): each rule against its
equations computed by hand on losses with closed-form gradients; each on the toy regression; their
settings refused beside other combiners; a resume of each equal to the uninterrupted run."""

from __future__ import annotations

import functools
import io

import pytest
import torch

from metalab.algorithms import AuxiLearn
from metalab.algorithms.combiners import DWA, GCS, GradNorm, OLAux, make_combiner
from metalab.app.build import build
from metalab.errors import ConfigError
from metalab.hypergrad import neumann
from metalab.models import MLP
from metalab.tasks.auxiliary.toy import AuxToy
from tests.helpers.auxilearn import SGD, toy_algorithm
from tests.helpers.configs import compose_config

BASELINES = ["gradnorm", "dwa", "gcs", "olaux"]
ADAM = functools.partial(torch.optim.Adam, lr=0.01)


def linear_losses(directions: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Task losses L_t = sum_i <directions[t, i], params[i]>: grad_{params[i]} L_t = directions[t, i]."""
    return torch.stack([sum((d * p).sum() for d, p in zip(row, params)) for row in directions])


def test_gradnorm_weights_after_two_updates_against_equations_1_2_and_adam_by_hand():
    """Quadratic losses L_i = c_i / 2 ||W - a_i||^2 on W [1, 3]: grad_W L_i = c_i (W - a_i). The first update
    records L(0); the second uses r_i = (L_i / L_i(0)) / mean. Each moves w by Adam along
    dL_grad/dw_i = sign(w_i) sign(G_i - target_i) ||grad_W L_i||, then w *= 3 / sum(w)."""
    torch.manual_seed(0)
    scales, centres = torch.tensor([1.0, 4.0, 0.5], dtype=torch.float64), torch.randn(3, 1, 3, dtype=torch.float64)
    combiner = GradNorm(2, alpha=1.5, lr=0.1).double()
    with torch.no_grad():
        combiner.weight.copy_(torch.tensor([1.5, 0.5, 1.0]))
    weights, initial, mean, var = combiner.weight.detach().clone(), None, torch.zeros(3), torch.zeros(3)
    for step, w_value in enumerate((torch.zeros(1, 3), torch.full((1, 3), 0.3)), start=1):
        W = w_value.double().requires_grad_(True)
        losses = torch.stack([c / 2 * ((W - a) ** 2).sum() for c, a in zip(scales, centres)])
        grads = [c * (W.detach() - a) for c, a in zip(scales, centres)]
        (network_grad,) = combiner.primary_gradients(losses @ weights, losses, torch.ones(3, dtype=bool), [W], [True])
        torch.testing.assert_close(network_grad, sum(w * g for w, g in zip(weights, grads)))
        # the oracle, Eq. 1-2 and Algorithm 1
        initial = losses.detach() if initial is None else initial
        ratios = losses.detach() / initial
        layer_norms = torch.stack([g.norm() for g in grads])
        norms = weights * layer_norms
        target = norms.mean() * (ratios / ratios.mean()) ** 1.5
        grad = torch.sign(weights) * torch.sign(norms - target) * layer_norms
        mean, var = 0.9 * mean + 0.1 * grad, 0.999 * var + 0.001 * grad**2
        weights = weights - 0.1 * (mean / (1 - 0.9**step)) / ((var / (1 - 0.999**step)).sqrt() + 1e-8)
        weights = weights * 3 / weights.sum()
        torch.testing.assert_close(combiner.weight, weights, rtol=1e-12, atol=1e-12)
    assert torch.allclose(combiner.weights(torch.rand(4, 2, dtype=torch.float64)), weights[1:] / weights[0])


def test_gradnorm_leaves_its_weights_where_a_batch_lacks_a_task():
    combiner = GradNorm(2).double()
    W = torch.ones(2, 2, dtype=torch.float64, requires_grad=True)
    losses = torch.stack([(W**2).sum(), (W**3).sum(), W.sum()])
    combiner.primary_gradients(losses.sum(), losses, torch.tensor([False, True, True]), [W], [True])
    assert combiner.weight.tolist() == [1.0, 1.0, 1.0] and not combiner.started


def test_dwa_lambdas_against_equations_3_4_from_a_loss_history():
    """Epochs of 2 steps; a task's epoch mean is over its labelled steps; lambda = 1 for two epochs, then
    lambda_k = 3 exp(w_k / T) / sum_i exp(w_i / T), w_k = L_k(e - 1) / L_k(e - 2)."""
    combiner = DWA(2, temperature=2.0, update_every=2).double()
    history = torch.tensor(
        [[4.0, 2.0, 1.0], [2.0, 2.0, 3.0], [3.0, 1.0, 1.0], [1.0, 1.0, 1.0], [2.0, 0.5, 2.0], [0.0, 1.5, 2.0]],
        dtype=torch.float64,
    )
    has_targets = torch.ones(6, 3, dtype=bool)
    has_targets[5, 0] = False  # no main label in the batch: its 0 is left out of the epoch's mean
    after_step = []
    for losses, labelled in zip(history, has_targets):
        combiner.record(losses, labelled)
        after_step.append(combiner.weight.detach().clone())

    def lambdas(later, earlier):
        rates = later / earlier
        return 3 * torch.exp(rates / 2) / torch.exp(rates / 2).sum()

    epoch_means = [history[0:2].mean(0), history[2:4].mean(0), history[4:6].mean(0)]
    epoch_means[2][0] = history[4, 0]  # step 6 had no main label
    for lambdas_of_epoch in after_step[:3]:  # epochs 1 and 2
        assert torch.equal(lambdas_of_epoch, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(after_step[3], lambdas(epoch_means[1], epoch_means[0]))  # epoch 3, set at step 4
    torch.testing.assert_close(after_step[4], after_step[3])
    torch.testing.assert_close(after_step[5], lambdas(epoch_means[2], epoch_means[1]))  # epoch 4
    main, aux = torch.rand(5, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64)
    present = torch.ones(5, dtype=bool)
    torch.testing.assert_close(
        combiner(main, aux, present), combiner.weight @ torch.cat([main.mean()[None], aux.mean(0)])
    )
    torch.testing.assert_close(combiner.weights(aux), combiner.weight[1:] / combiner.weight[0])


@pytest.mark.parametrize("variant", ["unweighted", "weighted"])
def test_gcs_gates_an_opposed_auxiliary_and_keeps_an_aligned_one(variant):
    """Shared W [3] and a head H [2] (not shared): the gate is the cosine over W alone; W follows
    grad L_main + sum_k gate_k grad L_aux_k, the head every task's gradient ungated."""
    W, H = (
        torch.zeros(3, dtype=torch.float64, requires_grad=True),
        torch.zeros(2, dtype=torch.float64, requires_grad=True),
    )
    on_w = torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 1.0], [-1.0, -1.0, 3.0]], dtype=torch.float64)
    on_h = torch.tensor([[1.0, 0.0], [5.0, 5.0], [0.0, -3.0]], dtype=torch.float64)  # would flip cos if counted
    losses = linear_losses(list(zip(on_w, on_h)), [W, H])
    combiner = GCS(2, variant).double()
    grad_w, grad_h = combiner.primary_gradients(losses.sum(), losses, torch.ones(3, dtype=bool), [W, H], [True, False])
    cosines = torch.stack([on_w[0] @ on_w[k] / (on_w[0].norm() * on_w[k].norm()) for k in (1, 2)])
    assert cosines[0] > 0 > cosines[1]  # one aligned, one opposed
    gates = (cosines > 0).double() if variant == "unweighted" else cosines.clamp(min=0)
    torch.testing.assert_close(combiner.weights(torch.rand(4, 2)), gates)
    torch.testing.assert_close(grad_w, on_w[0] + gates @ on_w[1:])
    torch.testing.assert_close(grad_h, on_h.sum(0))


def test_olaux_weights_step_by_the_summed_inner_products_every_n_steps():
    """Three steps of different linear losses: the step uses the weights of that step; after N = 3 steps
    w_k = max(0, 1 + beta sum_j <grad L_main, grad L_aux_k>) over the shared parameter only."""
    torch.manual_seed(1)
    combiner = OLAux(2, lr=1.0, update_every=3).double()
    W, H = (
        torch.zeros(4, dtype=torch.float64, requires_grad=True),
        torch.zeros(2, dtype=torch.float64, requires_grad=True),
    )
    products = torch.zeros(2, dtype=torch.float64)
    for step in range(3):
        on_w, on_h = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
        losses = linear_losses(list(zip(on_w, on_h)), [W, H])
        grad_w, grad_h = combiner.primary_gradients(None, losses, torch.ones(3, dtype=bool), [W, H], [True, False])
        torch.testing.assert_close(
            grad_w, on_w[0] + on_w[1:].T @ torch.ones(2, dtype=torch.float64)
        )  # w = 1 until step 3
        torch.testing.assert_close(grad_h, on_h.sum(0))
        products += on_w[1:] @ on_w[0]
        if step < 2:
            assert combiner.weight.tolist() == [1.0, 1.0]
    assert 1 + products.min() < 0 < products.max()  # one weight clamped at 0, one moved up
    torch.testing.assert_close(combiner.weight, (1 + products).clamp(min=0))
    assert combiner.products.tolist() == [0.0, 0.0]


def train_on_toy(combiner: str, steps: int = 150):
    """A seeded run on the toy regression (the docs/results.md setting, primary Adam 0.01, update_every 5):
    (the test MSE, the last step's metrics, the gates of the steps whose batch had a main label)."""
    toy = AuxToy()
    torch.manual_seed(0)
    model = MLP(toy.input_shape, toy.output_dim, hidden_sizes=[])
    algorithm = AuxiLearn(
        model, toy, neumann(), None, combiner=combiner, update_every=5, primary_optimizer=ADAM, combiner_optimizer=SGD
    )
    generator, used = toy.generator(0), []
    for _ in range(steps):
        batch = toy.sample(25, "train", generator)
        metrics = algorithm.train_step(batch)
        if (~torch.isnan(batch.y)).any():
            used.append([metrics["weight/helpful"], metrics["weight/harmful"]])
    mse = algorithm.evaluate(toy.held_out("test", torch.arange(1000)))["loss"].mean().item()
    return mse, metrics, torch.tensor(used)


@pytest.fixture(scope="module")
def toy_baselines():
    return {name: train_on_toy(name)[0] for name in ("main_only", "equal")}


@pytest.mark.parametrize("combiner", BASELINES)
def test_each_baseline_on_the_toy(combiner, toy_baselines):
    """What each does with a helpful and a harmful auxiliary in 150 steps (test MSE: main-only 6.7, equal
    2.9). OL-AUX drops the harmful one and beats equal weighting (1.1); GCS opens the harmful one's gate on
    fewer labelled steps than the helpful one's (43% against 91%) but does not beat equal weighting (4.1);
    GradNorm and DWA balance the tasks and do not tell them apart (3.4, 3.2): all beat main-only training."""
    mse, metrics, used = train_on_toy(combiner)
    helpful, harmful = metrics["weight/helpful"], metrics["weight/harmful"]
    assert mse < 0.7 * toy_baselines["main_only"], (mse, toy_baselines)
    if combiner == "olaux":
        assert harmful == 0.0 and helpful > 1.0, metrics
        assert mse < 0.5 * toy_baselines["equal"], (mse, toy_baselines)
    if combiner == "gcs":
        fraction = used.mean(0)
        assert fraction[1] < fraction[0] - 0.3, fraction
    if combiner == "gradnorm":
        assert harmful < 1.0 and helpful < 1.0, metrics  # main's weight grew, the sum stays 3
    if combiner == "dwa":
        assert 0.1 < harmful < 1.0 and abs(helpful - harmful) < 0.1, metrics


@pytest.mark.parametrize(
    "overrides, sentence",
    [
        (
            ["algo.combiner=gradnorm", "algo.alpha=-1"],
            "algo.alpha must be a finite number >= 0 (got -1): GradNorm's restoring force, e.g. algo.alpha=1.5 "
            "(the paper's NYUv2 value).",
        ),
        (
            ["algo.combiner=dwa", "algo.temperature=0"],
            "algo.temperature must be a finite number > 0 (got 0): DWA's softmax temperature, "
            "e.g. algo.temperature=2 (the paper).",
        ),
        (
            ["algo.combiner=linear", "algo.temperature=3"],
            "algo.temperature has no effect with algo.combiner=linear: it is a setting of algo.combiner=dwa; "
            "remove algo.temperature or set algo.combiner=dwa.",
        ),
        (
            ["algo.combiner=gcs", "algo.olaux_lr=0.1"],
            "algo.olaux_lr has no effect with algo.combiner=gcs: it is a setting of algo.combiner=olaux; "
            "remove algo.olaux_lr or set algo.combiner=olaux.",
        ),
    ],
)
def test_a_bad_or_misplaced_setting_is_refused_in_one_sentence(overrides, sentence):
    with pytest.raises(ConfigError) as error:
        build(compose_config(["tasks=aux_toy", *overrides]), torch.device("cpu"))
    assert str(error.value) == sentence
    with pytest.raises(ConfigError, match=r"^algo.gradnorm_lr must be a finite number > 0 \(got nan\)"):
        make_combiner("gradnorm", 2, gradnorm_lr=float("nan"))


@pytest.mark.parametrize("combiner", BASELINES)
def test_resumed_from_a_state_dict_equals_uninterrupted(combiner):
    """2k steps against k steps, the state saved and loaded into a fresh algorithm, k more steps: the
    network, the combiner's weights and its rule's state (L(0) and Adam moments, loss history, products)
    agree; k = 7 with epochs / horizons of 3 steps, so the split falls inside one."""
    toy = toy_algorithm(combiner=combiner).tasks
    generator = toy.generator(3)
    batches = [toy.sample(25, "train", generator) for _ in range(14)]
    make = functools.partial(toy_algorithm, combiner=combiner, update_every=3, primary_optimizer=ADAM)
    full, first = make(), make()
    for batch in batches:
        full.train_step(batch)
    for batch in batches[:7]:
        first.train_step(batch)
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(saved))
    for batch in batches[7:]:
        resumed.train_step(batch)
    for module in ("model", "combiner"):
        expected, got = (getattr(a, module).state_dict() for a in (full, resumed))
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=f"{module}.{key}")
    fresh = make().combiner.state_dict()
    moved = [key for key, value in full.combiner.state_dict().items() if not torch.equal(value, fresh[key])]
    assert moved, "the combiner's state never moved: the comparison would prove nothing"
